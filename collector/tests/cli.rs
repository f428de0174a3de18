//! The `hopwatch` binary against a running (in-process) collector.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use hopwatch_proto::v1::collector_client::CollectorClient;
use hopwatch_proto::v1::query_client::QueryClient;
use hopwatch_proto::v1::{Hop, ListBreaksRequest, ReportRequest};

async fn hopwatch(args: &[&str]) -> Output {
    hopwatch_env(args, &[]).await
}

/// `hopwatch` with a clean environment (no collector, colour or width settings) plus `env`.
async fn hopwatch_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_hopwatch"))
            .args(&args)
            .env_remove("HOPWATCH_COLLECTOR")
            .env_remove("NO_COLOR")
            .env_remove("COLUMNS")
            .envs(env)
            .output()
            .expect("run hopwatch")
    })
    .await
    .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn broken_chain(t: &str) -> Vec<Hop> {
    let mut hops = healthy_chain(t, base_us(), "dev.proj1");
    hops[4].response_code = 503;
    hops[4].response_flags = 1 << 5; // UF
    hops[3].response_code = 503;
    // reviews' app dropped the tag; the filter restored it.
    hops[3].tag_source = hopwatch_proto::v1::TagSource::Correlated as i32;
    hops
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_against_a_running_collector() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(fast_settings(), dir.path()).await;
    let url = s.url();
    let t = trace_id(7);
    let mut c = CollectorClient::connect(url.clone()).await.unwrap();
    c.report(ReportRequest {
        hops: broken_chain(&t),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut q = QueryClient::connect(url.clone()).await.unwrap();
    for _ in 0..100 {
        if q.list_breaks(ListBreaksRequest::default())
            .await
            .unwrap()
            .into_inner()
            .breaks
            .len()
            >= 2
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // breaks --output json: one array with the contract fields, enums by name.
    let o = hopwatch(&["--collector", &url, "breaks", "--output", "json"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json array");
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 2, "{v}");
    for b in arr {
        for k in [
            "kind",
            "severity",
            "workload",
            "namespace",
            "peer",
            "count",
            "trace_ids",
            "flags",
            "summary",
            "hint",
        ] {
            assert!(b.get(k).is_some(), "missing {k} in {b}");
        }
    }
    let uf = arr
        .iter()
        .find(|b| b["kind"] == "UPSTREAM_FAILURE")
        .expect("UPSTREAM_FAILURE");
    assert_eq!(uf["severity"], "ERROR");
    assert_eq!(uf["workload"], "ratings-v1");
    assert_eq!(uf["namespace"], NS);
    assert_eq!(uf["count"], 1);
    assert_eq!(uf["flags"], serde_json::json!(["UF"]));
    assert_eq!(uf["trace_ids"], serde_json::json!([t]));
    let tnp = arr
        .iter()
        .find(|b| b["kind"] == "TAG_NOT_PROPAGATED")
        .expect("TAG_NOT_PROPAGATED");
    assert_eq!(tnp["severity"], "WARNING");
    assert_eq!(tnp["peer"], "ratings");

    // Filters.
    let o = hopwatch(&[
        "--collector",
        &url,
        "breaks",
        "--kind",
        "tag_not_propagated",
        "--workload",
        "reviews-v1",
        "--namespace",
        NS,
        "--since",
        "1h",
        "--limit",
        "5",
        "--output",
        "json",
    ])
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);

    // Table.
    let o = hopwatch(&["--collector", &url, "breaks"]).await;
    assert!(o.status.success());
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("SEVERITY  KIND"), "{out}");
    assert_eq!(lines.len(), 3, "{out}");
    let col = lines[0].find("WORKLOAD").unwrap();
    assert!(
        lines[1][col..].starts_with("ratings-v1") || lines[1][col..].starts_with("reviews-v1"),
        "aligned:\n{out}"
    );
    println!("{out}");

    // Trace tree and json.
    let o = hopwatch(&["--collector", &url, "trace", &t]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let tree = stdout(&o);
    println!("{tree}");
    assert!(tree.contains("✗ UPSTREAM_FAILURE"), "{tree}");
    assert!(tree.contains("reviews-v1 → ratings-v1"), "{tree}");
    assert!(tree.contains("└─ "), "{tree}");
    let o = hopwatch(&["--collector", &url, "trace", &t, "--output", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["trace_id"], t.as_str());
    assert_eq!(v["hop_count"], 5);
    assert_eq!(
        v["roots"][0]["children"][0]["children"][0]["breaks"],
        serde_json::json!(["TAG_NOT_PROPAGATED", "UPSTREAM_FAILURE"])
    );

    // Summary.
    let o = hopwatch(&["--collector", &url, "summary", "--output", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["hops_received"], 5);
    assert_eq!(v["findings"], 2);
    let o = hopwatch(&["--collector", &url, "summary"]).await;
    assert!(stdout(&o).contains("NAMESPACE  WORKLOAD"), "{}", stdout(&o));

    // $HOPWATCH_COLLECTOR is the default.
    let url2 = url.clone();
    let o = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_hopwatch"))
            .args(["breaks", "--output", "json"])
            .env("HOPWATCH_COLLECTOR", url2)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    // host:port without a scheme.
    let o = hopwatch(&["--collector", url.trim_start_matches("http://"), "summary"]).await;
    assert!(o.status.success(), "{}", stderr(&o));

    // Errors: unknown trace, bad kind.
    let o = hopwatch(&["--collector", &url, "trace", "0123456789abcdef"]).await;
    assert!(!o.status.success());
    let e = stderr(&o);
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(e.contains("0123456789abcdef"), "{e}");
    let o = hopwatch(&["--collector", &url, "breaks", "--kind", "NOPE"]).await;
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("TAG_DROPPED") && stderr(&o).contains("UPSTREAM_FAILURE"),
        "{}",
        stderr(&o)
    );

    // watch: lists the current findings, then streams changes as they are recorded.
    let url3 = url.clone();
    let child = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_hopwatch"))
            .args([
                "--collector",
                &url3,
                "watch",
                "--output",
                "json",
                "--interval",
                "300ms",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    })
    .await
    .unwrap();
    // Keep producing the same break until the watcher (which needs a moment to start and
    // subscribe) has printed one.
    let mut c2 = c.clone();
    let producer = tokio::spawn(async move {
        for i in 0..40u32 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let _ = c2
                .report(ReportRequest {
                    hops: broken_chain(&trace_id(100 + i)),
                    ..Default::default()
                })
                .await;
        }
    });
    let line = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut child = child;
        let mut r = std::io::BufReader::new(child.stdout.take().unwrap());
        // The first lines are the listed findings (count 1, event "new").
        let mut first = String::new();
        r.read_line(&mut first).unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap() == 0 {
                break;
            }
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v["count"].as_u64().unwrap_or(0) >= 2 {
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        let v: serde_json::Value = serde_json::from_str(&first).unwrap();
        assert_eq!(v["event"], "new", "{v}");
        assert_eq!(v["count"], 1, "{v}");
        line
    });
    let line = tokio::time::timeout(Duration::from_secs(15), line)
        .await
        .expect("a watched break")
        .unwrap();
    producer.abort();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert!(v["count"].as_u64().unwrap() >= 2, "{v}");
    assert_eq!(v["event"], "changed", "{v}");
    assert!(
        v["kind"] == "UPSTREAM_FAILURE" || v["kind"] == "TAG_NOT_PROPAGATED",
        "{v}"
    );

    s.stop().await;
}

#[tokio::test]
async fn unreachable_collector_is_one_clear_line() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let url = format!("http://{addr}");
    let o = hopwatch(&["--collector", &url, "breaks"]).await;
    assert!(!o.status.success());
    let e = stderr(&o);
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(e.contains(&url) && e.contains("--collector"), "{e}");
    let o = hopwatch(&["--collector", "not a url", "summary"]).await;
    assert!(!o.status.success());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The real server binary: serves, persists, and exits 0 on SIGTERM after analysing the
/// open traces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_binary_sigterm_flushes_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (g, h) = (free_port(), free_port());
    let spawn = |dir: std::path::PathBuf| {
        Command::new(env!("CARGO_BIN_EXE_hopwatch-collector"))
            .args([
                "--listen",
                &format!("127.0.0.1:{g}"),
                "--http-listen",
                &format!("127.0.0.1:{h}"),
            ])
            .arg("--data-dir")
            .arg(dir)
            .args(["--trace-quiet", "1h"])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let url = format!("http://127.0.0.1:{g}");
    let connect = |url: String| async move {
        for _ in 0..100 {
            if let Ok(c) = CollectorClient::connect(url.clone()).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("server did not start");
    };
    let mut child = spawn(dir.path().to_path_buf());
    let mut c = connect(url.clone()).await;
    c.report(ReportRequest {
        hops: broken_chain(&trace_id(9)),
        ..Default::default()
    })
    .await
    .unwrap();
    let o = hopwatch(&["--collector", &url, "breaks", "--output", "json"]).await;
    assert_eq!(stdout(&o).trim(), "[]", "trace still open (quiet 1h)");
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");

    let mut child = spawn(dir.path().to_path_buf());
    let _ = connect(url.clone()).await;
    let o = hopwatch(&["--collector", &url, "breaks", "--output", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2, "{v}");
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());
}

/// A collector with the broken chain's two findings (UPSTREAM_FAILURE ERROR at ratings-v1,
/// TAG_NOT_PROPAGATED WARNING at reviews-v1).
async fn server_with_findings(dir: &std::path::Path) -> TestServer {
    let s = TestServer::start(fast_settings(), dir).await;
    let mut c = CollectorClient::connect(s.url()).await.unwrap();
    c.report(ReportRequest {
        hops: broken_chain(&trace_id(7)),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut q = QueryClient::connect(s.url()).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while q
        .list_breaks(ListBreaksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .breaks
        .len()
        < 2
    {
        assert!(
            std::time::Instant::now() < deadline,
            "findings not recorded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_short_flags_yaml_and_wide() {
    let dir = tempfile::tempdir().unwrap();
    let s = server_with_findings(dir.path()).await;
    let url = s.url();
    // -o is --output, -n is --namespace; yaml is the same document as json.
    let long = hopwatch(&[
        "--collector",
        &url,
        "breaks",
        "--namespace",
        NS,
        "--output",
        "json",
    ])
    .await;
    let short = hopwatch(&["--collector", &url, "breaks", "-n", NS, "-o", "json"]).await;
    assert!(short.status.success(), "{}", stderr(&short));
    assert_eq!(stdout(&long), stdout(&short));
    let json: serde_json::Value = serde_json::from_str(&stdout(&short)).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);
    let o = hopwatch(&["--collector", &url, "breaks", "-n", NS, "-o", "yaml"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let yaml: serde_json::Value = serde_yaml_ng::from_str(&stdout(&o)).expect("yaml");
    assert_eq!(yaml, json);
    let o = hopwatch(&[
        "--collector",
        &url,
        "breaks",
        "-n",
        "elsewhere",
        "-o",
        "json",
    ])
    .await;
    assert_eq!(stdout(&o).trim(), "[]");
    let t = trace_id(7);
    for (cmd, args) in [
        ("trace", vec!["trace", t.as_str()]),
        ("summary", vec!["summary"]),
    ] {
        let mut j = vec!["--collector", url.as_str()];
        j.extend(&args);
        let mut y = j.clone();
        j.extend(["-o", "json"]);
        y.extend(["-o", "yaml"]);
        let j = hopwatch(&j).await;
        let y = hopwatch(&y).await;
        assert!(y.status.success(), "{cmd}: {}", stderr(&y));
        let jv: serde_json::Value = serde_json::from_str(&stdout(&j)).unwrap();
        let yv: serde_json::Value = serde_yaml_ng::from_str(&stdout(&y)).unwrap();
        assert_eq!(jv, yv, "{cmd}");
    }

    // Fitted to the terminal width: every line within COLUMNS, the summary cut with "…".
    let o = hopwatch_env(&["--collector", &url, "breaks"], &[("COLUMNS", "100")]).await;
    let out = stdout(&o);
    for l in out.lines() {
        assert!(l.chars().count() <= 100, "{} chars: {l}", l.chars().count());
    }
    assert!(out.contains('…'), "{out}");
    // Not on a terminal and no COLUMNS: whole lines (for grep and files).
    let o = hopwatch(&["--collector", &url, "breaks"]).await;
    assert!(!stdout(&o).contains('…'), "{}", stdout(&o));
    // -o wide: more columns, nothing truncated even with a narrow COLUMNS.
    let o = hopwatch_env(
        &["--collector", &url, "breaks", "-o", "wide"],
        &[("COLUMNS", "60")],
    )
    .await;
    let out = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    let header = out.lines().next().unwrap();
    for col in ["FIRST SEEN", "TRACE", "SUMMARY", "HINT"] {
        assert!(header.contains(col), "{header}");
    }
    assert!(!out.contains('…') && out.contains(&t), "{out}");
    let o = hopwatch_env(
        &["--collector", &url, "summary", "-o", "wide"],
        &[("COLUMNS", "40")],
    )
    .await;
    assert!(
        o.status.success() && !stdout(&o).contains('…'),
        "{}",
        stdout(&o)
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_on_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let s = server_with_findings(dir.path()).await;
    let url = s.url();
    let code = |o: &Output| o.status.code().unwrap_or(-1);
    // An ERROR finding is listed: exit 3, after printing the list.
    let o = hopwatch(&[
        "--collector",
        &url,
        "breaks",
        "--fail-on",
        "error",
        "-o",
        "json",
    ])
    .await;
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&stdout(&o))
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert!(stderr(&o).contains("--fail-on error"), "{}", stderr(&o));
    // Only the WARNING finding listed: --fail-on error passes, --fail-on warning fails.
    let warn = [
        "--collector",
        &url,
        "breaks",
        "--kind",
        "TAG_NOT_PROPAGATED",
    ];
    let o = hopwatch(&[&warn[..], &["--fail-on", "error"]].concat()).await;
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = hopwatch(&[&warn[..], &["--fail-on", "warning"]].concat()).await;
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    let o = hopwatch(&[&warn[..], &["--fail-on", "info"]].concat()).await;
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    // Nothing listed: 0 whatever the threshold.
    let o = hopwatch(&[
        "--collector",
        &url,
        "breaks",
        "-n",
        "elsewhere",
        "--fail-on",
        "info",
    ])
    .await;
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // Usage errors: 2.
    for bad in [
        vec!["breaks", "--fail-on", "fatal"],
        vec!["breaks", "--no-such-flag"],
        vec!["breaks", "-o", "xml"],
        vec!["nosuchcommand"],
        vec!["--request-timeout", "soon", "summary"],
    ] {
        let mut a = vec!["--collector", url.as_str()];
        a.extend(bad.iter().copied());
        let o = hopwatch(&a).await;
        assert_eq!(code(&o), 2, "{bad:?}: {}", stderr(&o));
    }
    // The collector answers an error (unknown trace): 1.
    let o = hopwatch(&["--collector", &url, "trace", "feedfacefeedface"]).await;
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    s.stop().await;
    // Unreachable: 1.
    let o = hopwatch(&["--collector", &url, "breaks", "--fail-on", "error"]).await;
    assert_eq!(code(&o), 1, "{}", stderr(&o));
}

/// A listener on 127.0.0.1 that accepts connections and never answers.
fn silent_listener() -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    l.set_nonblocking(true).unwrap();
    let h = std::thread::spawn(move || {
        let mut held = Vec::new();
        let end = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < end {
            match l.accept() {
                Ok((c, _)) => held.push(c),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    (addr, h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_bounds_every_call() {
    let (addr, _h) = silent_listener();
    let url = format!("http://{addr}");
    for args in [
        vec!["breaks"],
        vec!["summary"],
        vec!["trace", "0af7651916cd43dd8448eb211c80319c"],
        vec!["watch"],
    ] {
        let mut a = vec!["--collector", url.as_str(), "--request-timeout", "700ms"];
        a.extend(args.iter().copied());
        let start = std::time::Instant::now();
        let o = tokio::time::timeout(Duration::from_secs(20), hopwatch(&a))
            .await
            .unwrap_or_else(|_| panic!("{args:?} hung past 20s with --request-timeout 700ms"));
        let took = start.elapsed();
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(e.contains("did not answer within 700ms"), "{args:?}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "{e}");
        // The bound holds (slack for process start on a loaded machine).
        assert!(took < Duration::from_secs(8), "{args:?} took {took:?}");
    }
    // The default is 10s.
    let o = hopwatch(&["breaks", "--help"]).await;
    assert!(stdout(&o).contains("[default: 10s]"), "{}", stdout(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_port_and_https_get_clear_lines() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(fast_settings(), dir.path()).await;
    // The HTTP port (metrics, web view) instead of the gRPC one.
    let o = hopwatch(&[
        "--collector",
        &format!("http://{}", s.http),
        "--request-timeout",
        "3s",
        "breaks",
    ])
    .await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("HTTP port") && e.contains("9090"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    // https:// speaks TLS: against the plaintext gRPC port it fails the handshake
    // instead of silently talking plaintext.
    let o = hopwatch(&[
        "--collector",
        &format!("https://{}", s.grpc),
        "--request-timeout",
        "3s",
        "summary",
    ])
    .await;
    assert_eq!(
        o.status.code(),
        Some(1),
        "https to a plaintext port succeeded: {}",
        stdout(&o)
    );
    let e = stderr(&o);
    assert!(e.contains("TLS"), "{e}");
    // The same port over http:// works.
    let o = hopwatch(&["--collector", &format!("http://{}", s.grpc), "summary"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let o = hopwatch(&["--collector", "ftp://127.0.0.1:1", "summary"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("http:// (plaintext) or https:// (TLS)"),
        "{}",
        stderr(&o)
    );
    s.stop().await;
}

/// Runs `hopwatch` under a pseudo-terminal (util-linux `script`), as a person would.
async fn hopwatch_on_a_tty(args: &[&str], no_color: bool) -> String {
    let bin = env!("CARGO_BIN_EXE_hopwatch");
    let cmd = std::iter::once(bin)
        .chain(args.iter().copied())
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let mut c = Command::new("script");
    c.args(["-qec", &cmd, "/dev/null"])
        .env_remove("NO_COLOR")
        .env_remove("COLUMNS")
        .env_remove("HOPWATCH_COLLECTOR");
    if no_color {
        c.env("NO_COLOR", "1");
    }
    let o = tokio::task::spawn_blocking(move || {
        c.output()
            .expect("run `script` (util-linux) to give hopwatch a terminal")
    })
    .await
    .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colour_only_on_a_terminal_and_never_with_no_color() {
    let dir = tempfile::tempdir().unwrap();
    let s = server_with_findings(dir.path()).await;
    let url = s.url();
    let esc = '\u{1b}';
    // A pipe: plain.
    let o = hopwatch(&["--collector", &url, "breaks"]).await;
    assert!(!stdout(&o).contains(esc), "{}", stdout(&o));
    // A terminal: ERROR in red.
    let tty = hopwatch_on_a_tty(&["--collector", &url, "breaks"], false).await;
    assert!(tty.contains("\u{1b}[31mERROR"), "{tty:?}");
    // NO_COLOR: never, not even on a terminal or with --color always.
    let tty = hopwatch_on_a_tty(&["--collector", &url, "breaks"], true).await;
    assert!(tty.contains("ERROR") && !tty.contains(esc), "{tty:?}");
    let o = hopwatch_env(
        &["--collector", &url, "--color", "always", "breaks"],
        &[("NO_COLOR", "1")],
    )
    .await;
    assert!(!stdout(&o).contains(esc));
    // --color always into a pipe; json is never coloured.
    let o = hopwatch(&["--collector", &url, "--color", "always", "breaks"]).await;
    assert!(stdout(&o).contains(esc));
    let o = hopwatch(&[
        "--collector",
        &url,
        "--color",
        "always",
        "breaks",
        "-o",
        "json",
    ])
    .await;
    assert!(!stdout(&o).contains(esc));
    s.stop().await;
}

#[tokio::test]
async fn completions_for_bash_zsh_fish() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef hopwatch"),
        ("fish", "complete -c hopwatch"),
    ] {
        let o = hopwatch(&["completions", shell]).await;
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
        let out = stdout(&o);
        assert!(out.contains(marker), "{shell}: {out}");
        // fish writes long options as `-l fail-on`.
        for word in ["breaks", "watch", "fail-on", "request-timeout"] {
            assert!(out.contains(word), "{shell} completion lacks {word}");
        }
    }
    // bash loads it.
    let bin = env!("CARGO_BIN_EXE_hopwatch");
    let o = Command::new("bash")
        .args([
            "-c",
            &format!("source <('{bin}' completions bash) && complete -p hopwatch"),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let o = hopwatch(&["completions", "tcsh"]).await;
    assert_eq!(o.status.code(), Some(2));
}

/// `watch` lists what exists, prints a finding that keeps occurring at most once per
/// interval, and survives a collector restart (reconnecting, then printing what is new).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_lists_throttles_and_reconnects() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let s = server_with_findings(dir.path()).await;
    let (grpc, url) = (s.grpc, s.url());
    let mut child = Command::new(env!("CARGO_BIN_EXE_hopwatch"))
        .args([
            "--collector",
            &url,
            "watch",
            "-o",
            "json",
            "--interval",
            "2s",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<(std::time::Instant, serde_json::Value)>();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&l) {
                let _ = tx.send((std::time::Instant::now(), v));
            }
        }
    });
    let next =
        |rx: &std::sync::mpsc::Receiver<_>, secs| rx.recv_timeout(Duration::from_secs(secs)).ok();
    // The two existing findings first.
    let mut first = Vec::new();
    for _ in 0..2 {
        let (_, v): (_, serde_json::Value) = next(&rx, 20).expect("listed findings");
        assert_eq!(v["event"], "new", "{v}");
        first.push(v["kind"].as_str().unwrap().to_string());
    }
    first.sort();
    assert_eq!(first, ["TAG_NOT_PROPAGATED", "UPSTREAM_FAILURE"]);

    // A burst of 20 more occurrences: per finding at most one line per 2s interval,
    // ending with the latest count (21).
    let mut c = CollectorClient::connect(url.clone()).await.unwrap();
    let burst = std::time::Instant::now();
    for i in 0..20 {
        c.report(ReportRequest {
            hops: broken_chain(&trace_id(500 + i)),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let mut lines: Vec<(std::time::Instant, serde_json::Value)> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while std::time::Instant::now() < deadline {
        let Some(x) = next(&rx, 1) else { continue };
        lines.push(x);
        let done = ["UPSTREAM_FAILURE", "TAG_NOT_PROPAGATED"].iter().all(|k| {
            lines
                .iter()
                .any(|(_, v)| v["kind"] == *k && v["count"] == 21)
        });
        if done {
            break;
        }
    }
    let span = burst.elapsed();
    for k in ["UPSTREAM_FAILURE", "TAG_NOT_PROPAGATED"] {
        let of: Vec<&serde_json::Value> = lines
            .iter()
            .filter(|(_, v)| v["kind"] == k)
            .map(|(_, v)| v)
            .collect();
        assert!(
            of.iter().any(|v| v["count"] == 21),
            "{k}: latest count not printed: {of:?}"
        );
        assert!(of.iter().all(|v| v["event"] == "changed"));
        let max = span.as_secs() / 2 + 2;
        assert!(
            of.len() as u64 <= max,
            "{k}: {} lines in {span:?} (interval 2s): {of:?}",
            of.len()
        );
        // Never two lines of one finding within the interval.
        let times: Vec<std::time::Instant> = lines
            .iter()
            .filter(|(_, v)| v["kind"] == k)
            .map(|(t, _)| *t)
            .collect();
        for w in times.windows(2) {
            assert!(
                w[1] - w[0] >= Duration::from_millis(1900),
                "{k}: two lines {:?} apart",
                w[1] - w[0]
            );
        }
    }

    // The collector restarts (same port, same data): watch reconnects and prints a new
    // finding recorded after the restart.
    s.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let collector = std::sync::Arc::new(
        hopwatch_collector::service::Collector::open(fast_settings(), dir.path()).unwrap(),
    );
    let g = tokio::net::TcpListener::bind(grpc)
        .await
        .expect("rebind the gRPC port");
    let h = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(hopwatch_collector::server::serve(
        collector,
        g,
        h,
        async move {
            let _ = stop_rx.await;
        },
    ));
    let mut c = CollectorClient::connect(url.clone()).await.unwrap();
    // reviews' own app refuses connections: a failure at reviews-v1 (a new finding).
    let mut other = healthy_chain(&trace_id(800), base_us(), "dev");
    other.truncate(3);
    other[2].response_code = 503;
    other[2].response_flags = 1 << 5; // UF
    other[1].response_code = 503;
    other[0].response_code = 503;
    c.report(ReportRequest {
        hops: other,
        ..Default::default()
    })
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut seen_new = None;
    while std::time::Instant::now() < deadline {
        let Some((_, v)) = next(&rx, 1) else { continue };
        if v["event"] == "new" {
            seen_new = Some(v);
            break;
        }
    }
    let v = seen_new.expect("a new finding after the collector restarted");
    assert_eq!(v["kind"], "UPSTREAM_FAILURE", "{v}");
    assert_eq!(v["workload"], "reviews-v1", "{v}");
    assert!(child.try_wait().unwrap().is_none(), "watch exited");
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("reconnecting") && e.contains("reconnected"),
        "{e}"
    );
    let _ = stop_tx.send(());
    let _ = server.await;
}

/// A CA and a server certificate for 127.0.0.1 signed by it (openssl CLI), in `dir`.
fn make_certs(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let o = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl (Debian package openssl)");
        assert!(o.status.success(), "openssl {args:?}: {}", stderr(&o));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=hopwatch test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    ]);
}

/// https:// really is TLS: against a TLS collector the CLI works with --ca-cert, and
/// refuses a certificate it cannot verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_collector_is_spoken_to_over_tls() {
    use hopwatch_collector::server::QuerySvc;
    use hopwatch_proto::v1::query_server::QueryServer;
    use tonic::transport::{Identity, Server, ServerTlsConfig};
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let read = |f: &str| std::fs::read(dir.path().join(f)).unwrap();
    let collector = std::sync::Arc::new(hopwatch_collector::service::Collector::in_memory(
        fast_settings(),
    ));
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        Server::builder()
            .tls_config(
                ServerTlsConfig::new()
                    .identity(Identity::from_pem(read("server.pem"), read("server.key"))),
            )
            .unwrap()
            .add_service(QueryServer::new(QuerySvc {
                collector,
                stop: stop_rx,
            }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let url = format!("https://{addr}");
    let ca = dir.path().join("ca.pem");
    let o = hopwatch(&[
        "--collector",
        &url,
        "--ca-cert",
        ca.to_str().unwrap(),
        "--request-timeout",
        "5s",
        "summary",
        "-o",
        "json",
    ])
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["hops_received"], 0);
    // Without the CA: the certificate is not trusted, a clear failure (exit 1).
    let o = hopwatch(&["--collector", &url, "--request-timeout", "5s", "summary"]).await;
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let e = stderr(&o);
    assert!(
        e.contains("TLS") || e.to_lowercase().contains("certificate"),
        "{e}"
    );
    // Plain http:// to the TLS port fails too (no silent downgrade either way).
    let o = hopwatch(&[
        "--collector",
        &format!("http://{addr}"),
        "--request-timeout",
        "3s",
        "summary",
    ])
    .await;
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    server.abort();
}

/// The collector's logs: `--log-format json` gives one JSON object per line; text logs
/// into a pipe carry no ANSI colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_logs_json_and_no_ansi_into_a_pipe() {
    for format in ["json", "text"] {
        let dir = tempfile::tempdir().unwrap();
        let (g, h) = (free_port(), free_port());
        let mut child = Command::new(env!("CARGO_BIN_EXE_hopwatch-collector"))
            .args([
                "--listen",
                &format!("127.0.0.1:{g}"),
                "--http-listen",
                &format!("127.0.0.1:{h}"),
                "--log-format",
                format,
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .env("RUST_LOG", "info")
            .env_remove("NO_COLOR")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{g}");
        let mut up = false;
        for _ in 0..200 {
            if CollectorClient::connect(url.clone()).await.is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(up, "collector did not start");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let out = tokio::task::spawn_blocking(move || {
            let _ = child.wait();
            let mut s = String::new();
            use std::io::Read;
            if let Some(mut o) = child.stdout.take() {
                let _ = o.read_to_string(&mut s);
            }
            s
        })
        .await
        .unwrap();
        assert!(
            out.contains("hopwatch-collector started"),
            "{format}: {out}"
        );
        assert!(
            !out.contains('\u{1b}'),
            "{format}: ANSI codes into a pipe: {out:?}"
        );
        if format == "json" {
            for l in out.lines() {
                let v: serde_json::Value =
                    serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
                assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
            }
            assert!(
                out.contains("\"message\":\"hopwatch-collector started\""),
                "{out}"
            );
        }
    }
}
