//! What Prometheus and Grafana rely on: `/metrics` of a running collector with findings
//! passes `promtool check metrics`; `hopwatch_breaks_total` counts occurrences; the shipped
//! PrometheusRule's groups pass `promtool check rules`; and every `hopwatch_*` metric the
//! rules and the Grafana dashboard use is one the collector exports.
//!
//! Needs `promtool` (Debian package `prometheus`; `scripts/ensure-tools.sh` installs it).

mod common;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use hopwatch_proto::v1::collector_client::CollectorClient;
use hopwatch_proto::v1::{Hop, ReportRequest};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("collector has a parent")
        .to_path_buf()
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): install it with `source scripts/ensure-tools.sh` (Debian package prometheus)")
        });
    {
        let mut i = child.stdin.take().expect("stdin");
        if let Some(s) = stdin {
            i.write_all(s.as_bytes()).expect("write promtool stdin");
        }
    }
    let o = child.wait_with_output().expect("promtool output");
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// GET with an `Accept` header; returns (content-type, body).
async fn get_metrics(addr: SocketAddr, accept: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: x\r\nAccept: {accept}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("HTTP response");
    let ct = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    (ct, body.to_string())
}

fn failing_chain(t: &str) -> Vec<Hop> {
    let mut hops = healthy_chain(t, base_us(), "dev");
    hops[4].response_code = 503;
    hops[4].response_flags = 1 << 5; // UF
    hops[3].response_code = 503;
    hops[1].response_code = 503;
    hops[0].response_code = 503;
    hops
}

/// The value of the sample whose line starts with `prefix` (name and labels).
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

/// Metric names `hopwatch_*` / `process_*` used in a PromQL expression.
fn used_metrics(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let start_ok = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
        let rest = &expr[i..];
        if start_ok && (rest.starts_with("hopwatch_") || rest.starts_with("process_")) {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            out.insert(rest[..end].to_string());
            i += end;
        } else {
            i += 1;
        }
    }
    out
}

/// Exported series names: sample names of the text format (with `_bucket` etc.).
fn exported_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// The rule with this alert name.
fn rule<'a>(groups: &'a serde_json::Value, alert: &str) -> &'a serde_json::Value {
    groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .find(|r| r["alert"] == alert)
        .unwrap_or_else(|| panic!("no alert {alert}"))
}

/// Expands the two template forms the finding alerts use.
fn expand(template: &str, labels: &[(&str, &str)], value: &str) -> String {
    let mut s = template.replace("{{ $value | humanize }}", value);
    for (k, v) in labels {
        s = s.replace(&format!("{{{{ $labels.{k} }}}}"), v);
    }
    assert!(!s.contains("{{"), "unexpanded template in {s}");
    s
}

/// A `promtool test rules` file (rules in `rules.yaml` beside it): UPSTREAM_FAILURE at
/// shop/recommendations keeps occurring (+3 a minute), TAG_NOT_PROPAGATED at shop/cart
/// happened once and stopped.
fn alert_unit_test(groups: &serde_json::Value) -> String {
    let place = [
        ("namespace", "shop"),
        ("workload", "recommendations"),
        ("peer", "recommendations"),
    ];
    let r = rule(groups, "HopwatchUpstreamFailureError");
    // 10 one-minute steps of +3 in the 10m window ending at 15m: increase = 30.
    let annotations = serde_json::json!({
        "summary": expand(r["annotations"]["summary"].as_str().unwrap(), &place, "30"),
        "description": expand(r["annotations"]["description"].as_str().unwrap(), &place, "30"),
    });
    let test = serde_json::json!({
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {
                    "series": "hopwatch_breaks_total{kind=\"UPSTREAM_FAILURE\",severity=\"ERROR\",namespace=\"shop\",workload=\"recommendations\",peer=\"recommendations\"}",
                    "values": "0+3x20",
                },
                {
                    "series": "hopwatch_breaks_total{kind=\"TAG_NOT_PROPAGATED\",severity=\"WARNING\",namespace=\"shop\",workload=\"cart\",peer=\"pricing\"}",
                    "values": "1x20",
                },
            ],
            "alert_rule_test": [
                {
                    "eval_time": "15m",
                    "alertname": "HopwatchUpstreamFailureError",
                    "exp_alerts": [{
                        "exp_labels": {
                            "severity": "critical", "kind": "UPSTREAM_FAILURE",
                            "namespace": "shop", "workload": "recommendations", "peer": "recommendations",
                        },
                        "exp_annotations": annotations,
                    }],
                },
                { "eval_time": "15m", "alertname": "HopwatchUpstreamFailureWarning", "exp_alerts": [] },
                { "eval_time": "15m", "alertname": "HopwatchTagNotPropagatedWarning", "exp_alerts": [] },
            ],
        }],
    });
    serde_json::to_string(&test).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_rules_and_dashboard_use_exported_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(fast_settings(), dir.path()).await;
    let mut c = CollectorClient::connect(s.url()).await.unwrap();
    // Two traces with the same break: two occurrences of one finding.
    for n in [1, 2] {
        c.report(ReportRequest {
            hops: failing_chain(&trace_id(900 + n)),
            dropped_since_last_batch: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let uf = "hopwatch_breaks_total{kind=\"UPSTREAM_FAILURE\",severity=\"ERROR\",namespace=\"default\",workload=\"ratings-v1\",";
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let (_, text) = get_metrics(s.http, "text/plain").await;
        if sample(&text, uf) == Some(2.0) {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no 2 occurrences of {uf} in:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // promtool lints the Prometheus text format: no problem at all.
    let (ok, out) = promtool(&["check", "metrics"], Some(&text));
    assert!(
        ok && out.trim().is_empty(),
        "promtool check metrics:\n{out}\n---\n{text}"
    );
    // What the issue named: durations in seconds, no gauge called _total, process and
    // build info.
    for want in [
        "# TYPE hopwatch_breaks_total counter",
        "# TYPE hopwatch_ingest_lag_seconds histogram",
        "hopwatch_ingest_lag_seconds_count 2",
        "hopwatch_reports_dropped_by_filters_total 4",
        "hopwatch_findings{kind=\"UPSTREAM_FAILURE\"} 1",
        "hopwatch_build_info{version=\"",
        "process_resident_memory_bytes ",
        "process_cpu_seconds_total ",
        "process_start_time_seconds ",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    assert!(!text.contains("milliseconds"), "{text}");
    for l in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut f = l.split_whitespace().skip(2);
        let (name, ty) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
        assert!(
            !(name.ends_with("_total") && ty != "counter"),
            "non-counter named _total: {l}"
        );
    }
    // OpenMetrics when the scraper asks for it (Prometheus does by default).
    let (ct, om) = get_metrics(
        s.http,
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    )
    .await;
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains(uf), "{om}");

    // The PrometheusRule's groups pass promtool check rules.
    let rule_file = repo_root().join("envoyfilter-manifests/monitoring/prometheusrule.yaml");
    let rule: serde_json::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(&rule_file).unwrap()).unwrap();
    assert_eq!(rule["kind"], "PrometheusRule");
    let groups = serde_json::json!({ "groups": rule["spec"]["groups"] });
    let tmp = dir.path().join("rules.yaml");
    std::fs::write(&tmp, serde_json::to_string(&groups).unwrap()).unwrap();
    let (ok, out) = promtool(&["check", "rules", tmp.to_str().unwrap()], None);
    assert!(ok, "promtool check rules:\n{out}");
    assert!(out.contains("SUCCESS"), "{out}");
    eprintln!("promtool check rules: {}", out.trim());

    // The alerts fire as meant (`promtool test rules`): a finding that keeps occurring
    // fires its kind/severity alert with the finding's place as labels; one that stopped
    // occurring does not.
    let alert_test = alert_unit_test(&groups);
    let test_file = dir.path().join("rules_test.yaml");
    std::fs::write(&test_file, alert_test).unwrap();
    let (ok, out) = promtool(&["test", "rules", test_file.to_str().unwrap()], None);
    assert!(ok, "promtool test rules:\n{out}");
    eprintln!("promtool test rules: {}", out.trim());

    // One alert per break kind and severity, on the occurrence counter.
    let rules: Vec<&serde_json::Value> = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .collect();
    let kinds: Vec<&str> = (1..)
        .map_while(|k| hopwatch_proto::v1::BreakKind::try_from(k).ok())
        .map(|k| k.as_str_name())
        .collect();
    for k in &kinds {
        for sev in ["ERROR", "WARNING", "INFO"] {
            let want = format!("kind=\"{k}\", severity=\"{sev}\"");
            assert!(
                rules
                    .iter()
                    .any(|r| r["expr"].as_str().unwrap_or("").contains(&want)),
                "no alert for {want}"
            );
        }
    }

    // Every hopwatch_/process_ metric used by the rules and the dashboard is exported.
    let exported = exported_names(&text);
    let dashboard_file =
        repo_root().join("envoyfilter-manifests/monitoring/hopwatch-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dashboard_file).unwrap()).unwrap();
    let mut exprs: Vec<String> = rules
        .iter()
        .filter_map(|r| r["expr"].as_str().map(str::to_string))
        .collect();
    let panels = dashboard["panels"].as_array().expect("dashboard panels");
    assert!(panels.len() >= 8, "{}", panels.len());
    for p in panels {
        for t in p["targets"].as_array().expect("panel targets") {
            exprs.push(t["expr"].as_str().expect("target expr").to_string());
        }
    }
    for v in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"].as_str() {
            exprs.push(q.to_string());
        }
    }
    let mut missing = Vec::new();
    for e in &exprs {
        for m in used_metrics(e) {
            if !exported.contains(&m) {
                missing.push(format!("{m} (in {e})"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "used but not exported:\n{}",
        missing.join("\n")
    );
    // The dashboard also charts the filters' Envoy stats.
    assert!(
        exprs
            .iter()
            .any(|e| e.contains("envoy_wasmcustom_hopwatch_")),
        "no panel on the filters' Envoy stats"
    );
    s.stop().await;
}
