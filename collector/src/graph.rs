//! The service graph of the web view: which services call which, how often, how many of
//! those calls failed, and which findings sit on each edge. Observed from the converted
//! hops at ingest (interned symbols: no allocation per hop), bounded in edges; rendered to
//! JSON with the stored findings matched onto nodes and edges.

use hopwatch_proto::v1::Break;
use rustc_hash::{FxHashMap, FxHashSet};
use serde_json::{json, Value};

use crate::model::{CHop, Interner, Sym};

#[derive(Default, Clone, Copy, Debug)]
struct Count {
    calls: u64,
    errors: u64,
}

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
        }
    }

    /// Counts the hops of an accepted batch.
    pub fn observe<'a>(&mut self, hops: impl Iterator<Item = &'a CHop>) {
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
                let w = self.workloads.entry(own).or_default();
                if w.len() < 64 {
                    w.insert(h.workload);
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
                self.workloads.entry(own).or_default().insert(h.workload);
            }
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
