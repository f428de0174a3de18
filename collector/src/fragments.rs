//! Which trace groups hold hops of one request: the link between the fragments of a trace
//! that broke apart. An app that copies `x-request-id` but not the trace headers starts a
//! new trace (or, with tracing off, a group keyed by the request id) on its calls; both
//! pieces carry the same request id. Fed from the raw hops at ingest, bounded in request
//! ids and in bytes (oldest request ids forgotten first).

use std::collections::VecDeque;

use hopwatch_proto::v1::Hop;
use rustc_hash::FxHashMap;

use crate::model::hash64;

/// Groups per request id kept (a request seldom spans more pieces).
const MAX_GROUPS_PER_REQUEST: usize = 4;

#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// The group's id as GetTrace takes it: the trace id (lowercase), else the request id.
    pub id: Box<str>,
    /// Keyed by a trace id (not by the request id).
    pub traced: bool,
    /// Earliest start of its hops with this request id.
    pub first_us: u64,
}

/// request id -> the groups holding hops with it.
#[derive(Debug)]
pub struct FragmentIndex {
    map: FxHashMap<u64, Vec<Group>>,
    order: VecDeque<u64>,
    max_requests: usize,
    budget: usize,
    bytes: usize,
    /// Request ids forgotten for the byte budget.
    pub evictions: u64,
}

fn groups_bytes(g: &[Group], cap: usize) -> usize {
    crate::budget::map_slot(std::mem::size_of::<(u64, Vec<Group>)>())
        + 8 // the order queue's entry
        + cap * std::mem::size_of::<Group>()
        + crate::budget::ALLOC_OVERHEAD
        + g.iter().map(|g| crate::budget::str_heap(g.id.len())).sum::<usize>()
}

fn key(request_id: &str) -> u64 {
    hash64(request_id.as_bytes(), 11)
}

impl FragmentIndex {
    pub fn new(max_requests: usize) -> FragmentIndex {
        FragmentIndex {
            map: FxHashMap::default(),
            order: VecDeque::new(),
            max_requests: max_requests.max(1),
            budget: usize::MAX,
            bytes: 0,
            evictions: 0,
        }
    }

    pub fn with_budget(max_requests: usize, budget: usize) -> FragmentIndex {
        FragmentIndex {
            budget,
            ..Self::new(max_requests)
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
    pub fn budget(&self) -> usize {
        self.budget
    }

    fn forget_oldest(&mut self) {
        if let Some(old) = self.order.pop_front() {
            if let Some(g) = self.map.remove(&old) {
                self.bytes -= groups_bytes(&g, g.capacity());
            }
        }
    }

    /// Records the hops of an accepted batch.
    pub fn observe(&mut self, hops: &[Hop]) {
        for h in hops {
            if h.request_id.is_empty() {
                continue;
            }
            let k = key(&h.request_id);
            let traced = !h.trace_id.is_empty();
            if !self.map.contains_key(&k) {
                if self.order.len() >= self.max_requests {
                    self.forget_oldest();
                }
                while self.bytes > self.budget && !self.order.is_empty() {
                    self.forget_oldest();
                    self.evictions += 1;
                }
                self.order.push_back(k);
                self.bytes += groups_bytes(&[], 1);
                // Most requests live in one group: no spare capacity.
                self.map.insert(k, Vec::with_capacity(1));
            }
            let Some(groups) = self.map.get_mut(&k) else {
                continue;
            };
            let before = groups_bytes(groups, groups.capacity());
            let same = |g: &Group| {
                g.traced == traced
                    && if traced {
                        g.id.eq_ignore_ascii_case(&h.trace_id)
                    } else {
                        *g.id == *h.request_id
                    }
            };
            if let Some(g) = groups.iter_mut().find(|g| same(g)) {
                g.first_us = g.first_us.min(h.start_time_unix_micros);
            } else if groups.len() < MAX_GROUPS_PER_REQUEST {
                groups.push(Group {
                    id: if traced {
                        h.trace_id.to_ascii_lowercase().into()
                    } else {
                        h.request_id.as_str().into()
                    },
                    traced,
                    first_us: h.start_time_unix_micros,
                });
            }
            self.bytes = self.bytes + groups_bytes(groups, groups.capacity()) - before;
        }
    }

    /// The groups holding hops with `request_id`.
    pub fn groups(&self, request_id: &str) -> &[Group] {
        self.map
            .get(&key(request_id))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// For a group keyed by request id `id` (hops without a trace id), the trace id of the
    /// traced piece of the same request, if one is known: a trace id to show instead.
    pub fn traced_for_request_group(&self, id: &str) -> Option<String> {
        let g = self.groups(id);
        if !g.iter().any(|g| !g.traced && *g.id == *id) {
            return None;
        }
        g.iter()
            .filter(|g| g.traced)
            .min_by_key(|g| g.first_us)
            .map(|g| g.id.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(trace: &str, req: &str, start: u64) -> Hop {
        Hop {
            trace_id: trace.into(),
            request_id: req.into(),
            start_time_unix_micros: start,
            ..Default::default()
        }
    }

    #[test]
    fn byte_budget_forgets_the_oldest_requests() {
        let mut f = FragmentIndex::with_budget(1_000_000, 64 * 1024);
        for i in 0..5000u64 {
            f.observe(&[hop(&format!("{i:032x}"), &format!("r{i}"), i)]);
        }
        assert!(f.bytes() <= 64 * 1024 + 512, "{}", f.bytes());
        assert!(f.evictions > 4000, "{}", f.evictions);
        assert!(f.groups("r0").is_empty(), "oldest forgotten");
        assert_eq!(f.groups("r4999").len(), 1);
        // Accounting is exact: forgetting everything returns to 0.
        while !f.order.is_empty() {
            f.forget_oldest();
        }
        assert_eq!(f.bytes(), 0);
    }

    #[test]
    fn links_the_pieces_of_one_request_and_is_bounded() {
        let mut f = FragmentIndex::new(2);
        f.observe(&[
            hop("ABC1", "r1", 10),
            hop("abc1", "r1", 5),
            hop("", "r1", 20),
            hop("", "r1", 25),
        ]);
        let g = f.groups("r1");
        assert_eq!(g.len(), 2, "{g:?}");
        assert_eq!((&*g[0].id, g[0].traced, g[0].first_us), ("abc1", true, 5));
        assert_eq!((&*g[1].id, g[1].traced, g[1].first_us), ("r1", false, 20));
        assert_eq!(f.traced_for_request_group("r1").as_deref(), Some("abc1"));
        // A trace id is no request group.
        assert_eq!(f.traced_for_request_group("abc1"), None);
        f.observe(&[hop("t2", "r2", 1), hop("t3", "r3", 1)]);
        assert!(f.groups("r1").is_empty(), "oldest forgotten");
        assert_eq!(f.groups("r3").len(), 1);
    }
}
