//! Trace-context parsing and classification (B3 multi headers, the single `b3` header,
//! W3C `traceparent`, and `x-request-id`).
//!
//! Malformed headers are data, never errors: the request always goes on; the
//! classification and a human-readable detail end up in the hop report.

use std::borrow::Cow;

use hopwatch_proto::v1::{Sampled, TraceContext};

/// Trace headers of a request, borrowed from its serialized header map (filled by
/// [`crate::headers::RequestView::parse`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct TraceHeaders<'a> {
    /// `x-b3-traceid`
    pub b3_trace_id: Option<&'a str>,
    /// `x-b3-spanid`
    pub b3_span_id: Option<&'a str>,
    /// `x-b3-parentspanid`
    pub b3_parent_span_id: Option<&'a str>,
    /// `x-b3-sampled`
    pub b3_sampled: Option<&'a str>,
    /// `x-b3-flags`
    pub b3_flags: Option<&'a str>,
    /// single `b3`
    pub b3_single: Option<&'a str>,
    /// `traceparent`
    pub traceparent: Option<&'a str>,
    /// `x-request-id`
    pub request_id: Option<&'a str>,
    /// `sw8` (SkyWalking)
    pub sw8: Option<&'a str>,
    /// `uber-trace-id` (Jaeger)
    pub uber_trace_id: Option<&'a str>,
    /// `x-datadog-trace-id` (Datadog)
    pub datadog_trace_id: Option<&'a str>,
}

impl<'a> TraceHeaders<'a> {
    /// Names of the checked trace headers absent from the request.
    pub fn missing(&self) -> Vec<String> {
        [
            ("x-b3-traceid", self.b3_trace_id),
            ("x-b3-spanid", self.b3_span_id),
            ("x-b3-sampled", self.b3_sampled),
            ("b3", self.b3_single),
            ("traceparent", self.traceparent),
            ("x-request-id", self.request_id),
        ]
        .iter()
        .filter(|(_, v)| v.is_none())
        .map(|(k, _)| (*k).to_string())
        .collect()
    }
}

/// The parsed and classified trace context of one request, borrowing from its headers.
///
/// Ids are borrowed when they arrive as lowercase hex (the norm) and copied only to
/// lowercase them, so classifying a request allocates nothing in the common case: it
/// runs on every request, while the owned copies a report needs are made only for the
/// hops that are reported.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TraceInfo<'a> {
    /// B3 trace id (multi, else single `b3`), else the W3C one; lowercase hex. Empty if
    /// none could be parsed.
    pub trace_id: Cow<'a, str>,
    /// B3 trace id only (key of the correlation store).
    pub b3_trace_id: Cow<'a, str>,
    /// W3C trace id from `traceparent`.
    pub w3c_trace_id: Cow<'a, str>,
    /// Span id (same source as `trace_id`).
    pub span_id: Cow<'a, str>,
    /// Parent span id (B3 only).
    pub parent_span_id: Cow<'a, str>,
    /// Sampling decision as received.
    pub sampled: Sampled,
    /// `x-request-id` trimmed, at most [`MAX_REQUEST_ID_LEN`] bytes.
    pub request_id: Cow<'a, str>,
    /// VALID / MISSING / PARTIAL / MALFORMED / INCONSISTENT (the outbound side turns
    /// VALID into PROPAGATED or NEW).
    pub class: TraceContext,
    /// Reason for MALFORMED / INCONSISTENT / PARTIAL.
    pub detail: Cow<'static, str>,
    /// Other tracers' trace ids (see [`crate::tracers`]), empty when absent or
    /// malformed: the decoded `sw8` trace id, the `uber-trace-id` one (padded hex), the
    /// `x-datadog-trace-id` one (decimal).
    pub other: OtherIds,
}

/// Trace ids of other tracers' headers, each empty when absent or malformed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OtherIds {
    /// SkyWalking trace id (decoded from `sw8`).
    pub sw8: String,
    /// Jaeger trace id (from `uber-trace-id`, padded to 16 or 32 hex digits).
    pub uber: String,
    /// Datadog trace id (`x-datadog-trace-id`, decimal).
    pub datadog: String,
}

impl OtherIds {
    /// The first present id (sw8, uber, datadog), for sampling when the request has no
    /// B3 / W3C trace id.
    pub fn first(&self) -> &str {
        [&self.sw8, &self.uber, &self.datadog]
            .into_iter()
            .find(|s| !s.is_empty())
            .map(String::as_str)
            .unwrap_or_default()
    }
}

impl TraceInfo<'_> {
    /// The same, owning its strings.
    pub fn into_owned(self) -> TraceInfo<'static> {
        TraceInfo {
            trace_id: Cow::Owned(self.trace_id.into_owned()),
            b3_trace_id: Cow::Owned(self.b3_trace_id.into_owned()),
            w3c_trace_id: Cow::Owned(self.w3c_trace_id.into_owned()),
            span_id: Cow::Owned(self.span_id.into_owned()),
            parent_span_id: Cow::Owned(self.parent_span_id.into_owned()),
            sampled: self.sampled,
            request_id: Cow::Owned(self.request_id.into_owned()),
            class: self.class,
            detail: self.detail,
            other: self.other,
        }
    }
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn all_zero(s: &str) -> bool {
    s.bytes().all(|b| b == b'0')
}

/// Checks an id of one of the allowed lengths; returns it lowercased or a reason.
///
/// One pass over the bytes (hex? any non-zero digit? any uppercase?): this runs for
/// every id of every request.
fn check_id<'a>(v: &'a str, lens: &[usize]) -> Result<Cow<'a, str>, &'static str> {
    let (mut hex, mut nonzero, mut upper) = (!v.is_empty(), false, false);
    for &b in v.as_bytes() {
        match b {
            b'0' => {}
            b'1'..=b'9' | b'a'..=b'f' => nonzero = true,
            b'A'..=b'F' => {
                nonzero = true;
                upper = true;
            }
            _ => {
                hex = false;
                break;
            }
        }
    }
    if !hex {
        return Err("not hex");
    }
    if !lens.contains(&v.len()) {
        return Err("wrong length");
    }
    if !nonzero {
        return Err("all-zero id");
    }
    Ok(if upper {
        Cow::Owned(v.to_ascii_lowercase())
    } else {
        Cow::Borrowed(v)
    })
}

fn id_field<'a>(
    name: &str,
    v: Option<&'a str>,
    lens: &[usize],
    bad: &mut Option<Cow<'static, str>>,
) -> Cow<'a, str> {
    match v {
        None => Cow::Borrowed(""),
        Some(v) => match check_id(v.trim_ascii(), lens) {
            Ok(id) => id,
            Err(why) => {
                if bad.is_none() {
                    *bad = Some(Cow::Owned(join3(name, ": ", why)));
                }
                Cow::Borrowed("")
            }
        },
    }
}

fn join3(a: &str, b: &str, c: &str) -> String {
    let mut s = String::with_capacity(a.len() + b.len() + c.len());
    s.push_str(a);
    s.push_str(b);
    s.push_str(c);
    s
}

/// Whether a B3 trace id (64 or 128 bits) is the W3C one: a 64-bit id is compared
/// right-aligned to 128 bits (zero-padded on the left).
fn same_trace(b3: &str, w3c: &str) -> bool {
    if b3.len() == 16 && w3c.len() == 32 {
        w3c.get(..16).is_some_and(all_zero) && w3c.get(16..) == Some(b3)
    } else {
        b3 == w3c
    }
}

struct Single<'a> {
    trace: Cow<'a, str>,
    span: Cow<'a, str>,
    parent: Cow<'a, str>,
    sampled: Sampled,
}

fn parse_single(v: &str) -> Result<Single<'_>, &'static str> {
    let v = v.trim_ascii();
    let sampling = |s: &str| match s {
        "1" => Ok(Sampled::Yes),
        "0" => Ok(Sampled::No),
        "d" => Ok(Sampled::Debug),
        _ => Err("b3: bad sampling state"),
    };
    if v.len() == 1 {
        return Ok(Single {
            trace: Cow::Borrowed(""),
            span: Cow::Borrowed(""),
            parent: Cow::Borrowed(""),
            sampled: sampling(v)?,
        });
    }
    let mut parts = v.split('-');
    let trace = parts.next().unwrap_or_default();
    let span = parts.next().ok_or("b3: missing span id")?;
    let sampled = match parts.next() {
        Some(s) => sampling(s)?,
        None => Sampled::Unspecified,
    };
    let parent = parts.next().unwrap_or_default();
    if parts.next().is_some() {
        return Err("b3: too many fields");
    }
    let trace = check_id(trace, &[16, 32]).map_err(|e| match e {
        "not hex" => "b3: trace id not hex",
        "wrong length" => "b3: trace id wrong length",
        _ => "b3: all-zero trace id",
    })?;
    let span = check_id(span, &[16]).map_err(|e| match e {
        "not hex" => "b3: span id not hex",
        "wrong length" => "b3: span id wrong length",
        _ => "b3: all-zero span id",
    })?;
    let parent = if parent.is_empty() {
        Cow::Borrowed("")
    } else {
        check_id(parent, &[16]).map_err(|_| "b3: bad parent span id")?
    };
    Ok(Single {
        trace,
        span,
        parent,
        sampled,
    })
}

struct W3c<'a> {
    trace: Cow<'a, str>,
    parent: Cow<'a, str>,
    sampled: Sampled,
}

fn parse_traceparent(v: &str) -> Result<W3c<'_>, &'static str> {
    let v = v.trim_ascii();
    let mut parts = v.split('-');
    let (Some(version), Some(trace), Some(parent), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("traceparent: too few fields");
    };
    if version.len() != 2 || !is_hex(version) || version.eq_ignore_ascii_case("ff") {
        return Err("traceparent: bad version");
    }
    if version == "00" && parts.next().is_some() {
        return Err("traceparent: too many fields for version 00");
    }
    let trace = check_id(trace, &[32]).map_err(|e| match e {
        "not hex" => "traceparent: trace id not hex",
        "wrong length" => "traceparent: trace id wrong length",
        _ => "traceparent: all-zero trace id",
    })?;
    let parent = check_id(parent, &[16]).map_err(|e| match e {
        "not hex" => "traceparent: parent id not hex",
        "wrong length" => "traceparent: parent id wrong length",
        _ => "traceparent: all-zero parent id",
    })?;
    if flags.len() != 2 || !is_hex(flags) {
        return Err("traceparent: bad flags");
    }
    let sampled = if flags.ends_with(['1', '3', '5', '7', '9', 'b', 'd', 'f', 'B', 'D', 'F']) {
        Sampled::Yes
    } else {
        Sampled::No
    };
    Ok(W3c {
        trace,
        parent,
        sampled,
    })
}

/// The correlation key of an `x-request-id`: for a UUID, the version nibble (char 14)
/// is reset to `4`. Envoy's UUID request-id extension stores its trace decision there
/// (`9` sampled, `a` client-forced, `b` forced) and may rewrite it on every hop, so the
/// same request id can arrive with different values of that character.
pub fn request_id_key(rid: &str) -> Cow<'_, str> {
    let b = rid.as_bytes();
    let dashes = [8usize, 13, 18, 23]
        .iter()
        .all(|&i| b.get(i) == Some(&b'-'));
    if b.len() == 36
        && dashes
        && b.get(14) != Some(&b'4')
        && rid.is_char_boundary(14)
        && rid.is_char_boundary(15)
    {
        let mut k = String::with_capacity(36);
        k.push_str(rid.get(..14).unwrap_or_default());
        k.push('4');
        k.push_str(rid.get(15..).unwrap_or_default());
        return Cow::Owned(k);
    }
    Cow::Borrowed(rid)
}

/// The detail of an INCONSISTENT context whose B3 and W3C trace ids differ. Each may be
/// valid on its own: two tracers (e.g. a client's OpenTelemetry SDK and the sidecars'
/// Zipkin) each keep their own trace. Whether that is an app's fault is decided from
/// what the inbound request carried (see `filter`).
pub const B3_W3C_DISAGREE: &str = "B3 trace id disagrees with traceparent";

/// Longest request id kept in reports / the correlation store.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// `s` cut to at most `max` bytes on a char boundary.
pub fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

/// Parses and classifies the trace context. The result's class is one of VALID,
/// MISSING, PARTIAL, MALFORMED, INCONSISTENT.
pub fn classify<'a>(h: &TraceHeaders<'a>) -> TraceInfo<'a> {
    let mut info = TraceInfo {
        request_id: h
            .request_id
            .map(|r| Cow::Borrowed(cut(r.trim_ascii(), MAX_REQUEST_ID_LEN)))
            .unwrap_or_default(),
        ..TraceInfo::default()
    };
    let mut bad: Option<Cow<'static, str>> = None;

    // B3 multi.
    let m_trace = id_field("x-b3-traceid", h.b3_trace_id, &[16, 32], &mut bad);
    let m_span = id_field("x-b3-spanid", h.b3_span_id, &[16], &mut bad);
    let m_parent = id_field("x-b3-parentspanid", h.b3_parent_span_id, &[16], &mut bad);
    let mut sampled = Sampled::Unspecified;
    if let Some(s) = h.b3_sampled {
        match s.trim_ascii() {
            "1" | "true" => sampled = Sampled::Yes,
            "0" | "false" => sampled = Sampled::No,
            _ => {
                if bad.is_none() {
                    bad = Some(Cow::Borrowed("x-b3-sampled: bad value"));
                }
            }
        }
    }
    if let Some(f) = h.b3_flags {
        match f.trim_ascii() {
            "1" => sampled = Sampled::Debug,
            "0" => {}
            _ => {
                if bad.is_none() {
                    bad = Some(Cow::Borrowed("x-b3-flags: bad value"));
                }
            }
        }
    }
    // B3 single.
    let single = match h.b3_single.map(parse_single) {
        Some(Ok(s)) => Some(s),
        Some(Err(why)) => {
            if bad.is_none() {
                bad = Some(Cow::Borrowed(why));
            }
            None
        }
        None => None,
    };
    // W3C.
    let w3c = match h.traceparent.map(parse_traceparent) {
        Some(Ok(w)) => Some(w),
        Some(Err(why)) => {
            if bad.is_none() {
                bad = Some(Cow::Borrowed(why));
            }
            None
        }
        None => None,
    };

    // Ids for the report, whatever the class.
    if !m_trace.is_empty() {
        info.b3_trace_id = m_trace.clone();
        info.span_id = m_span.clone();
        info.parent_span_id = m_parent;
    } else if let Some(s) = single.as_ref().filter(|s| !s.trace.is_empty()) {
        info.b3_trace_id = s.trace.clone();
        info.span_id = s.span.clone();
        info.parent_span_id = s.parent.clone();
    }
    if let Some(w) = &w3c {
        info.w3c_trace_id = w.trace.clone();
    }
    if !info.b3_trace_id.is_empty() {
        info.trace_id = info.b3_trace_id.clone();
    } else if let Some(w) = &w3c {
        info.trace_id = w.trace.clone();
        info.span_id = w.parent.clone();
    }
    if sampled == Sampled::Unspecified {
        if let Some(s) = &single {
            sampled = s.sampled;
        }
    }
    if sampled == Sampled::Unspecified {
        if let Some(w) = &w3c {
            sampled = w.sampled;
        }
    }
    info.sampled = sampled;

    if let Some(why) = bad {
        info.class = TraceContext::Malformed;
        info.detail = why;
        return info;
    }

    // Partial B3 multi.
    let partial = match (h.b3_trace_id.is_some(), h.b3_span_id.is_some()) {
        (true, false) => Some("x-b3-traceid without x-b3-spanid"),
        (false, true) => Some("x-b3-spanid without x-b3-traceid"),
        (false, false) if h.b3_parent_span_id.is_some() => {
            Some("x-b3-parentspanid without x-b3-traceid")
        }
        (false, false)
            if (h.b3_sampled.is_some() || h.b3_flags.is_some())
                && single.as_ref().is_none_or(|s| s.trace.is_empty())
                && w3c.is_none() =>
        {
            Some("x-b3-sampled without x-b3-traceid")
        }
        _ => None,
    };
    if let Some(why) = partial {
        info.class = TraceContext::Partial;
        info.detail = Cow::Borrowed(why);
        return info;
    }

    // Inconsistent.
    if let Some(s) = single.as_ref().filter(|s| !s.trace.is_empty()) {
        if !m_trace.is_empty() && (s.trace != m_trace || s.span != m_span) {
            info.class = TraceContext::Inconsistent;
            info.detail = Cow::Borrowed("b3 disagrees with x-b3-traceid/x-b3-spanid");
            return info;
        }
    }
    if let Some(w) = &w3c {
        if !info.b3_trace_id.is_empty() && !same_trace(&info.b3_trace_id, &w.trace) {
            info.class = TraceContext::Inconsistent;
            info.detail = Cow::Borrowed(B3_W3C_DISAGREE);
            return info;
        }
    }

    // Other tracers: extra correlation ids; they decide the class only when there is no
    // B3 / W3C context (an app that propagates nothing else).
    let mut other_bad: Option<&'static str> = None;
    let mut keep = |r: Result<String, &'static str>| match r {
        Ok(id) => id,
        Err(why) => {
            other_bad.get_or_insert(why);
            String::new()
        }
    };
    if let Some(v) = h.sw8 {
        info.other.sw8 = keep(crate::tracers::sw8_trace_id(v));
    }
    if let Some(v) = h.uber_trace_id {
        info.other.uber = keep(crate::tracers::uber_trace_id(v));
    }
    if let Some(v) = h.datadog_trace_id {
        info.other.datadog = keep(crate::tracers::datadog_trace_id(v));
    }

    let has_ids = !info.trace_id.is_empty();
    if !has_ids && single.is_none() && h.b3_sampled.is_none() && h.b3_flags.is_none() {
        if !info.other.first().is_empty() {
            info.class = TraceContext::Valid;
            return info;
        }
        if let Some(why) = other_bad {
            info.class = TraceContext::Malformed;
            info.detail = Cow::Borrowed(why);
            return info;
        }
    }
    if !has_ids {
        if single.is_some() {
            info.class = TraceContext::Partial;
            info.detail = Cow::Borrowed("b3: sampling decision only");
        } else {
            info.class = TraceContext::Missing;
        }
        return info;
    }
    info.class = TraceContext::Valid;
    info
}

/// Uppercase name of a classification (as in the proto enum, without prefix), for
/// metrics and logs.
pub fn class_name(c: TraceContext) -> &'static str {
    match c {
        TraceContext::Unspecified => "unspecified",
        TraceContext::Valid => "valid",
        TraceContext::Propagated => "propagated",
        TraceContext::New => "new",
        TraceContext::Missing => "missing",
        TraceContext::Partial => "partial",
        TraceContext::Malformed => "malformed",
        TraceContext::Inconsistent => "inconsistent",
    }
}
