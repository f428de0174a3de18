//! The per-request flow, free of host calls except through [`Host`].
//!
//! * [`Identity::load`]: once per VM (root context): workload identity and own tag.
//! * [`Stream::on_request_headers`]: tag resolution, trace classification, correlation
//!   store read (outbound) or write (inbound); returns the tag header edit.
//! * [`Stream::annotation`]: at response headers, the annotation to append, if any.
//! * [`Stream::grpc_reply`]: gRPC only, what the response headers of a trailers-only
//!   reply or the trailers said (`grpc-status`, `grpc-message`).
//! * [`Stream::on_log`]: at the end of the stream (flags final), the hop report, if the
//!   hop is sampled or anomalous; counts metrics.
//! * [`Stream::answered_before_filter`]: a stream whose request callbacks never ran (a
//!   filter before hopwatch answered it); Envoy calls only `on_log` for it.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use hopwatch_proto::v1::{Hop, Protocol, TagSource, TraceContext};

use crate::baggage;
use crate::config::{Annotate, Direction, PluginConfig, TagAlias};
use crate::cookie;
use crate::correlation::{self, Contexts, IdKind, LocalStore, StoreConfig};
use crate::grpc;
use crate::headers::{self, RequestView};
use crate::host::{prop_string, prop_u64, Host};
use crate::metrics;
use crate::peer;
use crate::report;
use crate::sampling;
use crate::tag::{self, Found, FoundIn, TagDecision, TagEdit};
use crate::trace;

/// Who this sidecar is (read once per VM).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// `xds.node.metadata.WORKLOAD_NAME`
    pub workload: String,
    /// `xds.node.metadata.NAMESPACE`
    pub namespace: String,
    /// `xds.node.metadata.NAME`
    pub pod: String,
    /// Label `service.istio.io/canonical-name`, else `app`, else the workload.
    pub service: String,
    /// The workload's own valid tag (env var, else pod label); empty if none.
    pub own_tag: String,
    /// An env var / label value that was present but invalid (for a log line).
    pub invalid_own_tag: Option<String>,
    /// `xds.node.metadata.SERVICE_ACCOUNT` (Istio sets it): sent with every report so
    /// that the collector can check it against the sender's mTLS identity.
    pub service_account: String,
}

impl Identity {
    /// Reads node metadata through `host`; `env_tag` is the value of `tag_env_var`.
    pub fn load<H: Host + ?Sized>(cfg: &PluginConfig, host: &H, env_tag: Option<String>) -> Self {
        let meta = |k: &str| prop_string(host.property(&["xds", "node", "metadata", k]));
        let label = |k: &str| prop_string(host.property(&["xds", "node", "metadata", "LABELS", k]));
        let mut id = Identity {
            workload: meta("WORKLOAD_NAME"),
            namespace: meta("NAMESPACE"),
            pod: meta("NAME"),
            service_account: meta("SERVICE_ACCOUNT"),
            ..Identity::default()
        };
        id.service = label("service.istio.io/canonical-name");
        if id.service.is_empty() {
            id.service = label("app");
        }
        if id.service.is_empty() {
            id.service = id.workload.clone();
        }
        let env_tag = env_tag.filter(|t| !t.is_empty());
        match env_tag {
            Some(t) if tag::is_valid(&t) => id.own_tag = t,
            other => {
                if let Some(bad) = other {
                    id.invalid_own_tag = Some(tag::truncate(&bad));
                }
                let l = label(&cfg.tag_label);
                if tag::is_valid(&l) {
                    id.own_tag = l;
                } else if !l.is_empty() && id.invalid_own_tag.is_none() {
                    id.invalid_own_tag = Some(tag::truncate(&l));
                }
            }
        }
        id
    }
}

/// Configuration + identity of one plugin instance (immutable after `on_configure`).
#[derive(Debug, Clone)]
pub struct Core {
    /// Plugin configuration.
    pub config: PluginConfig,
    /// Workload identity.
    pub identity: Identity,
    /// `identity.own_tag`, shared by every request that is stamped with it.
    own_tag: Option<Rc<str>>,
}

impl Core {
    /// Builds the core.
    pub fn new(config: PluginConfig, identity: Identity) -> Self {
        let own_tag = Some(identity.own_tag.as_str())
            .filter(|t| !t.is_empty())
            .map(Rc::from);
        Core {
            config,
            identity,
            own_tag,
        }
    }

    /// Correlation store dimensions.
    pub fn store(&self) -> StoreConfig {
        StoreConfig {
            buckets: self.config.correlation_buckets,
            per_bucket: self.config.correlation_bucket_entries as usize,
            ttl_secs: self.config.correlation_ttl_secs,
        }
    }
}

/// State of one request between its callbacks.
///
/// It keeps the serialized request headers as the host gave them (memory the module
/// already owns) and only the few decisions the later callbacks need; the strings of a
/// hop report are built from the headers in [`Stream::on_log`], and only for the hops
/// that are reported (1% of them at `report_sample_rate` 0.01).
#[derive(Debug, Clone)]
pub struct Stream {
    /// The request headers as received (before the tag edit), serialized.
    headers: Vec<u8>,
    /// Request headers time, ns since epoch.
    start_nanos: u64,
    /// Trace classification (outbound: VALID turned into PROPAGATED / NEW).
    class: TraceContext,
    /// Tag decision.
    tag: TagDecision,
    /// Tag of the correlated inbound request (outbound), if one was found.
    correlated: Option<Rc<str>>,
    /// The trace is in the report sample.
    sampled: bool,
    /// Outbound: a trace context was expected on this call (the correlated inbound
    /// request carried one, or, uncorrelated, this VM's inbound side has recently seen
    /// traced requests), so a call without one lost it in the app.
    context_expected: bool,
    /// The request carried `debug_header`.
    debug: bool,
    /// The request carried `x-envoy-external-address` (see [`crate::peer`]).
    marked_external: bool,
    /// `:status` as read at response headers (0: not read). Saves `on_log` a
    /// `response.code` property read: host calls are the filter's main cost.
    response_status: Cell<u64>,
    /// The response reached its end of stream (headers, body or trailers with
    /// end_of_stream): nothing after its headers went wrong, so a success needs no
    /// `response.flags` read at the end.
    response_complete: Cell<bool>,
    /// The request is gRPC (its `content-type`): success is `grpc-status: 0`, not the
    /// HTTP status, which Envoy sets to 200 even on the failures it makes itself.
    grpc: bool,
    /// `grpc-status` of the reply ([`NO_GRPC_STATUS`]: not seen yet).
    grpc_status: Cell<u32>,
    /// `grpc-message` of a non-OK reply (bounded).
    grpc_message: RefCell<String>,
    /// Only `on_log` ran for this stream: a filter before hopwatch answered it.
    answered_before_filter: bool,
    /// The new `baggage` header value (outbound, `tag_baggage_key` set, a tag stamped or
    /// restored): one header write, and only then.
    baggage_edit: Option<String>,
}

/// Longest `correlation_headers` value used as an id (longer ones are ignored: a cut id
/// could join unrelated chains).
pub const MAX_CORRELATION_VALUE: usize = 128;

/// The values of the configured `correlation_headers` present on the request (first
/// occurrence of each), with their names: non-empty, at most
/// [`MAX_CORRELATION_VALUE`] bytes, exact (not trimmed, not lowercased).
pub fn correlation_values<'a>(cfg: &'a PluginConfig, map: &'a [u8]) -> Vec<(&'a str, &'a str)> {
    cfg.correlation_headers
        .iter()
        .filter_map(|name| {
            headers::first(map, name)
                .filter(|v| !v.is_empty() && v.len() <= MAX_CORRELATION_VALUE)
                .map(|v| (name.as_str(), v))
        })
        .collect()
}

/// A tag carried elsewhere than the tag header: the `tag_baggage_key` member, then the
/// `tag_aliases` in order. Looked for only when the tag header is absent and only in
/// the places configured; no host call (the headers are already here).
pub fn find_tag(cfg: &PluginConfig, map: &[u8], view: &RequestView<'_>) -> Option<Found> {
    if view.tag.is_some() {
        return None;
    }
    let baggage_member = |key: &str| -> Option<String> {
        if !view.baggage {
            return None;
        }
        let values = headers::values(map, "baggage");
        baggage::get(&values, key)
            .ok()
            .flatten()
            .map(|v| v.into_owned())
    };
    if !cfg.tag_baggage_key.is_empty() {
        if let Some(value) = baggage_member(&cfg.tag_baggage_key) {
            return Some(Found {
                value,
                source: TagSource::Baggage,
                found_in: FoundIn::Baggage,
            });
        }
    }
    for (i, alias) in cfg.tag_aliases.iter().enumerate() {
        let (value, source) = match alias {
            TagAlias::Header(name) => (
                headers::first(map, name).map(str::to_string),
                TagSource::AliasHeader,
            ),
            TagAlias::Cookie(name) => (
                view.cookie
                    .then(|| cookie::get(&headers::values(map, "cookie"), name))
                    .flatten()
                    .map(str::to_string),
                TagSource::AliasCookie,
            ),
            TagAlias::Baggage(key) => (baggage_member(key), TagSource::AliasBaggage),
        };
        if let Some(value) = value {
            return Some(Found {
                value,
                source,
                found_in: FoundIn::Alias(i),
            });
        }
    }
    None
}

/// The source a tag restored through an id of `kind` is reported with.
pub fn correlated_source(kind: IdKind) -> TagSource {
    match kind {
        IdKind::B3 | IdKind::W3c | IdKind::RequestId => TagSource::Correlated,
        IdKind::Sw8 => TagSource::CorrelatedSw8,
        IdKind::Uber => TagSource::CorrelatedUber,
        IdKind::Datadog => TagSource::CorrelatedDatadog,
        IdKind::Header => TagSource::CorrelatedHeader,
    }
}

/// `"baggage:KEY"`, `"header:NAME"`, `"cookie:NAME"`: where a found tag was (reports).
pub fn found_in_name(cfg: &PluginConfig, f: FoundIn) -> String {
    let (kind, name) = match f {
        FoundIn::Baggage => ("baggage:", cfg.tag_baggage_key.as_str()),
        FoundIn::Alias(i) => match cfg.tag_aliases.get(i) {
            Some(TagAlias::Header(n)) => ("header:", n.as_str()),
            Some(TagAlias::Cookie(n)) => ("cookie:", n.as_str()),
            Some(TagAlias::Baggage(n)) => ("baggage:", n.as_str()),
            None => ("", ""),
        },
    };
    let mut s = String::with_capacity(kind.len() + name.len());
    s.push_str(kind);
    s.push_str(name);
    s
}

/// [`Stream`]'s `grpc_status` before a `grpc-status` was read.
const NO_GRPC_STATUS: u32 = u32::MAX;

fn secs(nanos: u64) -> u32 {
    u32::try_from(nanos / 1_000_000_000).unwrap_or(u32::MAX)
}

/// Whether a hop is anomalous (always reported, whatever the sampling).
///
/// An outbound call without the trace context of the request being served (MISSING, or
/// NEW: a trace of its own) is anomalous only when there was a context to keep:
/// `context_expected`. On a mesh without a tracer (Istio's default since 1.22) requests
/// carry only `x-request-id`, so nothing was lost and such a call is sampled like any
/// other; otherwise `report_sample_rate` 0.01 would cost as much as 1.0 there.
pub fn is_anomalous(
    direction: Direction,
    class: TraceContext,
    tag: &TagDecision,
    context_expected: bool,
) -> bool {
    tag.malformed
        || match class {
            TraceContext::Partial | TraceContext::Malformed | TraceContext::Inconsistent => true,
            TraceContext::Missing | TraceContext::New => {
                direction == Direction::Outbound && context_expected
            }
            _ => false,
        }
}

impl Stream {
    /// Request headers: `headers` is the whole serialized request header map, fetched
    /// in one host call. `local` is this VM's copy of the correlation store.
    pub fn on_request_headers<H: Host + ?Sized>(
        core: &Core,
        host: &H,
        local: &LocalStore,
        headers: Vec<u8>,
    ) -> (Stream, TagEdit) {
        let cfg = &core.config;
        let start_nanos = host.now_nanos();
        let now = secs(start_nanos);
        let mut view = RequestView::parse(&headers, &cfg.tag_header, &cfg.debug_header);
        if view.tag_repeated {
            // Several tag headers (rare): the first valid one is the request's tag, and
            // the request leaves with that one value only (see `collapse_repeated`).
            view.tag = tag::first_valid(&headers::values(&headers, &cfg.tag_header));
        }
        let trace = trace::classify(&view.trace);
        let rid_key = trace::request_id_key(&trace.request_id);
        // The trace ids first (a hit on one of them means PROPAGATED), then the pass-through
        // ids; empty ones are skipped by the store. Looked up in this order, the first
        // live entry wins.
        let fixed = [
            (IdKind::B3, &*trace.b3_trace_id),
            (IdKind::W3c, &*trace.w3c_trace_id),
            (IdKind::Sw8, trace.other.sw8.as_str()),
            (IdKind::Uber, trace.other.uber.as_str()),
            (IdKind::Datadog, trace.other.datadog.as_str()),
            (IdKind::RequestId, &*rid_key),
        ];
        // The custom ids before x-request-id: an app that copies only its own id gets a
        // fresh x-request-id from Envoy on every call, whose lookup always misses (and,
        // missing the local copy, costs a shared-data read). Without them, no allocation.
        let with_custom: Vec<(IdKind, &str)>;
        let ids: &[(IdKind, &str)] = if cfg.correlation_headers.is_empty() {
            &fixed
        } else {
            let (traces, rid) = fixed.split_at(5);
            with_custom = traces
                .iter()
                .copied()
                .chain(
                    correlation_values(cfg, &headers)
                        .into_iter()
                        .map(|(_, v)| (IdKind::Header, v)),
                )
                .chain(rid.iter().copied())
                .collect();
            &with_custom
        };
        let found = if cfg.tag_baggage_key.is_empty() && cfg.tag_aliases.is_empty() {
            None
        } else {
            find_tag(cfg, &headers, &view)
        };
        let store = core.store();
        let mut class = trace.class;
        let mut correlated = None;
        let mut context_expected = false;
        let contexts = Contexts {
            b3: !trace.b3_trace_id.is_empty(),
            w3c: !trace.w3c_trace_id.is_empty(),
            trace: correlation::trace_hash(&trace.trace_id),
        };
        // B3 and W3C carrying different traces, each well-formed: two tracers' contexts.
        let two_tracers =
            class == TraceContext::Inconsistent && trace.detail == trace::B3_W3C_DISAGREE;
        let tag = match cfg.direction {
            Direction::Inbound => {
                // A caller's sidecar tracer may have added the second context: the
                // caller's outbound side, which knows what its app received, judges.
                if two_tracers {
                    class = TraceContext::Valid;
                }
                let d = tag::resolve_inbound_found(view.tag, found);
                let failed =
                    correlation::remember(host, local, &store, ids, &d.sent, contexts, now);
                if failed > 0 {
                    host.count(metrics::CORRELATION_WRITE_FAILURES, u64::from(failed));
                }
                d
            }
            Direction::Outbound => {
                if two_tracers && second_context_is_the_tracers(host, local, &store, ids, now) {
                    class = TraceContext::Valid;
                }
                let hit = correlation::recall(host, local, &store, ids, now);
                if class == TraceContext::Valid {
                    // Found by its trace id, or by another id of a request of the same
                    // trace (see `Contexts::trace`): the app continued the trace.
                    let continued = hit.as_ref().is_some_and(|h| {
                        h.kind.is_trace() || h.contexts.same_trace(contexts.trace)
                    });
                    class = if continued {
                        TraceContext::Propagated
                    } else {
                        TraceContext::New
                    };
                }
                let source = hit.as_ref().map(|h| correlated_source(h.kind));
                // Decided from what is already at hand (the hit, this VM's memory of its
                // inbound side): no host call.
                context_expected = match &hit {
                    Some(h) => h.contexts.traced(),
                    None => local.traced_recently(now),
                };
                correlated = hit.map(|h| h.tag).filter(|t| !t.is_empty());
                tag::resolve_outbound_found(
                    view.tag,
                    found,
                    correlated.as_ref().zip(source),
                    core.own_tag.as_ref(),
                )
            }
        };
        // A stamped or restored tag also goes into the baggage member (unless it is
        // already there, or the baggage list is malformed or full: then it is left as it
        // came).
        let baggage_edit = match (&tag.edit, tag.source) {
            (TagEdit::Set(t), s)
                if !cfg.tag_baggage_key.is_empty()
                    && s != TagSource::Baggage
                    && s != TagSource::AliasBaggage
                    && cfg.direction == Direction::Outbound =>
            {
                let values = headers::values(&headers, "baggage");
                match baggage::get(&values, &cfg.tag_baggage_key) {
                    Ok(Some(v)) if *v == **t => None,
                    Ok(_) => baggage::with_member(&values, &cfg.tag_baggage_key, t),
                    Err(_) => None,
                }
            }
            _ => None,
        };
        let mut tag = tag;
        if view.tag_repeated {
            tag.edit = tag::collapse_repeated(&tag);
        }
        host.count(metrics::tag_metric(tag::source_name(tag.source)), 1);
        if tag.malformed {
            host.count(metrics::tag_metric("malformed"), 1);
        }
        if let Some(m) = metrics::trace_metric(trace::class_name(class)) {
            host.count(m, 1);
        }
        // Without a trace id the decision comes from another tracer's trace id, else the
        // request id's correlation key, so every hop of an `x-request-id`-only chain agrees
        // although Envoy's UUID extension rewrites one digit of the id on the way.
        let sample_id = if trace.trace_id.is_empty() {
            trace.other.first()
        } else {
            &trace.trace_id
        };
        let sampled = sampling::sampled(cfg.report_sample_rate, sample_id, &rid_key);
        let debug = view.debug;
        let marked_external = view.external_address;
        let grpc = view.is_grpc();
        let edit = tag.edit.clone();
        let s = Stream {
            headers,
            start_nanos,
            class,
            tag,
            correlated,
            sampled,
            context_expected,
            debug,
            marked_external,
            response_status: Cell::new(0),
            response_complete: Cell::new(false),
            baggage_edit,
            grpc,
            grpc_status: Cell::new(NO_GRPC_STATUS),
            grpc_message: RefCell::new(String::new()),
            answered_before_filter: false,
        };
        (s, edit)
    }

    /// The new `baggage` header value to write, if any (see `tag_baggage_key`).
    pub fn baggage_edit(&self) -> Option<&str> {
        self.baggage_edit.as_deref()
    }

    /// A stream answered before hopwatch's request callbacks ran (RBAC, JWT, ext_authz,
    /// fault abort, local rate limit): Envoy calls only `on_log`. `headers` are the
    /// request headers Envoy still holds there (one host call, made by the glue).
    /// Nothing is written to the correlation store and no tag is stamped: the request
    /// went nowhere. [`Stream::on_log`] then always reports the hop.
    pub fn answered_before_filter<H: Host + ?Sized>(
        core: &Core,
        host: &H,
        headers: Vec<u8>,
    ) -> Stream {
        let cfg = &core.config;
        let view = RequestView::parse(&headers, &cfg.tag_header, &cfg.debug_header);
        let trace = trace::classify(&view.trace);
        // As received: the request was never passed on, so the tag it "left with" is
        // the one it came with (a malformed one is reported as such).
        let tag = tag::resolve_inbound(view.tag);
        let class = trace.class;
        let grpc = view.is_grpc();
        host.count(metrics::ANSWERED_BEFORE_FILTER, 1);
        Stream {
            start_nanos: host.now_nanos(),
            class,
            tag,
            correlated: None,
            sampled: false,
            context_expected: false,
            debug: false,
            marked_external: view.external_address,
            response_status: Cell::new(0),
            response_complete: Cell::new(true),
            grpc,
            grpc_status: Cell::new(NO_GRPC_STATUS),
            grpc_message: RefCell::new(String::new()),
            answered_before_filter: true,
            baggage_edit: None,
            headers,
        }
    }

    /// Whether the request is gRPC (by its `content-type`).
    pub fn is_grpc(&self) -> bool {
        self.grpc
    }

    /// gRPC: what the reply said, read by the glue from the response headers of a
    /// trailers-only reply or from the trailers. The first `grpc-status` wins.
    pub fn grpc_reply(&self, reply: grpc::Reply) {
        if reply.http_status != 0 && self.response_status.get() == 0 {
            self.response_status.set(reply.http_status);
        }
        if let Some(st) = reply.status {
            if self.grpc_status.get() == NO_GRPC_STATUS {
                self.grpc_status.set(st);
                *self.grpc_message.borrow_mut() = reply.message;
            }
        }
    }

    /// `grpc-status` seen so far (`None`: not a gRPC reply, or none seen yet).
    pub fn grpc_status(&self) -> Option<u32> {
        Some(self.grpc_status.get()).filter(|s| *s != NO_GRPC_STATUS)
    }

    /// A gRPC stream whose reply carried a non-OK `grpc-status`.
    fn grpc_failed(&self) -> bool {
        self.grpc && self.grpc_status().is_some_and(|s| s != grpc::OK)
    }

    /// `:status` as seen at response headers (0: not read).
    pub fn response_status(&self) -> u64 {
        self.response_status.get()
    }

    /// Records `:status` read at response headers without annotating (a gRPC reply
    /// that continues: its annotation, if any, goes into the trailers).
    pub fn note_status(&self, status: u64) {
        self.response_status.set(status);
    }

    /// The trace classification (outbound: PROPAGATED / NEW instead of VALID).
    pub fn class(&self) -> TraceContext {
        self.class
    }

    /// The tag decision.
    pub fn tag(&self) -> &TagDecision {
        &self.tag
    }

    /// The tag of the correlated inbound request (empty: none found, or it had none).
    pub fn correlated_tag(&self) -> &str {
        self.correlated.as_deref().unwrap_or_default()
    }

    /// The request headers hopwatch reads, re-read from the kept serialized map.
    pub fn request<'s>(&'s self, core: &Core) -> RequestView<'s> {
        RequestView::parse(
            &self.headers,
            &core.config.tag_header,
            &core.config.debug_header,
        )
    }

    /// The response reached its end of stream (the glue calls this when response
    /// headers, a response body chunk or trailers end the stream).
    pub fn response_complete(&self) {
        self.response_complete.set(true);
    }

    /// Whether [`Stream::annotation`] can produce anything (so the glue can skip
    /// reading `:status`).
    pub fn may_annotate(&self, core: &Core) -> bool {
        match core.config.annotate_response {
            Annotate::Never => false,
            Annotate::Debug => self.debug,
            Annotate::OnError | Annotate::Always => true,
        }
    }

    /// Whether the caller may see annotations ([`crate::peer`]): `connection.mtls` is
    /// read only on the inbound side, only when `annotate_external` is off and the
    /// request is not marked external.
    pub fn caller_is_mesh_peer<H: Host + ?Sized>(&self, core: &Core, host: &H) -> bool {
        peer::is_mesh_peer(
            core.config.direction,
            core.config.annotate_external,
            self.marked_external,
            || peer::prop_bool(host.property(&peer::MTLS_PROPERTY)),
        )
    }

    /// Response headers (or, for gRPC, trailers): the annotation value to append, if
    /// this response gets one. Reads `response.flags` (and `response.code_details` when
    /// annotating), except in `on_error` mode for a status below 400 without a gRPC
    /// error: every HTTP response Envoy produces itself (the ones its flags explain) is a
    /// 4xx or 5xx, and a gRPC one carries a non-OK `grpc-status`, so a success costs no
    /// property read.
    pub fn annotation<H: Host + ?Sized>(
        &self,
        core: &Core,
        host: &H,
        status: u64,
    ) -> Option<String> {
        self.response_status.set(status);
        if !self.may_annotate(core) {
            return None;
        }
        let grpc_failed = self.grpc_failed();
        let on_error = core.config.annotate_response == Annotate::OnError;
        if on_error && status < 400 && !grpc_failed {
            return None;
        }
        let mask = prop_u64(host.property(&["response", "flags"]));
        if on_error && mask == 0 && status < 500 && !grpc_failed {
            return None;
        }
        // Only now, when this response would be annotated: is the caller a mesh peer?
        // (One property read on the inbound side; a debug request from outside the mesh
        // is answered as if it had no debug header.)
        if !self.caller_is_mesh_peer(core, host) {
            return None;
        }
        let details = prop_string(host.property(&["response", "code_details"]));
        let id = &core.identity;
        Some(report::annotation(
            core.config.direction,
            &id.workload,
            &id.namespace,
            status,
            self.grpc.then(|| self.grpc_status()).flatten(),
            mask,
            &details,
        ))
    }

    /// End of stream: counts the response flags and returns the hop report when the
    /// hop is sampled or must be reported (flags, 5xx, anomaly).
    ///
    /// `response.flags` is read unless the response is known healthy: its `:status`
    /// (seen at response headers) is below 400 and it reached its end of stream. Envoy
    /// sets flags on the responses it produces itself (4xx/5xx) and on streams cut
    /// short (resets, timeouts), so such a response has none to read.
    pub fn on_log<H: Host + ?Sized>(&self, core: &Core, host: &H) -> Option<Hop> {
        let cfg = &core.config;
        let seen = self.response_status.get();
        // gRPC: healthy only with grpc-status 0 (Envoy's own failures are HTTP 200).
        let grpc_ok = !self.grpc || self.grpc_status() == Some(grpc::OK);
        let healthy = seen != 0 && seen < 400 && self.response_complete.get() && grpc_ok;
        let mask = if healthy {
            0
        } else {
            prop_u64(host.property(&["response", "flags"]))
        };
        // The `:status` seen at response headers when there was one (the same code Envoy
        // sends downstream); otherwise (reset before a response) ask the host.
        let code = match seen {
            0 => prop_u64(host.property(&["response", "code"])),
            seen => seen,
        };
        host.count(metrics::HOPS_SEEN, 1);
        if mask != 0 {
            host.count(metrics::RESPONSES_FLAGGED, 1);
            let mut unknown = false;
            for bit in 0..64u32 {
                if mask & (1u64 << bit) != 0 {
                    let m = metrics::flag_metric(bit);
                    if m == metrics::FLAG_UNKNOWN {
                        unknown = true;
                    } else {
                        host.count(m, 1);
                    }
                }
            }
            if unknown {
                host.count(metrics::FLAG_UNKNOWN, 1);
            }
        }
        let grpc_failed = self.grpc_failed();
        if grpc_failed {
            host.count(metrics::GRPC_ERRORS, 1);
        }
        let must = mask != 0
            || code >= 500
            || grpc_failed
            || self.answered_before_filter
            || is_anomalous(cfg.direction, self.class, &self.tag, self.context_expected);
        if !self.sampled && !must {
            return None;
        }
        let end_nanos = host.now_nanos();
        let p = |path: &[&str]| prop_string(host.property(path));
        let id = &core.identity;
        let view = self.request(core);
        let t = trace::classify(&view.trace);
        let owned = |s: Option<&str>| s.map(tag::truncate).unwrap_or_default();
        let mut hop = Hop {
            trace_id: t.trace_id.into_owned(),
            span_id: t.span_id.into_owned(),
            parent_span_id: t.parent_span_id.into_owned(),
            sampled: t.sampled as i32,
            request_id: t.request_id.into_owned(),
            w3c_trace_id: t.w3c_trace_id.into_owned(),
            direction: report::proto_direction(cfg.direction) as i32,
            workload: id.workload.clone(),
            namespace: id.namespace.clone(),
            pod: id.pod.clone(),
            service: id.service.clone(),
            service_account: id.service_account.clone(),
            own_tag: id.own_tag.clone(),
            tag_received: self.tag.received.clone(),
            tag_sent: self.tag.sent.to_string(),
            tag_source: self.tag.source as i32,
            tag_malformed: self.tag.malformed,
            correlated_tag: self.correlated_tag().to_string(),
            trace_context: self.class as i32,
            trace_detail: t.detail.into_owned(),
            missing_trace_headers: view.trace.missing(),
            authority: owned(view.authority),
            method: owned(view.method),
            path: view
                .path
                .map(report::path_without_query)
                .unwrap_or_default(),
            start_time_unix_micros: self.start_nanos / 1000,
            duration_micros: end_nanos.saturating_sub(self.start_nanos) / 1000,
            sampled_report: self.sampled,
            sw8_trace_id: t.other.sw8,
            uber_trace_id: t.other.uber,
            datadog_trace_id: t.other.datadog,
            correlation_id: correlation_values(cfg, &self.headers)
                .first()
                .map(|(n, v)| {
                    let mut s = String::with_capacity(n.len() + 1 + v.len());
                    s.push_str(n);
                    s.push('=');
                    s.push_str(v);
                    s
                })
                .unwrap_or_default(),
            tag_alias: self
                .tag
                .found_in
                .map(|f| found_in_name(cfg, f))
                .unwrap_or_default(),
            ..Hop::default()
        };
        // Each property is a host call (~2 us): a healthy hop gets only what joins it to
        // its neighbours; a failed one also what explains it.
        // source.address and upstream.local_address are never read: the collector does
        // not use them.
        let failed = mask != 0 || code >= 400 || grpc_failed;
        if failed || cfg.direction == Direction::Outbound {
            // Outbound: the callee (its cluster names the service and subset) and the
            // host that answered (HOP_MISSING needs it). Inbound, only when it failed:
            // the collector joins a healthy inbound hop by its ids and workload.
            hop.upstream_cluster = p(&["xds", "cluster_name"]);
            hop.upstream_host = p(&["upstream", "address"]);
        }
        let details = if failed {
            hop.downstream_local_address = p(&["destination", "address"]);
            hop.route_name = p(&["xds", "route_name"]);
            p(&["response", "code_details"])
        } else {
            String::new()
        };
        report::set_response(&mut hop, code, mask, details);
        // The protocol: gRPC from the content-type (free); the HTTP version is a property
        // read, made for failed hops only.
        hop.protocol = if self.grpc {
            Protocol::Grpc
        } else if failed {
            host.property(&["request", "protocol"])
                .map(|p| grpc::protocol_of(&p))
                .unwrap_or(Protocol::Http)
        } else {
            Protocol::Http
        } as i32;
        if self.grpc {
            hop.grpc_status = self.grpc_status();
            hop.grpc_message = self.grpc_message.borrow().clone();
        }
        hop.answered_before_filter = self.answered_before_filter;
        if cfg.direction == Direction::Outbound {
            hop.upstream_span_id = upstream_span_id(host);
        }
        Some(hop)
    }
}

/// Whether an outbound call whose B3 and W3C trace ids differ carries one context the app
/// received and a second one its sidecar's tracer added: the inbound request it serves
/// (found through one of the two ids) did not carry a context of the other kind (the
/// inbound filter runs before the tracer injects its own), or it carried both and the
/// app passed both on. Otherwise the app made one of them up: INCONSISTENT stays.
/// Only called for such calls (rare): it may cost a shared-data read per id.
fn second_context_is_the_tracers<H: Host + ?Sized>(
    host: &H,
    local: &LocalStore,
    store: &StoreConfig,
    ids: &[(IdKind, &str)],
    now: u32,
) -> bool {
    let find = |kind: IdKind| {
        let id = ids.iter().find(|(k, _)| *k == kind)?;
        correlation::recall(host, local, store, &[*id], now)
    };
    let by_b3 = find(IdKind::B3);
    let by_w3c = find(IdKind::W3c);
    match (by_b3, by_w3c) {
        (Some(_), Some(_)) => true,
        (Some(h), None) => !h.contexts.w3c,
        (None, Some(h)) => !h.contexts.b3,
        (None, None) => false,
    }
}

/// The span id the sidecar sent upstream: `x-b3-spanid` re-read at the end of the
/// stream, else the parent id of `traceparent`. Empty when not visible.
pub fn upstream_span_id<H: Host + ?Sized>(host: &H) -> String {
    if let Some(s) = host.request_header("x-b3-spanid") {
        let s = s.trim();
        if s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return s.to_ascii_lowercase();
        }
    }
    if let Some(tp) = host.request_header("traceparent") {
        if let Some(parent) = tp.split('-').nth(2) {
            if parent.len() == 16 && parent.bytes().all(|b| b.is_ascii_hexdigit()) {
                return parent.to_ascii_lowercase();
            }
        }
    }
    String::new()
}
