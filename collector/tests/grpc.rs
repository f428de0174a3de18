//! In-process gRPC tests: every RPC, the bad-input statuses, restart and graceful shutdown.

mod common;

use std::time::Duration;

use common::*;
use hopwatch_collector::service::{now_ms, Collector, Settings};
use hopwatch_collector::store::Filter;
use hopwatch_proto::v1::collector_client::CollectorClient;
use hopwatch_proto::v1::query_client::QueryClient;
use hopwatch_proto::v1::{
    BreakKind, Direction, GetTraceRequest, Hop, ListBreaksRequest, ReportRequest, Severity,
    SummaryRequest, WatchBreaksRequest,
};
use tonic::Code;

fn failing_chain(t: &str) -> Vec<Hop> {
    let mut hops = healthy_chain(t, base_us(), "dev");
    hops[4].response_code = 503;
    hops[4].response_flags = 1 << 5; // UF
    hops[3].response_code = 503;
    hops[1].response_code = 503;
    hops[0].response_code = 503;
    hops
}

async fn clients(
    s: &TestServer,
) -> (
    CollectorClient<tonic::transport::Channel>,
    QueryClient<tonic::transport::Channel>,
) {
    (
        CollectorClient::connect(s.url()).await.unwrap(),
        QueryClient::connect(s.url()).await.unwrap(),
    )
}

async fn wait_for_breaks(
    q: &mut QueryClient<tonic::transport::Channel>,
    n: usize,
) -> Vec<hopwatch_proto::v1::Break> {
    for _ in 0..200 {
        let b = q
            .list_breaks(ListBreaksRequest::default())
            .await
            .unwrap()
            .into_inner()
            .breaks;
        if b.len() >= n {
            return b;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no {n} breaks within 10s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(fast_settings(), dir.path()).await;
    let (mut c, mut q) = clients(&s).await;

    // WatchBreaks first, so it sees the findings as they are recorded.
    let mut watch = q
        .watch_breaks(WatchBreaksRequest {
            kind: BreakKind::UpstreamFailure as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let bad = trace_id(1);
    let good = trace_id(2);
    let mut hops = failing_chain(&bad);
    hops.extend(healthy_chain(&good, base_us(), "dev"));
    let r = c
        .report(ReportRequest {
            hops,
            reporter_pod: "p".into(),
            reporter_namespace: NS.into(),
            dropped_since_last_batch: 7,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.accepted, 10);

    // GetTrace while open.
    let t = q
        .get_trace(GetTraceRequest {
            trace_id: good.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.hop_count, 5);

    let breaks = wait_for_breaks(&mut q, 1).await;
    assert_eq!(breaks.len(), 1, "{breaks:?}");
    let b = &breaks[0];
    assert_eq!(b.kind, BreakKind::UpstreamFailure as i32);
    assert_eq!(b.severity, Severity::Error as i32);
    assert_eq!(b.workload, "ratings-v1");
    assert_eq!(b.flags, vec!["UF".to_string()]);
    assert_eq!(b.trace_ids, vec![bad.clone()]);

    let w = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(w.id, b.id);

    // Filters.
    let lb = |kind: i32, wl: &str, ns: &str| ListBreaksRequest {
        kind,
        workload: wl.into(),
        namespace: ns.into(),
        ..Default::default()
    };
    assert_eq!(
        q.list_breaks(lb(BreakKind::TagDropped as i32, "", ""))
            .await
            .unwrap()
            .into_inner()
            .breaks
            .len(),
        0
    );
    assert_eq!(
        q.list_breaks(lb(BreakKind::UpstreamFailure as i32, "ratings-v1", NS))
            .await
            .unwrap()
            .into_inner()
            .breaks
            .len(),
        1
    );
    assert_eq!(
        q.list_breaks(lb(0, "nope", ""))
            .await
            .unwrap()
            .into_inner()
            .breaks
            .len(),
        0
    );
    assert_eq!(
        q.list_breaks(lb(0, "", "other-ns"))
            .await
            .unwrap()
            .into_inner()
            .breaks
            .len(),
        0
    );
    let since = ListBreaksRequest {
        since_seconds: 3600,
        ..Default::default()
    };
    assert_eq!(
        q.list_breaks(since)
            .await
            .unwrap()
            .into_inner()
            .breaks
            .len(),
        1
    );

    // GetTrace after analysis: the tree with the break marked, and the finding.
    let t = q
        .get_trace(GetTraceRequest {
            trace_id: bad.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!t.open);
    assert_eq!(t.hop_count, 5);
    assert_eq!(t.breaks.len(), 1);
    let ratings = &t.roots[0].children[0].children[0];
    assert_eq!(ratings.inbound.as_ref().unwrap().workload, "ratings-v1");
    assert_eq!(ratings.breaks, vec![BreakKind::UpstreamFailure as i32]);

    // Summary.
    let sum = q.summary(SummaryRequest {}).await.unwrap().into_inner();
    assert_eq!(sum.hops_received, 10);
    assert_eq!(sum.findings, 1);
    assert_eq!(sum.reports_dropped_by_filters, 7);
    assert_eq!(sum.traces_analysed, 2);
    let ratings = sum
        .workloads
        .iter()
        .find(|w| w.workload == "ratings-v1")
        .unwrap();
    assert_eq!(ratings.flags.get("UF"), Some(&1));
    assert_eq!(ratings.breaks, 1);

    // Health and reflection.
    let mut h = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Channel::from_shared(s.url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let st = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: "hopwatch.v1.Collector".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        st.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    {
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        let mut r = ServerReflectionClient::new(
            tonic::transport::Channel::from_shared(s.url())
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = r
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let msg = resp.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(l)) = msg.message_response else {
            panic!("{msg:?}")
        };
        let names: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
        for want in [
            "hopwatch.v1.Collector",
            "hopwatch.v1.Query",
            "grpc.health.v1.Health",
        ] {
            assert!(names.iter().any(|n| n == want), "{names:?}");
        }
    }

    // Metrics and healthz.
    let m = http_get(s.http, "/metrics").await;
    assert!(m.contains("hopwatch_hops_received_total 10"), "{m}");
    assert!(m.contains("hopwatch_findings{kind=\"UPSTREAM_FAILURE\"} 1"));
    assert!(m.contains("hopwatch_reports_dropped_by_filters_total 7"));
    assert!(m.contains("hopwatch_open_traces 0"));
    // One occurrence of the finding, with where it happened.
    assert!(
        m.contains("hopwatch_breaks_total{kind=\"UPSTREAM_FAILURE\",severity=\"ERROR\",namespace=\"default\","),
        "{m}"
    );
    assert!(http_get(s.http, "/healthz").await.ends_with("ok\n"));

    drop(watch);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_status_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(fast_settings(), dir.path()).await;
    let (mut c, mut q) = clients(&s).await;

    let e = c.report(ReportRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("empty batch"), "{}", e.message());

    let mut h = healthy_chain(&trace_id(9), base_us(), "");
    h[2].direction = Direction::Unspecified as i32;
    let e = c
        .report(ReportRequest {
            hops: h,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("hop 2") && e.message().contains("direction"),
        "{}",
        e.message()
    );

    let mut h = healthy_chain(&trace_id(9), base_us(), "");
    h[1].trace_id.clear();
    h[1].request_id.clear();
    let e = c
        .report(ReportRequest {
            hops: h,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("neither trace_id nor request_id"),
        "{}",
        e.message()
    );

    let big: Vec<Hop> = (0..5001)
        .map(|i| inbound(&trace_id(i), "w", "s", "", 1, 1, ""))
        .collect();
    let e = c
        .report(ReportRequest {
            hops: big,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("5001") && e.message().contains("5000"),
        "{}",
        e.message()
    );

    let e = q
        .get_trace(GetTraceRequest {
            trace_id: "deadbeef".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("deadbeef"));
    let e = q
        .get_trace(GetTraceRequest {
            trace_id: "".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let e = q
        .list_breaks(ListBreaksRequest {
            kind: 99,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("TAG_DROPPED"), "{}", e.message());
    let e = q
        .list_breaks(ListBreaksRequest {
            limit: 1_000_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = q
        .watch_breaks(WatchBreaksRequest {
            kind: -3,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let m = http_get(s.http, "/metrics").await;
    assert!(
        m.contains("hopwatch_batches_rejected_total{reason=\"empty\"} 1"),
        "{m}"
    );
    assert!(m.contains("hopwatch_batches_rejected_total{reason=\"malformed\"} 2"));
    assert!(m.contains("hopwatch_batches_rejected_total{reason=\"too_large\"} 1"));
    assert!(m.contains("hopwatch_queries_rejected_total{code=\"not_found\"} 1"));
    assert!(m.contains("hopwatch_queries_rejected_total{code=\"invalid_argument\"} 4"));
    assert!(m.contains("hopwatch_hops_received_total 0"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn findings_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(fast_settings(), dir.path()).await;
    let (mut c, mut q) = clients(&s).await;
    c.report(ReportRequest {
        hops: failing_chain(&trace_id(40)),
        ..Default::default()
    })
    .await
    .unwrap();
    let before = wait_for_breaks(&mut q, 1).await;
    s.stop().await;

    let s = TestServer::start(fast_settings(), dir.path()).await;
    let (_, mut q) = clients(&s).await;
    let after = q
        .list_breaks(ListBreaksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .breaks;
    assert_eq!(after, before);
    // More of the same break after the restart: the count continues.
    let (mut c, _) = clients(&s).await;
    c.report(ReportRequest {
        hops: failing_chain(&trace_id(41)),
        ..Default::default()
    })
    .await
    .unwrap();
    for _ in 0..200 {
        let b = q
            .list_breaks(ListBreaksRequest::default())
            .await
            .unwrap()
            .into_inner()
            .breaks;
        if b[0].count == 2 {
            assert_eq!(b[0].trace_ids, vec![trace_id(41), trace_id(40)]);
            s.stop().await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("count did not reach 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_analyses_open_traces_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::default();
    settings.limits.trace_quiet = Duration::from_secs(3600); // never quiet during the test
    let s = TestServer::start(settings.clone(), dir.path()).await;
    let (mut c, mut q) = clients(&s).await;
    c.report(ReportRequest {
        hops: failing_chain(&trace_id(50)),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(q
        .list_breaks(ListBreaksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .breaks
        .is_empty());
    // A watcher must not hold the shutdown up.
    let _watch = q
        .watch_breaks(WatchBreaksRequest::default())
        .await
        .unwrap()
        .into_inner();
    s.stop().await; // the SIGTERM path: serve()'s shutdown future resolves

    let reopened = Collector::open(settings, dir.path()).unwrap();
    let b = reopened.list_breaks(&Filter::default(), 10);
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].kind, BreakKind::UpstreamFailure as i32);
}

#[test]
fn shutdown_function_flushes_open_traces() {
    let dir = tempfile::tempdir().unwrap();
    let c = Collector::open(Settings::default(), dir.path()).unwrap();
    let mut hops = healthy_chain(&trace_id(60), base_us(), "");
    hops.remove(4);
    c.report(
        &ReportRequest {
            hops,
            ..Default::default()
        },
        now_ms(),
    )
    .unwrap();
    assert_eq!(c.core.lock().open_traces(), 1);
    assert_eq!(c.shutdown(now_ms()).unwrap(), 1);
    assert_eq!(c.core.lock().open_traces(), 0);
    drop(c);
    let c = Collector::open(Settings::default(), dir.path()).unwrap();
    assert_eq!(
        c.list_breaks(&Filter::default(), 10)[0].kind,
        BreakKind::HopMissing as i32
    );
}

#[test]
fn retention_by_age_and_count_also_in_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        retention_count: 5,
        retention_age: Duration::from_secs(3600),
        ..Default::default()
    };
    let c = Collector::open(settings.clone(), dir.path()).unwrap();
    let now = now_ms();
    // 6 distinct HOP_MISSING findings (different callers), seen at different times.
    for i in 0..6u32 {
        let mut hops = healthy_chain(
            &trace_id(70 + i),
            (now - 4_500_000 + i as u64 * 600_000) * 1000,
            "",
        );
        hops.remove(4);
        hops[3].workload = format!("caller-{i}");
        hops[3].pod = format!("caller-{i}-pod");
        c.report(
            &ReportRequest {
                hops,
                ..Default::default()
            },
            now,
        )
        .unwrap();
    }
    c.shutdown(now).unwrap();
    // The count bound applies as findings arrive (the least recently seen, caller-0,
    // went); then retention by age removes caller-1 (older than an hour).
    assert_eq!(c.list_breaks(&Filter::default(), 100).len(), 5);
    let removed = c.retain(now);
    assert_eq!(removed, 1);
    let left: Vec<String> = c
        .list_breaks(&Filter::default(), 100)
        .into_iter()
        .map(|b| b.workload)
        .collect();
    assert_eq!(left, vec!["caller-5", "caller-4", "caller-3", "caller-2"]);
    c.flush().unwrap();
    drop(c);
    let c = Collector::open(settings, dir.path()).unwrap();
    assert_eq!(c.list_breaks(&Filter::default(), 100).len(), 4);
}
