//! gRPC (Collector, Query, Health, reflection) and HTTP (/metrics, /healthz, /livez, the
//! web view at `/`) front ends,
//! the background tasks (analysis, persistence, retention) and graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use hopwatch_proto::v1::collector_server::{self, CollectorServer};
use hopwatch_proto::v1::query_server::{self, QueryServer};
use hopwatch_proto::v1::{
    Break, BreakKind, GetTraceRequest, GetTraceResponse, ListBreaksRequest, ListBreaksResponse,
    ReportRequest, ReportResponse, SummaryRequest, SummaryResponse, WatchBreaksRequest,
};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::budget::Budgets;
use crate::core::Limits;
use crate::service::{now_ms, Collector, QueryError, ReportError, Settings};
use crate::store::Filter;

/// Largest gRPC message accepted (a 5,000-hop batch is ~4 MB).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// ListBreaks limits.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

fn parse_size(s: &str) -> Result<usize, String> {
    crate::budget::parse_size(s).map_err(|e| e.to_string())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 5s, 2m, 1h, 7d)"))
}

/// `hopwatch-collector` command line.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "hopwatch-collector",
    version,
    about = "hopwatch collector: joins hop reports into call chains and finds where they broke"
)]
pub struct ServerArgs {
    /// gRPC listen address (Collector, Query, Health, reflection).
    #[arg(long, default_value = "0.0.0.0:9090")]
    pub listen: SocketAddr,
    /// HTTP listen address (/metrics, /healthz, the web view at /).
    #[arg(long, default_value = "0.0.0.0:9091")]
    pub http_listen: SocketAddr,
    /// Directory of the findings database.
    #[arg(long, default_value = "./hopwatch-data")]
    pub data_dir: PathBuf,
    /// A trace is analysed once no hop of it arrived for this long.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub trace_quiet: Duration,
    /// A trace is analysed at this age even if hops still arrive.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub max_trace_age: Duration,
    /// Open traces kept in memory; beyond, the least recently updated is analysed early
    /// (in full if no hop of it arrived for 2s or --trace-quiet if shorter, else without
    /// HOP_MISSING). Memory is bounded by --max-open-hops.
    #[arg(long, default_value_t = 400_000)]
    pub max_open_traces: usize,
    /// Hops kept per trace; more are dropped and counted.
    #[arg(long, default_value_t = 1_000)]
    pub max_hops_per_trace: usize,
    /// Hops held in open traces (the memory bound, ~340 bytes each); beyond, the least
    /// recently updated trace is analysed early.
    #[arg(long, default_value_t = 1_200_000)]
    pub max_open_hops: usize,
    /// Hops of analysed traces kept for GetTrace.
    #[arg(long, default_value_t = 200_000)]
    pub max_recent_hops: usize,
    /// Largest Report batch, in hops (larger: RESOURCE_EXHAUSTED).
    #[arg(long, default_value_t = 5_000)]
    pub max_batch_hops: usize,
    /// Findings not seen for this long are deleted.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    pub retention_age: Duration,
    /// At most this many findings are kept (applied as findings arrive).
    #[arg(long, default_value_t = 100_000)]
    pub retention_count: usize,
    /// One (namespace, workload) keeps at most this many findings: over it, its own least
    /// recently seen go, never another workload's.
    #[arg(long, default_value_t = 5_000)]
    pub max_findings_per_workload: usize,
    /// One namespace keeps at most this many findings (its own least recently seen go).
    #[arg(long, default_value_t = 25_000)]
    pub max_findings_per_namespace: usize,
    /// Byte budget of the open traces (sizes like 256MiB, 64MB, 1GiB; the defaults of all
    /// budgets add up to 640MiB, for the shipped 1 GiB pod): over it, the least recently
    /// updated trace is analysed early.
    #[arg(long, default_value = "320MiB", value_parser = parse_size)]
    pub max_open_bytes: usize,
    /// Byte budget of the analysed traces kept for GetTrace (oldest dropped first).
    #[arg(long, default_value = "48MiB", value_parser = parse_size)]
    pub max_recent_bytes: usize,
    /// Byte budget of the string table (names, tags, details); unreferenced strings are
    /// freed by compaction, new ones past the budget are kept as "<overflow>".
    #[arg(long, default_value = "32MiB", value_parser = parse_size)]
    pub max_string_bytes: usize,
    /// Byte budget of the findings in memory (least recently seen dropped first).
    #[arg(long, default_value = "160MiB", value_parser = parse_size)]
    pub max_findings_bytes: usize,
    /// Byte budget of the per-workload stats rows (Summary; least recently updated
    /// dropped first).
    #[arg(long, default_value = "16MiB", value_parser = parse_size)]
    pub max_workload_stats_bytes: usize,
    /// Per-workload stats rows without a hop for this long are dropped.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub workload_stats_ttl: Duration,
    /// Byte budget of the cross-trace indexes: the per-pod inbound index 1/2, the
    /// request-id fragment index 1/4, the service graph and the instance registry 1/8
    /// each (the least recently seen entries go first).
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub max_pod_index_bytes: usize,
    /// Clock slack when joining hops reported by different sidecars.
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    pub join_slack: Duration,
    /// An instance environment (pod tag) is forgotten this long after its last hop
    /// (TAG_MISROUTED compares against the instances still known).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub instance_ttl: Duration,
    /// Log lines: `text` (ANSI colour only on a terminal, never with NO_COLOR) or `json`
    /// (one JSON object per line, for log collectors). Level from RUST_LOG (default info).
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Who may report (peer identity, report token, clock skew).
    #[command(flatten)]
    pub identity: crate::identity::IdentityArgs,
    /// Without the write-ahead log of accepted hops (under --data-dir/wal): a crash then
    /// loses the open traces and the findings not yet flushed (--trace-quiet + 1s of
    /// traffic and more), instead of at most --wal-sync-interval.
    #[arg(long)]
    pub no_wal: bool,
    /// How often the write-ahead log is written and fsynced (one group commit for every
    /// Report of the interval): what a crash can lose.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    pub wal_sync_interval: Duration,
}

/// `--log-format` of the collector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl ServerArgs {
    /// `--no-wal`, `--wal-sync-interval`.
    pub fn persist_options(&self) -> crate::persist::PersistOptions {
        crate::persist::PersistOptions {
            wal: (!self.no_wal).then(|| crate::wal::WalOptions {
                sync_interval: self.wal_sync_interval,
                ..Default::default()
            }),
        }
    }

    pub fn settings(&self) -> Settings {
        Settings {
            limits: Limits {
                trace_quiet: self.trace_quiet,
                max_trace_age: self.max_trace_age,
                max_open_traces: self.max_open_traces,
                max_hops_per_trace: self.max_hops_per_trace,
                max_open_hops: self.max_open_hops,
                max_recent_hops: self.max_recent_hops,
                join_slack: self.join_slack,
                instance_ttl: self.instance_ttl,
                budgets: Budgets {
                    open: self.max_open_bytes,
                    recent: self.max_recent_bytes,
                    strings: self.max_string_bytes,
                    findings: self.max_findings_bytes,
                    workload_stats: self.max_workload_stats_bytes,
                    pod_index: self.max_pod_index_bytes,
                },
                workload_stats_ttl: self.workload_stats_ttl,
                ..Limits::default()
            },
            max_batch_hops: self.max_batch_hops,
            retention_age: self.retention_age,
            retention_count: self.retention_count,
            identity: self.identity.policy(),
            max_findings_per_workload: self.max_findings_per_workload,
            max_findings_per_namespace: self.max_findings_per_namespace,
        }
    }
}

/// `hopwatch.v1.Collector`.
pub struct CollectorSvc(pub Arc<Collector>);

#[tonic::async_trait]
impl collector_server::Collector for CollectorSvc {
    async fn report(
        &self,
        req: Request<ReportRequest>,
    ) -> Result<Response<ReportResponse>, Status> {
        let sender = crate::identity::Sender::from_metadata(req.metadata());
        let req = req.into_inner();
        let result = self.0.report_from(&req, &sender, now_ms());
        if let Err(e) = &result {
            tracing::debug!(reporter = %req.reporter_pod, namespace = %req.reporter_namespace, error = %e, "rejected a report batch");
        }
        match result {
            Ok(accepted) => Ok(Response::new(ReportResponse { accepted })),
            Err(e @ ReportError::TooLarge { .. }) => Err(Status::resource_exhausted(e.to_string())),
            Err(ReportError::Refused(r)) => Err(Status::new(r.code(), r.to_string())),
            Err(e) => Err(Status::invalid_argument(e.to_string())),
        }
    }
}

/// `hopwatch.v1.Query`.
pub struct QuerySvc {
    pub collector: Arc<Collector>,
    pub stop: watch::Receiver<bool>,
}

fn kind_filter(k: i32) -> Result<Option<BreakKind>, String> {
    match BreakKind::try_from(k) {
        Ok(BreakKind::Unspecified) => Ok(None),
        Ok(k) => Ok(Some(k)),
        Err(_) => Err(format!(
            "unknown break kind {k}; valid kinds: {}",
            valid_kinds().join(", ")
        )),
    }
}

/// The break kind names, in enum order.
pub fn valid_kinds() -> Vec<&'static str> {
    (1..=63)
        .filter_map(|k| BreakKind::try_from(k).ok())
        .map(|k| k.as_str_name())
        .collect()
}

fn opt(s: String) -> Option<String> {
    let s = s.trim().to_string();
    (!s.is_empty()).then_some(s)
}

impl QuerySvc {
    fn invalid(&self, msg: String) -> Status {
        self.collector
            .metrics
            .queries_rejected_invalid
            .fetch_add(1, Relaxed);
        Status::invalid_argument(msg)
    }
}

type BreakStream = Pin<Box<dyn Stream<Item = Result<Break, Status>> + Send>>;

#[tonic::async_trait]
impl query_server::Query for QuerySvc {
    async fn list_breaks(
        &self,
        req: Request<ListBreaksRequest>,
    ) -> Result<Response<ListBreaksResponse>, Status> {
        let r = req.into_inner();
        let kind = kind_filter(r.kind).map_err(|e| self.invalid(e))?;
        if r.limit as usize > MAX_LIMIT {
            return Err(self.invalid(format!(
                "limit {} exceeds the maximum of {MAX_LIMIT}",
                r.limit
            )));
        }
        const MAX_SINCE: u64 = 10 * 365 * 24 * 3600;
        if r.since_seconds > MAX_SINCE {
            return Err(self.invalid(format!(
                "since_seconds {} is more than 10 years",
                r.since_seconds
            )));
        }
        let filter = Filter {
            kind,
            workload: opt(r.workload),
            namespace: opt(r.namespace),
            since_ms: (r.since_seconds > 0)
                .then(|| now_ms().saturating_sub(r.since_seconds * 1000)),
        };
        let limit = if r.limit == 0 {
            DEFAULT_LIMIT
        } else {
            r.limit as usize
        };
        Ok(Response::new(ListBreaksResponse {
            breaks: self.collector.list_breaks(&filter, limit),
        }))
    }

    async fn get_trace(
        &self,
        req: Request<GetTraceRequest>,
    ) -> Result<Response<GetTraceResponse>, Status> {
        match self
            .collector
            .get_trace(&req.into_inner().trace_id, now_ms())
        {
            Ok(r) => Ok(Response::new(r)),
            Err(e @ QueryError::TraceNotFound(_)) => Err(Status::not_found(e.to_string())),
            Err(e) => Err(Status::invalid_argument(e.to_string())),
        }
    }

    type WatchBreaksStream = BreakStream;

    async fn watch_breaks(
        &self,
        req: Request<WatchBreaksRequest>,
    ) -> Result<Response<BreakStream>, Status> {
        let r = req.into_inner();
        let filter = Filter {
            kind: kind_filter(r.kind).map_err(|e| self.invalid(e))?,
            workload: opt(r.workload),
            namespace: opt(r.namespace),
            since_ms: None,
        };
        let mut sub = self.collector.subscribe();
        let mut stop = self.stop.clone();
        let collector = self.collector.clone();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            if *stop.borrow() {
                return;
            }
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = tx.closed() => break,
                    r = sub.recv() => match r {
                        Ok(b) => {
                            if filter.matches(&b) && tx.send(Ok(b)).await.is_err() {
                                break;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            collector.metrics.watch_lagged.fetch_add(n, Relaxed);
                        }
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn summary(
        &self,
        _req: Request<SummaryRequest>,
    ) -> Result<Response<SummaryResponse>, Status> {
        Ok(Response::new(self.collector.summary()))
    }
}

async fn metrics_handler(
    axum::extract::State(c): axum::extract::State<Arc<Collector>>,
    headers: axum::http::HeaderMap,
) -> impl axum::response::IntoResponse {
    let format = crate::metrics::Format::from_accept(
        headers
            .get(axum::http::header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    (
        [(axum::http::header::CONTENT_TYPE, format.content_type())],
        c.render_metrics_as(format),
    )
}

/// Readiness: 503 with the reason while findings or the WAL cannot be written (`/livez`
/// is liveness: 200 while the process serves HTTP).
async fn healthz(
    axum::extract::State(c): axum::extract::State<Arc<Collector>>,
) -> (axum::http::StatusCode, String) {
    match c.not_ready() {
        None => (axum::http::StatusCode::OK, "ok\n".into()),
        Some(why) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// Runs the analysis, persistence and retention loops until `stop` turns true.
async fn background(c: Arc<Collector>, mut stop: watch::Receiver<bool>) {
    let tick = (c.settings.limits.trace_quiet / 10)
        .clamp(Duration::from_millis(10), Duration::from_millis(250));
    let mut analyse = tokio::time::interval(tick);
    let mut flush = tokio::time::interval(crate::persist::TICK);
    let mut retention = tokio::time::interval(Duration::from_secs(60));
    for i in [&mut analyse, &mut flush, &mut retention] {
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = analyse.tick() => {
                let c = c.clone();
                let _ = tokio::task::spawn_blocking(move || c.poll(now_ms())).await;
            }
            _ = flush.tick() => {
                let c = c.clone();
                let _ = tokio::task::spawn_blocking(move || c.flush_tick()).await;
            }
            _ = retention.tick() => {
                let n = c.retain(now_ms());
                if n > 0 {
                    tracing::info!(removed = n, "findings removed by retention");
                }
            }
        }
    }
}

/// Serves until `shutdown` resolves, then stops accepting, analyses every open trace,
/// persists the findings and returns.
pub async fn serve(
    collector: Arc<Collector>,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<CollectorServer<CollectorSvc>>().await;
    health.set_serving::<QueryServer<QuerySvc>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(hopwatch_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(hopwatch_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let bg = tokio::spawn(background(collector.clone(), stop_rx.clone()));

    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics_handler))
        .route("/healthz", axum::routing::get(healthz))
        .route("/livez", axum::routing::get(|| async { "ok\n" }))
        .with_state(collector.clone())
        .merge(crate::web::routes(collector.clone()));
    let mut http_stop = stop_rx.clone();
    let http_task = tokio::spawn(async move {
        axum::serve(http, app)
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|s| *s).await;
            })
            .await
    });

    // The external signal flips `stop`, which ends watch streams (so the gRPC server's
    // graceful shutdown does not wait for them forever) and the background loops.
    let signal_tx = stop_tx.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = signal_tx.send(true);
    });
    let mut grpc_stop = stop_rx.clone();
    let health_on_stop = health.clone();
    tracing::info!(addr = ?grpc.local_addr().ok(), "gRPC listening");
    // Report batches are ~150 KB (200 hops): windows well above h2's 64 KB default avoid
    // a WINDOW_UPDATE round trip per batch.
    let grpc_result = tonic::transport::Server::builder()
        .initial_stream_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        .max_frame_size(1024 * 1024)
        .add_service(health_svc)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            CollectorServer::new(CollectorSvc(collector.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            QueryServer::new(QuerySvc {
                collector: collector.clone(),
                stop: stop_rx.clone(),
            })
            .max_decoding_message_size(1024 * 1024),
        )
        // TCP_NODELAY: without it, small query responses wait for the peer's delayed ACK
        // (~40 ms per call).
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)),
            async move {
                let _ = grpc_stop.wait_for(|s| *s).await;
                health_on_stop
                    .set_not_serving::<CollectorServer<CollectorSvc>>()
                    .await;
                tracing::info!("shutting down: no longer accepting requests");
            },
        )
        .await;
    let _ = stop_tx.send(true);
    let _ = bg.await;
    let c = collector.clone();
    let flushed = tokio::task::spawn_blocking(move || c.shutdown(now_ms())).await;
    if let Ok(Err(e)) = &flushed {
        tracing::error!(error = %e, "persisting findings at shutdown failed");
    }
    match http_task.await {
        Ok(Err(e)) => return Err(ServerError::Http(e)),
        Err(e) => tracing::error!(error = %e, "HTTP task failed"),
        _ => {}
    }
    grpc_result?;
    if let Ok(Err(e)) = flushed {
        return Err(e.into());
    }
    Ok(())
}

/// Binds both listeners.
pub async fn bind(
    grpc: SocketAddr,
    http: SocketAddr,
) -> Result<(TcpListener, TcpListener), ServerError> {
    let g = TcpListener::bind(grpc)
        .await
        .map_err(|source| ServerError::Bind { addr: grpc, source })?;
    let h = TcpListener::bind(http)
        .await
        .map_err(|source| ServerError::Bind { addr: http, source })?;
    Ok((g, h))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn contract_defaults() {
        let a = ServerArgs::parse_from(["hopwatch-collector"]);
        assert_eq!(a.listen.to_string(), "0.0.0.0:9090");
        assert_eq!(a.http_listen.to_string(), "0.0.0.0:9091");
        assert_eq!(a.data_dir, PathBuf::from("./hopwatch-data"));
        assert_eq!(a.trace_quiet, Duration::from_secs(5));
        let a = ServerArgs::parse_from([
            "hopwatch-collector",
            "--trace-quiet",
            "1500ms",
            "--retention-age",
            "2d",
        ]);
        assert_eq!(a.settings().limits.trace_quiet, Duration::from_millis(1500));
        assert_eq!(a.settings().retention_age, Duration::from_secs(2 * 86400));
        assert!(
            ServerArgs::try_parse_from(["hopwatch-collector", "--trace-quiet", "soon"]).is_err()
        );
    }

    #[test]
    fn wal_flags() {
        let a = ServerArgs::parse_from(["hopwatch-collector"]);
        let w = a.persist_options().wal.expect("WAL on by default");
        assert_eq!(w.sync_interval, Duration::from_millis(200));
        let a = ServerArgs::parse_from(["hopwatch-collector", "--wal-sync-interval", "50ms"]);
        assert_eq!(
            a.persist_options().wal.unwrap().sync_interval,
            Duration::from_millis(50)
        );
        let a = ServerArgs::parse_from(["hopwatch-collector", "--no-wal"]);
        assert!(a.persist_options().wal.is_none());
    }

    #[test]
    fn flag_defaults_are_the_library_defaults() {
        let l = ServerArgs::parse_from(["hopwatch-collector"])
            .settings()
            .limits;
        let d = Limits::default();
        assert_eq!(l.budgets, d.budgets, "byte budgets");
        assert_eq!(l.workload_stats_ttl, d.workload_stats_ttl);
        let s = ServerArgs::parse_from(["hopwatch-collector"]).settings();
        let sd = Settings::default();
        assert_eq!(
            (s.max_findings_per_workload, s.max_findings_per_namespace),
            (sd.max_findings_per_workload, sd.max_findings_per_namespace)
        );
        let a = ServerArgs::parse_from(["hopwatch-collector", "--max-open-bytes", "32MiB"]);
        assert_eq!(a.settings().limits.budgets.open, 32 << 20);
        assert!(
            ServerArgs::try_parse_from(["hopwatch-collector", "--max-open-bytes", "lots"]).is_err()
        );
        assert_eq!(l.max_open_traces, 400_000);
        assert_eq!(
            (
                l.trace_quiet,
                l.max_trace_age,
                l.max_open_traces,
                l.max_hops_per_trace,
                l.max_open_hops,
                l.max_recent_hops,
                l.join_slack,
                l.instance_ttl,
            ),
            (
                d.trace_quiet,
                d.max_trace_age,
                d.max_open_traces,
                d.max_hops_per_trace,
                d.max_open_hops,
                d.max_recent_hops,
                d.join_slack,
                d.instance_ttl,
            )
        );
    }
}
