//! mTLS between the sidecars, as Istio sets it up: a throwaway mesh CA made at mesh
//! start, one certificate per workload instance with its SPIFFE identity
//! (`spiffe://<trust domain>/ns/<ns>/sa/<service account>`) as URI SAN, and the Envoy TLS
//! contexts of both sides: the inbound listener (PeerAuthentication STRICT: client
//! certificate required; PERMISSIVE: TLS and plain text on one port, told apart by the
//! TLS inspector) and the callers' clusters (SNI `outbound_.<port>_.<subset>_.<fqdn>`,
//! Istio's ALPN, the callee's identity checked).
//!
//! Why a new CA per mesh: nothing outlives the run, and no key material is checked in.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use serde_json::{json, Value};

use crate::plan::{InstancePlan, Plan};
use crate::topology::MtlsMode;

/// Errors making the mesh's certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("generating a certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The SPIFFE identity Istio gives a workload.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// The CA certificate file in `dir`.
pub fn ca_file(dir: &Path) -> PathBuf {
    dir.join("root-cert.pem")
}

/// The certificate chain and key files of an instance in `dir`.
pub fn instance_files(dir: &Path, instance: &InstancePlan) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{}.cert-chain.pem", instance.pod)),
        dir.join(format!("{}.key.pem", instance.pod)),
    )
}

fn write(path: PathBuf, text: &str) -> Result<(), TlsError> {
    std::fs::write(&path, text).map_err(|source| TlsError::Write { path, source })
}

/// Makes the CA and every sidecar instance's certificate under `dir`.
pub fn write_mesh_certs(plan: &Plan, dir: &Path) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "hopwatch test mesh CA");
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    write(ca_file(dir), &ca_cert.pem())?;
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let domain = &plan.topology.cluster_domain;
    for inst in plan.instances.iter().filter(|i| i.sidecar.is_some()) {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::URI(
            spiffe_id(domain, &inst.namespace, &inst.service_account).try_into()?,
        )];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        let (cert_file, key_file) = instance_files(dir, inst);
        write(cert_file, &cert.pem())?;
        write(key_file, &key.serialize_pem())?;
    }
    Ok(())
}

/// ALPN a sidecar offers upstream for an `http-*` port (HTTP/1.1 between sidecars).
pub const CLIENT_ALPN: [&str; 3] = ["istio-peer-exchange", "istio-http/1.1", "istio"];

fn common_context(certs: &CertPaths, peer_san_prefix: &str) -> Value {
    json!({
        "tls_certificates": [{
            "certificate_chain": {"filename": certs.cert_chain.display().to_string()},
            "private_key": {"filename": certs.key.display().to_string()},
        }],
        "validation_context": {
            "trusted_ca": {"filename": certs.root.display().to_string()},
            "match_typed_subject_alt_names": [{
                "san_type": "URI",
                "matcher": {"prefix": peer_san_prefix},
            }],
        },
    })
}

/// The inbound listener's TLS transport socket: a client certificate of the mesh is
/// required (what STRICT enforces on the TLS filter chain).
pub fn inbound_transport_socket(dir: &Path, instance: &InstancePlan, trust_domain: &str) -> Value {
    downstream_tls_socket(&CertPaths::in_dir(dir, instance), trust_domain)
}

/// A caller's cluster TLS transport socket towards `callee_sa` in `callee_ns`, with the
/// SNI Istio sets for the cluster `outbound|<port>|<subset>|<fqdn>`.
pub fn upstream_transport_socket(
    dir: &Path,
    caller: &InstancePlan,
    trust_domain: &str,
    sni: &str,
    callee_ns: &str,
    callee_sa: &str,
) -> Value {
    upstream_tls_socket(
        &CertPaths::in_dir(dir, caller),
        &UpstreamPeer {
            trust_domain,
            sni,
            namespace: callee_ns,
            service_account: callee_sa,
        },
        &CLIENT_ALPN,
    )
}

/// Where one sidecar's Envoy reads its certificate chain, its key and the mesh CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    pub cert_chain: PathBuf,
    pub key: PathBuf,
    pub root: PathBuf,
}

/// Where istio-proxy reads file-mounted certificates (Istio's `/etc/certs` layout, used
/// when a pod mounts its workload certificate instead of getting it from istio-agent's SDS).
pub const MOUNTED_CERTS_DIR: &str = "/etc/certs";

impl CertPaths {
    /// The files [`write_mesh_certs`] wrote for `instance` into `dir` (the processes
    /// runtime: every sidecar reads them in place).
    pub fn in_dir(dir: &Path, instance: &InstancePlan) -> CertPaths {
        let (cert_chain, key) = instance_files(dir, instance);
        CertPaths {
            cert_chain,
            key,
            root: ca_file(dir),
        }
    }

    /// Inside an istio-proxy container: its own certificate, key and the CA mounted at
    /// [`MOUNTED_CERTS_DIR`] (the pods runtime; each pod mounts only its own key).
    pub fn mounted() -> CertPaths {
        let dir = Path::new(MOUNTED_CERTS_DIR);
        CertPaths {
            cert_chain: dir.join("cert-chain.pem"),
            key: dir.join("key.pem"),
            root: dir.join("root-cert.pem"),
        }
    }
}

/// The identity and name a caller's cluster checks and sends.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamPeer<'a> {
    pub trust_domain: &'a str,
    /// Istio's SNI for the cluster ([`sni`]).
    pub sni: &'a str,
    pub namespace: &'a str,
    pub service_account: &'a str,
}

/// ALPN a sidecar offers upstream for a `tcp-*` port (no HTTP between the sidecars).
pub const TCP_CLIENT_ALPN: [&str; 2] = ["istio-peer-exchange", "istio"];

/// A DownstreamTlsContext socket of an inbound filter chain: a client certificate of the
/// mesh (any SPIFFE identity of `trust_domain`) is required, Istio's ALPN offered.
pub fn downstream_tls_socket(certs: &CertPaths, trust_domain: &str) -> Value {
    let mut ctx = common_context(certs, &format!("spiffe://{trust_domain}/"));
    ctx["alpn_protocols"] = json!([
        "istio-peer-exchange",
        "istio-http/1.1",
        "istio",
        "h2",
        "http/1.1"
    ]);
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": true,
            "common_tls_context": ctx,
        }
    })
}

/// An UpstreamTlsContext socket of a caller's cluster: its own certificate, the callee's
/// SPIFFE identity checked, Istio's SNI, `alpn` ([`CLIENT_ALPN`] or [`TCP_CLIENT_ALPN`]).
pub fn upstream_tls_socket(certs: &CertPaths, peer: &UpstreamPeer<'_>, alpn: &[&str]) -> Value {
    let mut ctx = common_context(
        certs,
        &spiffe_id(peer.trust_domain, peer.namespace, peer.service_account),
    );
    ctx["alpn_protocols"] = json!(alpn);
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": peer.sni,
            "common_tls_context": ctx,
        }
    })
}

/// The TLS inspector listener filter (tells TLS from plain text for the filter chain
/// match on `transport_protocol`).
pub fn tls_inspector() -> Value {
    json!({
        "name": "envoy.filters.listener.tls_inspector",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"},
    })
}

/// What a PeerAuthentication makes of one plain-text inbound filter chain, as istiod
/// builds it (both runtimes): STRICT, that chain with `tls` (the mesh's client
/// certificate required: plain text fails the handshake and the connection is closed,
/// which the caller sees as UC); PERMISSIVE, the TLS chain for `transport_protocol: tls`
/// and the plain one for `raw_buffer` (the listener needs [`tls_inspector`]); OFF, the
/// chain unchanged. An existing `filter_chain_match` (e.g. a destination port) is kept.
pub fn inbound_filter_chains(plain: Value, mode: MtlsMode, tls: Value) -> Vec<Value> {
    if mode == MtlsMode::Off {
        return vec![plain];
    }
    let mut tls_chain = plain.clone();
    tls_chain["transport_socket"] = tls;
    if mode == MtlsMode::Strict {
        return vec![tls_chain];
    }
    let with_protocol = |mut chain: Value, protocol: &str, suffix: &str| {
        if !chain["filter_chain_match"].is_object() {
            chain["filter_chain_match"] = json!({});
        }
        chain["filter_chain_match"]["transport_protocol"] = json!(protocol);
        if let Some(name) = chain["name"].as_str() {
            chain["name"] = json!(format!("{name}{suffix}"));
        }
        chain
    };
    vec![
        with_protocol(tls_chain, "tls", ""),
        with_protocol(plain, "raw_buffer", "-plaintext"),
    ]
}

/// Istio's SNI for an outbound cluster: `outbound_.<port>_.<subset>_.<fqdn>`.
pub fn sni(port: u16, subset: &str, fqdn: &str) -> String {
    format!("outbound_.{port}_.{subset}_.{fqdn}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_as_istio_writes_them() {
        assert_eq!(
            spiffe_id("cluster.local", "shop", "cart"),
            "spiffe://cluster.local/ns/shop/sa/cart"
        );
        assert_eq!(
            sni(80, "dev.proj1", "cart.shop.svc.cluster.local"),
            "outbound_.80_.dev.proj1_.cart.shop.svc.cluster.local"
        );
        assert_eq!(
            sni(80, "", "cart.shop.svc.cluster.local"),
            "outbound_.80_._.cart.shop.svc.cluster.local"
        );
    }
}
