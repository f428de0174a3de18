//! Who may see hopwatch's annotations: mesh peers only (unless `annotate_external`).
//!
//! The annotation header names workloads, namespaces and Envoy's failure details, and
//! `debug_header` turns it on for any response: neither may reach a caller outside the
//! mesh. The rule, decided from what Envoy and Istio guarantee:
//!
//! * **Inbound** (SIDECAR_INBOUND): the caller is a mesh peer when the downstream
//!   connection is mutual TLS with a peer certificate (Envoy's `connection.mtls`: TLS and
//!   a client certificate presented; Istio's inbound TLS chain only accepts certificates
//!   of the mesh CA, so a presented certificate is a validated mesh identity) **and** the
//!   request does not carry `x-envoy-external-address`. Istio's gateways run with
//!   `use_remote_address: true`, so Envoy sets that header on every request that came
//!   from outside (and only those): an external client calling through an ingress
//!   gateway arrives over the gateway's mTLS connection, and the header is what still
//!   marks it as outside. A plain-text connection (PERMISSIVE mode, no sidecar on the
//!   caller, a port-forward) is never a mesh peer: there is no identity to trust.
//! * **Outbound** (SIDECAR_OUTBOUND): the caller is the local app (iptables sends only
//!   the pod's own traffic there), a mesh peer by definition, unless the request it
//!   sends carries `x-envoy-external-address`: the app is passing an outside request on
//!   (a front-end or proxy app) and may pass the response headers back out as well.
//!
//! A caller that is not a mesh peer gets no annotation header, and its `debug_header`
//! is ignored. `annotate_external: true` turns the check off, for meshes without mTLS
//! identities (where no caller could be told apart).
//!
//! Cost: `connection.mtls` is one property read, made only when a response would be
//! annotated (a failure in `on_error` mode, or a debug request), never for healthy
//! traffic; the header check is free (the request headers are already in the VM).

use crate::config::Direction;

/// The header Envoy sets (with `use_remote_address`, as Istio's gateways run) on
/// requests from outside: its presence marks the original caller as external.
pub const EXTERNAL_ADDRESS_HEADER: &str = "x-envoy-external-address";

/// The Envoy attribute telling whether the downstream connection is mTLS with a peer
/// certificate.
pub const MTLS_PROPERTY: [&str; 2] = ["connection", "mtls"];

/// Decodes a boolean attribute (Envoy serializes it as one byte).
pub fn prop_bool(bytes: Option<Vec<u8>>) -> bool {
    bytes.is_some_and(|b| b.iter().any(|&x| x != 0))
}

/// Whether the caller of this request may see annotations (see the module docs).
/// `marked_external`: the request carries [`EXTERNAL_ADDRESS_HEADER`]; `mtls` reads
/// `connection.mtls` and is only called on the inbound side when it decides.
pub fn is_mesh_peer(
    direction: Direction,
    annotate_external: bool,
    marked_external: bool,
    mtls: impl FnOnce() -> bool,
) -> bool {
    if annotate_external {
        return true;
    }
    if marked_external {
        return false;
    }
    match direction {
        Direction::Outbound => true,
        Direction::Inbound => mtls(),
    }
}
