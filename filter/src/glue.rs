//! proxy-wasm glue (wasm32-wasip1 only): the exported callbacks, mapped to
//! [`crate::filter`] and [`crate::batch`] through [`crate::abi`].
//!
//! Host calls per request: one `get_header_map_pairs` for all request headers (handed
//! to the stream as bytes, read in place), the correlation-store reads/writes (outbound:
//! none when this VM's local copy answers), at most one tag-header write; at response
//! headers `:status` when annotation is possible, then `response.flags` (+ details when
//! annotating) only for a status of 400 or more in `on_error` mode, and, on the inbound
//! side, `connection.mtls` only when that response would be annotated (mesh peers only,
//! [`crate::peer`]); in `on_log` nothing
//! for a healthy response that reached its end of stream, else `response.flags` (+
//! `response.code` only when no response headers were seen), and the remaining
//! properties only for hops that are reported. `response_body` and `response_trailers`
//! only note the end of stream. A gRPC request (known from the request `content-type`,
//! no extra call) costs one call more: the whole response header map of a trailers-only
//! reply (`:status`, `grpc-status`, `grpc-message` in one call, instead of `:status`), or
//! the trailer map of a streamed reply; a non-OK status then reads flags and details as
//! a 5xx does, and the annotation goes where a gRPC client sees it (the headers of a
//! trailers-only reply, else the trailers). A stream a filter before hopwatch answered
//! (RBAC, JWT, fault abort, ...) reaches only `proxy_on_log`: it costs there one
//! `get_header_map_pairs` plus the properties of a failed hop, and is always reported.
//! Counters are summed here and given to Envoy on the tick. Report calls carry the
//! `report_token` as initial metadata (serialized once at configure time); a refused
//! dispatch, a failed call and a correlation-store size mismatch are logged at warn,
//! rate-limited ([`crate::ratelimit`]), from the root context.
//! There is no `proxy_on_done` export (Envoy treats a missing one as "done") and no
//! `proxy_on_delete` (the stream is freed in `proxy_on_log`, see the note above
//! `ROOT_STALE_MS`): every export a stream reaches costs a VM entry. Node metadata and the env var are read
//! once per plugin instance in `proxy_on_configure`. Reports are queued per root context
//! (per worker) and sent from the root context on its tick; a full batch shortens the
//! tick to 1 ms instead of dispatching from the HTTP context (whose answer would come
//! back after the context is gone).
//!
//! No `RefCell` borrow of the context tables is held while calling into the host: a
//! host call may re-enter the module (e.g. Envoy answers a gRPC call to a missing
//! cluster inline through `proxy_on_grpc_close`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::rc::Rc;

use crate::abi::{self, LogLevel, MapType};
use crate::batch::{Batch, Batcher, Push};
use crate::config::PluginConfig;
use crate::correlation::{Dims, LocalStore};
use crate::filter::{Core, Identity, Stream};
use crate::host::{Host, SetStatus};
use crate::metrics::{self, Metric};
use crate::ratelimit::Warning;
use crate::report;
use crate::tag::TagEdit;

/// A profiling build, chosen at compile time with the environment variable
/// `HOPWATCH_PROFILE_VARIANT` (unset: the real filter, and these branches are compiled
/// out). `headers`: fetch the request headers and stop there; `calls`: make the host
/// calls of a healthy outbound request (headers, clock, tag write, `:status`) without
/// any of the logic. `docs/BENCHMARKS.md` measures them next to the real filter to split
/// its cost into "what Envoy charges for the calls" and "what the filter's code costs".
const PROFILE_VARIANT: Option<&str> = option_env!("HOPWATCH_PROFILE_VARIANT");

const SERVICE: &str = "hopwatch.v1.Collector";
const METHOD: &str = "Report";

/// Host implementation over the raw host calls.
struct WasmHost {
    metric_ids: Vec<u32>,
    /// Counts not yet given to Envoy, per metric. Why: `increment_metric` is a host
    /// call (~0.5 us); the filter counts 3 or more things per request, so counts are
    /// summed here and flushed on the root context's tick (stats lag by at most one
    /// tick, `tick_period_ms`).
    pending: Vec<Cell<u64>>,
}

impl WasmHost {
    fn new(metric_ids: Vec<u32>) -> Self {
        let pending = metric_ids.iter().map(|_| Cell::new(0)).collect();
        WasmHost {
            metric_ids,
            pending,
        }
    }

    /// Gives the pending counts to Envoy. Root context (tick) only.
    fn flush_counters(&self) {
        for (id, n) in self.metric_ids.iter().zip(&self.pending) {
            let by = n.replace(0);
            if by > 0 {
                abi::increment_metric(*id, i64::try_from(by).unwrap_or(i64::MAX));
            }
        }
    }
}

impl Host for WasmHost {
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        abi::get_shared_data(key)
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> SetStatus {
        match abi::set_shared_data(key, value, cas) {
            abi::OK => SetStatus::Ok,
            abi::CAS_MISMATCH => SetStatus::CasMismatch,
            _ => SetStatus::Failed,
        }
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        abi::get_property(path)
    }

    fn request_header(&self, name: &str) -> Option<String> {
        abi::get_map_value(MapType::RequestHeaders, name)
    }

    fn now_nanos(&self) -> u64 {
        abi::now_nanos()
    }

    fn count(&self, metric: Metric, by: u64) {
        if let Some(n) = self.pending.get(usize::from(metric.0)) {
            n.set(n.get().saturating_add(by));
        }
    }
}

/// What one plugin instance of one worker shares between its root context and its
/// HTTP contexts.
struct Shared {
    core: Core,
    host: WasmHost,
    batcher: RefCell<Batcher>,
    /// The tick period was shortened to flush a full batch soon.
    fast_tick: Cell<bool>,
    /// The `upstream` argument of `proxy_grpc_call`.
    upstream: Vec<u8>,
    /// This VM's copy of the correlation store (shared by its plugin instances).
    local: Rc<LocalStore>,
    /// Initial metadata of report calls (`x-hopwatch-report-token`), serialized once.
    metadata: Vec<u8>,
    /// Report calls the host refused to start (unknown or non-HTTP/2 cluster), with the
    /// last proxy-wasm status; logged at warn, rate-limited.
    dispatch_failures: RefCell<(Warning, u32)>,
    /// Report calls that failed (a non-zero gRPC status: UNAUTHENTICATED from a token
    /// mismatch, UNAVAILABLE from a collector that is down, ...), with the last status.
    call_failures: RefCell<(Warning, u32)>,
    /// Correlation slots written with other store dimensions, with the last ones seen.
    bucket_mismatches: RefCell<(Warning, Dims)>,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.host.now_nanos() / 1_000_000
    }

    /// Sends queued batches while in-flight slots are free. Root context only.
    fn flush(&self) {
        let now = self.now_ms();
        let expired = self.batcher.borrow_mut().expire(now);
        if expired > 0 {
            self.host.count(metrics::REPORTS_DROPPED, expired);
            self.host.count(metrics::BATCHES_FAILED, 1);
        }
        loop {
            let batch = self.batcher.borrow_mut().take();
            let Some(batch) = batch else { break };
            self.send(batch, now);
        }
    }

    fn send(&self, batch: Batch, now: u64) {
        let cfg = &self.core.config;
        let id = &self.core.identity;
        let n = batch.hops.len();
        let dropped = batch.dropped;
        let from = report::Reporter {
            pod: &id.pod,
            namespace: &id.namespace,
            service_account: &id.service_account,
        };
        let body = report::encode_request(batch.hops, from, dropped);
        let timeout = cfg.report_timeout_ms;
        // No borrow is held here: the host may re-enter proxy_on_grpc_close.
        let result = abi::grpc_call(
            &self.upstream,
            SERVICE,
            METHOD,
            &self.metadata,
            &body,
            timeout,
        );
        match result {
            Ok(token) => {
                self.batcher
                    .borrow_mut()
                    .dispatched(token, n, dropped, now, u64::from(timeout))
            }
            Err(status) => {
                let lost = self.batcher.borrow_mut().dispatch_failed(n);
                self.host.count(metrics::REPORTS_DROPPED, lost);
                self.host.count(metrics::BATCHES_FAILED, 1);
                let due = {
                    let mut w = self.dispatch_failures.borrow_mut();
                    w.1 = status;
                    w.0.note(1, now)
                };
                if let Some(count) = due {
                    self.warn_dispatch(count, status);
                }
            }
        }
    }

    /// "hopwatch: reports dropped: ..." for report calls the host refused to start.
    fn warn_dispatch(&self, count: u64, status: u32) {
        let mut m = String::from("hopwatch: reports dropped: the report call to cluster ");
        m.push_str(&self.core.config.collector_cluster);
        m.push_str(" could not be started (proxy-wasm status ");
        crate::flags::push_u64(&mut m, u64::from(status));
        m.push_str(if status == abi::NOT_FOUND || status == abi::BAD_ARGUMENT {
            ": is collector_cluster an existing HTTP/2 cluster?); "
        } else {
            "); "
        });
        crate::flags::push_u64(&mut m, count);
        m.push_str(" batch(es) since the last such line");
        abi::log(LogLevel::Warn, &m);
    }

    /// "hopwatch: reports dropped: ..." for report calls that failed.
    fn warn_call(&self, count: u64, status: u32) {
        let mut m = String::from("hopwatch: reports dropped: the collector (cluster ");
        m.push_str(&self.core.config.collector_cluster);
        m.push_str(") answered gRPC status ");
        crate::flags::push_u64(&mut m, u64::from(status));
        m.push_str(match status {
            16 => " UNAUTHENTICATED (does report_token match the collector's --report-token?)",
            7 => " PERMISSION_DENIED",
            14 => " UNAVAILABLE (collector down or unreachable?)",
            4 => " DEADLINE_EXCEEDED",
            3 => " INVALID_ARGUMENT",
            8 => " RESOURCE_EXHAUSTED",
            _ => "",
        });
        m.push_str("; ");
        crate::flags::push_u64(&mut m, count);
        m.push_str(" batch(es) since the last such line");
        abi::log(LogLevel::Warn, &m);
    }

    /// "hopwatch: correlation_buckets mismatch: ..."
    fn warn_mismatch(&self, count: u64, theirs: Dims) {
        let mut m = String::from(
            "hopwatch: correlation_buckets mismatch: correlation store slots were written with correlation_buckets x correlation_bucket_entries = ",
        );
        crate::flags::push_u64(&mut m, u64::from(theirs.buckets));
        m.push_str(" x ");
        crate::flags::push_u64(&mut m, u64::from(theirs.entries));
        m.push_str(", this ");
        m.push_str(self.core.config.direction.as_str());
        m.push_str(" side has ");
        crate::flags::push_u64(&mut m, u64::from(self.core.config.correlation_buckets));
        m.push_str(" x ");
        crate::flags::push_u64(
            &mut m,
            u64::from(self.core.config.correlation_bucket_entries),
        );
        m.push_str(" (configure both sides alike); ");
        crate::flags::push_u64(&mut m, count);
        m.push_str(" time(s) since the last such line");
        abi::log(LogLevel::Warn, &m);
    }

    /// Root tick: the warnings whose next line is due.
    fn warnings_due(&self, now: u64) {
        if let Some((n, theirs)) = self.local.take_mismatch() {
            let mut w = self.bucket_mismatches.borrow_mut();
            w.0.add(n);
            w.1 = theirs;
        }
        let (d, ds) = {
            let mut w = self.dispatch_failures.borrow_mut();
            (w.0.due(now), w.1)
        };
        if let Some(n) = d {
            self.warn_dispatch(n, ds);
        }
        let (c, cs) = {
            let mut w = self.call_failures.borrow_mut();
            (w.0.due(now), w.1)
        };
        if let Some(n) = c {
            self.warn_call(n, cs);
        }
        let (m, theirs) = {
            let mut w = self.bucket_mismatches.borrow_mut();
            (w.0.due(now), w.1)
        };
        if let Some(n) = m {
            self.warn_mismatch(n, theirs);
        }
    }

    /// `status`: the gRPC status of the call (0: success).
    fn completed(&self, token: u32, status: u32) {
        let ok = status == 0;
        let (dropped, acked) = {
            let mut b = self.batcher.borrow_mut();
            let before = b.sent_total();
            let d = b.completed(token, ok);
            (d, b.sent_total().saturating_sub(before))
        };
        if ok {
            if acked > 0 {
                self.host.count(metrics::BATCHES_SENT, 1);
                self.host.count(metrics::HOPS_REPORTED, acked);
            }
        } else if dropped > 0 {
            self.host.count(metrics::BATCHES_FAILED, 1);
            self.host.count(metrics::REPORTS_DROPPED, dropped);
            let now = self.now_ms();
            let due = {
                let mut w = self.call_failures.borrow_mut();
                w.1 = status;
                w.0.note(1, now)
            };
            if let Some(count) = due {
                self.warn_call(count, status);
            }
        }
    }
}

struct RootState {
    shared: RefCell<Option<Rc<Shared>>>,
    /// When Envoy last called this root (creation, configuration, tick), ms since the
    /// epoch: a root that stopped ticking was deleted by Envoy (see [`sweep_roots`]).
    last_seen_ms: Cell<u64>,
}

impl RootState {
    fn seen_now() -> Self {
        RootState {
            shared: RefCell::new(None),
            last_seen_ms: Cell::new(abi::now_nanos() / 1_000_000),
        }
    }

    fn get(&self) -> Option<Rc<Shared>> {
        self.shared.borrow().clone()
    }
}

struct Http {
    shared: Option<Rc<Shared>>,
    stream: Option<Stream>,
}

/// Multiplicative hasher for context ids (no random seed needed).
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, i: u32) {
        self.0 = u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[derive(Default)]
struct Vm {
    roots: Vec<(u32, Rc<RootState>)>,
    streams: HashMap<u32, Rc<RefCell<Http>>, BuildHasherDefault<IdHasher>>,
    /// Created by the first plugin instance configured in this VM; the inbound and
    /// outbound instances of a sidecar share it (they must have the same
    /// `correlation_*` settings anyway, as they share the shared-data slots).
    local: Option<Rc<LocalStore>>,
}

thread_local! {
    static VM: RefCell<Vm> = RefCell::new(Vm::default());
}

fn root(id: u32) -> Option<Rc<RootState>> {
    VM.with(|vm| {
        vm.borrow()
            .roots
            .iter()
            .find(|(rid, _)| *rid == id)
            .map(|(_, r)| r.clone())
    })
}

fn stream(id: u32) -> Option<Rc<RefCell<Http>>> {
    VM.with(|vm| vm.borrow().streams.get(&id).cloned())
}

extern "C" {
    fn __wasm_call_ctors();
}

/// WASI reactor initialisation (runs static constructors).
#[no_mangle]
pub extern "C" fn _initialize() {
    // SAFETY: provided by the linker; runs once before any other export.
    unsafe { __wasm_call_ctors() }
}

/// ABI version marker.
#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// A root (parent 0) or HTTP context is created.
#[no_mangle]
pub extern "C" fn proxy_on_context_create(context_id: u32, parent_id: u32) {
    if parent_id == 0 {
        VM.with(|vm| {
            vm.borrow_mut()
                .roots
                .push((context_id, Rc::new(RootState::seen_now())))
        });
        return;
    }
    let shared = root(parent_id).and_then(|r| r.get());
    let http = Rc::new(RefCell::new(Http {
        shared,
        stream: None,
    }));
    VM.with(|vm| vm.borrow_mut().streams.insert(context_id, http));
}

/// VM start: nothing to do.
#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_context_id: u32, _size: usize) -> u32 {
    1
}

/// Plugin configuration: parse, read identity, define counters, start the tick.
#[no_mangle]
pub extern "C" fn proxy_on_configure(context_id: u32, _size: usize) -> u32 {
    let Some(r) = root(context_id) else { return 0 };
    r.last_seen_ms.set(abi::now_nanos() / 1_000_000);
    let config = match PluginConfig::parse(&abi::plugin_configuration()) {
        Ok(c) => c,
        Err(e) => {
            abi::log(LogLevel::Error, &e.to_string());
            return 0;
        }
    };
    let names = metrics::names(config.direction.as_str());
    let metric_ids: Vec<u32> = names.iter().map(|n| abi::define_counter(n)).collect();
    let host = WasmHost::new(metric_ids);
    let env_tag = std::env::var(&config.tag_env_var).ok();
    let identity = Identity::load(&config, &host, env_tag);
    if let Some(bad) = &identity.invalid_own_tag {
        let mut m = String::from("hopwatch: ignoring invalid own tag ");
        m.push_str(bad);
        abi::log(LogLevel::Warn, &m);
    }
    let mut m = String::from("hopwatch: configured direction=");
    m.push_str(config.direction.as_str());
    m.push_str(" workload=");
    m.push_str(&identity.workload);
    m.push_str(" namespace=");
    m.push_str(&identity.namespace);
    m.push_str(" own_tag=");
    m.push_str(&identity.own_tag);
    m.push_str(" service_account=");
    m.push_str(&identity.service_account);
    // Whether a token is sent, never the token.
    m.push_str(if config.report_token.expose().is_empty() {
        " report_token=none"
    } else {
        " report_token=set"
    });
    abi::log(LogLevel::Info, &m);
    let tick = config.tick_period_ms;
    let batcher = Batcher::new(config.queue_limit, config.batch_size, config.max_in_flight);
    let upstream = report::grpc_service_bytes(&config.collector_cluster, &config.authority());
    let metadata = report::report_metadata(config.report_token.expose());
    let capacity = (config.correlation_buckets as usize)
        .saturating_mul(config.correlation_bucket_entries as usize);
    let local = VM.with(|vm| {
        vm.borrow_mut()
            .local
            .get_or_insert_with(|| Rc::new(LocalStore::new(capacity)))
            .clone()
    });
    *r.shared.borrow_mut() = Some(Rc::new(Shared {
        core: Core::new(config, identity),
        host,
        batcher: RefCell::new(batcher),
        fast_tick: Cell::new(false),
        upstream,
        local,
        metadata,
        dispatch_failures: RefCell::new((Warning::default(), 0)),
        call_failures: RefCell::new((Warning::default(), 0)),
        bucket_mismatches: RefCell::new((Warning::default(), Dims::default())),
    }));
    abi::set_tick_period_ms(tick);
    1
}

/// Root tick: restore the normal period after a fast flush, send batches.
#[no_mangle]
pub extern "C" fn proxy_on_tick(context_id: u32) {
    let Some(r) = root(context_id) else { return };
    let now_ms = abi::now_nanos() / 1_000_000;
    r.last_seen_ms.set(now_ms);
    let Some(sh) = r.get() else { return };
    if sh.fast_tick.replace(false) {
        abi::set_tick_period_ms(sh.core.config.tick_period_ms);
    }
    sh.flush();
    sh.warnings_due(now_ms);
    sh.host.flush_counters();
    sweep_roots(now_ms);
}

/// Request headers: tag resolution, trace classification, correlation.
#[no_mangle]
pub extern "C" fn proxy_on_request_headers(context_id: u32, _n: usize, _eos: u32) -> u32 {
    let Some(h) = stream(context_id) else {
        return 0;
    };
    let Some(sh) = h.borrow().shared.clone() else {
        return 0;
    };
    let headers = abi::get_map_bytes(MapType::RequestHeaders);
    if let Some(variant) = PROFILE_VARIANT {
        // Profiling builds only (see `PROFILE_VARIANT`): the host calls without the logic.
        drop(headers);
        if variant == "calls" {
            abi::now_nanos();
            let own = &sh.core.identity.own_tag;
            abi::replace_map_value(MapType::RequestHeaders, &sh.core.config.tag_header, own);
        }
        return 0;
    }
    let (st, edit) = Stream::on_request_headers(&sh.core, &sh.host, &sh.local, headers);
    let name = &sh.core.config.tag_header;
    match edit {
        TagEdit::Keep => {}
        TagEdit::Set(v) => {
            abi::replace_map_value(MapType::RequestHeaders, name, &v);
        }
        TagEdit::Remove => {
            abi::remove_map_value(MapType::RequestHeaders, name);
        }
    }
    if let Some(b) = st.baggage_edit() {
        // Replaces every `baggage` header: the new value is the whole list.
        abi::replace_map_value(MapType::RequestHeaders, "baggage", b);
    }
    h.borrow_mut().stream = Some(st);
    0
}

/// Response headers: note the end of stream, append the annotation when configured.
#[no_mangle]
pub extern "C" fn proxy_on_response_headers(context_id: u32, _n: usize, eos: u32) -> u32 {
    let Some(h) = stream(context_id) else {
        return 0;
    };
    let h = h.borrow();
    if PROFILE_VARIANT == Some("calls") {
        abi::get_map_value_bytes(MapType::ResponseHeaders, ":status");
        return 0;
    }
    let (Some(sh), Some(st)) = (&h.shared, &h.stream) else {
        return 0;
    };
    if eos != 0 {
        st.response_complete();
    }
    if st.is_grpc() && eos != 0 {
        // Trailers-only gRPC reply (Envoy's own failures are these): `:status`,
        // `grpc-status` and `grpc-message` in one call.
        let map = abi::get_map_bytes(MapType::ResponseHeaders);
        st.grpc_reply(crate::grpc::read_reply(&map));
        if !st.may_annotate(&sh.core) {
            return 0;
        }
        let status = st.response_status();
        if let Some(v) = st.annotation(&sh.core, &sh.host, status) {
            abi::add_map_value(
                MapType::ResponseHeaders,
                &sh.core.config.annotation_header,
                &v,
            );
        }
        return 0;
    }
    if !st.may_annotate(&sh.core) {
        return 0;
    }
    let status = abi::get_map_value_bytes(MapType::ResponseHeaders, ":status")
        .map(|s| crate::flags::parse_status(&s))
        .unwrap_or(0);
    if st.is_grpc() && status < 400 {
        // The gRPC status comes in the trailers: annotate there.
        st.note_status(status);
        return 0;
    }
    if let Some(v) = st.annotation(&sh.core, &sh.host, status) {
        abi::add_map_value(
            MapType::ResponseHeaders,
            &sh.core.config.annotation_header,
            &v,
        );
    }
    0
}

/// End of stream: build and queue the hop report.
#[no_mangle]
pub extern "C" fn proxy_on_log(context_id: u32) {
    // The last callback of an HTTP context: take it out of the table (it is dropped at
    // the end of this function).
    let Some(h) = VM.with(|vm| vm.borrow_mut().streams.remove(&context_id)) else {
        return;
    };
    if PROFILE_VARIANT.is_some() {
        // Profiling builds: the stream was never classified; nothing to report.
        return;
    }
    let hop = {
        let h = h.borrow();
        let Some(sh) = &h.shared else {
            return;
        };
        let unseen;
        let st = match &h.stream {
            Some(st) => st,
            None => {
                // The request callbacks never ran: a filter before hopwatch answered the
                // request (RBAC, JWT, ext_authz, fault abort, local rate limit).
                let headers = abi::get_map_bytes(MapType::RequestHeaders);
                unseen = Stream::answered_before_filter(&sh.core, &sh.host, headers);
                &unseen
            }
        };
        match st.on_log(&sh.core, &sh.host) {
            Some(hop) => (sh.clone(), hop),
            None => return,
        }
    };
    let (sh, hop) = hop;
    let pushed = sh.batcher.borrow_mut().push(hop);
    match pushed {
        Push::Dropped => sh.host.count(metrics::REPORTS_DROPPED, 1),
        Push::Queued { flush_now: true } => {
            if !sh.fast_tick.replace(true) {
                abi::set_tick_period_ms(1);
            }
        }
        Push::Queued { flush_now: false } => {}
    }
}

/// The response of `context_id` reached its end of stream.
fn response_ended(context_id: u32) {
    if let Some(h) = stream(context_id) {
        if let Some(st) = &h.borrow().stream {
            st.response_complete();
        }
    }
}

/// A response body chunk: only its end of stream matters (no host call).
#[no_mangle]
pub extern "C" fn proxy_on_response_body(context_id: u32, _size: usize, eos: u32) -> u32 {
    if eos != 0 {
        response_ended(context_id);
    }
    0
}

/// Response trailers end the response; a gRPC reply's status is read from them (one
/// call for the whole, small, trailer map) and its annotation, if any, added to them.
#[no_mangle]
pub extern "C" fn proxy_on_response_trailers(context_id: u32, _n: usize) -> u32 {
    let Some(h) = stream(context_id) else {
        return 0;
    };
    let h = h.borrow();
    let (Some(sh), Some(st)) = (&h.shared, &h.stream) else {
        return 0;
    };
    st.response_complete();
    if !st.is_grpc() {
        return 0;
    }
    let map = abi::get_map_bytes(MapType::ResponseTrailers);
    st.grpc_reply(crate::grpc::read_reply(&map));
    if !st.may_annotate(&sh.core) {
        return 0;
    }
    let status = st.response_status();
    if let Some(v) = st.annotation(&sh.core, &sh.host, status) {
        abi::add_map_value(
            MapType::ResponseTrailers,
            &sh.core.config.annotation_header,
            &v,
        );
    }
    0
}

// No `proxy_on_delete` export. Envoy 1.40 calls it for an HTTP context right after
// `proxy_on_log` (`Context::log`: onLog, then onDelete) and from nowhere else, so the
// stream is freed in `proxy_on_log` and one VM entry per request is saved. Root
// contexts never log: they are reclaimed by `sweep_roots` once Envoy stops ticking them.

/// Roots not called for this long (and at least 10 of their tick periods) were deleted
/// by Envoy (a listener update replaces the plugin's root context): drop them so that
/// their queue and counters do not stay in the VM forever.
const ROOT_STALE_MS: u64 = 60_000;

fn sweep_roots(now_ms: u64) {
    VM.with(|vm| {
        vm.borrow_mut().roots.retain(|(_, r)| {
            let period = r
                .get()
                .map(|sh| u64::from(sh.core.config.tick_period_ms))
                .unwrap_or(0);
            let stale_after = ROOT_STALE_MS.max(period.saturating_mul(10));
            now_ms.saturating_sub(r.last_seen_ms.get()) < stale_after
        })
    });
}

fn grpc_done(context_id: u32, token: u32, status: u32) {
    let sh = root(context_id).and_then(|r| r.get());
    if let Some(sh) = sh {
        sh.completed(token, status);
        return;
    }
    // Unknown context: try every root (tokens are unique per VM).
    let roots: Vec<Rc<RootState>> =
        VM.with(|vm| vm.borrow().roots.iter().map(|(_, r)| r.clone()).collect());
    for r in roots {
        if let Some(sh) = r.get() {
            sh.completed(token, status);
        }
    }
}

/// A unary gRPC call answered (success).
#[no_mangle]
pub extern "C" fn proxy_on_grpc_receive(context_id: u32, token: u32, _size: usize) {
    grpc_done(context_id, token, 0);
}

/// A gRPC call closed (status 0: success without a message).
#[no_mangle]
pub extern "C" fn proxy_on_grpc_close(context_id: u32, token: u32, status: u32) {
    grpc_done(context_id, token, status);
}
