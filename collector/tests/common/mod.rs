//! Shared helpers: hop builders for constructed chains, and an in-process server.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hopwatch_collector::server::serve;
use hopwatch_collector::service::{now_ms, Collector, Settings};
use hopwatch_proto::v1::{Direction, Hop, TagSource, TraceContext};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub const NS: &str = "default";

pub fn base_us() -> u64 {
    now_ms() * 1000 - 60_000_000
}

/// An inbound hop of `wl` (service `svc`) with span id `span`.
pub fn inbound(
    trace: &str,
    wl: &str,
    svc: &str,
    span: &str,
    start_us: u64,
    dur_us: u64,
    tag: &str,
) -> Hop {
    Hop {
        trace_id: trace.into(),
        span_id: span.into(),
        request_id: format!("req-{trace}-{span}"),
        direction: Direction::Inbound as i32,
        workload: wl.into(),
        namespace: NS.into(),
        pod: format!("{wl}-pod"),
        service: svc.into(),
        tag_received: tag.into(),
        tag_sent: tag.into(),
        tag_source: if tag.is_empty() {
            TagSource::None
        } else {
            TagSource::Request
        } as i32,
        trace_context: if trace.is_empty() {
            TraceContext::Missing
        } else {
            TraceContext::Valid
        } as i32,
        authority: format!("{svc}:9080"),
        method: "GET".into(),
        path: format!("/{svc}"),
        response_code: 200,
        upstream_cluster: "inbound|9080||".into(),
        upstream_host: "127.0.0.6:9080".into(),
        start_time_unix_micros: start_us,
        duration_micros: dur_us,
        sampled_report: true,
        ..Default::default()
    }
}

/// An outbound hop from `wl` (service `svc`, serving inbound span `parent_span`) to
/// `dest_svc`, sending span id `up_span` upstream.
#[allow(clippy::too_many_arguments)]
pub fn outbound(
    trace: &str,
    wl: &str,
    svc: &str,
    parent_span: &str,
    up_span: &str,
    dest_svc: &str,
    start_us: u64,
    dur_us: u64,
    tag: &str,
) -> Hop {
    Hop {
        trace_id: trace.into(),
        span_id: parent_span.into(),
        upstream_span_id: up_span.into(),
        request_id: format!("req-{trace}-{up_span}"),
        direction: Direction::Outbound as i32,
        workload: wl.into(),
        namespace: NS.into(),
        pod: format!("{wl}-pod"),
        service: svc.into(),
        tag_received: tag.into(),
        tag_sent: tag.into(),
        tag_source: if tag.is_empty() {
            TagSource::None
        } else {
            TagSource::Request
        } as i32,
        correlated_tag: tag.into(),
        trace_context: if trace.is_empty() {
            TraceContext::Missing
        } else {
            TraceContext::Propagated
        } as i32,
        authority: format!("{dest_svc}:9080"),
        method: "GET".into(),
        path: format!("/{dest_svc}"),
        response_code: 200,
        upstream_cluster: format!("outbound|9080||{dest_svc}.{NS}.svc.cluster.local"),
        upstream_host: "10.1.2.3:9080".into(),
        start_time_unix_micros: start_us,
        duration_micros: dur_us,
        sampled_report: true,
        ..Default::default()
    }
}

/// A healthy chain: (edge) → productpage → reviews → ratings, all tagged `tag`.
/// Hops: 0 pp inbound, 1 pp→reviews out, 2 reviews in, 3 reviews→ratings out, 4 ratings in.
pub fn healthy_chain(trace: &str, base: u64, tag: &str) -> Vec<Hop> {
    vec![
        inbound(
            trace,
            "productpage-v1",
            "productpage",
            "a000000000000001",
            base,
            10_000,
            tag,
        ),
        outbound(
            trace,
            "productpage-v1",
            "productpage",
            "a000000000000001",
            "a000000000000002",
            "reviews",
            base + 1_000,
            6_000,
            tag,
        ),
        inbound(
            trace,
            "reviews-v1",
            "reviews",
            "a000000000000002",
            base + 1_100,
            5_800,
            tag,
        ),
        outbound(
            trace,
            "reviews-v1",
            "reviews",
            "a000000000000002",
            "a000000000000003",
            "ratings",
            base + 2_000,
            2_000,
            tag,
        ),
        inbound(
            trace,
            "ratings-v1",
            "ratings",
            "a000000000000003",
            base + 2_100,
            1_800,
            tag,
        ),
    ]
}

pub fn trace_id(n: u32) -> String {
    format!("{:032x}", 0x4bf9_2f35_77b3_4da6_u128 << 64 | n as u128)
}

pub struct TestServer {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub collector: Arc<Collector>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), hopwatch_collector::server::ServerError>>>,
}

impl TestServer {
    pub async fn start(settings: Settings, dir: &std::path::Path) -> TestServer {
        let collector = Arc::new(Collector::open(settings, dir).expect("open collector"));
        let g = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let h = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (grpc, http) = (g.local_addr().unwrap(), h.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(collector.clone(), g, h, async move {
            let _ = rx.await;
        }));
        TestServer {
            grpc,
            http,
            collector,
            stop: Some(tx),
            task: Some(task),
        }
    }
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }
    /// Triggers the graceful shutdown and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("server stops within 10s")
                .expect("server task")
                .expect("server result");
        }
    }
}

pub fn fast_settings() -> Settings {
    let mut s = Settings::default();
    s.limits.trace_quiet = Duration::from_millis(100);
    s
}

/// GET over plain HTTP/1.0.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
