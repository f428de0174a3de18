//! The collector behind its own sidecar, as Istio runs it: one real Envoy whose inbound
//! listener terminates mTLS (client certificate of the mesh CA required) and passes the
//! peer on in `x-forwarded-client-cert` the way Istio's inbound does
//! (`forward_client_cert_details: APPEND_FORWARD`, `set_current_client_cert_details:
//! {subject, uri, dns}`), plus one outbound listener per calling identity, standing for
//! that workload's sidecar: plain h2c in, mTLS with its own SPIFFE certificate out.
//!
//! The certificates come from a throwaway CA made here (rcgen), with
//! [`crate::mtls::spiffe_id`] URI SANs, like the mesh's in [`crate::mtls`]. The outbound
//! listeners forward any XFCC header the app wrote (`ALWAYS_FORWARD_ONLY`), so a test can
//! play an app that forges one.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use serde_json::{json, Value};

use crate::mtls::spiffe_id;

/// The trust domain of the certificates.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// The collector's own identity (its sidecar's certificate).
pub const COLLECTOR_NS: &str = "hopwatch";
pub const COLLECTOR_SA: &str = "hopwatch-collector";

/// Errors setting up the sidecar.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Missing(#[from] crate::bins::MissingArtifact),
    #[error("envoy not ready within {0:?}; log: {1}")]
    NotReady(Duration, String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SidecarError {
    let what = what.into();
    move |source| SidecarError::Io { what, source }
}

fn free_port() -> Result<u16, SidecarError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("binding a free port"))?;
    Ok(l.local_addr().map_err(io("local address"))?.port())
}

/// A calling workload: its namespace and service account.
#[derive(Clone, Debug)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
}

impl Caller {
    pub fn new(namespace: &str, service_account: &str) -> Caller {
        Caller {
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }
}

/// The running sidecar; Envoy is killed on drop.
pub struct CollectorSidecar {
    /// The mTLS inbound port (what the mesh dials for the collector).
    pub inbound: SocketAddr,
    /// Per caller (in the order given): the plain-text port of its sidecar's outbound.
    pub outbound: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub log: PathBuf,
    child: Child,
}

impl Drop for CollectorSidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write(path: &Path, text: &str) -> Result<(), SidecarError> {
    std::fs::write(path, text).map_err(io(format!("writing {}", path.display())))
}

/// Writes the CA (`root-cert.pem`) and one certificate + key per identity
/// (`<ns>.<sa>.pem`, `<ns>.<sa>.key`) under `dir`.
fn write_certs(dir: &Path, identities: &[(&str, &str)]) -> Result<(), SidecarError> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(
        rcgen::DnType::OrganizationName,
        "hopwatch test collector CA",
    );
    let ca_key = KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;
    write(&dir.join("root-cert.pem"), &ca.pem())?;
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    for (ns, sa) in identities {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        // A Subject with a comma and a quote: Envoy must quote it in XFCC.
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("{sa}, \"{ns}\""));
        p.subject_alt_names = vec![SanType::URI(spiffe_id(TRUST_DOMAIN, ns, sa).try_into()?)];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &issuer)?;
        write(&dir.join(format!("{ns}.{sa}.pem")), &cert.pem())?;
        write(&dir.join(format!("{ns}.{sa}.key")), &key.serialize_pem())?;
    }
    Ok(())
}

fn tls_context(dir: &Path, ns: &str, sa: &str, peer_san: Value) -> Value {
    let f = |name: String| json!({"filename": dir.join(name).display().to_string()});
    json!({
        "tls_certificates": [{
            "certificate_chain": f(format!("{ns}.{sa}.pem")),
            "private_key": f(format!("{ns}.{sa}.key")),
        }],
        "validation_context": {
            "trusted_ca": f("root-cert.pem".into()),
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": peer_san}],
        },
        "alpn_protocols": ["h2"],
    })
}

fn h2_options() -> Value {
    json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    })
}

fn hcm(stat_prefix: &str, cluster: &str, xfcc: Value) -> Value {
    let mut c = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",
        "route_config": {"virtual_hosts": [{
            "name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "10s"}}],
        }]},
        "http_filters": [{
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }],
    });
    if let (Some(c), Some(x)) = (c.as_object_mut(), xfcc.as_object()) {
        c.extend(x.clone());
    }
    json!([{"name": "envoy.filters.network.http_connection_manager", "typed_config": c}])
}

fn endpoint(cluster: &str, port: u16) -> Value {
    json!({"cluster_name": cluster, "endpoints": [{"lb_endpoints": [{"endpoint": {
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]})
}

fn listener(name: &str, port: u16, chain: Value) -> Value {
    json!({
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [chain],
    })
}

/// The bootstrap (exposed so that a test can read what was configured).
pub fn bootstrap(
    dir: &Path,
    collector_grpc: SocketAddr,
    callers: &[Caller],
    admin: u16,
    inbound: u16,
    outbound: &[u16],
) -> Value {
    let collector_id = spiffe_id(TRUST_DOMAIN, COLLECTOR_NS, COLLECTOR_SA);
    let mut listeners = vec![listener(
        "collector_inbound",
        inbound,
        json!({
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "require_client_certificate": true,
                    "common_tls_context": tls_context(dir, COLLECTOR_NS, COLLECTOR_SA,
                        json!({"prefix": format!("spiffe://{TRUST_DOMAIN}/")})),
                }
            },
            // Istio's sidecar inbound: append the peer's certificate details to whatever
            // the request carried.
            "filters": hcm("inbound", "collector_app", json!({
                "forward_client_cert_details": "APPEND_FORWARD",
                "set_current_client_cert_details": {"subject": true, "uri": true, "dns": true},
            })),
        }),
    )];
    let mut clusters = vec![json!({
        "name": "collector_app",
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": endpoint("collector_app", collector_grpc.port()),
        "typed_extension_protocol_options": h2_options(),
    })];
    for (i, (c, port)) in callers.iter().zip(outbound).enumerate() {
        let cluster = format!("to_collector_{i}");
        listeners.push(listener(
            &format!("outbound_{}_{}", c.namespace, c.service_account),
            *port,
            json!({"filters": hcm(&format!("outbound_{i}"), &cluster,
                json!({"forward_client_cert_details": "ALWAYS_FORWARD_ONLY"}))}),
        ));
        clusters.push(json!({
            "name": cluster,
            "type": "STATIC",
            "connect_timeout": "2s",
            "load_assignment": endpoint(&cluster, inbound),
            "typed_extension_protocol_options": h2_options(),
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                    "sni": crate::mtls::sni(9090, "", "hopwatch-collector.hopwatch.svc.cluster.local"),
                    "common_tls_context": tls_context(dir, &c.namespace, &c.service_account,
                        json!({"exact": collector_id})),
                }
            },
        }));
    }
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    })
}

impl CollectorSidecar {
    /// Makes the certificates under `dir`, starts Envoy in front of `collector_grpc` and
    /// waits until it is ready.
    pub fn start(
        dir: &Path,
        collector_grpc: SocketAddr,
        callers: &[Caller],
    ) -> Result<CollectorSidecar, SidecarError> {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let mut ids = vec![(COLLECTOR_NS, COLLECTOR_SA)];
        ids.extend(
            callers
                .iter()
                .map(|c| (c.namespace.as_str(), c.service_account.as_str())),
        );
        write_certs(dir, &ids)?;
        let (admin, inbound) = (free_port()?, free_port()?);
        let outbound = callers
            .iter()
            .map(|_| free_port())
            .collect::<Result<Vec<_>, _>>()?;
        let config = dir.join("collector-sidecar.envoy.json");
        let b = bootstrap(dir, collector_grpc, callers, admin, inbound, &outbound);
        write(
            &config,
            &serde_json::to_string_pretty(&b).unwrap_or_default(),
        )?;
        let log = dir.join("collector-sidecar.envoy.log");
        let out = std::fs::File::create(&log).map_err(io(format!("creating {}", log.display())))?;
        let err = out.try_clone().map_err(io("log file"))?;
        let child = Command::new(crate::bins::envoy_bin()?)
            .arg("-c")
            .arg(&config)
            .args(["--concurrency", "1", "--use-dynamic-base-id"])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io("starting envoy"))?;
        let loopback = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let s = CollectorSidecar {
            inbound: loopback(inbound),
            outbound: outbound.into_iter().map(loopback).collect(),
            admin: loopback(admin),
            log,
            child,
        };
        let timeout = Duration::from_secs(30);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let ready = crate::httpc::get(s.admin, "admin", "/ready", Duration::from_secs(1))
                .map(|r| r.status == 200)
                .unwrap_or(false);
            if ready {
                return Ok(s);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let text = std::fs::read_to_string(&s.log).unwrap_or_default();
        Err(SidecarError::NotReady(timeout, text))
    }

    /// The plain-text URL a caller's app uses (its sidecar's outbound to the collector).
    pub fn url_for(&self, caller: usize) -> String {
        format!("http://{}", self.outbound[caller])
    }

    /// An Envoy counter or gauge from the admin's /stats (0 when absent).
    pub fn stat(&self, name: &str) -> u64 {
        let text = crate::httpc::get(self.admin, "admin", "/stats", Duration::from_secs(2))
            .map(|r| r.text())
            .unwrap_or_default();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(": ")?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    }
}
