//! Rendering for the `hopwatch` CLI: aligned tables, the call tree, and the stable JSON
//! shapes (`breaks --output json` is an array of break objects).

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use hopwatch_proto::v1::{
    Break, BreakKind, CallNode, Direction, GetTraceResponse, Hop, Protocol, Sampled, Severity,
    SummaryResponse, TagSource, TraceContext,
};
use serde_json::{json, Value};

/// Parses a break kind name (case-insensitive), listing the valid ones on error.
pub fn parse_kind(s: &str) -> Result<BreakKind, String> {
    BreakKind::from_str_name(&s.trim().to_ascii_uppercase().replace('-', "_"))
        .filter(|k| *k != BreakKind::Unspecified)
        .ok_or_else(|| {
            format!(
                "unknown kind '{s}'; valid kinds: {}",
                crate::server::valid_kinds().join(", ")
            )
        })
}

/// A break kind's name ("UNKNOWN" for a value this build does not know).
pub fn kind_str(k: i32) -> &'static str {
    kind_name(k)
}

/// A severity's name.
pub fn severity_str(s: i32) -> &'static str {
    severity_name(s)
}

fn kind_name(k: i32) -> &'static str {
    BreakKind::try_from(k)
        .map(|k| k.as_str_name())
        .unwrap_or("UNKNOWN")
}
fn severity_name(s: i32) -> &'static str {
    Severity::try_from(s)
        .map(|k| k.as_str_name())
        .unwrap_or("UNKNOWN")
}
/// Enum names without their prefix: TRACE_CONTEXT_VALID -> VALID.
fn short<'a>(name: &'a str, prefix: &str) -> &'a str {
    name.strip_prefix(prefix).unwrap_or(name)
}
fn tag_source_name(v: i32) -> &'static str {
    short(
        TagSource::try_from(v)
            .unwrap_or(TagSource::Unspecified)
            .as_str_name(),
        "TAG_SOURCE_",
    )
}
fn trace_context_name(v: i32) -> &'static str {
    short(
        TraceContext::try_from(v)
            .unwrap_or(TraceContext::Unspecified)
            .as_str_name(),
        "TRACE_CONTEXT_",
    )
}
/// How a hop's protocol is shown: `HTTP/1.1`, `HTTP/2`, `gRPC`, or `HTTP` when the
/// filter did not read the version (healthy HTTP hops).
pub fn protocol_name(v: i32) -> &'static str {
    match Protocol::try_from(v).unwrap_or(Protocol::Unspecified) {
        Protocol::Unspecified | Protocol::Http => "HTTP",
        Protocol::Http1 => "HTTP/1.1",
        Protocol::Http2 => "HTTP/2",
        Protocol::Http3 => "HTTP/3",
        Protocol::Grpc => "gRPC",
    }
}

/// `UNAVAILABLE(14)` for a hop with a gRPC status.
fn grpc_status_label(h: &Hop) -> Option<String> {
    h.grpc_status
        .map(|g| format!("{}({g})", crate::grpc::code_name(g)))
}

fn direction_name(v: i32) -> &'static str {
    short(
        Direction::try_from(v)
            .unwrap_or(Direction::Unspecified)
            .as_str_name(),
        "DIRECTION_",
    )
}
fn sampled_name(v: i32) -> &'static str {
    short(
        Sampled::try_from(v)
            .unwrap_or(Sampled::Unspecified)
            .as_str_name(),
        "SAMPLED_",
    )
}

fn rfc3339(ms: u64) -> String {
    if ms == 0 {
        return String::new();
    }
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// A break as JSON (stable field names; enums by name).
pub fn break_json(b: &Break) -> Value {
    json!({
        "id": b.id,
        "kind": kind_name(b.kind),
        "severity": severity_name(b.severity),
        "workload": b.workload,
        "namespace": b.namespace,
        "peer": b.peer,
        "count": b.count,
        "trace_ids": b.trace_ids,
        "flags": b.flags,
        "summary": b.summary,
        "hint": b.hint,
        "first_seen": rfc3339(b.first_seen_unix_ms),
        "last_seen": rfc3339(b.last_seen_unix_ms),
        "first_seen_unix_ms": b.first_seen_unix_ms,
        "last_seen_unix_ms": b.last_seen_unix_ms,
    })
}

pub fn breaks_json(bs: &[Break]) -> Value {
    Value::Array(bs.iter().map(break_json).collect())
}

pub fn hop_json(h: &Hop) -> Value {
    json!({
        "direction": direction_name(h.direction),
        "workload": h.workload,
        "namespace": h.namespace,
        "pod": h.pod,
        "service": h.service,
        "own_tag": h.own_tag,
        "trace_id": h.trace_id,
        "span_id": h.span_id,
        "parent_span_id": h.parent_span_id,
        "upstream_span_id": h.upstream_span_id,
        "request_id": h.request_id,
        "sampled": sampled_name(h.sampled),
        "tag_received": h.tag_received,
        "tag_sent": h.tag_sent,
        "tag_source": tag_source_name(h.tag_source),
        "tag_malformed": h.tag_malformed,
        "correlated_tag": h.correlated_tag,
        "trace_context": trace_context_name(h.trace_context),
        "trace_detail": h.trace_detail,
        "missing_trace_headers": h.missing_trace_headers,
        "authority": h.authority,
        "method": h.method,
        "path": h.path,
        "response_code": h.response_code,
        "response_flags": h.response_flag_names,
        "response_code_details": h.response_code_details,
        "upstream_cluster": h.upstream_cluster,
        "upstream_host": h.upstream_host,
        "downstream_local_address": h.downstream_local_address,
        "route_name": h.route_name,
        "start_time_unix_micros": h.start_time_unix_micros,
        "duration_micros": h.duration_micros,
        "sampled_report": h.sampled_report,
        "protocol": protocol_name(h.protocol),
        "grpc_status": h.grpc_status.map(crate::grpc::code_name),
        "grpc_status_code": h.grpc_status,
        "grpc_message": h.grpc_message,
        "answered_before_filter": h.answered_before_filter,
    })
}

fn node_json(n: &CallNode) -> Value {
    json!({
        "call": call_label(n),
        "outbound": n.outbound.as_ref().map(hop_json),
        "inbound": n.inbound.as_ref().map(hop_json),
        "breaks": n.breaks.iter().map(|k| kind_name(*k)).collect::<Vec<_>>(),
        "earlier_attempts": n.earlier_attempts.iter().map(hop_json).collect::<Vec<_>>(),
        "children": n.children.iter().map(node_json).collect::<Vec<_>>(),
        "continued_at_depth": n.continued_at_depth,
    })
}

pub fn trace_json(t: &GetTraceResponse) -> Value {
    json!({
        "trace_id": t.trace_id,
        "open": t.open,
        "hop_count": t.hop_count,
        "roots": t.roots.iter().map(node_json).collect::<Vec<_>>(),
        "breaks": breaks_json(&t.breaks),
        "fragments": t.fragments.iter().map(|f| json!({
            "trace_id": f.trace_id,
            "relation": f.relation,
            "request_id": f.request_id,
        })).collect::<Vec<_>>(),
    })
}

pub fn summary_json(s: &SummaryResponse) -> Value {
    json!({
        "hops_received": s.hops_received,
        "traces_analysed": s.traces_analysed,
        "open_traces": s.open_traces,
        "findings": s.findings,
        "reports_dropped_by_filters": s.reports_dropped_by_filters,
        "workloads": s.workloads.iter().map(|w| {
            let mut flags: Vec<(&String, &u64)> = w.flags.iter().collect();
            flags.sort();
            json!({
                "namespace": w.namespace,
                "workload": w.workload,
                "hops": w.hops,
                "inbound_hops": w.inbound_hops,
                "outbound_hops": w.outbound_hops,
                "errors": w.errors,
                "breaks": w.breaks,
                "flags": flags.into_iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
            })
        }).collect::<Vec<_>>(),
    })
}

/// How tables are rendered: fitted to a width, coloured, or wide.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Style {
    /// Fit each line into this many columns by truncating the last column (`None`: no
    /// limit, e.g. output to a pipe or a file).
    pub width: Option<usize>,
    /// ANSI colour for severities.
    pub color: bool,
    /// `-o wide`: more columns, nothing truncated.
    pub wide: bool,
}

/// The ANSI colour of a severity name (ERROR red, WARNING yellow, INFO cyan).
fn severity_color(s: &str) -> Option<&'static str> {
    match s {
        "ERROR" => Some("\x1b[31m"),
        "WARNING" => Some("\x1b[33m"),
        "INFO" => Some("\x1b[36m"),
        _ => None,
    }
}

/// Truncates `s` to `max` characters, ending in "…" when cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Renders rows as an aligned table (the last column is not padded).
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    table_styled(header, rows, &Style::default())
}

/// [`table`] fitted to `style.width` (the last column is truncated, never below 10
/// characters) with column 0 coloured by severity when `style.color`.
pub fn table_styled(header: &[&str], rows: &[Vec<String>], style: &Style) -> String {
    let ncol = header.len();
    let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(ncol) {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let prefix: usize = w.iter().take(ncol.saturating_sub(1)).map(|x| x + 2).sum();
    let last_max = style.width.map(|t| t.saturating_sub(prefix).max(10));
    let mut out = String::new();
    let mut line = |cells: Vec<&str>, is_header: bool| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let painted = (style.color && !is_header && i == 0)
                .then(|| severity_color(c))
                .flatten();
            if i + 1 == cells.len() {
                match last_max {
                    Some(m) => s.push_str(&truncate(c, m)),
                    None => s.push_str(c),
                }
            } else {
                let pad = w[i] - c.chars().count();
                match painted {
                    Some(code) => {
                        s.push_str(code);
                        s.push_str(c);
                        s.push_str("\x1b[0m");
                    }
                    None => s.push_str(c),
                }
                s.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(header.to_vec(), true);
    for r in rows {
        line(r.iter().map(|s| s.as_str()).collect(), false);
    }
    out
}

fn ago(ms: u64, now_ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let s = now_ms.saturating_sub(ms) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

pub fn breaks_table(bs: &[Break], now_ms: u64) -> String {
    breaks_table_styled(bs, now_ms, &Style::default())
}

/// `hopwatch breaks` as a table; `style.wide` adds FIRST SEEN, TRACE (the newest sample
/// trace id) and HINT columns and truncates nothing.
pub fn breaks_table_styled(bs: &[Break], now_ms: u64, style: &Style) -> String {
    if bs.is_empty() {
        return "no breaks found\n".into();
    }
    let rows: Vec<Vec<String>> = bs
        .iter()
        .map(|b| {
            let mut r = vec![
                severity_name(b.severity).to_string(),
                kind_name(b.kind).to_string(),
                dash(&b.namespace),
                dash(&b.workload),
                dash(&b.peer),
                b.count.to_string(),
                if b.flags.is_empty() {
                    "-".into()
                } else {
                    b.flags.join(",")
                },
                ago(b.last_seen_unix_ms, now_ms),
            ];
            if style.wide {
                r.push(ago(b.first_seen_unix_ms, now_ms));
                r.push(dash(b.trace_ids.first().map(String::as_str).unwrap_or("")));
                r.push(b.summary.clone());
                r.push(b.hint.clone());
            } else {
                r.push(b.summary.clone());
            }
            r
        })
        .collect();
    let mut header = vec![
        "SEVERITY",
        "KIND",
        "NAMESPACE",
        "WORKLOAD",
        "PEER",
        "COUNT",
        "FLAGS",
        "LAST SEEN",
    ];
    if style.wide {
        header.extend(["FIRST SEEN", "TRACE", "SUMMARY", "HINT"]);
    } else {
        header.push("SUMMARY");
    }
    let style = Style {
        width: if style.wide { None } else { style.width },
        ..*style
    };
    table_styled(&header, &rows, &style)
}

pub fn summary_table(s: &SummaryResponse) -> String {
    summary_table_styled(s, &Style::default())
}

/// `hopwatch summary` as a table, the FLAGS column truncated to `style.width` unless wide.
pub fn summary_table_styled(s: &SummaryResponse, style: &Style) -> String {
    let mut out = format!(
        "hops received: {}  traces analysed: {}  open traces: {}  findings: {}  reports dropped by filters: {}\n\n",
        s.hops_received, s.traces_analysed, s.open_traces, s.findings, s.reports_dropped_by_filters
    );
    if s.workloads.is_empty() {
        out.push_str("no workloads reported yet\n");
        return out;
    }
    let rows: Vec<Vec<String>> = s
        .workloads
        .iter()
        .map(|w| {
            let mut flags: Vec<String> = w.flags.iter().map(|(k, v)| format!("{k}:{v}")).collect();
            flags.sort();
            vec![
                dash(&w.namespace),
                dash(&w.workload),
                w.hops.to_string(),
                w.inbound_hops.to_string(),
                w.outbound_hops.to_string(),
                w.errors.to_string(),
                w.breaks.to_string(),
                if flags.is_empty() {
                    "-".into()
                } else {
                    flags.join(" ")
                },
            ]
        })
        .collect();
    let style = Style {
        width: if style.wide { None } else { style.width },
        color: false,
        wide: style.wide,
    };
    out.push_str(&table_styled(
        &[
            "NAMESPACE",
            "WORKLOAD",
            "HOPS",
            "INBOUND",
            "OUTBOUND",
            "ERRORS",
            "BREAKS",
            "FLAGS",
        ],
        &rows,
        &style,
    ));
    out
}

/// "caller → callee" for a call node.
pub fn call_label(n: &CallNode) -> String {
    match (&n.outbound, &n.inbound) {
        (Some(o), Some(i)) => format!("{} → {}", o.workload, i.workload),
        (Some(o), None) => {
            let dest = crate::model::destination(&o.upstream_cluster, &o.authority).0;
            let dest = if dest.is_empty() {
                o.authority.clone()
            } else {
                dest
            };
            format!("{} → {} (no inbound hop)", o.workload, dest)
        }
        (None, Some(i)) => format!("→ {} (edge)", i.workload),
        (None, None) => "?".into(),
    }
}

fn node_line(n: &CallNode) -> String {
    let mut s = call_label(n);
    let h = n.outbound.as_ref().or(n.inbound.as_ref());
    if let Some(h) = h {
        let _ = write!(s, "  {}", protocol_name(h.protocol));
        if !h.method.is_empty() || !h.path.is_empty() {
            let _ = write!(s, " {} {}", h.method, h.path);
        }
        // The code the caller saw (outbound), else the callee's.
        let _ = write!(
            s,
            "  {}",
            if h.response_code == 0 {
                "-".to_string()
            } else {
                h.response_code.to_string()
            }
        );
        if let Some(g) = grpc_status_label(h) {
            let _ = write!(s, " grpc={g}");
        }
        if h.duration_micros > 0 {
            let _ = write!(s, " {:.1}ms", h.duration_micros as f64 / 1000.0);
        }
        let flags: Vec<&String> = n
            .outbound
            .iter()
            .chain(n.inbound.iter())
            .flat_map(|h| h.response_flag_names.iter())
            .collect();
        if !flags.is_empty() {
            let _ = write!(
                s,
                " {}",
                flags
                    .iter()
                    .map(|f| f.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            );
        }
        if n.outbound
            .iter()
            .chain(n.inbound.iter())
            .any(|h| h.answered_before_filter)
        {
            s.push_str(" (answered before hopwatch)");
        }
        let tag = match (&n.outbound, &n.inbound) {
            (Some(o), _) => format!(
                "tag={} ({})",
                dash(&o.tag_sent),
                tag_source_name(o.tag_source)
            ),
            // An inbound hop whose tag came from baggage or an alias: say so (its tag
            // header was empty).
            (None, Some(i)) if !i.tag_sent.is_empty() && i.tag_received.is_empty() => {
                format!("tag={} ({})", i.tag_sent, tag_source_name(i.tag_source))
            }
            (None, Some(i)) => format!("tag={}", dash(&i.tag_received)),
            _ => String::new(),
        };
        let _ = write!(s, "  {tag}  trace={}", trace_context_name(h.trace_context));
    }
    if !n.earlier_attempts.is_empty() {
        let earlier: Vec<String> = n
            .earlier_attempts
            .iter()
            .map(|a| {
                let flags = a.response_flag_names.join(",");
                if flags.is_empty() {
                    a.response_code.to_string()
                } else {
                    format!("{} {flags}", a.response_code)
                }
            })
            .collect();
        let _ = write!(
            s,
            "  ({} attempts, earlier: {})",
            n.earlier_attempts.len() + 1,
            earlier.join("; ")
        );
    }
    for k in &n.breaks {
        let _ = write!(s, "  ✗ {}", kind_name(*k));
    }
    s
}

/// The call tree, indented, breaks marked with ✗.
pub fn trace_tree(t: &GetTraceResponse) -> String {
    let mut out = format!(
        "trace {} ({}, {} hops)\n",
        t.trace_id,
        if t.open { "open" } else { "analysed" },
        t.hop_count
    );
    fn walk(n: &CallNode, prefix: &str, last: bool, root: bool, out: &mut String) {
        if root {
            // A subtree the collector cut off a chain too deep to send in one piece.
            if n.continued_at_depth > 0 {
                let _ = write!(out, "… continued at depth {}: ", n.continued_at_depth);
            }
            out.push_str(&node_line(n));
        } else {
            out.push_str(prefix);
            out.push_str(if last { "└─ " } else { "├─ " });
            out.push_str(&node_line(n));
        }
        out.push('\n');
        let child_prefix = if root {
            String::new()
        } else {
            format!("{prefix}{}", if last { "   " } else { "│  " })
        };
        for (i, c) in n.children.iter().enumerate() {
            walk(c, &child_prefix, i + 1 == n.children.len(), false, out);
        }
    }
    for r in &t.roots {
        walk(r, "", true, true, &mut out);
    }
    if !t.breaks.is_empty() {
        out.push_str("\nbreaks:\n");
        for b in &t.breaks {
            let _ = writeln!(
                out,
                "  ✗ {} {} {}/{}{}: {}\n    hint: {}",
                severity_name(b.severity),
                kind_name(b.kind),
                b.namespace,
                b.workload,
                if b.peer.is_empty() {
                    String::new()
                } else {
                    format!(" → {}", b.peer)
                },
                b.summary,
                b.hint
            );
        }
    }
    if !t.fragments.is_empty() {
        out.push_str("\nfragments of the same requests (hopwatch trace ID):\n");
        for f in &t.fragments {
            let _ = writeln!(
                out,
                "  {} {} (x-request-id {})",
                if f.relation == "continued_from" {
                    "continued from"
                } else {
                    "continued in"
                },
                f.trace_id,
                f.request_id
            );
        }
    }
    out
}

/// One line per break for `watch`.
pub fn watch_line(b: &Break) -> String {
    format!(
        "{} {} {} {}/{}{} (count {}): {}",
        rfc3339(b.last_seen_unix_ms),
        severity_name(b.severity),
        kind_name(b.kind),
        b.namespace,
        b.workload,
        if b.peer.is_empty() {
            String::new()
        } else {
            format!(" → {}", b.peer)
        },
        b.count,
        b.summary
    )
}

#[cfg(test)]
mod routing_key_tests {
    use super::*;
    use hopwatch_proto::v1::{CallNode, Hop};

    #[test]
    fn inbound_tag_found_in_an_alias_is_shown_with_its_source() {
        let inbound = Hop {
            workload: "alpha".into(),
            tag_sent: "dev.proj1".into(),
            tag_source: TagSource::AliasCookie as i32,
            ..Hop::default()
        };
        let n = CallNode {
            inbound: Some(inbound.clone()),
            ..CallNode::default()
        };
        assert!(
            node_line(&n).contains("tag=dev.proj1 (ALIAS_COOKIE)"),
            "{}",
            node_line(&n)
        );
        // A tag that came in the header is shown as before.
        let header = Hop {
            tag_received: "dev.proj1".into(),
            tag_source: TagSource::Request as i32,
            ..inbound
        };
        let n = CallNode {
            inbound: Some(header),
            ..CallNode::default()
        };
        assert!(
            node_line(&n).contains("tag=dev.proj1 "),
            "{}",
            node_line(&n)
        );
        assert!(!node_line(&n).contains("REQUEST"), "{}", node_line(&n));
    }
}
