//! APP_ERROR: where an error that no Envoy made started.
//!
//! A call *fails* when either of its hops answered a server-side error (an HTTP 5xx or a
//! gRPC server error status: UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL,
//! UNAVAILABLE, DATA_LOSS), carries Envoy response flags, or was refused by a policy. A
//! 4xx or a gRPC client-side status (NOT_FOUND, INVALID_ARGUMENT, ...) is an answer, not
//! an error.
//!
//! The origin is the deepest failing call: a failing call with a failing call below it is
//! a consequence (its app passed the error on). A deepest failing call is an APP_ERROR
//! when the callee's inbound hop exists and neither hop carries Envoy flags or a policy
//! refusal: the callee's app answered the error itself. (Flags make it an
//! UPSTREAM_FAILURE, a refusal a POLICY_DENIED; without an inbound hop nobody knows who
//! answered.)
//!
//! `workload` = the app where the error started (the callee), `peer` = its caller
//! (empty for the edge). Severity:
//! - ERROR when the error reached the edge of the chain: every call from the origin up to
//!   the root failed, so the client saw a failure;
//! - WARNING when a caller on the way absorbed it (answered success): the chain held, but
//!   an app is failing.

use hopwatch_proto::v1::{BreakKind, Severity};

use crate::analysis::{Finding, Node};
use crate::grpc::{describe_response, hop_server_error};
use crate::model::{CHop, Interner};
use crate::policy_denied::denial;

const NONE: u32 = u32::MAX;

/// Response flags that do not make a hop Envoy-made: DC (the downstream closed) only
/// says the caller gave up.
const DC: u64 = 1 << 14;

/// How one call failed, if it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    None,
    /// The callee's app answered a server error (no flags, no refusal, inbound hop seen).
    App,
    /// Envoy made it (flags), a policy refused it, or the answer's origin is unknown.
    Other,
}

fn failure(node: &Node, hops: &[CHop], it: &Interner) -> Failure {
    let get = |h: Option<u32>| h.map(|h| &hops[h as usize]);
    let (out, inb) = (get(node.out), get(node.inb));
    let flagged = |h: Option<&CHop>| h.is_some_and(|h| h.response_flags & !DC != 0);
    let refused = |h: Option<&CHop>| h.is_some_and(|h| denial(h, it).is_some());
    if flagged(out) || flagged(inb) || refused(out) || refused(inb) {
        return Failure::Other;
    }
    match inb {
        Some(i) if hop_server_error(i) => Failure::App,
        // The caller saw an error the callee's sidecar never reported answering.
        _ if out.is_some_and(hop_server_error) => Failure::Other,
        _ => Failure::None,
    }
}

/// APP_ERROR findings of one trace's call tree. `caller[i]`: the outbound hop that sent
/// inbound hop `i` (`u32::MAX`: none).
pub fn detect(
    hops: &[CHop],
    nodes: &[Node],
    roots: &[u32],
    caller: &[u32],
    it: &Interner,
    seen_ms: &dyn Fn(&CHop) -> u64,
) -> Vec<(u32, Finding)> {
    let fail: Vec<Failure> = nodes.iter().map(|n| failure(n, hops, it)).collect();
    let mut parent = vec![NONE; nodes.len()];
    for (id, n) in nodes.iter().enumerate() {
        for &c in &n.children {
            if let Some(p) = parent.get_mut(c as usize) {
                *p = id as u32;
            }
        }
    }
    // Whether any call below each node failed (iterative post-order).
    let mut below = vec![false; nodes.len()];
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
    for &id in &order {
        let n = &nodes[id as usize];
        below[id as usize] = n
            .children
            .iter()
            .any(|&c| below[c as usize] || fail[c as usize] != Failure::None);
    }
    let mut out = Vec::new();
    for &id in &order {
        if fail[id as usize] != Failure::App || below[id as usize] {
            continue;
        }
        let node = &nodes[id as usize];
        let Some(i) = node.inb else { continue };
        let ih = &hops[i as usize];
        let c = caller.get(i as usize).copied().unwrap_or(NONE);
        let peer = hops
            .get(c as usize)
            .map(|o| it.resolve(o.workload).to_string())
            .unwrap_or_default();
        // Up to the root: who passed it on, and did the edge fail?
        let mut passed_on: Vec<String> = Vec::new();
        let mut reached_edge = true;
        let mut cur = parent[id as usize];
        let mut steps = 0;
        while cur != NONE && steps <= nodes.len() {
            steps += 1;
            let pn = &nodes[cur as usize];
            if fail[cur as usize] == Failure::None {
                reached_edge = false;
                break;
            }
            if let Some(pi) = pn.inb {
                let w = it.resolve(hops[pi as usize].workload).to_string();
                if !passed_on.contains(&w) {
                    passed_on.push(w);
                }
            }
            cur = parent[cur as usize];
        }
        let workload = it.resolve(ih.workload);
        let response = describe_response(ih, it.resolve(ih.grpc_message));
        let from = if peer.is_empty() {
            "its caller outside the mesh".to_string()
        } else {
            peer.clone()
        };
        let path = ih.path.as_deref().unwrap_or("");
        let mut summary = format!(
            "The app of {workload} answered {response} to {from}{}: no Envoy made this error",
            if path.is_empty() {
                String::new()
            } else {
                format!(" for {} {path}", it.resolve(ih.method))
            }
        );
        if !passed_on.is_empty() {
            summary.push_str(&format!("; passed on by {}", passed_on.join(", ")));
        }
        summary.push_str(if reached_edge {
            " up to the edge of the chain"
        } else {
            ", then absorbed by a caller that answered success"
        });
        let hint = format!(
            "Look at the logs and errors of {workload}'s app (the trace ids of this finding name the requests): the error started there, the callers above it only passed it on"
        );
        out.push((
            id,
            Finding {
                kind: BreakKind::AppError,
                severity: if reached_edge {
                    Severity::Error
                } else {
                    Severity::Warning
                },
                workload: workload.to_string(),
                namespace: it.resolve(ih.namespace).to_string(),
                peer,
                flags: vec![],
                summary,
                hint,
                seen_ms: seen_ms(ih),
            },
        ));
    }
    out
}
