//! The service graph of the web view: which services call which, how often, how many of
//! those calls failed, and which findings sit on each edge. Observed from the converted
//! hops at ingest (interned symbols: no allocation per hop), bounded in edges and bytes
//! (over its budget, the services seen least recently go with their edges); rendered to
//! JSON with the stored findings matched onto nodes and edges.

use hopwatch_proto::v1::Break;
use rustc_hash::{FxHashMap, FxHashSet};
use serde_json::{json, Value};

use crate::budget::{low_water, map_slot, oldest, ALLOC_OVERHEAD};
use crate::model::{CHop, Interner, Marks, Sym};

#[derive(Default, Clone, Copy, Debug)]
struct Count {
    calls: u64,
    errors: u64,
    /// The observation (batch) that last counted here.
    last: u64,
}

type Edge = (Sym, Sym, Sym, Sym);
type Svc = (Sym, Sym);
const EDGE_SLOT: usize = std::mem::size_of::<(Edge, Count)>();
const NODE_SLOT: usize = std::mem::size_of::<(Svc, Count)>();
const WL_SLOT: usize = std::mem::size_of::<(Svc, FxHashSet<Sym>)>();

/// Edges (caller service -> callee service) and nodes (services and their workloads).
#[derive(Debug)]
pub struct ServiceGraph {
    /// (namespace, service, dest namespace, dest service) -> counts, from outbound hops.
    edges: FxHashMap<(Sym, Sym, Sym, Sym), Count>,
    /// (namespace, service) -> counts, from inbound hops.
    nodes: FxHashMap<(Sym, Sym), Count>,
    /// (namespace, service) -> its workloads.
    workloads: FxHashMap<(Sym, Sym), FxHashSet<Sym>>,
    max_edges: usize,
    budget: usize,
    /// Bytes of the workload sets (the maps' slots are counted from their capacity).
    set_bytes: usize,
    tick: u64,
    /// Services forgotten for the byte budget.
    pub evictions: u64,
}

fn set_bytes(s: &FxHashSet<Sym>) -> usize {
    if s.capacity() == 0 {
        0
    } else {
        map_slot(4) * s.capacity() + ALLOC_OVERHEAD
    }
}

fn failed(h: &CHop) -> bool {
    h.response_code >= 500 || h.response_flags != 0
}

impl ServiceGraph {
    pub fn new(max_edges: usize) -> ServiceGraph {
        ServiceGraph {
            edges: FxHashMap::default(),
            nodes: FxHashMap::default(),
            workloads: FxHashMap::default(),
            max_edges,
            budget: usize::MAX,
            set_bytes: 0,
            tick: 0,
            evictions: 0,
        }
    }

    pub fn with_budget(max_edges: usize, budget: usize) -> ServiceGraph {
        ServiceGraph {
            budget,
            ..Self::new(max_edges)
        }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Accounted bytes: the maps' slots (by capacity) and the workload sets.
    pub fn bytes(&self) -> usize {
        let slot = |entry: usize, cap: usize| (entry + 1) * cap;
        slot(EDGE_SLOT, self.edges.capacity())
            + slot(NODE_SLOT, self.nodes.capacity())
            + slot(WL_SLOT, self.workloads.capacity())
            + self.set_bytes
    }

    /// Marks the symbols the graph holds (string table compaction).
    pub fn mark(&self, m: &mut Marks) {
        for &(a, b, c, d) in self.edges.keys() {
            [a, b, c, d].into_iter().for_each(|s| m.mark(s));
        }
        for &(a, b) in self.nodes.keys() {
            m.mark(a);
            m.mark(b);
        }
        for (&(a, b), w) in &self.workloads {
            m.mark(a);
            m.mark(b);
            w.iter().for_each(|s| m.mark(*s));
        }
    }

    /// Forgets the services seen least recently (node, workloads, outgoing edges) down
    /// to 7/8 of the budget.
    fn evict(&mut self) {
        let to_free = self.bytes().saturating_sub(low_water(self.budget));
        let mut per: FxHashMap<Svc, (u64, usize)> = FxHashMap::default();
        for (k, c) in &self.nodes {
            let e = per.entry(*k).or_default();
            e.0 = e.0.max(c.last);
            e.1 += map_slot(NODE_SLOT);
        }
        for (k, c) in &self.edges {
            let e = per.entry((k.0, k.1)).or_default();
            e.0 = e.0.max(c.last);
            e.1 += map_slot(EDGE_SLOT);
        }
        for (k, w) in &self.workloads {
            let e = per.entry(*k).or_default();
            e.1 += map_slot(WL_SLOT) + set_bytes(w);
        }
        let gone: FxHashSet<Svc> = oldest(per.iter().map(|(k, (t, b))| (*t, *k, *b)), to_free)
            .into_iter()
            .collect();
        self.evictions += gone.len() as u64;
        self.nodes.retain(|k, _| !gone.contains(k));
        self.edges.retain(|k, _| !gone.contains(&(k.0, k.1)));
        let mut freed = 0;
        self.workloads.retain(|k, w| {
            let keep = !gone.contains(k);
            if !keep {
                freed += set_bytes(w);
            }
            keep
        });
        self.set_bytes -= freed;
        // The maps are counted by capacity: give the space back.
        self.nodes.shrink_to_fit();
        self.edges.shrink_to_fit();
        self.workloads.shrink_to_fit();
    }

    /// Counts the hops of an accepted batch.
    pub fn observe<'a>(&mut self, hops: impl Iterator<Item = &'a CHop>) {
        self.tick += 1;
        let tick = self.tick;
        for h in hops {
            let own = (
                h.namespace,
                if h.service.is_empty() {
                    h.workload
                } else {
                    h.service
                },
            );
            if h.is_inbound() {
                let n = self.nodes.entry(own).or_default();
                n.calls += 1;
                n.errors += failed(h) as u64;
                n.last = tick;
                let w = self.workloads.entry(own).or_default();
                if w.len() < 64 {
                    let before = set_bytes(w);
                    w.insert(h.workload);
                    self.set_bytes = self.set_bytes + set_bytes(w) - before;
                }
            } else if h.is_outbound() && !h.dest_service.is_empty() {
                let dest_ns = if h.dest_namespace.is_empty() {
                    h.namespace
                } else {
                    h.dest_namespace
                };
                let k = (own.0, own.1, dest_ns, h.dest_service);
                if !self.edges.contains_key(&k) && self.edges.len() >= self.max_edges {
                    continue;
                }
                let e = self.edges.entry(k).or_default();
                e.calls += 1;
                e.errors += failed(h) as u64;
                e.last = tick;
                let w = self.workloads.entry(own).or_default();
                if w.len() < 64 {
                    let before = set_bytes(w);
                    w.insert(h.workload);
                    self.set_bytes = self.set_bytes + set_bytes(w) - before;
                }
            }
        }
        if self.bytes() > self.budget {
            self.evict();
        }
    }

    /// `{nodes, edges}` with each stored finding placed on the edges and nodes it is about.
    pub fn to_json(&self, it: &Interner, findings: &[Break]) -> Value {
        let r = |s: Sym| it.resolve(s).to_string();
        let id = |ns: Sym, svc: Sym| format!("{}/{}", it.resolve(ns), it.resolve(svc));
        let mut node_ids: FxHashMap<String, (String, String)> = FxHashMap::default();
        for &(ns, svc) in self.nodes.keys().chain(self.workloads.keys()) {
            node_ids.insert(id(ns, svc), (r(ns), r(svc)));
        }
        for &(ns, svc, dns, dsvc) in self.edges.keys() {
            node_ids.insert(id(ns, svc), (r(ns), r(svc)));
            node_ids.insert(id(dns, dsvc), (r(dns), r(dsvc)));
        }
        let workloads_of = |ns: &str, svc: &str| -> Vec<String> {
            let key = (it.get(ns), it.get(svc));
            let (Some(ns), Some(svc)) = key else {
                return Vec::new();
            };
            let mut w: Vec<String> = self
                .workloads
                .get(&(ns, svc))
                .map(|s| s.iter().map(|w| r(*w)).collect())
                .unwrap_or_default();
            w.sort();
            w
        };
        let about = |b: &Break, ns: &str, names: &[String], svc: &str| {
            b.namespace == ns && (names.contains(&b.workload) || b.workload == svc)
        };
        let finding = |b: &Break| {
            json!({
                "id": b.id,
                "kind": crate::cli::kind_str(b.kind),
                "severity": crate::cli::severity_str(b.severity),
                "workload": b.workload,
                "peer": b.peer,
            })
        };
        let mut nodes: Vec<Value> = node_ids
            .iter()
            .map(|(nid, (ns, svc))| {
                let wl = workloads_of(ns, svc);
                let c = it
                    .get(ns)
                    .zip(it.get(svc))
                    .and_then(|k| self.nodes.get(&k))
                    .copied()
                    .unwrap_or_default();
                // A finding at this node that is not about a call to another service
                // (e.g. the sidecar could not reach its own app).
                let here: Vec<Value> = findings
                    .iter()
                    .filter(|b| {
                        about(b, ns, &wl, svc)
                            && (b.peer.is_empty() || b.peer == *svc || wl.contains(&b.peer))
                    })
                    .map(finding)
                    .collect();
                json!({
                    "id": nid, "namespace": ns, "service": svc, "workloads": wl,
                    "calls": c.calls, "errors": c.errors, "findings": here,
                })
            })
            .collect();
        nodes.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
        let mut edges: Vec<Value> = self
            .edges
            .iter()
            .map(|(&(ns, svc, dns, dsvc), c)| {
                let (ns_s, svc_s, dns_s, dsvc_s) = (r(ns), r(svc), r(dns), r(dsvc));
                let from_wl = workloads_of(&ns_s, &svc_s);
                let to_wl = workloads_of(&dns_s, &dsvc_s);
                let on: Vec<Value> = findings
                    .iter()
                    .filter(|b| {
                        // At the caller, about the callee (tag or trace not propagated,
                        // hop missing) ...
                        (about(b, &ns_s, &from_wl, &svc_s)
                            && (b.peer == dsvc_s || to_wl.contains(&b.peer)))
                            // ... or at the callee, about this caller or its own app, on
                            // a call that failed.
                            || (about(b, &dns_s, &to_wl, &dsvc_s)
                                && c.errors > 0
                                && (b.peer == svc_s
                                    || from_wl.contains(&b.peer)
                                    || b.peer == dsvc_s
                                    || to_wl.contains(&b.peer)
                                    || b.peer.is_empty()))
                    })
                    .map(finding)
                    .collect();
                json!({
                    "from": id(ns, svc), "to": id(dns, dsvc),
                    "calls": c.calls, "errors": c.errors, "findings": on,
                })
            })
            .collect();
        edges.sort_by(|a, b| {
            (a["from"].as_str(), a["to"].as_str()).cmp(&(b["from"].as_str(), b["to"].as_str()))
        });
        json!({ "nodes": nodes, "edges": edges })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hopwatch_proto::v1::Direction;

    #[test]
    fn byte_budget_forgets_the_services_seen_least_recently() {
        let mut it = Interner::new(100_000);
        let mut g = ServiceGraph::with_budget(1_000_000, 32 * 1024);
        let ns = it.intern("ns");
        for i in 0..2000 {
            let svc = it.intern(&format!("svc{i}"));
            let dest = it.intern(&format!("dst{i}"));
            let h = CHop {
                direction: Direction::Outbound as u8,
                namespace: ns,
                service: svc,
                workload: svc,
                dest_service: dest,
                ..Default::default()
            };
            g.observe(std::iter::once(&h));
        }
        assert!(g.bytes() <= 32 * 1024, "{}", g.bytes());
        assert!(g.evictions > 1000);
        let newest = (ns, it.get("svc1999").unwrap());
        assert!(g.workloads.contains_key(&newest));
        assert!(!g.workloads.contains_key(&(ns, it.get("svc0").unwrap())));
    }
}
