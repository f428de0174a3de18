//! APP_ERROR (and the gRPC side of UPSTREAM_FAILURE) on constructed chains: the origin of
//! an error no Envoy made, its severity, and the negatives (4xx, gRPC client statuses,
//! Envoy-made failures, policy refusals).

mod common;

use common::*;
use hopwatch_collector::analysis::Finding;
use hopwatch_collector::core::{Core, Limits};
use hopwatch_proto::v1::{BreakKind, Hop, Protocol, Severity};

const NOW: u64 = 1_900_000_000_000;

fn run(hops: &[Hop]) -> Vec<Finding> {
    let mut core = Core::new(Limits::default());
    core.ingest(hops, NOW);
    core.flush_all(NOW)
        .into_iter()
        .flat_map(|r| r.findings)
        .collect()
}

fn of(f: &[Finding], kind: BreakKind) -> Vec<&Finding> {
    f.iter().filter(|f| f.kind == kind).collect()
}

fn base() -> u64 {
    NOW * 1000 - 10_000_000
}

/// productpage → reviews → ratings where ratings' app answered `code` and every
/// caller passed it on (hops 0..=4 as in `healthy_chain`).
fn failing_chain(n: u32, code: u32, grpc: Option<u32>) -> Vec<Hop> {
    let mut hops = healthy_chain(&trace_id(n), base(), "dev");
    for h in hops.iter_mut() {
        h.response_code = 502;
    }
    hops[4].response_code = code;
    hops[3].response_code = code;
    if let Some(g) = grpc {
        for h in hops[3..=4].iter_mut() {
            h.protocol = Protocol::Grpc as i32;
            h.grpc_status = Some(g);
            h.grpc_message = "db down".into();
        }
    }
    hops
}

#[test]
fn a_500_passed_on_by_two_callers_is_an_app_error_at_its_origin_only() {
    let f = run(&failing_chain(1, 500, None));
    let app = of(&f, BreakKind::AppError);
    assert_eq!(app.len(), 1, "{f:#?}");
    let a = app[0];
    assert_eq!(
        (a.workload.as_str(), a.peer.as_str()),
        ("ratings-v1", "reviews-v1")
    );
    assert_eq!(a.severity, Severity::Error, "it reached the edge");
    assert!(
        a.summary.contains("answered 500 to reviews-v1"),
        "{}",
        a.summary
    );
    assert!(
        a.summary
            .contains("passed on by reviews-v1, productpage-v1"),
        "{}",
        a.summary
    );
    assert!(a.flags.is_empty());
    assert!(of(&f, BreakKind::UpstreamFailure).is_empty(), "{f:#?}");
}

#[test]
fn an_error_a_caller_absorbed_is_a_warning() {
    let mut hops = failing_chain(2, 503, None);
    // reviews answers 200 despite its failed call; so does productpage.
    for h in hops[0..=2].iter_mut() {
        h.response_code = 200;
    }
    let f = run(&hops);
    let app = of(&f, BreakKind::AppError);
    assert_eq!(app.len(), 1, "{f:#?}");
    assert_eq!(app[0].workload, "ratings-v1");
    assert_eq!(app[0].severity, Severity::Warning);
    assert!(app[0].summary.contains("absorbed"), "{}", app[0].summary);
}

#[test]
fn grpc_server_errors_are_app_errors_client_statuses_are_not() {
    let f = run(&failing_chain(3, 200, Some(13)));
    let app = of(&f, BreakKind::AppError);
    assert_eq!(app.len(), 1, "{f:#?}");
    assert!(
        app[0]
            .summary
            .contains("answered gRPC INTERNAL (13, HTTP 200) \"db down\""),
        "{}",
        app[0].summary
    );
    // NOT_FOUND from ratings, while the callers still fail: the origin is unknown to
    // APP_ERROR below reviews, so it is reviews' own 502.
    let f = run(&failing_chain(4, 200, Some(5)));
    let app = of(&f, BreakKind::AppError);
    assert_eq!(app.len(), 1, "{f:#?}");
    assert_eq!(app[0].workload, "reviews-v1", "{f:#?}");
    // A 4xx answer is not an error; nothing failed above it either.
    let mut hops = healthy_chain(&trace_id(5), base(), "dev");
    hops[4].response_code = 404;
    hops[3].response_code = 404;
    let f = run(&hops);
    assert!(of(&f, BreakKind::AppError).is_empty(), "{f:#?}");
    let mut hops = healthy_chain(&trace_id(6), base(), "dev");
    for h in hops[3..=4].iter_mut() {
        h.protocol = Protocol::Grpc as i32;
        h.grpc_status = Some(5);
    }
    assert!(run(&hops).is_empty(), "a gRPC NOT_FOUND alone is an answer");
}

#[test]
fn envoy_made_failures_are_upstream_failures_not_app_errors() {
    let mut hops = failing_chain(7, 503, None);
    hops[4].response_flags = 1 << 5; // UF
    hops[4].response_code_details =
        "upstream_reset_before_response_started{remote_connection_failure}".into();
    let f = run(&hops);
    assert!(of(&f, BreakKind::AppError).is_empty(), "{f:#?}");
    let up = of(&f, BreakKind::UpstreamFailure);
    assert_eq!(up.len(), 1, "{f:#?}");
    assert_eq!(up[0].workload, "ratings-v1");
}

#[test]
fn grpc_upstream_failures_name_the_code_with_hints_per_flag() {
    // reviews' sidecar answered reviews' gRPC call to ratings itself: trailers-only 200
    // with grpc-status 14 and UH; ratings has no inbound hop.
    let mut hops = healthy_chain(&trace_id(8), base(), "dev");
    hops.truncate(4);
    let h = &mut hops[3];
    h.protocol = Protocol::Grpc as i32;
    h.grpc_status = Some(14);
    h.grpc_message = "no healthy upstream".into();
    h.response_flags = 1 << 1; // UH
    h.response_code_details = "no_healthy_upstream".into();
    h.upstream_host.clear();
    for h in hops[0..=2].iter_mut() {
        h.response_code = 502;
    }
    let f = run(&hops);
    let up = of(&f, BreakKind::UpstreamFailure);
    assert_eq!(up.len(), 1, "{f:#?}");
    let u = up[0];
    assert_eq!(
        (u.workload.as_str(), u.peer.as_str()),
        ("reviews-v1", "ratings")
    );
    assert!(
        u.summary
            .contains("gRPC UNAVAILABLE (14, HTTP 200) \"no healthy upstream\" UH"),
        "{}",
        u.summary
    );
    assert!(
        u.hint
            .starts_with("gRPC UNAVAILABLE from the sidecar itself (UH)"),
        "{}",
        u.hint
    );
    assert!(of(&f, BreakKind::AppError).is_empty(), "{f:#?}");
    assert!(of(&f, BreakKind::HopMissing).is_empty(), "{f:#?}");

    // DEADLINE_EXCEEDED with UT: the route timeout.
    let mut hops = healthy_chain(&trace_id(9), base(), "dev");
    hops.truncate(4);
    let h = &mut hops[3];
    h.protocol = Protocol::Grpc as i32;
    h.grpc_status = Some(4);
    h.response_flags = 1 << 2; // UT
    let f = run(&hops);
    let up = of(&f, BreakKind::UpstreamFailure);
    assert_eq!(up.len(), 1, "{f:#?}");
    assert!(up[0].hint.contains("route timeout fired"), "{}", up[0].hint);
}

#[test]
fn the_cli_shows_protocol_and_grpc_status_per_hop_and_takes_the_new_kinds() {
    use hopwatch_collector::cli;
    use hopwatch_proto::v1::GetTraceResponse;
    let t = trace_id(10);
    let hops = failing_chain(10, 200, Some(13));
    let mut core = Core::new(Limits::default());
    core.ingest(&hops, NOW);
    core.flush_all(NOW);
    let v = core.trace(&t, NOW).expect("trace");
    // gRPC server errors count as errors of their workload (HTTP 200 on the wire).
    let stats = core.workload_stats();
    let ratings = stats
        .iter()
        .find(|((_, w), _)| w == "ratings-v1")
        .expect("ratings stats");
    assert_eq!(ratings.1.errors, 1);
    let tree = cli::trace_tree(&GetTraceResponse {
        trace_id: t.clone(),
        roots: v.roots.clone(),
        breaks: vec![],
        hop_count: v.hop_count,
        open: v.open,
        ..Default::default()
    });
    assert!(
        tree.contains("reviews-v1 → ratings-v1  gRPC GET /ratings  200 grpc=INTERNAL(13)"),
        "{tree}"
    );
    assert!(tree.contains("✗ APP_ERROR"), "{tree}");
    assert!(
        tree.contains("→ productpage-v1 (edge)  HTTP GET /productpage  502"),
        "{tree}"
    );
    let ratings = &v.roots[0].children[0].children[0];
    let j = cli::hop_json(ratings.inbound.as_ref().unwrap());
    assert_eq!(j["protocol"], "gRPC");
    assert_eq!(j["grpc_status"], "INTERNAL");
    assert_eq!(j["grpc_message"], "db down");
    assert_eq!(cli::parse_kind("app-error"), Ok(BreakKind::AppError));
    assert_eq!(
        cli::parse_kind("POLICY_DENIED"),
        Ok(BreakKind::PolicyDenied)
    );
    let err = cli::parse_kind("nope").unwrap_err();
    assert!(
        err.contains("APP_ERROR") && err.contains("POLICY_DENIED"),
        "{err}"
    );
}
