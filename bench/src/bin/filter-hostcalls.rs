//! filter-hostcalls: where a hopwatch request's cost goes, without a profiler for V8's
//! JIT code. Runs the filter's own per-request logic (`hopwatch_filter::filter`, the
//! code the wasm glue calls) natively over a host that counts every host call and the
//! bytes each one copies, for the same request pool and configurations as
//! `filter-bench`, and times the pure computation (native, so a lower bound of the
//! in-VM compute). Host calls made by the glue itself (fetching the request headers,
//! writing the tag, reading `:status`) are added per the glue's documented sequence.
//!
//! Each host call is a VM exit plus a copy across the sandbox boundary: measured here,
//! a Rust filter doing 4 host calls on the response path cost +6 us/request more than the
//! empty filter (docs/BENCHMARKS.md), so calls per request are the figure to minimise.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use anyhow::Result;
use hopwatch_bench::wrk::{request_pool, PoolEntry};
use hopwatch_bench::{proc_cpu_seconds, Table};
use hopwatch_filter::config::PluginConfig;
use hopwatch_filter::correlation::LocalStore;
use hopwatch_filter::filter::{Core, Identity, Stream};
use hopwatch_filter::host::{Host, SetStatus};
use hopwatch_filter::metrics::{self, Metric};
use hopwatch_filter::tag::TagEdit;
use hopwatch_test_envoy::manifests;
use prost::Message;

#[derive(Default, Clone, Debug)]
struct Calls {
    by_kind: BTreeMap<&'static str, (u64, u64)>, // kind -> (calls, bytes copied)
    metrics: BTreeMap<String, u64>,
}

impl Calls {
    fn add(&mut self, kind: &'static str, bytes: usize) {
        let e = self.by_kind.entry(kind).or_default();
        e.0 += 1;
        e.1 += bytes as u64;
    }
    fn total(&self) -> u64 {
        self.by_kind.values().map(|v| v.0).sum()
    }
}

struct CountingHost {
    /// `response.flags` / `response.code` the host answers (a failing case sets them).
    flags: std::cell::Cell<u64>,
    code: std::cell::Cell<u64>,
    shared: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    headers: RefCell<std::rc::Rc<Vec<(String, String)>>>,
    calls: RefCell<Calls>,
    names: Vec<String>,
    counting: bool,
}

impl CountingHost {
    fn new(direction: &str, counting: bool) -> Self {
        CountingHost {
            flags: std::cell::Cell::new(0),
            code: std::cell::Cell::new(200),
            shared: RefCell::default(),
            headers: RefCell::default(),
            calls: RefCell::default(),
            names: metrics::names(direction),
            counting,
        }
    }
    fn note(&self, kind: &'static str, bytes: usize) {
        if self.counting {
            self.calls.borrow_mut().add(kind, bytes);
        }
    }
}

fn prop_value(path: &[&str], flags: u64, code: u64) -> Option<Vec<u8>> {
    let s = |v: &str| Some(v.as_bytes().to_vec());
    match path {
        ["response", "flags"] => Some(flags.to_le_bytes().to_vec()),
        ["response", "code"] => Some(code.to_le_bytes().to_vec()),
        ["request", "protocol"] => s("HTTP/1.1"),
        ["response", "code_details"] => s("via_upstream"),
        ["xds", "cluster_name"] => s("outbound|8080||upstream.bench.svc.cluster.local"),
        ["xds", "route_name"] => s("default"),
        ["upstream", "address"] => s("10.1.0.21:8080"),
        ["upstream", "local_address"] => s("10.1.0.9:39876"),
        ["source", "address"] => s("10.1.0.9:41234"),
        ["destination", "address"] => s("10.96.12.4:8080"),
        ["xds", "node", "metadata", "WORKLOAD_NAME"] => s("bench-client"),
        ["xds", "node", "metadata", "NAMESPACE"] => s("bench"),
        ["xds", "node", "metadata", "NAME"] => s("bench-client-7d9f8b6c5-x2x4z"),
        ["xds", "node", "metadata", "LABELS", "app"] => s("bench-client"),
        ["xds", "node", "metadata", "LABELS", "virtual-env"] => s("dev.proj1"),
        _ => None,
    }
}

impl Host for CountingHost {
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        let v = self.shared.borrow().get(key).cloned();
        self.note(
            "get_shared_data",
            v.as_ref().map(|v| v.0.len()).unwrap_or(0),
        );
        v
    }
    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> SetStatus {
        self.note("set_shared_data", value.len());
        let mut m = self.shared.borrow_mut();
        let cur = m.get(key).map(|v| v.1).unwrap_or(0);
        if cas != 0 && cas != cur {
            return SetStatus::CasMismatch;
        }
        m.insert(key.to_string(), (value.to_vec(), cur + 1));
        SetStatus::Ok
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        let v = prop_value(path, self.flags.get(), self.code.get());
        self.note("get_property", v.as_ref().map(Vec::len).unwrap_or(0));
        v
    }
    fn request_header(&self, name: &str) -> Option<String> {
        let v = self
            .headers
            .borrow()
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone());
        self.note(
            "get_header_map_value",
            v.as_ref().map(String::len).unwrap_or(0),
        );
        v
    }
    fn now_nanos(&self) -> u64 {
        self.note("get_current_time", 8);
        1_795_000_000_000_000_000
    }
    fn count(&self, metric: Metric, _by: u64) {
        // No host call: the glue sums counts in the VM and gives them to Envoy
        // (`increment_metric`) on the root context's tick, not per request.
        if self.counting {
            let name = self
                .names
                .get(metric.0 as usize)
                .cloned()
                .unwrap_or_default();
            *self.calls.borrow_mut().metrics.entry(name).or_default() += 1;
        }
    }
}

/// How the requests carry the tag and their correlation ids: the routing-key forms of
/// `tag_baggage_key`, `tag_aliases`, `correlation_headers` and the other tracers'
/// headers. `Plain` is the B3 + `x-request-id` + tag header traffic of `filter-bench`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    Plain,
    /// The tag only in a baggage member (`sd-routing-key`), which the app propagates.
    Baggage,
    /// The tag only in a cookie of the inbound request; the app copies B3.
    Cookie,
    /// No B3; the app copies only `my-trace-id` (Envoy gives each outbound request a
    /// fresh `x-request-id`).
    CustomId,
    /// No B3; the app copies only `sw8`.
    Sw8,
    /// No B3; the app copies only `uber-trace-id`.
    Uber,
    /// No B3; the app copies only `x-datadog-trace-id`.
    Datadog,
}

fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = c
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &x)| n | u32::from(x) << (16 - 8 * i));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The request headers of one pool entry in `form`; `traced`: with the B3 trace headers,
/// else only `x-request-id` (a mesh without a tracer, Istio's default since 1.22).
fn headers(
    e: &PoolEntry,
    inbound: bool,
    grpc: bool,
    form: Form,
    traced: bool,
) -> Vec<(String, String)> {
    let mut h: Vec<(String, String)> = vec![
        (
            ":authority".into(),
            "upstream.bench.svc.cluster.local:8080".into(),
        ),
        (":path".into(), "/api/v1/items".into()),
        (":method".into(), "GET".into()),
        (":scheme".into(), "http".into()),
        ("user-agent".into(), "bench-app/1.0".into()),
        ("x-forwarded-proto".into(), "http".into()),
    ];
    if grpc {
        h[1].1 = "/shop.v1.Cart/GetItems".into();
        h[2].1 = "POST".into();
        h.push(("content-type".into(), "application/grpc".into()));
        h.push(("te".into(), "trailers".into()));
    }
    let b3 = matches!(form, Form::Plain | Form::Baggage | Form::Cookie);
    let rid = if b3 || inbound {
        e.request_id.clone()
    } else {
        // The app did not copy it: Envoy made a new one.
        e.request_id.chars().rev().collect()
    };
    h.push(("x-request-id".into(), rid));
    if b3 {
        h.push(("x-b3-traceid".into(), e.trace_id.clone()));
        h.push(("x-b3-sampled".into(), "1".into()));
        if inbound {
            h.push(("x-b3-spanid".into(), e.inbound_span.clone()));
        } else {
            h.push(("x-b3-spanid".into(), e.outbound_span.clone()));
            h.push(("x-b3-parentspanid".into(), e.inbound_span.clone()));
        }
    }
    let tag = ("x-virtual-env".to_string(), "dev.proj1.alice".to_string());
    match form {
        Form::Plain | Form::CustomId | Form::Sw8 | Form::Uber | Form::Datadog if inbound => {
            h.push(tag)
        }
        Form::Baggage => h.push((
            "baggage".into(),
            "sd-routing-key=dev.proj1.alice,userid=42;p".into(),
        )),
        Form::Cookie if inbound => h.push((
            "cookie".into(),
            "session=s1; virtual-env=dev.proj1.alice".into(),
        )),
        _ => {}
    }
    match form {
        Form::CustomId => h.push(("my-trace-id".into(), e.trace_id.clone())),
        Form::Sw8 => h.push((
            "sw8".into(),
            format!(
                "1-{}-{}-0-{}-{}-{}-{}",
                base64(e.trace_id.as_bytes()),
                base64(b"seg.1.1"),
                base64(b"bench-app"),
                base64(b"pod-1"),
                base64(b"/api/v1/items"),
                base64(b"upstream:8080")
            ),
        )),
        Form::Uber => h.push((
            "uber-trace-id".into(),
            format!("{}:{}:0:1", e.trace_id, e.inbound_span),
        )),
        Form::Datadog => h.push((
            "x-datadog-trace-id".into(),
            u64::from_str_radix(e.trace_id.get(..15).unwrap_or("1"), 16)
                .unwrap_or(1)
                .to_string(),
        )),
        _ => {}
    }
    if !traced {
        h.retain(|(k, _)| !k.starts_with("x-b3-"));
    }
    h
}

/// The serialized proxy-wasm header map (what `get_header_map_pairs` copies).
fn map_bytes(h: &[(String, String)]) -> Vec<u8> {
    let pairs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    hopwatch_filter::headers::serialize(&pairs)
}

fn core(inbound: bool, rate: f64, overrides: &[(&str, serde_json::Value)]) -> Result<Core> {
    let root = manifests::repo_root();
    let filters = manifests::load_sidecar_filters(&root)?;
    let f = if inbound {
        &filters.inbound
    } else {
        &filters.outbound
    };
    let mut plugin = manifests::plugin_configuration_json(f).unwrap_or_default();
    plugin["report_sample_rate"] = serde_json::json!(rate);
    for (k, v) in overrides {
        plugin[*k] = v.clone();
    }
    let cfg =
        PluginConfig::parse(plugin.to_string().as_bytes()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let host = CountingHost::new("x", false);
    let identity = Identity::load(&cfg, &host, Some("dev.proj1".into()));
    Ok(Core::new(cfg, identity))
}

/// How the response of a case goes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Reply {
    /// HTTP 200, end of stream at its body.
    HttpOk,
    /// Envoy's own HTTP 503 with UF.
    HttpUf,
    /// gRPC: headers (200), a message, trailers with `grpc-status: 0`.
    GrpcOk,
    /// gRPC: an app error in the trailers (`grpc-status: 13`), no flag.
    GrpcAppError,
    /// gRPC: Envoy's own trailers-only reply, HTTP 200 + `grpc-status: 14`, UH.
    GrpcUh,
}

/// One request through the glue's sequence; returns the encoded report, if any.
fn one(
    core: &Core,
    host: &CountingHost,
    local: &LocalStore,
    h: &std::rc::Rc<Vec<(String, String)>>,
    map: &[u8],
    reply: Reply,
) -> Option<Vec<u8>> {
    // proxy_on_request_headers: get_header_map_pairs, then the logic, then the tag edit.
    host.note("get_header_map_pairs", map.len());
    *host.headers.borrow_mut() = h.clone();
    // The host copies the map into memory the module allocates: one copy per request.
    let (st, edit) = Stream::on_request_headers(core, host, local, map.to_vec());
    match edit {
        TagEdit::Keep => {}
        TagEdit::Set(v) => host.note("replace_header_map_value", v.len()),
        TagEdit::Remove => host.note("remove_header_map_value", 0),
    }
    if let Some(b) = st.baggage_edit() {
        host.note("replace_header_map_value", b.len());
    }
    let (flags, code) = match reply {
        Reply::HttpUf => (1u64 << 5, 503),
        Reply::GrpcUh => (1u64 << 1, 200),
        _ => (0, 200),
    };
    host.flags.set(flags);
    host.code.set(code);
    let grpc_map = |pairs: &[(&str, &str)]| hopwatch_filter::headers::serialize(pairs);
    match reply {
        Reply::HttpOk | Reply::HttpUf => {
            // proxy_on_response_headers: `:status` only when annotation is possible.
            if st.may_annotate(core) {
                host.note("get_header_map_value", 3);
                if let Some(v) = st.annotation(core, host, code) {
                    host.note("add_header_map_value", v.len());
                }
            }
            // The response ends (end_of_stream at headers or its body): no host call.
            st.response_complete();
        }
        Reply::GrpcUh => {
            // Trailers-only: the whole response header map in one call.
            st.response_complete();
            let m = grpc_map(&[
                (":status", "200"),
                ("content-type", "application/grpc"),
                ("grpc-status", "14"),
                ("grpc-message", "no healthy upstream"),
            ]);
            host.note("get_header_map_pairs", m.len());
            st.grpc_reply(hopwatch_filter::grpc::read_reply(&m));
            if st.may_annotate(core) {
                if let Some(v) = st.annotation(core, host, st.response_status()) {
                    host.note("add_header_map_value", v.len());
                }
            }
        }
        Reply::GrpcOk | Reply::GrpcAppError => {
            // Response headers (not the end): `:status` when annotation is possible,
            // the annotation waits for the trailers.
            if st.may_annotate(core) {
                host.note("get_header_map_value", 3);
                st.note_status(200);
            }
            // Trailers: their map in one call.
            st.response_complete();
            let status = if reply == Reply::GrpcOk { "0" } else { "13" };
            let m = grpc_map(&[("grpc-status", status), ("grpc-message", "db down")]);
            host.note("get_header_map_pairs", m.len());
            st.grpc_reply(hopwatch_filter::grpc::read_reply(&m));
            if st.may_annotate(core) {
                if let Some(v) = st.annotation(core, host, st.response_status()) {
                    host.note("add_header_map_value", v.len());
                }
            }
        }
    }
    // proxy_on_log: the hop, queued (encoded when the batch is sent).
    st.on_log(core, host).map(|hop| hop.encode_to_vec())
}

/// Plugin configuration keys set over the manifest's.
type Overrides = Vec<(&'static str, serde_json::Value)>;

struct Case {
    name: String,
    inbound: bool,
    rate: f64,
    overrides: Overrides,
    /// The outbound calls run on another worker than their inbound requests (another
    /// VM: its local correlation copy is empty, shared data answers).
    other_worker: bool,
    /// Requests carry B3 trace headers (else only `x-request-id`).
    traced: bool,
    /// gRPC requests (content-type application/grpc).
    grpc: bool,
    reply: Reply,
    /// How the requests carry the tag and ids.
    form: Form,
}

fn main() -> Result<()> {
    let pool = request_pool(200, 2, |t| hopwatch_filter::sampling::sampled(0.01, t, ""));
    let mut cases = Vec::new();
    for (inbound, rate) in [(false, 0.01), (false, 1.0), (true, 0.01), (true, 1.0)] {
        cases.push(Case {
            name: format!("hopwatch-{}@{rate}", if inbound { "in" } else { "out" }),
            inbound,
            rate,
            overrides: vec![],
            other_worker: false,
            traced: true,
            grpc: false,
            reply: Reply::HttpOk,
            form: Form::Plain,
        });
    }
    for (inbound, rate) in [(false, 0.01), (false, 1.0), (true, 0.01)] {
        cases.push(Case {
            name: format!(
                "hopwatch-{}@{rate} gRPC healthy",
                if inbound { "in" } else { "out" }
            ),
            inbound,
            rate,
            overrides: vec![],
            other_worker: false,
            traced: true,
            grpc: true,
            reply: Reply::GrpcOk,
            form: Form::Plain,
        });
    }
    for (name, grpc, reply) in [
        ("HTTP 503 UF", false, Reply::HttpUf),
        (
            "gRPC UH (Envoy's trailers-only 200 + grpc-status 14)",
            true,
            Reply::GrpcUh,
        ),
        (
            "gRPC app error in trailers (grpc-status 13)",
            true,
            Reply::GrpcAppError,
        ),
    ] {
        cases.push(Case {
            name: format!("hopwatch-out@0.01 {name}"),
            inbound: false,
            rate: 0.01,
            overrides: vec![],
            other_worker: false,
            traced: true,
            grpc,
            reply,
            form: Form::Plain,
        });
    }
    cases.push(Case {
        name: "hopwatch-out@0.01, call on another worker".into(),
        inbound: false,
        rate: 0.01,
        overrides: vec![],
        other_worker: true,
        traced: true,
        grpc: false,
        reply: Reply::HttpOk,
        form: Form::Plain,
    });
    cases.push(Case {
        name: "hopwatch-out@0.01+annotate_response=never".into(),
        inbound: false,
        rate: 0.01,
        overrides: vec![("annotate_response", serde_json::json!("never"))],
        other_worker: false,
        traced: true,
        grpc: false,
        reply: Reply::HttpOk,
        form: Form::Plain,
    });
    cases.push(Case {
        name: "hopwatch-out@0.01+correlation_buckets=256".into(),
        inbound: false,
        rate: 0.01,
        overrides: vec![("correlation_buckets", serde_json::json!(256))],
        other_worker: true,
        traced: true,
        grpc: false,
        reply: Reply::HttpOk,
        form: Form::Plain,
    });

    // The routing-key options (issue 13): aliases and custom ids on but unused by the
    // traffic (must cost what the plain path costs), then each form of traffic with its
    // option.
    let all_on = [
        ("tag_baggage_key", serde_json::json!("sd-routing-key")),
        (
            "tag_aliases",
            serde_json::json!(["cookie:virtual-env", "header:x-env-alias"]),
        ),
        ("correlation_headers", serde_json::json!(["my-trace-id"])),
    ];
    for inbound in [false, true] {
        let side = if inbound { "in" } else { "out" };
        cases.push(Case {
            name: format!("hopwatch-{side}@0.01+tag_aliases+correlation_headers, plain traffic"),
            inbound,
            rate: 0.01,
            overrides: vec![all_on[1].clone(), all_on[2].clone()],
            other_worker: false,
            traced: true,
            grpc: false,
            reply: Reply::HttpOk,
            form: Form::Plain,
        });
        let forms: [(&str, Form, Overrides); 6] = [
            (
                "tag_baggage_key, tag in baggage",
                Form::Baggage,
                vec![all_on[0].clone()],
            ),
            (
                "tag_aliases cookie, tag in a cookie",
                Form::Cookie,
                vec![all_on[1].clone()],
            ),
            (
                "correlation_headers, only my-trace-id copied",
                Form::CustomId,
                vec![all_on[2].clone()],
            ),
            ("only sw8 copied", Form::Sw8, vec![]),
            ("only uber-trace-id copied", Form::Uber, vec![]),
            ("only x-datadog-trace-id copied", Form::Datadog, vec![]),
        ];
        for (what, form, overrides) in forms {
            cases.push(Case {
                name: format!("hopwatch-{side}@0.01+{what}"),
                inbound,
                rate: 0.01,
                overrides,
                other_worker: false,
                traced: true,
                grpc: false,
                reply: Reply::HttpOk,
                form,
            });
        }
    }
    cases.push(Case {
        name: "hopwatch-out@0.01+tag_baggage_key, tag restored into baggage".into(),
        inbound: false,
        rate: 0.01,
        overrides: vec![all_on[0].clone()],
        other_worker: false,
        traced: true,
        grpc: false,
        reply: Reply::HttpOk,
        form: Form::Plain,
    });

    // A mesh without a tracer: only x-request-id, the app passes it on.
    for inbound in [false, true] {
        cases.push(Case {
            name: format!(
                "hopwatch-{}@0.01, no tracer (x-request-id only)",
                if inbound { "in" } else { "out" }
            ),
            inbound,
            rate: 0.01,
            overrides: vec![],
            other_worker: false,
            traced: false,
            grpc: false,
            reply: Reply::HttpOk,
            form: Form::Plain,
        });
    }
    println!(
        "# hopwatch host calls per request (filter logic run natively over a counting host)\n"
    );
    println!("pool: {} traces (as filter-bench), outbound calls preceded by their inbound request (same VM store)\n", pool.len());
    let mut summary = Table::new(&[
        "config",
        "host calls/req",
        "of which increment_metric",
        "get_shared_data (calls, bytes)",
        "set_shared_data (calls, bytes)",
        "get_property (calls)",
        "bytes copied in",
        "reported",
        "native compute ns/req (CPU time)",
    ]);
    let mut detail = Vec::new();
    for c in &cases {
        let inb_core = core(true, c.rate, &c.overrides)?;
        let core_ = core(c.inbound, c.rate, &c.overrides)?;
        let dir = if c.inbound { "inbound" } else { "outbound" };
        let host = CountingHost::new(dir, false);
        // The VM of the worker that served the inbound requests.
        let vm_local = LocalStore::new(4096);
        // Warm the correlation store as the sidecar's inbound side does.
        for e in &pool {
            let h = std::rc::Rc::new(headers(e, true, c.grpc, c.form, c.traced));
            one(
                &inb_core,
                &host,
                &vm_local,
                &h,
                &map_bytes(&h),
                Reply::HttpOk,
            );
        }
        // Count over one pass of the pool.
        let counting = CountingHost {
            counting: true,
            ..CountingHost::new(dir, true)
        };
        *counting.shared.borrow_mut() = host.shared.borrow().clone();
        let mut reported = 0usize;
        let reqs: Vec<std::rc::Rc<Vec<(String, String)>>> = pool
            .iter()
            .map(|e| std::rc::Rc::new(headers(e, c.inbound, c.grpc, c.form, c.traced)))
            .collect();
        let maps: Vec<Vec<u8>> = reqs.iter().map(|h| map_bytes(h)).collect();
        let other = LocalStore::new(4096);
        let local = if c.other_worker { &other } else { &vm_local };
        for (h, m) in reqs.iter().zip(&maps) {
            if one(&core_, &counting, local, h, m, c.reply).is_some() {
                reported += 1;
            }
        }
        let n = reqs.len() as f64;
        let calls = counting.calls.borrow().clone();
        let per = |k: &str| calls.by_kind.get(k).copied().unwrap_or((0, 0));
        let bytes_in: u64 = [
            "get_header_map_pairs",
            "get_shared_data",
            "get_property",
            "get_header_map_value",
            "get_current_time",
        ]
        .iter()
        .map(|k| per(k).1)
        .sum();
        // Time the pure computation (no counting) over many passes.
        // CPU time of this process, not wall time: robust to a busy machine.
        let passes = 500;
        let cpu0 = proc_cpu_seconds(std::process::id()).unwrap_or(0.0);
        let t = Instant::now();
        let mut sink = 0usize;
        for _ in 0..passes {
            for (h, m) in reqs.iter().zip(&maps) {
                sink += one(&core_, &host, local, h, m, c.reply)
                    .map(|v| v.len())
                    .unwrap_or(0);
            }
        }
        let cpu = proc_cpu_seconds(std::process::id()).unwrap_or(0.0) - cpu0;
        let wall = t.elapsed().as_secs_f64();
        // Prefer CPU time (10 ms resolution); fall back to wall time if unavailable.
        let secs = if cpu > 0.05 { cpu } else { wall };
        let ns = 1e9 * secs / (passes as f64 * n);
        std::hint::black_box(sink);
        summary.row(vec![
            c.name.clone(),
            format!("{:.2}", calls.total() as f64 / n),
            format!("{:.2}", per("increment_metric").0 as f64 / n),
            format!(
                "{:.2}, {:.0} B",
                per("get_shared_data").0 as f64 / n,
                per("get_shared_data").1 as f64 / n
            ),
            format!(
                "{:.2}, {:.0} B",
                per("set_shared_data").0 as f64 / n,
                per("set_shared_data").1 as f64 / n
            ),
            format!("{:.2}", per("get_property").0 as f64 / n),
            format!("{:.0} B", bytes_in as f64 / n),
            format!("{:.1}%", 100.0 * reported as f64 / n),
            format!("{ns:.0}"),
        ]);
        detail.push((c.name.clone(), calls, n));
    }
    print!("{}", summary.render());
    println!("\nper call kind (calls per request):");
    for (name, calls, n) in &detail {
        let kinds: Vec<String> = calls
            .by_kind
            .iter()
            .map(|(k, (c, _))| format!("{k} {:.2}", *c as f64 / n))
            .collect();
        let mets: Vec<String> = calls
            .metrics
            .iter()
            .map(|(k, c)| {
                format!(
                    "{} {:.2}",
                    k.trim_start_matches("hopwatch.")
                        .trim_start_matches("outbound.")
                        .trim_start_matches("inbound."),
                    *c as f64 / n
                )
            })
            .collect();
        println!(
            "  {name}: {}\n    counters incremented: {}",
            kinds.join(", "),
            mets.join(", ")
        );
    }
    println!("\n(plus, for every wasm filter including the empty one, the VM entries for the stream callbacks; a sampled hop also costs its share of one dispatch_grpc_call per batch)");
    Ok(())
}
