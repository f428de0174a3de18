//! Findings: the deduplicated in-memory index that serves queries. Its persistence (the
//! redb database, the WAL) is in [`crate::persist`].

use std::collections::BTreeSet;

use hopwatch_proto::v1::{Break, BreakKind};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::analysis::Finding;
use crate::model::hash64;

/// Sample trace ids kept per finding.
pub const MAX_SAMPLE_TRACES: usize = 10;

// The database moved to `persist.rs`; re-exported for the existing paths.
pub use crate::persist::{Db, StoreError};

/// The stable id of a finding: kind + namespace + workload + peer.
pub fn finding_id(kind: BreakKind, namespace: &str, workload: &str, peer: &str) -> String {
    let key = format!("{}|{}|{}|{}", kind.as_str_name(), namespace, workload, peer);
    format!("{:016x}", hash64(key.as_bytes(), 0x686f_7077))
}

/// Filters of ListBreaks / WatchBreaks.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub kind: Option<BreakKind>,
    pub workload: Option<String>,
    pub namespace: Option<String>,
    /// Only findings last seen at or after this (ms since the epoch).
    pub since_ms: Option<u64>,
}

impl Filter {
    pub fn matches(&self, b: &Break) -> bool {
        self.kind.is_none_or(|k| b.kind == k as i32)
            && self.workload.as_deref().is_none_or(|w| b.workload == w)
            && self.namespace.as_deref().is_none_or(|n| b.namespace == n)
            && self.since_ms.is_none_or(|s| b.last_seen_unix_ms >= s)
    }
}

type Key = (u64, u64); // (last seen ms, numeric id)

fn num_id(id: &str) -> u64 {
    u64::from_str_radix(id, 16).unwrap_or_else(|_| hash64(id.as_bytes(), 5))
}

/// Bounds of the in-memory findings, applied as findings arrive (and at load).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FindingLimits {
    /// At most this many findings (the least recently seen go first).
    pub max_count: usize,
    /// At most this many accounted bytes (see [`break_bytes`]).
    pub max_bytes: usize,
    /// One (namespace, workload) holds at most this many: over it, its own least
    /// recently seen findings go, never another workload's.
    pub per_workload: usize,
    /// One namespace holds at most this many: over it, the namespace's own least
    /// recently seen findings go.
    pub per_namespace: usize,
}

impl Default for FindingLimits {
    fn default() -> Self {
        FindingLimits {
            max_count: usize::MAX,
            max_bytes: usize::MAX,
            per_workload: usize::MAX,
            per_namespace: usize::MAX,
        }
    }
}

/// Why findings left the store (besides age).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Evictions {
    /// Over `max_count` or `max_bytes`.
    pub budget: u64,
    /// Over a workload's share.
    pub workload_share: u64,
    /// Over a namespace's share.
    pub namespace_share: u64,
}

/// Accounted bytes of one stored finding: the `Break` and its strings, its slot in the
/// id map, its entries in the four ordered indexes (B-tree keys of 16 bytes at ~2/3
/// node fill) and its series in `hopwatch_breaks_total` (a label set of five strings
/// and a counter, ~200 bytes besides the strings), plus [`FINDING_SLACK`].
pub fn break_bytes(b: &Break) -> usize {
    use crate::budget::{map_slot, str_heap};
    let strings = [
        &b.id,
        &b.workload,
        &b.namespace,
        &b.peer,
        &b.summary,
        &b.hint,
    ]
    .iter()
    .map(|s| str_heap(s.len()))
    .sum::<usize>()
        + b.trace_ids
            .iter()
            .chain(&b.flags)
            .map(|s| 24 + str_heap(s.len()))
            .sum::<usize>()
        + 2 * 16;
    let metric = 200
        + str_heap(b.namespace.len())
        + str_heap(b.workload.len())
        + str_heap(b.peer.len())
        + 32;
    map_slot(8 + std::mem::size_of::<Break>()) + strings + 5 * 24 + metric + FINDING_SLACK
}

/// What the parts above miss, measured: with 75,000 findings (no eviction) the probe's
/// RSS grows ~2.3 KB per finding against ~1.45 KB counted by parts: the hash tables'
/// spare capacity between resizes (the id map's and the metric family's), B-tree
/// inner nodes, allocator rounding, the watch channel's copies.
pub const FINDING_SLACK: usize = 850;

/// Bytes of a secondary index's set for one name (map slot, key, a B-tree leaf).
fn set_bytes(name_len: usize) -> usize {
    crate::budget::map_slot(24 + 24) + crate::budget::str_heap(name_len) + 200
}

/// In-memory index of findings: by id, ordered by last seen, with secondary indexes by
/// kind, workload and namespace so that a filtered ListBreaks walks only the smallest
/// candidate set (p99 well under 10 ms with 100,000 findings). Bounded by count, bytes
/// and per-workload / per-namespace shares ([`FindingLimits`]) as findings arrive.
#[derive(Default)]
pub struct FindingStore {
    by_id: FxHashMap<u64, Break>,
    order: BTreeSet<Key>,
    by_kind: FxHashMap<i32, BTreeSet<Key>>,
    by_workload: FxHashMap<String, BTreeSet<Key>>,
    by_namespace: FxHashMap<String, BTreeSet<Key>>,
    /// (namespace, workload): the per-workload share.
    by_owner: FxHashMap<(String, String), BTreeSet<Key>>,
    dirty: FxHashSet<u64>,
    removed: FxHashSet<String>,
    limits: FindingLimits,
    bytes: usize,
    pub evictions: Evictions,
    /// Findings removed (by any bound or by age) since the last [`FindingStore::take_evicted`]
    /// (the service drops their `hopwatch_breaks_total` series).
    evicted: Vec<Break>,
}

/// Adds `k` to the set of `name`; returns the bytes a new set took.
fn index_add<N: std::hash::Hash + Eq>(
    map: &mut FxHashMap<N, BTreeSet<Key>>,
    name: N,
    name_len: usize,
    k: Key,
) -> usize {
    let mut grown = 0;
    map.entry(name)
        .or_insert_with(|| {
            grown = set_bytes(name_len);
            BTreeSet::new()
        })
        .insert(k);
    grown
}

/// Removes `k` from the set of `name`; returns the bytes a dropped set freed.
fn index_remove<N, Q>(
    map: &mut FxHashMap<N, BTreeSet<Key>>,
    name: &Q,
    name_len: usize,
    k: &Key,
) -> usize
where
    N: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ?Sized,
{
    if let Some(set) = map.get_mut(name) {
        set.remove(k);
        if set.is_empty() {
            map.remove(name);
            return set_bytes(name_len);
        }
    }
    0
}

impl FindingStore {
    pub fn len(&self) -> usize {
        self.by_id.len()
    }
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
    pub fn get(&self, id: &str) -> Option<&Break> {
        self.by_id.get(&num_id(id))
    }
    fn unindex(&mut self, n: u64) -> Option<Break> {
        let old = self.by_id.remove(&n)?;
        let k = (old.last_seen_unix_ms, n);
        self.order.remove(&k);
        if let Some(set) = self.by_kind.get_mut(&old.kind) {
            set.remove(&k);
        }
        let mut freed = break_bytes(&old);
        freed += index_remove(
            &mut self.by_workload,
            old.workload.as_str(),
            old.workload.len(),
            &k,
        );
        freed += index_remove(
            &mut self.by_namespace,
            old.namespace.as_str(),
            old.namespace.len(),
            &k,
        );
        let owner = (old.namespace.clone(), old.workload.clone());
        freed += index_remove(
            &mut self.by_owner,
            &owner,
            owner.0.len() + owner.1.len(),
            &k,
        );
        self.bytes -= freed;
        Some(old)
    }
    /// Inserts a stored finding as is (loading the database).
    pub(crate) fn insert_raw(&mut self, b: Break) {
        let n = num_id(&b.id);
        self.unindex(n);
        let k = (b.last_seen_unix_ms, n);
        self.order.insert(k);
        self.by_kind.entry(b.kind).or_default().insert(k);
        let mut grown = break_bytes(&b);
        grown += index_add(
            &mut self.by_workload,
            b.workload.clone(),
            b.workload.len(),
            k,
        );
        grown += index_add(
            &mut self.by_namespace,
            b.namespace.clone(),
            b.namespace.len(),
            k,
        );
        grown += index_add(
            &mut self.by_owner,
            (b.namespace.clone(), b.workload.clone()),
            b.namespace.len() + b.workload.len(),
            k,
        );
        self.bytes += grown;
        self.by_id.insert(n, b);
    }

    /// Accounted bytes (see [`break_bytes`]; plus the per-name index sets and the writes
    /// waiting for the database: ~80 bytes per removed id, ~16 per changed one).
    pub fn bytes(&self) -> usize {
        self.bytes + 80 * self.removed.len() + 16 * self.dirty.len()
    }
    pub fn limits(&self) -> FindingLimits {
        self.limits
    }
    /// Sets the bounds and applies them at once (after a load).
    pub fn set_limits(&mut self, limits: FindingLimits) {
        self.limits = limits;
        let owners: Vec<(String, String)> = self.by_owner.keys().cloned().collect();
        for (ns, wl) in owners {
            self.enforce(&ns, &wl);
        }
    }

    /// Removes the finding `n` for a bound: counted, queued for the database and the
    /// metrics.
    fn evict(&mut self, n: u64) {
        if let Some(b) = self.unindex(n) {
            self.dirty.remove(&n);
            self.removed.insert(b.id.clone());
            self.push_evicted(b);
        }
    }

    fn push_evicted(&mut self, b: Break) {
        // Nobody drains them when the store is used directly (tests): keep it bounded.
        if self.evicted.len() >= 100_000 {
            self.evicted.clear();
        }
        self.evicted.push(b);
    }

    /// The findings removed since the last call.
    pub fn take_evicted(&mut self) -> Vec<Break> {
        std::mem::take(&mut self.evicted)
    }

    /// Applies the bounds after a finding of (`namespace`, `workload`) changed: first the
    /// workload's share, then its namespace's, then the store's count and bytes.
    fn enforce(&mut self, namespace: &str, workload: &str) {
        let l = self.limits;
        loop {
            let owner = self
                .by_owner
                .get(&(namespace.to_string(), workload.to_string()))
                .filter(|s| s.len() > l.per_workload)
                .and_then(|s| s.first().copied());
            let Some((_, n)) = owner else { break };
            self.evictions.workload_share += 1;
            self.evict(n);
        }
        loop {
            let ns = self
                .by_namespace
                .get(namespace)
                .filter(|s| s.len() > l.per_namespace)
                .and_then(|s| s.first().copied());
            let Some((_, n)) = ns else { break };
            self.evictions.namespace_share += 1;
            self.evict(n);
        }
        while self.by_id.len() > l.max_count || self.bytes > l.max_bytes {
            let Some(&(_, n)) = self.order.first() else {
                break;
            };
            self.evictions.budget += 1;
            self.evict(n);
        }
    }

    /// Merges one occurrence of a break in `trace_id`; returns the updated finding.
    pub fn merge(&mut self, f: &Finding, trace_id: &str) -> Break {
        let id = finding_id(f.kind, &f.namespace, &f.workload, &f.peer);
        let n = num_id(&id);
        let b = match self.by_id.get(&n) {
            Some(old) => {
                let mut b = old.clone();
                b.count += 1;
                b.trace_ids.retain(|t| t != trace_id);
                b.trace_ids.insert(0, trace_id.to_string());
                b.trace_ids.truncate(MAX_SAMPLE_TRACES);
                for fl in &f.flags {
                    if !b.flags.contains(fl) {
                        b.flags.push(fl.clone());
                    }
                }
                b.summary = f.summary.clone();
                b.hint = f.hint.clone();
                b.severity = f.severity as i32;
                b.first_seen_unix_ms = b.first_seen_unix_ms.min(f.seen_ms);
                b.last_seen_unix_ms = b.last_seen_unix_ms.max(f.seen_ms);
                b
            }
            None => Break {
                id: id.clone(),
                kind: f.kind as i32,
                severity: f.severity as i32,
                workload: f.workload.clone(),
                namespace: f.namespace.clone(),
                peer: f.peer.clone(),
                count: 1,
                trace_ids: vec![trace_id.to_string()],
                flags: f.flags.clone(),
                summary: f.summary.clone(),
                hint: f.hint.clone(),
                first_seen_unix_ms: f.seen_ms,
                last_seen_unix_ms: f.seen_ms,
            },
        };
        self.insert_raw(b.clone());
        self.removed.remove(&id);
        self.dirty.insert(n);
        self.enforce(&f.namespace, &f.workload);
        b
    }

    /// Most recently seen first, at most `limit`.
    pub fn list(&self, filter: &Filter, limit: usize) -> Vec<Break> {
        static EMPTY: BTreeSet<Key> = BTreeSet::new();
        // The smallest candidate set among the filters given.
        let mut set = &self.order;
        if let Some(k) = filter.kind {
            let s = self.by_kind.get(&(k as i32)).unwrap_or(&EMPTY);
            if s.len() < set.len() {
                set = s;
            }
        }
        if let Some(w) = &filter.workload {
            let s = self.by_workload.get(w).unwrap_or(&EMPTY);
            if s.len() < set.len() {
                set = s;
            }
        }
        if let Some(ns) = &filter.namespace {
            let s = self.by_namespace.get(ns).unwrap_or(&EMPTY);
            if s.len() < set.len() {
                set = s;
            }
        }
        let mut out = Vec::with_capacity(limit.min(1024));
        for (seen, n) in set.iter().rev() {
            if filter.since_ms.is_some_and(|s| *seen < s) || out.len() >= limit {
                break;
            }
            if let Some(b) = self.by_id.get(n) {
                if filter.matches(b) {
                    out.push(b.clone());
                }
            }
        }
        out
    }

    pub fn all(&self) -> impl Iterator<Item = &Break> {
        self.by_id.values()
    }

    /// Drops findings last seen before `min_seen_ms`, then the oldest beyond `max_count`.
    /// Returns how many were removed.
    pub fn retain(&mut self, min_seen_ms: u64, max_count: usize) -> usize {
        let mut n = 0;
        while let Some(&(seen, id)) = self.order.first() {
            if seen >= min_seen_ms && self.order.len() <= max_count {
                break;
            }
            if let Some(b) = self.unindex(id) {
                self.removed.insert(b.id.clone());
                self.push_evicted(b);
            } else {
                self.order.pop_first();
            }
            self.dirty.remove(&id);
            n += 1;
        }
        n
    }

    /// Takes the pending writes: (changed findings, removed ids).
    pub fn take_dirty(&mut self) -> (Vec<Break>, Vec<String>) {
        self.take_dirty_max(usize::MAX)
    }

    /// Takes at most `max` pending writes of each sort (bounded write-lock hold time).
    pub fn take_dirty_max(&mut self, max: usize) -> (Vec<Break>, Vec<String>) {
        let ids: Vec<u64> = self.dirty.iter().take(max).copied().collect();
        let mut changed = Vec::with_capacity(ids.len());
        for n in ids {
            self.dirty.remove(&n);
            if let Some(b) = self.by_id.get(&n) {
                changed.push(b.clone());
            }
        }
        let rm: Vec<String> = self.removed.iter().take(max).cloned().collect();
        for id in &rm {
            self.removed.remove(id);
        }
        (changed, rm)
    }

    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty() || !self.removed.is_empty()
    }

    /// Puts writes back after a failed flush.
    pub fn restore_dirty(&mut self, changed: &[Break], removed: &[String]) {
        for b in changed {
            let n = num_id(&b.id);
            if self.by_id.contains_key(&n) {
                self.dirty.insert(n);
            }
        }
        for id in removed {
            if !self.by_id.contains_key(&num_id(id)) {
                self.removed.insert(id.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hopwatch_proto::v1::Severity;

    fn f(wl: &str, seen: u64) -> Finding {
        Finding {
            kind: BreakKind::HopMissing,
            severity: Severity::Error,
            workload: wl.into(),
            namespace: "ns".into(),
            peer: "p".into(),
            flags: vec![],
            summary: "s".into(),
            hint: "h".into(),
            seen_ms: seen,
        }
    }

    #[test]
    fn merge_dedups_and_bounds_samples() {
        let mut s = FindingStore::default();
        for i in 0..20u64 {
            s.merge(&f("a", 1000 + i), &format!("t{i}"));
        }
        assert_eq!(s.len(), 1);
        let b = s.list(&Filter::default(), 10).remove(0);
        assert_eq!(b.count, 20);
        assert_eq!(b.trace_ids.len(), MAX_SAMPLE_TRACES);
        assert_eq!(b.trace_ids[0], "t19");
        assert_eq!((b.first_seen_unix_ms, b.last_seen_unix_ms), (1000, 1019));
    }

    #[test]
    fn list_is_most_recent_first_with_since_and_limit() {
        let mut s = FindingStore::default();
        for i in 0..50u64 {
            s.merge(&f(&format!("w{i}"), i * 10), "t");
        }
        let l = s.list(&Filter::default(), 5);
        assert_eq!(
            l.iter().map(|b| b.workload.as_str()).collect::<Vec<_>>(),
            ["w49", "w48", "w47", "w46", "w45"]
        );
        let l = s.list(
            &Filter {
                since_ms: Some(455),
                ..Default::default()
            },
            100,
        );
        assert_eq!(l.len(), 4);
        let l = s.list(
            &Filter {
                workload: Some("w3".into()),
                ..Default::default()
            },
            100,
        );
        assert_eq!(l.len(), 1);
    }

    fn g(ns: &str, wl: &str, peer: &str, seen: u64) -> Finding {
        Finding {
            namespace: ns.into(),
            peer: peer.into(),
            ..f(wl, seen)
        }
    }

    #[test]
    fn shares_evict_the_offenders_own_findings_least_recently_seen_first() {
        let mut s = FindingStore::default();
        s.set_limits(FindingLimits {
            max_count: 1000,
            max_bytes: usize::MAX,
            per_workload: 10,
            per_namespace: 25,
        });
        s.merge(&g("a", "real", "p", 1), "t");
        for i in 0..100u64 {
            s.merge(&g("a", "loud", &format!("p{i}"), 10 + i), "t");
        }
        assert!(s
            .get(&finding_id(BreakKind::HopMissing, "a", "real", "p"))
            .is_some());
        let loud: Vec<_> = s
            .list(
                &Filter {
                    workload: Some("loud".into()),
                    ..Default::default()
                },
                100,
            )
            .into_iter()
            .map(|b| b.last_seen_unix_ms)
            .collect();
        assert_eq!(
            loud,
            (100..110).rev().collect::<Vec<_>>(),
            "its newest 10 kept"
        );
        assert_eq!(s.evictions.workload_share, 90);
        // A namespace over its share loses its own least recently seen.
        for w in 0..3 {
            for i in 0..10u64 {
                s.merge(
                    &g("a", &format!("w{w}"), &format!("p{i}"), 1000 + w * 10 + i),
                    "t",
                );
            }
        }
        s.merge(&g("b", "other", "p", 0), "t");
        assert_eq!(
            s.list(
                &Filter {
                    namespace: Some("a".into()),
                    ..Default::default()
                },
                100
            )
            .len(),
            25
        );
        assert!(s.evictions.namespace_share > 0);
        assert!(
            s.get(&finding_id(BreakKind::HopMissing, "b", "other", "p"))
                .is_some(),
            "another namespace is untouched, even its oldest"
        );
        // Every removed finding is reported once (for its metric series).
        let ev = s.take_evicted();
        let e = s.evictions;
        assert_eq!(
            ev.len() as u64,
            e.workload_share + e.namespace_share + e.budget
        );
    }

    #[test]
    fn accounted_bytes_follow_inserts_and_removals() {
        let mut s = FindingStore::default();
        assert_eq!(s.bytes(), 0);
        for i in 0..500u64 {
            s.merge(
                &g(
                    &format!("n{}", i % 7),
                    &format!("w{}", i % 13),
                    &format!("p{i}"),
                    i,
                ),
                "t",
            );
        }
        let full = s.bytes();
        assert!(full > 500 * 500, "{full}");
        s.set_limits(FindingLimits {
            max_bytes: full / 2,
            ..Default::default()
        });
        s.merge(&g("n0", "w0", "new", 10_000), "t");
        assert!(s.bytes() - 80 * s.removed.len() - 16 * s.dirty.len() <= full / 2);
        assert!(s.evictions.budget > 200);
        let _ = s.take_dirty();
        s.retain(u64::MAX, usize::MAX);
        let _ = s.take_dirty();
        assert_eq!(s.bytes(), 0, "back to 0");
        assert!(s.is_empty());
    }

    #[test]
    fn retain_by_age_then_count() {
        let mut s = FindingStore::default();
        for i in 0..10u64 {
            s.merge(&f(&format!("w{i}"), i), "t");
        }
        let _ = s.take_dirty();
        assert_eq!(s.retain(3, 100), 3);
        assert_eq!(s.retain(0, 4), 3);
        assert_eq!(s.len(), 4);
        let (changed, removed) = s.take_dirty();
        assert!(changed.is_empty());
        assert_eq!(removed.len(), 6);
    }
}
