//! The collector's shared state: the aggregator, the findings index, the database, the
//! metrics and the watch channel. Transport-independent (the gRPC layer is in `server`).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hopwatch_proto::v1::{
    Break, BreakKind, CallNode, GetTraceResponse, ReportRequest, SummaryResponse, TraceFragment,
    WorkloadSummary,
};
use parking_lot::{Mutex, RwLock};
use tokio::sync::broadcast;

use crate::budget::StoreBytes;
use crate::core::{validate_hop, Core, Limits, Pending, Shared, TraceResult};
use crate::fragments::FragmentIndex;
use crate::graph::ServiceGraph;
use crate::identity::{self, Sender};
use crate::metrics::{
    build_info, process_metrics, BreakLabels, BreaksCounter, Format, LagHistogram, Snapshot,
};
use crate::model::FLAG_NAMES;
use crate::persist::{Durable, PersistOptions};
use crate::store::{finding_id, Filter, FindingLimits, FindingStore, StoreError};
use prometheus_client::registry::Unit;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Collector configuration beyond the aggregator limits.
#[derive(Clone, Debug)]
pub struct Settings {
    pub limits: Limits,
    /// Largest accepted batch (hops); larger ones get RESOURCE_EXHAUSTED.
    pub max_batch_hops: usize,
    /// Findings not seen for this long are deleted.
    pub retention_age: Duration,
    /// At most this many findings are kept (the least recently seen go first), applied
    /// as findings arrive.
    pub retention_count: usize,
    /// Who may report, and what a batch may claim (see [`crate::identity`]).
    pub identity: crate::identity::Policy,
    /// One (namespace, workload) holds at most this many findings (its own least
    /// recently seen go first; never another workload's).
    pub max_findings_per_workload: usize,
    /// One namespace holds at most this many findings.
    pub max_findings_per_namespace: usize,
}

/// GetTrace refuses longer trace ids (INVALID_ARGUMENT naming the limit): the longest
/// group id the collector keys a trace by is a request id (256 bytes, see
/// [`validate_hop`]).
pub const MAX_TRACE_ID_QUERY_LEN: usize = 256;
/// At most this much of a requested id is echoed back in an error message.
pub const MAX_ECHOED_ID_LEN: usize = 64;

/// `id` cut for an error message (at most [`MAX_ECHOED_ID_LEN`] bytes, with the length
/// when cut).
pub fn echo_id(id: &str) -> String {
    if id.len() <= MAX_ECHOED_ID_LEN {
        return id.to_string();
    }
    let mut end = MAX_ECHOED_ID_LEN;
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &id[..end], id.len())
}

impl Settings {
    /// The findings store's bounds.
    pub fn finding_limits(&self) -> FindingLimits {
        FindingLimits {
            max_count: self.retention_count,
            max_bytes: self.limits.budgets.findings,
            per_workload: self.max_findings_per_workload,
            per_namespace: self.max_findings_per_namespace,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            limits: Limits::default(),
            max_batch_hops: 5_000,
            retention_age: Duration::from_secs(7 * 24 * 3600),
            retention_count: 100_000,
            identity: crate::identity::Policy::default(),
            max_findings_per_workload: 5_000,
            max_findings_per_namespace: 25_000,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ReportError {
    #[error("empty batch: a ReportRequest must carry at least one hop")]
    Empty,
    #[error("batch of {got} hops exceeds the maximum of {max} hops per ReportRequest")]
    TooLarge { got: usize, max: usize },
    #[error("malformed batch: {0}")]
    Malformed(String),
    /// The sender may not report this (token, peer identity) or every hop was refused.
    #[error("{0}")]
    Refused(#[from] crate::identity::Refusal),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum QueryError {
    #[error("no trace {0:?} (unknown, or analysed too long ago to be kept)")]
    TraceNotFound(String),
    #[error("{0}")]
    BadFilter(String),
}

/// Counters exported on /metrics (see [`Collector::render_metrics_as`]).
#[derive(Default)]
pub struct Metrics {
    pub batches_received: AtomicU64,
    pub batches_rejected_empty: AtomicU64,
    pub batches_rejected_too_large: AtomicU64,
    pub batches_rejected_malformed: AtomicU64,
    pub hops_received: AtomicU64,
    pub reports_dropped_by_filters: AtomicU64,
    /// Ingest lag per batch (seconds).
    pub ingest_lag: LagHistogram,
    pub ingest_lag_ms_last: AtomicU64,
    pub queries_rejected_not_found: AtomicU64,
    pub queries_rejected_invalid: AtomicU64,
    pub persist_errors: AtomicU64,
    pub findings_persisted: AtomicU64,
    pub findings_expired: AtomicU64,
    pub watch_lagged: AtomicU64,
    /// Reports and hops refused by [`crate::identity::admit`].
    pub refused: crate::identity::Counters,
    /// `hopwatch_breaks_total{kind,severity,namespace,workload,peer}`.
    pub breaks: BreaksCounter,
}

pub struct Collector {
    pub settings: Settings,
    pub core: Mutex<Core>,
    /// The interner and cross-trace indexes (also reachable through `core`).
    shared: Arc<RwLock<Shared>>,
    pub store: RwLock<FindingStore>,
    /// The database, the WAL and the checkpoint's gate (None: in memory only).
    pub(crate) durable: Option<Durable>,
    pub metrics: Metrics,
    watch: broadcast::Sender<Break>,
    /// Serialises database flushes.
    flush_lock: Mutex<()>,
    /// Services calling services, for the web view's graph.
    pub graph: Mutex<ServiceGraph>,
    /// Request id -> trace groups: links the fragments of a broken trace.
    pub fragments: Mutex<FragmentIndex>,
    /// Serialises analysis polls and string table compactions (a compaction must not
    /// run while traces are analysed outside the aggregator's lock).
    poll_lock: Mutex<()>,
    /// Held (shared) by a Report while it analyses the traces its hops evicted outside
    /// the aggregator's lock, and (exclusive) by a string table compaction: the symbols
    /// of a trace taken out of the open set are in no store the compaction marks.
    evict_gate: RwLock<()>,
    last_compaction_ms: AtomicU64,
}

impl Collector {
    /// Opens (or creates) the database under `data_dir` and loads the stored findings.
    /// With the write-ahead log on (its default options).
    pub fn open(settings: Settings, data_dir: &Path) -> Result<Collector, StoreError> {
        Self::open_with(settings, data_dir, &PersistOptions::default())
    }

    /// Opens the database and the WAL under `data_dir` as `opts` says, loads the stored
    /// findings and re-ingests the hops of the WAL (before serving).
    pub fn open_with(
        settings: Settings,
        data_dir: &Path,
        opts: &PersistOptions,
    ) -> Result<Collector, StoreError> {
        let mut store = FindingStore::default();
        let durable = Durable::open(data_dir, opts, &mut store)?;
        let c = Self::with(settings, store, Some(durable));
        c.replay_wal();
        Ok(c)
    }

    /// Without persistence (tests, benchmarks).
    pub fn in_memory(settings: Settings) -> Collector {
        Self::with(settings, FindingStore::default(), None)
    }

    fn with(settings: Settings, mut store: FindingStore, durable: Option<Durable>) -> Collector {
        let (watch, _) = broadcast::channel(4096);
        let core = Core::new(settings.limits.clone());
        store.set_limits(settings.finding_limits());
        // Loaded findings over the bounds are gone: no metric series to drop yet.
        let _ = store.take_evicted();
        let b = settings.limits.budgets;
        Collector {
            shared: core.shared.clone(),
            core: Mutex::new(core),
            store: RwLock::new(store),
            durable,
            metrics: Metrics::default(),
            watch,
            graph: Mutex::new(ServiceGraph::with_budget(10_000, b.graph())),
            // ~100 bytes per request id: ~10 MB at most.
            fragments: Mutex::new(FragmentIndex::with_budget(100_000, b.fragments())),
            settings,
            flush_lock: Mutex::new(()),
            poll_lock: Mutex::new(()),
            evict_gate: RwLock::new(()),
            last_compaction_ms: AtomicU64::new(0),
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Break> {
        self.watch.subscribe()
    }

    /// Handles one Report batch from an unidentified sender (no token, no peer).
    pub fn report(&self, req: &ReportRequest, now_ms: u64) -> Result<u32, ReportError> {
        self.report_from(req, &Sender::default(), now_ms)
    }

    /// Handles one Report batch from `sender`: the identity checks first (token, peer,
    /// hops the peer may not speak for, hops from the future), then the batch checks.
    pub fn report_from(
        &self,
        req: &ReportRequest,
        sender: &Sender,
        now_ms: u64,
    ) -> Result<u32, ReportError> {
        let m = &self.metrics;
        m.batches_received.fetch_add(1, Relaxed);
        let admitted = identity::admit(&self.settings.identity, sender, req, now_ms, &m.refused)?;
        identity::saturating_add(&m.reports_dropped_by_filters, admitted.dropped);
        if req.hops.is_empty() {
            m.batches_rejected_empty.fetch_add(1, Relaxed);
            return Err(ReportError::Empty);
        }
        if req.hops.len() > self.settings.max_batch_hops {
            m.batches_rejected_too_large.fetch_add(1, Relaxed);
            return Err(ReportError::TooLarge {
                got: req.hops.len(),
                max: self.settings.max_batch_hops,
            });
        }
        for (i, h) in req.hops.iter().enumerate() {
            if let Err(e) = validate_hop(i, h) {
                m.batches_rejected_malformed.fetch_add(1, Relaxed);
                return Err(ReportError::Malformed(e));
            }
        }
        if let Some(why) = &admitted.first_refusal {
            tracing::debug!(reporter = %req.reporter_pod, peer = ?admitted.peer.as_ref().map(|p| p.to_string()), identity = admitted.refused_identity, clock_skew = admitted.refused_clock_skew, first = %why, "refused hops of a report batch");
        }
        let hops = &admitted.hops[..];
        if hops.is_empty() {
            return Err(identity::Refusal::AllHops {
                identity: admitted.refused_identity,
                clock_skew: admitted.refused_clock_skew,
                first: admitted.first_refusal.unwrap_or_default(),
            }
            .into());
        }
        m.hops_received.fetch_add(hops.len() as u64, Relaxed);
        // Ingest lag: from the end of the newest hop to now.
        let newest_end_ms = hops
            .iter()
            .map(|h| h.start_time_unix_micros.saturating_add(h.duration_micros) / 1000)
            .max()
            .unwrap_or(0);
        if newest_end_ms > 0 {
            let lag = now_ms.saturating_sub(newest_end_ms);
            m.ingest_lag.0.observe(lag as f64 / 1000.0);
            m.ingest_lag_ms_last.store(lag, Relaxed);
        }
        // Only the admitted hops: those refused (identity, clock skew) are neither
        // analysed nor logged for replay.
        let accepted = self.ingest_accepted(hops, now_ms);
        // After ingest (the checkpoint relies on it); never fails the Report.
        self.wal_append(hops, now_ms);
        Ok(accepted)
    }

    /// Ingests validated hops that arrived at `now_ms` (a Report, or the WAL's replay).
    pub(crate) fn ingest_accepted(&self, hops: &[hopwatch_proto::v1::Hop], now_ms: u64) -> u32 {
        let _gate = self.gate();
        let _evicting = self.evict_gate.read();
        // Conversion (interning, cross-trace indexes) outside the aggregator's lock.
        let converted = Core::convert(&self.shared, hops);
        self.graph.lock().observe(converted.iter().map(|(_, h)| h));
        self.fragments.lock().observe(hops);
        let (accepted, evicted) = self.core.lock().ingest_converted(hops, converted, now_ms);
        if !evicted.is_empty() {
            // Analysed outside the aggregator's lock (as in `poll_inner`): the other
            // Reports' hops go in meanwhile.
            self.analyse_and_record(evicted, now_ms);
        }
        accepted
    }

    /// Findings the bounds or the retention removed: their occurrence series go too
    /// (else the metric family would keep every finding ever seen).
    fn forget_series(&self, removed: Vec<Break>) {
        for b in removed {
            self.metrics.breaks.remove(&BreakLabels {
                kind: crate::cli::kind_str(b.kind).to_string(),
                severity: crate::cli::severity_str(b.severity).to_string(),
                namespace: b.namespace,
                workload: b.workload,
                peer: b.peer,
            });
        }
    }

    /// Analyses traces taken out of the aggregator, holding only the shared read lock one
    /// trace at a time (ingest proceeds in between), then stores and records the results.
    fn analyse_and_record(&self, pending: Vec<Pending>, now_ms: u64) {
        let done: Vec<_> = pending
            .into_iter()
            .map(|p| Core::analyse_pending(&self.shared, &self.settings.limits, p, now_ms))
            .collect();
        let (results, graveyard) = {
            let mut c = self.core.lock();
            let results: Vec<TraceResult> = done.into_iter().map(|d| c.store_done(d)).collect();
            (results, c.take_graveyard())
        };
        // The evicted recent traces are freed outside the lock.
        drop(graveyard);
        self.record(results);
    }

    /// Merges analysed traces' findings into the index and notifies watchers.
    pub fn record(&self, results: Vec<TraceResult>) {
        if results.iter().all(|r| r.findings.is_empty()) {
            return;
        }
        let mut updated = Vec::new();
        {
            let fragments = self.fragments.lock();
            let mut store = self.store.write();
            for r in &results {
                // A trace that broke apart: the piece after the break has no trace id
                // and is keyed by the request id. Its sample is the trace id of the piece
                // the app was serving (what `hopwatch trace` and tracing UIs know), which
                // links on to this piece ("continued in").
                let traced = fragments.traced_for_request_group(&r.trace_id);
                for f in &r.findings {
                    let sample = match (&traced, f.kind) {
                        (Some(t), BreakKind::TraceNotPropagated) => t.as_str(),
                        _ => r.trace_id.as_str(),
                    };
                    updated.push(store.merge(f, sample));
                    self.metrics
                        .breaks
                        .get_or_create(&BreakLabels {
                            kind: f.kind.as_str_name().to_string(),
                            severity: f.severity.as_str_name().to_string(),
                            namespace: f.namespace.clone(),
                            workload: f.workload.clone(),
                            peer: f.peer.clone(),
                        })
                        .inc();
                }
            }
            self.forget_series(store.take_evicted());
        }
        for b in updated {
            let _ = self.watch.send(b);
        }
    }

    /// Analyses what became ready; returns the number of traces analysed. Compacts the
    /// string table afterwards when it is over 3/4 of a bound (at most every 10 s), else
    /// every 5 minutes: a compaction holds the aggregator's lock while it marks (~100 ms
    /// with 355,000 open traces and a full recent store, collector-probes).
    pub fn poll(&self, now_ms: u64) -> usize {
        let _serial = self.poll_lock.lock();
        let n = self.poll_inner(now_ms);
        let since = now_ms.saturating_sub(self.last_compaction_ms.load(Relaxed));
        let due = since >= 300_000 || (since >= 10_000 && self.shared.read().it.wants_compaction());
        if due {
            self.compact_locked(now_ms);
        }
        n
    }

    /// Frees the interned strings no store holds any more (see [`Interner::compact`]);
    /// returns how many.
    ///
    /// [`Interner::compact`]: crate::model::Interner::compact
    pub fn compact_strings(&self, now_ms: u64) -> usize {
        let _serial = self.poll_lock.lock();
        self.compact_locked(now_ms)
    }

    fn compact_locked(&self, now_ms: u64) -> usize {
        self.last_compaction_ms.store(now_ms, Relaxed);
        // No Report is analysing evicted traces (lock order: the eviction gate, then
        // aggregator, graph, shared, as everywhere else).
        let _no_evicting = self.evict_gate.write();
        let core = self.core.lock();
        let graph = self.graph.lock();
        let mut sh = self.shared.write();
        let mut marks = sh.it.marks();
        core.mark(&mut marks);
        graph.mark(&mut marks);
        sh.pods.mark(&mut marks);
        sh.registry.mark(&mut marks);
        sh.it.compact(&marks)
    }

    fn poll_inner(&self, now_ms: u64) -> usize {
        const CHUNK: usize = 500;
        let mut total = 0;
        loop {
            let _gate = self.gate();
            let pending = self.core.lock().take_ready(now_ms, CHUNK);
            let n = pending.len();
            if n == 0 {
                return total;
            }
            self.analyse_and_record(pending, now_ms);
            total += n;
            if n < CHUNK {
                return total;
            }
        }
    }

    /// Writes changed findings to the database (no-op without one).
    pub fn flush(&self) -> Result<usize, StoreError> {
        let Some(d) = &self.durable else {
            let _ = self.store.write().take_dirty();
            return Ok(0);
        };
        let _g = self.flush_lock.lock();
        let mut total = 0;
        // In chunks, so that queries never wait long for the store's lock.
        loop {
            let (changed, removed) = self.store.write().take_dirty_max(5_000);
            if changed.is_empty() && removed.is_empty() {
                d.db.succeeded();
                return Ok(total);
            }
            match d.db.write(&changed, &removed) {
                Ok(()) => {
                    self.metrics
                        .findings_persisted
                        .fetch_add(changed.len() as u64, Relaxed);
                    total += changed.len();
                }
                Err(e) => {
                    self.metrics.persist_errors.fetch_add(1, Relaxed);
                    self.store.write().restore_dirty(&changed, &removed);
                    d.db.failed(&e);
                    return Err(e);
                }
            }
        }
    }

    /// Applies retention (age and count) and index pruning.
    pub fn retain(&self, now_ms: u64) -> usize {
        let min = now_ms.saturating_sub(self.settings.retention_age.as_millis() as u64);
        let n = self
            .store
            .write()
            .retain(min, self.settings.retention_count);
        self.metrics.findings_expired.fetch_add(n as u64, Relaxed);
        let evicted = self.store.write().take_evicted();
        self.forget_series(evicted);
        let keep_us = (self.settings.limits.max_trace_age.as_micros() as u64) * 2;
        let mut core = self.core.lock();
        core.prune_indexes((now_ms * 1000).saturating_sub(keep_us));
        let ttl = self.settings.limits.workload_stats_ttl.as_millis() as u64;
        core.prune_workloads(now_ms.saturating_sub(ttl));
        n
    }

    /// Graceful shutdown: analyse every open trace and persist all findings.
    pub fn shutdown(&self, now_ms: u64) -> Result<usize, StoreError> {
        let results = self.core.lock().flush_all(now_ms);
        let n = results.len();
        self.record(results);
        self.persist_at_shutdown()?;
        tracing::info!(
            traces = n,
            "analysed open traces at shutdown; findings persisted"
        );
        Ok(n)
    }

    pub fn list_breaks(&self, filter: &Filter, limit: usize) -> Vec<Break> {
        self.store.read().list(filter, limit)
    }

    pub fn get_trace(&self, id: &str, now_ms: u64) -> Result<GetTraceResponse, QueryError> {
        if id.trim().is_empty() {
            self.metrics.queries_rejected_invalid.fetch_add(1, Relaxed);
            return Err(QueryError::BadFilter("trace_id is empty".into()));
        }
        if id.len() > MAX_TRACE_ID_QUERY_LEN {
            self.metrics.queries_rejected_invalid.fetch_add(1, Relaxed);
            return Err(QueryError::BadFilter(format!(
                "trace_id is {} bytes, more than the maximum of {MAX_TRACE_ID_QUERY_LEN} bytes",
                id.len()
            )));
        }
        let Some(v) = self.core.lock().trace(id, now_ms) else {
            self.metrics
                .queries_rejected_not_found
                .fetch_add(1, Relaxed);
            return Err(QueryError::TraceNotFound(echo_id(id)));
        };
        let store = self.store.read();
        let breaks = v
            .findings
            .iter()
            .map(|f| {
                let id = finding_id(f.kind, &f.namespace, &f.workload, &f.peer);
                match (v.open, store.get(&id)) {
                    (false, Some(b)) => b.clone(),
                    _ => Break {
                        id,
                        kind: f.kind as i32,
                        severity: f.severity as i32,
                        workload: f.workload.clone(),
                        namespace: f.namespace.clone(),
                        peer: f.peer.clone(),
                        count: 1,
                        trace_ids: vec![v.trace_id.clone()],
                        flags: f.flags.clone(),
                        summary: f.summary.clone(),
                        hint: f.hint.clone(),
                        first_seen_unix_ms: f.seen_ms,
                        last_seen_unix_ms: f.seen_ms,
                    },
                }
            })
            .collect();
        let fragments = self.trace_fragments(&v.trace_id, &v.roots);
        Ok(GetTraceResponse {
            trace_id: v.trace_id,
            roots: v.roots,
            breaks,
            hop_count: v.hop_count,
            open: v.open,
            fragments,
        })
    }

    /// The other groups holding hops of this trace's requests.
    fn trace_fragments(&self, trace_id: &str, roots: &[CallNode]) -> Vec<TraceFragment> {
        // Earliest start per request id in this trace.
        let mut requests: Vec<(String, u64)> = Vec::new();
        fn walk(n: &CallNode, out: &mut Vec<(String, u64)>) {
            for h in [&n.outbound, &n.inbound].into_iter().flatten() {
                if h.request_id.is_empty() {
                    continue;
                }
                match out.iter_mut().find(|(r, _)| *r == h.request_id) {
                    Some(e) => e.1 = e.1.min(h.start_time_unix_micros),
                    None => out.push((h.request_id.clone(), h.start_time_unix_micros)),
                }
            }
            for c in &n.children {
                walk(c, out);
            }
        }
        for r in roots {
            walk(r, &mut requests);
        }
        let index = self.fragments.lock();
        let mut out: Vec<(u64, TraceFragment)> = Vec::new();
        for (rid, start) in &requests {
            for g in index.groups(rid) {
                if g.id.eq_ignore_ascii_case(trace_id)
                    || out.iter().any(|(_, f)| *f.trace_id == *g.id)
                {
                    continue;
                }
                let relation = if g.first_us >= *start {
                    "continued_in"
                } else {
                    "continued_from"
                };
                out.push((
                    g.first_us,
                    TraceFragment {
                        trace_id: g.id.to_string(),
                        relation: relation.into(),
                        request_id: rid.clone(),
                    },
                ));
            }
        }
        // In time order: where the request came from, then where it went on (the caller's
        // piece before the callee's).
        out.sort_by_key(|(t, _)| *t);
        out.into_iter().map(|(_, f)| f).collect()
    }

    /// The service graph with the stored findings on it (the web view's `/api/graph`).
    pub fn graph_json(&self) -> serde_json::Value {
        let findings = self.store.read().list(&Filter::default(), 10_000);
        let g = self.graph.lock();
        let s = self.shared.read();
        g.to_json(&s.it, &findings)
    }

    pub fn summary(&self) -> SummaryResponse {
        let (stats, core_stats, open) = {
            let c = self.core.lock();
            (c.workload_stats(), c.stats, c.open_traces())
        };
        let store = self.store.read();
        let mut breaks_per: rustc_hash::FxHashMap<(&str, &str), u64> = Default::default();
        for b in store.all() {
            *breaks_per
                .entry((b.namespace.as_str(), b.workload.as_str()))
                .or_default() += 1;
        }
        let mut workloads: Vec<WorkloadSummary> = stats
            .into_iter()
            .map(|((ns, wl), s)| WorkloadSummary {
                breaks: breaks_per
                    .get(&(ns.as_str(), wl.as_str()))
                    .copied()
                    .unwrap_or(0),
                workload: wl,
                namespace: ns,
                hops: s.hops,
                inbound_hops: s.inbound,
                outbound_hops: s.outbound,
                errors: s.errors,
                flags: s
                    .flags
                    .iter()
                    .map(|(b, n)| {
                        (
                            FLAG_NAMES
                                .get(*b as usize)
                                .map(|s| s.to_string())
                                .unwrap_or(format!("UNKNOWN(bit {b})")),
                            *n,
                        )
                    })
                    .collect(),
            })
            .collect();
        workloads.sort_by(|a, b| (&a.namespace, &a.workload).cmp(&(&b.namespace, &b.workload)));
        SummaryResponse {
            workloads,
            hops_received: self.metrics.hops_received.load(Relaxed),
            traces_analysed: core_stats.traces_analysed,
            open_traces: open as u64,
            findings: store.len() as u64,
            reports_dropped_by_filters: self.metrics.reports_dropped_by_filters.load(Relaxed),
        }
    }

    /// `/metrics` in the Prometheus text format 0.0.4.
    pub fn render_metrics(&self) -> String {
        self.render_metrics_as(Format::PrometheusText)
    }

    /// `/metrics` in `format`: the live instruments plus a snapshot of the counters and
    /// gauges read now. Counter names are given without `_total` (the encoder adds it).
    pub fn render_metrics_as(&self, format: Format) -> String {
        let m = &self.metrics;
        let (cs, open, open_hops, recent, mut stores) = {
            let c = self.core.lock();
            let stores = c.store_bytes().to_vec();
            (
                c.stats,
                c.open_traces(),
                c.open_hops(),
                c.recent_traces(),
                stores,
            )
        };
        let (pods, interned, overflow, compactions, truncated) = {
            let s = self.shared.read();
            stores.push((
                "strings",
                StoreBytes {
                    bytes: s.it.bytes(),
                    budget: s.it.budget(),
                    evictions: s.it.freed,
                },
            ));
            stores.push((
                "pod_index",
                StoreBytes {
                    bytes: s.pods.bytes(),
                    budget: s.pods.budget(),
                    evictions: s.pods.evictions,
                },
            ));
            stores.push((
                "registry",
                StoreBytes {
                    bytes: s.registry.bytes(),
                    budget: s.registry.budget(),
                    evictions: s.registry.evictions,
                },
            ));
            (
                s.pods.len(),
                s.it.len(),
                s.it.overflowed,
                s.it.compactions,
                s.it.truncated,
            )
        };
        {
            let g = self.graph.lock();
            stores.push((
                "graph",
                StoreBytes {
                    bytes: g.bytes(),
                    budget: g.budget(),
                    evictions: g.evictions,
                },
            ));
        }
        {
            let f = self.fragments.lock();
            stores.push((
                "fragments",
                StoreBytes {
                    bytes: f.bytes(),
                    budget: f.budget(),
                    evictions: f.evictions,
                },
            ));
        }
        let mut by_kind: rustc_hash::FxHashMap<i32, u64> = Default::default();
        let finding_evictions = {
            let s = self.store.read();
            for b in s.all() {
                *by_kind.entry(b.kind).or_default() += 1;
            }
            let e = s.evictions;
            stores.push((
                "findings",
                StoreBytes {
                    bytes: s.bytes(),
                    budget: s.limits().max_bytes,
                    evictions: e.budget,
                },
            ));
            e
        };
        let l = |a: &AtomicU64| a.load(Relaxed);
        let mut s = Snapshot::default();
        s.counter(
            "hopwatch_hops_received",
            "Hops received in accepted batches.",
            l(&m.hops_received),
        );
        s.counter_by(
            "hopwatch_hops_dropped",
            "Hops dropped by the collector.",
            "reason",
            &[("trace_full", cs.hops_dropped_trace_full)],
        );
        s.counter(
            "hopwatch_batches_received",
            "Report batches received.",
            l(&m.batches_received),
        );
        s.counter_by(
            "hopwatch_batches_rejected",
            "Report batches rejected, by reason.",
            "reason",
            &[
                ("empty", l(&m.batches_rejected_empty)),
                ("too_large", l(&m.batches_rejected_too_large)),
                ("malformed", l(&m.batches_rejected_malformed)),
            ],
        );
        let decode = hopwatch_proto::codec::decode_errors();
        s.counter_by(
            "hopwatch_reports_refused",
            "Report calls refused whole: reason token (missing or wrong x-hopwatch-report-token), identity (peer identity missing, unreadable or of another trust domain), decode (not a ReportRequest; counted process-wide).",
            "reason",
            &[
                ("token", l(&m.refused.reports_refused_token)),
                ("identity", l(&m.refused.reports_refused_identity)),
                ("decode", decode.report_request),
            ],
        );
        s.counter_by(
            "hopwatch_hops_refused",
            "Hops refused from accepted batches: reason identity (namespace or service account not the sending peer's), clock_skew (ending beyond the collector's clock plus --max-clock-skew).",
            "reason",
            &[
                ("identity", l(&m.refused.hops_refused_identity)),
                ("clock_skew", l(&m.refused.hops_refused_clock_skew)),
            ],
        );
        s.counter(
            "hopwatch_dropped_claims_implausible",
            "Batches whose dropped_since_last_batch claimed more than 1e9 (not added to hopwatch_reports_dropped_by_filters).",
            l(&m.refused.dropped_claims_implausible),
        );
        s.counter(
            "hopwatch_reports_dropped_by_filters",
            "Reports the filters dropped before sending (dropped_since_last_batch).",
            l(&m.reports_dropped_by_filters),
        );
        s.gauge(
            "hopwatch_open_traces",
            "Traces open (not analysed yet).",
            open as u64,
        );
        s.gauge(
            "hopwatch_open_hops",
            "Hops held in open traces.",
            open_hops as u64,
        );
        s.gauge(
            "hopwatch_recent_traces",
            "Analysed traces kept for GetTrace.",
            recent as u64,
        );
        s.counter(
            "hopwatch_traces_analysed",
            "Traces analysed.",
            cs.traces_analysed,
        );
        s.counter(
            "hopwatch_traces_analysed_at_max_age",
            "Traces analysed because they reached the maximum age.",
            cs.traces_analysed_at_max_age,
        );
        s.counter(
            "hopwatch_late_trace_merges",
            "Analyses of hops that arrived after their trace was analysed (merged with it).",
            cs.late_merges,
        );
        s.counter(
            "hopwatch_trace_evictions",
            "Open traces evicted (analysed early) because max open traces or max open hops was reached.",
            cs.traces_evicted,
        );
        s.counter(
            "hopwatch_trace_evictions_cut_short",
            "Evicted traces analysed as cut short, without HOP_MISSING (a hop of theirs arrived less than 2s, or trace quiet if shorter, before).",
            cs.traces_evicted_cut_short,
        );
        s.counter(
            "hopwatch_traces_rechecked",
            "Traces analysed cut short whose analysis withheld a verdict (HOP_MISSING), analysed again in full once no late hop came.",
            cs.traces_rechecked,
        );
        s.counter(
            "hopwatch_rechecks_dropped",
            "Re-checks of cut-short traces given up for the bounds (an eighth of the open traces' byte budget, max open traces).",
            cs.rechecks_dropped,
        );
        s.gauge(
            "hopwatch_pods_indexed",
            "Pods in the cross-trace inbound index.",
            pods as u64,
        );
        s.gauge(
            "hopwatch_interned_strings",
            "Distinct interned strings.",
            interned as u64,
        );
        s.counter(
            "hopwatch_interner_overflow",
            "Strings not interned because the interner is full.",
            overflow,
        );
        // Every known kind, zero included, so that a dashboard shows all of them.
        let kinds = (1..=i32::MAX)
            .map_while(|k| BreakKind::try_from(k).ok())
            .map(|k| {
                (
                    vec![("kind", k.as_str_name().to_string())],
                    by_kind.get(&(k as i32)).copied().unwrap_or(0),
                )
            })
            .collect();
        s.gauge_labelled(
            "hopwatch_findings",
            "Stored findings (deduplicated by kind, namespace, workload, peer), by kind.",
            kinds,
        );
        s.counter(
            "hopwatch_findings_expired",
            "Findings removed by retention.",
            l(&m.findings_expired),
        );
        s.counter_by(
            "hopwatch_findings_evicted",
            "Findings removed as they arrived: over the count or byte budget, over a workload's or a namespace's share.",
            "reason",
            &[
                ("budget", finding_evictions.budget),
                ("workload_share", finding_evictions.workload_share),
                ("namespace_share", finding_evictions.namespace_share),
            ],
        );
        let store = |v: &dyn Fn(&StoreBytes) -> u64| -> Vec<(Vec<(&'static str, String)>, u64)> {
            stores
                .iter()
                .map(|(n, b)| (vec![("store", n.to_string())], v(b)))
                .collect()
        };
        s.gauge_labelled(
            "hopwatch_store_bytes",
            "Accounted bytes of each in-memory store.",
            store(&|b| b.bytes as u64),
        );
        s.gauge_labelled(
            "hopwatch_store_budget_bytes",
            "Byte budget of each in-memory store.",
            store(&|b| b.budget.min(u64::MAX as usize) as u64),
        );
        let evictions: Vec<(&str, u64)> = stores.iter().map(|(n, b)| (*n, b.evictions)).collect();
        s.counter_by(
            "hopwatch_store_evictions",
            "Entries evicted from each store for its byte budget (least recently used first; strings: freed by compaction).",
            "store",
            &evictions,
        );
        s.counter(
            "hopwatch_string_compactions",
            "String table compactions (unreferenced interned strings freed).",
            compactions,
        );
        s.counter(
            "hopwatch_fields_truncated",
            "Hop fields cut to their maximum length at ingest.",
            truncated,
        );
        s.counter(
            "hopwatch_workload_stats_expired",
            "Per-workload stats rows dropped after --workload-stats-ttl without a hop.",
            cs.workload_expired,
        );
        s.counter(
            "hopwatch_findings_persisted",
            "Finding writes to the database.",
            l(&m.findings_persisted),
        );
        s.counter(
            "hopwatch_persist_errors",
            "Failed database flushes.",
            l(&m.persist_errors),
        );
        s.gauge_unit(
            "hopwatch_ingest_lag_last",
            "Lag from the end of the newest hop of the last batch to its arrival.",
            Unit::Seconds,
            l(&m.ingest_lag_ms_last) as f64 / 1000.0,
        );
        s.counter_by(
            "hopwatch_queries_rejected",
            "Queries rejected, by status.",
            "code",
            &[
                ("not_found", l(&m.queries_rejected_not_found)),
                (
                    "invalid_argument",
                    l(&m.queries_rejected_invalid) + decode.other,
                ),
            ],
        );
        s.counter(
            "hopwatch_watch_lagged",
            "Findings a slow WatchBreaks client missed.",
            l(&m.watch_lagged),
        );
        self.persist_metrics(&mut s);
        build_info(&mut s);
        process_metrics(&mut s);
        crate::metrics::encode(format, &m.breaks, &m.ingest_lag, s)
    }
}
