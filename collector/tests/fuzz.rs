//! Fuzzing of the collector's batch ingest and of the XFCC parser, with proptest
//! (`cargo fuzz` needs a nightly toolchain): arbitrary bytes through the ReportRequest
//! decoder, arbitrary ReportRequest structures (ids from small pools so that hops join
//! into traces, plus arbitrary strings, times at the ends of u64, unknown enum values)
//! through `Collector::report_from`, analysis, retention and every query. Checked: no
//! panic, the bounds (open hops, findings, interned strings) hold, memory stays bounded.
//!
//! Each target runs for `HOPWATCH_FUZZ_SECS` seconds (default 3) and prints how many
//! cases it ran. A failing case is shrunk by proptest and printed; it then becomes a
//! regression test at the end of this file.

use std::cell::Cell;
use std::time::{Duration, Instant};

use hopwatch_collector::identity::{parse_xfcc, peer_from_xfcc, Sender};
use hopwatch_collector::service::{now_ms, Collector, Settings};
use hopwatch_collector::store::Filter;
use hopwatch_proto::v1::{Hop, ReportRequest};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use prost::Message;

fn fuzz_secs() -> f64 {
    std::env::var("HOPWATCH_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0)
}

/// Runs `test` on values of `strategy` in rounds of 16 cases until the time is up;
/// returns the number of cases run. A failure panics with proptest's shrunk input.
fn run_for<S: Strategy>(
    name: &str,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) -> u64
where
    S::Value: std::fmt::Debug,
{
    let deadline = Instant::now() + Duration::from_secs_f64(fuzz_secs());
    let cases = Cell::new(0u64);
    let mut round = 0u32;
    while Instant::now() < deadline {
        let mut runner = TestRunner::new(Config {
            cases: 16,
            failure_persistence: None,
            // A new seed per round (proptest's default RNG is seeded from the OS).
            ..Config::default()
        });
        let r = runner.run(&strategy, |v| {
            cases.set(cases.get() + 1);
            test(v)
        });
        if let Err(e) = r {
            panic!("{name}: {e}");
        }
        round += 1;
    }
    println!("fuzz {name}: {} cases in {round} rounds", cases.get());
    cases.get()
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Small bounds, so that a few seconds of fuzzing reach them.
fn settings() -> Settings {
    let mut s = Settings::default();
    s.limits.trace_quiet = Duration::from_millis(100);
    s.limits.max_trace_age = Duration::from_secs(2);
    s.limits.max_open_traces = 500;
    s.limits.max_open_hops = 5_000;
    s.limits.max_hops_per_trace = 200;
    s.limits.max_recent_hops = 5_000;
    s.retention_count = 500;
    s
}

/// A string from a small pool (so that hops join), else an arbitrary one.
fn pooled(pool: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(pool).prop_map(str::to_string),
        1 => proptest::collection::vec(any::<char>(), 0..48).prop_map(String::from_iter),
    ]
}

fn time_us(base_us: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => (0u64..20_000_000).prop_map(move |d| base_us - 10_000_000 + d),
        1 => Just(0u64),
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ]
}

fn duration_us() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 0u64..2_000_000,
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ]
}

fn small_enum() -> impl Strategy<Value = i32> {
    prop_oneof![8 => 0i32..14, 1 => any::<i32>()]
}

const TRACES: &[&str] = &[
    "",
    "4bf92f3577b34da6a3ce929d0e0e4736",
    "00000000000000000000000000000001",
    "463ac35c9f6413ad",
    "ffffffffffffffffffffffffffffffff",
];
const SPANS: &[&str] = &[
    "",
    "a000000000000001",
    "a000000000000002",
    "a000000000000003",
];
const REQS: &[&str] = &["", "req-1", "req-2", "9f2c-uuid"];
const WORKLOADS: &[&str] = &["productpage-v1", "reviews-v1", "ratings-v1", "cart", ""];
const NAMESPACES: &[&str] = &["default", "shop", "prod", ""];
const SERVICES: &[&str] = &["productpage", "reviews", "ratings", ""];
const TAGS: &[&str] = &["", "dev", "dev.proj1", "bad tag!"];
const CLUSTERS: &[&str] = &[
    "",
    "outbound|9080||reviews.default.svc.cluster.local",
    "outbound|9080|v1|ratings.default.svc.cluster.local",
    "inbound|9080||",
    "PassthroughCluster",
];
const OTHER: &[&str] = &["", "x-correlation-id=abc", "1234567890"];

fn hop(base_us: u64) -> impl Strategy<Value = Hop> {
    let ids = (
        pooled(TRACES),
        pooled(SPANS),
        pooled(SPANS),
        pooled(REQS),
        pooled(SPANS),
        // Mostly valid directions: one invalid hop refuses its whole batch.
        prop_oneof![60 => 1i32..=2, 1 => small_enum()],
        small_enum(),
    );
    let who = (
        pooled(WORKLOADS),
        pooled(NAMESPACES),
        pooled(WORKLOADS),
        pooled(SERVICES),
        pooled(TAGS),
        pooled(&["", "cart", "payments"]),
    );
    let tag = (
        pooled(TAGS),
        pooled(TAGS),
        small_enum(),
        any::<bool>(),
        pooled(TAGS),
        small_enum(),
        pooled(&["", "x-b3-traceid: not hex"]),
    );
    let req = (
        pooled(SERVICES),
        pooled(&["GET", "POST", ""]),
        pooled(&["/", "/reviews/0", ""]),
        prop_oneof![4 => proptest::sample::select(&[0u32, 200, 404, 503, 504][..]), 1 => any::<u32>()],
        prop_oneof![3 => Just(0u64), 1 => Just(1u64 << 5), 1 => any::<u64>()],
        proptest::collection::vec(pooled(&["UH", "UF", "URX"]), 0..3),
        pooled(CLUSTERS),
        pooled(&["", "10.1.2.3:9080", "127.0.0.6:9080"]),
    );
    let rest = (
        time_us(base_us),
        duration_us(),
        any::<bool>(),
        small_enum(),
        proptest::option::of(prop_oneof![0u32..17, any::<u32>()]),
        pooled(&["", "unavailable"]),
        any::<bool>(),
        (pooled(OTHER), pooled(OTHER), pooled(OTHER), pooled(OTHER)),
        proptest::collection::vec(pooled(&["x-b3-traceid", "traceparent"]), 0..3),
    );
    (ids, who, tag, req, rest).prop_map(
        |(
            (trace_id, span_id, parent_span_id, request_id, upstream_span_id, direction, sampled),
            (workload, namespace, pod, service, own_tag, service_account),
            (
                tag_received,
                tag_sent,
                tag_source,
                tag_malformed,
                correlated_tag,
                trace_context,
                trace_detail,
            ),
            (
                authority,
                method,
                path,
                response_code,
                response_flags,
                response_flag_names,
                upstream_cluster,
                upstream_host,
            ),
            (
                start,
                dur,
                sampled_report,
                protocol,
                grpc_status,
                grpc_message,
                answered_before_filter,
                (sw8, uber, dd, corr),
                missing,
            ),
        )| Hop {
            trace_id,
            span_id,
            parent_span_id,
            sampled,
            request_id,
            upstream_span_id,
            direction,
            workload,
            namespace,
            pod,
            service,
            own_tag,
            tag_received,
            tag_sent,
            tag_source,
            tag_malformed,
            correlated_tag,
            trace_context,
            trace_detail,
            missing_trace_headers: missing,
            authority,
            method,
            path,
            response_code,
            response_flags,
            response_flag_names,
            upstream_cluster,
            upstream_host,
            start_time_unix_micros: start,
            duration_micros: dur,
            sampled_report,
            protocol,
            grpc_status,
            grpc_message,
            answered_before_filter,
            sw8_trace_id: sw8,
            uber_trace_id: uber,
            datadog_trace_id: dd,
            correlation_id: corr,
            service_account,
            ..Default::default()
        },
    )
}

fn batch(base_us: u64) -> impl Strategy<Value = ReportRequest> {
    (
        proptest::collection::vec(hop(base_us), 0..24),
        pooled(&["cart-5f7c", ""]),
        pooled(NAMESPACES),
        prop_oneof![3 => Just(0u64), 1 => 0u64..1000, 1 => any::<u64>()],
        pooled(&["", "cart", "payments"]),
    )
        .prop_map(|(hops, pod, ns, dropped, sa)| ReportRequest {
            hops,
            reporter_pod: pod,
            reporter_namespace: ns,
            dropped_since_last_batch: dropped,
            reporter_service_account: sa,
        })
}

fn sender() -> impl Strategy<Value = Sender> {
    prop_oneof![
        3 => Just(Sender::default()),
        1 => proptest::sample::select(&["shop/cart", "prod/payments", "default/bookinfo"][..])
            .prop_map(|id| {
                let (ns, sa) = id.split_once('/').unwrap_or(("", ""));
                Sender::spiffe(&format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"))
            }),
        1 => proptest::collection::vec(any::<char>(), 0..64).prop_map(|c| Sender {
            xfcc: Some(String::from_iter(c)),
            token: None,
        }),
    ]
}

/// Everything a client can ask of the collector, after a batch.
fn exercise(c: &Collector, now: u64) {
    c.poll(now);
    let _ = c.list_breaks(&Filter::default(), 100);
    let s = c.summary();
    assert!(s.open_traces as usize <= c.settings.limits.max_open_traces);
    // The web view's graph (~100 ms in a debug build with a few hundred findings: it
    // compares every node and edge with every finding) and the /metrics text (reads
    // /proc too): every 16th batch.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if CALLS
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        .is_multiple_of(16)
    {
        let _ = c.graph_json();
        let _ = c.render_metrics();
    }
    for t in TRACES.iter().chain(REQS) {
        let _ = c.get_trace(t, now);
    }
}

fn check_bounds(c: &Collector, now: u64) {
    c.shutdown(now).unwrap();
    c.retain(now);
    let l = &c.settings.limits;
    let open = c.core.lock().open_hops();
    assert!(open <= l.max_open_hops, "open hops {open}");
    let findings = c.store.read().len();
    assert!(
        findings <= c.settings.retention_count,
        "findings {findings}"
    );
}

#[test]
fn fuzz_report_request_bytes() {
    let c = Collector::in_memory(settings());
    let rss0 = rss_kb();
    let now = Cell::new(now_ms());
    let n = run_for(
        "ReportRequest bytes",
        proptest::collection::vec(any::<u8>(), 0..512),
        |bytes| {
            if let Ok(req) = ReportRequest::decode(&bytes[..]) {
                let _ = c.report_from(&req, &Sender::default(), now.get());
                now.set(now.get() + 50);
                exercise(&c, now.get());
            }
            Ok(())
        },
    );
    check_bounds(&c, now.get());
    println!(
        "fuzz ReportRequest bytes: {n} cases, RSS {} -> {} kB",
        rss0,
        rss_kb()
    );
}

#[test]
fn fuzz_report_batches() {
    let c = Collector::in_memory(settings());
    let base_us = now_ms() * 1000;
    let rss0 = rss_kb();
    let now = Cell::new(now_ms());
    let (accepted, refused) = (Cell::new(0u64), Cell::new(0u64));
    let n = run_for(
        "ReportRequest batches",
        (batch(base_us), sender()),
        |(req, sender)| {
            // The encoded form too: what the filter sends is what the collector decodes.
            let back = ReportRequest::decode(&req.encode_to_vec()[..]).unwrap();
            prop_assert_eq!(&back, &req);
            let r = c.report_from(&req, &sender, now.get());
            match r {
                Ok(a) => {
                    prop_assert!(a as usize <= req.hops.len());
                    accepted.set(accepted.get() + a as u64);
                }
                Err(_) => refused.set(refused.get() + 1),
            }
            now.set(now.get() + 25);
            exercise(&c, now.get());
            Ok(())
        },
    );
    check_bounds(&c, now.get());
    let (accepted, refused) = (accepted.get(), refused.get());
    let interned = c.render_metrics();
    println!(
        "fuzz ReportRequest batches: {n} cases, {accepted} hops accepted, {refused} batches refused, RSS {} -> {} kB, findings {}, {}",
        rss0,
        rss_kb(),
        c.store.read().len(),
        interned
            .lines()
            .find(|l| l.starts_with("hopwatch_interned_strings "))
            .unwrap_or("")
    );
}

#[test]
fn fuzz_xfcc() {
    // Arbitrary text: never a panic; a parse that succeeds names its elements in order.
    let n = run_for(
        "XFCC text",
        prop_oneof![
            proptest::collection::vec(any::<char>(), 0..200).prop_map(String::from_iter),
            proptest::collection::vec(
                proptest::sample::select(
                    &[
                        "URI=",
                        "spiffe://a/ns/b/sa/c",
                        ",",
                        ";",
                        "\"",
                        "\\",
                        "=",
                        "By=",
                        " ",
                        "x"
                    ][..]
                ),
                0..30
            )
            .prop_map(|p| p.concat()),
        ],
        |s| {
            let _ = peer_from_xfcc(&s);
            if let Ok(e) = parse_xfcc(&s) {
                prop_assert!(e.iter().all(|e| !e.pairs.is_empty()));
            }
            Ok(())
        },
    );
    // Round trip: elements rendered as Envoy writes them (values with separators or
    // quotes quoted and escaped) parse back to themselves.
    let value = proptest::collection::vec(
        proptest::sample::select(
            &['a', 'Z', '0', '/', ':', ',', ';', '=', '"', '\\', ' ', '.'][..],
        ),
        0..20,
    )
    .prop_map(String::from_iter);
    let element = proptest::collection::vec(
        (
            proptest::sample::select(&["by", "hash", "subject", "uri", "dns"][..]),
            value,
        ),
        1..5,
    );
    let m = run_for(
        "XFCC round trip",
        proptest::collection::vec(element, 1..4),
        |elements| {
            let text = elements
                .iter()
                .map(|e| {
                    e.iter()
                        .map(|(k, v)| {
                            let quote = v.is_empty() || v.contains([',', ';', '=', '"', '\\', ' ']);
                            if quote {
                                let esc = v.replace('\\', "\\\\").replace('"', "\\\"");
                                format!("{k}=\"{esc}\"")
                            } else {
                                format!("{k}={v}")
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(";")
                })
                .collect::<Vec<_>>()
                .join(",");
            let parsed =
                parse_xfcc(&text).map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
            let got: Vec<Vec<(String, String)>> = parsed.into_iter().map(|e| e.pairs).collect();
            let want: Vec<Vec<(String, String)>> = elements
                .iter()
                .map(|e| e.iter().map(|(k, v)| (k.to_string(), v.clone())).collect())
                .collect();
            prop_assert_eq!(got, want, "{}", text);
            Ok(())
        },
    );
    println!("fuzz XFCC: {n} + {m} cases");
}

/// Regression: times at the ends of u64. Found by the batches target before the clock
/// check existed: start + duration overflowed (a panic in debug builds) in the ingest-lag
/// computation and in the analysis (`CHop::end_us`, the join windows). Now such hops are
/// refused (clock skew, capped at 24h even if a Policy asks for more), old ones analysed.
#[test]
fn extreme_times_do_not_panic() {
    for skew in [
        Duration::from_secs(600),
        Duration::from_secs(u64::MAX / 1000),
    ] {
        let mut s = settings();
        s.identity.max_clock_skew = skew;
        let c = Collector::in_memory(s);
        let now = now_ms();
        let mut hops = Vec::new();
        for (i, (start, dur)) in [
            (u64::MAX, u64::MAX),
            (u64::MAX, 0),
            (0, u64::MAX),
            (0, 0),
            (u64::MAX / 2, u64::MAX / 2 + 2),
        ]
        .into_iter()
        .enumerate()
        {
            for direction in [1, 2] {
                hops.push(Hop {
                    trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
                    span_id: format!("a00000000000000{i}"),
                    upstream_span_id: format!("a00000000000000{}", i + 1),
                    request_id: "req-1".into(),
                    direction,
                    workload: "reviews-v1".into(),
                    namespace: "default".into(),
                    service: "reviews".into(),
                    upstream_cluster: "outbound|9080||ratings.default.svc.cluster.local".into(),
                    response_code: 503,
                    response_flags: 1 << 5,
                    start_time_unix_micros: start,
                    duration_micros: dur,
                    ..Default::default()
                });
            }
        }
        let req = ReportRequest {
            hops,
            dropped_since_last_batch: u64::MAX,
            ..Default::default()
        };
        // Only the two hops of 1970 (start 0, duration 0) are kept.
        assert_eq!(c.report(&req, now), Ok(2));
        assert_eq!(c.report(&req, now), Ok(2));
        exercise(&c, now + 120_000);
        c.poll(u64::MAX / 1000);
        c.retain(u64::MAX / 1000);
        check_bounds(&c, now + 240_000);
    }
}
