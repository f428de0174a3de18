//! Rough self-benchmark of the design targets (not a test):
//!   cargo run -p hopwatch-collector --release --example bench
//! 1. ingest + analyse throughput (prost decode of 200-hop batches included), one thread;
//! 2. resident memory with 1,000,000 hops in open traces;
//! 3. ListBreaks latency with 100,000 stored findings.

use std::time::{Duration, Instant};

use hopwatch_collector::analysis::Finding;
use hopwatch_collector::core::Limits;
use hopwatch_collector::service::{Collector, Settings};
use hopwatch_collector::store::Filter;
mod gen;

use gen::batches;
use hopwatch_proto::v1::{BreakKind, ReportRequest, Severity};
use prost::Message;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn main() {
    let now = hopwatch_collector::service::now_ms();
    let base = now * 1000;
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let phases = std::env::args().nth(2).unwrap_or_else(|| "123".into());

    // 1. Throughput.
    let encoded = batches(n, base);
    if phases.contains('1') {
        let c = Collector::in_memory(Settings::default());
        let start = Instant::now();
        let mut clock = now;
        for (i, b) in encoded.iter().enumerate() {
            let req = ReportRequest::decode(b.as_slice()).unwrap();
            c.report(&req, clock).unwrap();
            if i % 50 == 49 {
                clock += 1_000; // simulated time: traces go quiet after 5 s
                c.poll(clock);
            }
        }
        c.shutdown(clock + 10_000).unwrap();
        let el = start.elapsed();
        println!(
            "ingest+analyse: {n} hops in {:.2?} = {:.0} hops/s on one thread ({} findings)",
            el,
            n as f64 / el.as_secs_f64(),
            c.store.read().len()
        );
        drop(c);
    }

    // 2. Memory with 1M hops open.
    if phases.contains('2') {
        let rss0 = rss_mb();
        let mut limits = Limits {
            max_open_traces: 10_000_000,
            trace_quiet: Duration::from_secs(3600),
            ..Limits::default()
        };
        // The phase measures the memory per open hop: no byte bound either.
        limits.budgets.open = usize::MAX / 2;
        let c = Collector::in_memory(Settings {
            limits,
            ..Settings::default()
        });
        for b in &encoded {
            let req = ReportRequest::decode(b.as_slice()).unwrap();
            c.report(&req, now).unwrap();
        }
        drop(encoded);
        let (hops, traces) = {
            let core = c.core.lock();
            (core.open_hops(), core.open_traces())
        };
        println!(
            "memory: {hops} hops in {traces} open traces: RSS {:.0} MB over baseline {:.0} MB",
            rss_mb() - rss0,
            rss0
        );
        drop(c);
    }

    // 3. ListBreaks with 100k findings.
    if !phases.contains('3') {
        return;
    }
    // All 100k kept: the byte budget and the per-namespace share raised (20 namespaces).
    let mut settings = Settings::default();
    settings.limits.budgets.findings = 1 << 30;
    settings.max_findings_per_namespace = 100_000;
    let c = Collector::in_memory(settings);
    {
        let mut s = c.store.write();
        for i in 0..100_000u64 {
            let f = Finding {
                kind: BreakKind::try_from((i % 8 + 1) as i32).unwrap(),
                severity: Severity::Error,
                workload: format!("wl-{}", i % 5000),
                namespace: format!("ns-{}", i % 20),
                peer: format!("peer-{i}"),
                flags: vec![],
                summary: "a summary sentence of typical length for a finding".into(),
                hint: "a hint sentence of typical length telling the operator what to check".into(),
                seen_ms: now - i,
            };
            s.merge(&f, &format!("{i:032x}"));
        }
    }
    let filters = [
        Filter::default(),
        Filter {
            kind: Some(BreakKind::TagDropped),
            ..Default::default()
        },
        Filter {
            workload: Some("wl-42".into()),
            ..Default::default()
        },
        Filter {
            namespace: Some("ns-3".into()),
            kind: Some(BreakKind::HopMissing),
            ..Default::default()
        },
        Filter {
            workload: Some("no-such".into()),
            ..Default::default()
        },
    ];
    let mut lat = Vec::new();
    for i in 0..2_000 {
        let f = &filters[i % filters.len()];
        let t = Instant::now();
        let r = c.list_breaks(f, 100);
        lat.push(t.elapsed());
        std::hint::black_box(r);
    }
    lat.sort();
    println!(
        "ListBreaks over 100k findings: p50 {:.2?} p99 {:.2?} max {:.2?}",
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100],
        lat[lat.len() - 1]
    );
}
