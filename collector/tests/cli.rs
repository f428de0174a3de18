//! The `hopwatch` binary against a running (in-process) collector.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use hopwatch_proto::v1::collector_client::CollectorClient;
use hopwatch_proto::v1::query_client::QueryClient;
use hopwatch_proto::v1::{Hop, ListBreaksRequest, ReportRequest};

async fn hopwatch(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_hopwatch"))
            .args(&args)
            .env_remove("HOPWATCH_COLLECTOR")
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

    // watch: streams findings as they are recorded.
    let url3 = url.clone();
    let child = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_hopwatch"))
            .args(["--collector", &url3, "watch", "--output", "json"])
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
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        line
    });
    let line = tokio::time::timeout(Duration::from_secs(15), line)
        .await
        .expect("a watched break")
        .unwrap();
    producer.abort();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert!(v["count"].as_u64().unwrap() >= 2, "{v}");
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
