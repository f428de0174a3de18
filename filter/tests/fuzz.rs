//! Property-based fuzzing of everything the filter parses from outside (proptest:
//! `cargo fuzz` needs a nightly toolchain, which the build machines do not have).
//!
//! Targets: the request-header view (the serialized header map as the host hands it
//! over, and the whole request flow over it), trace-context parsing (B3 single and
//! multi, W3C `traceparent`, `sw8`, `uber-trace-id`, Datadog, `x-request-id`), `baggage`
//! and `cookie` parsing, the plugin configuration (arbitrary bytes and arbitrary JSON
//! objects over the real keys) and the correlation slot codec. Each must never panic
//! (the filter runs on the request path of every request; a panic kills the worker's
//! VM), and round-trips where there is one.
//!
//! Each target runs for `HOPWATCH_FUZZ_SECS` seconds (default 3) of fresh random cases
//! and prints how many it ran. A failing case is shrunk with proptest's value tree and
//! reported with the minimal input; such a finding becomes a regression test here, named
//! after what it found. (None so far: 10 targets x 25 s, about 112,000 cases, found no
//! panic and no broken round trip.)
#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Debug;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use hopwatch_filter::config::{key_at, PluginConfig};
use hopwatch_filter::correlation::{self, Contexts, Dims, Entry, IdKind, LocalStore, StoreConfig};
use hopwatch_filter::filter::{Core, Identity, Stream};
use hopwatch_filter::headers::{self, RequestView};
use hopwatch_filter::host::{Host, SetStatus};
use hopwatch_filter::metrics::Metric;
use hopwatch_filter::trace::{self, TraceHeaders};
use hopwatch_filter::{baggage, cookie, tracers};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};

// ---------------------------------------------------------------------------------------
// the time-bounded runner

fn budget() -> Duration {
    let secs = std::env::var("HOPWATCH_FUZZ_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(3.0);
    Duration::from_secs_f64(secs)
}

fn fails<T>(check: &impl Fn(T), v: T) -> bool {
    catch_unwind(AssertUnwindSafe(|| check(v))).is_err()
}

/// Runs `check` on fresh cases of `strategy` until the time budget is spent; on a panic,
/// shrinks the case and fails with the minimal input.
fn fuzz<S>(name: &str, strategy: S, check: impl Fn(S::Value))
where
    S: Strategy,
    S::Value: Clone + Debug,
{
    let budget = budget();
    let deadline = Instant::now() + budget;
    let mut runner = TestRunner::new(Config {
        failure_persistence: None,
        ..Config::default()
    });
    let mut cases = 0u64;
    while Instant::now() < deadline {
        let mut tree = strategy.new_tree(&mut runner).expect("strategy");
        let v = tree.current();
        if fails(&check, v.clone()) {
            let mut minimal = v;
            let mut steps = 0;
            while steps < 10_000 && tree.simplify() {
                steps += 1;
                let c = tree.current();
                if fails(&check, c.clone()) {
                    minimal = c;
                } else if !tree.complicate() {
                    break;
                }
            }
            panic!("fuzz {name}: case {cases} failed; minimal input: {minimal:?}");
        }
        cases += 1;
    }
    println!(
        "fuzz {name}: {cases} cases in {:.1} s, no failure",
        budget.as_secs_f64()
    );
    assert!(cases > 0, "fuzz {name}: no case ran");
}

// ---------------------------------------------------------------------------------------
// strategies

/// Strings around the formats the filter parses: hex, dashes, the separators of each
/// format, control bytes and non-ASCII, and plain arbitrary strings.
fn texty() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9a-fA-F]{0,40}",
        "[0-9a-f-]{0,70}",
        "[0-9a-zA-Z=;:,._ %+/-]{0,80}",
        "[\\x00-\\x1f\\x7f ,;=\"]{0,10}",
        any::<String>(),
        "[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{1,2}(-[0-9a-f]{16})?",
        "00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]",
        "1-[A-Za-z0-9+/=]{0,60}-[A-Za-z0-9+/=]{0,40}-[0-9]{1,3}-.{0,20}",
        "[0-9a-f]{1,32}:[0-9a-f]{1,16}:[0-9a-f]{0,16}:[0-9]{1,2}",
        "[0-9]{0,25}",
    ]
}

fn opt_texty() -> impl Strategy<Value = Option<String>> {
    prop::option::weighted(0.7, texty())
}

/// Header names the filter looks at, and others.
fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "x-virtual-env",
            "x-hopwatch-debug",
            "x-b3-traceid",
            "x-b3-spanid",
            "x-b3-parentspanid",
            "x-b3-sampled",
            "x-b3-flags",
            "b3",
            "traceparent",
            "tracestate",
            "x-request-id",
            "sw8",
            "uber-trace-id",
            "x-datadog-trace-id",
            "baggage",
            "cookie",
            "content-type",
            ":path",
            ":method",
            ":authority",
            "x-envoy-external-address",
            "my-trace-id",
            "x-alias",
        ])
        .prop_map(str::to_string),
        "[a-z0-9:-]{0,30}",
    ]
}

fn header_pairs() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec((header_name(), texty()), 0..40)
}

// ---------------------------------------------------------------------------------------
// a host for the request flow (answers what the tests set, counts nothing)

#[derive(Default)]
struct MiniHost {
    shared: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    props: HashMap<String, Vec<u8>>,
}

impl Host for MiniHost {
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.shared.borrow().get(key).cloned()
    }
    fn shared_set(&self, key: &str, value: &[u8], _cas: u32) -> SetStatus {
        let mut m = self.shared.borrow_mut();
        let cas = m.get(key).map(|(_, c)| c + 1).unwrap_or(1);
        m.insert(key.to_string(), (value.to_vec(), cas));
        SetStatus::Ok
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.props.get(&path.join(".")).cloned()
    }
    fn request_header(&self, _name: &str) -> Option<String> {
        None
    }
    fn now_nanos(&self) -> u64 {
        1_700_000_000_000_000_000
    }
    fn count(&self, _metric: Metric, _by: u64) {}
}

fn core(json: &str) -> Core {
    Core::new(
        PluginConfig::parse(json.as_bytes()).unwrap(),
        Identity {
            workload: "reviews-v1".into(),
            namespace: "default".into(),
            pod: "reviews-v1-abc".into(),
            service: "reviews".into(),
            own_tag: "dev".into(),
            invalid_own_tag: None,
            service_account: "bookinfo-reviews".into(),
        },
    )
}

// ---------------------------------------------------------------------------------------
// targets

#[test]
fn fuzz_request_header_view_of_arbitrary_bytes() {
    fuzz(
        "header map bytes",
        prop::collection::vec(any::<u8>(), 0..600),
        |bytes| {
            let n = headers::pairs(&bytes).count();
            assert!(n <= bytes.len());
            let v = RequestView::parse(&bytes, "x-virtual-env", "x-hopwatch-debug");
            let _ = trace::classify(&v.trace);
            let _ = v.is_grpc();
            let _ = headers::values(&bytes, "baggage");
            let _ = headers::first(&bytes, "x-virtual-env");
        },
    );
}

#[test]
fn fuzz_request_header_map_round_trips_and_the_view_takes_first_values() {
    fuzz("header map round trip", header_pairs(), |pairs| {
        let refs: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let map = headers::serialize(&refs);
        let back: Vec<(&[u8], &[u8])> = headers::pairs(&map).collect();
        let want: Vec<(&[u8], &[u8])> = refs
            .iter()
            .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
            .collect();
        assert_eq!(back, want);
        let v = RequestView::parse(&map, "x-virtual-env", "x-hopwatch-debug");
        let first = |n: &str| refs.iter().find(|(k, _)| *k == n).map(|(_, v)| *v);
        let ascii_or_fffd = |got: Option<&str>, want: Option<&str>| match (got, want) {
            (Some(g), Some(w)) => assert!(g == w || g == "\u{fffd}", "{g:?} vs {w:?}"),
            (g, w) => assert_eq!(g.is_some(), w.is_some()),
        };
        ascii_or_fffd(v.tag, first("x-virtual-env"));
        ascii_or_fffd(v.trace.traceparent, first("traceparent"));
        ascii_or_fffd(v.trace.request_id, first("x-request-id"));
        assert_eq!(v.debug, first("x-hopwatch-debug").is_some());
        assert_eq!(
            v.external_address,
            first("x-envoy-external-address").is_some()
        );
        assert_eq!(
            v.tag_repeated,
            refs.iter().filter(|(k, _)| *k == "x-virtual-env").count() > 1
        );
    });
}

#[test]
fn fuzz_the_request_flow_over_arbitrary_headers() {
    let cfgs = [
        r#"{"direction":"inbound"}"#,
        r#"{"direction":"outbound","annotate_response":"always"}"#,
        r#"{"direction":"outbound","tag_baggage_key":"x-virtual-env","tag_aliases":["cookie:env","header:x-alias","baggage:k"],"correlation_headers":["my-trace-id"]}"#,
        r#"{"direction":"inbound","tag_baggage_key":"sd-routing-key","annotate_response":"debug"}"#,
    ];
    let cores: Vec<Core> = cfgs.iter().map(|c| core(c)).collect();
    let strategy = (
        header_pairs(),
        0..cores.len(),
        any::<u64>(),
        0u64..600,
        any::<bool>(),
    );
    fuzz(
        "request flow",
        strategy,
        |(pairs, which, flags, status, mtls)| {
            let c = &cores[which];
            let mut host = MiniHost::default();
            host.props
                .insert("response.flags".into(), flags.to_le_bytes().to_vec());
            host.props
                .insert("connection.mtls".into(), vec![u8::from(mtls)]);
            let local = LocalStore::new(64);
            let refs: Vec<(&str, &str)> = pairs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            // Twice: the second request meets what the first one stored.
            for _ in 0..2 {
                let (s, _edit) =
                    Stream::on_request_headers(c, &host, &local, headers::serialize(&refs));
                if let Some(a) = s.annotation(c, &host, status) {
                    assert!(
                        !a.chars().any(char::is_control),
                        "control character in {a:?}"
                    );
                }
                s.response_complete();
                if let Some(hop) = s.on_log(c, &host) {
                    assert!(hop.tag_received.len() <= 128);
                    assert!(hop.path.len() <= 512);
                }
                let _ = s.baggage_edit();
            }
            let _ = Stream::answered_before_filter(c, &host, headers::serialize(&refs))
                .on_log(c, &host);
        },
    );
}

#[test]
fn fuzz_trace_context_parsing() {
    let strategy = (
        (
            opt_texty(),
            opt_texty(),
            opt_texty(),
            opt_texty(),
            opt_texty(),
            opt_texty(),
        ),
        (
            opt_texty(),
            opt_texty(),
            opt_texty(),
            opt_texty(),
            opt_texty(),
        ),
    );
    fuzz(
        "trace context",
        strategy,
        |((t, s, p, sampled, flags, single), (tp, rid, sw8, uber, dd))| {
            let h = TraceHeaders {
                b3_trace_id: t.as_deref(),
                b3_span_id: s.as_deref(),
                b3_parent_span_id: p.as_deref(),
                b3_sampled: sampled.as_deref(),
                b3_flags: flags.as_deref(),
                b3_single: single.as_deref(),
                traceparent: tp.as_deref(),
                request_id: rid.as_deref(),
                sw8: sw8.as_deref(),
                uber_trace_id: uber.as_deref(),
                datadog_trace_id: dd.as_deref(),
            };
            let info = trace::classify(&h);
            let _ = trace::class_name(info.class);
            let _ = info.into_owned();
            let _ = h.missing();
            for v in [&sw8, &uber, &dd, &rid, &tp].into_iter().flatten() {
                let _ = tracers::sw8_trace_id(v);
                let _ = tracers::uber_trace_id(v);
                let _ = tracers::datadog_trace_id(v);
                let _ = tracers::base64_decode(v);
                let k = trace::request_id_key(v);
                assert_eq!(k.len(), v.len());
                let _ = trace::cut(v, 17);
            }
        },
    );
}

#[test]
fn fuzz_valid_trace_contexts_classify_as_valid() {
    // All-zero ids are invalid by both specs: not generated.
    let hex = |n: usize| {
        proptest::string::string_regex(&format!("[0-9a-f]{{{n}}}"))
            .unwrap()
            .prop_filter("not all zero", |s| s.bytes().any(|b| b != b'0'))
    };
    let strategy = (hex(32), hex(16), any::<bool>());
    fuzz("valid B3 / W3C", strategy, |(tid, sid, single)| {
        let tp = format!("00-{tid}-{sid}-01");
        let b3 = format!("{tid}-{sid}-1");
        let h = if single {
            TraceHeaders {
                b3_single: Some(&b3),
                traceparent: Some(&tp),
                ..TraceHeaders::default()
            }
        } else {
            TraceHeaders {
                b3_trace_id: Some(&tid),
                b3_span_id: Some(&sid),
                b3_sampled: Some("1"),
                traceparent: Some(&tp),
                ..TraceHeaders::default()
            }
        };
        let info = trace::classify(&h);
        assert_eq!(
            trace::class_name(info.class),
            "valid",
            "{h:?}: {:?}",
            info.detail
        );
        assert_eq!(info.trace_id, tid);
        assert_eq!(info.w3c_trace_id, tid);
    });
}

#[test]
fn fuzz_baggage_and_cookie_parsing() {
    let strategy = (
        prop::collection::vec(texty(), 0..6),
        "[a-zA-Z0-9._~-]{1,20}",
        texty(),
    );
    fuzz("baggage / cookie", strategy, |(hdrs, key, value)| {
        let refs: Vec<&str> = hdrs.iter().map(String::as_str).collect();
        let _ = baggage::parse(&refs);
        let _ = baggage::get(&refs, &key);
        let _ = cookie::get(&refs, &key);
        for h in &refs {
            let _ = baggage::percent_decode(h);
        }
        // Round trips: percent-encoding, and a member written then read back.
        assert_eq!(
            baggage::percent_decode(&baggage::percent_encode(&value)),
            value.as_str()
        );
        if let Some(list) = baggage::with_member(&refs, &key, &value) {
            let got = baggage::get(&[list.as_str()], &key).unwrap();
            assert_eq!(got.as_deref(), Some(value.as_str()), "{list:?}");
        }
    });
}

#[test]
fn fuzz_plugin_configuration_from_arbitrary_bytes() {
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        texty().prop_map(String::into_bytes),
    ];
    fuzz("config bytes", bytes, |b| {
        if let Err(e) = PluginConfig::parse(&b) {
            assert!(!e.to_string().is_empty());
            let _ = e.field();
        }
        for (l, c) in [
            (1, 1),
            (1, 0),
            (2, 5),
            (usize::MAX, usize::MAX),
            (1, usize::MAX),
        ] {
            let _ = key_at(&b, l, c);
        }
    });
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)),
        texty().prop_map(Value::String),
        prop::sample::select(vec![
            "inbound",
            "outbound",
            "never",
            "on_error",
            "always",
            "debug",
            "x-env",
            "header:x-a",
            "cookie:c",
            "baggage:k",
            "header:",
            "outbound|9090||c.ns.svc",
        ])
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..3)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

const KEYS: &[&str] = &[
    "direction",
    "tag_header",
    "tag_env_var",
    "tag_label",
    "collector_cluster",
    "collector_authority",
    "annotate_response",
    "annotation_header",
    "debug_header",
    "report_sample_rate",
    "tick_period_ms",
    "batch_size",
    "queue_limit",
    "max_in_flight",
    "report_timeout_ms",
    "correlation_ttl_secs",
    "correlation_buckets",
    "correlation_bucket_entries",
    "tag_baggage_key",
    "tag_aliases",
    "correlation_headers",
    "annotate_external",
    "report_token",
    "unknown_key",
];

#[test]
fn fuzz_plugin_configuration_from_arbitrary_json_objects() {
    let obj = prop::collection::vec((prop::sample::select(KEYS), json_value()), 0..8);
    fuzz("config JSON", obj, |pairs| {
        let mut m = serde_json::Map::new();
        for (k, v) in pairs {
            m.insert(k.to_string(), v);
        }
        let text = serde_json::to_string_pretty(&serde_json::Value::Object(m)).unwrap();
        match PluginConfig::parse(text.as_bytes()) {
            Ok(c) => {
                // A configuration that parses is valid and usable.
                c.validate().unwrap();
                assert!(c.batch_size <= hopwatch_filter::config::MAX_BATCH_HOPS);
                let _ = c.authority();
            }
            Err(e) => assert!(e
                .to_string()
                .contains("invalid hopwatch plugin configuration")),
        }
    });
}

fn id_kind() -> impl Strategy<Value = IdKind> {
    prop::sample::select(vec![
        IdKind::B3,
        IdKind::W3c,
        IdKind::RequestId,
        IdKind::Sw8,
        IdKind::Uber,
        IdKind::Datadog,
        IdKind::Header,
    ])
}

fn entry() -> impl Strategy<Value = Entry> {
    (
        any::<u32>(),
        id_kind(),
        ".{0,40}",
        "[a-z0-9.-]{0,30}",
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(expires_at, kind, id, tag, b3, w3c, trace)| Entry {
            expires_at,
            kind,
            id,
            tag,
            contexts: Contexts { b3, w3c, trace },
        })
}

#[test]
fn fuzz_correlation_codec_round_trips() {
    let strategy = (entry(), 1u16..=1024, 1u16..=1024, any::<u32>());
    fuzz(
        "correlation codec round trip",
        strategy,
        |(e, buckets, entries, now)| {
            let dims = Dims { buckets, entries };
            // Ids and tags longer than 255 bytes are not encoded (never cut).
            let fits = e.id.len() <= 255 && e.tag.len() <= 255;
            let Some(bytes) = correlation::encode(&e, dims) else {
                assert!(!fits, "{e:?} fits but was not encoded");
                return;
            };
            assert!(fits);
            assert_eq!(correlation::decode(&bytes), Some((e.clone(), dims)));
            assert_eq!(correlation::written_dims(&bytes), Some(dims));
            let want = (e.expires_at > now).then_some(e.tag.as_str());
            assert_eq!(correlation::find_encoded(&bytes, e.kind, &e.id, now), want);
        },
    );
}

#[test]
fn fuzz_correlation_codec_of_arbitrary_bytes() {
    let strategy = (
        prop::collection::vec(any::<u8>(), 0..400),
        prop::collection::vec((id_kind(), ".{0,20}"), 0..4),
        any::<u32>(),
        1usize..70,
    );
    fuzz(
        "correlation codec bytes",
        strategy,
        |(old, ids, now, per_bucket)| {
            let _ = correlation::decode(&old);
            let _ = correlation::written_dims(&old);
            let id_refs: Vec<(IdKind, &str)> = ids.iter().map(|(k, s)| (*k, s.as_str())).collect();
            for (k, id) in &id_refs {
                let _ = correlation::find_encoded_entry(&old, *k, id, now);
            }
            // Through the store API, with a host whose every slot holds the bytes: the
            // lookups survive them, and what is remembered is then found (an id written
            // after another of its slot wins it).
            let host = MiniHost::default();
            let cfg = StoreConfig {
                buckets: 4,
                per_bucket,
                ttl_secs: 60,
            };
            for slot in 0..cfg.slots() {
                host.shared
                    .borrow_mut()
                    .insert(correlation::slot_key(slot), (old.clone(), 1));
            }
            let _ = correlation::recall(&host, &LocalStore::new(8), &cfg, &id_refs, now);
            let local = LocalStore::new(8);
            correlation::remember(&host, &local, &cfg, &id_refs, "dev", Contexts::NONE, now);
            if now < u32::MAX - 60 {
                if let Some(&(k, id)) = id_refs.last().filter(|(_, id)| !id.is_empty()) {
                    let hit =
                        correlation::recall(&host, &LocalStore::new(8), &cfg, &[(k, id)], now);
                    assert_eq!(
                        hit.map(|h| h.tag.to_string()).as_deref(),
                        Some("dev"),
                        "{id:?}"
                    );
                }
            }
        },
    );
}
