//! Joining the hops of one trace into a call tree and detecting breaks in it.
//!
//! Pure functions over a slice of [`CHop`]s plus read-only context (interner, the per-pod
//! index of recent inbound requests across traces, the registry of instance environments),
//! so every finding kind can be unit-tested on constructed hop sets.

use std::collections::VecDeque;

use hopwatch_proto::v1::{BreakKind, Severity, TagSource, TraceContext};
use rustc_hash::FxHashMap;

use crate::model::{
    flag_bit, flag_names, hash64, match_level, CHop, Interner, Sym, BIT_DEST_EXTERNAL,
    BIT_DEST_IN_MESH,
};
use crate::{app_error, policy_denied};

const NONE: u32 = u32::MAX;

/// A recent inbound request of one pod (any trace), to link an outbound call whose trace
/// context was lost to the request the workload was serving.
#[derive(Clone, Copy, Debug)]
pub struct PodInbound {
    pub start_us: u64,
    pub end_us: u64,
    pub key: u128,
    pub traced: bool,
    pub tag: Sym,
    pub req: u64,
}

type PodKey = (Sym, Sym, Sym);

/// Bounded per-pod index of recent inbound requests (by count per pod, pods, and bytes:
/// over its byte budget, the pods whose newest request is oldest are forgotten).
pub struct PodIndex {
    map: FxHashMap<PodKey, VecDeque<PodInbound>>,
    per_pod: usize,
    max_pods: usize,
    pub dropped: u64,
    budget: usize,
    bytes: usize,
    /// Pods forgotten for the byte budget.
    pub evictions: u64,
}

fn pod_bytes(q: &VecDeque<PodInbound>) -> usize {
    crate::budget::map_slot(std::mem::size_of::<(PodKey, VecDeque<PodInbound>)>())
        + q.capacity() * std::mem::size_of::<PodInbound>()
        + crate::budget::ALLOC_OVERHEAD
}

impl PodIndex {
    pub fn new(per_pod: usize, max_pods: usize) -> Self {
        Self::with_budget(per_pod, max_pods, usize::MAX)
    }
    pub fn with_budget(per_pod: usize, max_pods: usize, budget: usize) -> Self {
        PodIndex {
            map: FxHashMap::default(),
            per_pod: per_pod.max(1),
            max_pods,
            dropped: 0,
            budget,
            bytes: 0,
            evictions: 0,
        }
    }
    /// Accounted bytes (map slots, queues).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    pub fn budget(&self) -> usize {
        self.budget
    }
    pub fn record(&mut self, h: &CHop, key: u128) {
        let k = (h.namespace, h.workload, h.pod);
        if !self.map.contains_key(&k) && self.map.len() >= self.max_pods {
            self.dropped += 1;
            return;
        }
        if self.bytes > self.budget {
            self.evict();
        }
        let new = !self.map.contains_key(&k);
        let q = self
            .map
            .entry(k)
            .or_insert_with(|| VecDeque::with_capacity(4));
        if new {
            self.bytes += pod_bytes(q);
        }
        let before = q.capacity();
        if q.len() >= self.per_pod {
            q.pop_front();
        }
        push_inbound(q, h, key);
        self.bytes += (q.capacity() - before) * std::mem::size_of::<PodInbound>();
    }
    /// Forgets the pods whose newest request is the oldest, down to 7/8 of the budget.
    fn evict(&mut self) {
        let to_free = self.bytes - crate::budget::low_water(self.budget);
        let keys = crate::budget::oldest(
            self.map
                .iter()
                .map(|(k, q)| (q.back().map_or(0, |e| e.end_us), *k, pod_bytes(q))),
            to_free,
        );
        for k in keys {
            if let Some(q) = self.map.remove(&k) {
                self.bytes -= pod_bytes(&q);
                self.evictions += 1;
            }
        }
    }
    /// Marks the symbols the index holds (string table compaction).
    pub fn mark(&self, m: &mut crate::model::Marks) {
        for (&(ns, wl, pod), q) in &self.map {
            m.mark(ns);
            m.mark(wl);
            m.mark(pod);
            q.iter().for_each(|e| m.mark(e.tag));
        }
    }
}

fn push_inbound(q: &mut VecDeque<PodInbound>, h: &CHop, key: u128) {
    q.push_back(PodInbound {
        start_us: h.start_us,
        end_us: h.end_us(),
        key,
        traced: h.has_trace_id,
        tag: h.inbound_tag(),
        req: req_hash(h),
    });
}

impl PodIndex {
    /// The inbound request of `o`'s pod, in another trace group than `key`, that `o` was
    /// made while serving: same request id, else the latest one whose time window holds
    /// `o`'s start.
    pub fn find(&self, o: &CHop, key: u128, slack_us: u64) -> Option<PodInbound> {
        let q = self.map.get(&(o.namespace, o.workload, o.pod))?;
        let req = req_hash(o);
        let mut best: Option<(bool, u64, PodInbound)> = None;
        for e in q.iter() {
            if e.key == key {
                continue;
            }
            let strong = req != 0 && e.req == req;
            let contain = e.start_us <= o.start_us + slack_us && o.start_us <= e.end_us + slack_us;
            if !strong && !contain {
                continue;
            }
            let cand = (strong, e.start_us, *e);
            if best.as_ref().is_none_or(|b| (b.0, b.1) < (cand.0, cand.1)) {
                best = Some(cand);
            }
        }
        best.map(|b| b.2)
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    /// Forgets pods whose newest request ended before `before_us`.
    pub fn prune(&mut self, before_us: u64) {
        let mut freed = 0;
        self.map.retain(|_, q| {
            let keep = q.back().is_some_and(|e| e.end_us >= before_us);
            if !keep {
                freed += pod_bytes(q);
            }
            keep
        });
        self.bytes -= freed;
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    #[test]
    fn pod_index_forgets_the_pods_seen_least_recently_and_accounts_to_zero() {
        let mut it = Interner::new(100_000);
        let mut p = PodIndex::with_budget(512, 1_000_000, 64 * 1024);
        for i in 0..3000u64 {
            let h = CHop {
                direction: hopwatch_proto::v1::Direction::Inbound as u8,
                pod: it.intern(&format!("pod{i}")),
                start_us: i,
                duration_us: 1,
                ..Default::default()
            };
            p.record(&h, i as u128);
        }
        assert!(p.bytes() <= 64 * 1024 + 1024, "{}", p.bytes());
        assert!(p.evictions > 2000);
        let newest = (Sym::EMPTY, Sym::EMPTY, it.get("pod2999").unwrap());
        assert!(p.map.contains_key(&newest));
        assert!(!p
            .map
            .contains_key(&(Sym::EMPTY, Sym::EMPTY, it.get("pod0").unwrap())));
        p.prune(u64::MAX);
        assert_eq!((p.bytes(), p.len()), (0, 0));
    }

    #[test]
    fn registry_forgets_the_services_seen_least_recently() {
        let mut it = Interner::new(100_000);
        let mut r = Registry::with_budget(64, 1_000_000, 16 * 1024);
        let ns = it.intern("ns");
        for i in 0..2000u64 {
            let svc = it.intern(&format!("svc{i}"));
            r.record(ns, svc, Sym::EMPTY, i);
        }
        assert!(r.bytes() <= 16 * 1024 + 512, "{}", r.bytes());
        assert!(r.evictions > 1000);
        assert!(r.knows(ns, it.get("svc1999").unwrap()));
        assert!(!r.knows(ns, it.get("svc0").unwrap()));
    }
}

fn req_hash(h: &CHop) -> u64 {
    h.request_id
        .as_deref()
        .map(|r| hash64(r.as_bytes(), 7) | 1)
        .unwrap_or(0)
}

#[derive(Clone, Copy, Debug)]
pub struct InstanceEnv {
    pub tag: Sym,
    pub first_us: u64,
    pub last_us: u64,
}

/// The environments (own tags) seen per service: which instances exist. Bounded by
/// services, environments per service and bytes (over its budget, the services seen
/// least recently are forgotten).
pub struct Registry {
    map: FxHashMap<(Sym, Sym), Vec<InstanceEnv>>,
    per_service: usize,
    max_services: usize,
    budget: usize,
    bytes: usize,
    /// Services forgotten for the byte budget.
    pub evictions: u64,
}

fn service_bytes(v: &Vec<InstanceEnv>) -> usize {
    crate::budget::map_slot(std::mem::size_of::<((Sym, Sym), Vec<InstanceEnv>)>())
        + v.capacity() * std::mem::size_of::<InstanceEnv>()
        + crate::budget::ALLOC_OVERHEAD
}

impl Registry {
    pub fn new(per_service: usize, max_services: usize) -> Self {
        Self::with_budget(per_service, max_services, usize::MAX)
    }
    pub fn with_budget(per_service: usize, max_services: usize, budget: usize) -> Self {
        Registry {
            map: FxHashMap::default(),
            per_service,
            max_services,
            budget,
            bytes: 0,
            evictions: 0,
        }
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    pub fn budget(&self) -> usize {
        self.budget
    }
    pub fn record(&mut self, ns: Sym, svc: Sym, tag: Sym, t_us: u64) {
        if svc.is_empty() {
            return;
        }
        let new = !self.map.contains_key(&(ns, svc));
        if new && self.map.len() >= self.max_services {
            return;
        }
        if new && self.bytes > self.budget {
            let to_free = self.bytes - crate::budget::low_water(self.budget);
            let keys = crate::budget::oldest(
                self.map.iter().map(|(k, v)| {
                    let last = v.iter().map(|e| e.last_us).max().unwrap_or(0);
                    (last, *k, service_bytes(v))
                }),
                to_free,
            );
            for k in keys {
                if let Some(v) = self.map.remove(&k) {
                    self.bytes -= service_bytes(&v);
                    self.evictions += 1;
                }
            }
        }
        let v = self.map.entry((ns, svc)).or_default();
        let before = if new { 0 } else { service_bytes(v) };
        if let Some(e) = v.iter_mut().find(|e| e.tag == tag) {
            e.first_us = e.first_us.min(t_us);
            e.last_us = e.last_us.max(t_us);
        } else if v.len() < self.per_service {
            v.push(InstanceEnv {
                tag,
                first_us: t_us,
                last_us: t_us,
            });
        }
        self.bytes = self.bytes + service_bytes(v) - before;
    }
    /// Marks the symbols the registry holds (string table compaction).
    pub fn mark(&self, m: &mut crate::model::Marks) {
        for (&(ns, svc), v) in &self.map {
            m.mark(ns);
            m.mark(svc);
            v.iter().for_each(|e| m.mark(e.tag));
        }
    }
    pub fn knows(&self, ns: Sym, svc: Sym) -> bool {
        if ns.is_empty() {
            return self.map.keys().any(|(_, s)| *s == svc);
        }
        self.map.contains_key(&(ns, svc))
    }
    /// The best-matching environment for `tag` among instances of (ns, svc) alive at `at_us`.
    pub fn best(&self, ns: Sym, svc: Sym, tag: &str, at_us: u64, cx: &Ctx) -> Option<(Sym, i32)> {
        let (ttl_us, slack_us, it) = (cx.instance_ttl_us, cx.slack_us, cx.it);
        let v = self.map.get(&(ns, svc))?;
        v.iter()
            .filter(|e| e.first_us <= at_us + slack_us && e.last_us + ttl_us >= at_us)
            .map(|e| (e.tag, match_level(it.resolve(e.tag), tag)))
            .max_by_key(|x| x.1)
    }
}

/// Read-only inputs of an analysis.
pub struct Ctx<'a> {
    pub it: &'a Interner,
    pub pods: &'a PodIndex,
    pub registry: &'a Registry,
    /// Clock slack when comparing hops reported by different sidecars.
    pub slack_us: u64,
    /// How long an instance environment stays known after its last hop.
    pub instance_ttl_us: u64,
    /// The trace was cut short (evicted): no HOP_MISSING (the partner may still come).
    pub partial: bool,
    pub now_ms: u64,
}

/// One call: the caller's outbound hop and the callee's inbound hop (either may be absent).
#[derive(Clone, Debug, Default)]
pub struct Node {
    pub out: Option<u32>,
    /// The callee's inbound hop; with retries, the last attempt (whose answer the caller
    /// got).
    pub inb: Option<u32>,
    /// The earlier attempts of a retried call (Istio retries every outbound route by
    /// default): inbound hops of the same call on the callee's side, oldest first.
    pub attempts: Vec<u32>,
    pub children: Vec<u32>,
    pub breaks: Vec<BreakKind>,
}

/// One occurrence of a break in one trace.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub kind: BreakKind,
    pub severity: Severity,
    pub workload: String,
    pub namespace: String,
    pub peer: String,
    pub flags: Vec<String>,
    pub summary: String,
    pub hint: String,
    pub seen_ms: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Analysis {
    pub nodes: Vec<Node>,
    pub roots: Vec<u32>,
    pub findings: Vec<Finding>,
    /// Cut short ([`Ctx::partial`]) and a verdict was withheld for it: an outbound hop
    /// without its callee's hop that HOP_MISSING would report (whether the destination is
    /// known is not asked: the registry may learn it meanwhile), or a hidden call. A full
    /// analysis of the same hops may report more only then; else it reports nothing new.
    pub withheld: bool,
}

pub fn severity_of(kind: BreakKind) -> Severity {
    match kind {
        BreakKind::TagNotPropagated | BreakKind::TraceMalformed | BreakKind::PolicyDenied => {
            Severity::Warning
        }
        BreakKind::Unspecified => Severity::Info,
        // TRACE_NOT_PROPAGATED is an ERROR: the filter restores tags through the trace
        // ids, so a call whose trace was lost also loses the tag restoration downstream.
        _ => Severity::Error,
    }
}

/// Joins hops: returns (callee inbound per outbound hop, caller outbound per inbound hop).
pub fn join(hops: &[CHop], slack_us: u64) -> (Vec<u32>, Vec<u32>) {
    let n = hops.len();
    let mut callee = vec![NONE; n];
    let mut caller = vec![NONE; n];
    let outs: Vec<u32> = (0..n as u32)
        .filter(|&i| hops[i as usize].is_outbound())
        .collect();
    let ins: Vec<u32> = (0..n as u32)
        .filter(|&i| hops[i as usize].is_inbound())
        .collect();
    // 1. The span id the outbound sidecar sent upstream is the callee's span id. Without
    // a tracer no sidecar makes new spans, so apps that copy B3 verbatim send the same
    // span id along the whole chain: among several inbound hops with it, take one that
    // is not the caller's own, of the destination service, and closest in time.
    let mut by_span: FxHashMap<u64, Vec<u32>> = FxHashMap::default();
    for &i in &ins {
        let s = hops[i as usize].span_id;
        if s != 0 {
            by_span.entry(s).or_default().push(i);
        }
    }
    for &o in &outs {
        let oh = &hops[o as usize];
        let up = oh.upstream_span_id;
        if up == 0 {
            continue;
        }
        let Some(cands) = by_span.get(&up) else {
            continue;
        };
        let pick = if cands.len() == 1 {
            cands
                .first()
                .copied()
                .filter(|&i| caller[i as usize] == NONE)
        } else {
            cands
                .iter()
                .copied()
                .filter(|&i| {
                    let ih = &hops[i as usize];
                    caller[i as usize] == NONE
                        && !(ih.pod == oh.pod && ih.workload == oh.workload)
                        && ih.start_us + slack_us >= oh.start_us
                        && ih.start_us <= oh.end_us() + slack_us
                })
                .max_by_key(|&i| {
                    let ih = &hops[i as usize];
                    let svc = !oh.dest_service.is_empty()
                        && (ih.service == oh.dest_service
                            || ih.authority_service == oh.dest_service);
                    (svc, -((ih.start_us as i64 - oh.start_us as i64).abs()))
                })
        };
        if let Some(i) = pick {
            caller[i as usize] = o;
            callee[o as usize] = i;
        }
    }
    // 2. Same request id (or none to compare) + destination service + timing. A request
    // id alone is not unique per edge (apps that copy x-request-id share it along the
    // whole chain), so the service and the time window disambiguate.
    for &o in &outs {
        if callee[o as usize] != NONE {
            continue;
        }
        let oh = &hops[o as usize];
        let mut best: Option<(bool, i64, u32)> = None;
        for &i in &ins {
            if caller[i as usize] != NONE {
                continue;
            }
            let ih = &hops[i as usize];
            let req_ok = match (&oh.request_id, &ih.request_id) {
                (Some(a), Some(b)) => {
                    if a != b {
                        continue;
                    }
                    true
                }
                _ => false,
            };
            let svc_ok = !oh.dest_service.is_empty()
                && (ih.service == oh.dest_service || ih.authority_service == oh.dest_service);
            if !(svc_ok || (req_ok && oh.dest_service.is_empty())) {
                continue;
            }
            // Timing is a hard condition only without a matching request id (with one,
            // it only picks the closest of several calls to the same service).
            let in_window =
                ih.start_us + slack_us >= oh.start_us && ih.start_us <= oh.end_us() + slack_us;
            if !(in_window || (req_ok && svc_ok)) {
                continue;
            }
            let dist = -((ih.start_us as i64 - oh.start_us as i64).abs());
            let strong = req_ok && in_window;
            if best.is_none_or(|b| (b.0, b.1) < (strong, dist)) {
                best = Some((strong, dist, i));
            }
        }
        if let Some((_, _, i)) = best {
            caller[i as usize] = o;
            callee[o as usize] = i;
        }
    }
    // 3. Leftovers: same request id and timing, even if the service names differ (a
    // Service name that is not the callee's canonical service name). Runs after every
    // service-matched join so that it only takes inbound hops nobody else explains.
    for &o in &outs {
        if callee[o as usize] != NONE {
            continue;
        }
        let oh = &hops[o as usize];
        let Some(rid) = &oh.request_id else { continue };
        let mut best: Option<(i64, u32)> = None;
        for &i in &ins {
            let ih = &hops[i as usize];
            if caller[i as usize] != NONE
                || ih.request_id.as_ref() != Some(rid)
                || (ih.pod == oh.pod && ih.workload == oh.workload)
                // Strictly inside the call: apps that copy x-request-id share it along
                // the whole chain, and an ancestor's inbound hop (which started before
                // and ended after this call) must not be taken for the callee's.
                || ih.start_us < oh.start_us
                || ih.end_us() > oh.end_us() + slack_us
            {
                continue;
            }
            let dist = -((ih.start_us as i64 - oh.start_us as i64).abs());
            if best.is_none_or(|b| b.0 < dist) {
                best = Some((dist, i));
            }
        }
        if let Some((_, i)) = best {
            caller[i as usize] = o;
            callee[o as usize] = i;
        }
    }
    join_retry_attempts(hops, &mut callee, &mut caller, slack_us);
    (callee, caller)
}

/// Step 4 of [`join`], retry attempts: Istio's default route retries a failed call up to twice, each
/// attempt with the same span id and request id, often on another pod, so one outbound
/// hop meets up to three inbound hops. An inbound hop still unjoined that matches an
/// already joined outbound hop (its upstream span id, else its request id and
/// destination service) and started within that call is one of its attempts: its caller
/// is that outbound hop, and the outbound hop's callee becomes the latest attempt (the
/// answer the caller got). [`build_tree`] keeps the others as the node's `attempts`.
fn join_retry_attempts(hops: &[CHop], callee: &mut [u32], caller: &mut [u32], slack_us: u64) {
    let n = hops.len();
    for i in 0..n {
        let ih = &hops[i];
        if !ih.is_inbound() || caller[i] != NONE {
            continue;
        }
        let mut best: Option<(u64, u32)> = None;
        for o in 0..n {
            let oh = &hops[o];
            if !oh.is_outbound() || callee[o] == NONE {
                continue;
            }
            let first = &hops[callee[o] as usize];
            // An attempt reaches the callee's service, never the caller itself (apps
            // that copy B3 verbatim without a tracer send one span id along the chain).
            let same_service = ih.service == first.service
                || (!oh.dest_service.is_empty()
                    && (ih.service == oh.dest_service || ih.authority_service == oh.dest_service));
            let callers_own = ih.pod == oh.pod && ih.workload == oh.workload;
            let same_call = same_service
                && !callers_own
                && if oh.upstream_span_id != 0 && ih.span_id != 0 {
                    oh.upstream_span_id == ih.span_id
                } else {
                    ih.request_id.is_some()
                        && ih.request_id == oh.request_id
                        && ih.request_id == first.request_id
                };
            let within =
                ih.start_us + slack_us >= oh.start_us && ih.start_us <= oh.end_us() + slack_us;
            if !same_call || !within {
                continue;
            }
            if best.is_none_or(|b| oh.start_us > b.0) {
                best = Some((oh.start_us, o as u32));
            }
        }
        if let Some((_, o)) = best {
            caller[i] = o;
            let current = callee[o as usize] as usize;
            if hops[i].start_us > hops[current].start_us {
                callee[o as usize] = i as u32;
            }
        }
    }
}

/// For each outbound hop, the inbound hop of the same pod (same trace) it was made while
/// serving.
fn parents(hops: &[CHop], callee: &[u32], slack_us: u64) -> Vec<u32> {
    let n = hops.len();
    let mut parent = vec![NONE; n];
    let ins: Vec<u32> = (0..n as u32)
        .filter(|&i| hops[i as usize].is_inbound())
        .collect();
    for o in 0..n {
        let oh = &hops[o];
        if !oh.is_outbound() {
            continue;
        }
        let mut best: Option<(bool, u64, u32)> = None;
        for &i in &ins {
            if callee[o] == i {
                continue;
            }
            let ih = &hops[i as usize];
            if ih.pod != oh.pod || ih.workload != oh.workload || ih.namespace != oh.namespace {
                continue;
            }
            let strong = oh.span_id != 0
                && ih.span_id != 0
                && (oh.span_id == ih.span_id || oh.parent_span_id == ih.span_id);
            let contain =
                ih.start_us <= oh.start_us + slack_us && oh.start_us <= ih.end_us() + slack_us;
            if !strong && !contain {
                continue;
            }
            if best.is_none_or(|b| (b.0, b.1) < (strong, ih.start_us)) {
                best = Some((strong, ih.start_us, i));
            }
        }
        if let Some((_, _, i)) = best {
            parent[o] = i;
        }
    }
    parent
}

/// Builds the call tree of a trace.
pub fn build_tree(hops: &[CHop], slack_us: u64) -> (Vec<Node>, Vec<u32>, Vec<u32>, Vec<u32>) {
    let (callee, caller) = join(hops, slack_us);
    let parent_in = parents(hops, &callee, slack_us);
    let n = hops.len();
    let mut nodes: Vec<Node> = Vec::new();
    let mut node_of_in = vec![NONE; n];
    let mut node_of_out = vec![NONE; n];
    for (h, hop) in hops.iter().enumerate() {
        if hop.is_outbound() {
            let inb = (callee[h] != NONE).then_some(callee[h]);
            let id = nodes.len() as u32;
            nodes.push(Node {
                out: Some(h as u32),
                inb,
                ..Default::default()
            });
            node_of_out[h] = id;
            if let Some(i) = inb {
                node_of_in[i as usize] = id;
            }
        }
    }
    for (h, hop) in hops.iter().enumerate() {
        if hop.is_inbound() && caller[h] == NONE {
            let id = nodes.len() as u32;
            nodes.push(Node {
                inb: Some(h as u32),
                ..Default::default()
            });
            node_of_in[h] = id;
        }
    }
    // Earlier retry attempts belong to their call's node (what their apps called while
    // serving them too).
    for (h, hop) in hops.iter().enumerate() {
        let c = caller[h];
        if hop.is_inbound() && c != NONE && callee[c as usize] != h as u32 {
            let id = node_of_out[c as usize];
            if id != NONE {
                nodes[id as usize].attempts.push(h as u32);
                node_of_in[h] = id;
            }
        }
    }
    for node in nodes.iter_mut() {
        node.attempts.sort_by_key(|&h| hops[h as usize].start_us);
    }
    let mut parent_node = vec![NONE; nodes.len()];
    for (id, node) in nodes.iter().enumerate() {
        if let Some(o) = node.out {
            let p = parent_in[o as usize];
            if p != NONE && node_of_in[p as usize] != NONE && node_of_in[p as usize] != id as u32 {
                parent_node[id] = node_of_in[p as usize];
            }
        }
    }
    // Break cycles (possible with clock slack): walk up from each node.
    // A walk longer than the node count is a cycle: cut it at the node where it started.
    for id in 0..nodes.len() {
        let mut cur = id as u32;
        let mut steps = 0;
        while parent_node[cur as usize] != NONE {
            cur = parent_node[cur as usize];
            steps += 1;
            if cur == id as u32 || steps > nodes.len() {
                parent_node[id] = NONE;
                break;
            }
        }
    }
    let start = |node: &Node| {
        node.out
            .or(node.inb)
            .map(|h| hops[h as usize].start_us)
            .unwrap_or(0)
    };
    let mut roots = Vec::new();
    for (id, &p) in parent_node.iter().enumerate() {
        if p == NONE {
            roots.push(id as u32);
        } else {
            nodes[p as usize].children.push(id as u32);
        }
    }
    let starts: Vec<u64> = nodes.iter().map(start).collect();
    for node in nodes.iter_mut() {
        node.children.sort_by_key(|&c| starts[c as usize]);
    }
    roots.sort_by_key(|&c| starts[c as usize]);
    (nodes, roots, parent_in, caller)
}

const DC: u64 = 1 << 14;

/// Joins and analyses one trace group.
pub fn analyse(hops: &[CHop], key: u128, cx: &Ctx) -> Analysis {
    let (mut nodes, roots, parent_in, caller) = build_tree(hops, cx.slack_us);
    let it = cx.it;
    let r = |s: Sym| it.resolve(s).to_string();
    let mut out: Vec<(u32, Finding)> = Vec::new();
    let seen_ms = |h: &CHop| {
        if h.start_us > 0 {
            h.start_us / 1000
        } else {
            cx.now_ms
        }
    };
    let dest = |o: &CHop| {
        if !o.dest_service.is_empty() {
            r(o.dest_service)
        } else if !o.upstream_cluster.is_empty() {
            r(o.upstream_cluster)
        } else {
            r(o.authority)
        }
    };
    let caller_wl = |i: u32| {
        let c = caller[i as usize];
        if c == NONE {
            String::new()
        } else {
            r(hops[c as usize].workload)
        }
    };
    let mk = |kind: BreakKind,
              h: &CHop,
              peer: String,
              flags: Vec<String>,
              summary: String,
              hint: String| Finding {
        kind,
        severity: severity_of(kind),
        workload: r(h.workload),
        namespace: r(h.namespace),
        peer,
        flags,
        summary,
        hint,
        seen_ms: seen_ms(h),
    };

    // Calls no sidecar saw as HTTP (TCP-named ports), revealed by the callee's own calls.
    // Computed cut short too (it is cheap: a scan per unparented outbound hop), only to
    // tell whether a full analysis would report one.
    let mut hidden = {
        let mut callee_of = vec![None; hops.len()];
        for n in &nodes {
            if let (Some(o), Some(i)) = (n.out, n.inb) {
                callee_of[o as usize] = Some(i as usize);
            }
        }
        crate::hidden_hop::hidden_calls(
            hops,
            |o| parent_in[o] != NONE,
            |o| callee_of[o],
            cx.slack_us,
        )
    };
    let mut withheld = false;
    if cx.partial && !hidden.is_empty() {
        withheld = true;
        hidden.clear();
    }
    for (nid, node) in nodes.iter().enumerate() {
        let nid = nid as u32;
        // --- outbound hop checks: tag chain, trace chain, missing callee ---
        if let Some(o) = node.out {
            let oh = &hops[o as usize];
            let peer = dest(oh);
            let tctx = oh.trace_context();
            let lost_trace = matches!(tctx, TraceContext::New | TraceContext::Missing);
            // The request this call was made while serving: same trace first, else (trace
            // lost) the pod's overlapping inbound request in another trace.
            let in_trace = parent_in[o as usize];
            let cross = if in_trace == NONE && lost_trace {
                cx.pods.find(oh, key, cx.slack_us)
            } else {
                None
            };
            let received: Sym = if in_trace != NONE {
                hops[in_trace as usize].inbound_tag()
            } else {
                cross.map(|e| e.tag).unwrap_or_default()
            };
            // Without a tracer (Istio's default) x-request-id is the only context: an app
            // that served a request and called on with a new one dropped it.
            let lost_request_id = lost_trace
                && !oh.has_trace_id
                && cross.is_some_and(|e| !e.traced && e.req != 0 && e.req != req_hash(oh));
            if lost_request_id {
                out.push((
                    nid,
                    mk(
                        BreakKind::TraceNotPropagated,
                        oh,
                        peer.clone(),
                        vec![],
                        format!(
                            "{} served a request but called {} with a new x-request-id (no tracer: x-request-id is the only context): the chain broke here",
                            r(oh.workload),
                            peer
                        ),
                        format!(
                            "Make the app of {} copy x-request-id (and any trace headers) from the request it serves onto its outgoing calls: hopwatch restores the tag through it.",
                            r(oh.workload)
                        ),
                    ),
                ));
            }
            if lost_trace && cross.is_some_and(|e| e.traced) {
                let missing = oh.missing_header_names();
                let what = if missing.is_empty() {
                    "a new trace context".to_string()
                } else {
                    format!("missing {}", missing.join(", "))
                };
                out.push((
                        nid,
                        mk(
                            BreakKind::TraceNotPropagated,
                            oh,
                            peer.clone(),
                            vec![],
                            format!(
                                "{} served a traced request but called {} with {} ({}): the trace broke here",
                                r(oh.workload),
                                peer,
                                what,
                                if tctx == TraceContext::New { "new trace" } else { "no trace headers" }
                            ),
                            format!(
                                "Make the app of {} copy the trace headers (x-request-id, x-b3-*/b3, traceparent/tracestate) from the request it serves onto its outgoing calls (or use an OpenTelemetry/B3 propagator).",
                                r(oh.workload)
                            ),
                        ),
                    ));
            }
            let reference = if !oh.correlated_tag.is_empty() {
                oh.correlated_tag
            } else {
                received
            };
            // A request a filter before hopwatch answered (a fault abort) went nowhere:
            // the filter neither restored nor stamped its tag.
            let tag_source = if oh.answered_before_filter() {
                TagSource::Unspecified
            } else {
                oh.tag_source()
            };
            match tag_source {
                src if crate::other_ids::restored_through(src).is_some() => out.push((
                    nid,
                    mk(
                        BreakKind::TagNotPropagated,
                        oh,
                        peer.clone(),
                        vec![],
                        format!(
                            "{} called {} without the tag {:?}; hopwatch restored it from {} the app did copy",
                            r(oh.workload),
                            peer,
                            it.resolve(oh.tag_sent),
                            crate::other_ids::restored_through(src).unwrap_or_default()
                        ),
                        format!(
                            "The chain held, but fix the app of {}: copy the {} header from the request it serves onto its outgoing calls.",
                            r(oh.workload),
                            "virtual-env tag"
                        ),
                    ),
                )),
                src if crate::other_ids::carried_by_request(src)
                    && !reference.is_empty()
                    && oh.tag_sent != reference =>
                {
                    out.push((
                    nid,
                    mk(
                        BreakKind::TagChanged,
                        oh,
                        peer.clone(),
                        vec![],
                        format!(
                            "{} received tag {:?} but called {} with tag {:?}",
                            r(oh.workload),
                            it.resolve(reference),
                            peer,
                            it.resolve(oh.tag_sent)
                        ),
                        format!(
                            "Check where the app of {} sets the tag header on outgoing calls: it must forward the received tag unchanged.",
                            r(oh.workload)
                        ),
                    ),
                    ));
                }
                TagSource::Environment | TagSource::None | TagSource::Unspecified
                    if !reference.is_empty()
                        && oh.tag_sent != reference
                        && !oh.answered_before_filter() =>
                {
                    let left = if oh.tag_sent.is_empty() {
                        "no tag".to_string()
                    } else {
                        format!("its own tag {:?}", it.resolve(oh.tag_sent))
                    };
                    out.push((
                        nid,
                        mk(
                            BreakKind::TagDropped,
                            oh,
                            peer.clone(),
                            vec![],
                            format!(
                                "{} received tag {:?} but its call to {} left with {}",
                                r(oh.workload),
                                it.resolve(reference),
                                peer,
                                left
                            ),
                            if lost_trace {
                                format!(
                                    "The app of {} dropped both the tag and the trace headers, so hopwatch could not restore the tag: make it copy x-virtual-env and the trace headers onto outgoing calls.",
                                    r(oh.workload)
                                )
                            } else {
                                format!(
                                    "Make the app of {} copy the tag header onto outgoing calls; check that the hopwatch outbound filter runs on it (WasmPlugin selector, vm_id shared with the inbound filter).",
                                    r(oh.workload)
                                )
                            },
                        ),
                    ));
                }
                _ => {}
            }
            // HOP_MISSING: answered by an upstream, but no inbound hop from the callee.
            // Never for a refused request: the refusing sidecar answered it (a policy
            // denial reported by the callee joins as its inbound hop; one made by the
            // caller's own sidecar never left it).
            let missing = node.inb.is_none()
                && !oh.answered_before_filter()
                && policy_denied::denial(oh, it).is_none()
                && oh.sampled_report()
                // A trace id, or (a mesh without a tracer) the request id: the callee's
                // sidecar would have reported the same one, so its hop would be here. Not
                // when this sidecar's tracer sent a span of a trace it started itself (the
                // app sent none): the callee's hop is in that other trace.
                && (oh.has_trace_id || (oh.request_id.is_some() && oh.upstream_span_id == 0))
                && oh.response_code != 0
                && oh.response_flags == 0
                && !oh.upstream_host.is_empty()
                && oh.bits & BIT_DEST_EXTERNAL == 0;
            // Cut short the callee's hop may still come: withheld (see
            // `Analysis::withheld`), the re-check reports it if it never came.
            withheld |= missing && cx.partial;
            if missing
                && !cx.partial
                && (oh.bits & BIT_DEST_IN_MESH != 0
                    || cx.registry.knows(oh.dest_namespace, oh.dest_service))
            {
                out.push((
                    nid,
                    mk(
                        BreakKind::HopMissing,
                        oh,
                        peer.clone(),
                        vec![],
                        format!(
                            "{} called {} ({}), which answered {} but never reported the inbound hop",
                            r(oh.workload),
                            peer,
                            r(oh.upstream_host),
                            oh.response_code
                        ),
                        format!(
                            "Check that the pods of {peer} have an injected sidecar with the hopwatch inbound filter, and that the Service port is named with its protocol (http-*, grpc-*): an unnamed port is treated as TCP."
                        ),
                    ),
                ));
            }
        }
        if let Some(o) = node.out {
            for call in hidden.iter().filter(|c| c.callee_outbound == o) {
                let caller = &hops[call.caller_inbound as usize];
                let callee = &hops[o as usize];
                let (summary, hint) = crate::hidden_hop::describe(
                    &r(caller.workload),
                    &r(callee.workload),
                    &dest(callee),
                );
                out.push((
                    nid,
                    mk(
                        BreakKind::HopMissing,
                        caller,
                        r(callee.workload),
                        vec![],
                        summary,
                        hint,
                    ),
                ));
            }
        }
        // --- inbound hop: misrouting ---
        if let Some(i) = node.inb {
            let ih = &hops[i as usize];
            let tag = if !ih.tag_malformed() {
                ih.tag_received
            } else {
                Sym::EMPTY
            };
            if !tag.is_empty() && !ih.service.is_empty() {
                let t = it.resolve(tag);
                let mine = match_level(it.resolve(ih.own_tag), t);
                if let Some((better, lvl)) =
                    cx.registry
                        .best(ih.namespace, ih.service, t, ih.start_us, cx)
                {
                    if lvl > mine {
                        let served = if ih.own_tag.is_empty() {
                            "the default instance (no tag)".to_string()
                        } else {
                            format!("environment {:?}", it.resolve(ih.own_tag))
                        };
                        let exists = if better.is_empty() {
                            "a default instance".to_string()
                        } else {
                            format!("an instance with environment {:?}", it.resolve(better))
                        };
                        out.push((
                            nid,
                            mk(
                                BreakKind::TagMisrouted,
                                ih,
                                caller_wl(i),
                                vec![],
                                format!(
                                    "A request tagged {:?} for {} was served by {} ({}) although {} exists",
                                    t,
                                    r(ih.service),
                                    r(ih.workload),
                                    served,
                                    exists
                                ),
                                format!(
                                    "Check the VirtualService and DestinationRule of {}: a subset for virtual-env={} with a header match on the tag, labels matching the pods, and a Service port named http-*/grpc-*.",
                                    r(ih.service),
                                    if better.is_empty() { t } else { it.resolve(better) }
                                ),
                            ),
                        ));
                    }
                }
            }
        }
    }

    // --- UPSTREAM_FAILURE: the deepest failing hop is the origin ---
    // A policy refusal's flags (FI, RL, UAEX) are POLICY_DENIED's, not a failure of the
    // mesh.
    let flags_of = |h: u32| {
        let hh = &hops[h as usize];
        if policy_denied::denial(hh, it).is_some() {
            0
        } else {
            hh.response_flags
        }
    };
    let sig = |h: Option<u32>| h.map(|h| flags_of(h) & !DC).unwrap_or(0);
    let all = |h: Option<u32>| h.map(flags_of).unwrap_or(0);
    let mut sub_sig = vec![false; nodes.len()];
    let order = postorder(&nodes, &roots);
    for &id in &order {
        let node = &nodes[id as usize];
        let own = sig(node.out) != 0 || sig(node.inb) != 0;
        sub_sig[id as usize] = own || node.children.iter().any(|&c| sub_sig[c as usize]);
    }
    for &id in &order {
        let node = &nodes[id as usize];
        if node.children.iter().any(|&c| sub_sig[c as usize]) {
            continue; // a deeper hop failed: this one is a consequence
        }
        let at = if sig(node.inb) != 0 {
            node.inb
        } else if sig(node.out) != 0 {
            node.out
        } else if all(node.inb) != 0 && all(node.out) == 0 {
            node.inb
        } else if all(node.out) != 0 {
            node.out
        } else {
            None
        };
        let Some(h) = at else { continue };
        let hh = &hops[h as usize];
        let names = flag_names(hh.response_flags);
        let peer = if hh.is_outbound() {
            dest(hh)
        } else {
            r(hh.service)
        };
        // HTTP status, or for gRPC the code (Envoy's own gRPC failures are HTTP 200).
        let code = crate::grpc::describe_response(hh, it.resolve(hh.grpc_message));
        let details = if hh.code_details.is_empty() {
            String::new()
        } else {
            format!(" ({})", r(hh.code_details))
        };
        let what = if hh.is_outbound() {
            format!(
                "The sidecar of {} failed the call to {} itself: {} {}{}",
                r(hh.workload),
                peer,
                code,
                names.join(","),
                details
            )
        } else {
            format!(
                "The inbound sidecar of {} failed to pass the request to its app: {} {}{}",
                r(hh.workload),
                code,
                names.join(","),
                details
            )
        };
        let hint_peer = if hh.is_outbound() {
            peer.as_str()
        } else {
            it.resolve(hh.workload)
        };
        let mut hint = flag_hint(&names, hint_peer);
        if let Some(g) = hh
            .grpc()
            .and_then(|g| crate::grpc::code_hint(g, &names, hint_peer))
        {
            hint = format!("{g}; {hint}");
        }
        let mut f = mk(
            BreakKind::UpstreamFailure,
            hh,
            peer.clone(),
            names.clone(),
            what,
            hint,
        );
        if !node.attempts.is_empty() && hh.is_inbound() {
            // A retried call: say how often it was tried and what the caller got.
            let caller_flags = node
                .out
                .map(|o| flag_names(hops[o as usize].response_flags).join(","))
                .filter(|f| !f.is_empty())
                .map(|f| format!(" {f}"))
                .unwrap_or_default();
            let caller_code = node
                .out
                .map(|o| hops[o as usize].response_code)
                .unwrap_or(0);
            f.summary.push_str(&format!(
                " ({} attempts; the caller's sidecar retried and answered {caller_code}{caller_flags})",
                node.attempts.len() + 1
            ));
        }
        if hh.response_flags == DC {
            // Only "downstream closed": the client gave up (often a cancel), not a failure
            // of the mesh itself.
            f.severity = Severity::Warning;
        }
        out.push((id, f));
    }

    // --- POLICY_DENIED and APP_ERROR: their own modules ---
    out.extend(policy_denied::detect(
        hops, &nodes, &caller, it, &dest, &seen_ms,
    ));
    out.extend(app_error::detect(
        hops, &nodes, &roots, &caller, it, &seen_ms,
    ));

    // --- TRACE_MALFORMED: the first hop of each path where it appeared ---
    let bad = |h: Option<u32>| {
        h.is_some_and(|h| {
            matches!(
                hops[h as usize].trace_context(),
                TraceContext::Malformed | TraceContext::Inconsistent | TraceContext::Partial
            )
        })
    };
    let mut stack: Vec<(u32, bool)> = roots.iter().rev().map(|&r| (r, false)).collect();
    while let Some((id, above)) = stack.pop() {
        let node = &nodes[id as usize];
        let mut above = above;
        for h in [node.out, node.inb] {
            if !above && bad(h) {
                let h = h.unwrap_or_default();
                let hh = &hops[h as usize];
                let peer = if hh.is_outbound() {
                    dest(hh)
                } else {
                    caller_wl(h)
                };
                let ctx = format!("{:?}", hh.trace_context()).to_uppercase();
                let origin = if hh.is_outbound() {
                    format!("the app of {} sent them to {}", r(hh.workload), peer)
                } else if peer.is_empty() {
                    format!("they arrived at {} from outside the mesh", r(hh.workload))
                } else {
                    format!("they arrived at {} from {}", r(hh.workload), peer)
                };
                out.push((
                    id,
                    mk(
                        BreakKind::TraceMalformed,
                        hh,
                        peer,
                        vec![],
                        format!(
                            "{} trace headers ({}): {}",
                            ctx,
                            if hh.trace_detail.is_empty() { "no detail".to_string() } else { r(hh.trace_detail) },
                            origin
                        ),
                        "Check the tracing library / header propagation of that app: B3 ids are 16 or 32 lowercase hex digits, not all zero; `b3` and `x-b3-*` (and traceparent) must agree; send x-b3-traceid and x-b3-spanid together.".to_string(),
                    ),
                ));
                above = true;
            }
        }
        for &c in node.children.iter().rev() {
            stack.push((c, above));
        }
    }

    // Dedup within the trace (a break counts once per trace), mark the nodes.
    let mut findings: Vec<Finding> = Vec::new();
    for (nid, f) in out {
        if !nodes[nid as usize].breaks.contains(&f.kind) {
            nodes[nid as usize].breaks.push(f.kind);
        }
        if let Some(e) = findings.iter_mut().find(|e| {
            e.kind == f.kind
                && e.namespace == f.namespace
                && e.workload == f.workload
                && e.peer == f.peer
        }) {
            for fl in f.flags {
                if !e.flags.contains(&fl) {
                    e.flags.push(fl);
                }
            }
            e.seen_ms = e.seen_ms.max(f.seen_ms);
        } else {
            findings.push(f);
        }
    }
    Analysis {
        nodes,
        roots,
        findings,
        withheld,
    }
}

fn postorder(nodes: &[Node], roots: &[u32]) -> Vec<u32> {
    let mut order = Vec::with_capacity(nodes.len());
    let mut stack: Vec<(u32, bool)> = roots.iter().map(|&r| (r, false)).collect();
    while let Some((id, done)) = stack.pop() {
        if done {
            order.push(id);
            continue;
        }
        stack.push((id, true));
        for &c in &nodes[id as usize].children {
            stack.push((c, false));
        }
    }
    order
}

/// An actionable hint for a set of Envoy response flags.
pub fn flag_hint(flags: &[String], peer: &str) -> String {
    let has = |f: &str| flags.iter().any(|x| x == f);
    let mut hints: Vec<String> = Vec::new();
    if has("UH") {
        hints.push(format!("UH (no healthy upstream): {peer} has no ready endpoint in the selected subset; check that the DestinationRule subset labels (version, virtual-env) match running pods and their readiness probes"));
    }
    if has("NR") {
        hints.push(format!("NR (no route): the VirtualService for {peer} refers to a subset or host with no route; apply the DestinationRule (subsets) before the VirtualService (make before break) and check the host names"));
    }
    if has("UF") {
        hints.push(format!("UF (upstream connection failure): check that {peer} listens on the target port on 0.0.0.0 (not only the pod IP) and that the sidecar starts before the app (holdApplicationUntilProxyStarts)"));
    }
    if has("UC") {
        hints.push(format!("UC (upstream connection termination): often an mTLS mismatch; check the DestinationRule tls settings for {peer} against the PeerAuthentication mode"));
    }
    if has("UO") {
        hints.push(format!("UO (circuit breaker overflow): raise the DestinationRule connectionPool limits for {peer} or reduce load"));
    }
    if has("URX") {
        hints.push(format!("URX (retries exhausted): every retry to {peer} failed; look at {peer}'s errors and the VirtualService retry policy"));
    }
    if has("UT") {
        hints.push(format!("UT (upstream timeout): {peer} did not answer within the route timeout; check its latency and the VirtualService timeout"));
    }
    if has("DC") {
        hints.push(
            "DC (downstream closed): the caller gave up first; check the caller's client timeout"
                .to_string(),
        );
    }
    if has("RL") || has("RLSE") {
        hints.push(
            "RL (rate limited): the request was refused by a local or global rate limit"
                .to_string(),
        );
    }
    if has("UAEX") {
        hints.push("UAEX (ext_authz denied): the external authorization service refused the request; check the AuthorizationPolicy / ext_authz provider".to_string());
    }
    if has("LR") {
        hints.push("LR (connection local reset): the sidecar reset the connection; check idle timeouts and the sidecar's logs".to_string());
    }
    if has("UR") {
        hints.push(format!("UR (upstream remote reset): {peer} reset the connection; check its logs and protocol (port naming http-*/grpc-*)"));
    }
    if has("NC") {
        hints.push(format!("NC (no cluster): no Envoy cluster for {peer}; check the host name, ServiceEntry and Sidecar egress scope, and that every subset a VirtualService routes to is defined in a DestinationRule (apply subsets before routes: make before break)"));
    }
    if has("DPE") || has("UPE") {
        hints.push("DPE/UPE (protocol error): the protocol does not match the port's declared protocol; check the Service port name (http-*, http2-*, grpc-*)".to_string());
    }
    if has("LH") {
        hints.push(
            "LH (local health check failed): the upstream host failed its health check".to_string(),
        );
    }
    if has("FI") || has("DI") {
        hints.push(
            "FI/DI (fault injection): a VirtualService fault injection is active".to_string(),
        );
    }
    if has("UMSDR") || has("SI") || has("DT") {
        hints.push(
            "A stream/duration timeout fired (UMSDR/SI/DT): check the route and stream timeouts"
                .to_string(),
        );
    }
    if hints.is_empty() {
        format!(
            "Envoy response flags {}: see Envoy's access log response flags documentation",
            flags.join(",")
        )
    } else {
        hints.join("; ")
    }
}

/// True when `f` contains the Envoy flag `name`.
pub fn has_flag(f: u64, name: &str) -> bool {
    flag_bit(name).is_some_and(|b| f & b != 0)
}
