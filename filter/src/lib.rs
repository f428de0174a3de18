//! hopwatch filter: a proxy-wasm HTTP filter for Envoy sidecars that carries the
//! virtual-environment tag along call chains, checks trace-header propagation,
//! annotates responses with Envoy's response flags and reports every hop to the
//! hopwatch collector.
//!
//! The logic is pure Rust ([`config`], [`tag`], [`trace`], [`tracers`], [`baggage`],
//! [`cookie`], [`flags`], [`correlation`], [`peer`] (who may see annotations),
//! [`ratelimit`], [`sampling`], [`report`], [`batch`], [`filter`]) and reaches the proxy only through
//! the [`host::Host`] trait; the proxy-wasm glue (`abi` + `glue`, compiled for
//! `target_os = "wasi"` only) is a thin layer over it.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable,
    clippy::todo,
    clippy::unimplemented
)]
#![warn(missing_docs)]

pub mod baggage;
pub mod batch;
pub mod config;
pub mod cookie;
pub mod correlation;
pub mod filter;
pub mod flags;
pub mod grpc;
pub mod headers;
pub mod host;
pub mod metrics;
pub mod peer;
pub mod ratelimit;
pub mod report;
pub mod sampling;
pub mod tag;
pub mod trace;
pub mod tracers;

#[cfg(target_os = "wasi")]
pub mod abi;
#[cfg(target_os = "wasi")]
mod glue;
