//! `hopwatch.v1`: the hop reports the filter sends and the queries the collector answers.
//!
//! Message types are plain prost structs, usable from the wasm32 filter without tonic.
//! The `grpc` feature adds the tonic client/server code and [`FILE_DESCRIPTOR_SET`] for
//! server reflection, and [`codec`], the codec of those services (decode errors are
//! INVALID_ARGUMENT and counted).

/// Generated from `proto/hopwatch/v1/*.proto`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/hopwatch.v1.rs"));
}

#[cfg(feature = "grpc")]
pub mod codec;

/// The encoded descriptor set of `hopwatch.v1`, for `tonic-reflection`.
#[cfg(feature = "grpc")]
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/hopwatch_descriptor.bin"));
