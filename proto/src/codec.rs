//! The gRPC codec of the generated services: prost, except that a message that does not
//! decode is answered INVALID_ARGUMENT ("malformed ReportRequest: ...", naming the field
//! prost stopped at) instead of tonic-prost's INTERNAL, and counted per message type
//! ([`decode_errors`]), so that a sender of garbage shows up on the collector's /metrics.
//!
//! Wired in by `proto/build.rs` (`codec_path`), for the servers and clients alike; the
//! counts are process-wide because tonic builds a codec per call with `Default`.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::ProstEncoder;

static REPORT_REQUEST_ERRORS: AtomicU64 = AtomicU64::new(0);
static OTHER_ERRORS: AtomicU64 = AtomicU64::new(0);

/// Messages that failed to decode in this process since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeErrors {
    /// `hopwatch.v1.ReportRequest` (the filters' batches).
    pub report_request: u64,
    /// Every other message type (queries; responses, on the client side).
    pub other: u64,
}

/// The decode failures counted so far.
pub fn decode_errors() -> DecodeErrors {
    DecodeErrors {
        report_request: REPORT_REQUEST_ERRORS.load(Relaxed),
        other: OTHER_ERRORS.load(Relaxed),
    }
}

/// The last path segment of a type name (`hopwatch_proto::v1::ReportRequest` ->
/// `ReportRequest`).
fn short_name<U>() -> &'static str {
    let full = std::any::type_name::<U>();
    full.rsplit("::").next().unwrap_or(full)
}

/// prost encoding, checked decoding (see the module docs).
#[derive(Debug, Clone)]
pub struct CheckedCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for CheckedCodec<T, U> {
    fn default() -> Self {
        CheckedCodec { _pd: PhantomData }
    }
}

impl<T, U> Codec for CheckedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = CheckedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        CheckedDecoder { _pd: PhantomData }
    }
}

/// Decodes `U`; a failure is INVALID_ARGUMENT naming the message and what failed.
#[derive(Debug, Clone)]
pub struct CheckedDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: Message + Default> Decoder for CheckedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        match U::decode(buf) {
            Ok(m) => Ok(Some(m)),
            Err(e) => {
                let name = short_name::<U>();
                if name == "ReportRequest" {
                    REPORT_REQUEST_ERRORS.fetch_add(1, Relaxed);
                } else {
                    OTHER_ERRORS.fetch_add(1, Relaxed);
                }
                Err(Status::invalid_argument(format!("malformed {name}: {e}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(short_name::<crate::v1::ReportRequest>(), "ReportRequest");
        assert_eq!(short_name::<u8>(), "u8");
    }
}
