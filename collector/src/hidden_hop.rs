//! A call no sidecar saw as HTTP: a workload made an outbound call while serving a
//! request, but no inbound hop of that workload exists in the trace, and the span its
//! call continues is an inbound span of *another* workload. So the call from that other
//! workload to this one happened, but neither side's HTTP filter saw it: the hop went
//! through a TCP proxy (a Service port named `tcp-...` or unnamed is TCP to Istio, on
//! both sidecars) or bypassed both sidecars. Reported as `HOP_MISSING` at the caller.
//!
//! Without a tracer (Istio's default since 1.22) span ids are whatever the apps pass
//! along unchanged: the caller is the other workload's inbound hop with the same span id,
//! or, with no span ids at all (hops grouped by `x-request-id`), its inbound request that
//! was in progress when the call started (the latest such one).

use crate::model::CHop;

/// One hidden call: the caller's inbound hop (the request it was serving) and the
/// callee's first outbound hop that revealed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HiddenCall {
    pub caller_inbound: u32,
    pub callee_outbound: u32,
}

/// The hidden calls of one trace. `has_parent(o)` tells whether outbound hop `o` was
/// joined to an inbound hop of its own pod, `callee_of(o)` the callee's inbound hop it
/// was joined to: only a complete call (both sides seen) reveals a hidden one before it,
/// a call missing its own callee is HOP_MISSING already. One per (caller request, callee
/// workload).
pub fn hidden_calls(
    hops: &[CHop],
    has_parent: impl Fn(usize) -> bool,
    callee_of: impl Fn(usize) -> Option<usize>,
    slack_us: u64,
) -> Vec<HiddenCall> {
    let mut out: Vec<HiddenCall> = Vec::new();
    for (o, oh) in hops.iter().enumerate() {
        if !oh.is_outbound() || has_parent(o) {
            continue;
        }
        let Some(callee) = callee_of(o) else {
            continue;
        };
        let callee_has_inbound = hops
            .iter()
            .any(|h| h.is_inbound() && h.workload == oh.workload && h.namespace == oh.namespace);
        if callee_has_inbound {
            continue;
        }
        // Another workload's inbound hop, and not the one this very call reached (which
        // shares its span id without a tracer, and overlaps it in time).
        let other_at = |i: usize, h: &CHop| {
            i != callee
                && h.is_inbound()
                && (h.workload != oh.workload || h.namespace != oh.namespace)
        };
        let caller = if oh.parent_span_id != 0 {
            hops.iter()
                .enumerate()
                .position(|(i, h)| other_at(i, h) && h.span_id == oh.parent_span_id)
        } else if oh.span_id != 0 {
            // No tracer but B3 headers passed along unchanged: the same span id.
            hops.iter()
                .enumerate()
                .position(|(i, h)| other_at(i, h) && h.span_id == oh.span_id)
        } else {
            // No span ids at all: the other workload's request in progress then.
            hops.iter()
                .enumerate()
                .filter(|&(i, h)| {
                    other_at(i, h)
                        && h.span_id == 0
                        && h.start_us <= oh.start_us + slack_us
                        && oh.start_us <= h.end_us() + slack_us
                })
                .max_by_key(|(_, h)| h.start_us)
                .map(|(i, _)| i)
        };
        let Some(i) = caller else {
            continue;
        };
        let seen = out.iter().any(|c| {
            c.caller_inbound == i as u32 && hops[c.callee_outbound as usize].workload == oh.workload
        });
        if !seen {
            out.push(HiddenCall {
                caller_inbound: i as u32,
                callee_outbound: o as u32,
            });
        }
    }
    out
}

/// Summary and hint of a hidden call from `caller` to `callee`.
pub fn describe(caller: &str, callee: &str, next: &str) -> (String, String) {
    (
        format!(
            "{caller} called {callee} (which then called {next}), but no sidecar reported an HTTP hop {caller} -> {callee}: it ran through a TCP proxy or around both sidecars"
        ),
        format!(
            "Name the Service port of {callee} with its protocol (http-*, http2-*, grpc-*): a port named tcp-* or unnamed is treated as TCP, so no HTTP filter (hopwatch included) sees the call; else check that both pods have the sidecar."
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Interner;
    use hopwatch_proto::v1::Direction;

    fn hop(it: &mut Interner, workload: &str, dir: Direction, span: u64, parent: u64) -> CHop {
        CHop {
            workload: it.intern(workload),
            direction: dir as u8,
            span_id: span,
            parent_span_id: parent,
            ..CHop::default()
        }
    }

    #[test]
    fn an_outbound_hop_continuing_another_workloads_inbound_span_reveals_a_hidden_call() {
        let mut it = Interner::new(64);
        let hops = vec![
            hop(&mut it, "alpha", Direction::Inbound, 10, 1),
            // bravo's call continues alpha's inbound span: alpha -> bravo was not seen.
            hop(&mut it, "bravo", Direction::Outbound, 20, 10),
            hop(&mut it, "bravo", Direction::Outbound, 21, 10),
            hop(&mut it, "charlie", Direction::Inbound, 20, 10),
        ];
        let calls = hidden_calls(&hops, |_| false, |_| Some(usize::MAX), 0);
        assert_eq!(
            calls,
            vec![HiddenCall {
                caller_inbound: 0,
                callee_outbound: 1
            }]
        );
        // Joined to its own inbound hop: nothing hidden.
        assert!(hidden_calls(&hops, |_| true, |_| Some(usize::MAX), 0).is_empty());
        // A call whose own callee is missing reveals nothing (it is HOP_MISSING itself).
        assert!(hidden_calls(&hops, |_| false, |_| None, 0).is_empty());
    }

    #[test]
    fn a_callee_with_its_own_inbound_hop_hides_nothing() {
        let mut it = Interner::new(64);
        let hops = vec![
            hop(&mut it, "alpha", Direction::Inbound, 10, 1),
            hop(&mut it, "bravo", Direction::Inbound, 11, 10),
            hop(&mut it, "bravo", Direction::Outbound, 20, 10),
        ];
        assert!(hidden_calls(&hops, |_| false, |_| Some(usize::MAX), 0).is_empty());
    }

    #[test]
    fn without_a_tracer_the_unchanged_span_id_links_the_caller() {
        let mut it = Interner::new(64);
        let hops = vec![
            hop(&mut it, "alpha", Direction::Inbound, 10, 0),
            hop(&mut it, "bravo", Direction::Outbound, 10, 0),
        ];
        assert_eq!(
            hidden_calls(&hops, |_| false, |_| Some(usize::MAX), 0),
            vec![HiddenCall {
                caller_inbound: 0,
                callee_outbound: 1
            }]
        );
    }

    #[test]
    fn without_span_ids_the_request_in_progress_is_the_caller() {
        let mut it = Interner::new(64);
        let at = |mut h: CHop, start_us: u64, duration_us: u32| {
            h.start_us = start_us;
            h.duration_us = duration_us;
            h
        };
        let hops = vec![
            at(
                hop(&mut it, "gateway", Direction::Inbound, 0, 0),
                0,
                100_000,
            ),
            at(
                hop(&mut it, "alpha", Direction::Inbound, 0, 0),
                1_000,
                50_000,
            ),
            at(
                hop(&mut it, "bravo", Direction::Outbound, 0, 0),
                5_000,
                1_000,
            ),
            // Long after alpha's request: nothing links it.
            at(
                hop(&mut it, "delta", Direction::Outbound, 0, 0),
                900_000,
                1_000,
            ),
        ];
        assert_eq!(
            hidden_calls(&hops, |_| false, |_| Some(usize::MAX), 0),
            vec![HiddenCall {
                caller_inbound: 1,
                callee_outbound: 2
            }]
        );
    }

    #[test]
    fn the_inbound_hop_a_call_reached_is_never_its_caller() {
        // No tracer, the app called with a new x-request-id: its call and the callee's
        // inbound hop form a group of their own, overlapping in time and without span
        // ids. The callee did not call the caller.
        let mut it = Interner::new(64);
        let at = |mut h: CHop, start_us: u64, duration_us: u32| {
            h.start_us = start_us;
            h.duration_us = duration_us;
            h
        };
        let hops = vec![
            at(
                hop(&mut it, "reviews", Direction::Outbound, 0, 0),
                1_000,
                5_000,
            ),
            at(
                hop(&mut it, "ratings", Direction::Inbound, 0, 0),
                1_200,
                4_000,
            ),
        ];
        assert!(hidden_calls(&hops, |_| false, |o| (o == 0).then_some(1), 10_000).is_empty());
    }
}
