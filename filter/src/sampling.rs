//! Report sampling: decided from the trace id, so every hop of a trace agrees.
//!
//! The key is the low 64 bits of the trace id (its last 16 hex digits), so a 64-bit B3
//! id and the same id widened to 128 bits (as Envoy does) give the same decision. Trace
//! ids are random, so comparing the key against `rate * 2^64` samples that fraction of
//! traces. Without a trace id (a mesh with no tracer, Istio's default) the request id's
//! correlation key ([`crate::trace::request_id_key`]) is hashed instead (FNV-1a), so the
//! hops of an `x-request-id`-only chain agree too although Envoy's UUID extension
//! rewrites one digit of the id from hop to hop.

/// FNV-1a 64-bit hash (stable across hosts, no random seed).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The 64-bit sampling key of a trace id / request id.
pub fn key(trace_id: &str, request_id: &str) -> u64 {
    if trace_id.len() >= 16 {
        let tail = trace_id.get(trace_id.len() - 16..).unwrap_or_default();
        if let Some(v) = hex_u64(tail.as_bytes()) {
            return v;
        }
    }
    if !trace_id.is_empty() {
        return fnv1a(trace_id.as_bytes());
    }
    fnv1a(request_id.as_bytes())
}

/// Whether a trace is sampled at `rate` (in `[0, 1]`).
pub fn sampled(rate: f64, trace_id: &str, request_id: &str) -> bool {
    if rate >= 1.0 {
        return true;
    }
    if rate <= 0.0 || rate.is_nan() {
        return false;
    }
    // 53 significant bits are plenty for a fraction.
    let k = (key(trace_id, request_id) >> 11) as f64 / (1u64 << 53) as f64;
    k < rate
}

/// The value of 16 hex digits (any case); `None` if one is not a hex digit.
fn hex_u64(digits: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    for &b in digits {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return None,
        };
        v = (v << 4) | u64::from(d);
    }
    Some(v)
}
