//! Routing keys in every form: the baggage, cookie and other tracers' parsers, the new
//! configuration keys, and the filter flow with a baggage key, aliases, custom
//! correlation headers and sw8 / uber-trace-id / x-datadog-trace-id ids, driven through
//! a fake host. Runs natively (`cargo test`) and on `wasm32-unknown-unknown` under
//! `wasm-bindgen-test` (node), like `logic.rs`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use hopwatch_filter::baggage::{self, BaggageError};
use hopwatch_filter::config::{ConfigError, PluginConfig, TagAlias};
use hopwatch_filter::cookie;
use hopwatch_filter::correlation::LocalStore;
use hopwatch_filter::filter::{Core, Identity, Stream};
use hopwatch_filter::headers;
use hopwatch_filter::host::{Host, SetStatus};
use hopwatch_filter::metrics::Metric;
use hopwatch_filter::tag::TagEdit;
use hopwatch_filter::trace::{self, TraceHeaders};
use hopwatch_filter::tracers;
use hopwatch_proto::v1::{TagSource, TraceContext};

macro_rules! t {
    ($name:ident $body:block) => {
        #[cfg_attr(target_arch = "wasm32", wasm_bindgen_test::wasm_bindgen_test)]
        #[cfg_attr(not(target_arch = "wasm32"), test)]
        fn $name() $body
    };
}

// ------------------------------------------------------------------------------------
// fake host: shared data and a call log (what the filter asks of the proxy)

struct FakeHost {
    shared: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    calls: RefCell<Vec<String>>,
    now: Cell<u64>,
    local: LocalStore,
}

impl FakeHost {
    fn new() -> Self {
        FakeHost {
            shared: RefCell::default(),
            calls: RefCell::default(),
            now: Cell::new(1_700_000_000_000_000_000),
            local: LocalStore::new(4096),
        }
    }
    /// A second worker of the same sidecar: same shared data, its own local copy.
    fn other_worker(&self) -> Self {
        let w = FakeHost::new();
        *w.shared.borrow_mut() = self.shared.borrow().clone();
        w
    }
    fn calls(&self) -> Vec<String> {
        self.calls.borrow().clone()
    }
}

impl Host for FakeHost {
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.calls.borrow_mut().push(format!("shared_get {key}"));
        self.shared.borrow().get(key).cloned()
    }
    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> SetStatus {
        self.calls.borrow_mut().push(format!("shared_set {key}"));
        let mut m = self.shared.borrow_mut();
        let cur = m.get(key).map(|(_, c)| *c).unwrap_or(0);
        if cas != 0 && cas != cur {
            return SetStatus::CasMismatch;
        }
        m.insert(key.to_string(), (value.to_vec(), cur + 1));
        SetStatus::Ok
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.calls
            .borrow_mut()
            .push(format!("property {}", path.join(".")));
        None
    }
    fn request_header(&self, name: &str) -> Option<String> {
        self.calls
            .borrow_mut()
            .push(format!("request_header {name}"));
        None
    }
    fn now_nanos(&self) -> u64 {
        self.calls.borrow_mut().push("now".into());
        self.now.get()
    }
    fn count(&self, _metric: Metric, _by: u64) {}
}

fn cfg(json: &str) -> PluginConfig {
    PluginConfig::parse(json.as_bytes()).unwrap()
}

fn err(json: &str) -> ConfigError {
    PluginConfig::parse(json.as_bytes()).unwrap_err()
}

fn core(json: &str, own_tag: &str) -> Core {
    Core::new(
        cfg(json),
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

fn hdrs(pairs: &[(&str, &str)]) -> Vec<u8> {
    headers::serialize(pairs)
}

fn run(c: &Core, h: &FakeHost, pairs: &[(&str, &str)]) -> (Stream, TagEdit) {
    Stream::on_request_headers(c, h, &h.local, hdrs(pairs))
}

/// `sw8` with the given trace id (base64 of it in the second field).
fn sw8(trace_b64: &str) -> String {
    format!(
        "1-{trace_b64}-NWJlOGJjNjEuMS4x-0-c2VydmljZQ==-aW5zdGFuY2U=-L2FwaQ==-MTI3LjAuMC4xOjgwODA="
    )
}

// ------------------------------------------------------------------------------------
// configuration (serde_json)

t!(config_new_keys_defaults_and_values {
    let c = cfg(r#"{"direction":"outbound"}"#);
    assert_eq!(c.tag_baggage_key, "");
    assert!(c.tag_aliases.is_empty());
    assert!(c.correlation_headers.is_empty());
    assert!(!c.annotate_external);
    let c = cfg(r#"{"direction":"inbound","tag_baggage_key":"sd-routing-key",
        "tag_aliases":["header:x-env-alias","cookie:virtual-env","baggage:okteto-divert"],
        "correlation_headers":["my-trace-id"],"annotate_external":true}"#);
    assert_eq!(c.tag_baggage_key, "sd-routing-key");
    assert_eq!(
        c.tag_aliases,
        vec![
            TagAlias::Header("x-env-alias".into()),
            TagAlias::Cookie("virtual-env".into()),
            TagAlias::Baggage("okteto-divert".into())
        ]
    );
    assert_eq!(c.correlation_headers, vec!["my-trace-id".to_string()]);
    assert!(c.annotate_external);
});

t!(config_strings_with_escapes_are_json_strings {
    // A real JSON parser: escapes decode (\u002d is '-').
    let c = cfg(r#"{"direction":"outbound","tag_header":"x\u002denv","tag_aliases":["cookie:a\u002db"]}"#);
    assert_eq!(c.tag_header, "x-env");
    assert_eq!(c.tag_aliases, vec![TagAlias::Cookie("a-b".into())]);
});

t!(config_new_key_errors_name_the_key {
    let cases: &[(&str, &str, &str)] = &[
        (r#"{"direction":"inbound","tag_baggage_key":"a b"}"#, "tag_baggage_key", "baggage key"),
        (r#"{"direction":"inbound","tag_baggage_key":1}"#, "tag_baggage_key", "invalid type"),
        (r#"{"direction":"inbound","tag_aliases":"cookie:x"}"#, "tag_aliases", "invalid type"),
        (r#"{"direction":"inbound","tag_aliases":["query:x"]}"#, "tag_aliases", "unknown alias kind"),
        (r#"{"direction":"inbound","tag_aliases":["x-env"]}"#, "tag_aliases", "expected \"header:NAME\""),
        (r#"{"direction":"inbound","tag_aliases":["header:X-Env"]}"#, "tag_aliases", "lowercase"),
        (r#"{"direction":"inbound","tag_aliases":["header:"]}"#, "tag_aliases", "lowercase"),
        (r#"{"direction":"inbound","tag_aliases":["cookie:a;b"]}"#, "tag_aliases", "cookie name"),
        (r#"{"direction":"inbound","tag_aliases":["baggage:a=b"]}"#, "tag_aliases", "baggage key"),
        (r#"{"direction":"inbound","tag_aliases":["header:x-virtual-env"]}"#, "tag_aliases", "another header"),
        (r#"{"direction":"inbound","tag_aliases":["cookie:a","cookie:b","cookie:c","cookie:d","cookie:e","cookie:f","cookie:g","cookie:h","cookie:i"]}"#, "tag_aliases", "at most 8"),
        (r#"{"direction":"inbound","tag_aliases":[1]}"#, "tag_aliases", "invalid type"),
        (r#"{"direction":"inbound","correlation_headers":["My-Id"]}"#, "correlation_headers", "lowercase"),
        (r#"{"direction":"inbound","correlation_headers":["x-virtual-env"]}"#, "correlation_headers", "tag_header"),
        (r#"{"direction":"inbound","correlation_headers":"my-id"}"#, "correlation_headers", "invalid type"),
        (r#"{"direction":"inbound","annotate_external":"yes"}"#, "annotate_external", "invalid type"),
        (r#"{"direction":"inbound","tag_aliasses":[]}"#, "tag_aliasses", "unknown field"),
        (r#"{"direction":"inbound","report_sample_rate":"1"}"#, "report_sample_rate", "invalid type"),
        (r#"{"direction":"inbound","batch_size":-1}"#, "batch_size", "invalid value"),
    ];
    for (json, field, what) in cases {
        let e = err(json);
        let msg = e.to_string();
        assert!(msg.contains(&format!("`{field}`")), "{json}: {msg:?} does not name {field}");
        assert!(msg.contains(what), "{json}: {msg:?} does not say {what:?}");
        assert_eq!(e.field(), Some(*field), "{json}: {msg}");
    }
});

t!(config_key_at_finds_the_key_of_a_position {
    use hopwatch_filter::config::key_at;
    let j = br#"{"a": "x:\"y\"", "tag_aliases": ["header:x", {"k": 1}], "b": 2}"#;
    let at = |needle: &str| j.windows(needle.len()).position(|w| w == needle.as_bytes()).unwrap() + 1;
    assert_eq!(key_at(j, 1, at("x:")).as_deref(), Some("a"));
    assert_eq!(key_at(j, 1, at("{\"k\"") + 6).as_deref(), Some("tag_aliases"));
    assert_eq!(key_at(j, 1, at("2}")).as_deref(), Some("b"));
    assert_eq!(key_at(j, 1, 1), None);
    // Lines count: a multi-line manifest value.
    let m = b"{\n  \"direction\": \"inbound\",\n  \"batch_size\": -1\n}";
    assert_eq!(key_at(m, 3, 17).as_deref(), Some("batch_size"));
    assert_eq!(key_at(m, 2, 18).as_deref(), Some("direction"));
    assert_eq!(key_at(m, 9, 1), None);
    // And through the parser, multi-line as the manifests carry it.
    let e = err("{\n  \"direction\": \"inbound\",\n  \"tag_aliases\": [\"cookie:a\", 7]\n}");
    assert_eq!(e.field(), Some("tag_aliases"), "{e}");
});

// ------------------------------------------------------------------------------------
// W3C baggage

t!(baggage_reads_members_across_headers_with_properties_and_whitespace {
    let h = ["a=1, sd-routing-key = dev.alice ;ttl=60;flag", " ,b=two"];
    let m = baggage::parse(&h).unwrap();
    assert_eq!(m.len(), 3);
    assert_eq!((m[1].key, m[1].value, m[1].properties), ("sd-routing-key", "dev.alice", "ttl=60;flag"));
    assert_eq!(baggage::get(&h, "sd-routing-key").unwrap().as_deref(), Some("dev.alice"));
    assert_eq!(baggage::get(&h, "b").unwrap().as_deref(), Some("two"));
    assert_eq!(baggage::get(&h, "c").unwrap(), None);
    // Tabs are OWS too; the first member of a key wins.
    assert_eq!(baggage::get(&["k\t=\tv1,k=v2"], "k").unwrap().as_deref(), Some("v1"));
    assert_eq!(baggage::get(&[], "k").unwrap(), None);
});

t!(baggage_percent_decoding {
    assert_eq!(baggage::get(&["k=dev%2Ealice"], "k").unwrap().as_deref(), Some("dev.alice"));
    assert_eq!(baggage::get(&["k=a%20b%2C%3B"], "k").unwrap().as_deref(), Some("a b,;"));
    assert_eq!(baggage::get(&["k=%C3%A9"], "k").unwrap().as_deref(), Some("é"));
    // Bytes that are not UTF-8 become U+FFFD; a lone % is kept.
    assert_eq!(baggage::get(&["k=%FF"], "k").unwrap().as_deref(), Some("\u{fffd}"));
    assert_eq!(baggage::get(&["k=100%"], "k").unwrap().as_deref(), Some("100%"));
    assert_eq!(baggage::percent_encode("a b,c"), "a%20b%2Cc");
    assert_eq!(baggage::percent_encode("dev.alice"), "dev.alice");
});

t!(baggage_malformed_and_limits {
    assert_eq!(baggage::parse(&["novalue"]), Err(BaggageError::Malformed));
    assert_eq!(baggage::parse(&["a b=1"]), Err(BaggageError::Malformed));
    assert_eq!(baggage::parse(&["k=\"quoted\""]), Err(BaggageError::Malformed));
    assert_eq!(baggage::parse(&["k=v;bad prop"]), Err(BaggageError::Malformed));
    // 180 members are fine, 181 are too many (across headers).
    let members: Vec<String> = (0..180).map(|i| format!("k{i}=v")).collect();
    let list = members.join(",");
    assert_eq!(baggage::parse(&[&list]).unwrap().len(), 180);
    assert_eq!(baggage::parse(&[&list, "one=more"]), Err(BaggageError::TooManyMembers));
    // A member of 4096 bytes is fine, 4097 is too long.
    let ok = format!("k={}", "v".repeat(4094));
    assert!(baggage::parse(&[&ok]).is_ok());
    let long = format!("k={}", "v".repeat(4095));
    assert_eq!(baggage::parse(&[&long]), Err(BaggageError::MemberTooLong));
    // 8192 bytes in all.
    let a = format!("a={}", "v".repeat(4000));
    let b = format!("b={}", "v".repeat(4000));
    let c = format!("c={}", "v".repeat(300));
    assert_eq!(baggage::parse(&[&a, &b, &c]), Err(BaggageError::TooLong));
    // A malformed list is never read from nor rewritten.
    assert_eq!(baggage::get(&["k=v,oops"], "k"), Err(BaggageError::Malformed));
    assert_eq!(baggage::with_member(&["k=v,oops"], "k", "dev"), None);
});

t!(baggage_rewrite_keeps_other_members_and_properties {
    let h = ["a=1;p=q", "sd-routing-key=old;ttl=60, b=2"];
    assert_eq!(
        baggage::with_member(&h, "sd-routing-key", "dev.alice").unwrap(),
        "a=1;p=q,sd-routing-key=dev.alice;ttl=60,b=2"
    );
    assert_eq!(baggage::with_member(&["a=1"], "k", "dev").unwrap(), "a=1,k=dev");
    assert_eq!(baggage::with_member(&[], "k", "dev").unwrap(), "k=dev");
    assert_eq!(baggage::with_member(&["k=x,k=y"], "k", "dev").unwrap(), "k=dev,k=y");
    // Appending would exceed 180 members or 8192 bytes: left as it came.
    let members: Vec<String> = (0..180).map(|i| format!("k{i}=v")).collect();
    assert_eq!(baggage::with_member(&[&members.join(",")], "k", "dev"), None);
    let big = format!("a={}", "v".repeat(4090));
    let big2 = format!("b={}", "v".repeat(4090));
    assert_eq!(baggage::with_member(&[&big, &big2], "k", "dev.alice"), None);
});

// ------------------------------------------------------------------------------------
// cookies

t!(cookies_several_headers_pairs_and_quoting {
    let h = ["session=abc; theme=dark", "virtual-env=\"dev.alice\"; x=1"];
    assert_eq!(cookie::get(&h, "virtual-env"), Some("dev.alice"));
    assert_eq!(cookie::get(&h, "theme"), Some("dark"));
    assert_eq!(cookie::get(&h, "missing"), None);
    assert_eq!(cookie::get(&["a=1;b=2;  c = 3 "], "c"), Some("3"));
    assert_eq!(cookie::get(&["flag; a=1"], "a"), Some("1"));
    assert_eq!(cookie::get(&["a=1; a=2"], "a"), Some("1"));
    assert_eq!(cookie::get(&["a=\"unbalanced"], "a"), Some("\"unbalanced"));
    assert_eq!(cookie::get(&["a="], "a"), Some(""));
    // A name is matched whole, not as a prefix.
    assert_eq!(cookie::get(&["virtual-env-old=x"], "virtual-env"), None);
});

// ------------------------------------------------------------------------------------
// other tracers

t!(base64_decoding {
    assert_eq!(tracers::base64_decode("aGVsbG8=").unwrap(), b"hello");
    assert_eq!(tracers::base64_decode("aGVsbG8").unwrap(), b"hello");
    assert_eq!(tracers::base64_decode("aGk=").unwrap(), b"hi");
    assert_eq!(tracers::base64_decode("").unwrap(), b"");
    assert!(tracers::base64_decode("a").is_none());
    assert!(tracers::base64_decode("aGk*").is_none());
    assert!(tracers::base64_decode("aGVsbG8===").is_none());
    assert!(tracers::base64_decode("a=Gk").is_none());
});

t!(sw8_trace_id_field {
    // "5be8bc61.1.16859" base64.
    assert_eq!(tracers::sw8_trace_id(&sw8("NWJlOGJjNjEuMS4xNjg1OQ==")).unwrap(), "5be8bc61.1.16859");
    assert_eq!(tracers::sw8_trace_id(&format!(" {} ", sw8("YWJj"))).unwrap(), "abc");
    assert_eq!(tracers::sw8_trace_id(&sw8("not*base64")), Err("sw8: trace id not base64"));
    assert_eq!(tracers::sw8_trace_id(&sw8("")), Err("sw8: trace id not printable"));
    // Decodes, but to control bytes.
    assert_eq!(tracers::sw8_trace_id(&sw8("AAEC")), Err("sw8: trace id not printable"));
    assert_eq!(tracers::sw8_trace_id("1-YWJj"), Err("sw8: not 8 fields"));
    assert_eq!(tracers::sw8_trace_id("x"), Err("sw8: too few fields"));
    assert_eq!(tracers::sw8_trace_id(&sw8("YWJj").replacen('1', "2", 1)), Err("sw8: bad sample flag"));
});

t!(uber_trace_id_field_and_short_ids {
    assert_eq!(tracers::uber_trace_id("463ac35c9f6413ad48485a3953bb6124:a2fb4a1d1a96d312:0:1").unwrap(), "463ac35c9f6413ad48485a3953bb6124");
    // Short ids are padded: the same trace whoever printed it.
    assert_eq!(tracers::uber_trace_id("abc:1:0:1").unwrap(), "0000000000000abc");
    assert_eq!(tracers::uber_trace_id("0000000000000abc:1:0:1").unwrap(), "0000000000000abc");
    assert_eq!(tracers::uber_trace_id("1463ac35c9f6413ad:1:0:1").unwrap(), "0000000000000001463ac35c9f6413ad");
    assert_eq!(tracers::uber_trace_id("ABC:1:0:01").unwrap(), "0000000000000abc");
    assert_eq!(tracers::uber_trace_id("abc%3A1%3A0%3A1").unwrap(), "0000000000000abc");
    assert_eq!(tracers::uber_trace_id("0:1:0:1"), Err("uber-trace-id: all-zero trace id"));
    assert_eq!(tracers::uber_trace_id("xyz:1:0:1"), Err("uber-trace-id: trace id not hex"));
    assert_eq!(tracers::uber_trace_id(&format!("{}:1:0:1", "a".repeat(33))), Err("uber-trace-id: trace id longer than 32 digits"));
    assert_eq!(tracers::uber_trace_id("abc:1:0"), Err("uber-trace-id: not 4 fields"));
    assert_eq!(tracers::uber_trace_id("abc:0:0:1"), Err("uber-trace-id: bad span id"));
    assert_eq!(tracers::uber_trace_id("abc:1::1"), Err("uber-trace-id: bad parent span id"));
    assert_eq!(tracers::uber_trace_id("abc:1:0:zz"), Err("uber-trace-id: bad flags"));
});

t!(datadog_trace_id {
    assert_eq!(tracers::datadog_trace_id("1234567890123456789").unwrap(), "1234567890123456789");
    assert_eq!(tracers::datadog_trace_id(" 007 ").unwrap(), "7");
    assert_eq!(tracers::datadog_trace_id("18446744073709551615").unwrap(), "18446744073709551615");
    assert_eq!(tracers::datadog_trace_id("18446744073709551616"), Err("x-datadog-trace-id: larger than 64 bits"));
    assert_eq!(tracers::datadog_trace_id("0"), Err("x-datadog-trace-id: zero"));
    assert_eq!(tracers::datadog_trace_id("abc"), Err("x-datadog-trace-id: not a decimal number"));
    assert_eq!(tracers::datadog_trace_id(""), Err("x-datadog-trace-id: not a decimal number"));
});

t!(other_tracers_classify_only_without_b3_or_w3c {
    let sw = sw8("YWJj");
    let only = |h: TraceHeaders<'_>| trace::classify(&h).into_owned();
    let t = only(TraceHeaders { sw8: Some(&sw), ..TraceHeaders::default() });
    assert_eq!((t.class, t.other.sw8.as_str()), (TraceContext::Valid, "abc"));
    let t = only(TraceHeaders { uber_trace_id: Some("abc:1:0:1"), ..TraceHeaders::default() });
    assert_eq!((t.class, t.other.uber.as_str()), (TraceContext::Valid, "0000000000000abc"));
    let t = only(TraceHeaders { datadog_trace_id: Some("42"), ..TraceHeaders::default() });
    assert_eq!((t.class, t.other.datadog.as_str()), (TraceContext::Valid, "42"));
    // Malformed is data: the class and the reason, no id.
    let bad = sw8("*");
    let t = only(TraceHeaders { sw8: Some(&bad), ..TraceHeaders::default() });
    assert_eq!((t.class, &*t.detail, t.other.sw8.as_str()), (TraceContext::Malformed, "sw8: trace id not base64", ""));
    // With B3, another tracer's header is only an extra id.
    let t = only(TraceHeaders {
        b3_trace_id: Some("463ac35c9f6413ad48485a3953bb6124"),
        b3_span_id: Some("a2fb4a1d1a96d312"),
        sw8: Some(&bad),
        uber_trace_id: Some("abc:1:0:1"),
        ..TraceHeaders::default()
    });
    assert_eq!(t.class, TraceContext::Valid);
    assert_eq!(t.other.uber, "0000000000000abc");
    // The request view reads them from the serialized map.
    let m = hdrs(&[("sw8", &sw), ("uber-trace-id", "abc:1:0:1"), ("x-datadog-trace-id", "42")]);
    let v = headers::RequestView::parse(&m, "x-virtual-env", "x-hopwatch-debug");
    assert_eq!((v.trace.sw8, v.trace.uber_trace_id, v.trace.datadog_trace_id), (Some(sw.as_str()), Some("abc:1:0:1"), Some("42")));
});

// ------------------------------------------------------------------------------------
// the filter flow

const BAGGAGE_CFG: &str = r#""tag_baggage_key":"sd-routing-key""#;

t!(baggage_key_in_and_out {
    let h = FakeHost::new();
    let inb = core(&format!(r#"{{"direction":"inbound",{BAGGAGE_CFG}}}"#), "");
    let outb = core(&format!(r#"{{"direction":"outbound",{BAGGAGE_CFG}}}"#), "dev");
    // Inbound: no tag header, the tag in baggage: set as the tag header, remembered.
    let (s, edit) = run(&inb, &h, &[("baggage", "other=1,sd-routing-key=dev.alice;ttl=1"), ("x-request-id", "rid-1")]);
    assert_eq!((s.tag().source, &*s.tag().sent), (TagSource::Baggage, "dev.alice"));
    assert_eq!(edit, TagEdit::Set("dev.alice".into()));
    assert_eq!(s.baggage_edit(), None);
    let hop = s.on_log(&inb, &h).unwrap();
    assert_eq!((hop.tag_source, hop.tag_alias.as_str()), (TagSource::Baggage as i32, "baggage:sd-routing-key"));
    // Outbound: the app copied x-request-id and an OpenTelemetry baggage without our
    // member: restored into both the header and the baggage member.
    let (s, edit) = run(&outb, &h, &[("baggage", "other=1;p"), ("x-request-id", "rid-1")]);
    assert_eq!((s.tag().source, &*s.tag().sent), (TagSource::Correlated, "dev.alice"));
    assert_eq!(edit, TagEdit::Set("dev.alice".into()));
    assert_eq!(s.baggage_edit(), Some("other=1;p,sd-routing-key=dev.alice"));
    // Stamped (own tag) with no baggage at all: a new baggage header.
    let (s, _) = run(&outb, &h, &[]);
    assert_eq!((s.tag().source, s.baggage_edit()), (TagSource::Environment, Some("sd-routing-key=dev")));
    // The app kept the member: no header write for baggage, the tag header set from it.
    let (s, edit) = run(&outb, &h, &[("baggage", "sd-routing-key=dev.bob")]);
    assert_eq!((s.tag().source, &*s.tag().sent, s.baggage_edit()), (TagSource::Baggage, "dev.bob", None));
    assert_eq!(edit, TagEdit::Set("dev.bob".into()));
    // A malformed baggage header is left as it came; the tag header is still stamped.
    let (s, edit) = run(&outb, &h, &[("baggage", "sd-routing-key=dev.bob,garbage")]);
    assert_eq!((s.tag().source, s.baggage_edit()), (TagSource::Environment, None));
    assert_eq!(edit, TagEdit::Set("dev".into()));
    // The tag header wins over baggage.
    let (s, edit) = run(&outb, &h, &[("x-virtual-env", "dev.h"), ("baggage", "sd-routing-key=dev.b")]);
    assert_eq!((s.tag().source, &*s.tag().sent, edit), (TagSource::Request, "dev.h", TagEdit::Keep));
    // An invalid tag in baggage is malformed, not used.
    let (s, _) = run(&inb, &h, &[("baggage", "sd-routing-key=dev%20alice")]);
    assert!(s.tag().malformed);
    assert_eq!((s.tag().source, s.tag().received.as_str()), (TagSource::None, "dev alice"));
});

t!(aliases_in_order_and_reported {
    let h = FakeHost::new();
    let json = r#"{"direction":"inbound","tag_aliases":["header:x-env-alias","cookie:virtual-env","baggage:okteto-divert"]}"#;
    let inb = core(json, "");
    let (s, edit) = run(&inb, &h, &[("cookie", "a=1"), ("cookie", "virtual-env=\"dev.cookie\""), ("x-env-alias", "dev.header")]);
    assert_eq!((s.tag().source, &*s.tag().sent), (TagSource::AliasHeader, "dev.header"));
    assert_eq!(edit, TagEdit::Set("dev.header".into()));
    assert_eq!(s.on_log(&inb, &h).unwrap().tag_alias, "header:x-env-alias");
    let (s, _) = run(&inb, &h, &[("cookie", "a=1"), ("cookie", "virtual-env=\"dev.cookie\"")]);
    assert_eq!((s.tag().source, &*s.tag().sent), (TagSource::AliasCookie, "dev.cookie"));
    assert_eq!(s.on_log(&inb, &h).unwrap().tag_alias, "cookie:virtual-env");
    let (s, _) = run(&inb, &h, &[("baggage", "okteto-divert=ns-alice")]);
    assert_eq!((s.tag().source, &*s.tag().sent), (TagSource::AliasBaggage, "ns-alice"));
    // The header itself wins over every alias.
    let (s, edit) = run(&inb, &h, &[("x-virtual-env", "dev"), ("x-env-alias", "dev.header")]);
    assert_eq!((s.tag().source, edit), (TagSource::Request, TagEdit::Keep));
    // Outbound: an alias found is set as the tag header (routing rules match it).
    let outb = core(r#"{"direction":"outbound","tag_aliases":["cookie:virtual-env"]}"#, "dev");
    let (s, edit) = run(&outb, &h, &[("cookie", "virtual-env=dev.c")]);
    assert_eq!((s.tag().source, edit), (TagSource::AliasCookie, TagEdit::Set("dev.c".into())));
});

t!(custom_correlation_header_restores_the_tag {
    let h = FakeHost::new();
    let json = |d: &str| format!(r#"{{"direction":"{d}","correlation_headers":["my-trace-id"]}}"#);
    let inb = core(&json("inbound"), "");
    let outb = core(&json("outbound"), "dev");
    run(&inb, &h, &[("x-virtual-env", "dev.alice"), ("my-trace-id", "Chain-42"), ("x-request-id", "in-1")]);
    // Envoy gave the outbound request a fresh x-request-id; the app copied my-trace-id.
    let (s, edit) = run(&outb, &h, &[("my-trace-id", "Chain-42"), ("x-request-id", "out-1")]);
    assert_eq!((s.tag().source, &*s.tag().sent), (TagSource::CorrelatedHeader, "dev.alice"));
    assert_eq!(edit, TagEdit::Set("dev.alice".into()));
    assert_eq!(s.on_log(&outb, &h).unwrap().correlation_id, "my-trace-id=Chain-42");
    // Exact value: another case is another chain.
    let (s, _) = run(&outb, &h, &[("my-trace-id", "chain-42")]);
    assert_eq!(s.tag().source, TagSource::Environment);
    // Bounded: a value over 128 bytes is not an id.
    let long = "x".repeat(129);
    run(&inb, &h, &[("x-virtual-env", "dev.long"), ("my-trace-id", &long)]);
    let (s, _) = run(&outb, &h, &[("my-trace-id", &long)]);
    assert_eq!(s.tag().source, TagSource::Environment);
    // Across workers (shared data).
    let w2 = h.other_worker();
    let (s, _) = run(&outb, &w2, &[("my-trace-id", "Chain-42")]);
    assert_eq!(s.tag().source, TagSource::CorrelatedHeader);
});

t!(other_tracers_restore_the_tag_and_mark_propagated {
    let sw = sw8("NWJlOGJjNjEuMS4xNjg1OQ==");
    let cases: [(&str, String, TagSource); 3] = [
        ("sw8", sw.clone(), TagSource::CorrelatedSw8),
        ("uber-trace-id", "abc:1:0:1".to_string(), TagSource::CorrelatedUber),
        ("x-datadog-trace-id", "4242".to_string(), TagSource::CorrelatedDatadog),
    ];
    for (name, value, source) in cases {
        let h = FakeHost::new();
        let inb = core(r#"{"direction":"inbound"}"#, "");
        let outb = core(r#"{"direction":"outbound"}"#, "dev");
        let (s, _) = run(&inb, &h, &[("x-virtual-env", "dev.alice"), (name, &value), ("x-request-id", "in")]);
        assert_eq!(s.class(), TraceContext::Valid, "{name}");
        let (s, edit) = run(&outb, &h, &[(name, &value), ("x-request-id", "out")]);
        assert_eq!((s.tag().source, &*s.tag().sent), (source, "dev.alice"), "{name}");
        assert_eq!(edit, TagEdit::Set("dev.alice".into()));
        assert_eq!(s.class(), TraceContext::Propagated, "{name}");
        let hop = s.on_log(&outb, &h).unwrap();
        assert!(!(hop.sw8_trace_id.clone() + &hop.uber_trace_id + &hop.datadog_trace_id).is_empty());
        // The app dropped it: no trace context, the own tag stamped.
        let (s, _) = run(&outb, &h, &[("x-request-id", "out2")]);
        assert_eq!((s.class(), s.tag().source), (TraceContext::Missing, TagSource::Environment), "{name}");
    }
    // Short and padded Jaeger ids are the same trace.
    let h = FakeHost::new();
    run(&core(r#"{"direction":"inbound"}"#, ""), &h, &[("x-virtual-env", "dev.j"), ("uber-trace-id", "abc:1:0:1")]);
    let (s, _) = run(&core(r#"{"direction":"outbound"}"#, ""), &h, &[("uber-trace-id", "0000000000000abc:2:1:1")]);
    assert_eq!((s.tag().source, &*s.tag().sent), (TagSource::CorrelatedUber, "dev.j"));
});

t!(no_extra_host_call_when_the_options_are_off_or_unused {
    // The same requests through a plain configuration and through one with every option
    // on but nothing to find: the same host calls.
    let plain = core(r#"{"direction":"outbound"}"#, "dev");
    let all = core(r#"{"direction":"outbound","tag_aliases":["cookie:virtual-env","header:x-alias"],"correlation_headers":["my-trace-id"]}"#, "dev");
    let req: &[(&str, &str)] = &[("x-virtual-env", "dev.a"), ("x-request-id", "r1"), ("cookie", "a=1")];
    let (h1, h2) = (FakeHost::new(), FakeHost::new());
    let (s1, _) = run(&plain, &h1, req);
    let (s2, _) = run(&all, &h2, req);
    s1.on_log(&plain, &h1);
    s2.on_log(&all, &h2);
    assert_eq!(h1.calls(), h2.calls());
    // A baggage key with a tag header present: no baggage write either.
    let bag = core(&format!(r#"{{"direction":"outbound",{BAGGAGE_CFG}}}"#), "dev");
    let (s, _) = run(&bag, &FakeHost::new(), req);
    assert_eq!(s.baggage_edit(), None);
});
