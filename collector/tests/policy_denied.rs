//! POLICY_DENIED on constructed chains: an RBAC refusal on the callee's inbound side and
//! a fault abort on the caller's outbound side, both reported by `on_log` only
//! (`answered_before_filter`), and never a HOP_MISSING, UPSTREAM_FAILURE or APP_ERROR.

mod common;

use common::*;
use hopwatch_collector::analysis::Finding;
use hopwatch_collector::core::{Core, Limits};
use hopwatch_proto::v1::{BreakKind, Hop, Severity, TagSource};

const NOW: u64 = 1_900_000_000_000;

fn run(hops: &[Hop]) -> Vec<Finding> {
    let mut core = Core::new(Limits::default());
    core.ingest(hops, NOW);
    core.flush_all(NOW)
        .into_iter()
        .flat_map(|r| r.findings)
        .collect()
}

fn base() -> u64 {
    NOW * 1000 - 10_000_000
}

#[test]
fn rbac_deny_on_the_callee_names_the_authorization_policy() {
    let mut hops = healthy_chain(&trace_id(1), base(), "dev");
    hops.truncate(3); // productpage → reviews
    let r = &mut hops[2];
    r.answered_before_filter = true;
    r.response_code = 403;
    r.response_code_details =
        "rbac_access_denied_matched_policy[ns[default]-policy[deny-reviews]-rule[0]]".into();
    r.upstream_cluster.clear();
    r.upstream_host.clear();
    r.duration_micros = 0;
    hops[1].response_code = 403;
    hops[0].response_code = 502; // productpage's app passes it on
    let f = run(&hops);
    assert_eq!(f.len(), 1, "only the refusal: {f:#?}");
    let p = &f[0];
    assert_eq!(p.kind, BreakKind::PolicyDenied);
    assert_eq!(p.severity, Severity::Warning);
    assert_eq!(
        (p.workload.as_str(), p.peer.as_str()),
        ("reviews-v1", "productpage-v1")
    );
    assert!(
        p.summary
            .contains("refused the request from productpage-v1")
            && p.summary
                .contains("403 by RBAC policy ns[default]-policy[deny-reviews]-rule[0]"),
        "{}",
        p.summary
    );
    assert!(
        p.hint
            .contains("AuthorizationPolicy deny-reviews in namespace default"),
        "{}",
        p.hint
    );
}

#[test]
fn fault_abort_on_the_caller_is_policy_denied_without_hop_missing() {
    let mut hops = healthy_chain(&trace_id(2), base(), "dev");
    hops.truncate(2); // productpage → (reviews never reached)
    let o = &mut hops[1];
    o.answered_before_filter = true;
    o.response_code = 503;
    o.response_flags = 1 << 10; // FI
    o.response_code_details = "fault_filter_abort".into();
    o.upstream_host.clear();
    // The app dropped the tag, but the request never left: not a TAG_DROPPED.
    o.tag_sent.clear();
    o.tag_source = TagSource::None as i32;
    hops[0].response_code = 502;
    let f = run(&hops);
    assert_eq!(f.len(), 1, "{f:#?}");
    let p = &f[0];
    assert_eq!(p.kind, BreakKind::PolicyDenied);
    assert_eq!(
        (p.workload.as_str(), p.peer.as_str()),
        ("productpage-v1", "reviews")
    );
    assert_eq!(p.flags, vec!["FI".to_string()]);
    assert!(
        p.summary.contains("a fault injection abort"),
        "{}",
        p.summary
    );
    assert!(p.hint.contains("VirtualService"), "{}", p.hint);
}

#[test]
fn a_refused_outbound_call_with_an_upstream_answer_is_still_not_hop_missing() {
    // Even with an upstream host recorded, a refusal by the caller's own sidecar means
    // no callee hop is expected.
    let mut hops = healthy_chain(&trace_id(3), base(), "dev");
    hops.truncate(2);
    let o = &mut hops[1];
    o.response_code = 429;
    o.response_code_details = "local_rate_limited".into();
    o.response_flags = 1 << 11; // RL
    let f = run(&hops);
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(f[0].kind, BreakKind::PolicyDenied);
    assert!(f[0].hint.contains("rate limit"), "{}", f[0].hint);
}
