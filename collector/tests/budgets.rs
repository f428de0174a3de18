//! The collector's memory bounds through the service API (issue 15): byte budgets that
//! evict and count, the findings' per-workload share, string table compaction, the
//! per-workload stats pruned, and the GetTrace defects (deep chains, huge trace ids).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use hopwatch_collector::analysis::Finding;
use hopwatch_collector::core::TraceResult;
use hopwatch_collector::service::{now_ms, Collector, QueryError, Settings};
use hopwatch_collector::store::Filter;
use hopwatch_proto::v1::collector_client::CollectorClient;
use hopwatch_proto::v1::query_client::QueryClient;
use hopwatch_proto::v1::{
    BreakKind, CallNode, GetTraceRequest, GetTraceResponse, Hop, ReportRequest, Severity,
};
use prost::Message;

/// The value of an unlabelled sample or of `name{store="store"}` in /metrics.
fn metric(c: &Collector, name: &str) -> f64 {
    let m = c.render_metrics();
    m.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{m}"))
}

fn finding(ns: &str, wl: &str, peer: &str, seen_ms: u64) -> Finding {
    Finding {
        kind: BreakKind::HopMissing,
        severity: Severity::Error,
        workload: wl.into(),
        namespace: ns.into(),
        peer: peer.into(),
        flags: vec![],
        summary: format!("{wl} called {peer}, no inbound hop"),
        hint: "h".into(),
        seen_ms,
    }
}

#[test]
fn forged_findings_of_one_workload_never_evict_another_workloads() {
    let c = Collector::in_memory(Settings::default());
    let t0 = now_ms();
    // 50 real findings of reviews, seen first (the least recently seen of all).
    let real: Vec<TraceResult> = (0..50)
        .map(|i| TraceResult {
            trace_id: trace_id(i),
            findings: vec![finding(
                "shop",
                "reviews-v1",
                &format!("svc-{i}"),
                t0 + i as u64,
            )],
        })
        .collect();
    c.record(real);
    // 100,000 forged distinct findings claiming to be of one workload (the same
    // namespace), all seen later.
    for chunk in 0..100u64 {
        let forged: Vec<TraceResult> = (0..1000u64)
            .map(|j| {
                let i = chunk * 1000 + j;
                TraceResult {
                    trace_id: format!("{:032x}", i + 1),
                    findings: vec![finding("shop", "forger", &format!("p{i}"), t0 + 1000 + i)],
                }
            })
            .collect();
        c.record(forged);
    }
    let s = Settings::default();
    let mine = c.list_breaks(
        &Filter {
            workload: Some("reviews-v1".into()),
            ..Default::default()
        },
        1000,
    );
    assert_eq!(mine.len(), 50, "every real finding is kept");
    let theirs = c.list_breaks(
        &Filter {
            workload: Some("forger".into()),
            ..Default::default()
        },
        10_000,
    );
    assert_eq!(theirs.len(), s.max_findings_per_workload);
    // The forger's most recent ones are what it kept.
    assert!(theirs
        .iter()
        .all(|b| b.last_seen_unix_ms >= t0 + 1000 + 95_000));
    let m = c.render_metrics();
    assert!(
        m.contains("hopwatch_findings_evicted_total{reason=\"workload_share\"} 95000"),
        "{m}"
    );
    // Their occurrence series went with them (the metric family is bounded too).
    let series = m
        .lines()
        .filter(|l| l.starts_with("hopwatch_breaks_total{"))
        .count();
    assert_eq!(series, 50 + s.max_findings_per_workload, "breaks series");
    // Accounted bytes follow the store (after the flush loop took the pending writes):
    // 5,050 findings at 1-4 KB each.
    c.flush().unwrap();
    let bytes = metric(&c, "hopwatch_store_bytes{store=\"findings\"}");
    assert!(
        bytes > 5050.0 * 1000.0 && bytes < 5050.0 * 4000.0,
        "{bytes}"
    );
}

#[test]
fn findings_over_the_byte_budget_go_least_recently_seen_first() {
    let mut s = Settings::default();
    s.limits.budgets.findings = 1 << 20;
    let c = Collector::in_memory(s);
    let t0 = now_ms();
    for i in 0..20_000u64 {
        c.record(vec![TraceResult {
            trace_id: trace_id(1),
            findings: vec![finding(
                &format!("ns{}", i % 50),
                &format!("w{}", i % 500),
                &format!("p{i}"),
                t0 + i,
            )],
        }]);
    }
    // The server's flush loop takes the pending database writes every second.
    c.flush().unwrap();
    let bytes = metric(&c, "hopwatch_store_bytes{store=\"findings\"}");
    assert!(bytes <= 1048576.0, "{bytes}");
    let evicted = metric(&c, "hopwatch_store_evictions_total{store=\"findings\"}");
    assert!(evicted > 10_000.0, "{evicted}");
    let kept = c.list_breaks(&Filter::default(), 100_000);
    assert_eq!(kept.len() as f64 + evicted, 20_000.0);
    // The newest stayed.
    let oldest_kept = kept.iter().map(|b| b.last_seen_unix_ms).min().unwrap();
    assert_eq!(oldest_kept, t0 + evicted as u64);
    // Accounting returns to ~0 when all go (retention by age).
    let n = c.retain(t0 + 30 * 24 * 3600 * 1000);
    assert_eq!(n, kept.len());
    c.flush().unwrap();
    assert_eq!(metric(&c, "hopwatch_store_bytes{store=\"findings\"}"), 0.0);
}

/// Reports `batches` batches of `per_batch` one-hop traces (trace `b * per_batch + j` of
/// [`one_hop_trace`], each hop shaped by `shape`), all at `now`.
fn report_one_hop_traces(
    c: &Collector,
    batches: u64,
    per_batch: u64,
    now: u64,
    shape: impl Fn(u64, u64, Hop) -> Hop,
) {
    for b in 0..batches {
        let hops = (0..per_batch)
            .map(|j| shape(b, j, one_hop_trace(b * per_batch + j, now * 1000)))
            .collect();
        c.report(
            &ReportRequest {
                hops,
                ..Default::default()
            },
            now,
        )
        .unwrap();
    }
}

fn one_hop_trace(i: u64, start_us: u64) -> Hop {
    let t = format!("{:032x}", (7u128 << 100) | i as u128);
    inbound(
        &t,
        "reviews-v1",
        "reviews",
        "b000000000000001",
        start_us,
        1000,
        "",
    )
}

#[test]
fn open_traces_over_the_byte_budget_are_analysed_early_and_counted() {
    let mut s = Settings::default();
    s.limits.budgets.open = 1 << 20;
    let c = Collector::in_memory(s);
    let now = now_ms();
    report_one_hop_traces(&c, 100, 200, now, |_, _, h| h);
    let bytes = metric(&c, "hopwatch_store_bytes{store=\"open_traces\"}");
    assert!(bytes <= 1048576.0 && bytes > 512.0 * 1024.0, "{bytes}");
    let ev = metric(&c, "hopwatch_store_evictions_total{store=\"open_traces\"}");
    assert!(ev > 10_000.0, "{ev}");
    let open = metric(&c, "hopwatch_open_traces");
    assert_eq!(
        open + ev,
        20_000.0,
        "every trace is open or was analysed early"
    );
    // The evicted were the least recently updated: the first ones.
    assert!(
        c.get_trace(&format!("{:032x}", (7u128 << 100) | 19_999), now)
            .unwrap()
            .open
    );
    assert!(
        !c.get_trace(&format!("{:032x}", 7u128 << 100), now)
            .unwrap()
            .open
    );
    // Analysing everything brings the accounted bytes back to 0.
    c.poll(now + 120_000);
    assert_eq!(metric(&c, "hopwatch_open_traces"), 0.0);
    assert_eq!(
        metric(&c, "hopwatch_store_bytes{store=\"open_traces\"}"),
        0.0
    );
}

#[test]
fn recent_traces_over_the_byte_budget_go_oldest_first() {
    let mut s = Settings::default();
    s.limits.budgets.recent = 256 << 10;
    let c = Collector::in_memory(s);
    let now = now_ms();
    report_one_hop_traces(&c, 20, 100, now, |_, _, h| h);
    c.poll(now + 120_000);
    let bytes = metric(&c, "hopwatch_store_bytes{store=\"recent_traces\"}");
    assert!(bytes <= 256.0 * 1024.0 && bytes > 128.0 * 1024.0, "{bytes}");
    assert!(
        metric(
            &c,
            "hopwatch_store_evictions_total{store=\"recent_traces\"}"
        ) > 100.0
    );
    assert!(c
        .get_trace(&format!("{:032x}", (7u128 << 100) | 1999), now)
        .is_ok());
    assert!(matches!(
        c.get_trace(&format!("{:032x}", 7u128 << 100), now),
        Err(QueryError::TraceNotFound(_))
    ));
}

#[test]
fn strings_nothing_references_any_more_are_freed() {
    let mut s = Settings::default();
    s.limits.budgets.recent = 64 << 10;
    let c = Collector::in_memory(s);
    let now = now_ms();
    let before = metric(&c, "hopwatch_interned_strings");
    report_one_hop_traces(&c, 10, 200, now, |b, j, mut h| {
        h.response_code_details = format!("detail_{b}_{j}_{}", "x".repeat(4000));
        h
    });
    let full = metric(&c, "hopwatch_store_bytes{store=\"strings\"}");
    assert!(metric(&c, "hopwatch_fields_truncated_total") >= 2000.0);
    // Details are cut to 256 bytes at ingest: 2,000 of them, not 8 MB.
    assert!(full < 2000.0 * 512.0, "{full}");
    // Analysed, then mostly pushed out of the recent store: their details go.
    c.poll(now + 120_000);
    c.compact_strings(now + 120_000);
    c.compact_strings(now + 120_000);
    let after = metric(&c, "hopwatch_interned_strings");
    let kept_traces = metric(&c, "hopwatch_recent_traces");
    assert!(
        after <= before + kept_traces + 20.0,
        "{after} strings for {kept_traces} kept traces"
    );
    assert!(metric(&c, "hopwatch_string_compactions_total") >= 2.0);
    assert!(metric(&c, "hopwatch_store_bytes{store=\"strings\"}") < full / 4.0);
    // The names still resolve for what is kept.
    let t = c
        .get_trace(&format!("{:032x}", (7u128 << 100) | 1999), now)
        .unwrap();
    let h = t.roots[0].inbound.as_ref().unwrap();
    assert_eq!(h.workload, "reviews-v1");
    assert!(h.response_code_details.starts_with("detail_9_199_"));
}

#[test]
fn workload_stats_rows_are_pruned_by_age_and_by_budget() {
    let mut s = Settings::default();
    s.limits.budgets.workload_stats = 64 << 10;
    let c = Collector::in_memory(s);
    let now = now_ms();
    let hops: Vec<Hop> = (0..2000u64)
        .map(|i| {
            let mut h = one_hop_trace(i, now * 1000);
            h.workload = format!("wl-{i}");
            h
        })
        .collect();
    for chunk in hops.chunks(500) {
        c.report(
            &ReportRequest {
                hops: chunk.to_vec(),
                ..Default::default()
            },
            now,
        )
        .unwrap();
    }
    let bytes = metric(&c, "hopwatch_store_bytes{store=\"workload_stats\"}");
    assert!(bytes <= 65536.0, "{bytes}");
    assert!(
        metric(
            &c,
            "hopwatch_store_evictions_total{store=\"workload_stats\"}"
        ) > 0.0
    );
    let rows = c.summary().workloads.len();
    assert!(rows < 2000 && rows > 100, "{rows}");
    // The newest rows are the ones kept.
    assert!(c
        .summary()
        .workloads
        .iter()
        .any(|w| w.workload == "wl-1999"));
    // A day without hops: gone.
    c.retain(now + 25 * 3600 * 1000);
    assert!(c.summary().workloads.is_empty());
    assert_eq!(
        metric(&c, "hopwatch_store_bytes{store=\"workload_stats\"}"),
        0.0
    );
    assert_eq!(
        metric(&c, "hopwatch_workload_stats_expired_total"),
        rows as f64
    );
}

/// A chain `depth` calls deep: svc0 -> svc1 -> ... (inbound and outbound hop per level).
fn deep_chain(trace: &str, depth: usize, base: u64) -> Vec<Hop> {
    let span = |i: usize| format!("c{:015x}", i + 1);
    let mut hops = Vec::new();
    for i in 0..depth {
        let svc = format!("svc{i}");
        let t = base + i as u64 * 10;
        let dur = 100_000 - i as u64 * 20;
        hops.push(inbound(
            trace,
            &format!("{svc}-v1"),
            &svc,
            &span(i),
            t,
            dur,
            "",
        ));
        if i + 1 < depth {
            hops.push(outbound(
                trace,
                &format!("{svc}-v1"),
                &svc,
                &span(i),
                &span(i + 1),
                &format!("svc{}", i + 1),
                t + 2,
                dur - 5,
                "",
            ));
        }
    }
    hops
}

fn depth_of(n: &CallNode) -> usize {
    1 + n.children.iter().map(depth_of).max().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_trace_of_a_100_deep_chain_decodes_and_shows_where_it_continues() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(fast_settings(), dir.path()).await;
    let url = s.url();
    let t = trace_id(100);
    let mut c = CollectorClient::connect(url.clone()).await.unwrap();
    c.report(ReportRequest {
        hops: deep_chain(&t, 100, base_us()),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut q = QueryClient::connect(url.clone()).await.unwrap();
    let mut resp = None;
    for _ in 0..100 {
        let r = q
            .get_trace(GetTraceRequest {
                trace_id: t.clone(),
            })
            .await
            .expect("GetTrace of a deep chain decodes (prost)")
            .into_inner();
        if !r.open {
            resp = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r: GetTraceResponse = resp.expect("analysed");
    assert_eq!(r.hop_count, 199);
    assert_eq!(r.roots.len(), 2, "the real root and the cut-off subtree");
    assert_eq!(r.roots[0].continued_at_depth, 0);
    assert_eq!(depth_of(&r.roots[0]), 90);
    assert_eq!(r.roots[1].continued_at_depth, 90);
    assert_eq!(depth_of(&r.roots[1]), 10);
    assert_eq!(
        r.roots[1].inbound.as_ref().map(|h| h.workload.as_str()),
        Some("svc90-v1")
    );
    // What the server encoded decodes again with prost's default limits.
    let bytes = r.encode_to_vec();
    GetTraceResponse::decode(bytes.as_slice()).expect("decodes");
    // The CLI shows it.
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_hopwatch"))
            .args(["--collector", &url, "trace", &t])
            .env_remove("HOPWATCH_COLLECTOR")
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("continued at depth 90"), "{stdout}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_trace_ids_are_refused_and_never_echoed_whole() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(fast_settings(), dir.path()).await;
    let mut q = QueryClient::connect(s.url()).await.unwrap();
    let e = q
        .get_trace(GetTraceRequest {
            trace_id: "f".repeat(900 * 1024),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("256"), "{}", e.message());
    assert!(e.message().len() < 200, "{} bytes", e.message().len());
    // Under the limit but unknown: echoed cut.
    let e = q
        .get_trace(GetTraceRequest {
            trace_id: "e".repeat(250),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(e.message().len() < 200, "{}", e.message());
    assert!(e.message().contains("250 bytes"), "{}", e.message());
    s.stop().await;
}

#[test]
fn over_long_fields_are_cut_and_counted_not_refused() {
    let c = Collector::in_memory(Settings::default());
    let now = now_ms();
    let t = trace_id(300);
    let mut h = inbound(
        &t,
        "reviews-v1",
        "reviews",
        "d000000000000001",
        now * 1000,
        1000,
        "",
    );
    h.path = format!("/{}", "p".repeat(8 * 1024));
    h.response_code_details = "d".repeat(4 * 1024);
    h.own_tag = "t".repeat(500);
    let accepted = c
        .report(
            &ReportRequest {
                hops: vec![h],
                ..Default::default()
            },
            now,
        )
        .expect("accepted, not refused");
    assert_eq!(accepted, 1);
    assert_eq!(metric(&c, "hopwatch_fields_truncated_total"), 3.0);
    let r = c.get_trace(&t, now).unwrap();
    let h = r.roots[0].inbound.as_ref().unwrap();
    assert_eq!(h.path.len(), 512);
    assert_eq!(h.response_code_details.len(), 256);
    assert_eq!(h.own_tag.len(), 128);
}

/// A trace evicted by the open-traces budget before it was quiet for the late-hop window
/// is analysed cut short (no HOP_MISSING: its callee's hop may still come). Once the
/// window has passed with no late hop, it is analysed again in full from the recent
/// store: under load, the byte budget must not lose the callee-without-sidecar verdict.
#[test]
fn a_trace_evicted_cut_short_gets_its_hop_missing_once_no_late_hop_came() {
    let mut s = Settings::default();
    s.limits.budgets.open = 256 << 10;
    let c = Collector::in_memory(s);
    let now = now_ms();
    let base = now * 1000;
    let mut chain = healthy_chain(&trace_id(77), base, "");
    chain.remove(4); // ratings answers but has no sidecar: never reports its inbound hop
    c.report(
        &ReportRequest {
            hops: chain,
            ..Default::default()
        },
        now,
    )
    .unwrap();
    // Enough one-hop traces at the same instant to push the chain out at once.
    report_one_hop_traces(&c, 20, 200, now, |_, _, h| h);
    assert!(
        metric(&c, "hopwatch_store_evictions_total{store=\"open_traces\"}") > 0.0,
        "the budget evicted"
    );
    let hop_missing = |c: &Collector| {
        c.list_breaks(
            &Filter {
                kind: Some(BreakKind::HopMissing),
                ..Default::default()
            },
            10,
        )
    };
    assert!(
        hop_missing(&c).is_empty(),
        "cut short: no HOP_MISSING yet, the partner may still come"
    );
    // The late-hop window (2 s) passes; the trace quiet time of everything else too.
    c.poll(now + 120_000);
    let found = hop_missing(&c);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(
        (found[0].workload.as_str(), found[0].peer.as_str()),
        ("reviews-v1", "ratings")
    );
    assert_eq!(found[0].count, 1, "reported once");
    // A second poll does not report it again.
    c.poll(now + 240_000);
    assert_eq!(hop_missing(&c)[0].count, 1);
}
