//! collector-probes: the collector's peak memory under the inputs that used to OOM-kill
//! its 1 GiB pod (issue 15). Each probe runs in a fresh child process (this binary
//! re-executed with `--one NAME`) that drives the collector library in-process with
//! its default settings and the server's allocator (mimalloc), and prints the peak RSS
//! (VmHWM of /proc/self/status) and the stores' accounted bytes. Prints figures, never
//! fails on them.
//!
//! Probes:
//! - `paths`: 150,000 hops with unique 8 KB paths (75,000 open traces of two hops);
//! - `details`: 100,000 hops with unique 4 KB response code details, then every trace
//!   analysed and the string table compacted (0 open traces);
//! - `findings`: 1,000,000 distinct findings (1,000 namespaces x 1,000 workloads);
//! - `traces`: 2,000,000 hops, each of its own trace.

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use hopwatch_collector::analysis::Finding;
use hopwatch_collector::core::TraceResult;
use hopwatch_collector::service::{Collector, Settings};
use hopwatch_proto::v1::{BreakKind, Direction, Hop, ReportRequest, Severity};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "hopwatch collector memory probes (peak RSS per probe)")]
struct Args {
    /// Probes to run, comma-separated: paths, details, findings, traces.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "paths,details,findings,traces"
    )]
    probes: Vec<String>,
    /// Run one probe in this process (used by the parent).
    #[arg(long, hide = true)]
    one: Option<String>,
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(field)?
                    .strip_prefix(':')?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

fn hop(trace: u64, span: u64, inbound: bool, start_us: u64) -> Hop {
    Hop {
        trace_id: format!("{trace:032x}"),
        span_id: format!("{span:016x}"),
        request_id: format!("req-{trace:x}"),
        direction: if inbound {
            Direction::Inbound
        } else {
            Direction::Outbound
        } as i32,
        workload: if inbound {
            "reviews-v1"
        } else {
            "productpage-v1"
        }
        .into(),
        namespace: "shop".into(),
        pod: if inbound {
            "reviews-v1-7d9f-abcde"
        } else {
            "productpage-v1-5c8b-fghij"
        }
        .into(),
        service: if inbound { "reviews" } else { "productpage" }.into(),
        authority: "reviews.shop:9080".into(),
        method: "GET".into(),
        path: "/reviews/0".into(),
        response_code: 200,
        upstream_cluster: "outbound|9080||reviews.shop.svc.cluster.local".into(),
        start_time_unix_micros: start_us,
        duration_micros: 1_000,
        ..Default::default()
    }
}

/// The figures a child prints (one line, `key=value` pairs).
fn report_line(c: &Collector, probe: &str, secs: f64) -> String {
    let m = c.render_metrics();
    let mut stores = Vec::new();
    for line in m.lines() {
        if let Some(rest) = line.strip_prefix("hopwatch_store_bytes{store=\"") {
            if let Some((name, v)) = rest.split_once("\"} ") {
                let mib = v.trim().parse::<f64>().unwrap_or(0.0) / 1048576.0;
                stores.push(format!("{name}={mib:.1}"));
            }
        }
    }
    let get = |name: &str| -> String {
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ').map(str::to_string))
            .unwrap_or_default()
    };
    format!(
        "probe={probe} hwm_mib={:.1} rss_mib={:.1} secs={secs:.1} open_traces={} findings={} interned={} stores_mib[{}] evictions[{}]",
        status_kib("VmHWM") as f64 / 1024.0,
        status_kib("VmRSS") as f64 / 1024.0,
        get("hopwatch_open_traces"),
        c.store.read().len(),
        get("hopwatch_interned_strings"),
        stores.join(" "),
        m.lines()
            .filter_map(|l| l.strip_prefix("hopwatch_store_evictions_total{store=\""))
            .map(|r| r.replace("\"} ", "="))
            .collect::<Vec<_>>()
            .join(" "),
    )
}

fn send(c: &Collector, hops: Vec<Hop>, now_ms: u64) -> Result<()> {
    if hops.is_empty() {
        return Ok(());
    }
    let req = ReportRequest {
        hops,
        reporter_pod: "probe".into(),
        reporter_namespace: "shop".into(),
        ..Default::default()
    };
    c.report(&req, now_ms)
        .map_err(|e| anyhow::anyhow!("report: {e}"))?;
    Ok(())
}

fn run_one(name: &str) -> Result<()> {
    let c = Collector::in_memory(Settings::default());
    let t0 = Instant::now();
    let now = 1_800_000_000_000u64;
    let t_us = now * 1000;
    match name {
        "paths" => {
            // 150,000 hops, 2 per trace, each with its own 8 KB path.
            let mut batch = Vec::new();
            for i in 0..150_000u64 {
                let mut h = hop(i / 2 + 1, i + 1, i % 2 == 1, t_us);
                h.path = format!("/p/{i:08}/{}", "x".repeat(8 * 1024 - 12));
                batch.push(h);
                if batch.len() == 200 {
                    send(&c, std::mem::take(&mut batch), now)?;
                }
            }
            send(&c, batch, now)?;
        }
        "details" => {
            // 100,000 hops with unique 4 KB response code details; then all analysed
            // (quiet), and the string table compacted.
            let mut batch = Vec::new();
            for i in 0..100_000u64 {
                let mut h = hop(i + 1, i + 1, true, t_us);
                h.response_code_details = format!("d{i:08}_{}", "y".repeat(4 * 1024 - 10));
                h.trace_detail = format!("t{i:08}_{}", "z".repeat(4 * 1024 - 10));
                batch.push(h);
                if batch.len() == 200 {
                    send(&c, std::mem::take(&mut batch), now)?;
                }
            }
            send(&c, batch, now)?;
            c.poll(now + 60_000);
            c.compact_strings(now + 60_000);
            c.compact_strings(now + 60_000);
        }
        "findings" => {
            // 1,000,000 distinct findings, through the service's record path (metrics
            // series included).
            let mut results = Vec::new();
            // PROBE_FINDINGS: another count (e.g. below the bounds, to see the RSS per
            // finding without eviction churn).
            let total: u64 = std::env::var("PROBE_FINDINGS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1_000_000);
            for i in 0..total {
                results.push(TraceResult {
                    trace_id: format!("{:032x}", i + 1),
                    findings: vec![Finding {
                        kind: BreakKind::HopMissing,
                        severity: Severity::Error,
                        workload: format!("workload-{}", i % 1000),
                        namespace: format!("ns-{}", i / 1000),
                        peer: format!("peer-{i}"),
                        flags: vec!["UF".into()],
                        summary: format!(
                            "an outbound call of workload-{} to peer-{i} has no inbound hop",
                            i % 1000
                        ),
                        hint: "the callee has no sidecar, or its sidecar lost the report".into(),
                        seen_ms: now + i,
                    }],
                });
                if results.len() == 1000 {
                    c.record(std::mem::take(&mut results));
                }
                if i % 100_000 == 0 {
                    // The server's flush loop (every second) takes the pending writes.
                    let _ = c.flush();
                }
            }
            c.record(results);
            let _ = c.flush();
        }
        "traces" => {
            // 2,000,000 hops, each its own trace (all within the quiet period: the
            // bounds evict and analyse early).
            let mut batch = Vec::new();
            for i in 0..2_000_000u64 {
                batch.push(hop(i + 1, i + 1, i % 2 == 0, t_us));
                if batch.len() == 500 {
                    send(&c, std::mem::take(&mut batch), now)?;
                }
            }
            send(&c, batch, now)?;
        }
        other => bail!("unknown probe {other:?} (paths, details, findings, traces)"),
    }
    let secs = t0.elapsed().as_secs_f64();
    // What one string table compaction costs with the stores as they are (it holds the
    // aggregator's lock: ingest waits that long, every 30 s at most).
    let tc = Instant::now();
    c.compact_strings(now + 120_000);
    let compact_ms = tc.elapsed().as_secs_f64() * 1000.0;
    println!(
        "{} compaction_ms={compact_ms:.1}",
        report_line(&c, name, secs)
    );
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(one) = args.one {
        return run_one(&one);
    }
    let exe = std::env::current_exe().context("current exe")?;
    println!("collector memory probes (default budgets, sum 640 MiB; shipped pod limit 1 GiB)");
    for p in &args.probes {
        let out = Command::new(&exe)
            .args(["--one", p])
            .output()
            .with_context(|| format!("probe {p}"))?;
        if !out.status.success() {
            println!(
                "probe={p} FAILED ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            continue;
        }
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(())
}
