//! gRPC replies: reading `grpc-status` / `grpc-message` from a serialized response header
//! or trailer map, and the protocol of a request.
//!
//! Why this matters: Envoy answers a gRPC request it fails itself (no healthy upstream,
//! connection refused, no route, ...) with a trailers-only HTTP **200** carrying
//! `grpc-status: 14` and its response flags; apps put their error status in the trailers.
//! A filter that looks only at `:status` sees every gRPC failure as a success. The glue
//! fetches the whole (small) header or trailer map in one host call and reads the status
//! here, so a gRPC reply costs one host call more than an HTTP one.

use hopwatch_proto::v1::Protocol;

use crate::headers::pairs;

/// Longest `grpc-message` kept (bytes): it is free text chosen by the app.
pub const MAX_MESSAGE_LEN: usize = 256;

/// `grpc-status` OK.
pub const OK: u32 = 0;

/// What a gRPC reply's header or trailer map says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    /// `:status` (0: absent, as in trailers).
    pub http_status: u64,
    /// `grpc-status`, when present and a number.
    pub status: Option<u32>,
    /// `grpc-message` (bounded, control characters replaced), only on a non-OK status.
    pub message: String,
}

/// Reads `:status`, `grpc-status` and (for a non-OK status) `grpc-message` from a
/// serialized header map (see [`crate::headers`]). Never fails: what is absent or
/// unreadable stays empty.
pub fn read_reply(map: &[u8]) -> Reply {
    let mut r = Reply::default();
    let mut message: Option<&[u8]> = None;
    for (k, v) in pairs(map) {
        match k {
            b":status" => r.http_status = crate::flags::parse_status(v),
            b"grpc-status" => r.status = parse_status(v),
            b"grpc-message" => message = Some(v),
            _ => {}
        }
    }
    if r.status.is_some_and(|s| s != OK) {
        r.message = message.map(bound_message).unwrap_or_default();
    }
    r
}

/// A `grpc-status` value: decimal digits (surrounding spaces allowed), at most 10 of them.
pub fn parse_status(v: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(v).ok()?.trim();
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `grpc-message` percent-decoded (gRPC sends it percent-encoded: `app%20error`),
/// bounded to [`MAX_MESSAGE_LEN`] bytes (on a character boundary), with control
/// characters replaced by spaces (it may be copied into a header value). A `%` not
/// followed by two hex digits is kept as is.
pub fn bound_message(v: &[u8]) -> String {
    let mut decoded = Vec::with_capacity(v.len().min(4 * MAX_MESSAGE_LEN));
    let mut bytes = v.iter().copied().take(4 * MAX_MESSAGE_LEN);
    let hex = |b: u8| char::from(b).to_digit(16);
    while let Some(b) = bytes.next() {
        if b != b'%' {
            decoded.push(b);
            continue;
        }
        let rest: Vec<u8> = bytes.clone().take(2).collect();
        match rest.as_slice() {
            [h, l] => match (hex(*h), hex(*l)) {
                (Some(h), Some(l)) => {
                    decoded.push((h * 16 + l) as u8);
                    bytes.next();
                    bytes.next();
                }
                _ => decoded.push(b),
            },
            _ => decoded.push(b),
        }
    }
    let s = String::from_utf8_lossy(&decoded);
    let mut out = String::with_capacity(s.len().min(MAX_MESSAGE_LEN));
    for c in s.chars() {
        if out.len() + c.len_utf8() > MAX_MESSAGE_LEN {
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
}

/// The protocol named by Envoy's `request.protocol` property (`HTTP/1.1`, `HTTP/2`, ...).
pub fn protocol_of(property: &[u8]) -> Protocol {
    match property {
        b"HTTP/1.0" | b"HTTP/1.1" => Protocol::Http1,
        b"HTTP/2" => Protocol::Http2,
        b"HTTP/3" => Protocol::Http3,
        _ => Protocol::Http,
    }
}
