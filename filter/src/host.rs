//! What the filter logic needs from the proxy, as a trait: shared data, properties,
//! request headers (re-read at the end of the stream), time and counters.
//!
//! The wasm glue implements it with proxy-wasm host calls; tests implement it with a
//! fake host that also counts calls.

use crate::metrics::Metric;

/// Result of a compare-and-swap write to shared data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetStatus {
    /// Written.
    Ok,
    /// Someone else wrote since our read: re-read and retry.
    CasMismatch,
    /// Any other failure (not retried).
    Failed,
}

/// Host services used by the pure filter logic.
pub trait Host {
    /// Shared data value and its CAS token (`None`: key absent).
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Writes shared data if its CAS token is still `cas` (0: unconditionally).
    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> SetStatus;
    /// A property (attribute) of the current stream or of the node.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// One request header, re-read now (used at the end of the stream).
    fn request_header(&self, name: &str) -> Option<String>;
    /// Wall clock, nanoseconds since the Unix epoch.
    fn now_nanos(&self) -> u64;
    /// Adds `by` to a counter.
    fn count(&self, metric: Metric, by: u64);
}

/// Decodes an integer attribute (8 little-endian bytes).
pub fn prop_u64(bytes: Option<Vec<u8>>) -> u64 {
    match bytes {
        Some(b) => {
            let mut a = [0u8; 8];
            for (dst, src) in a.iter_mut().zip(b.iter()) {
                *dst = *src;
            }
            u64::from_le_bytes(a)
        }
        None => 0,
    }
}

/// Decodes a string attribute (lossy UTF-8).
pub fn prop_string(bytes: Option<Vec<u8>>) -> String {
    match bytes {
        Some(b) => match String::from_utf8(b) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        },
        None => String::new(),
    }
}
