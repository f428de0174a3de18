//! The local mesh of real Envoys that runs hopwatch on one machine, and the pieces its
//! tests share.
//!
//! - [`topology`]: the topology file (workloads, environments, calls, faults).
//! - [`plan`]: a topology resolved to ports and Istio-style names.
//! - [`bootstrap`]: the Envoy bootstrap of each sidecar (filters from [`manifests`]).
//! - [`mesh`]: starts and stops the processes, sends requests, queries the collector.
//! - [`collector_cli`]: the `hopwatch` CLI against a mesh's collector (both runtimes).
//! - [`pods`]: the pods runtime (podman kube play, Istio's capture and listener layout).
//! - [`mtls`]: the mesh CA, workload certificates and TLS contexts (mTLS between sidecars).
//! - [`collector_sidecar`]: the collector behind its own mTLS sidecar (XFCC), for the
//!   identity tests.
//! - [`render`]: writes the kube YAML / configuration of a rendered mesh.
//! - [`httpc`]: the small blocking HTTP client all of it uses.

pub mod bins;
/// The demo app's gRPC service (`proto/demo.proto`), client and server.
#[allow(missing_docs, clippy::all)]
pub mod demo_grpc {
    tonic::include_proto!("hopwatch.demo.v1");
}
pub mod bootstrap;
pub mod collector_cli;
pub mod httpc;
pub mod manifests;
// The collector behind its own sidecar (identity tests). Kept apart from the runtimes' modules.
pub mod collector_sidecar;
pub mod mesh;
pub mod mtls;
pub mod plan;
pub mod pods;
pub mod render;
pub mod topology;
