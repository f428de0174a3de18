//! The per-request flow, free of host calls except through [`Host`].
//!
//! * [`Identity::load`]: once per VM (root context): workload identity and own tag.
//! * [`Stream::on_request_headers`]: tag resolution, trace classification, correlation
//!   store read (outbound) or write (inbound); returns the tag header edit.
//! * [`Stream::annotation`]: at response headers, the annotation to append, if any.
//! * [`Stream::on_log`]: at the end of the stream (flags final), the hop report, if the
//!   hop is sampled or anomalous; counts metrics.

use hopwatch_proto::v1::{Hop, TraceContext};

use crate::config::{Annotate, Direction, PluginConfig};
use crate::correlation::{self, IdKind, StoreConfig};
use crate::host::{prop_string, prop_u64, Host};
use crate::metrics;
use crate::report;
use crate::sampling;
use crate::tag::{self, TagDecision, TagEdit};
use crate::trace::{self, TraceHeaders, TraceInfo};

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
}

impl Core {
    /// Builds the core.
    pub fn new(config: PluginConfig, identity: Identity) -> Self {
        Core { config, identity }
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
#[derive(Debug, Clone)]
pub struct Stream {
    /// Request headers time, ns since epoch.
    pub start_nanos: u64,
    /// Trace context (outbound: classified PROPAGATED / NEW when valid).
    pub trace: TraceInfo,
    /// Tag decision.
    pub tag: TagDecision,
    /// Tag of the correlated inbound request (outbound).
    pub correlated_tag: String,
    /// `:authority`
    pub authority: String,
    /// `:method`
    pub method: String,
    /// `:path` without query.
    pub path: String,
    /// The request carried `debug_header`.
    pub debug: bool,
    /// `:status` as read at response headers (0: not read). Saves `on_log` a
    /// `response.code` property read: host calls are the filter's main cost.
    pub response_status: std::cell::Cell<u64>,
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn secs(nanos: u64) -> u32 {
    u32::try_from(nanos / 1_000_000_000).unwrap_or(u32::MAX)
}

/// Whether a hop is anomalous (always reported, whatever the sampling).
pub fn is_anomalous(direction: Direction, trace: &TraceInfo, tag: &TagDecision) -> bool {
    tag.malformed
        || match trace.class {
            TraceContext::Partial | TraceContext::Malformed | TraceContext::Inconsistent => true,
            TraceContext::Missing | TraceContext::New => direction == Direction::Outbound,
            _ => false,
        }
}

impl Stream {
    /// Request headers: all of them, fetched in one host call.
    pub fn on_request_headers<H: Host + ?Sized>(
        core: &Core,
        host: &H,
        headers: &[(String, String)],
    ) -> (Stream, TagEdit) {
        let cfg = &core.config;
        let start_nanos = host.now_nanos();
        let now = secs(start_nanos);
        let mut trace = trace::classify(&TraceHeaders::from_pairs(headers));
        let received = header(headers, &cfg.tag_header);
        let store = core.store();
        let rid_key = trace::request_id_key(&trace.request_id);
        let ids = [
            (IdKind::B3, trace.b3_trace_id.as_str()),
            (IdKind::W3c, trace.w3c_trace_id.as_str()),
            (IdKind::RequestId, rid_key.as_str()),
        ];
        let mut correlated_tag = String::new();
        let tag = match cfg.direction {
            Direction::Inbound => {
                let d = tag::resolve_inbound(received);
                let failed = correlation::remember(host, &store, &ids, &d.sent, now);
                if failed > 0 {
                    host.count(metrics::CORRELATION_WRITE_FAILURES, u64::from(failed));
                }
                d
            }
            Direction::Outbound => {
                let hit = correlation::recall(host, &store, &ids, now);
                let serving = hit.as_ref().is_some_and(|e| e.kind.is_trace());
                if trace.class == TraceContext::Valid {
                    trace.class = if serving {
                        TraceContext::Propagated
                    } else {
                        TraceContext::New
                    };
                }
                if let Some(e) = hit {
                    correlated_tag = e.tag;
                }
                let own = Some(core.identity.own_tag.as_str()).filter(|s| !s.is_empty());
                let corr = Some(correlated_tag.as_str()).filter(|s| !s.is_empty());
                tag::resolve_outbound(received, corr, own)
            }
        };
        host.count(metrics::tag_metric(tag::source_name(tag.source)), 1);
        if tag.malformed {
            host.count(metrics::tag_metric("malformed"), 1);
        }
        if let Some(m) = metrics::trace_metric(trace::class_name(trace.class)) {
            host.count(m, 1);
        }
        let edit = tag.edit.clone();
        let s = Stream {
            start_nanos,
            trace,
            tag,
            correlated_tag,
            authority: header(headers, ":authority")
                .map(tag::truncate)
                .unwrap_or_default(),
            method: header(headers, ":method")
                .map(tag::truncate)
                .unwrap_or_default(),
            path: header(headers, ":path")
                .map(report::path_without_query)
                .unwrap_or_default(),
            debug: header(headers, &cfg.debug_header).is_some(),
            response_status: std::cell::Cell::new(0),
        };
        (s, edit)
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

    /// Response headers: the annotation value to append, if this response gets one.
    /// Reads `response.flags` (and `response.code_details` when annotating), except in
    /// `on_error` mode for a status below 400: every response Envoy produces itself (the
    /// ones its flags explain) is a 4xx or 5xx, so a success costs no property read.
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
        if core.config.annotate_response == Annotate::OnError && status < 400 {
            return None;
        }
        let mask = prop_u64(host.property(&["response", "flags"]));
        if core.config.annotate_response == Annotate::OnError && mask == 0 && status < 500 {
            return None;
        }
        let details = prop_string(host.property(&["response", "code_details"]));
        let id = &core.identity;
        Some(report::annotation(
            core.config.direction,
            &id.workload,
            &id.namespace,
            status,
            mask,
            &details,
        ))
    }

    /// End of stream: counts the response flags and returns the hop report when the
    /// hop is sampled or must be reported (flags, 5xx, anomaly).
    pub fn on_log<H: Host + ?Sized>(&self, core: &Core, host: &H) -> Option<Hop> {
        let cfg = &core.config;
        let end_nanos = host.now_nanos();
        let mask = prop_u64(host.property(&["response", "flags"]));
        // The `:status` seen at response headers when there was one (the same code Envoy
        // sends downstream); otherwise (reset before a response) ask the host.
        let code = match self.response_status.get() {
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
        let sampled = sampling::sampled(
            cfg.report_sample_rate,
            &self.trace.trace_id,
            &self.trace.request_id,
        );
        let must = mask != 0 || code >= 500 || is_anomalous(cfg.direction, &self.trace, &self.tag);
        if !sampled && !must {
            return None;
        }
        let p = |path: &[&str]| prop_string(host.property(path));
        let id = &core.identity;
        let t = &self.trace;
        let mut hop = Hop {
            trace_id: t.trace_id.clone(),
            span_id: t.span_id.clone(),
            parent_span_id: t.parent_span_id.clone(),
            sampled: t.sampled as i32,
            request_id: t.request_id.clone(),
            w3c_trace_id: t.w3c_trace_id.clone(),
            direction: report::proto_direction(cfg.direction) as i32,
            workload: id.workload.clone(),
            namespace: id.namespace.clone(),
            pod: id.pod.clone(),
            service: id.service.clone(),
            own_tag: id.own_tag.clone(),
            tag_received: self.tag.received.clone(),
            tag_sent: self.tag.sent.clone(),
            tag_source: self.tag.source as i32,
            tag_malformed: self.tag.malformed,
            correlated_tag: self.correlated_tag.clone(),
            trace_context: t.class as i32,
            trace_detail: t.detail.clone(),
            missing_trace_headers: t.missing.clone(),
            authority: self.authority.clone(),
            method: self.method.clone(),
            path: self.path.clone(),
            upstream_cluster: p(&["xds", "cluster_name"]),
            upstream_host: p(&["upstream", "address"]),
            downstream_remote_address: p(&["source", "address"]),
            downstream_local_address: p(&["destination", "address"]),
            upstream_local_address: p(&["upstream", "local_address"]),
            route_name: p(&["xds", "route_name"]),
            start_time_unix_micros: self.start_nanos / 1000,
            duration_micros: end_nanos.saturating_sub(self.start_nanos) / 1000,
            sampled_report: sampled,
            ..Hop::default()
        };
        report::set_response(&mut hop, code, mask, p(&["response", "code_details"]));
        if cfg.direction == Direction::Outbound {
            hop.upstream_span_id = upstream_span_id(host);
        }
        Some(hop)
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
