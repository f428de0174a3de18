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

fn common_context(dir: &Path, instance: &InstancePlan, peer_san_prefix: &str) -> Value {
    let (cert, key) = instance_files(dir, instance);
    json!({
        "tls_certificates": [{
            "certificate_chain": {"filename": cert.display().to_string()},
            "private_key": {"filename": key.display().to_string()},
        }],
        "validation_context": {
            "trusted_ca": {"filename": ca_file(dir).display().to_string()},
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
    let mut ctx = common_context(dir, instance, &format!("spiffe://{trust_domain}/"));
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
    let mut ctx = common_context(dir, caller, &spiffe_id(trust_domain, callee_ns, callee_sa));
    ctx["alpn_protocols"] = json!(CLIENT_ALPN);
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": sni,
            "common_tls_context": ctx,
        }
    })
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
