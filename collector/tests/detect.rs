//! Joining and every finding kind on constructed hop sets, with the negatives.

mod common;

use std::time::Duration;

use common::*;
use hopwatch_collector::analysis::Finding;
use hopwatch_collector::core::{Core, Limits, LATE_HOP_WINDOW};
use hopwatch_collector::service::{Collector, Settings};
use hopwatch_collector::store::Filter;
use hopwatch_proto::v1::{BreakKind, Hop, Severity, TagSource, TraceContext};

const NOW: u64 = 1_900_000_000_000;

fn run(hops: &[Hop]) -> Vec<Finding> {
    run_with(Limits::default(), hops)
}

fn run_with(limits: Limits, hops: &[Hop]) -> Vec<Finding> {
    let mut core = Core::new(limits);
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

fn base() -> u64 {
    NOW * 1000 - 10_000_000
}

#[test]
fn healthy_chain_has_no_findings_and_joins_into_one_path() {
    let t = trace_id(1);
    let hops = healthy_chain(&t, base(), "dev.proj1");
    let mut core = Core::new(Limits::default());
    core.ingest(&hops, NOW);
    let results = core.flush_all(NOW);
    assert_eq!(results.len(), 1);
    assert!(results[0].findings.is_empty(), "{:?}", results[0].findings);
    let v = core
        .trace(&t.to_uppercase(), NOW)
        .expect("recent trace (trace ids are case-insensitive)");
    assert!(!v.open);
    assert_eq!(v.hop_count, 5);
    assert_eq!(v.roots.len(), 1, "one root (the edge inbound)");
    let root = &v.roots[0];
    assert!(root.outbound.is_none());
    assert_eq!(root.inbound.as_ref().unwrap().workload, "productpage-v1");
    let reviews = &root.children[0];
    assert_eq!(
        reviews.outbound.as_ref().unwrap().workload,
        "productpage-v1"
    );
    assert_eq!(reviews.inbound.as_ref().unwrap().workload, "reviews-v1");
    let ratings = &reviews.children[0];
    assert_eq!(ratings.inbound.as_ref().unwrap().workload, "ratings-v1");
    assert!(ratings.children.is_empty());
}

#[test]
fn healthy_untagged_chain_has_no_findings() {
    let hops = healthy_chain(&trace_id(2), base(), "");
    assert!(run(&hops).is_empty());
}

#[test]
fn edge_inbound_without_caller_is_a_root_not_a_break() {
    let t = trace_id(3);
    let hops = vec![inbound(
        &t,
        "gateway",
        "gateway",
        "b000000000000001",
        base(),
        1000,
        "dev",
    )];
    assert!(run(&hops).is_empty());
}

#[test]
fn joins_by_request_id_service_and_timing_when_span_ids_are_missing() {
    // The apps copy x-request-id: every hop of the chain shares it, and no span ids.
    let t = trace_id(4);
    let mut hops = healthy_chain(&t, base(), "dev");
    for h in hops.iter_mut() {
        h.request_id = "shared-request-id".into();
        h.span_id.clear();
        h.upstream_span_id.clear();
    }
    let mut core = Core::new(Limits::default());
    core.ingest(&hops, NOW);
    let v = core.trace(&t, NOW).expect("open trace");
    assert!(v.open);
    assert_eq!(v.roots.len(), 1);
    let reviews = &v.roots[0].children[0];
    assert_eq!(reviews.inbound.as_ref().unwrap().workload, "reviews-v1");
    assert_eq!(
        reviews.children[0].inbound.as_ref().unwrap().workload,
        "ratings-v1"
    );
    assert!(core.flush_all(NOW)[0].findings.is_empty());
}

#[test]
fn different_request_ids_do_not_join() {
    let t = trace_id(5);
    let mut hops = healthy_chain(&t, base(), "");
    for h in hops.iter_mut() {
        h.span_id.clear();
        h.upstream_span_id.clear();
    }
    hops[4].request_id = "something-else".into();
    let f = run(&hops);
    // ratings' inbound is now a root; reviews' outbound has no callee: HOP_MISSING.
    assert_eq!(kinds(&f), vec![BreakKind::HopMissing]);
}

#[test]
fn tag_not_propagated_is_a_warning_only() {
    let t = trace_id(6);
    let mut hops = healthy_chain(&t, base(), "dev.proj1");
    hops[3].tag_received.clear();
    hops[3].tag_source = TagSource::Correlated as i32;
    let f = run(&hops);
    assert_eq!(kinds(&f), vec![BreakKind::TagNotPropagated]);
    assert_eq!(f[0].severity, Severity::Warning);
    assert_eq!(f[0].workload, "reviews-v1");
    assert_eq!(f[0].peer, "ratings");
    assert!(f.iter().all(|f| f.severity != Severity::Error));
}

#[test]
fn tag_changed() {
    let t = trace_id(7);
    let mut hops = healthy_chain(&t, base(), "dev.proj1");
    hops[3].tag_received = "dev.other".into();
    hops[3].tag_sent = "dev.other".into();
    hops[4].tag_received = "dev.other".into();
    hops[4].tag_sent = "dev.other".into();
    let f = run(&hops);
    assert_eq!(kinds(&f), vec![BreakKind::TagChanged]);
    assert_eq!(f[0].severity, Severity::Error);
    assert_eq!(
        (f[0].workload.as_str(), f[0].peer.as_str()),
        ("reviews-v1", "ratings")
    );
    assert!(
        f[0].summary.contains("dev.proj1") && f[0].summary.contains("dev.other"),
        "{}",
        f[0].summary
    );
}

#[test]
fn tag_dropped_in_trace_own_tag_restamped() {
    let t = trace_id(8);
    let mut hops = healthy_chain(&t, base(), "dev.proj1");
    // reviews-v1 is a "dev" fallback instance: the app dropped the tag, the filter could
    // not correlate, and the request left with reviews' own tag.
    hops[3].tag_received.clear();
    hops[3].correlated_tag.clear();
    hops[3].tag_sent = "dev".into();
    hops[3].tag_source = TagSource::Environment as i32;
    hops[4].tag_received = "dev".into();
    hops[4].tag_sent = "dev".into();
    let f = run(&hops);
    assert_eq!(kinds(&f), vec![BreakKind::TagDropped]);
    assert_eq!(
        (f[0].workload.as_str(), f[0].peer.as_str()),
        ("reviews-v1", "ratings")
    );
    assert_eq!(f[0].severity, Severity::Error);
}

#[test]
fn trace_not_propagated_links_by_time_and_finds_the_dropped_tag() {
    // Trace A: edge → reviews (tag dev.proj1). reviews' app drops both the tag and the
    // trace headers: its call to ratings starts a new trace B with no tag.
    let (a, b) = (trace_id(9), trace_id(10));
    let base = base();
    let mut hops = vec![inbound(
        &a,
        "reviews-v1",
        "reviews",
        "c000000000000001",
        base,
        10_000,
        "dev.proj1",
    )];
    let mut out = outbound(
        &b,
        "reviews-v1",
        "reviews",
        "",
        "c000000000000002",
        "ratings",
        base + 2_000,
        3_000,
        "",
    );
    out.trace_context = TraceContext::New as i32;
    out.correlated_tag.clear();
    out.missing_trace_headers = vec![
        "x-b3-traceid".into(),
        "x-b3-spanid".into(),
        "x-b3-sampled".into(),
    ];
    out.request_id = "other".into();
    let mut callee = inbound(
        &b,
        "ratings-v1",
        "ratings",
        "c000000000000002",
        base + 2_100,
        2_800,
        "",
    );
    callee.request_id = "other".into();
    hops.push(out);
    hops.push(callee);
    let f = run(&hops);
    assert_eq!(
        kinds(&f),
        vec![BreakKind::TagDropped, BreakKind::TraceNotPropagated]
    );
    let tnp = f
        .iter()
        .find(|f| f.kind == BreakKind::TraceNotPropagated)
        .unwrap();
    assert_eq!(
        (tnp.workload.as_str(), tnp.peer.as_str()),
        ("reviews-v1", "ratings")
    );
    assert!(tnp.summary.contains("x-b3-traceid"), "{}", tnp.summary);
    let dropped = f.iter().find(|f| f.kind == BreakKind::TagDropped).unwrap();
    assert!(dropped.summary.contains("dev.proj1"));
}

#[test]
fn trace_not_propagated_links_by_request_id() {
    let (a, b) = (trace_id(11), trace_id(12));
    let base = base();
    let mut inb = inbound(
        &a,
        "reviews-v1",
        "reviews",
        "d000000000000001",
        base,
        1_000,
        "",
    );
    inb.request_id = "rid-1".into();
    // Starts after the inbound request ended (async work), but carries its request id.
    let mut out = outbound(
        &b,
        "reviews-v1",
        "reviews",
        "",
        "",
        "ratings",
        base + 50_000,
        3_000,
        "",
    );
    out.trace_context = TraceContext::Missing as i32;
    out.trace_id.clear();
    out.request_id = "rid-1".into();
    out.upstream_host.clear();
    let f = run(&[inb, out]);
    assert_eq!(kinds(&f), vec![BreakKind::TraceNotPropagated]);
}

#[test]
fn new_trace_from_a_pod_that_serves_nothing_is_a_legitimate_root() {
    let base = base();
    let mut out = outbound(
        &trace_id(13),
        "loadgen",
        "loadgen",
        "",
        "e000000000000002",
        "productpage",
        base,
        3_000,
        "",
    );
    out.trace_context = TraceContext::New as i32;
    let callee = inbound(
        &trace_id(13),
        "productpage-v1",
        "productpage",
        "e000000000000002",
        base + 100,
        2_800,
        "",
    );
    // Another pod serving a request at the same time does not matter.
    let other = inbound(
        &trace_id(14),
        "reviews-v1",
        "reviews",
        "e000000000000009",
        base,
        10_000,
        "dev",
    );
    let f = run(&[out, callee, other]);
    assert!(f.is_empty(), "{f:?}");
}

#[test]
fn tag_misrouted_when_a_better_instance_exists() {
    let t = trace_id(15);
    let base = base();
    let mut hops = Vec::new();
    // A dev.mia instance of reviews exists (seen earlier).
    let mut mia = inbound(
        &trace_id(16),
        "reviews-mia",
        "reviews",
        "f000000000000009",
        base - 1_000_000,
        1_000,
        "dev.mia",
    );
    mia.own_tag = "dev.mia".into();
    hops.push(mia);
    let mut chain = healthy_chain(&t, base, "dev.mia");
    chain[2].own_tag = "dev".into(); // served by reviews-v1, environment "dev"
    chain[3].own_tag = "dev".into();
    hops.extend(chain);
    let f = run(&hops);
    assert_eq!(kinds(&f), vec![BreakKind::TagMisrouted]);
    assert_eq!(
        (f[0].workload.as_str(), f[0].peer.as_str()),
        ("reviews-v1", "productpage-v1")
    );
    assert!(f[0].summary.contains("dev.mia"));
    assert_eq!(f[0].severity, Severity::Error);
}

#[test]
fn fallback_to_the_best_existing_level_is_not_misrouted() {
    // dev.proj1.alice served by "dev.proj1" while only "dev.proj1", "dev" and the default
    // exist: the best match.
    let base = base();
    let mut hops = Vec::new();
    for (i, env) in ["dev", "", "dev.proj1"].iter().enumerate() {
        let mut h = inbound(
            &trace_id(20 + i as u32),
            &format!("reviews-{i}"),
            "reviews",
            "f00000000000000a",
            base - 1_000_000,
            1_000,
            "",
        );
        h.own_tag = env.to_string();
        hops.push(h);
    }
    let mut chain = healthy_chain(&trace_id(30), base, "dev.proj1.alice");
    chain[2].own_tag = "dev.proj1".into();
    hops.extend(chain);
    assert!(run(&hops).is_empty());
    // And a non-matching tag on the serving instance is worse than the default.
    let mut hops2 = Vec::new();
    let mut d = inbound(
        &trace_id(31),
        "reviews-default",
        "reviews",
        "f00000000000000b",
        base - 1_000_000,
        1_000,
        "",
    );
    d.own_tag.clear();
    hops2.push(d);
    let mut chain = healthy_chain(&trace_id(32), base, "dev.proj1");
    chain[2].own_tag = "qa".into();
    hops2.extend(chain);
    assert_eq!(kinds(&run(&hops2)), vec![BreakKind::TagMisrouted]);
}

#[test]
fn hop_missing_when_the_callee_never_reports() {
    let t = trace_id(40);
    let mut hops = healthy_chain(&t, base(), "");
    hops.remove(4); // ratings has no sidecar / filter
    let f = run(&hops);
    assert_eq!(kinds(&f), vec![BreakKind::HopMissing]);
    assert_eq!(
        (f[0].workload.as_str(), f[0].peer.as_str()),
        ("reviews-v1", "ratings")
    );
    assert!(f[0].hint.contains("TCP"));
}

#[test]
fn no_hop_missing_for_unsampled_anomaly_reports_or_external_hosts() {
    // Sampling gap: only the anomaly report of the caller arrived.
    let t = trace_id(41);
    let mut hops = healthy_chain(&t, base(), "");
    hops.remove(4);
    hops[3].sampled_report = false;
    assert!(run(&hops).is_empty());
    // Egress to a host outside the mesh.
    let mut ext = outbound(
        &trace_id(42),
        "reviews-v1",
        "reviews",
        "",
        "",
        "x",
        base(),
        1000,
        "",
    );
    ext.upstream_cluster = "PassthroughCluster".into();
    ext.authority = "api.github.com".into();
    let mut ext2 = outbound(
        &trace_id(43),
        "reviews-v1",
        "reviews",
        "",
        "",
        "x",
        base(),
        1000,
        "",
    );
    ext2.upstream_cluster = "outbound|443||api.github.com".into();
    assert!(run(&[ext, ext2]).is_empty());
}

#[test]
fn upstream_failure_is_located_at_the_deepest_failing_hop() {
    let t = trace_id(50);
    let mut hops = healthy_chain(&t, base(), "");
    // ratings' inbound sidecar could not connect to its app (UF); callers see 503s.
    hops[4].response_code = 503;
    hops[4].response_flags = 1 << 5; // UF
    hops[4].response_code_details =
        "upstream_reset_before_response_started{remote_connection_failure}".into();
    hops[3].response_code = 503;
    hops[1].response_code = 503;
    hops[1].response_flags = 1 << 15; // URX at productpage: a consequence
    hops[0].response_code = 503;
    let f = run(&hops);
    assert_eq!(kinds(&f), vec![BreakKind::UpstreamFailure]);
    assert_eq!(f[0].workload, "ratings-v1");
    assert_eq!(f[0].flags, vec!["UF".to_string()]);
    assert!(f[0].hint.contains("0.0.0.0"), "{}", f[0].hint);
    assert!(f[0].summary.contains("remote_connection_failure"));
}

#[test]
fn upstream_failure_on_the_outbound_side_with_flag_hints() {
    for (bit, name, needle) in [
        (1u64, "UH", "subset"),
        (8, "NR", "DestinationRule"),
        (6, "UC", "mTLS"),
        (7, "UO", "circuit"),
    ] {
        let t = trace_id(60 + bit as u32);
        let mut hops = healthy_chain(&t, base(), "");
        hops.remove(4); // Envoy answered itself: no inbound hop at ratings
        hops[3].response_code = 503;
        hops[3].response_flags = 1 << bit;
        hops[3].upstream_host.clear();
        hops[1].response_code = 503;
        let f = run(&hops);
        assert_eq!(kinds(&f), vec![BreakKind::UpstreamFailure], "{name}");
        assert_eq!(
            (f[0].workload.as_str(), f[0].peer.as_str()),
            ("reviews-v1", "ratings")
        );
        assert_eq!(f[0].flags, vec![name.to_string()]);
        assert!(f[0].hint.contains(needle), "{name}: {}", f[0].hint);
    }
}

#[test]
fn trace_malformed_reported_where_it_first_appeared() {
    let t = trace_id(70);
    let mut hops = healthy_chain(&t, base(), "");
    hops[3].trace_context = TraceContext::Malformed as i32;
    hops[3].trace_detail = "x-b3-spanid: not hex".into();
    hops[4].trace_context = TraceContext::Malformed as i32;
    hops[4].trace_detail = "x-b3-spanid: not hex".into();
    let f = run(&hops);
    assert_eq!(kinds(&f), vec![BreakKind::TraceMalformed]);
    assert_eq!(
        (f[0].workload.as_str(), f[0].peer.as_str()),
        ("reviews-v1", "ratings")
    );
    assert_eq!(f[0].severity, Severity::Warning);
    assert!(f[0].summary.contains("not hex"));
    // From outside the mesh: located at the edge inbound.
    let mut hops = healthy_chain(&trace_id(71), base(), "");
    hops[0].trace_context = TraceContext::Inconsistent as i32;
    let f = run(&hops);
    assert_eq!(kinds(&f), vec![BreakKind::TraceMalformed]);
    assert_eq!(f[0].workload, "productpage-v1");
}

#[test]
fn open_trace_bound_evicts_and_counts() {
    let limits = Limits {
        max_open_traces: 10,
        max_hops_per_trace: 3,
        ..Limits::default()
    };
    let mut core = Core::new(limits);
    let mut analysed = 0;
    for i in 0..25u32 {
        let hops = healthy_chain(&trace_id(100 + i), base(), "");
        let (accepted, evicted) = core.ingest(&hops, NOW + i as u64);
        assert_eq!(accepted, 3);
        analysed += evicted.len();
        assert!(core.open_traces() <= 10);
    }
    assert_eq!(core.stats.traces_evicted, 15);
    assert_eq!(analysed, 15);
    assert_eq!(core.stats.hops_dropped_trace_full, 25 * 2);
    assert_eq!(core.open_hops(), 30);
}

#[test]
fn traces_are_analysed_when_quiet_or_at_max_age() {
    let limits = Limits {
        trace_quiet: Duration::from_secs(5),
        max_trace_age: Duration::from_secs(20),
        ..Limits::default()
    };
    let mut core = Core::new(limits);
    let t = trace_id(200);
    let hops = healthy_chain(&t, base(), "");
    core.ingest(&hops[..2], NOW);
    assert!(core.poll(NOW + 4_000, 100).is_empty());
    core.ingest(&hops[2..], NOW + 4_000);
    assert!(
        core.poll(NOW + 8_000, 100).is_empty(),
        "the new hops reset the quiet timer"
    );
    assert_eq!(core.poll(NOW + 9_000, 100).len(), 1);
    assert_eq!(core.open_traces(), 0);
    assert_eq!(
        core.queue_len(),
        0,
        "analysed traces leave no queue entries behind"
    );
    // A trace that never goes quiet is analysed at max age.
    let t2 = trace_id(201);
    for s in 0..25u64 {
        core.ingest(
            &healthy_chain(&t2, base(), "")[..1],
            NOW + 10_000 + s * 1_000,
        );
        let r = core.poll(NOW + 10_000 + s * 1_000, 100);
        if !r.is_empty() {
            assert!(s >= 20, "analysed at {s}s");
            assert_eq!(core.stats.traces_analysed_at_max_age, 1);
            return;
        }
    }
    panic!("never analysed at max age");
}

#[test]
fn findings_are_deduplicated_across_traces() {
    let c = Collector::in_memory(Settings::default());
    for i in 0..3 {
        let mut hops = healthy_chain(&trace_id(300 + i), base(), "");
        hops.remove(4);
        c.report(
            &hopwatch_proto::v1::ReportRequest {
                hops,
                ..Default::default()
            },
            NOW,
        )
        .unwrap();
    }
    c.shutdown(NOW).unwrap();
    let b = c.list_breaks(&Filter::default(), 100);
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].count, 3);
    assert_eq!(b[0].trace_ids.len(), 3);
    assert_eq!(b[0].trace_ids[0].len(), 32);
}

#[test]
fn hops_without_trace_id_group_by_request_id() {
    let mut hops = healthy_chain("", base(), "");
    for h in hops.iter_mut() {
        h.request_id = "Only-RID".into();
        h.trace_context = TraceContext::Missing as i32;
    }
    let mut core = Core::new(Limits::default());
    core.ingest(&hops, NOW);
    assert_eq!(core.open_traces(), 1);
    assert!(
        core.trace("only-rid", NOW).is_none(),
        "request ids are case-sensitive"
    );
    let v = core.trace("Only-RID", NOW).expect("by request id");
    assert_eq!(v.hop_count, 5);
    assert!(core.flush_all(NOW)[0].findings.is_empty());
}

#[test]
fn clock_skew_is_tolerated_when_the_request_id_matches() {
    let t = trace_id(400);
    let mut hops = healthy_chain(&t, base(), "");
    for h in hops.iter_mut() {
        h.upstream_span_id.clear();
        h.span_id.clear();
    }
    hops[4].start_time_unix_micros -= 80_000; // ratings' node clock is 80 ms behind
    assert!(run(&hops).is_empty());
}

#[test]
fn sampling_gap_anomaly_only_reports_give_only_the_failure() {
    // The trace was not sampled: only the hops with flags / 5xx were reported.
    let t = trace_id(401);
    let mut hops = healthy_chain(&t, base(), "");
    hops[3].response_code = 503;
    hops[3].response_flags = 1 << 1; // UH at reviews → ratings
    hops[3].upstream_host.clear();
    hops[1].response_code = 503;
    hops[0].response_code = 503;
    let reported: Vec<Hop> = [hops[0].clone(), hops[1].clone(), hops[3].clone()]
        .into_iter()
        .map(|mut h| {
            h.sampled_report = false;
            h
        })
        .collect();
    let f = run(&reported);
    assert_eq!(kinds(&f), vec![BreakKind::UpstreamFailure]);
    assert_eq!(f[0].workload, "reviews-v1");
    assert_eq!(f[0].flags, vec!["UH".to_string()]);
}

#[test]
fn joins_by_request_id_when_the_service_name_differs() {
    let t = trace_id(402);
    let mut hops = healthy_chain(&t, base(), "");
    for h in hops.iter_mut() {
        h.upstream_span_id.clear();
        h.span_id.clear();
    }
    // The Service is "ratings-svc" but the callee's canonical name is "ratings".
    hops[3].upstream_cluster = "outbound|9080||ratings-svc.default.svc.cluster.local".into();
    hops[3].authority = "ratings-svc:9080".into();
    hops[4].authority = "ratings-svc:9080".into();
    assert!(run(&hops).is_empty());
    hops[4].authority = "whatever".into();
    assert!(run(&hops).is_empty());
    // Without a matching request id it stays unexplained.
    hops[4].request_id = "different".into();
    assert_eq!(kinds(&run(&hops)), vec![BreakKind::HopMissing]);
}

#[test]
fn late_hops_are_analysed_with_their_trace_and_findings_not_double_counted() {
    let t = trace_id(403);
    let mut hops = healthy_chain(&t, base(), "dev.proj1");
    hops[3].tag_source = TagSource::Correlated as i32; // TAG_NOT_PROPAGATED, once
    let mut core = Core::new(Limits::default());
    core.ingest(&hops, NOW);
    let first: Vec<Finding> = core
        .flush_all(NOW)
        .into_iter()
        .flat_map(|r| r.findings)
        .collect();
    assert_eq!(kinds(&first), vec![BreakKind::TagNotPropagated]);
    // A late outbound of reviews (in the same trace) that dropped the tag: its parent
    // inbound was in the first batch.
    let mut late = outbound(
        &t,
        "reviews-v1",
        "reviews",
        "a000000000000002",
        "a0000000000000ff",
        "details",
        base() + 3_000,
        500,
        "",
    );
    late.tag_sent = "dev".into();
    late.tag_source = TagSource::Environment as i32;
    late.correlated_tag.clear();
    late.upstream_host.clear();
    core.ingest(&[late], NOW + 10_000);
    let second: Vec<Finding> = core
        .flush_all(NOW + 10_000)
        .into_iter()
        .flat_map(|r| r.findings)
        .collect();
    assert_eq!(kinds(&second), vec![BreakKind::TagDropped]);
    assert_eq!(core.stats.late_merges, 1);
    assert_eq!(core.trace(&t, NOW).unwrap().hop_count, 6);
}

#[test]
fn downstream_close_alone_is_a_warning_and_a_timeout_is_the_origin() {
    // The caller timed out (UT); the callee's sidecar then saw the caller close (DC).
    let t = trace_id(404);
    let mut hops = healthy_chain(&t, base(), "");
    hops[3].response_code = 504;
    hops[3].response_flags = 1 << 2; // UT
    hops[4].response_code = 0;
    hops[4].response_flags = 1 << 14; // DC
    let f = run(&hops);
    assert_eq!(kinds(&f), vec![BreakKind::UpstreamFailure]);
    assert_eq!(
        (f[0].workload.as_str(), f[0].peer.as_str()),
        ("reviews-v1", "ratings")
    );
    assert_eq!(f[0].flags, vec!["UT".to_string()]);
    // A client that hung up on the edge workload: a warning.
    let mut hops = healthy_chain(&trace_id(405), base(), "");
    hops[0].response_flags = 1 << 14;
    let f = run(&hops);
    assert_eq!(kinds(&f), vec![BreakKind::UpstreamFailure]);
    assert_eq!(f[0].severity, Severity::Warning);
}

#[test]
fn shared_request_id_does_not_join_an_ancestor_inbound_as_callee() {
    // Every hop shares x-request-id; ratings has no sidecar. The root inbound of
    // productpage (same request id, overlapping in time) must not pass for ratings'.
    let t = trace_id(406);
    let mut hops = healthy_chain(&t, base(), "");
    for h in hops.iter_mut() {
        h.request_id = "shared".into();
    }
    hops.remove(4);
    let f = run(&hops);
    assert_eq!(kinds(&f), vec![BreakKind::HopMissing]);
    assert_eq!(
        (f[0].workload.as_str(), f[0].peer.as_str()),
        ("reviews-v1", "ratings")
    );
}

#[test]
fn open_hops_bound_evicts_and_counts() {
    let limits = Limits {
        max_open_hops: 12,
        ..Limits::default()
    };
    let mut core = Core::new(limits);
    for i in 0..10u32 {
        core.ingest(
            &healthy_chain(&trace_id(500 + i), base(), ""),
            NOW + i as u64,
        );
        assert!(core.open_hops() <= 12, "{}", core.open_hops());
    }
    assert!(
        core.stats.traces_evicted >= 7,
        "{}",
        core.stats.traces_evicted
    );
    assert_eq!(core.stats.hops_accepted, 50);
}

// Early eviction (--max-open-traces / --max-open-hops) and HOP_MISSING. Time is the
// `now_ms` passed to report/ingest: no sleeping, no timed assertions.

/// Trace `n` with ratings (reviews' callee) unreported: one HOP_MISSING (reviews-v1 ->
/// ratings). Four hops.
fn missing_callee(n: u32) -> Vec<Hop> {
    let mut hops = healthy_chain(&trace_id(n), base(), "");
    hops.remove(4);
    hops
}

fn report_at(c: &Collector, hops: Vec<Hop>, now_ms: u64) {
    c.report(
        &hopwatch_proto::v1::ReportRequest {
            hops,
            ..Default::default()
        },
        now_ms,
    )
    .unwrap();
}

/// Traces counted by the HOP_MISSING findings of the index.
fn hop_missing_count(c: &Collector) -> u64 {
    let b = c.list_breaks(
        &Filter {
            kind: Some(BreakKind::HopMissing),
            ..Default::default()
        },
        100,
    );
    for b in &b {
        assert_eq!(
            (b.workload.as_str(), b.peer.as_str()),
            ("reviews-v1", "ratings")
        );
    }
    b.iter().map(|b| b.count).sum()
}

fn late_window_ms() -> u64 {
    LATE_HOP_WINDOW.as_millis() as u64
}

/// The default --trace-quiet with a small --max-open-traces.
fn collector_with_max_open_traces(n: usize) -> Collector {
    Collector::in_memory(Settings {
        limits: Limits {
            max_open_traces: n,
            trace_quiet: Duration::from_secs(5),
            ..Limits::default()
        },
        ..Settings::default()
    })
}

#[test]
fn trace_evicted_by_max_open_traces_after_the_late_hop_window_still_counts_hop_missing() {
    // Quiet for LATE_HOP_WINDOW (2 s, less than half of --trace-quiet 5 s): complete,
    // so the evicted traces are analysed in full and every HOP_MISSING is counted.
    assert!(LATE_HOP_WINDOW < Duration::from_millis(2_500));
    let c = collector_with_max_open_traces(3);
    for i in 0..3 {
        report_at(&c, missing_callee(600 + i), NOW);
    }
    for i in 0..3 {
        report_at(
            &c,
            healthy_chain(&trace_id(610 + i), base(), ""),
            NOW + late_window_ms(),
        );
    }
    let stats = c.core.lock().stats;
    assert_eq!(stats.traces_evicted, 3, "the 3 broken traces are evicted");
    assert_eq!(stats.traces_evicted_cut_short, 0);
    assert_eq!(hop_missing_count(&c), 3, "counted when evicted");
    c.shutdown(NOW + late_window_ms()).unwrap();
    assert_eq!(hop_missing_count(&c), 3, "and nothing else found");
    assert_eq!(c.list_breaks(&Filter::default(), 100).len(), 1);
}

#[test]
fn trace_evicted_by_max_open_traces_while_fresh_is_cut_short_without_hop_missing() {
    // Its last hop arrived 1 ms short of LATE_HOP_WINDOW: the callee's hop may still
    // come, so no HOP_MISSING (counted as a cut-short eviction).
    let c = collector_with_max_open_traces(3);
    for i in 0..3 {
        report_at(&c, missing_callee(620 + i), NOW);
    }
    for i in 0..3 {
        report_at(
            &c,
            healthy_chain(&trace_id(630 + i), base(), ""),
            NOW + late_window_ms() - 1,
        );
    }
    let stats = c.core.lock().stats;
    assert_eq!(stats.traces_evicted, 3);
    assert_eq!(stats.traces_evicted_cut_short, 3);
    assert_eq!(hop_missing_count(&c), 0);
    c.shutdown(NOW + late_window_ms()).unwrap();
    assert!(c.list_breaks(&Filter::default(), 100).is_empty());
}

#[test]
fn eviction_analyses_each_trace_by_its_own_last_hop() {
    // Three broken traces, evicted at NOW + LATE_HOP_WINDOW + 1: 641 (last hop at
    // NOW + 1) was quiet for the whole window and is complete; 642 (NOW + 2) was not;
    // 640 started first, at NOW, but its last hop came at NOW + 2: not complete either.
    let limits = Limits {
        max_open_traces: 3,
        trace_quiet: Duration::from_secs(5),
        ..Limits::default()
    };
    let mut core = Core::new(limits);
    let first = missing_callee(640);
    core.ingest(&first[..3], NOW);
    core.ingest(&missing_callee(641), NOW + 1);
    core.ingest(&missing_callee(642), NOW + 2);
    core.ingest(&first[3..], NOW + 2);
    let mut complete = Vec::new();
    for i in 0..3 {
        let (_, evicted) = core.ingest(
            &healthy_chain(&trace_id(650 + i), base(), ""),
            NOW + late_window_ms() + 1,
        );
        assert_eq!(evicted.len(), 1);
        let r = &evicted[0];
        if !r.findings.is_empty() {
            assert_eq!(kinds(&r.findings), vec![BreakKind::HopMissing]);
            complete.push(r.trace_id.clone());
        }
    }
    assert_eq!(complete, vec![trace_id(641)]);
    assert_eq!(core.stats.traces_evicted, 3);
    assert_eq!(core.stats.traces_evicted_cut_short, 2);
}

#[test]
fn trace_evicted_by_max_open_hops_after_the_late_hop_window_still_counts_hop_missing() {
    let limits = Limits {
        max_open_hops: 8,
        trace_quiet: Duration::from_secs(5),
        ..Limits::default()
    };
    let c = Collector::in_memory(Settings {
        limits,
        ..Settings::default()
    });
    // Two broken traces of 4 hops fill the bound; each new 5-hop trace evicts both.
    report_at(&c, missing_callee(660), NOW);
    report_at(&c, missing_callee(661), NOW);
    report_at(
        &c,
        healthy_chain(&trace_id(662), base(), ""),
        NOW + late_window_ms(),
    );
    let stats = c.core.lock().stats;
    assert_eq!(stats.traces_evicted, 2);
    assert_eq!(stats.traces_evicted_cut_short, 0);
    assert_eq!(hop_missing_count(&c), 2);
    // While fresh: cut short.
    report_at(&c, missing_callee(663), NOW + 3_000);
    report_at(
        &c,
        healthy_chain(&trace_id(664), base(), ""),
        NOW + 3_000 + late_window_ms() - 1,
    );
    // 662 (healthy, quiet 1 s) and 663 (broken, quiet 1999 ms) are evicted cut short.
    let stats = c.core.lock().stats;
    assert_eq!(stats.traces_evicted, 4);
    assert_eq!(stats.traces_evicted_cut_short, 2);
    assert_eq!(hop_missing_count(&c), 2);
}

#[test]
fn late_hop_window_is_at_most_trace_quiet() {
    // With --trace-quiet 1s, a trace quiet for 1 s is complete (a poll would analyse it
    // in full), even though LATE_HOP_WINDOW is longer.
    let limits = Limits {
        max_open_traces: 1,
        trace_quiet: Duration::from_secs(1),
        ..Limits::default()
    };
    assert!(LATE_HOP_WINDOW > limits.trace_quiet);
    assert_eq!(limits.complete_after(), Duration::from_secs(1));
    let mut core = Core::new(limits);
    core.ingest(&missing_callee(670), NOW);
    let (_, evicted) = core.ingest(&missing_callee(671), NOW + 999);
    assert!(evicted[0].findings.is_empty(), "quiet 999 ms: cut short");
    let (_, evicted) = core.ingest(&missing_callee(672), NOW + 999 + 1_000);
    assert_eq!(kinds(&evicted[0].findings), vec![BreakKind::HopMissing]);
    assert_eq!(core.stats.traces_evicted_cut_short, 1);
}
