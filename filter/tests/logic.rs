//! The pure filter logic, driven through a fake host. Runs natively (`cargo test`) and
//! on `wasm32-unknown-unknown` under `wasm-bindgen-test` (node).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use hopwatch_filter::batch::{Batcher, Push};
use hopwatch_filter::config::{self, Annotate, ConfigError, Direction, PluginConfig};
use hopwatch_filter::correlation::{self, Contexts, Dims, Entry, IdKind, LocalStore, StoreConfig};
use hopwatch_filter::filter::{Core, Identity, Stream};
use hopwatch_filter::headers::RequestView;
use hopwatch_filter::host::{Host, SetStatus};
use hopwatch_filter::metrics::{self, Metric};
use hopwatch_filter::tag::{self, TagEdit};
use hopwatch_filter::trace::{self, TraceHeaders};
use hopwatch_filter::{flags, report, sampling};
use hopwatch_proto::v1::{Hop, ReportRequest, Sampled, TagSource, TraceContext};
use prost::Message;

macro_rules! t {
    ($name:ident $body:block) => {
        #[cfg_attr(target_arch = "wasm32", wasm_bindgen_test::wasm_bindgen_test)]
        #[cfg_attr(not(target_arch = "wasm32"), test)]
        fn $name() $body
    };
}

// ------------------------------------------------------------------------------------
// fake host

struct FakeHost {
    shared: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    props: RefCell<HashMap<String, Vec<u8>>>,
    req_headers: RefCell<HashMap<String, String>>,
    now: Cell<u64>,
    counters: RefCell<HashMap<u16, u64>>,
    calls: RefCell<Vec<String>>,
    shared_broken: Cell<bool>,
    /// The VM's local correlation copy of the worker this host stands for (not a host
    /// service: kept here so that each test's worker has one).
    local: LocalStore,
}

impl FakeHost {
    fn new() -> Self {
        FakeHost {
            shared: RefCell::default(),
            props: RefCell::default(),
            req_headers: RefCell::default(),
            now: Cell::new(1_700_000_000_000_000_000),
            counters: RefCell::default(),
            calls: RefCell::default(),
            shared_broken: Cell::default(),
            local: LocalStore::new(4096),
        }
    }
    fn prop(&self, path: &str, v: &[u8]) {
        self.props.borrow_mut().insert(path.to_string(), v.to_vec());
    }
    fn prop_u64(&self, path: &str, v: u64) {
        self.prop(path, &v.to_le_bytes());
    }
    fn advance_secs(&self, s: u64) {
        self.now.set(self.now.get() + s * 1_000_000_000);
    }
    fn counter(&self, m: Metric) -> u64 {
        self.counters.borrow().get(&m.0).copied().unwrap_or(0)
    }
    fn calls(&self, prefix: &str) -> usize {
        self.calls
            .borrow()
            .iter()
            .filter(|c| c.starts_with(prefix))
            .count()
    }
    /// Calls exactly named `name` (`calls` matches a prefix).
    fn calls_exactly(&self, name: &str) -> usize {
        self.calls.borrow().iter().filter(|c| *c == name).count()
    }
    fn reset_calls(&self) {
        self.calls.borrow_mut().clear();
    }
}

impl Host for FakeHost {
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.calls.borrow_mut().push(format!("shared_get {key}"));
        self.shared.borrow().get(key).cloned()
    }
    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> SetStatus {
        self.calls.borrow_mut().push(format!("shared_set {key}"));
        if self.shared_broken.get() {
            return SetStatus::Failed;
        }
        let mut m = self.shared.borrow_mut();
        let cur = m.get(key).map(|(_, c)| *c).unwrap_or(0);
        if cas != 0 && cas != cur {
            return SetStatus::CasMismatch;
        }
        m.insert(key.to_string(), (value.to_vec(), cur + 1));
        SetStatus::Ok
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        let k = path.join(".");
        self.calls.borrow_mut().push(format!("property {k}"));
        self.props.borrow().get(&k).cloned()
    }
    fn request_header(&self, name: &str) -> Option<String> {
        self.calls
            .borrow_mut()
            .push(format!("request_header {name}"));
        self.req_headers.borrow().get(name).cloned()
    }
    fn now_nanos(&self) -> u64 {
        self.calls.borrow_mut().push("now".into());
        self.now.get()
    }
    fn count(&self, metric: Metric, by: u64) {
        *self.counters.borrow_mut().entry(metric.0).or_default() += by;
    }
}

fn cfg(json: &str) -> PluginConfig {
    PluginConfig::parse(json.as_bytes()).unwrap()
}

fn core(direction: &str, own_tag: &str) -> Core {
    let c = cfg(&format!(r#"{{"direction":"{direction}"}}"#));
    Core::new(
        c,
        Identity {
            workload: "reviews-v1".into(),
            namespace: "default".into(),
            pod: "reviews-v1-abc".into(),
            service: "reviews".into(),
            own_tag: own_tag.into(),
            invalid_own_tag: None,
            service_account: "bookinfo-reviews".into(),
        },
    )
}

/// A serialized request header map, as the host hands it over.
fn hdrs(pairs: &[(&str, &str)]) -> Vec<u8> {
    hopwatch_filter::headers::serialize(pairs)
}

const T128: &str = "463ac35c9f6413ad48485a3953bb6124";
const T64: &str = "48485a3953bb6124";
const S1: &str = "a2fb4a1d1a96d312";
const S2: &str = "0020000000000001";

// ------------------------------------------------------------------------------------
// config

t!(config_defaults {
    let c = cfg(r#"{"direction":"outbound"}"#);
    assert_eq!(c.direction, Direction::Outbound);
    assert_eq!(c.tag_header, "x-virtual-env");
    assert_eq!(c.tag_env_var, "VIRTUAL_ENVIRONMENT_TAG");
    assert_eq!(c.tag_label, "virtual-env");
    assert_eq!(c.collector_cluster, "hopwatch-collector");
    assert_eq!(c.annotate_response, Annotate::OnError);
    assert_eq!(c.annotation_header, "x-hopwatch");
    assert_eq!(c.debug_header, "x-hopwatch-debug");
    assert_eq!(c.report_sample_rate, 1.0);
    assert_eq!(c.tick_period_ms, 1000);
    assert_eq!(c.correlation_ttl_secs, 60);
    assert_eq!(c.authority(), "hopwatch-collector");
});

t!(config_all_contract_keys {
    let c = cfg(r#"{
        "direction": "inbound", "tag_header": "x-env", "tag_env_var": "MY_TAG",
        "tag_label": "env", "collector_cluster": "outbound|9090||hopwatch-collector.hopwatch.svc.cluster.local",
        "annotate_response": "debug", "annotation_header": "x-hw", "debug_header": "x-hw-debug",
        "report_sample_rate": 0.25
    }"#);
    assert_eq!(c.direction, Direction::Inbound);
    assert_eq!(c.annotate_response, Annotate::Debug);
    assert_eq!(c.report_sample_rate, 0.25);
    assert_eq!(c.authority(), "hopwatch-collector.hopwatch.svc.cluster.local:9090");
    for (v, want) in [("never", Annotate::Never), ("always", Annotate::Always), ("on_error", Annotate::OnError)] {
        let c = cfg(&format!(r#"{{"direction":"outbound","annotate_response":"{v}"}}"#));
        assert_eq!(c.annotate_response, want);
    }
    let c = cfg(r#"{"direction":"outbound","report_sample_rate":0,"collector_authority":"collector:9090"}"#);
    assert_eq!(c.report_sample_rate, 0.0);
    assert_eq!(c.authority(), "collector:9090");
});

fn rc(s: &str) -> std::rc::Rc<str> {
    s.into()
}

fn err(json: &str) -> ConfigError {
    PluginConfig::parse(json.as_bytes()).unwrap_err()
}

t!(config_errors_name_the_field {
    let cases: &[(&str, &str)] = &[
        (r#"{}"#, "direction"),
        (r#"{"direction":"sideways"}"#, "direction"),
        (r#"{"direction":1}"#, "direction"),
        (r#"{"direction":"inbound","tag_headr":"x"}"#, "tag_headr"),
        (r#"{"direction":"inbound","tag_header":"X-Virtual-Env"}"#, "tag_header"),
        (r#"{"direction":"inbound","tag_header":""}"#, "tag_header"),
        (r#"{"direction":"inbound","tag_header":"a b"}"#, "tag_header"),
        (r#"{"direction":"inbound","annotation_header":"x:y"}"#, "annotation_header"),
        (r#"{"direction":"inbound","debug_header":"Debug"}"#, "debug_header"),
        (r#"{"direction":"inbound","tag_env_var":"A-B"}"#, "tag_env_var"),
        (r#"{"direction":"inbound","tag_label":""}"#, "tag_label"),
        (r#"{"direction":"inbound","collector_cluster":""}"#, "collector_cluster"),
        (r#"{"direction":"inbound","collector_authority":"a b"}"#, "collector_authority"),
        (r#"{"direction":"inbound","annotate_response":"sometimes"}"#, "annotate_response"),
        (r#"{"direction":"inbound","report_sample_rate":1.5}"#, "report_sample_rate"),
        (r#"{"direction":"inbound","report_sample_rate":-0.1}"#, "report_sample_rate"),
        (r#"{"direction":"inbound","report_sample_rate":"1"}"#, "report_sample_rate"),
        (r#"{"direction":"inbound","tick_period_ms":0}"#, "tick_period_ms"),
        (r#"{"direction":"inbound","batch_size":0}"#, "batch_size"),
        (r#"{"direction":"inbound","batch_size":10,"queue_limit":5}"#, "queue_limit"),
        (r#"{"direction":"inbound","max_in_flight":0}"#, "max_in_flight"),
        (r#"{"direction":"inbound","report_timeout_ms":1}"#, "report_timeout_ms"),
        (r#"{"direction":"inbound","correlation_ttl_secs":0}"#, "correlation_ttl_secs"),
        (r#"{"direction":"inbound","correlation_buckets":0}"#, "correlation_buckets"),
        (r#"{"direction":"inbound","correlation_bucket_entries":0}"#, "correlation_bucket_entries"),
        (r#"{"direction":"inbound","batch_size":-1}"#, "batch_size"),
        (r#"{"direction":"inbound","tag_header":{"a":1}}"#, "tag_header"),
        (r#"{"direction":"inbound","direction":"outbound"}"#, "direction"),
    ];
    for (json, field) in cases {
        let e = err(json);
        let msg = e.to_string();
        assert!(msg.contains(&format!("`{field}`")), "{json}: message {msg:?} does not name {field}");
        assert_eq!(e.field(), Some(*field), "{json}: {msg}");
    }
});

t!(config_syntax_errors {
    for bad in ["", "   ", "[]", "{", r#"{"direction":"inbound""#, r#"{"direction":"inbound"} x"#, "{'a':1}", r#"{"direction":inbound}"#] {
        let e = err(bad);
        assert!(matches!(e, ConfigError::Json(_)), "{bad:?}: {e}");
        assert!(e.to_string().starts_with("invalid hopwatch plugin configuration"));
    }
});

// ------------------------------------------------------------------------------------
// tags

t!(tag_validation {
    assert!(tag::is_valid("dev.proj1.alice"));
    assert!(tag::is_valid("A-b_c.9"));
    assert!(tag::is_valid(&"a".repeat(128)));
    assert!(!tag::is_valid(&"a".repeat(129)));
    assert!(!tag::is_valid(""));
    assert!(!tag::is_valid("dev proj"));
    assert!(!tag::is_valid("dev/proj"));
    assert!(!tag::is_valid("dév"));
    assert_eq!(tag::truncate(&"é".repeat(100)).len(), 128);
});

t!(tag_resolution_outbound {
    let d = tag::resolve_outbound(Some("dev.app"), Some(&rc("dev.corr")), Some(&rc("dev")));
    assert_eq!((d.source, &*d.sent, &d.edit), (TagSource::Request, "dev.app", &TagEdit::Keep));
    let d = tag::resolve_outbound(None, Some(&rc("dev.corr")), Some(&rc("dev")));
    assert_eq!((d.source, &*d.sent), (TagSource::Correlated, "dev.corr"));
    assert_eq!(d.edit, TagEdit::Set("dev.corr".into()));
    let d = tag::resolve_outbound(None, None, Some(&rc("dev")));
    assert_eq!((d.source, &*d.sent), (TagSource::Environment, "dev"));
    let d = tag::resolve_outbound(None, None, None);
    assert_eq!((d.source, &*d.sent, &d.edit), (TagSource::None, "", &TagEdit::Keep));
    // Malformed app tag: not propagated; replaced by what resolution finds, else removed.
    let d = tag::resolve_outbound(Some("bad tag"), None, Some(&rc("dev")));
    assert!(d.malformed);
    assert_eq!(d.received, "bad tag");
    assert_eq!((d.source, &*d.sent), (TagSource::Environment, "dev"));
    let d = tag::resolve_outbound(Some("bad tag"), None, None);
    assert_eq!((d.source, &d.edit), (TagSource::None, &TagEdit::Remove));
    assert_eq!(tag::source_name(TagSource::Correlated), "correlated");
});

t!(tag_resolution_inbound {
    let d = tag::resolve_inbound(Some("dev.proj1"));
    assert_eq!((d.source, &*d.sent, &d.edit), (TagSource::Request, "dev.proj1", &TagEdit::Keep));
    let d = tag::resolve_inbound(Some("<script>"));
    assert!(d.malformed);
    assert_eq!(d.edit, TagEdit::Remove);
    assert_eq!(&*d.sent, "");
    let d = tag::resolve_inbound(None);
    assert_eq!((d.source, &d.edit), (TagSource::None, &TagEdit::Keep));
});

// ------------------------------------------------------------------------------------
// trace context

fn l(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// The trace headers of a request, read as the filter reads them.
fn trace_headers<'a>(map: &'a [u8]) -> TraceHeaders<'a> {
    RequestView::parse(map, "x-virtual-env", "x-hopwatch-debug").trace
}

fn classify(pairs: &[(&str, &str)]) -> trace::TraceInfo<'static> {
    trace::classify(&trace_headers(&hdrs(pairs))).into_owned()
}

fn missing(pairs: &[(&str, &str)]) -> Vec<String> {
    trace_headers(&hdrs(pairs)).missing()
}

t!(trace_valid {
    let i = classify(&[("x-b3-traceid", T128), ("x-b3-spanid", S1), ("x-b3-parentspanid", S2), ("x-b3-sampled", "1"), ("x-request-id", "r1")]);
    assert_eq!(i.class, TraceContext::Valid, "{i:?}");
    assert_eq!((&*i.trace_id, &*i.span_id, &*i.parent_span_id), (T128, S1, S2));
    assert_eq!(i.sampled, Sampled::Yes);
    assert_eq!(i.request_id, "r1");
    assert_eq!(missing(&[("x-b3-traceid", T128), ("x-b3-spanid", S1), ("x-b3-parentspanid", S2), ("x-b3-sampled", "1"), ("x-request-id", "r1")]), vec!["b3".to_string(), "traceparent".to_string()]);

    let i = classify(&[("x-b3-traceid", T64), ("x-b3-spanid", S1), ("x-b3-flags", "1")]);
    assert_eq!(i.class, TraceContext::Valid);
    assert_eq!(i.trace_id, T64);
    assert_eq!(i.sampled, Sampled::Debug);

    let i = classify(&[("b3", &format!("{T128}-{S1}-d-{S2}"))]);
    assert_eq!(i.class, TraceContext::Valid);
    assert_eq!((&*i.trace_id, &*i.span_id, &*i.parent_span_id), (T128, S1, S2));
    assert_eq!(i.sampled, Sampled::Debug);

    let i = classify(&[("traceparent", &format!("00-{T128}-{S1}-01"))]);
    assert_eq!(i.class, TraceContext::Valid);
    assert_eq!((&*i.trace_id, &*i.w3c_trace_id, &*i.span_id), (T128, T128, S1));
    assert_eq!(i.b3_trace_id, "");
    assert_eq!(i.sampled, Sampled::Yes);
    let i = classify(&[("traceparent", &format!("00-{T128}-{S1}-00"))]);
    assert_eq!(i.sampled, Sampled::No);
    // A future version may carry more fields.
    let i = classify(&[("traceparent", &format!("01-{T128}-{S1}-01-extra"))]);
    assert_eq!(i.class, TraceContext::Valid);
    // Uppercase hex is accepted and normalised.
    let i = classify(&[("x-b3-traceid", &T128.to_uppercase()), ("x-b3-spanid", S1)]);
    assert_eq!((i.class, &*i.trace_id), (TraceContext::Valid, T128));
    // B3 (64-bit) and traceparent agree when the W3C id is the B3 id widened.
    let i = classify(&[("x-b3-traceid", T64), ("x-b3-spanid", S1), ("traceparent", &format!("00-0000000000000000{T64}-{S1}-01"))]);
    assert_eq!(i.class, TraceContext::Valid, "{i:?}");
    // Multi and single agreeing.
    let i = classify(&[("x-b3-traceid", T128), ("x-b3-spanid", S1), ("b3", &format!("{T128}-{S1}-1"))]);
    assert_eq!(i.class, TraceContext::Valid);
});

t!(trace_missing {
    let i = classify(&[]);
    assert_eq!(i.class, TraceContext::Missing);
    assert_eq!(missing(&[]).len(), 6);
    let i = classify(&[("x-request-id", "abc")]);
    assert_eq!(i.class, TraceContext::Missing);
    assert_eq!(missing(&[("x-request-id", "abc")]).len(), 5);
});

t!(trace_partial {
    for (pairs, detail) in [
        (vec![("x-b3-traceid", T128)], "x-b3-traceid without x-b3-spanid"),
        (vec![("x-b3-spanid", S1)], "x-b3-spanid without x-b3-traceid"),
        (vec![("x-b3-parentspanid", S2)], "x-b3-parentspanid without x-b3-traceid"),
        (vec![("x-b3-sampled", "1")], "x-b3-sampled without x-b3-traceid"),
        (vec![("b3", "1")], "b3: sampling decision only"),
    ] {
        let i = classify(&pairs);
        assert_eq!(i.class, TraceContext::Partial, "{pairs:?}");
        assert_eq!(i.detail, detail);
    }
});

t!(trace_malformed {
    let long = format!("{T128}00");
    let zero32 = "0".repeat(32);
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![("x-b3-traceid", "xyz463ac35c9f6413ad48485a3953bb6"), ("x-b3-spanid", S1)], "x-b3-traceid: not hex"),
        (vec![("x-b3-traceid", "463ac35c9f64"), ("x-b3-spanid", S1)], "x-b3-traceid: wrong length"),
        (vec![("x-b3-traceid", &long), ("x-b3-spanid", S1)], "x-b3-traceid: wrong length"),
        (vec![("x-b3-traceid", &zero32), ("x-b3-spanid", S1)], "x-b3-traceid: all-zero id"),
        (vec![("x-b3-traceid", T128), ("x-b3-spanid", "0000000000000000")], "x-b3-spanid: all-zero id"),
        (vec![("x-b3-traceid", T128), ("x-b3-spanid", S1), ("x-b3-sampled", "yes")], "x-b3-sampled: bad value"),
        (vec![("x-b3-traceid", T128), ("x-b3-spanid", S1), ("x-b3-flags", "2")], "x-b3-flags: bad value"),
        (vec![("x-b3-traceid", T128), ("x-b3-spanid", S1), ("x-b3-parentspanid", "12")], "x-b3-parentspanid: wrong length"),
        (vec![("b3", l(format!("{T128}-{S1}-1-{S2}-x")))], "b3: too many fields"),
        (vec![("b3", T128)], "b3: missing span id"),
        (vec![("b3", l(format!("{T128}-{S1}-x")))], "b3: bad sampling state"),
        (vec![("b3", "q")], "b3: bad sampling state"),
        (vec![("traceparent", "garbage")], "traceparent: too few fields"),
        (vec![("traceparent", l(format!("ff-{T128}-{S1}-01")))], "traceparent: bad version"),
        (vec![("traceparent", l(format!("00-{T128}-{S1}-01-x")))], "traceparent: too many fields for version 00"),
        (vec![("traceparent", l(format!("00-{zero32}-{S1}-01")))], "traceparent: all-zero trace id"),
        (vec![("traceparent", l(format!("00-{T64}-{S1}-01")))], "traceparent: trace id wrong length"),
        (vec![("traceparent", l(format!("00-{T128}-0000000000000000-01")))], "traceparent: all-zero parent id"),
        (vec![("traceparent", l(format!("00-{T128}-{S1}-1")))], "traceparent: bad flags"),
    ];
    for (pairs, detail) in cases {
        let i = classify(&pairs);
        assert_eq!(i.class, TraceContext::Malformed, "{pairs:?}: {i:?}");
        assert_eq!(i.detail, detail, "{pairs:?}");
    }
});

t!(trace_inconsistent {
    let other = "563ac35c9f6413ad48485a3953bb6124";
    let i = classify(&[("x-b3-traceid", T128), ("x-b3-spanid", S1), ("b3", &format!("{other}-{S1}"))]);
    assert_eq!(i.class, TraceContext::Inconsistent);
    assert_eq!(i.detail, "b3 disagrees with x-b3-traceid/x-b3-spanid");
    let i = classify(&[("x-b3-traceid", T128), ("x-b3-spanid", S1), ("b3", &format!("{T128}-{S2}"))]);
    assert_eq!(i.class, TraceContext::Inconsistent);
    let i = classify(&[("x-b3-traceid", T128), ("x-b3-spanid", S1), ("traceparent", &format!("00-{other}-{S1}-01"))]);
    assert_eq!(i.class, TraceContext::Inconsistent);
    assert_eq!(i.detail, "B3 trace id disagrees with traceparent");
    let i = classify(&[("b3", &format!("{T128}-{S1}")), ("traceparent", &format!("00-{other}-{S1}-01"))]);
    assert_eq!(i.class, TraceContext::Inconsistent);
});

t!(request_id_key_ignores_envoy_trace_reason {
    let a = "0b1e7c5e-2d43-4f7a-9d4b-6a2d9b1c0e11";
    let b = "0b1e7c5e-2d43-9f7a-9d4b-6a2d9b1c0e11";
    assert_eq!(trace::request_id_key(a), trace::request_id_key(b));
    assert_eq!(trace::request_id_key("not-a-uuid"), "not-a-uuid");
});

// ------------------------------------------------------------------------------------
// flags

t!(flag_decoding {
    assert_eq!(flags::decode(0), Vec::<String>::new());
    assert_eq!(flags::format(0), "-");
    assert_eq!(flags::format(32), "UF");
    assert_eq!(flags::format(2 | 256), "UH,NR");
    assert_eq!(flags::format(1 << 29 | 1), "LH,UDO");
    for (bit, name) in flags::FLAG_NAMES.iter().enumerate() {
        assert_eq!(flags::decode(1 << bit), vec![name.to_string()]);
        assert_eq!(flags::bit_of(name), Some(bit as u32));
    }
    assert_eq!(flags::decode(1 << 30), vec!["UNKNOWN(bit 30)".to_string()]);
    assert_eq!(flags::format(1 << 63 | 1 << 14), "DC,UNKNOWN(bit 63)");
    assert_eq!(flags::decode(u64::MAX).len(), 64);
    assert_eq!(flags::FLAG_NAMES.len(), 30);
    assert_eq!(flags::bit_of("NOPE"), None);
    assert_eq!(flags::parse_status(b"200"), 200);
    assert_eq!(flags::parse_status(b"503"), 503);
    for bad in [&b""[..], b"2000", b"2x0", b"-1", b"\xff"] {
        assert_eq!(flags::parse_status(bad), 0, "{bad:?}");
    }
});

// ------------------------------------------------------------------------------------
// correlation store

fn store_cfg() -> StoreConfig {
    StoreConfig {
        buckets: 16,
        per_bucket: 8,
        ttl_secs: 60,
    }
}

t!(correlation_encoding_roundtrip_and_garbage {
    let dims = Dims { buckets: 64, entries: 64 };
    for e in [
        Entry { expires_at: 100, kind: IdKind::B3, id: T128.into(), tag: "dev.a".into(), contexts: Contexts { b3: true, w3c: false, trace: correlation::trace_hash(T128) } },
        Entry { expires_at: 200, kind: IdKind::RequestId, id: "r".into(), tag: "".into(), contexts: Contexts { b3: false, w3c: true, trace: u64::MAX } },
    ] {
        let bytes = correlation::encode(&e, dims).unwrap();
        assert_eq!(correlation::decode(&bytes), Some((e.clone(), dims)));
        assert_eq!(correlation::written_dims(&bytes), Some(dims));
        assert_eq!(correlation::find_encoded(&bytes, e.kind, &e.id, 99), Some(&*e.tag));
        assert_eq!(correlation::find_encoded(&bytes, e.kind, &e.id, e.expires_at), None, "expired");
        // Truncated or padded: not one whole entry, nothing read.
        assert_eq!(correlation::decode(&bytes[..bytes.len() - 1]), None);
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(correlation::decode(&longer), None);
    }
    // Over-long ids or tags are not encoded (nor remembered in shared data).
    let long = Entry { expires_at: 1, kind: IdKind::Header, id: "i".repeat(256), tag: String::new(), contexts: Contexts::NONE };
    assert_eq!(correlation::encode(&long, dims), None);
    assert_eq!(correlation::decode(&[]), None);
    assert_eq!(correlation::decode(&[9, 1, 2, 3]), None);
    // The bucket format of earlier filters (version 1 and 2) is not this one: ignored.
    let mut v2 = vec![2u8, 64, 0];
    v2.extend_from_slice(&[100, 0, 0, 0, 1, 1, 3, 0]);
    v2.extend_from_slice(b"abc");
    assert_eq!(correlation::decode(&v2), None);
    // Any byte string decodes without panicking.
    let mut x: u64 = 1;
    for len in 0..300 {
        let mut b = vec![3u8];
        for _ in 0..len {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            b.push((x >> 56) as u8);
        }
        let _ = correlation::decode(&b);
        let _ = correlation::find_encoded_entry(&b, IdKind::B3, "abc", 0);
    }
});

t!(correlation_a_newer_id_overwrites_its_slot_and_each_write_is_one_blind_set {
    let h = FakeHost::new();
    let sc = store_cfg();
    let now = 1_000u32;
    // One write per id, no read, unconditional (cas 0).
    correlation::remember(&h, &h.local, &sc, &[(IdKind::B3, T128), (IdKind::W3c, T128), (IdKind::RequestId, "r")], "dev", Contexts::NONE, now);
    assert_eq!(h.calls("shared_get"), 0);
    assert_eq!(h.calls("shared_set"), 3);
    // Two ids of one slot: the newer one wins, the older is gone from shared data.
    let a = "a-0".to_string();
    let b = (1..10_000)
        .map(|i| format!("a-{i}"))
        .find(|b| correlation::slot_of(&sc, IdKind::RequestId, b) == correlation::slot_of(&sc, IdKind::RequestId, &a))
        .unwrap();
    correlation::remember(&h, &h.local, &sc, &[(IdKind::RequestId, &a)], "dev.a", Contexts::NONE, now);
    correlation::remember(&h, &h.local, &sc, &[(IdKind::RequestId, &b)], "dev.b", Contexts::NONE, now);
    let other_worker = LocalStore::new(64);
    assert!(correlation::recall(&h, &other_worker, &sc, &[(IdKind::RequestId, &a)], now).is_none());
    assert_eq!(&*correlation::recall(&h, &other_worker, &sc, &[(IdKind::RequestId, &b)], now).unwrap().tag, "dev.b");
    // The same id again: replaced in place, with its new tag.
    correlation::remember(&h, &h.local, &sc, &[(IdKind::RequestId, &b)], "dev.b2", Contexts::NONE, now);
    assert_eq!(&*correlation::recall(&h, &other_worker, &sc, &[(IdKind::RequestId, &b)], now).unwrap().tag, "dev.b2");
});

t!(correlation_remember_recall_ttl {
    let h = FakeHost::new();
    let sc = store_cfg();
    let now = 1_000_000u32;
    let fails = correlation::remember(&h, &h.local, &sc, &[(IdKind::B3, T128), (IdKind::W3c, ""), (IdKind::RequestId, "rid-1")], "dev.x", Contexts::NONE, now);
    assert_eq!(fails, 0);
    // Another worker (its own empty local copy) finds it in shared data.
    let e = correlation::recall(&h, &LocalStore::new(64), &sc, &[(IdKind::B3, T128)], now + 59).unwrap();
    assert_eq!(&*e.tag, "dev.x");
    let e = correlation::recall(&h, &LocalStore::new(64), &sc, &[(IdKind::B3, "other"), (IdKind::RequestId, "rid-1")], now).unwrap();
    assert_eq!(e.kind, IdKind::RequestId);
    assert!(correlation::recall(&h, &LocalStore::new(64), &sc, &[(IdKind::B3, T128)], now + 60).is_none(), "expired");
    assert!(correlation::recall(&h, &LocalStore::new(64), &sc, &[(IdKind::W3c, T128)], now).is_none(), "kind matters");
});

t!(correlation_local_copy_answers_the_same_worker_without_a_host_call {
    let h = FakeHost::new();
    let sc = store_cfg();
    let now = 1_000_000u32;
    correlation::remember(&h, &h.local, &sc, &[(IdKind::B3, T128), (IdKind::RequestId, "0b1e7c5e-2d43-4f7a-9d4b-6a2d9b1c0e11")], "dev.x", Contexts::NONE, now);
    h.reset_calls();
    // Same worker: answered from the local copy, no shared-data read.
    let e = correlation::recall(&h, &h.local, &sc, &[(IdKind::B3, T128)], now + 1).unwrap();
    assert_eq!((e.kind, &*e.tag), (IdKind::B3, "dev.x"));
    assert_eq!(h.calls("shared_get"), 0);
    // Order still wins over locality: a B3 id missing locally is looked up in shared
    // data before the request id found locally.
    let other = LocalStore::new(64);
    correlation::remember(&h, &other, &sc, &[(IdKind::B3, T64)], "dev.y", Contexts::NONE, now);
    h.reset_calls();
    let e = correlation::recall(&h, &h.local, &sc, &[(IdKind::B3, T64), (IdKind::RequestId, "0b1e7c5e-2d43-4f7a-9d4b-6a2d9b1c0e11")], now).unwrap();
    assert_eq!((e.kind, &*e.tag), (IdKind::B3, "dev.y"));
    assert_eq!(h.calls("shared_get"), 1);
    // Expiry applies locally too.
    h.reset_calls();
    assert!(correlation::recall(&h, &h.local, &sc, &[(IdKind::B3, T128)], now + 60).is_none());
    assert_eq!(h.calls("shared_get"), 1, "a local miss falls back to shared data");
    // Ids too long for the local copy are still correlated through shared data.
    let long = "r".repeat(correlation::LOCAL_ID_MAX + 1);
    correlation::remember(&h, &h.local, &sc, &[(IdKind::RequestId, &long)], "dev.z", Contexts::NONE, now);
    assert!(h.local.get(IdKind::RequestId, &long, now).is_none());
    assert_eq!(&*correlation::recall(&h, &h.local, &sc, &[(IdKind::RequestId, &long)], now).unwrap().tag, "dev.z");
    // The table is bounded: many ids overwrite slots, every answer stays exact.
    let small = LocalStore::new(8);
    let tag: std::rc::Rc<str> = "t".into();
    for i in 0..100 {
        small.put(IdKind::B3, &format!("{i:032x}"), &tag, Contexts::NONE, now + 10);
    }
    let kept = (0..100).filter(|i| small.get(IdKind::B3, &format!("{i:032x}"), now).is_some()).count();
    assert!((1..=8).contains(&kept), "{kept}");
    assert!(small.get(IdKind::W3c, &format!("{:032x}", 99), now).is_none(), "kind matters");
});

t!(correlation_local_and_shared_slots_are_independent {
    // Both tables are direct-mapped and of the same size at the defaults; ids that
    // collide in the local copy must not collide in shared data as well, or the shared
    // copy would never answer the local misses (tags lost under concurrency).
    let sc = StoreConfig { buckets: 64, per_bucket: 64, ttl_secs: 60 };
    let tag: std::rc::Rc<str> = "t".into();
    let id = |i: u64| format!("{:032x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut next = 1_000_000u64;
    for i in 0..20u64 {
        // An id whose local slot is the one of `first` (found through the table itself).
        let first = id(i);
        let probe = LocalStore::new(4096);
        let second = loop {
            next += 1;
            let cand = id(next);
            probe.put(IdKind::B3, &first, &tag, Contexts::NONE, 100);
            probe.put(IdKind::B3, &cand, &tag, Contexts::NONE, 100);
            if probe.get(IdKind::B3, &first, 10).is_none() {
                break cand;
            }
        };
        // The second request's id overwrites the first's local slot before the first's
        // outbound call is looked up: shared data answers.
        let h = FakeHost::new();
        let local = LocalStore::new(4096);
        correlation::remember(&h, &local, &sc, &[(IdKind::B3, &first)], "dev.first", Contexts::NONE, 10);
        correlation::remember(&h, &local, &sc, &[(IdKind::B3, &second)], "dev.second", Contexts::NONE, 10);
        assert!(local.get(IdKind::B3, &first, 10).is_none(), "collided locally");
        let hit = correlation::recall(&h, &local, &sc, &[(IdKind::B3, &first)], 10);
        assert_eq!(hit.map(|h| h.tag.to_string()).as_deref(), Some("dev.first"), "{first} / {second}");
    }
});

t!(correlation_memory_is_bounded {
    let h = FakeHost::new();
    let sc = store_cfg();
    for i in 0..5000u32 {
        correlation::remember(&h, &h.local, &sc, &[(IdKind::RequestId, &format!("client-id-{i}"))], "dev", Contexts::NONE, 1000);
    }
    let shared = h.shared.borrow();
    assert!(shared.len() <= sc.slots() as usize, "{} keys", shared.len());
    assert!(shared.len() > sc.slots() as usize / 2, "ids spread over the slots: {} keys", shared.len());
    for (k, (v, _)) in shared.iter() {
        assert!(k.starts_with("hopwatch.slot."));
        assert!(correlation::decode(v).is_some(), "{k}");
    }
});

t!(correlation_failed_writes_are_counted_and_never_retried {
    let h = FakeHost::new();
    let sc = store_cfg();
    assert_eq!(correlation::remember(&h, &h.local, &sc, &[(IdKind::B3, T128)], "dev", Contexts::NONE, 10), 0);
    assert!(correlation::recall(&h, &LocalStore::new(64), &sc, &[(IdKind::B3, T128)], 10).is_some());
    h.shared_broken.set(true);
    h.reset_calls();
    assert_eq!(correlation::remember(&h, &h.local, &sc, &[(IdKind::B3, "x1"), (IdKind::RequestId, "x2")], "dev", Contexts::NONE, 10), 2);
    assert_eq!(h.calls("shared_set"), 2, "one attempt per id");
    // The local copy still has them (the same worker still restores the tag).
    assert!(correlation::recall(&h, &h.local, &sc, &[(IdKind::B3, "x1")], 10).is_some());
});

// ------------------------------------------------------------------------------------
// sampling

t!(sampling_agrees_per_trace {
    assert!(sampling::sampled(1.0, "", ""));
    assert!(!sampling::sampled(0.0, T128, ""));
    // 64-bit B3 id and its 128-bit widening decide the same.
    let wide = format!("0000000000000000{T64}");
    for rate in [0.1, 0.5, 0.9] {
        assert_eq!(sampling::sampled(rate, T64, "a"), sampling::sampled(rate, &wide, "b"));
        assert_eq!(sampling::key(T64, ""), sampling::key(&wide, ""));
    }
    // Roughly the requested fraction of random trace ids.
    let mut x: u64 = 7;
    let mut n = 0;
    for _ in 0..10_000 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        if sampling::sampled(0.25, &format!("{:016x}{:016x}", x, x.rotate_left(17)), "") {
            n += 1;
        }
    }
    assert!((2200..2800).contains(&n), "{n}");
    // No trace id: the request id decides, deterministically.
    assert_eq!(sampling::sampled(0.5, "", "r1"), sampling::sampled(0.5, "", "r1"));
});

// ------------------------------------------------------------------------------------
// batching

fn hop(path: &str) -> Hop {
    Hop {
        path: path.into(),
        ..Hop::default()
    }
}

t!(batch_bounded_queue_drops_and_counts {
    let mut b = Batcher::new(3, 2, 1);
    assert_eq!(b.push(hop("1")), Push::Queued { flush_now: false });
    assert_eq!(b.push(hop("2")), Push::Queued { flush_now: true });
    assert_eq!(b.push(hop("3")), Push::Queued { flush_now: true });
    assert_eq!(b.push(hop("4")), Push::Dropped);
    assert_eq!(b.dropped_total(), 1);
    let batch = b.take().unwrap();
    assert_eq!(batch.hops.len(), 2);
    assert_eq!(batch.dropped, 1);
    b.dispatched(7, batch.hops.len(), batch.dropped, 1000, 5000);
    // One call in flight (max 1): nothing more to take.
    assert!(b.take().is_none());
    assert_eq!(b.completed(7, true), 0);
    assert_eq!(b.dropped_unreported(), 0, "the collector was told");
    assert_eq!(b.sent_total(), 2);
    // Failed dispatch and failed call count as drops.
    let batch = b.take().unwrap();
    assert_eq!(b.dispatch_failed(batch.hops.len()), 1);
    b.push(hop("5"));
    let batch = b.take().unwrap();
    assert_eq!(batch.dropped, 1);
    b.dispatched(8, 1, batch.dropped, 1000, 5000);
    assert_eq!(b.completed(8, false), 1);
    assert_eq!(b.dropped_unreported(), 2);
    assert_eq!(b.dropped_total(), 3);
    assert_eq!(b.completed(99, true), 0, "unknown token");
});

t!(batch_expires_lost_calls {
    let mut b = Batcher::new(10, 5, 1);
    b.push(hop("1"));
    let batch = b.take().unwrap();
    b.dispatched(1, 1, 0, 1000, 100);
    assert_eq!(b.expire(1100), 0);
    assert_eq!(b.expire(1200), 1);
    assert_eq!(b.in_flight(), 0);
    assert_eq!(b.dropped_total(), 1);
    drop(batch);
});

// ------------------------------------------------------------------------------------
// the request flow

t!(inbound_remembers_outbound_restores {
    let h = FakeHost::new();
    let inb = core("inbound", "dev");
    let outb = core("outbound", "dev");
    let (s, edit) = Stream::on_request_headers(&inb, &h, &h.local, hdrs(&[
        (":path", "/a?q=1"), (":method", "GET"), (":authority", "reviews"),
        ("x-virtual-env", "dev.proj1"), ("x-b3-traceid", T128), ("x-b3-spanid", S1),
        ("x-request-id", "0b1e7c5e-2d43-9f7a-9d4b-6a2d9b1c0e11"),
    ]));
    assert_eq!(edit, TagEdit::Keep);
    assert_eq!(s.class(), TraceContext::Valid);
    assert_eq!(s.request(&inb).path, Some("/a?q=1"));
    assert_eq!(h.counter(metrics::tag_metric("request")), 1);
    // Outbound with the same trace id: correlated tag, PROPAGATED.
    let (s, edit) = Stream::on_request_headers(&outb, &h, &h.local, hdrs(&[("x-b3-traceid", T128), ("x-b3-spanid", S2)]));
    assert_eq!(edit, TagEdit::Set("dev.proj1".into()));
    assert_eq!(s.tag().source, TagSource::Correlated);
    assert_eq!(s.correlated_tag(), "dev.proj1");
    assert_eq!(s.class(), TraceContext::Propagated);
    // Outbound with only the request id (trace decision char differs): tag restored,
    // trace MISSING.
    let (s, _) = Stream::on_request_headers(&outb, &h, &h.local, hdrs(&[("x-request-id", "0b1e7c5e-2d43-4f7a-9d4b-6a2d9b1c0e11")]));
    assert_eq!(s.tag().source, TagSource::Correlated);
    assert_eq!(s.class(), TraceContext::Missing);
    // Outbound with a new trace id: env tag, NEW.
    let (s, edit) = Stream::on_request_headers(&outb, &h, &h.local, hdrs(&[("x-b3-traceid", T64), ("x-b3-spanid", S2)]));
    assert_eq!(edit, TagEdit::Set("dev".into()));
    assert_eq!(s.tag().source, TagSource::Environment);
    assert_eq!(s.class(), TraceContext::New);
    // App tag kept, correlated tag still reported.
    let (s, edit) = Stream::on_request_headers(&outb, &h, &h.local, hdrs(&[("x-virtual-env", "dev.other"), ("x-b3-traceid", T128), ("x-b3-spanid", S2)]));
    assert_eq!(edit, TagEdit::Keep);
    assert_eq!(s.tag().source, TagSource::Request);
    assert_eq!(s.correlated_tag(), "dev.proj1");
    // No own tag, nothing correlated: none.
    let bare = core("outbound", "");
    let (s, edit) = Stream::on_request_headers(&bare, &h, &h.local, hdrs(&[]));
    assert_eq!((s.tag().source, edit), (TagSource::None, TagEdit::Keep));
    assert_eq!(h.counter(metrics::tag_metric("correlated")), 2);
    assert_eq!(h.counter(metrics::tag_metric("environment")), 1);
    assert_eq!(h.counter(metrics::tag_metric("none")), 1);
    assert_eq!(h.counter(metrics::trace_metric("propagated").unwrap()), 2);
    assert_eq!(h.counter(metrics::trace_metric("new").unwrap()), 1);
});

t!(a_call_found_by_its_request_id_with_the_same_trace_id_is_propagated {
    // The slot of the request's trace id was overwritten (another worker's view: only
    // the request id's slot is left): the call carries the request's trace id, so it
    // continues the trace (PROPAGATED), and a call of another trace id is NEW.
    let h = FakeHost::new();
    let rid = "0b1e7c5e-2d43-4f7a-9d4b-6a2d9b1c0e11";
    Stream::on_request_headers(&core("inbound", "dev"), &h, &h.local, hdrs(&[
        ("x-virtual-env", "dev.p"), ("x-b3-traceid", T128), ("x-b3-spanid", S1), ("x-request-id", rid),
    ]));
    let sc = core("outbound", "dev").store();
    let b3_key = correlation::slot_key(correlation::slot_of(&sc, IdKind::B3, T128));
    assert!(h.shared.borrow_mut().remove(&b3_key).is_some(), "the trace id's slot");
    let other_worker = LocalStore::new(64);
    let (s, edit) = Stream::on_request_headers(&core("outbound", "dev"), &h, &other_worker, hdrs(&[
        ("x-b3-traceid", T128), ("x-b3-spanid", S2), ("x-request-id", rid),
    ]));
    assert_eq!(edit, TagEdit::Set("dev.p".into()));
    assert_eq!(s.class(), TraceContext::Propagated);
    let (s, _) = Stream::on_request_headers(&core("outbound", "dev"), &h, &other_worker, hdrs(&[
        ("x-b3-traceid", T64), ("x-b3-spanid", S2), ("x-request-id", rid),
    ]));
    assert_eq!(s.tag().source, TagSource::Correlated);
    assert_eq!(s.class(), TraceContext::New);
});

t!(fallback_instance_passes_requested_tag_on {
    // A `dev` instance serving a `dev.proj1` request sends `dev.proj1` on.
    let h = FakeHost::new();
    let (_, _) = Stream::on_request_headers(&core("inbound", "dev"), &h, &h.local, hdrs(&[("x-virtual-env", "dev.proj1"), ("traceparent", &format!("00-{T128}-{S1}-01"))]));
    let (s, edit) = Stream::on_request_headers(&core("outbound", "dev"), &h, &h.local, hdrs(&[("traceparent", &format!("00-{T128}-{S2}-01"))]));
    assert_eq!(edit, TagEdit::Set("dev.proj1".into()));
    assert_eq!(s.class(), TraceContext::Propagated);
});

t!(correlation_entries_expire_in_the_flow {
    let h = FakeHost::new();
    Stream::on_request_headers(&core("inbound", "dev"), &h, &h.local, hdrs(&[("x-virtual-env", "dev.p"), ("x-b3-traceid", T128), ("x-b3-spanid", S1)]));
    h.advance_secs(61);
    let (s, _) = Stream::on_request_headers(&core("outbound", "dev"), &h, &h.local, hdrs(&[("x-b3-traceid", T128), ("x-b3-spanid", S2)]));
    assert_eq!(s.tag().source, TagSource::Environment);
    assert_eq!(s.class(), TraceContext::New);
});

t!(annotation_modes {
    let h = FakeHost::new();
    let mut c = core("outbound", "dev");
    let (s, _) = Stream::on_request_headers(&c, &h, &h.local, hdrs(&[]));
    h.prop_u64("response.flags", 32);
    h.prop("response.code_details", b"upstream_reset_before_response_started{remote_connection_failure}");
    let a = s.annotation(&c, &h, 503).unwrap();
    assert_eq!(a, "dir=outbound; workload=reviews-v1; ns=default; code=503; flags=UF; details=upstream_reset_before_response_started{remote_connection_failure}");
    h.prop_u64("response.flags", 0);
    assert_eq!(s.annotation(&c, &h, 200), None, "on_error: healthy response");
    assert!(s.annotation(&c, &h, 502).unwrap().contains("flags=-"));
    c.config.annotate_response = Annotate::Always;
    assert!(s.annotation(&c, &h, 200).is_some());
    c.config.annotate_response = Annotate::Never;
    assert!(!s.may_annotate(&c));
    h.reset_calls();
    assert_eq!(s.annotation(&c, &h, 503), None);
    assert_eq!(h.calls("property"), 0);
    c.config.annotate_response = Annotate::Debug;
    assert_eq!(s.annotation(&c, &h, 200), None);
    let (s, _) = Stream::on_request_headers(&c, &h, &h.local, hdrs(&[("x-hopwatch-debug", "1")]));
    assert!(s.annotation(&c, &h, 200).is_some());
});

t!(response_path_reads_only_what_it_needs {
    // Host calls are the filter's cost: a success in on_error mode reads no property at
    // response headers, and on_log reuses the :status seen there instead of response.code.
    let h = FakeHost::new();
    let c = core("outbound", "dev");
    let (s, _) = Stream::on_request_headers(&c, &h, &h.local, hdrs(&[("x-b3-traceid", T128), ("x-b3-spanid", S1)]));
    h.prop_u64("response.flags", 0);
    h.prop_u64("response.code", 200);
    h.reset_calls();
    assert_eq!(s.annotation(&c, &h, 200), None);
    assert_eq!(h.calls("property"), 0, "no property read for a 200 in on_error mode");
    s.on_log(&c, &h);
    assert_eq!(h.calls_exactly("property response.code"), 0, "the seen :status is reused");
    assert_eq!(h.calls_exactly("property response.flags"), 1);

    // A 4xx that Envoy produced itself (NR) is still annotated with its flag, and the
    // report carries the status seen at response headers.
    let (s, _) = Stream::on_request_headers(&c, &h, &h.local, hdrs(&[("x-b3-traceid", T128), ("x-b3-spanid", S1)]));
    h.prop_u64("response.flags", 1 << 8);
    h.prop_u64("response.code", 404);
    assert!(s.annotation(&c, &h, 404).unwrap().contains("flags=NR"));
    h.reset_calls();
    let hop = s.on_log(&c, &h).unwrap();
    assert_eq!(hop.response_code, 404);
    assert_eq!(h.calls_exactly("property response.code"), 0);

    // Reset before any response headers: on_log asks the host for the code.
    let (s, _) = Stream::on_request_headers(&c, &h, &h.local, hdrs(&[("x-b3-traceid", T128), ("x-b3-spanid", S1)]));
    h.prop_u64("response.code", 503);
    h.reset_calls();
    let hop = s.on_log(&c, &h).unwrap();
    assert_eq!(hop.response_code, 503);
    assert_eq!(h.calls_exactly("property response.code"), 1);
});

t!(complete_healthy_response_costs_no_property_read {
    // A 2xx that reached its end of stream: Envoy set no flags on it, nothing to read.
    let h = FakeHost::new();
    let mut c = core("outbound", "dev");
    c.config.report_sample_rate = 0.0;
    h.local.put(IdKind::B3, T128, &"dev.p".into(), Contexts::NONE, u32::MAX);
    let (s, _) = Stream::on_request_headers(&c, &h, &h.local, hdrs(&[("x-b3-traceid", T128), ("x-b3-spanid", S1)]));
    assert_eq!(s.class(), TraceContext::Propagated);
    h.prop_u64("response.flags", 1 << 4);
    h.reset_calls();
    assert_eq!(s.annotation(&c, &h, 200), None);
    s.response_complete();
    assert!(s.on_log(&c, &h).is_none());
    assert_eq!(h.calls("property"), 0);
    assert_eq!(h.calls("now"), 0, "no clock read for a hop that is not reported");
    // The same response cut short after its headers (no end of stream): flags read,
    // and the hop reported with them.
    let (s, _) = Stream::on_request_headers(&c, &h, &h.local, hdrs(&[("x-b3-traceid", T128), ("x-b3-spanid", S1)]));
    assert_eq!(s.annotation(&c, &h, 200), None);
    h.reset_calls();
    let hop = s.on_log(&c, &h).unwrap();
    assert_eq!(h.calls_exactly("property response.flags"), 1);
    assert_eq!(hop.response_flag_names, vec!["UR".to_string()]);
    assert_eq!(hop.response_code, 200);
    assert_eq!(hop.upstream_cluster, "", "no cluster set in this fake host");
    assert_eq!(h.calls_exactly("property xds.cluster_name"), 1);
    // A sampled healthy inbound hop is reported without a single property read: the
    // collector joins it by its ids and workload.
    let inb = core("inbound", "dev");
    let (s, _) = Stream::on_request_headers(&inb, &h, &h.local, hdrs(&[("x-b3-traceid", T128), ("x-b3-spanid", S1)]));
    s.annotation(&inb, &h, 200);
    s.response_complete();
    h.reset_calls();
    let hop = s.on_log(&inb, &h).unwrap();
    assert!(hop.sampled_report);
    assert_eq!(h.calls("property"), 0);
});

t!(on_log_builds_the_hop {
    let h = FakeHost::new();
    let c = core("outbound", "dev");
    let (s, _) = Stream::on_request_headers(&c, &h, &h.local, hdrs(&[
        (":path", "/api/v1?x=1"), (":method", "POST"), (":authority", "ratings:9080"),
        ("x-b3-traceid", T128), ("x-b3-spanid", S1), ("x-b3-sampled", "1"), ("x-request-id", "rid"),
    ]));
    h.advance_secs(1);
    for (k, v) in [
        ("response.code_details", "via_upstream"), ("xds.cluster_name", "outbound|9080||ratings"),
        ("upstream.address", "10.0.0.2:9080"), ("source.address", "10.0.0.1:5000"),
        ("destination.address", "10.0.0.9:9080"), ("upstream.local_address", "10.0.0.1:6000"),
        ("xds.route_name", "default"),
    ] {
        h.prop(k, v.as_bytes());
    }
    h.prop_u64("response.code", 200);
    h.prop_u64("response.flags", 0);
    h.req_headers.borrow_mut().insert("x-b3-spanid".into(), "1111111111111111".into());
    h.reset_calls();
    let hop = s.on_log(&c, &h).unwrap();
    assert_eq!(hop.trace_id, T128);
    assert_eq!(hop.span_id, S1);
    assert_eq!(hop.upstream_span_id, "1111111111111111");
    assert_eq!(hop.sampled, Sampled::Yes as i32);
    assert_eq!(hop.request_id, "rid");
    assert_eq!(hop.direction, 2);
    assert_eq!((hop.workload.as_str(), hop.namespace.as_str(), hop.pod.as_str(), hop.service.as_str()), ("reviews-v1", "default", "reviews-v1-abc", "reviews"));
    assert_eq!(hop.own_tag, "dev");
    assert_eq!((hop.tag_sent.as_str(), hop.tag_source), ("dev", TagSource::Environment as i32));
    assert_eq!(hop.trace_context, TraceContext::New as i32);
    assert_eq!((hop.method.as_str(), hop.path.as_str(), hop.authority.as_str()), ("POST", "/api/v1", "ratings:9080"));
    assert_eq!(hop.response_code, 200);
    assert_eq!(hop.upstream_cluster, "outbound|9080||ratings");
    assert_eq!(hop.upstream_host, "10.0.0.2:9080");
    // A healthy hop carries only what joins it to its neighbours: each property is a
    // host call.
    assert_eq!((hop.response_code_details.as_str(), hop.downstream_local_address.as_str(), hop.route_name.as_str()), ("", "", ""));
    assert_eq!(h.calls("property"), 2 + 2, "flags + code (no response headers seen), cluster, upstream host");
    // A failed one also what explains it; source.address and upstream.local_address
    // are never read (the collector does not use them).
    h.prop_u64("response.code", 503);
    h.prop_u64("response.flags", 32);
    h.reset_calls();
    let hop = s.on_log(&c, &h).unwrap();
    assert_eq!(hop.response_code_details, "via_upstream");
    assert_eq!(hop.downstream_local_address, "10.0.0.9:9080");
    assert_eq!(hop.route_name, "default");
    assert_eq!((hop.downstream_remote_address.as_str(), hop.upstream_local_address.as_str()), ("", ""));
    // ... and its protocol version (request.protocol).
    assert_eq!(h.calls("property"), 2 + 2 + 3 + 1);
    assert_eq!(h.calls_exactly("property request.protocol"), 1);
    h.prop_u64("response.code", 200);
    h.prop_u64("response.flags", 0);
    assert_eq!(hop.start_time_unix_micros, 1_700_000_000_000_000);
    assert_eq!(hop.duration_micros, 1_000_000);
    assert!(hop.sampled_report);
    assert_eq!(h.counter(metrics::HOPS_SEEN), 2, "one per on_log");
});

t!(unsampled_healthy_hops_cost_two_properties {
    let h = FakeHost::new();
    let mut c = core("inbound", "dev");
    c.config.report_sample_rate = 0.0;
    let (s, _) = Stream::on_request_headers(&c, &h, &h.local, hdrs(&[("x-b3-traceid", T128), ("x-b3-spanid", S1)]));
    h.prop_u64("response.code", 200);
    h.reset_calls();
    assert!(s.on_log(&c, &h).is_none());
    assert_eq!(h.calls("property"), 2);
    // Flags, 5xx and anomalies are reported whatever the sampling.
    h.prop_u64("response.flags", 1 << 1 | 1 << 40);
    let hop = s.on_log(&c, &h).unwrap();
    assert!(!hop.sampled_report);
    assert_eq!(hop.response_flag_names, vec!["UH".to_string(), "UNKNOWN(bit 40)".to_string()]);
    assert_eq!(h.counter(metrics::flag_metric(1)), 1);
    assert_eq!(h.counter(metrics::FLAG_UNKNOWN), 1);
    h.prop_u64("response.flags", 0);
    h.prop_u64("response.code", 503);
    assert!(s.on_log(&c, &h).is_some());
    h.prop_u64("response.code", 200);
    let (s, _) = Stream::on_request_headers(&c, &h, &h.local, hdrs(&[("x-b3-traceid", "zz"), ("x-b3-spanid", S1)]));
    assert!(s.on_log(&c, &h).is_some(), "malformed trace context is an anomaly");
    let (s, _) = Stream::on_request_headers(&c, &h, &h.local, hdrs(&[("x-virtual-env", "b@d")]));
    assert!(s.on_log(&c, &h).is_some(), "malformed tag is an anomaly");
    let (s, _) = Stream::on_request_headers(&c, &h, &h.local, hdrs(&[]));
    assert!(s.on_log(&c, &h).is_none(), "inbound without trace headers: edge traffic, not an anomaly");
    let mut o = core("outbound", "dev");
    o.config.report_sample_rate = 0.0;
    let (s, _) = Stream::on_request_headers(&o, &h, &h.local, hdrs(&[]));
    assert!(s.on_log(&o, &h).is_some(), "outbound without trace headers: not propagated");
});

// On a mesh without a tracer (Istio's default) requests carry only `x-request-id`: an
// outbound call without trace headers lost nothing and is sampled like any other hop.
// A call that lost a context its inbound request had stays an anomaly, from the
// correlation entry (shared data: another worker) or this VM's memory of traced inbound
// traffic, with no extra host call.
t!(untraced_outbound_is_sampled_unless_a_context_was_lost {
    const RID: &str = "0b1e7c5e-2d43-4f7a-9d4b-6a2d9b1c0e11";
    // The same request id as Envoy's UUID extension rewrites it (trace decision digit).
    const RID_REWRITTEN: &str = "0b1e7c5e-2d43-9f7a-9d4b-6a2d9b1c0e11";
    let mut inb = core("inbound", "dev");
    inb.config.report_sample_rate = 0.0;
    let mut out = core("outbound", "dev");
    out.config.report_sample_rate = 0.0;
    let healthy = |s: &Stream, c: &Core, h: &FakeHost| {
        s.annotation(c, h, 200);
        s.response_complete();
        s.on_log(c, h)
    };
    // Tracer-less mesh: inbound with only x-request-id, the app keeps it.
    let h = FakeHost::new();
    let (s, _) = Stream::on_request_headers(&inb, &h, &h.local, hdrs(&[("x-request-id", RID)]));
    assert!(healthy(&s, &inb, &h).is_none());
    let (s, _) = Stream::on_request_headers(&out, &h, &h.local, hdrs(&[("x-request-id", RID_REWRITTEN)]));
    assert_eq!(s.class(), TraceContext::Missing);
    h.reset_calls();
    assert!(healthy(&s, &out, &h).is_none(), "no context anywhere: nothing was lost");
    // The app dropped even x-request-id (Envoy made a new one): uncorrelated, and this
    // VM never saw a traced request, so still nothing to report at rate 0.
    let (s, _) = Stream::on_request_headers(&out, &h, &h.local, hdrs(&[("x-request-id", "fresh-id")]));
    assert!(healthy(&s, &out, &h).is_none());
    // An app that starts its own trace on a tracer-less mesh is not an anomaly either.
    let (s, _) = Stream::on_request_headers(&out, &h, &h.local, hdrs(&[("x-request-id", RID), ("traceparent", &format!("00-{T128}-{S1}-01"))]));
    assert_eq!(s.class(), TraceContext::New);
    assert!(healthy(&s, &out, &h).is_none());

    // The inbound request was traced (B3, even unsampled), the app kept x-request-id but
    // dropped the trace headers; the call runs on another worker (empty local copy).
    let h = FakeHost::new();
    let (s, _) = Stream::on_request_headers(&inb, &h, &h.local, hdrs(&[("x-request-id", RID), ("x-b3-traceid", T128), ("x-b3-spanid", S1), ("x-b3-sampled", "0")]));
    assert!(healthy(&s, &inb, &h).is_none());
    let other_worker = LocalStore::new(64);
    let (s, _) = Stream::on_request_headers(&out, &h, &other_worker, hdrs(&[("x-request-id", RID_REWRITTEN)]));
    let hop = healthy(&s, &out, &h).expect("the trace context the inbound request had was lost");
    assert_eq!(hop.trace_context, TraceContext::Missing as i32);
    // The same on this worker (local copy).
    let (s, _) = Stream::on_request_headers(&out, &h, &h.local, hdrs(&[("x-request-id", RID)]));
    assert!(healthy(&s, &out, &h).is_some());
    // Uncorrelated (x-request-id dropped too) on the worker that serves traced requests.
    let (s, _) = Stream::on_request_headers(&out, &h, &h.local, hdrs(&[("x-request-id", "fresh-id")]));
    assert!(healthy(&s, &out, &h).is_some(), "this workload's callers send trace context");
    h.reset_calls();
    Stream::on_request_headers(&out, &h, &h.local, hdrs(&[("x-request-id", "fresh-id-2")]));
    assert_eq!(h.calls("property"), 0);
    assert!(h.calls("shared_get") <= 1, "one lookup for the request id, as before");

    // Sampling of an x-request-id-only chain: every hop agrees although the UUID
    // extension rewrote a digit, and about `rate` of chains are sampled.
    let rate = 0.01;
    let mut n_sampled = 0;
    for i in 0..20_000u32 {
        let rid = format!("{:08x}-2d43-4f7a-9d4b-{:012x}", i.wrapping_mul(2_654_435_761), u64::from(i) * 7919);
        let rewritten = format!("{}9{}", &rid[..14], &rid[15..]);
        let key = trace::request_id_key(&rewritten);
        let a = sampling::sampled(rate, "", &trace::request_id_key(&rid));
        assert_eq!(a, sampling::sampled(rate, "", &key), "{rid}");
        n_sampled += usize::from(a);
    }
    assert!((100..=300).contains(&n_sampled), "{n_sampled} of 20000 sampled at 1 %");
});

// A client's OpenTelemetry SDK sends W3C only through sidecars whose tracer is B3 (or the
// reverse): the app passes on the context it received and the one its sidecar's tracer
// added; their trace ids differ. Not the app's fault, so no INCONSISTENT anywhere; an
// app that replaces a context it received by one of its own is still INCONSISTENT.
t!(a_tracers_second_context_is_not_inconsistent {
    const OTHER: &str = "563ac35c9f6413ad48485a3953bb6124";
    let inb = core("inbound", "dev");
    let out = core("outbound", "dev");
    let tp = |t: &str| format!("00-{t}-{S1}-01");
    // W3C client, B3 sidecar: the inbound filter saw traceparent only.
    let h = FakeHost::new();
    let (s, _) = Stream::on_request_headers(&inb, &h, &h.local, hdrs(&[("traceparent", &tp(OTHER)), ("x-request-id", "r1")]));
    assert_eq!(s.class(), TraceContext::Valid);
    // The app copies traceparent and the B3 headers the sidecar's tracer injected.
    let (s, _) = Stream::on_request_headers(&out, &h, &LocalStore::new(64), hdrs(&[("traceparent", &tp(OTHER)), ("x-b3-traceid", T128), ("x-b3-spanid", S2), ("x-request-id", "r1")]));
    assert_eq!(s.class(), TraceContext::Propagated);
    // The next sidecar receives both (its caller judged them): valid, and its app's call
    // passing both on is propagated.
    let h = FakeHost::new();
    let (s, _) = Stream::on_request_headers(&inb, &h, &h.local, hdrs(&[("traceparent", &tp(OTHER)), ("x-b3-traceid", T128), ("x-b3-spanid", S1)]));
    assert_eq!(s.class(), TraceContext::Valid);
    let (s, _) = Stream::on_request_headers(&out, &h, &h.local, hdrs(&[("traceparent", &tp(OTHER)), ("x-b3-traceid", T128), ("x-b3-spanid", S2)]));
    assert_eq!(s.class(), TraceContext::Propagated);
    // The reverse: B3 client, OpenTelemetry sidecar.
    let h = FakeHost::new();
    Stream::on_request_headers(&inb, &h, &h.local, hdrs(&[("x-b3-traceid", T128), ("x-b3-spanid", S1)]));
    let (s, _) = Stream::on_request_headers(&out, &h, &h.local, hdrs(&[("traceparent", &tp(OTHER)), ("x-b3-traceid", T128), ("x-b3-spanid", S2)]));
    assert_eq!(s.class(), TraceContext::Propagated);
    // App-made: it received both, consistent, and replaced traceparent by a trace of its own.
    let h = FakeHost::new();
    Stream::on_request_headers(&inb, &h, &h.local, hdrs(&[("x-b3-traceid", T128), ("x-b3-spanid", S1), ("traceparent", &tp(T128))]));
    let (s, _) = Stream::on_request_headers(&out, &h, &h.local, hdrs(&[("traceparent", &tp(OTHER)), ("x-b3-traceid", T128), ("x-b3-spanid", S2)]));
    assert_eq!(s.class(), TraceContext::Inconsistent);
    // Made up from nothing it received: inconsistent.
    let h = FakeHost::new();
    let (s, _) = Stream::on_request_headers(&out, &h, &h.local, hdrs(&[("traceparent", &tp(OTHER)), ("x-b3-traceid", T128), ("x-b3-spanid", S2)]));
    assert_eq!(s.class(), TraceContext::Inconsistent);
    // b3 against x-b3-* (one tracer's two encodings) stays inconsistent on inbound.
    let (s, _) = Stream::on_request_headers(&inb, &h, &h.local, hdrs(&[("x-b3-traceid", T128), ("x-b3-spanid", S1), ("b3", &format!("{OTHER}-{S1}"))]));
    assert_eq!(s.class(), TraceContext::Inconsistent);
});

t!(request_headers_host_calls {
    let h = FakeHost::new();
    let c = core("inbound", "dev");
    Stream::on_request_headers(&c, &h, &h.local, hdrs(&[("x-b3-traceid", T128), ("x-b3-spanid", S1), ("x-request-id", "r")]));
    assert_eq!(h.calls("now"), 1);
    assert!(h.calls("shared_get") <= 3);
    assert!(h.calls("shared_set") <= 3);
    assert_eq!(h.calls("property"), 0);
});

t!(identity_sources {
    let c = cfg(r#"{"direction":"outbound"}"#);
    let h = FakeHost::new();
    h.prop("xds.node.metadata.WORKLOAD_NAME", b"reviews-v1");
    h.prop("xds.node.metadata.NAMESPACE", b"default");
    h.prop("xds.node.metadata.NAME", b"reviews-v1-abc");
    h.prop("xds.node.metadata.LABELS.virtual-env", b"dev.label");
    let id = Identity::load(&c, &h, Some("dev.env".into()));
    assert_eq!((id.workload.as_str(), id.namespace.as_str(), id.pod.as_str()), ("reviews-v1", "default", "reviews-v1-abc"));
    assert_eq!(id.own_tag, "dev.env");
    assert_eq!(id.service, "reviews-v1");
    let id = Identity::load(&c, &h, None);
    assert_eq!(id.own_tag, "dev.label");
    let id = Identity::load(&c, &h, Some("bad tag".into()));
    assert_eq!(id.own_tag, "dev.label");
    assert_eq!(id.invalid_own_tag.as_deref(), Some("bad tag"));
    h.prop("xds.node.metadata.LABELS.app", b"reviews");
    assert_eq!(Identity::load(&c, &h, None).service, "reviews");
    h.prop("xds.node.metadata.LABELS.service.istio.io/canonical-name", b"reviews-canon");
    assert_eq!(Identity::load(&c, &h, None).service, "reviews-canon");
    let empty = FakeHost::new();
    let id = Identity::load(&c, &empty, Some(String::new()));
    assert_eq!(id.own_tag, "");
    assert_eq!(id.invalid_own_tag, None);
});

// ------------------------------------------------------------------------------------
// reports

t!(report_request_decodes {
    let bytes = report::encode_request(
        vec![hop("/a"), hop("/b")],
        report::Reporter {
            pod: "pod-1",
            namespace: "ns",
            service_account: "sa-1",
        },
        3,
    );
    let r = ReportRequest::decode(bytes.as_slice()).unwrap();
    assert_eq!(r.hops.len(), 2);
    assert_eq!((r.reporter_pod.as_str(), r.reporter_namespace.as_str(), r.dropped_since_last_batch), ("pod-1", "ns", 3));
    assert_eq!(report::path_without_query("/a/b?c=d#e"), "/a/b");
    assert_eq!(report::path_without_query("/a#x"), "/a");
    assert_eq!(report::path_without_query(&"/x".repeat(1000)).len(), report::MAX_PATH_LEN);
    let a = report::annotation(Direction::Inbound, "", "", 0, None, 0, "a\nb");
    assert_eq!(a, "dir=inbound; workload=-; ns=-; code=0; flags=-; details=a b");
});

t!(metric_names_are_complete {
    let names = metrics::names("outbound");
    assert_eq!(names.len(), metrics::COUNT);
    assert_eq!(names[metrics::REPORTS_DROPPED.0 as usize], "hopwatch.outbound.reports_dropped");
    assert_eq!(names[metrics::HOPS_REPORTED.0 as usize], "hopwatch.outbound.hops_reported");
    assert_eq!(names[metrics::tag_metric("correlated").0 as usize], "hopwatch.outbound.tag.correlated");
    assert_eq!(names[metrics::trace_metric("inconsistent").unwrap().0 as usize], "hopwatch.outbound.trace.inconsistent");
    assert_eq!(names[metrics::flag_metric(5).0 as usize], "hopwatch.outbound.response_flag.UF");
    assert_eq!(names[metrics::FLAG_UNKNOWN.0 as usize], "hopwatch.outbound.response_flag.unknown");
    assert_eq!(metrics::flag_metric(45), metrics::FLAG_UNKNOWN);
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), names.len(), "unique names");
});

// ------------------------------------------------------------------------------------
// host data formats

t!(grpc_service_encoding {
    let b = report::grpc_service_bytes("hopwatch-collector", "hopwatch-collector");
    let mut want = vec![0x0a, 40, 0x0a, 18];
    want.extend_from_slice(b"hopwatch-collector");
    want.extend_from_slice(&[0x12, 18]);
    want.extend_from_slice(b"hopwatch-collector");
    assert_eq!(b, want);
    // Long names use multi-byte varints.
    let long = "c".repeat(200);
    let b = report::grpc_service_bytes(&long, "");
    assert_eq!(&b[..6], &[0x0a, 0xcb, 0x01, 0x0a, 0xc8, 0x01]);
    assert_eq!(b.len(), 206);
});

t!(header_map_read_in_place_never_panics {
    use hopwatch_filter::headers::pairs;
    let mut b = Vec::new();
    b.extend_from_slice(&2u32.to_le_bytes());
    for (k, v) in [("a", "1"), (":path", "/x")] {
        b.extend_from_slice(&(k.len() as u32).to_le_bytes());
        b.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in [("a", "1"), (":path", "/x")] {
        b.extend_from_slice(k.as_bytes());
        b.push(0);
        b.extend_from_slice(v.as_bytes());
        b.push(0);
    }
    assert_eq!(b, hdrs(&[("a", "1"), (":path", "/x")]), "serialize matches the host format");
    let got: Vec<(&[u8], &[u8])> = pairs(&b).collect();
    assert_eq!(got, vec![(&b"a"[..], &b"1"[..]), (&b":path"[..], &b"/x"[..])]);
    for cut in 0..b.len() {
        assert!(pairs(&b[..cut]).count() <= 2);
        let _ = RequestView::parse(&b[..cut], "x-virtual-env", "x-hopwatch-debug");
    }
    assert_eq!(pairs(&u32::MAX.to_le_bytes()).count(), 0);
    assert_eq!(pairs(&[]).count(), 0);
    // Any byte string is read without panicking.
    let mut x: u64 = 3;
    for len in 0..200 {
        let mut r = vec![(len % 7) as u8, 0, 0, 0];
        for _ in 0..len {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            r.push((x >> 59) as u8);
        }
        let _ = RequestView::parse(&r, "x-virtual-env", "x-hopwatch-debug");
    }
    // The view: first occurrence wins, configured names, a value that is not UTF-8 is
    // present but unreadable.
    let mut m = hdrs(&[
        (":authority", "a"), (":method", "GET"), (":path", "/p"), ("x-virtual-env", "dev"),
        ("x-virtual-env", "second"), ("x-hopwatch-debug", ""), ("x-b3-traceid", "ZZ"),
    ]);
    let v = RequestView::parse(&m, "x-virtual-env", "x-hopwatch-debug");
    assert_eq!((v.authority, v.method, v.path, v.tag), (Some("a"), Some("GET"), Some("/p"), Some("dev")));
    assert!(v.debug);
    assert_eq!(v.trace.b3_trace_id, Some("ZZ"));
    let at = m.len() - 3; // "Z" of the b3 trace id value
    m[at] = 0xff;
    let v = RequestView::parse(&m, "x-virtual-env", "x-hopwatch-debug");
    assert_eq!(v.trace.b3_trace_id, Some("\u{fffd}"));
});

// ------------------------------------------------------------------------------------
// gRPC, and streams answered before the filter

t!(grpc_is_known_by_its_content_type {
    use hopwatch_filter::headers::is_grpc_content_type as g;
    for yes in ["application/grpc", "application/grpc+proto", "application/grpc;charset=utf-8", "Application/GRPC+json"] {
        assert!(g(yes), "{yes}");
    }
    for no in ["application/grpc-web", "application/grpc-web+proto", "application/json", "application/grp", ""] {
        assert!(!g(no), "{no}");
    }
    let map = hdrs(&[(":path", "/pkg.Svc/M"), ("content-type", "application/grpc")]);
    assert!(RequestView::parse(&map, "x-virtual-env", "x-hopwatch-debug").is_grpc());
    let map = hdrs(&[(":path", "/"), ("content-type", "text/plain")]);
    assert!(!RequestView::parse(&map, "x-virtual-env", "x-hopwatch-debug").is_grpc());
});

t!(grpc_reply_is_read_from_one_map {
    use hopwatch_filter::grpc::{read_reply, parse_status, MAX_MESSAGE_LEN};
    let r = read_reply(&hdrs(&[(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "14"), ("grpc-message", "no healthy upstream")]));
    assert_eq!((r.http_status, r.status, r.message.as_str()), (200, Some(14), "no healthy upstream"));
    // OK: the message is not kept; trailers carry no :status.
    let r = read_reply(&hdrs(&[("grpc-status", "0"), ("grpc-message", "fine")]));
    assert_eq!((r.http_status, r.status, r.message.as_str()), (0, Some(0), ""));
    // Bounded, control characters replaced, garbage status ignored.
    let long = "é".repeat(400);
    let r = read_reply(&hdrs(&[("grpc-status", "13"), ("grpc-message", &long)]));
    assert!(r.message.len() <= MAX_MESSAGE_LEN && r.message.starts_with('é'));
    let r = read_reply(&hdrs(&[("grpc-status", "13"), ("grpc-message", "a\nb")]));
    assert_eq!(r.message, "a b");
    // Percent-decoded (as gRPC sends it), lone or bad escapes kept.
    let r = read_reply(&hdrs(&[("grpc-status", "13"), ("grpc-message", "app%20error%3A%20caf%C3%A9 100%% %zz %4")]));
    assert_eq!(r.message, "app error: café 100%% %zz %4");
    assert_eq!(parse_status(b" 2 "), Some(2));
    for bad in [&b"x"[..], b"", b"-1", b"99999999999"] {
        assert_eq!(parse_status(bad), None);
    }
    assert_eq!(read_reply(b"garbage"), Default::default());
});

/// A gRPC request through the flow: (Envoy's trailers-only UH reply, healthy reply)
/// -> what on_log reads and reports.
fn grpc_stream(h: &FakeHost, c: &Core) -> Stream {
    let (s, _) = Stream::on_request_headers(
        c,
        h,
        &h.local,
        hdrs(&[
            (":path", "/shop.Cart/Get"),
            (":method", "POST"),
            ("content-type", "application/grpc"),
            ("x-b3-traceid", T128),
            ("x-b3-spanid", S1),
            ("x-request-id", "r-grpc"),
        ]),
    );
    assert!(s.is_grpc());
    s
}

t!(grpc_failure_in_a_200_is_a_failure {
    let h = FakeHost::new();
    let mut c = core("outbound", "dev");
    c.config.report_sample_rate = 0.0;
    let s = grpc_stream(&h, &c);
    // Trailers-only reply at response headers: :status 200, grpc-status 14.
    s.response_complete();
    s.grpc_reply(hopwatch_filter::grpc::read_reply(&hdrs(&[(":status", "200"), ("grpc-status", "14"), ("grpc-message", "no healthy upstream")])));
    h.prop_u64("response.flags", 1 << 1);
    h.prop("response.code_details", b"no_healthy_upstream");
    let a = s.annotation(&c, &h, s.response_status()).expect("annotated");
    assert!(a.contains("code=200; grpc_status=14; flags=UH; details=no_healthy_upstream"), "{a}");
    let hop = s.on_log(&c, &h).expect("always reported");
    assert_eq!((hop.response_code, hop.grpc_status, hop.grpc_message.as_str()), (200, Some(14), "no healthy upstream"));
    assert_eq!(hop.response_flag_names, vec!["UH".to_string()]);
    assert_eq!(hop.response_code_details, "no_healthy_upstream");
    assert_eq!(hop.protocol, hopwatch_proto::v1::Protocol::Grpc as i32);
    assert!(!hop.sampled_report);
    assert_eq!(h.counter(metrics::GRPC_ERRORS), 1);
    assert_eq!(h.counter(metrics::flag_metric(1)), 1);
});

t!(healthy_grpc_costs_no_property_read_and_http_reads_no_protocol {
    let h = FakeHost::new();
    let c = core("outbound", "dev");
    let s = grpc_stream(&h, &c);
    s.note_status(200);
    s.grpc_reply(hopwatch_filter::grpc::read_reply(&hdrs(&[("grpc-status", "0")])));
    s.response_complete();
    h.reset_calls();
    assert_eq!(s.annotation(&c, &h, 200), None);
    let hop = s.on_log(&c, &h).unwrap();
    assert_eq!(hop.grpc_status, Some(0));
    assert_eq!(h.calls_exactly("property response.flags"), 0, "grpc-status 0 seen: healthy");
    assert_eq!(h.calls("property request.protocol"), 0);
    assert_eq!(h.counter(metrics::GRPC_ERRORS), 0);
    // A gRPC stream that ended without any grpc-status is not known healthy.
    let s = grpc_stream(&h, &c);
    s.note_status(200);
    s.response_complete();
    h.reset_calls();
    let hop = s.on_log(&c, &h).unwrap();
    assert_eq!(hop.grpc_status, None);
    assert_eq!(h.calls_exactly("property response.flags"), 1);
    // A healthy HTTP hop: the version is not read (protocol HTTP).
    let (s, _) = Stream::on_request_headers(&c, &h, &h.local, hdrs(&[("x-b3-traceid", T128), ("x-b3-spanid", S1)]));
    s.annotation(&c, &h, 200);
    s.response_complete();
    h.reset_calls();
    let hop = s.on_log(&c, &h).unwrap();
    assert_eq!(hop.protocol, hopwatch_proto::v1::Protocol::Http as i32);
    assert_eq!(h.calls("property request.protocol"), 0);
    // A failed HTTP hop: the version is read.
    let (s, _) = Stream::on_request_headers(&c, &h, &h.local, hdrs(&[("x-b3-traceid", T128), ("x-b3-spanid", S1)]));
    h.prop("request.protocol", b"HTTP/1.1");
    h.prop_u64("response.flags", 0);
    s.annotation(&c, &h, 503);
    let hop = s.on_log(&c, &h).unwrap();
    assert_eq!(hop.protocol, hopwatch_proto::v1::Protocol::Http1 as i32);
});

t!(streams_answered_before_the_filter_are_always_reported {
    let h = FakeHost::new();
    let mut c = core("inbound", "dev");
    c.config.report_sample_rate = 0.0;
    h.prop_u64("response.code", 403);
    h.prop_u64("response.flags", 0);
    h.prop("response.code_details", b"rbac_access_denied_matched_policy[ns[default]-policy[deny]-rule[0]]");
    h.prop("request.protocol", b"HTTP/2");
    let s = Stream::answered_before_filter(&c, &h, hdrs(&[
        (":path", "/admin?x=1"), (":method", "GET"), ("x-virtual-env", "dev.proj1"),
        ("x-b3-traceid", T128), ("x-b3-spanid", S1), ("x-request-id", "r-denied"),
    ]));
    let hop = s.on_log(&c, &h).expect("reported whatever the sample rate");
    assert!(hop.answered_before_filter);
    assert_eq!((hop.response_code, hop.path.as_str(), hop.span_id.as_str()), (403, "/admin", S1));
    assert_eq!(hop.response_code_details, "rbac_access_denied_matched_policy[ns[default]-policy[deny]-rule[0]]");
    assert_eq!((hop.tag_received.as_str(), hop.tag_sent.as_str()), ("dev.proj1", "dev.proj1"));
    assert_eq!(hop.protocol, hopwatch_proto::v1::Protocol::Http2 as i32);
    assert_eq!(hop.duration_micros, 0);
    assert_eq!(h.counter(metrics::ANSWERED_BEFORE_FILTER), 1);
    // Nothing was remembered for the outbound side: the request went nowhere.
    assert_eq!(h.calls("shared_set"), 0);
});

// ------------------------------------------------------------------------------------
// issue 15: nothing leaks outside the mesh, config checked, identity, small defects

/// A failed response (503 UF) on `direction`'s side, with `req` as request headers.
fn failed_stream(c: &Core, h: &FakeHost, req: &[(&str, &str)]) -> Stream {
    let (s, _) = Stream::on_request_headers(c, h, &h.local, hdrs(req));
    h.prop_u64("response.flags", 32);
    h.prop(
        "response.code_details",
        b"upstream_reset_before_response_started{remote_connection_failure}",
    );
    s
}

t!(inbound_annotates_only_mesh_peers {
    let h = FakeHost::new();
    let c = core("inbound", "dev");
    // Plain text (no connection.mtls): an outside caller sees nothing.
    let s = failed_stream(&c, &h, &[]);
    h.reset_calls();
    assert_eq!(s.annotation(&c, &h, 503), None, "plain-text caller");
    assert_eq!(h.calls_exactly("property connection.mtls"), 1, "read once, when it decides");
    // mTLS with a peer certificate: a mesh peer.
    h.prop("connection.mtls", &[1]);
    assert!(s.annotation(&c, &h, 503).unwrap().starts_with("dir=inbound; workload=reviews-v1"));
    h.prop("connection.mtls", &[0]);
    assert_eq!(s.annotation(&c, &h, 503), None, "mtls=false");
    // mTLS, but a gateway marked the request as coming from outside.
    h.prop("connection.mtls", &[1]);
    let s = failed_stream(&c, &h, &[("x-envoy-external-address", "203.0.113.7")]);
    h.reset_calls();
    assert_eq!(s.annotation(&c, &h, 503), None, "external client through a gateway");
    assert_eq!(h.calls("property"), 1, "flags only: the header decides, no mtls read");
    // A healthy response costs no mtls read.
    let s = failed_stream(&c, &h, &[]);
    h.reset_calls();
    assert_eq!(s.annotation(&c, &h, 200), None);
    assert_eq!(h.calls("property"), 0);
    // annotate_external: everyone may see it, no mtls read.
    let mut c2 = core("inbound", "dev");
    c2.config.annotate_external = true;
    h.prop("connection.mtls", &[0]);
    let s = failed_stream(&c2, &h, &[("x-envoy-external-address", "203.0.113.7")]);
    h.reset_calls();
    assert!(s.annotation(&c2, &h, 503).is_some());
    assert_eq!(h.calls_exactly("property connection.mtls"), 0);
});

t!(outbound_caller_is_the_local_app_unless_marked_external {
    let h = FakeHost::new();
    let c = core("outbound", "dev");
    let s = failed_stream(&c, &h, &[]);
    h.reset_calls();
    assert!(s.annotation(&c, &h, 503).is_some());
    assert_eq!(h.calls_exactly("property connection.mtls"), 0, "outbound never reads mtls");
    let s = failed_stream(&c, &h, &[("x-envoy-external-address", "203.0.113.7")]);
    assert_eq!(s.annotation(&c, &h, 503), None, "the app passes an outside request on");
});

t!(debug_header_is_honoured_only_from_mesh_peers {
    let h = FakeHost::new();
    let mut c = core("inbound", "dev");
    c.config.annotate_response = Annotate::Debug;
    h.prop_u64("response.flags", 0);
    let (s, _) = Stream::on_request_headers(&c, &h, &h.local, hdrs(&[("x-hopwatch-debug", "1")]));
    assert_eq!(s.annotation(&c, &h, 200), None, "outside caller: debug ignored");
    h.prop("connection.mtls", &[1]);
    assert!(s.annotation(&c, &h, 200).is_some(), "mesh peer: debug honoured");
    let (s, _) = Stream::on_request_headers(
        &c, &h, &h.local,
        hdrs(&[("x-hopwatch-debug", "1"), ("x-envoy-external-address", "198.51.100.1")]),
    );
    assert_eq!(s.annotation(&c, &h, 200), None, "through a gateway: debug ignored");
});

t!(config_batch_size_is_limited_to_what_the_collector_accepts {
    assert_eq!(config::MAX_BATCH_HOPS, 5000);
    let c = cfg(r#"{"direction":"outbound","batch_size":5000,"queue_limit":5000}"#);
    assert_eq!(c.batch_size, 5000);
    let e = err(r#"{"direction":"outbound","batch_size":5001,"queue_limit":10000}"#);
    assert_eq!(e.field(), Some("batch_size"));
    assert!(e.to_string().contains("5000"), "{e}");
});

t!(config_report_token_is_never_shown {
    let c = cfg(r#"{"direction":"outbound","report_token":"s3cr3t-t0ken"}"#);
    assert_eq!(c.report_token.expose(), "s3cr3t-t0ken");
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("s3cr3t"), "{dbg}");
    assert!(dbg.contains("<redacted>"));
    assert_eq!(cfg(r#"{"direction":"outbound"}"#).report_token.expose(), "");
    let e = err(r#"{"direction":"outbound","report_token":"bad token\r\n"}"#);
    assert_eq!(e.field(), Some("report_token"));
    assert!(!e.to_string().contains("bad token"), "{e}");
    let e = err(r#"{"direction":"outbound","report_token":7}"#);
    assert_eq!(e.field(), Some("report_token"));
    // The metadata of report calls.
    let m = report::report_metadata("s3cr3t-t0ken");
    let pairs: Vec<_> = hopwatch_filter::headers::pairs(&m).collect();
    assert_eq!(pairs, vec![(&b"x-hopwatch-report-token"[..], &b"s3cr3t-t0ken"[..])]);
    assert_eq!(report::report_metadata(""), vec![0, 0, 0, 0]);
});

t!(service_account_from_node_metadata_in_hops_and_reports {
    let h = FakeHost::new();
    h.prop("xds.node.metadata.SERVICE_ACCOUNT", b"bookinfo-reviews");
    h.prop("xds.node.metadata.WORKLOAD_NAME", b"reviews-v1");
    let cfg_ = cfg(r#"{"direction":"outbound"}"#);
    let id = Identity::load(&cfg_, &h, None);
    assert_eq!(id.service_account, "bookinfo-reviews");
    let c = Core::new(cfg_, id);
    let (s, _) = Stream::on_request_headers(&c, &h, &h.local, hdrs(&[]));
    s.annotation(&c, &h, 200);
    s.response_complete();
    h.reset_calls();
    let hop = s.on_log(&c, &h).unwrap();
    assert_eq!(hop.service_account, "bookinfo-reviews");
    assert_eq!(h.calls_exactly("property xds.node.metadata.SERVICE_ACCOUNT"), 0, "read at configure time only");
    let r = ReportRequest::decode(
        report::encode_request(
            vec![hop],
            report::Reporter { pod: "p", namespace: "n", service_account: "bookinfo-reviews" },
            0,
        )
        .as_slice(),
    )
    .unwrap();
    assert_eq!(r.reporter_service_account, "bookinfo-reviews");
});

t!(fifty_duplicate_tag_headers_leave_as_one {
    for dir in ["inbound", "outbound"] {
        let h = FakeHost::new();
        let c = core(dir, "dev");
        let mut req: Vec<(&str, &str)> = vec![("x-virtual-env", "bad value!")];
        req.extend(std::iter::repeat_n(("x-virtual-env", "dev.alice"), 49));
        let (s, edit) = Stream::on_request_headers(&c, &h, &h.local, hdrs(&req));
        assert_eq!(edit, TagEdit::Set(rc("dev.alice")), "{dir}: one value, the first valid one");
        assert_eq!(&*s.tag().sent, "dev.alice");
        assert!(!s.tag().malformed, "{dir}");
        // All copies invalid: inbound removes them all, outbound stamps its own tag.
        let bad = vec![("x-virtual-env", "bad value!"); 50];
        let (_, edit) = Stream::on_request_headers(&c, &h, &h.local, hdrs(&bad));
        let want = if dir == "inbound" { TagEdit::Remove } else { TagEdit::Set(rc("dev")) };
        assert_eq!(edit, want, "{dir}");
        // One header: unchanged behaviour (kept, no write).
        let (_, edit) = Stream::on_request_headers(&c, &h, &h.local, hdrs(&[("x-virtual-env", "dev.alice")]));
        assert_eq!(edit, TagEdit::Keep, "{dir}");
    }
    assert_eq!(tag::first_valid(&["", "a b", "ok", "x"]), Some("ok"));
    assert_eq!(tag::first_valid(&["a b", "c d"]), Some("a b"));
    assert_eq!(tag::first_valid(&[]), None);
});

t!(dropped_counter_saturates_at_u64_max {
    let mut b = Batcher::new(10, 5, 2);
    assert_eq!(b.dispatch_failed(usize::MAX), usize::MAX as u64);
    b.dispatch_failed(usize::MAX);
    b.dispatch_failed(1);
    let edge = (usize::MAX as u64).saturating_mul(2).saturating_add(1);
    if usize::BITS == 64 {
        assert_eq!(edge, u64::MAX, "saturated (on 64-bit targets, where usize::MAX hops reach it)");
    }
    assert_eq!(b.dropped_unreported(), edge);
    assert_eq!(b.dropped_total(), edge);
    // A full queue still drops (and counts) without overflowing.
    for _ in 0..10 {
        b.push(Hop::default());
    }
    assert_eq!(b.push(Hop::default()), Push::Dropped);
    assert_eq!(b.dropped_total(), edge.saturating_add(1));
    // The batch carries the saturated count; its acknowledgement subtracts what it
    // carried without wrapping (drops made while saturated cannot be told apart), and
    // drops after it count again from zero.
    let edge = edge.saturating_add(1);
    let batch = b.take().unwrap();
    assert_eq!(batch.dropped, edge);
    b.dispatched(7, batch.hops.len(), batch.dropped, 0, 100);
    b.dispatch_failed(3);
    assert_eq!(b.dropped_unreported(), edge.saturating_add(3));
    b.completed(7, true);
    let left = edge.saturating_add(3) - edge;
    assert_eq!(b.dropped_unreported(), left);
    b.dispatch_failed(3);
    assert_eq!(b.dropped_unreported(), left + 3);
    // The request field round-trips u64::MAX.
    let r = ReportRequest::decode(report::encode_request(vec![], report::Reporter::default(), u64::MAX).as_slice()).unwrap();
    assert_eq!(r.dropped_since_last_batch, u64::MAX);
    // Expiry of a u64::MAX-sized call at the end of time neither overflows nor panics.
    let mut b = Batcher::new(10, 5, 2);
    b.dispatched(1, usize::MAX, u64::MAX, u64::MAX, u64::MAX);
    assert_eq!(b.expire(u64::MAX), usize::MAX as u64);
    assert_eq!(b.expire(u64::MAX), 0);
});

t!(warnings_are_rate_limited {
    use hopwatch_filter::ratelimit::{Warning, INTERVAL_MS};
    let mut w = Warning::default();
    assert_eq!(w.due(0), None, "nothing pending");
    assert_eq!(w.note(1, 1_000), Some(1), "the first one is logged at once");
    for i in 0..1000 {
        assert_eq!(w.note(1, 1_000 + i), None, "then not per occurrence");
    }
    assert_eq!(w.due(1_000 + INTERVAL_MS - 1), None);
    assert_eq!(w.due(1_000 + INTERVAL_MS), Some(1000), "once a minute, with the count");
    assert_eq!(w.due(10 * INTERVAL_MS), None, "nothing new: no line");
    assert_eq!(w.note(u64::MAX, 20 * INTERVAL_MS), Some(u64::MAX));
    w.note(u64::MAX, 20 * INTERVAL_MS);
    w.note(5, 20 * INTERVAL_MS);
    assert_eq!(w.pending(), u64::MAX, "saturates");
});

t!(correlation_store_size_is_carried_and_a_mismatch_is_detected {
    // Inbound remembers over 64 x 64 slots, outbound (another worker: no local copy)
    // looks up over 32 x 64: the mismatch is counted and noted, and the tag still
    // restored.
    let h = FakeHost::new();
    let inbound = StoreConfig { buckets: 64, per_bucket: 64, ttl_secs: 60 };
    let outbound = StoreConfig { buckets: 32, ..inbound };
    // An id whose two slots differ (so the second read is what finds it).
    let id = (0..1000)
        .map(|i| format!("{i:032x}"))
        .find(|id| correlation::slot_of(&inbound, IdKind::B3, id) != correlation::slot_of(&outbound, IdKind::B3, id))
        .unwrap();
    correlation::remember(&h, &h.local, &inbound, &[(IdKind::B3, &id)], "dev.alice", Contexts::NONE, 1000);
    assert_eq!(h.counter(metrics::CORRELATION_BUCKETS_MISMATCH), 0);
    // Make the outbound side's slot exist (written by the 64 x 64 side with another id).
    let other = (0..100000)
        .map(|i| format!("{i:016x}"))
        .find(|o| correlation::slot_of(&inbound, IdKind::B3, o) == correlation::slot_of(&outbound, IdKind::B3, &id))
        .unwrap();
    correlation::remember(&h, &h.local, &inbound, &[(IdKind::B3, &other)], "x", Contexts::NONE, 1000);
    let other_worker = LocalStore::new(64);
    h.reset_calls();
    let hit = correlation::recall(&h, &other_worker, &outbound, &[(IdKind::B3, &id)], 1001).unwrap();
    assert_eq!(&*hit.tag, "dev.alice", "restored despite the mismatch");
    assert_eq!(h.calls("shared_get"), 2, "one more read, only while misconfigured");
    assert_eq!(h.counter(metrics::CORRELATION_BUCKETS_MISMATCH), 1);
    assert_eq!(other_worker.take_mismatch(), Some((1, Dims { buckets: 64, entries: 64 })));
    assert_eq!(other_worker.take_mismatch(), None, "taken once");
    // The same sizes: no mismatch, one read.
    h.reset_calls();
    let same = LocalStore::new(64);
    assert!(correlation::recall(&h, &same, &inbound, &[(IdKind::B3, &id)], 1001).is_some());
    assert_eq!(h.calls("shared_get"), 1);
    assert_eq!(same.take_mismatch(), None);
    // Other dimensions with the same slot count hash alike: not a mismatch.
    let same_slots = StoreConfig { buckets: 32, per_bucket: 128, ttl_secs: 60 };
    let w = LocalStore::new(64);
    assert!(correlation::recall(&h, &w, &same_slots, &[(IdKind::B3, &id)], 1001).is_some());
    assert_eq!(w.take_mismatch(), None);
});
