//! Counter names (Envoy stats through proxy-wasm metrics).
//!
//! All counters are `hopwatch.<direction>.<name>`; Envoy exposes them prefixed with
//! `wasmcustom.` (e.g. `wasmcustom.hopwatch.outbound.reports_dropped`). A [`Metric`] is
//! an index into [`names`]; the glue defines them once per root context.

use crate::flags::FLAG_NAMES;

/// Index of a counter in [`names`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric(pub u16);

/// Hops queued for reporting.
pub const HOPS_REPORTED: Metric = Metric(0);
/// Hop reports dropped (queue full, dispatch failed, call failed).
pub const REPORTS_DROPPED: Metric = Metric(1);
/// Batches accepted by the collector.
pub const BATCHES_SENT: Metric = Metric(2);
/// Batches that failed (dispatch or call).
pub const BATCHES_FAILED: Metric = Metric(3);
/// Correlation-store writes given up (CAS retries exhausted, host error).
pub const CORRELATION_WRITE_FAILURES: Metric = Metric(4);
/// Hops seen (requests that reached `on_log`).
pub const HOPS_SEEN: Metric = Metric(5);
/// First tag-source counter; see [`tag_metric`].
const TAG_BASE: u16 = 6;
/// Tag sources: request, correlated, environment, none, then malformed, then the
/// sources besides the tag header (baggage member, aliases).
const TAG_NAMES: [&str; 7] = [
    "request",
    "correlated",
    "environment",
    "none",
    "malformed",
    "baggage",
    "alias",
];
const TRACE_BASE: u16 = TAG_BASE + TAG_NAMES.len() as u16;
const TRACE_NAMES: [&str; 7] = [
    "valid",
    "propagated",
    "new",
    "missing",
    "partial",
    "malformed",
    "inconsistent",
];
const FLAG_BASE: u16 = TRACE_BASE + 7;
/// Responses with any flag bit beyond the known table.
pub const FLAG_UNKNOWN: Metric = Metric(FLAG_BASE + FLAG_NAMES.len() as u16);
/// Responses with at least one flag.
pub const RESPONSES_FLAGGED: Metric = Metric(FLAG_BASE + FLAG_NAMES.len() as u16 + 1);
/// gRPC responses with a non-OK `grpc-status`.
pub const GRPC_ERRORS: Metric = Metric(FLAG_BASE + FLAG_NAMES.len() as u16 + 2);
/// Streams a filter before hopwatch answered (only `on_log` ran: RBAC, JWT, ext_authz,
/// fault abort, local rate limit).
pub const ANSWERED_BEFORE_FILTER: Metric = Metric(FLAG_BASE + FLAG_NAMES.len() as u16 + 3);
/// Correlation-store slots found written with another `correlation_buckets` x
/// `correlation_bucket_entries` than this side's (the inbound and outbound
/// configurations disagree).
pub const CORRELATION_BUCKETS_MISMATCH: Metric = Metric(FLAG_BASE + FLAG_NAMES.len() as u16 + 4);
/// Number of counters.
pub const COUNT: usize = FLAG_BASE as usize + FLAG_NAMES.len() + 5;

/// Counter of a tag source name ("request", "correlated", "environment", "none",
/// "malformed").
pub fn tag_metric(source: &str) -> Metric {
    let i = TAG_NAMES.iter().position(|n| *n == source).unwrap_or(3);
    Metric(TAG_BASE + i as u16)
}

/// Counter of a trace classification name (see `trace::class_name`).
pub fn trace_metric(class: &str) -> Option<Metric> {
    TRACE_NAMES
        .iter()
        .position(|n| *n == class)
        .map(|i| Metric(TRACE_BASE + i as u16))
}

/// Counter of response-flag bit `bit`.
pub fn flag_metric(bit: u32) -> Metric {
    if (bit as usize) < FLAG_NAMES.len() {
        Metric(FLAG_BASE + bit as u16)
    } else {
        FLAG_UNKNOWN
    }
}

/// All counter names for one direction, indexed by [`Metric`].
pub fn names(direction: &str) -> Vec<String> {
    let p = |s: &str| {
        let mut n = String::from("hopwatch.");
        n.push_str(direction);
        n.push('.');
        n.push_str(s);
        n
    };
    let mut v = vec![
        p("hops_reported"),
        p("reports_dropped"),
        p("batches_sent"),
        p("batches_failed"),
        p("correlation_write_failures"),
        p("hops_seen"),
    ];
    for t in TAG_NAMES {
        v.push(p(&(String::from("tag.") + t)));
    }
    for t in TRACE_NAMES {
        v.push(p(&(String::from("trace.") + t)));
    }
    for f in FLAG_NAMES {
        v.push(p(&(String::from("response_flag.") + f)));
    }
    v.push(p("response_flag.unknown"));
    v.push(p("responses_flagged"));
    v.push(p("grpc_errors"));
    v.push(p("answered_before_filter"));
    v.push(p("correlation_buckets_mismatch"));
    v
}
