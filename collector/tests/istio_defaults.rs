//! Analysis on Istio's defaults: no tracer (hops carry only `x-request-id`, which
//! Envoy's UUID extension may rewrite one digit of), B3 with `x-b3-sampled: 0`, and the
//! default retry policy (one outbound hop meeting up to three inbound attempts).

mod common;

use common::*;
use hopwatch_collector::analysis::Finding;
use hopwatch_collector::core::{Core, Limits};
use hopwatch_proto::v1::{BreakKind, Hop, Sampled, Severity, TraceContext};

const NOW: u64 = 1_900_000_000_000;

fn base() -> u64 {
    NOW * 1000 - 10_000_000
}

fn run(hops: &[Hop]) -> Vec<Finding> {
    let mut core = Core::new(Limits::default());
    core.ingest(hops, NOW);
    core.flush_all(NOW)
        .into_iter()
        .flat_map(|r| r.findings)
        .collect()
}

fn kinds(f: &[Finding]) -> Vec<BreakKind> {
    let mut k: Vec<BreakKind> = f.iter().map(|f| f.kind).collect();
    k.sort_by_key(|k| *k as i32);
    k
}

/// A request id as Envoy generates it; `digit` is the character Envoy's UUID extension
/// writes at position 14 (`4` untraced, `9` sampled, ...).
fn rid(n: u32, digit: char) -> String {
    format!("6f1c2d3e-{n:04x}-{digit}abc-9def-0123456789ab")
}

/// [`healthy_chain`] as a mesh without a tracer sees it: no trace or span ids, the apps
/// copy x-request-id, and some sidecars report it with another trace-reason digit.
fn untraced_chain(n: u32) -> Vec<Hop> {
    let mut hops = healthy_chain("", base(), "dev");
    for (i, h) in hops.iter_mut().enumerate() {
        h.span_id.clear();
        h.parent_span_id.clear();
        h.upstream_span_id.clear();
        h.request_id = rid(n, if i % 2 == 0 { '4' } else { '9' });
        h.trace_context = TraceContext::Missing as i32;
        h.missing_trace_headers = vec![
            "x-b3-traceid".into(),
            "x-b3-spanid".into(),
            "x-b3-sampled".into(),
            "b3".into(),
            "traceparent".into(),
        ];
    }
    hops
}

#[test]
fn untraced_healthy_chain_is_one_trace_without_findings() {
    let hops = untraced_chain(1);
    let mut core = Core::new(Limits::default());
    core.ingest(&hops, NOW);
    assert_eq!(
        core.open_traces(),
        1,
        "one group despite the rewritten digit"
    );
    let v = core.trace(&rid(1, '9'), NOW).expect("found by either form");
    assert_eq!(v.hop_count, 5);
    assert_eq!(v.roots.len(), 1);
    let reviews = &v.roots[0].children[0];
    assert_eq!(
        reviews.children[0].inbound.as_ref().unwrap().workload,
        "ratings-v1"
    );
    assert!(core.flush_all(NOW)[0].findings.is_empty());
}

#[test]
fn untraced_callee_without_sidecar_is_hop_missing() {
    let mut hops = untraced_chain(2);
    hops.remove(4);
    let f = run(&hops);
    assert_eq!(kinds(&f), vec![BreakKind::HopMissing]);
    assert_eq!(
        (f[0].workload.as_str(), f[0].peer.as_str()),
        ("reviews-v1", "ratings")
    );
}

#[test]
fn untraced_app_dropping_x_request_id_is_trace_not_propagated() {
    let mut hops = untraced_chain(3);
    // reviews' app called ratings without the x-request-id it received: Envoy made a
    // new one, so the call and ratings' hop are another group, linked back by time.
    hops[3].request_id = rid(1003, '4');
    hops[4].request_id = rid(1003, '4');
    let f = run(&hops);
    assert_eq!(kinds(&f), vec![BreakKind::TraceNotPropagated], "{f:?}");
    assert_eq!(f[0].workload, "reviews-v1");
    assert!(f[0].summary.contains("x-request-id"), "{}", f[0].summary);
    // A pod that serves nothing and calls with its own id is a legitimate root.
    let mut alone = untraced_chain(4);
    alone.truncate(3);
    alone.remove(0);
    for h in alone.iter_mut() {
        h.request_id = rid(1004, '4');
    }
    assert!(run(&alone).is_empty());
}

#[test]
fn unsampled_b3_chain_is_joined_like_a_sampled_one() {
    let t = trace_id(5);
    let mut hops = healthy_chain(&t, base(), "");
    for h in hops.iter_mut() {
        h.sampled = Sampled::No as i32;
    }
    assert!(run(&hops).is_empty());
    // The trace dropped by reviews' app (the sidecar starts a new, unsampled one).
    let mut dropped = healthy_chain(&t, base(), "");
    for h in dropped.iter_mut() {
        h.sampled = Sampled::No as i32;
        h.request_id = rid(5, '4');
    }
    let other = trace_id(1005);
    for h in dropped.iter_mut().skip(3) {
        h.trace_id = other.clone();
    }
    dropped[3].trace_context = TraceContext::Missing as i32;
    let f = run(&dropped);
    assert!(kinds(&f).contains(&BreakKind::TraceNotPropagated), "{f:?}");
}

/// reviews → ratings with Istio's retries: three inbound attempts (same span id and
/// request id) on two pods. `codes`: each attempt's (code, flags); `out`: what reviews'
/// sidecar answered.
fn retried(n: u32, traced: bool, codes: &[(u32, u64)], out: (u32, u64)) -> Vec<Hop> {
    let t = if traced { trace_id(n) } else { String::new() };
    let mut hops = healthy_chain(&t, base(), "");
    hops[3].response_code = out.0;
    hops[3].response_flags = out.1;
    hops[3].duration_micros = 9_000;
    let template = hops.remove(4);
    for (k, (code, flags)) in codes.iter().enumerate() {
        let mut a = template.clone();
        a.pod = format!("ratings-v1-pod-{}", k % 2);
        a.start_time_unix_micros = base() + 2_100 + 2_500 * k as u64;
        a.duration_micros = 1_000;
        a.response_code = *code;
        a.response_flags = *flags;
        hops.push(a);
    }
    if !traced {
        for h in hops.iter_mut() {
            h.span_id.clear();
            h.parent_span_id.clear();
            h.upstream_span_id.clear();
            h.request_id = rid(n, '4');
            h.trace_context = TraceContext::Missing as i32;
        }
    }
    if out.0 >= 500 {
        for h in hops.iter_mut().take(2) {
            h.response_code = 502;
        }
    }
    hops
}

const UF: u64 = 1 << 5;
const UC: u64 = 1 << 6;
const URX: u64 = 1 << 15;

#[test]
fn retries_of_a_callee_that_is_down_are_one_edge_blamed_on_the_callee() {
    for traced in [true, false] {
        let hops = retried(10, traced, &[(503, UF), (503, UF), (503, UF)], (503, URX));
        let mut core = Core::new(Limits::default());
        core.ingest(&hops, NOW);
        let results = core.flush_all(NOW);
        let f: Vec<Finding> = results.into_iter().flat_map(|r| r.findings).collect();
        assert_eq!(
            kinds(&f),
            vec![BreakKind::UpstreamFailure],
            "{traced}: {f:?}"
        );
        assert_eq!(f[0].workload, "ratings-v1");
        assert_eq!(f[0].flags, vec!["UF".to_string()]);
        assert!(
            f[0].summary.contains("3 attempts") && f[0].summary.contains("URX"),
            "{}",
            f[0].summary
        );
        let id = if traced { trace_id(10) } else { rid(10, '4') };
        let v = core.trace(&id, NOW).expect("trace");
        assert_eq!(v.roots.len(), 1, "the attempts are not roots of their own");
        let reviews = &v.roots[0].children[0];
        let ratings = &reviews.children[0];
        assert_eq!(ratings.outbound.as_ref().unwrap().workload, "reviews-v1");
        assert_eq!(ratings.inbound.as_ref().unwrap().workload, "ratings-v1");
        assert_eq!(ratings.earlier_attempts.len(), 2, "{traced}");
        assert!(ratings
            .earlier_attempts
            .iter()
            .all(|a| a.start_time_unix_micros
                < ratings.inbound.as_ref().unwrap().start_time_unix_micros));
    }
}

#[test]
fn a_call_that_succeeded_on_retry_is_no_error() {
    for traced in [true, false] {
        let hops = retried(11, traced, &[(503, UC), (200, 0)], (200, 0));
        let f = run(&hops);
        assert!(
            f.iter().all(|f| f.severity != Severity::Error),
            "{traced}: {f:?}"
        );
        assert!(f.is_empty(), "{traced}: {f:?}");
    }
}

#[test]
fn no_hop_missing_when_the_callers_tracer_started_the_callees_trace() {
    // B3 mesh, reviews' app dropped the trace headers but kept x-request-id: its outbound
    // hop has no trace id (grouped by request id) while its sidecar's tracer started a new
    // trace, which ratings' hop belongs to.
    let t = trace_id(20);
    let mut hops = healthy_chain(&t, base(), "");
    for h in hops.iter_mut() {
        h.request_id = rid(20, '4');
    }
    hops[3].trace_id.clear();
    hops[3].span_id.clear();
    hops[3].trace_context = TraceContext::Missing as i32;
    hops[4].trace_id = trace_id(1020);
    let f = run(&hops);
    assert_eq!(kinds(&f), vec![BreakKind::TraceNotPropagated], "{f:?}");
}

#[test]
fn b3_copied_verbatim_without_a_tracer_joins_each_call_to_its_callee() {
    // No tracer: nobody makes new spans, the apps copy the client's B3 headers, so every
    // hop carries the same span id and every outbound hop "sent" it upstream.
    let t = trace_id(30);
    let mut hops = healthy_chain(&t, base(), "");
    for h in hops.iter_mut() {
        h.span_id = "c000000000000001".into();
        if h.direction == hopwatch_proto::v1::Direction::Outbound as i32 {
            h.upstream_span_id = "c000000000000001".into();
        }
    }
    let mut core = Core::new(Limits::default());
    core.ingest(&hops, NOW);
    let v = core.trace(&t, NOW).expect("trace");
    assert_eq!(v.roots.len(), 1, "{:?}", v.roots);
    let reviews = &v.roots[0].children[0];
    assert_eq!(reviews.inbound.as_ref().unwrap().workload, "reviews-v1");
    assert_eq!(
        reviews.children[0].inbound.as_ref().unwrap().workload,
        "ratings-v1"
    );
    assert!(core.flush_all(NOW)[0].findings.is_empty());
}
