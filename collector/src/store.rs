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

/// In-memory index of findings: by id, ordered by last seen, with secondary indexes by
/// kind, workload and namespace so that a filtered ListBreaks walks only the smallest
/// candidate set (p99 well under 10 ms with 100,000 findings).
#[derive(Default)]
pub struct FindingStore {
    by_id: FxHashMap<u64, Break>,
    order: BTreeSet<Key>,
    by_kind: FxHashMap<i32, BTreeSet<Key>>,
    by_workload: FxHashMap<String, BTreeSet<Key>>,
    by_namespace: FxHashMap<String, BTreeSet<Key>>,
    dirty: FxHashSet<u64>,
    removed: FxHashSet<String>,
}

fn index_remove(map: &mut FxHashMap<String, BTreeSet<Key>>, name: &str, k: &Key) {
    if let Some(set) = map.get_mut(name) {
        set.remove(k);
        if set.is_empty() {
            map.remove(name);
        }
    }
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
        index_remove(&mut self.by_workload, &old.workload, &k);
        index_remove(&mut self.by_namespace, &old.namespace, &k);
        Some(old)
    }
    /// Inserts a stored finding as is (loading the database).
    pub(crate) fn insert_raw(&mut self, b: Break) {
        let n = num_id(&b.id);
        self.unindex(n);
        let k = (b.last_seen_unix_ms, n);
        self.order.insert(k);
        self.by_kind.entry(b.kind).or_default().insert(k);
        self.by_workload
            .entry(b.workload.clone())
            .or_default()
            .insert(k);
        self.by_namespace
            .entry(b.namespace.clone())
            .or_default()
            .insert(k);
        self.by_id.insert(n, b);
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
                self.removed.insert(b.id);
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
