//! The aggregator: open trace groups, the quiet/age queues that decide when a trace is
//! analysed, the cross-trace indexes, and a bounded store of recently analysed traces
//! (for GetTrace). Single-threaded data structure; the service wraps it in a mutex (an
//! ingest batch of 200 hops holds it for tens of microseconds).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use hopwatch_proto::v1::{CallNode, Direction, Hop};
use parking_lot::RwLock;
use rustc_hash::FxHashMap;

use crate::analysis::{analyse, Analysis, Ctx, Finding, PodIndex, Registry};
use crate::budget::{self, map_slot, str_heap, Budgets, StoreBytes};
use crate::model::{group_key, CHop, Interner, Marks, Sym};

/// GetTrace cuts the call tree before this depth: the cut subtrees are returned as
/// further roots with `CallNode.continued_at_depth` set. prost (and so the `hopwatch`
/// CLI) refuses messages nested deeper than 100 levels; each call level is one message
/// level (a child CallNode), its hops one more, the response itself one: 90 leaves room.
pub const MAX_TREE_DEPTH: usize = 90;

/// How long after its last hop arrived a trace is complete, even when `--max-open-traces`
/// or `--max-open-hops` evicts it before `--trace-quiet`: such a trace gets a full
/// analysis (HOP_MISSING included); one evicted sooner is analysed as cut short.
///
/// Why 2 s: the filters queue each hop when its request ends and flush the queue every
/// tick (`tick_period_ms`, 1 s by default; a full batch goes out at once), so the hops of
/// one request (a call's outbound hop and its inbound partner, reported by two sidecars
/// whose ticks are out of phase) reach the collector at most about one tick apart, plus
/// the report call's latency (milliseconds while the collector keeps up). Two ticks
/// leave a full tick of margin for that latency. Never more than `--trace-quiet` (see
/// [`Limits::complete_after`]): quiet for that long, a trace is complete by definition.
pub const LATE_HOP_WINDOW: Duration = Duration::from_secs(2);

/// Bounds and timings of the aggregator.
#[derive(Clone, Debug)]
pub struct Limits {
    /// A trace is analysed once no hop of it arrived for this long.
    pub trace_quiet: Duration,
    /// ... or once it has been open this long.
    pub max_trace_age: Duration,
    /// Open traces beyond this evict the least recently updated one (analysed early:
    /// fully if its last hop arrived at least [`Limits::complete_after`] ago, else as cut
    /// short). Memory is bounded by `max_open_hops`; this bounds the per-trace overhead
    /// (traces of one or two hops).
    pub max_open_traces: usize,
    /// Hops beyond this in one trace are dropped (counted).
    pub max_hops_per_trace: usize,
    /// Hops held in open traces beyond this evict the least recently updated trace
    /// (the memory bound: ~340 bytes per open hop).
    pub max_open_hops: usize,
    /// Hops of recently analysed traces kept for GetTrace.
    pub max_recent_hops: usize,
    /// Clock slack when joining hops of different sidecars.
    pub join_slack: Duration,
    /// How long an instance environment stays known (TAG_MISROUTED) after its last hop.
    pub instance_ttl: Duration,
    /// Recent inbound requests kept per pod (cross-trace linking).
    pub pod_index_per_pod: usize,
    pub max_pods: usize,
    pub max_interned_strings: usize,
    /// Byte budgets of the stores (open and recent traces, string table, workload stats,
    /// cross-trace indexes; the findings' is used by the service).
    pub budgets: Budgets,
    /// A per-workload stats row not updated for this long is dropped.
    pub workload_stats_ttl: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            trace_quiet: Duration::from_secs(5),
            max_trace_age: Duration::from_secs(60),
            max_open_traces: 400_000,
            max_hops_per_trace: 1_000,
            max_open_hops: 1_200_000,
            max_recent_hops: 200_000,
            join_slack: Duration::from_millis(5),
            instance_ttl: Duration::from_secs(600),
            pod_index_per_pod: 512,
            max_pods: 50_000,
            max_interned_strings: 2_000_000,
            budgets: Budgets::default(),
            workload_stats_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

impl Limits {
    /// How long a trace must have been quiet to be analysed in full when it is evicted
    /// before `trace_quiet`: [`LATE_HOP_WINDOW`], at most `trace_quiet`.
    pub fn complete_after(&self) -> Duration {
        LATE_HOP_WINDOW.min(self.trace_quiet)
    }
}

/// What ingest writes and analysis reads: the interner and the cross-trace indexes. Kept
/// out of the aggregator's mutex so that hop conversion and trace analysis run outside
/// it (and alternate per batch / per trace instead of per chunk).
pub struct Shared {
    pub it: Interner,
    pub pods: PodIndex,
    pub registry: Registry,
}

/// A trace taken out of the open set, waiting to be analysed.
pub struct Pending {
    key: u128,
    group: Group,
    partial: bool,
    /// A re-check of a trace analysed cut short (counted in
    /// [`CoreStats::traces_rechecked`], not again in `traces_analysed`).
    recheck: bool,
    /// Findings already reported for this trace (late hops merged with it).
    previous: Vec<Finding>,
}

/// An analysed trace, waiting to be stored.
pub struct Done {
    pending: Pending,
    analysis: Analysis,
}

struct Group {
    trace_id: Box<str>,
    hops: Vec<CHop>,
    first_ms: u64,
    last_ms: u64,
    /// Accounted bytes (see [`Group::base_bytes`]).
    bytes: usize,
}

/// At most this share (1/n) of the open traces' byte budget holds cut-short traces
/// awaiting their re-check; beyond, the oldest re-check is given up (counted in
/// [`CoreStats::rechecks_dropped`]).
pub const RECHECK_SHARE: usize = 8;

/// Bytes of a queue entry of the quiet/age queues.
const QUEUE_ENTRY: usize = std::mem::size_of::<(u128, u64)>();

impl Group {
    /// The map slot, the trace id, two queue entries and the spare hop slots.
    fn base_bytes(trace_id: &str) -> usize {
        map_slot(std::mem::size_of::<(u128, Group)>())
            + str_heap(trace_id.len())
            + 2 * QUEUE_ENTRY
            + budget::ALLOC_OVERHEAD
    }
}

/// Accounted bytes of hops kept in a vector of `cap` slots.
fn hops_bytes(hops: &[CHop], cap: usize) -> usize {
    hops.iter().map(|h| h.bytes()).sum::<usize>() + (cap - hops.len()) * std::mem::size_of::<CHop>()
}

/// Accounted bytes of an analysis (its nodes and findings).
fn analysis_bytes(a: &Analysis) -> usize {
    let node = std::mem::size_of::<crate::analysis::Node>();
    let nodes: usize = a
        .nodes
        .iter()
        .map(|n| {
            node + 4 * (n.children.capacity() + n.attempts.capacity())
                + 4 * n.breaks.capacity()
                + if n.children.capacity() > 0 {
                    budget::ALLOC_OVERHEAD
                } else {
                    0
                }
        })
        .sum();
    let findings: usize = a.findings.iter().map(finding_bytes).sum();
    nodes + 4 * a.roots.capacity() + findings
}

fn finding_bytes(f: &Finding) -> usize {
    std::mem::size_of::<Finding>()
        + str_heap(f.workload.capacity())
        + str_heap(f.namespace.capacity())
        + str_heap(f.peer.capacity())
        + str_heap(f.summary.capacity())
        + str_heap(f.hint.capacity())
        + f.flags
            .iter()
            .map(|x| 24 + str_heap(x.capacity()))
            .sum::<usize>()
}

/// A trace kept after analysis, for GetTrace.
pub struct Analysed {
    pub trace_id: Box<str>,
    pub hops: Vec<CHop>,
    pub analysis: Analysis,
    /// [`Analysed::count_bytes`], counted once (it is read again when the trace leaves
    /// the recent store).
    bytes: usize,
}

impl Analysed {
    fn new(trace_id: Box<str>, hops: Vec<CHop>, analysis: Analysis) -> Analysed {
        let mut t = Analysed {
            trace_id,
            hops,
            analysis,
            bytes: 0,
        };
        t.bytes = t.count_bytes();
        t
    }

    /// Accounted bytes (see [`Analysed::count_bytes`]).
    fn bytes(&self) -> usize {
        self.bytes
    }

    /// Accounted bytes: the Arc, the map slot and queue entry, the hops and the analysis.
    fn count_bytes(&self) -> usize {
        std::mem::size_of::<Analysed>()
            + 2 * budget::ALLOC_OVERHEAD
            + map_slot(32)
            + 16
            + str_heap(self.trace_id.len())
            + hops_bytes(&self.hops, self.hops.capacity())
            + analysis_bytes(&self.analysis)
    }
}

/// What analysing one trace produced.
#[derive(Debug)]
pub struct TraceResult {
    pub trace_id: String,
    pub findings: Vec<Finding>,
}

#[derive(Default, Clone, Debug)]
pub struct WorkloadStats {
    pub hops: u64,
    pub inbound: u64,
    pub outbound: u64,
    pub errors: u64,
    pub flags: FxHashMap<u8, u64>,
    /// When the row was last updated (ms since the epoch).
    pub last_ms: u64,
}

impl WorkloadStats {
    /// Accounted bytes of a row: its map slot and its flag counts.
    fn bytes(&self) -> usize {
        map_slot(std::mem::size_of::<((Sym, Sym), WorkloadStats)>())
            + if self.flags.capacity() > 0 {
                map_slot(16) * self.flags.capacity() + budget::ALLOC_OVERHEAD
            } else {
                0
            }
    }
}

#[derive(Default, Clone, Copy, Debug)]
pub struct CoreStats {
    pub hops_accepted: u64,
    pub hops_dropped_trace_full: u64,
    pub traces_evicted: u64,
    /// Evicted traces whose last hop was more recent than [`Limits::complete_after`]:
    /// analysed as cut short (no HOP_MISSING).
    pub traces_evicted_cut_short: u64,
    /// Cut-short traces analysed again in full once no late hop came (see
    /// [`Core::take_ready`]): only those whose cut-short analysis withheld a verdict
    /// ([`Analysis::withheld`]). Not counted in `traces_analysed`.
    pub traces_rechecked: u64,
    /// Re-checks given up for the bounds (see [`RECHECK_SHARE`]).
    pub rechecks_dropped: u64,
    pub traces_analysed: u64,
    pub traces_analysed_at_max_age: u64,
    /// Hops that arrived for a trace already analysed (merged with it).
    pub late_merges: u64,
    /// Open traces evicted (analysed early) because `--max-open-bytes` was reached
    /// (also counted in `traces_evicted`).
    pub open_evictions_bytes: u64,
    /// Recent traces dropped because `--max-recent-bytes` was reached.
    pub recent_evictions_bytes: u64,
    /// Workload stats rows dropped for the byte budget, and for age.
    pub workload_evictions: u64,
    pub workload_expired: u64,
}

/// A trace as GetTrace returns it (breaks resolved by the caller).
pub struct TraceView {
    pub trace_id: String,
    pub roots: Vec<CallNode>,
    pub hop_count: u32,
    pub open: bool,
    pub findings: Vec<Finding>,
}

pub struct Core {
    pub limits: Limits,
    pub shared: Arc<RwLock<Shared>>,
    open: FxHashMap<u128, Group>,
    open_hops: usize,
    quiet_q: VecDeque<(u128, u64)>,
    age_q: VecDeque<(u128, u64)>,
    recent: FxHashMap<u128, Arc<Analysed>>,
    /// Evicted recent traces, freed by the caller outside the lock.
    graveyard: Vec<Arc<Analysed>>,
    recent_q: VecDeque<u128>,
    /// Traces evicted cut short whose analysis withheld a verdict ([`Analysis::withheld`])
    /// (key, last hop's arrival): analysed again in full once
    /// [`Limits::complete_after`] has passed without a late hop (see
    /// [`Core::take_ready`]), so that a bound hit under load does not lose the verdicts
    /// a cut-short analysis withholds (HOP_MISSING).
    ///
    /// Each entry holds the analysed trace itself (shared with the recent store), so
    /// that the re-check does not depend on the recent store keeping it for the window
    /// (under load it holds well under a second of traffic). Their bytes are
    /// `recheck_bytes`, counted in [`Core::open_bytes`] and bounded to a
    /// [`RECHECK_SHARE`] of the open traces' budget.
    recheck_q: VecDeque<(u128, u64, Arc<Analysed>)>,
    recheck_bytes: usize,
    recent_hops: usize,
    recent_bytes: usize,
    open_bytes: usize,
    workloads: FxHashMap<(Sym, Sym), WorkloadStats>,
    workload_bytes: usize,
    pub stats: CoreStats,
}

impl Core {
    pub fn new(limits: Limits) -> Self {
        Core {
            shared: Arc::new(RwLock::new(Shared {
                it: Interner::with_budget(limits.max_interned_strings, limits.budgets.strings),
                pods: PodIndex::with_budget(
                    limits.pod_index_per_pod,
                    limits.max_pods,
                    limits.budgets.pods(),
                ),
                registry: Registry::with_budget(64, 100_000, limits.budgets.registry()),
            })),
            graveyard: Vec::new(),
            open: FxHashMap::default(),
            open_hops: 0,
            quiet_q: VecDeque::new(),
            age_q: VecDeque::new(),
            recent: FxHashMap::default(),
            recent_q: VecDeque::new(),
            recheck_q: VecDeque::new(),
            recheck_bytes: 0,
            recent_hops: 0,
            recent_bytes: 0,
            open_bytes: 0,
            workloads: FxHashMap::default(),
            workload_bytes: 0,
            stats: CoreStats::default(),
            limits,
        }
    }

    pub fn open_traces(&self) -> usize {
        self.open.len()
    }
    pub fn open_hops(&self) -> usize {
        self.open_hops
    }
    pub fn recent_traces(&self) -> usize {
        self.recent.len()
    }
    /// Entries in the quiet and age queues (memory check).
    pub fn queue_len(&self) -> usize {
        self.quiet_q.len() + self.age_q.len()
    }

    /// Arrival time (ms) of the oldest open trace, or a little earlier (the age queue's
    /// front may be a trace analysed since); None if no trace is open. Every hop that
    /// arrived before it belongs to an analysed trace: the WAL's checkpoint (persist.rs).
    pub fn oldest_open_ms(&self) -> Option<u64> {
        self.age_q.front().map(|&(_, t)| t)
    }

    /// Adds validated hops (direction set, trace id or request id present). Traces evicted
    /// to make room are analysed at once and returned.
    pub fn ingest(&mut self, hops: &[Hop], now_ms: u64) -> (u32, Vec<TraceResult>) {
        let converted = Self::convert(&self.shared, hops);
        let (accepted, evicted) = self.ingest_converted(hops, converted, now_ms);
        let shared = self.shared.clone();
        let limits = self.limits.clone();
        let results = evicted
            .into_iter()
            .map(|p| {
                let d = Self::analyse_pending(&shared, &limits, p, now_ms);
                self.store_done(d)
            })
            .collect();
        (accepted, results)
    }

    /// First half of ingest, without the aggregator: interns the hops' strings and
    /// records them in the cross-trace indexes. Returns (group key, compact hop) per hop.
    pub fn convert(shared: &RwLock<Shared>, hops: &[Hop]) -> Vec<(u128, CHop)> {
        let mut guard = shared.write();
        let s = &mut *guard;
        hops.iter()
            .map(|h| {
                let key = group_key(crate::other_ids::group_id(h), &h.request_id);
                let c = CHop::from_proto(h, &mut s.it);
                s.registry
                    .record(c.namespace, c.service, c.own_tag, c.start_us);
                if c.is_inbound() {
                    s.pods.record(&c, key);
                }
                (key, c)
            })
            .collect()
    }

    /// Second half of ingest: adds converted hops (`converted[i]` is `hops[i]`) to their
    /// trace groups. Returns the traces evicted to make room, taken out of the open set:
    /// the caller analyses them ([`Core::analyse_pending`], outside the lock) and stores
    /// them ([`Core::store_done`]), as for [`Core::take_ready`].
    pub fn ingest_converted(
        &mut self,
        hops: &[Hop],
        converted: Vec<(u128, CHop)>,
        now_ms: u64,
    ) -> (u32, Vec<Pending>) {
        let mut evicted = Vec::new();
        let mut accepted = 0u32;
        for (h, (key, c)) in hops.iter().zip(converted) {
            let wk = (c.namespace, c.workload);
            if !self.workloads.contains_key(&wk) {
                let row = WorkloadStats::default().bytes();
                if self.workload_bytes + row > self.limits.budgets.workload_stats {
                    self.evict_workloads(row);
                }
                self.workload_bytes += row;
            }
            let ws = self.workloads.entry(wk).or_default();
            ws.last_ms = now_ms;
            let before = ws.bytes();
            ws.hops += 1;
            if c.is_inbound() {
                ws.inbound += 1;
            } else {
                ws.outbound += 1;
            }
            // gRPC server errors count like 5xx (their HTTP status is 200).
            if crate::grpc::hop_server_error(&c) || c.response_flags != 0 {
                ws.errors += 1;
            }
            let mut f = c.response_flags;
            while f != 0 {
                let b = f.trailing_zeros() as u8;
                *ws.flags.entry(b).or_default() += 1;
                f &= f - 1;
            }
            self.workload_bytes = self.workload_bytes + ws.bytes() - before;
            // Looked up once (the map is large: each lookup of a new key is a cache
            // miss); again only if an eviction ran, which may have taken this trace.
            while self.open_hops >= self.limits.max_open_hops.max(1) {
                match self.evict_one(now_ms) {
                    Some(r) => evicted.push(r),
                    None => break,
                }
            }
            let evictions = evicted.len();
            let mut exists = self.open.contains_key(&key);
            // The byte budget: room for this hop (and its trace's overhead when new).
            let need = c.bytes()
                + if exists {
                    0
                } else {
                    Group::base_bytes(crate::other_ids::group_id(h))
                };
            while self.open_bytes() + need > self.limits.budgets.open && !self.open.is_empty() {
                match self.evict_one(now_ms) {
                    Some(r) => {
                        self.stats.open_evictions_bytes += 1;
                        evicted.push(r)
                    }
                    None => break,
                }
            }
            if exists && evicted.len() > evictions {
                exists = self.open.contains_key(&key);
            }
            let g = if exists {
                self.open.get_mut(&key)
            } else {
                while self.open.len() >= self.limits.max_open_traces.max(1) {
                    match self.evict_one(now_ms) {
                        Some(r) => evicted.push(r),
                        None => break,
                    }
                }
                let gid = crate::other_ids::group_id(h);
                let tid: &str = if gid.is_empty() { &h.request_id } else { gid };
                let bytes = Group::base_bytes(tid) + 3 * std::mem::size_of::<CHop>();
                self.open_bytes += bytes;
                self.age_q.push_back((key, now_ms));
                Some(self.open.entry(key).or_insert(Group {
                    trace_id: tid.into(),
                    hops: Vec::with_capacity(3),
                    first_ms: now_ms,
                    last_ms: 0,
                    bytes,
                }))
            };
            let Some(g) = g else {
                continue; // not reached: present, or inserted just now
            };
            if g.hops.len() >= self.limits.max_hops_per_trace {
                self.stats.hops_dropped_trace_full += 1;
            } else {
                if g.hops.len() == g.hops.capacity() {
                    // Grow by half instead of doubling: most traces have a handful of
                    // hops, and doubling wastes up to half of the largest allocation.
                    let cap = g.hops.capacity();
                    g.hops.reserve_exact((g.hops.len() / 2).max(2));
                    let grown = (g.hops.capacity() - cap) * std::mem::size_of::<CHop>();
                    g.bytes += grown;
                    self.open_bytes += grown;
                }
                // The slot is counted already: the hop's heap parts.
                let heap = c.bytes() - std::mem::size_of::<CHop>();
                g.bytes += heap;
                self.open_bytes += heap;
                g.hops.push(c);
                self.open_hops += 1;
                accepted += 1;
            }
            if g.last_ms != now_ms {
                g.last_ms = now_ms;
                self.quiet_q.push_back((key, now_ms));
            }
        }
        self.stats.hops_accepted += accepted as u64;
        (accepted, evicted)
    }

    /// Accounted bytes of the open traces (groups, hops, queue entries).
    pub fn open_bytes(&self) -> usize {
        // Queue entries beyond the two per trace counted in each group: lazily deleted.
        let extra = (self.quiet_q.len() + self.age_q.len()).saturating_sub(2 * self.open.len());
        self.open_bytes + extra * QUEUE_ENTRY + self.recheck_bytes
    }
    pub fn recent_bytes(&self) -> usize {
        self.recent_bytes
    }

    /// Byte figures of the stores the aggregator holds: (open, recent, workload stats).
    pub fn store_bytes(&self) -> [(&'static str, StoreBytes); 3] {
        let b = &self.limits.budgets;
        [
            (
                "open_traces",
                StoreBytes {
                    bytes: self.open_bytes(),
                    budget: b.open,
                    evictions: self.stats.open_evictions_bytes,
                },
            ),
            (
                "recent_traces",
                StoreBytes {
                    bytes: self.recent_bytes,
                    budget: b.recent,
                    evictions: self.stats.recent_evictions_bytes,
                },
            ),
            (
                "workload_stats",
                StoreBytes {
                    bytes: self.workload_bytes,
                    budget: b.workload_stats,
                    evictions: self.stats.workload_evictions,
                },
            ),
        ]
    }

    /// Drops the least recently updated workload stats rows: at least `need` bytes, down
    /// to 7/8 of the budget.
    fn evict_workloads(&mut self, need: usize) {
        let budget = self.limits.budgets.workload_stats;
        let target = self.workload_bytes + need;
        let to_free = target.saturating_sub(budget::low_water(budget));
        let keys = budget::oldest(
            self.workloads
                .iter()
                .map(|(k, w)| (w.last_ms, *k, w.bytes())),
            to_free,
        );
        for k in keys {
            if let Some(w) = self.workloads.remove(&k) {
                self.workload_bytes -= w.bytes();
                self.stats.workload_evictions += 1;
            }
        }
    }

    /// Drops the workload stats rows not updated since `before_ms`.
    pub fn prune_workloads(&mut self, before_ms: u64) -> usize {
        let mut freed = 0;
        let mut n = 0;
        self.workloads.retain(|_, w| {
            let keep = w.last_ms >= before_ms;
            if !keep {
                freed += w.bytes();
                n += 1;
            }
            keep
        });
        self.workload_bytes -= freed;
        self.stats.workload_expired += n as u64;
        n
    }

    /// Marks the symbols the aggregator's stores hold (open and recent traces, workload
    /// stats) for a string table compaction.
    pub fn mark(&self, m: &mut Marks) {
        for g in self.open.values() {
            g.hops.iter().for_each(|h| h.mark(m));
        }
        for t in self.recent.values() {
            t.hops.iter().for_each(|h| h.mark(m));
        }
        for t in &self.graveyard {
            t.hops.iter().for_each(|h| h.mark(m));
        }
        for (_, _, t) in &self.recheck_q {
            t.hops.iter().for_each(|h| h.mark(m));
        }
        for &(ns, wl) in self.workloads.keys() {
            m.mark(ns);
            m.mark(wl);
        }
    }

    fn evict_one(&mut self, now_ms: u64) -> Option<Pending> {
        while let Some((key, t)) = self.quiet_q.pop_front() {
            if let Some(g) = self.open.get(&key).filter(|g| g.last_ms == t) {
                self.stats.traces_evicted += 1;
                // The least recently updated trace. Quiet for LATE_HOP_WINDOW (at most
                // --trace-quiet), no more hop of it is on the way: a full analysis.
                // Otherwise a cut-short one (no HOP_MISSING, the partner may still come).
                let complete_after = self.limits.complete_after().as_millis() as u64;
                let partial = now_ms.saturating_sub(g.last_ms) < complete_after;
                if partial {
                    // Queued for a re-check by `store_done` if its analysis withheld
                    // a verdict.
                    self.stats.traces_evicted_cut_short += 1;
                }
                return self.take(key, partial);
            }
        }
        None
    }

    /// Analyses the traces that became quiet or too old by `now_ms` (at most `budget`).
    pub fn poll(&mut self, now_ms: u64, budget: usize) -> Vec<TraceResult> {
        let pending = self.take_ready(now_ms, budget);
        let shared = self.shared.clone();
        let limits = self.limits.clone();
        pending
            .into_iter()
            .map(|p| {
                let d = Self::analyse_pending(&shared, &limits, p, now_ms);
                self.store_done(d)
            })
            .collect()
    }

    /// Takes the traces that became quiet or too old by `now_ms` out of the open set (at
    /// most `budget`), to be analysed with [`Core::analyse_pending`] outside the lock.
    pub fn take_ready(&mut self, now_ms: u64, budget: usize) -> Vec<Pending> {
        let quiet = self.limits.trace_quiet.as_millis() as u64;
        let max_age = self.limits.max_trace_age.as_millis() as u64;
        let mut out = Vec::new();
        // Entries are lazily deleted: an entry whose trace was analysed (or updated since)
        // is dropped as soon as it reaches the front, so the queues stay short.
        while out.len() < budget {
            let Some(&(key, t)) = self.quiet_q.front() else {
                break;
            };
            let current = self.open.get(&key).is_some_and(|g| g.last_ms == t);
            if current && t + quiet > now_ms {
                break;
            }
            self.quiet_q.pop_front();
            if current {
                out.extend(self.take(key, false));
            }
        }
        while out.len() < budget {
            let Some(&(key, t)) = self.age_q.front() else {
                break;
            };
            let current = self.open.get(&key).is_some_and(|g| g.first_ms == t);
            if current && t + max_age > now_ms {
                break;
            }
            self.age_q.pop_front();
            if current {
                self.stats.traces_analysed_at_max_age += 1;
                out.extend(self.take(key, false));
            }
        }
        let complete_after = self.limits.complete_after().as_millis() as u64;
        while out.len() < budget {
            let Some(&(key, last, _)) = self.recheck_q.front() else {
                break;
            };
            if last + complete_after > now_ms {
                break;
            }
            let Some((_, _, old)) = self.pop_recheck() else {
                break;
            };
            // A late hop re-opened it: its own analysis merges the earlier hops.
            if self.open.contains_key(&key) {
                continue;
            }
            // Analysed again since (late hops merged): that analysis decided (and, cut
            // short with a verdict withheld, queued its own re-check).
            if self.recent.get(&key).is_some_and(|r| !Arc::ptr_eq(r, &old)) {
                continue;
            }
            out.push(self.recheck(key, last, &old));
        }
        out
    }

    fn pop_recheck(&mut self) -> Option<(u128, u64, Arc<Analysed>)> {
        let e = self.recheck_q.pop_front()?;
        self.recheck_bytes -= e.2.bytes();
        Some(e)
    }

    /// A full analysis of a trace analysed cut short (`old`, kept by the re-check queue
    /// even if the recent store let it go); only findings the cut-short analysis did
    /// not have are reported.
    fn recheck(&mut self, key: u128, last_ms: u64, old: &Analysed) -> Pending {
        self.stats.traces_rechecked += 1;
        Pending {
            key,
            group: Group {
                trace_id: old.trace_id.clone(),
                hops: old.hops.clone(),
                first_ms: last_ms,
                last_ms,
                bytes: 0,
            },
            partial: false,
            recheck: true,
            previous: old.analysis.findings.clone(),
        }
    }

    /// Analyses every open trace (shutdown).
    pub fn flush_all(&mut self, now_ms: u64) -> Vec<TraceResult> {
        let keys: Vec<u128> = self.open.keys().copied().collect();
        let out = keys
            .into_iter()
            .filter_map(|k| self.finish(k, now_ms, false))
            .collect();
        self.quiet_q.clear();
        self.age_q.clear();
        out
    }

    fn ctx<'a>(s: &'a Shared, limits: &Limits, now_ms: u64, partial: bool) -> Ctx<'a> {
        Ctx {
            it: &s.it,
            pods: &s.pods,
            registry: &s.registry,
            slack_us: limits.join_slack.as_micros() as u64,
            instance_ttl_us: limits.instance_ttl.as_micros() as u64,
            partial,
            now_ms,
        }
    }

    fn finish(&mut self, key: u128, now_ms: u64, partial: bool) -> Option<TraceResult> {
        let p = self.take(key, partial)?;
        let d = Self::analyse_pending(&self.shared, &self.limits, p, now_ms);
        Some(self.store_done(d))
    }

    /// Analyses a taken trace (reads the shared indexes only).
    pub fn analyse_pending(
        shared: &RwLock<Shared>,
        limits: &Limits,
        p: Pending,
        now_ms: u64,
    ) -> Done {
        let s = shared.read();
        let analysis = analyse(
            &p.group.hops,
            p.key,
            &Self::ctx(&s, limits, now_ms, p.partial),
        );
        Done {
            pending: p,
            analysis,
        }
    }

    /// Freed recent traces (drop them outside the lock).
    pub fn take_graveyard(&mut self) -> Vec<Arc<Analysed>> {
        std::mem::take(&mut self.graveyard)
    }

    fn take(&mut self, key: u128, partial: bool) -> Option<Pending> {
        let mut g = self.open.remove(&key)?;
        self.open_hops -= g.hops.len();
        self.open_bytes -= g.bytes;
        // Late hops of a trace analysed already: analyse them together with the earlier
        // hops (so they join their callers/parents) and report only the new findings.
        let mut previous: Vec<Finding> = Vec::new();
        if let Some(old) = self
            .recent
            .get(&key)
            .filter(|old| old.hops.len() + g.hops.len() <= self.limits.max_hops_per_trace)
        {
            self.stats.late_merges += 1;
            let mut hops = old.hops.clone();
            hops.append(&mut g.hops);
            g.hops = hops;
            previous = old.analysis.findings.clone();
        }
        Some(Pending {
            key,
            group: g,
            partial,
            recheck: false,
            previous,
        })
    }

    /// Records an analysed trace (recent store, stats) and returns its new findings.
    pub fn store_done(&mut self, d: Done) -> TraceResult {
        let Done {
            pending:
                Pending {
                    key,
                    group: g,
                    previous,
                    partial,
                    recheck,
                },
            analysis,
        } = d;
        if !recheck {
            self.stats.traces_analysed += 1;
        }
        // Only a trace whose cut-short analysis withheld a verdict (an outbound hop
        // without its callee's, a hidden call) can get more from a full one: the common
        // healthy trace is never analysed twice.
        let queue_recheck = partial && analysis.withheld;
        let last_ms = g.last_ms;
        let same = |a: &Finding, b: &Finding| {
            a.kind == b.kind
                && a.namespace == b.namespace
                && a.workload == b.workload
                && a.peer == b.peer
        };
        let findings = analysis
            .findings
            .iter()
            .filter(|f| !previous.iter().any(|p| same(p, f)))
            .cloned()
            .collect();
        let result = TraceResult {
            trace_id: g.trace_id.to_string(),
            findings,
        };
        // Keep it for GetTrace, bounded by hops and bytes.
        self.recent_hops += g.hops.len();
        let t = Arc::new(Analysed::new(g.trace_id, g.hops, analysis));
        self.recent_bytes += t.bytes();
        if queue_recheck {
            // Bounded by count like the queues it sits beside, and by bytes; the oldest
            // re-check is given up first.
            let max_bytes = self.limits.budgets.open / RECHECK_SHARE;
            while !self.recheck_q.is_empty()
                && (self.recheck_q.len() >= self.limits.max_open_traces
                    || self.recheck_bytes + t.bytes() > max_bytes)
            {
                if let Some((_, _, old)) = self.pop_recheck() {
                    self.stats.rechecks_dropped += 1;
                    self.graveyard.push(old);
                }
            }
            if t.bytes() <= max_bytes {
                self.recheck_bytes += t.bytes();
                self.recheck_q.push_back((key, last_ms, t.clone()));
            } else {
                self.stats.rechecks_dropped += 1;
            }
        }
        if let Some(old) = self.recent.insert(key, t) {
            self.recent_hops -= old.hops.len();
            self.recent_bytes -= old.bytes();
            self.graveyard.push(old);
        } else {
            self.recent_q.push_back(key);
        }
        loop {
            let over_bytes = self.recent_bytes > self.limits.budgets.recent;
            if self.recent_hops <= self.limits.max_recent_hops && !over_bytes {
                break;
            }
            let Some(k) = self.recent_q.pop_front() else {
                break;
            };
            if let Some(old) = self.recent.remove(&k) {
                self.recent_hops -= old.hops.len();
                self.recent_bytes -= old.bytes();
                if over_bytes {
                    self.stats.recent_evictions_bytes += 1;
                }
                self.graveyard.push(old);
            }
        }
        if self.graveyard.len() > 4096 {
            self.graveyard.clear(); // nobody collects them (direct use of Core)
        }
        result
    }

    /// Forgets cross-trace index entries older than `before_us`.
    pub fn prune_indexes(&mut self, before_us: u64) {
        self.shared.write().pods.prune(before_us);
    }

    /// The joined chain of a trace (open or recently analysed), looked up by trace id or,
    /// for traces without one, by request id.
    pub fn trace(&self, id: &str, now_ms: u64) -> Option<TraceView> {
        let id = id.trim();
        // group_key lowercases trace ids; request ids are kept as they are.
        for key in [group_key(id, ""), group_key("", id)] {
            if let Some(g) = self.open.get(&key) {
                // Not final: analysed as a cut-short trace (no HOP_MISSING yet).
                let s = self.shared.read();
                let a = analyse(&g.hops, key, &Self::ctx(&s, &self.limits, now_ms, true));
                return Some(Self::view(&s.it, &g.trace_id, &g.hops, &a, true));
            }
            if let Some(t) = self.recent.get(&key) {
                let s = self.shared.read();
                return Some(Self::view(&s.it, &t.trace_id, &t.hops, &t.analysis, false));
            }
        }
        None
    }

    fn view(it: &Interner, trace_id: &str, hops: &[CHop], a: &Analysis, open: bool) -> TraceView {
        /// Builds the node `id` at `depth`; a child at [`MAX_TREE_DEPTH`] (relative to
        /// the root it hangs under) is left out and queued in `cut` with its absolute
        /// depth, to become a further root.
        #[allow(clippy::too_many_arguments)]
        fn build(
            id: u32,
            a: &Analysis,
            hops: &[CHop],
            tid: &str,
            it: &Interner,
            depth: usize,
            base: usize,
            cut: &mut Vec<(u32, usize)>,
        ) -> CallNode {
            let n = &a.nodes[id as usize];
            let children = if depth + 1 >= base + MAX_TREE_DEPTH {
                cut.extend(n.children.iter().map(|&c| (c, depth + 1)));
                vec![]
            } else {
                n.children
                    .iter()
                    .map(|&c| build(c, a, hops, tid, it, depth + 1, base, cut))
                    .collect()
            };
            CallNode {
                outbound: n.out.map(|h| hops[h as usize].to_proto(tid, it)),
                inbound: n.inb.map(|h| hops[h as usize].to_proto(tid, it)),
                children,
                breaks: n.breaks.iter().map(|&k| k as i32).collect(),
                earlier_attempts: n
                    .attempts
                    .iter()
                    .map(|&h| hops[h as usize].to_proto(tid, it))
                    .collect(),
                continued_at_depth: if depth == base { base as u32 } else { 0 },
            }
        }
        let mut roots = Vec::new();
        let mut cut: Vec<(u32, usize)> = a.roots.iter().map(|&r| (r, 0)).collect();
        // Each cut subtree becomes a root of its own, in the order it was cut (every
        // node is reached once: the analysis' tree has no cycles, bounded by its nodes).
        let mut i = 0;
        while i < cut.len() && roots.len() <= a.nodes.len() {
            let (r, base) = cut[i];
            i += 1;
            let mut more = Vec::new();
            roots.push(build(r, a, hops, trace_id, it, base, base, &mut more));
            cut.extend(more);
        }
        TraceView {
            trace_id: trace_id.to_string(),
            roots,
            hop_count: hops.len() as u32,
            open,
            findings: a.findings.clone(),
        }
    }

    /// Per-workload statistics with names resolved: ((namespace, workload), stats).
    pub fn workload_stats(&self) -> Vec<((String, String), WorkloadStats)> {
        let sh = self.shared.read();
        self.workloads
            .iter()
            .map(|((ns, wl), s)| {
                (
                    (
                        sh.it.resolve(*ns).to_string(),
                        sh.it.resolve(*wl).to_string(),
                    ),
                    s.clone(),
                )
            })
            .collect()
    }
}

/// Checks a hop the way Report does (used before taking the lock).
pub fn validate_hop(i: usize, h: &Hop) -> Result<(), String> {
    if h.direction != Direction::Inbound as i32 && h.direction != Direction::Outbound as i32 {
        return Err(format!(
            "hop {i}: direction must be DIRECTION_INBOUND or DIRECTION_OUTBOUND (got {})",
            h.direction
        ));
    }
    if h.trace_id.is_empty() && h.request_id.is_empty() {
        return Err(format!(
            "hop {i}: has neither trace_id nor request_id, so it cannot be joined"
        ));
    }
    if h.trace_id.len() > 128 || h.request_id.len() > 256 {
        return Err(format!("hop {i}: trace_id or request_id is too long"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hopwatch_proto::v1::BreakKind;

    fn hop(dir: Direction, wl: &str, svc: &str, span: &str, up: &str, dest: &str) -> Hop {
        let out = dir == Direction::Outbound;
        Hop {
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            span_id: span.into(),
            upstream_span_id: up.into(),
            request_id: format!("req-{span}-{up}"),
            direction: dir as i32,
            workload: wl.into(),
            namespace: "default".into(),
            pod: format!("{wl}-pod"),
            service: svc.into(),
            authority: format!("{}:9080", if out { dest } else { svc }),
            response_code: 200,
            upstream_cluster: if out {
                format!("outbound|9080||{dest}.default.svc.cluster.local")
            } else {
                "inbound|9080||".into()
            },
            upstream_host: "10.1.2.3:9080".into(),
            start_time_unix_micros: 1_000_000,
            duration_micros: 1_000,
            sampled_report: true,
            ..Default::default()
        }
    }

    /// productpage -> reviews, both sides reported unless `drop_callee`.
    fn call(trace: &str, drop_callee: bool) -> Vec<Hop> {
        let mut hops = vec![
            hop(
                Direction::Inbound,
                "productpage-v1",
                "productpage",
                "a1",
                "",
                "",
            ),
            hop(
                Direction::Outbound,
                "productpage-v1",
                "productpage",
                "a1",
                "a2",
                "reviews",
            ),
            hop(Direction::Inbound, "reviews-v1", "reviews", "a2", "", ""),
        ];
        if drop_callee {
            hops.pop();
        }
        for h in &mut hops {
            h.trace_id = trace.into();
        }
        hops
    }

    /// Ingests `trace` and then another trace at the same instant, which evicts it (one
    /// open trace at most) cut short; then polls past the late-hop window. Returns the
    /// findings of the poll and the core.
    fn evicted_cut_short(trace: Vec<Hop>) -> (Vec<TraceResult>, Core) {
        evicted_cut_short_with(trace, Limits::default().max_recent_hops)
    }

    fn evicted_cut_short_with(trace: Vec<Hop>, max_recent_hops: usize) -> (Vec<TraceResult>, Core) {
        let mut core = Core::new(Limits {
            max_open_traces: 1,
            max_recent_hops,
            ..Limits::default()
        });
        let now = 1_000_000;
        assert!(core.ingest(&trace, now).1.is_empty());
        let other = vec![hop(
            Direction::Inbound,
            "details-v1",
            "details",
            "b1",
            "",
            "",
        )];
        let (_, evicted) = core.ingest(&other, now);
        assert_eq!(evicted.len(), 1, "the first trace was evicted");
        assert_eq!(core.stats.traces_evicted_cut_short, 1);
        assert!(
            evicted[0]
                .findings
                .iter()
                .all(|f| f.kind != BreakKind::HopMissing),
            "cut short: no HOP_MISSING"
        );
        let later = now + LATE_HOP_WINDOW.as_millis() as u64 + 1;
        let results = core.poll(later, usize::MAX);
        (results, core)
    }

    #[test]
    fn a_healthy_cut_short_trace_is_not_rechecked() {
        let (results, core) = evicted_cut_short(call("1", false));
        assert_eq!(core.stats.traces_rechecked, 0);
        assert!(results.iter().all(|r| r.findings.is_empty()), "{results:?}");
    }

    #[test]
    fn a_cut_short_trace_with_an_unpartnered_outbound_hop_is_rechecked() {
        let (results, core) = evicted_cut_short(call("2", true));
        assert_eq!(core.stats.traces_rechecked, 1);
        let missing: Vec<_> = results
            .iter()
            .flat_map(|r| &r.findings)
            .filter(|f| f.kind == BreakKind::HopMissing)
            .collect();
        assert_eq!(missing.len(), 1, "{results:?}");
        assert_eq!(
            (missing[0].workload.as_str(), missing[0].peer.as_str()),
            ("productpage-v1", "reviews")
        );
        // A re-check is not a further trace analysed: only the evicted one was (the
        // other is not quiet yet).
        assert_eq!(core.stats.traces_analysed, 1);
    }

    #[test]
    fn the_recheck_does_not_need_the_recent_store_to_keep_the_trace() {
        // The recent store keeps one hop: the evicted trace (two hops) leaves it at once.
        let (results, core) = evicted_cut_short_with(call("3", true), 1);
        assert_eq!(core.recent_traces(), 0);
        assert_eq!(core.stats.traces_rechecked, 1);
        assert_eq!(core.stats.rechecks_dropped, 0);
        assert!(
            results
                .iter()
                .flat_map(|r| &r.findings)
                .any(|f| f.kind == BreakKind::HopMissing),
            "{results:?}"
        );
    }
}
