//! Trace ids of other tracers' headers: SkyWalking `sw8`, Jaeger `uber-trace-id`,
//! Datadog `x-datadog-trace-id`.
//!
//! Why: many apps in the field propagate only their own tracer's context (a SkyWalking,
//! Jaeger or Datadog agent) and none of B3, W3C or `x-request-id`; their trace id is then
//! the one id that follows the call chain across the app, so hopwatch uses it as a
//! correlation id (tag restore, PROPAGATED vs NEW) and reports it for the collector's
//! joins. As for B3 and W3C, a malformed value is data (a reason string), never an error.

use std::borrow::Cow;

/// Longest decoded trace id kept (SkyWalking ids are ~50 characters).
pub const MAX_ID_LEN: usize = 128;

fn b64_val(c: u8) -> Option<u32> {
    match c {
        b'A'..=b'Z' => Some(u32::from(c - b'A')),
        b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
        b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

/// Standard base64 (RFC 4648, `+/`), padding optional. `None` for any other character,
/// misplaced padding or an impossible length.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let body = s.trim_end_matches('=');
    if s.len() - body.len() > 2 || body.len() % 4 == 1 {
        return None;
    }
    if s.len() != body.len() && !s.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in body.bytes() {
        acc = (acc << 6) | b64_val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// The trace id of an `sw8` header (SkyWalking cross-process propagation, v3):
/// `sample-traceId-segmentId-spanId-service-instance-endpoint-target`, the second field
/// base64 of the id. The id must decode to 1 to [`MAX_ID_LEN`] printable ASCII bytes.
pub fn sw8_trace_id(v: &str) -> Result<String, &'static str> {
    let v = v.trim_ascii();
    let fields: Vec<&str> = v.split('-').collect();
    let [sample, trace, ..] = fields.as_slice() else {
        return Err("sw8: too few fields");
    };
    if fields.len() != 8 {
        return Err("sw8: not 8 fields");
    }
    if *sample != "0" && *sample != "1" {
        return Err("sw8: bad sample flag");
    }
    let id = base64_decode(trace).ok_or("sw8: trace id not base64")?;
    if id.is_empty() || id.len() > MAX_ID_LEN || !id.iter().all(|b| b.is_ascii_graphic()) {
        return Err("sw8: trace id not printable");
    }
    String::from_utf8(id).map_err(|_| "sw8: trace id not printable")
}

fn hex_id(v: &str, max: usize) -> Result<Cow<'_, str>, &'static str> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("not hex");
    }
    if v.len() > max {
        return Err("too long");
    }
    if v.bytes().all(|b| b == b'0') {
        return Err("all-zero id");
    }
    Ok(if v.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(v.to_ascii_lowercase())
    } else {
        Cow::Borrowed(v)
    })
}

/// The trace id of an `uber-trace-id` header (Jaeger):
/// `{trace-id}:{span-id}:{parent-span-id}:{flags}`, ids in hex. Jaeger clients drop
/// leading zeros ("short ids"), so the id is left-padded to 16 or 32 digits: the same
/// trace then has one key whoever printed it. Colons sent percent-encoded (`%3A`, as
/// some clients do in URL-safe contexts) are accepted.
pub fn uber_trace_id(v: &str) -> Result<String, &'static str> {
    let v = v.trim_ascii();
    let decoded;
    let v = if !v.contains(':') && (v.contains("%3A") || v.contains("%3a")) {
        decoded = v.replace("%3A", ":").replace("%3a", ":");
        decoded.as_str()
    } else {
        v
    };
    let mut parts = v.split(':');
    let (Some(trace), Some(span), Some(parent), Some(flags), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err("uber-trace-id: not 4 fields");
    };
    let trace = hex_id(trace, 32).map_err(|e| match e {
        "not hex" => "uber-trace-id: trace id not hex",
        "too long" => "uber-trace-id: trace id longer than 32 digits",
        _ => "uber-trace-id: all-zero trace id",
    })?;
    hex_id(span, 16).map_err(|_| "uber-trace-id: bad span id")?;
    if parent.is_empty() || parent.len() > 16 || !parent.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("uber-trace-id: bad parent span id");
    }
    if flags.is_empty() || flags.len() > 2 || !flags.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("uber-trace-id: bad flags");
    }
    let width = if trace.len() <= 16 { 16 } else { 32 };
    let mut id = String::with_capacity(width);
    for _ in trace.len()..width {
        id.push('0');
    }
    id.push_str(&trace);
    Ok(id)
}

/// The trace id of an `x-datadog-trace-id` header: an unsigned 64-bit decimal, not zero
/// (the low 64 bits of the trace id; Datadog keeps the high ones in `x-datadog-tags`).
/// Returned without leading zeros.
pub fn datadog_trace_id(v: &str) -> Result<String, &'static str> {
    let v = v.trim_ascii();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err("x-datadog-trace-id: not a decimal number");
    }
    match v.parse::<u64>() {
        Ok(0) => Err("x-datadog-trace-id: zero"),
        Ok(n) => {
            let mut s = String::new();
            crate::flags::push_u64(&mut s, n);
            Ok(s)
        }
        Err(_) => Err("x-datadog-trace-id: larger than 64 bits"),
    }
}
