//! Chains whose apps propagate only another tracer's trace id (`sw8`, `uber-trace-id`,
//! `x-datadog-trace-id`) or a custom correlation id: grouped into one trace by that id,
//! and the tag restored through it reported by name.

mod common;

use common::*;
use hopwatch_collector::analysis::Finding;
use hopwatch_collector::core::{Core, Limits};
use hopwatch_proto::v1::{BreakKind, Hop, Severity, TagSource};

const NOW: u64 = 1_900_000_000_000;

fn base() -> u64 {
    NOW * 1000 - 10_000_000
}

/// Analyses `hops`: (number of trace groups, findings).
fn run(hops: &[Hop]) -> (usize, Vec<Finding>) {
    let mut core = Core::new(Limits::default());
    core.ingest(hops, NOW);
    let results = core.flush_all(NOW);
    let n = results.len();
    (n, results.into_iter().flat_map(|r| r.findings).collect())
}

/// The healthy chain with its B3 trace id moved to another id field, and a fresh
/// request id per hop (Envoy's, when the apps do not copy x-request-id).
fn chain_by(set: impl Fn(&mut Hop, &str)) -> Vec<Hop> {
    let t = trace_id(900);
    let mut hops = healthy_chain(&t, base(), "dev.proj1");
    for (i, h) in hops.iter_mut().enumerate() {
        h.trace_id.clear();
        h.request_id = format!("rid-{i}");
        set(h, &t);
    }
    hops
}

/// Sets one id field of a hop (given the chain's trace id).
type SetId = Box<dyn Fn(&mut Hop, &str)>;

#[test]
fn other_tracers_ids_and_custom_ids_keep_a_chain_in_one_trace() {
    let cases: [(&str, SetId); 4] = [
        (
            "sw8",
            Box::new(|h: &mut Hop, t: &str| h.sw8_trace_id = format!("{t}.1.1")),
        ),
        (
            "uber",
            Box::new(|h: &mut Hop, t: &str| h.uber_trace_id = t.into()),
        ),
        (
            "datadog",
            Box::new(|h: &mut Hop, _: &str| h.datadog_trace_id = "8394218813201287436".into()),
        ),
        (
            "custom",
            Box::new(|h: &mut Hop, _: &str| h.correlation_id = "my-trace-id=order-1".into()),
        ),
    ];
    for (what, set) in cases {
        let (groups, findings) = run(&chain_by(set));
        assert_eq!(groups, 1, "{what}: one trace");
        assert!(findings.is_empty(), "{what}: {findings:?}");
    }
    // Without any of them, the fresh request ids split the chain.
    let (groups, _) = run(&chain_by(|_, _| {}));
    assert!(groups > 1);
}

#[test]
fn tag_restored_through_another_tracers_id_names_it() {
    for (source, said) in [
        (TagSource::CorrelatedSw8, "SkyWalking sw8"),
        (TagSource::CorrelatedUber, "Jaeger uber-trace-id"),
        (TagSource::CorrelatedDatadog, "Datadog x-datadog-trace-id"),
        (
            TagSource::CorrelatedHeader,
            "pass-through correlation header",
        ),
    ] {
        let mut hops = chain_by(|h, t| h.sw8_trace_id = format!("{t}.1.1"));
        hops[3].tag_received.clear();
        hops[3].tag_source = source as i32;
        let (_, f) = run(&hops);
        let kinds: Vec<BreakKind> = f.iter().map(|f| f.kind).collect();
        assert_eq!(kinds, vec![BreakKind::TagNotPropagated], "{source:?}");
        assert_eq!(f[0].severity, Severity::Warning);
        assert_eq!(
            (f[0].workload.as_str(), f[0].peer.as_str()),
            ("reviews-v1", "ratings")
        );
        assert!(f[0].summary.contains(said), "{source:?}: {}", f[0].summary);
    }
}

#[test]
fn tag_found_in_baggage_or_an_alias_counts_as_carried() {
    for source in [
        TagSource::Baggage,
        TagSource::AliasCookie,
        TagSource::AliasHeader,
        TagSource::AliasBaggage,
    ] {
        let mut hops = healthy_chain(&trace_id(901), base(), "dev.proj1");
        hops[3].tag_received.clear();
        hops[3].tag_source = source as i32;
        let (_, f) = run(&hops);
        assert!(f.is_empty(), "{source:?}: {f:?}");
        // A different tag found there is a changed tag.
        hops[3].tag_sent = "dev.other".into();
        hops[4].tag_received = "dev.other".into();
        hops[4].tag_sent = "dev.other".into();
        let (_, f) = run(&hops);
        let kinds: Vec<BreakKind> = f.iter().map(|f| f.kind).collect();
        assert_eq!(kinds, vec![BreakKind::TagChanged], "{source:?}");
    }
}
