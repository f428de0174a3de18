//! The Envoy bootstrap of a pod's `istio-proxy`, with the listener layout istiod builds
//! for a sidecar, around the same pieces the processes runtime uses
//! ([`crate::bootstrap`]: HTTP connection managers, routes, node metadata, access logs;
//! the hopwatch filters verbatim from the sidecar EnvoyFilter manifest):
//!
//! - `virtualOutbound` 0.0.0.0:15001 with `use_original_dst`: captured outbound
//!   connections are handed to the listener of their original destination; anything
//!   else goes to `PassthroughCluster`.
//! - `0.0.0.0_80` (not bound): the HTTP services' port, the outbound filter, route `80`
//!   (virtual hosts per Service, subset routes per virtual environment).
//! - `<vip>_80` (not bound) per TCP Service (port named `tcp-...`): a TCP proxy to
//!   `outbound|80||<fqdn>`, no HTTP filter.
//! - `virtualInbound` 0.0.0.0:15006 with the original-destination listener filter: a
//!   filter chain for the app's port (HTTP with the inbound filter, or a TCP proxy when
//!   the Service port is TCP) to `inbound|8080||`, and the passthrough chain for other
//!   ports. Inbound clusters are ORIGINAL_DST, bound to 127.0.0.6, so they connect to
//!   the pod address (an app on 127.0.0.1 only is refused: UF).
//! - mTLS (the topology's `mtls`, `peer_authentication`, `destination_rule_without_tls`,
//!   the same keys and the same TLS contexts as the processes runtime, from
//!   [`crate::mtls`]): each `virtualInbound` chain becomes what the workload's
//!   PeerAuthentication makes of it (STRICT: TLS with a mesh client certificate;
//!   PERMISSIVE: `tls` and `raw_buffer` chains behind the TLS inspector), and the
//!   clusters towards a workload called over mTLS carry the caller's certificate,
//!   Istio's SNI and ALPN and the callee's SPIFFE identity. Certificates are
//!   file-mounted at [`crate::mtls::MOUNTED_CERTS_DIR`] (no istio-agent, no SDS).
//! - `BlackHoleCluster`, `PassthroughCluster`, `InboundPassthroughCluster`; the 15021
//!   readiness listener; the 15090 Prometheus listener (Envoy's stats); admin on
//!   127.0.0.1:15000.
//!
//! Endpoints are static (there is no istiod): the pods' addresses, known in advance.

use std::net::Ipv4Addr;

use serde_json::{json, Value};

use super::capture::{INBOUND_CAPTURE_PORT, OUTBOUND_CAPTURE_PORT};
use super::plan::{
    PodPlan, ServicePlan, APP_PORT, HEALTH_PORT, PROMETHEUS_PORT, PROXY_ADMIN_PORT, SERVICE_PORT,
};
use crate::bootstrap::{
    access_log, collector_cluster_name, fault_filter, listener, node, outbound_cluster,
    outbound_routes, rbac_deny_all, socket, static_cluster, tracing, OTEL_CLUSTER,
};
use crate::manifests::SidecarFilters;
use crate::mtls::{self, CertPaths, UpstreamPeer, CLIENT_ALPN, TCP_CLIENT_ALPN};
use crate::topology::MtlsMode;

/// Where the filter's wasm is mounted in istio-proxy: the manifest's own path.
pub const WASM_IN_POD: &str = "/var/local/lib/wasm-filters/hopwatch_filter.wasm";
/// Where the bootstrap is mounted.
pub const BOOTSTRAP_IN_POD: &str = "/etc/istio/proxy/envoy.json";

fn tcp_proxy(stat_prefix: &str, cluster: &str, access: Value) -> Value {
    json!({
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": stat_prefix,
            "cluster": cluster,
            "access_log": [access],
        }
    })
}

fn original_dst_cluster(name: &str, bind_127_0_0_6: bool, http2: bool) -> Value {
    let mut c = json!({
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "10s",
    });
    if bind_127_0_0_6 {
        c["upstream_bind_config"] =
            json!({"source_address": {"address": "127.0.0.6", "port_value": 0}});
    }
    if http2 {
        // grpc-*/http2-* ports: HTTP/2 (h2c) to the app, as Istio's inbound cluster does.
        c["typed_extension_protocol_options"] =
            static_cluster(name, "0.0.0.0", &[], true)["typed_extension_protocol_options"].clone();
    }
    c
}

/// A cluster of pod addresses (what EDS would deliver).
fn endpoints_cluster(name: &str, ips: &[Ipv4Addr], port: u16, http2: bool) -> Value {
    let mut c = static_cluster(name, "0.0.0.0", &[], http2);
    let lb: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"endpoint": {"address": socket(&ip.to_string(), port)}}))
        .collect();
    c["connect_timeout"] = json!("10s");
    c["load_assignment"]["endpoints"] = if lb.is_empty() {
        json!([])
    } else {
        json!([{"lb_endpoints": lb}])
    };
    c
}

/// The outbound clusters: per HTTP Service the default subset and one per defined
/// subset; per TCP Service one cluster of all its pods. Towards a workload called over
/// mTLS (Istio's auto mTLS: a sidecar, a mesh with mTLS, no DestinationRule turning it
/// off), every cluster carries the caller's mounted certificate, Istio's SNI for that
/// subset and the callee's SPIFFE identity, as in the processes runtime.
fn outbound_clusters(pp: &PodPlan) -> Vec<Value> {
    let topology = &pp.plan.topology;
    let mut out = Vec::new();
    let certs = CertPaths::mounted();
    for w in &topology.workloads {
        let ns = w.namespace(topology);
        let fqdn = format!("{}.{ns}.svc.cluster.local", w.name);
        let tls = |mut cluster: Value, subset: &str| {
            if w.called_over_mtls(topology) {
                let alpn: &[&str] = if w.port_is_tcp() {
                    &TCP_CLIENT_ALPN
                } else {
                    &CLIENT_ALPN
                };
                let peer = UpstreamPeer {
                    trust_domain: &topology.cluster_domain,
                    sni: &mtls::sni(SERVICE_PORT, subset, &fqdn),
                    namespace: ns,
                    service_account: w.service_account(),
                };
                cluster["transport_socket"] = mtls::upstream_tls_socket(&certs, &peer, alpn);
            }
            cluster
        };
        if w.port_is_tcp() {
            let all: Vec<Ipv4Addr> = pp
                .plan
                .instances
                .iter()
                .zip(&pp.pod_ips)
                .filter(|(i, _)| i.service == w.name)
                .map(|(_, ip)| *ip)
                .collect();
            out.push(tls(
                endpoints_cluster(&outbound_cluster("", &fqdn), &all, APP_PORT, false),
                "",
            ));
            continue;
        }
        out.push(tls(
            endpoints_cluster(
                &outbound_cluster("", &fqdn),
                &pp.subset_endpoints(&w.name, ""),
                APP_PORT,
                w.http2(),
            ),
            "",
        ));
        for i in &w.instances {
            if i.tag.is_empty() || w.undefined_subsets.contains(&i.tag) {
                continue;
            }
            out.push(tls(
                endpoints_cluster(
                    &outbound_cluster(&i.tag, &fqdn),
                    &pp.subset_endpoints(&w.name, &i.tag),
                    APP_PORT,
                    w.http2(),
                ),
                &i.tag,
            ));
        }
    }
    out
}

/// The HTTP route `80`: the processes runtime's routes, without the TCP Services (istiod
/// puts only HTTP services into an HTTP route).
fn http_route_80(pp: &PodPlan) -> Value {
    let mut routes = outbound_routes(&pp.plan);
    let tcp_hosts: Vec<String> = pp
        .services
        .iter()
        .filter(|s| s.tcp)
        .map(|s| format!("{}:{}", s.fqdn(), SERVICE_PORT))
        .collect();
    if let Some(vhs) = routes["virtual_hosts"].as_array_mut() {
        vhs.retain(|vh| {
            !tcp_hosts
                .iter()
                .any(|t| vh["name"].as_str() == Some(t.as_str()))
        });
    }
    routes
}

/// `<vip>_<port>`: a TCP Service's outbound listener.
fn tcp_outbound_listener(s: &ServicePlan) -> Value {
    let name = format!("{}_{}", s.vip, s.port);
    let cluster = outbound_cluster("", &s.fqdn());
    json!({
        "name": name,
        "traffic_direction": "OUTBOUND",
        "address": socket(&s.vip.to_string(), s.port),
        "bind_to_port": false,
        "filter_chains": [{
            "filters": [tcp_proxy(&format!("outbound|{}||{}", s.port, s.fqdn()), &cluster,
                access_log("/dev/stdout", "outbound-tcp", "x-virtual-env"))],
        }],
    })
}

/// Istio's readiness listener: `GET :15021/healthz/ready` answers what admin `/ready` does.
fn health_listener() -> Value {
    json!({
        "name": "virtualHealth",
        "address": socket("0.0.0.0", HEALTH_PORT),
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "agent",
                "route_config": {"virtual_hosts": [{"name": "backend", "domains": ["*"], "routes": [{
                    "match": {"prefix": "/healthz/ready"},
                    "route": {"cluster": "agent", "prefix_rewrite": "/ready"},
                }]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            }
        }]}],
    })
}

/// The cluster behind Istio's Prometheus listener: Envoy's admin.
const PROMETHEUS_CLUSTER: &str = "prometheus_stats";

/// Istio's Prometheus listener: `GET :15090/stats/prometheus` is Envoy's admin
/// `/stats/prometheus` (query string included, so `?filter=<regex>` works); port 15090
/// is never captured.
fn prometheus_listener() -> Value {
    json!({
        "name": "prometheus",
        "address": socket("0.0.0.0", PROMETHEUS_PORT),
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "stats",
                "route_config": {"virtual_hosts": [{"name": "backend", "domains": ["*"], "routes": [{
                    "match": {"prefix": "/stats/prometheus"},
                    "route": {"cluster": PROMETHEUS_CLUSTER},
                }]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            }
        }]}],
    })
}

/// The stats tags of Istio's bootstrap (`envoy_bootstrap.json`) instead of Envoy's
/// defaults: Envoy's default `cluster_name` tag stops at the first dot, so
/// `outbound|80||bravo.e2e.svc.cluster.local` would be split into the stat's name;
/// Istio's regex keeps the whole cluster name as the tag.
fn istio_stats_config() -> Value {
    let listener_address = r"((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))";
    json!({
        "use_all_default_tags": false,
        "stats_tags": [
            {"tag_name": "cluster_name", "regex": r"^cluster\.((.+?(\..+?\.svc\.cluster\.local)?)\.)"},
            {"tag_name": "tcp_prefix", "regex": r"^tcp\.((.*?)\.)\w+?$"},
            {"tag_name": "response_code", "regex": r"_rq(_(\d{3}))$"},
            {"tag_name": "response_code_class", "regex": r"_rq(_(\dxx))$"},
            {"tag_name": "http_conn_manager_listener_prefix", "regex": format!(r"^listener(?=\.).*?\.http\.({listener_address}\.)")},
            {"tag_name": "http_conn_manager_prefix", "regex": format!(r"^http\.({listener_address}\.)")},
            {"tag_name": "listener_address", "regex": format!(r"^listener\.({listener_address}\.)")},
        ],
    })
}

/// The bootstrap of `plan.instances[index]`'s istio-proxy (None without a sidecar).
pub fn pod_sidecar_bootstrap(
    pp: &PodPlan,
    index: usize,
    filters: &SidecarFilters,
) -> Option<Value> {
    let inst = pp.plan.instances.get(index)?;
    inst.sidecar?;
    let pod_ip = pp.pod_ips.get(index)?.to_string();
    let tag_header = &pp.plan.topology.tag_header;
    let tcp = pp.service(&inst.service).is_some_and(|s| s.tcp);
    let inbound_cluster = format!("inbound|{APP_PORT}||");
    // The topology's tracer, as the processes runtime configures it.
    let topology = &pp.plan.topology;
    let pod_tracing = || {
        tracing(
            topology.tracing,
            topology.sampling_percent(),
            &format!("{}.{}", inst.service, inst.namespace),
        )
    };
    // Envoy's own filters before hopwatch, as the processes runtime puts them.
    let workload = pp.plan.workload(&inst.service);
    // The filters as the processes runtime renders them per mTLS mode (annotate_external
    // where the mesh has no identity).
    let identity_mode = workload.map_or(MtlsMode::Off, |w| w.mtls(&pp.plan.topology));
    let inbound_filter = crate::bootstrap::filter_for_mtls_mode(&filters.inbound, identity_mode);
    let outbound_filter = crate::bootstrap::filter_for_mtls_mode(&filters.outbound, identity_mode);
    let inbound_before = match workload {
        Some(w) if w.deny_all => vec![rbac_deny_all(&inst.namespace, &inst.service)],
        _ => vec![],
    };
    let outbound_before = if pp
        .plan
        .topology
        .workloads
        .iter()
        .any(|w| w.fault_abort.is_some())
    {
        vec![fault_filter()]
    } else {
        vec![]
    };

    // virtualInbound: the app port's chain, then passthrough.
    let inbound_chain = if tcp {
        json!({
            "name": format!("0.0.0.0_{APP_PORT}"),
            "filter_chain_match": {"destination_port": APP_PORT},
            "filters": [tcp_proxy(&inbound_cluster, &inbound_cluster,
                access_log("/dev/stdout", "inbound-tcp", tag_header))],
        })
    } else {
        let routes = json!({
            "name": inbound_cluster,
            "validate_clusters": false,
            "virtual_hosts": [{
                "name": format!("inbound|http|{APP_PORT}"),
                "domains": ["*"],
                "routes": [{
                    "name": "default",
                    "match": {"prefix": "/"},
                    "route": {"cluster": inbound_cluster, "timeout": "0s"},
                    "decorator": {"operation": format!("{}:{}/*", inst.fqdn(), APP_PORT)},
                }],
            }],
        });
        // The processes runtime's inbound HTTP listener, taken apart for its chain.
        let l = listener(
            "virtualInbound",
            "INBOUND",
            "0.0.0.0",
            INBOUND_CAPTURE_PORT,
            &format!("inbound_0.0.0.0_{APP_PORT}"),
            routes,
            inbound_before,
            inbound_filter.clone(),
            access_log("/dev/stdout", "inbound", tag_header),
            pod_tracing(),
        );
        let mut chain = l["filter_chains"][0].clone();
        chain["name"] = json!(format!("0.0.0.0_{APP_PORT}"));
        chain["filter_chain_match"] = json!({"destination_port": APP_PORT});
        chain
    };
    let passthrough = json!({
        "name": "InboundPassthroughFilterChain",
        "filters": [tcp_proxy("InboundPassthroughCluster", "InboundPassthroughCluster",
            access_log("/dev/stdout", "inbound-passthrough", tag_header))],
    });
    let mut listener_filters = vec![json!({
        "name": "envoy.filters.listener.original_dst",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"},
    })];
    // The workload's PeerAuthentication, on the app port's chain and on passthrough (as
    // istiod builds both), with the pod's mounted certificate.
    let mode = workload.map_or(MtlsMode::Off, |w| w.mtls(topology));
    let mut inbound_chains = Vec::new();
    for chain in [inbound_chain, passthrough] {
        let tls = mtls::downstream_tls_socket(&CertPaths::mounted(), &topology.cluster_domain);
        inbound_chains.extend(mtls::inbound_filter_chains(chain, mode, tls));
    }
    if mode != MtlsMode::Off {
        listener_filters.push(mtls::tls_inspector());
    }
    let virtual_inbound = json!({
        "name": "virtualInbound",
        "traffic_direction": "INBOUND",
        "address": socket("0.0.0.0", INBOUND_CAPTURE_PORT),
        "listener_filters": listener_filters,
        "filter_chains": inbound_chains,
    });

    // virtualOutbound and the per-port outbound listeners.
    let virtual_outbound = json!({
        "name": "virtualOutbound",
        "traffic_direction": "OUTBOUND",
        "address": socket("0.0.0.0", OUTBOUND_CAPTURE_PORT),
        "use_original_dst": true,
        "filter_chains": [{
            "name": "PassthroughFilterChain",
            "filters": [tcp_proxy("PassthroughCluster", "PassthroughCluster",
                access_log("/dev/stdout", "outbound-passthrough", tag_header))],
        }],
    });
    let mut http_80 = listener(
        &format!("0.0.0.0_{SERVICE_PORT}"),
        "OUTBOUND",
        "0.0.0.0",
        SERVICE_PORT,
        &format!("outbound_0.0.0.0_{SERVICE_PORT}"),
        http_route_80(pp),
        outbound_before,
        outbound_filter.clone(),
        access_log("/dev/stdout", "outbound", tag_header),
        pod_tracing(),
    );
    http_80["bind_to_port"] = json!(false);
    let mut listeners = vec![virtual_outbound, http_80];
    listeners.extend(
        pp.services
            .iter()
            .filter(|s| s.tcp)
            .map(tcp_outbound_listener),
    );
    listeners.push(virtual_inbound);
    listeners.push(health_listener());
    listeners.push(prometheus_listener());

    let mut clusters = vec![
        original_dst_cluster(
            &inbound_cluster,
            true,
            pp.plan.workload(&inst.service).is_some_and(|w| w.http2()),
        ),
        original_dst_cluster("InboundPassthroughCluster", true, false),
        original_dst_cluster("PassthroughCluster", false, false),
        json!({"name": "BlackHoleCluster", "type": "STATIC", "connect_timeout": "10s"}),
        static_cluster("agent", "127.0.0.1", &[PROXY_ADMIN_PORT], false),
        static_cluster(PROMETHEUS_CLUSTER, "127.0.0.1", &[PROXY_ADMIN_PORT], false),
        // The tracer's collector: nothing listens (spans are not the point).
        static_cluster("zipkin", "127.0.0.1", &[9411], false),
        static_cluster(OTEL_CLUSTER, "127.0.0.1", &[9411], true),
    ];
    if let Some(c) = pp.collector_service() {
        clusters.push(endpoints_cluster(
            &collector_cluster_name(filters),
            &[pp.collector_ip],
            c.target_port,
            true,
        ));
    }
    clusters.extend(outbound_clusters(pp));

    let mut node = node(inst, &pod_ip, &pp.plan.topology.cluster_domain);
    if !pp.has_subset_label(inst) {
        if let Some(labels) = node["metadata"]["LABELS"].as_object_mut() {
            labels.remove("virtual-env");
        }
    }
    Some(json!({
        "node": node,
        "admin": {"address": socket("127.0.0.1", PROXY_ADMIN_PORT)},
        "stats_config": istio_stats_config(),
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::{load_sidecar_filters, repo_root};
    use crate::topology::Topology;

    fn bootstrap(yaml: &str, service: &str) -> Value {
        let topology = Topology::parse(yaml, "t").unwrap();
        let base = u32::from(Ipv4Addr::new(10, 89, 7, 0));
        let pp = PodPlan::new(&topology, |n| Ipv4Addr::from(base + n)).unwrap();
        let filters = load_sidecar_filters(&repo_root()).unwrap();
        let i = pp.index_of(service, None).unwrap();
        pod_sidecar_bootstrap(&pp, i, &filters).unwrap()
    }

    fn names(v: &Value, key: &str) -> Vec<String> {
        v["static_resources"][key]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["name"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn sidecar_has_istios_listeners_and_clusters() {
        let b = bootstrap(
            "namespace: ns\nworkloads:\n  - name: a\n    calls: [b, c]\n  - name: b\n    undefined_subsets: [dev]\n    instances: [{tag: \"\"}, {tag: dev}]\n  - name: c\n    port: tcp-db\n",
            "a",
        );
        let listeners = names(&b, "listeners");
        assert_eq!(
            listeners,
            [
                "virtualOutbound",
                "0.0.0.0_80",
                "10.89.7.202_80",
                "virtualInbound",
                "virtualHealth",
                "prometheus"
            ]
        );
        let clusters = names(&b, "clusters");
        for c in [
            "inbound|8080||",
            "PassthroughCluster",
            "BlackHoleCluster",
            "InboundPassthroughCluster",
            "outbound|80||b.ns.svc.cluster.local",
            "outbound|80||c.ns.svc.cluster.local",
            "outbound|9090||hopwatch-collector.hopwatch.svc.cluster.local",
        ] {
            assert!(clusters.iter().any(|n| n == c), "{c} in {clusters:?}");
        }
        // The subset the DestinationRule does not define yet has a route, no cluster.
        assert!(!clusters
            .iter()
            .any(|n| n == "outbound|80|dev|b.ns.svc.cluster.local"));
        let route = b.to_string();
        assert!(route.contains("outbound|80|dev|b.ns.svc.cluster.local"));
        let vo = &b["static_resources"]["listeners"][0];
        assert_eq!(vo["use_original_dst"], true);
        let vi = &b["static_resources"]["listeners"][3];
        assert_eq!(
            vi["filter_chains"][0]["filter_chain_match"]["destination_port"],
            8080
        );
        // The HTTP route has no virtual host for the TCP Service.
        let vhs = b["static_resources"]["listeners"][1]["filter_chains"][0]["filters"][0]
            ["typed_config"]["route_config"]["virtual_hosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect::<Vec<_>>();
        assert!(!vhs.iter().any(|v| v.starts_with("c.")), "{vhs:?}");
    }

    #[test]
    fn tcp_service_inbound_is_a_tcp_proxy_without_the_filter() {
        let b = bootstrap(
            "namespace: ns\nworkloads:\n  - name: c\n    port: tcp-db\n",
            "c",
        );
        let vi = &b["static_resources"]["listeners"][3];
        assert_eq!(vi["name"], "virtualInbound");
        let chain = vi["filter_chains"][0].to_string();
        assert!(
            chain.contains("tcp_proxy") && !chain.contains("hopwatch"),
            "{chain}"
        );
    }

    fn listener<'a>(b: &'a Value, name: &str) -> &'a Value {
        b["static_resources"]["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .unwrap()
    }

    fn cluster<'a>(b: &'a Value, name: &str) -> &'a Value {
        b["static_resources"]["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no cluster {name}"))
    }

    const MTLS: &str = "namespace: ns\nmtls: strict\nworkloads:\n  - name: a\n    peer_authentication: permissive\n    calls: [b, c, d]\n  - name: b\n    instances: [{tag: \"\"}, {tag: dev}]\n  - name: c\n    destination_rule_without_tls: true\n  - name: d\n    port: tcp-db\n";

    #[test]
    fn strict_inbound_is_tls_only_with_the_mounted_certificate() {
        let b = bootstrap(MTLS, "b");
        let vi = listener(&b, "virtualInbound");
        let chains = vi["filter_chains"].as_array().unwrap();
        // The app port's chain and passthrough, both TLS only.
        assert_eq!(chains.len(), 2, "{chains:?}");
        for c in chains {
            let tls = &c["transport_socket"]["typed_config"];
            assert_eq!(tls["require_client_certificate"], true, "{c}");
            let ctx = &tls["common_tls_context"];
            assert_eq!(
                ctx["tls_certificates"][0]["private_key"]["filename"],
                "/etc/certs/key.pem"
            );
            assert_eq!(
                ctx["validation_context"]["trusted_ca"]["filename"],
                "/etc/certs/root-cert.pem"
            );
        }
        assert_eq!(chains[0]["filter_chain_match"]["destination_port"], 8080);
        let filters: Vec<&str> = vi["listener_filters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            filters,
            [
                "envoy.filters.listener.original_dst",
                "envoy.filters.listener.tls_inspector"
            ]
        );
    }

    #[test]
    fn permissive_inbound_tells_tls_from_plain_text() {
        let b = bootstrap(MTLS, "a");
        let chains = listener(&b, "virtualInbound")["filter_chains"]
            .as_array()
            .unwrap()
            .clone();
        let matches: Vec<(Value, Value, bool)> = chains
            .iter()
            .map(|c| {
                (
                    c["filter_chain_match"]["destination_port"].clone(),
                    c["filter_chain_match"]["transport_protocol"].clone(),
                    c.get("transport_socket").is_some(),
                )
            })
            .collect();
        assert_eq!(
            matches,
            [
                (json!(8080), json!("tls"), true),
                (json!(8080), json!("raw_buffer"), false),
                (Value::Null, json!("tls"), true),
                (Value::Null, json!("raw_buffer"), false),
            ]
        );
        // Unique chain names (Envoy refuses duplicates).
        let mut names: Vec<&str> = chains.iter().map(|c| c["name"].as_str().unwrap()).collect();
        names.dedup();
        assert_eq!(names.len(), 4, "{names:?}");
    }

    #[test]
    fn callers_use_mtls_per_subset_except_where_the_destination_rule_turns_it_off() {
        let b = bootstrap(MTLS, "a");
        let tls = |name: &str| cluster(&b, name)["transport_socket"]["typed_config"].clone();
        let dev = tls("outbound|80|dev|b.ns.svc.cluster.local");
        assert_eq!(dev["sni"], "outbound_.80_.dev_.b.ns.svc.cluster.local");
        let ctx = &dev["common_tls_context"];
        // The callee's own identity, not just the mesh's.
        assert_eq!(
            ctx["validation_context"]["match_typed_subject_alt_names"][0]["matcher"]["prefix"],
            "spiffe://cluster.local/ns/ns/sa/b"
        );
        assert_eq!(ctx["alpn_protocols"], json!(CLIENT_ALPN));
        assert_eq!(
            tls("outbound|80||b.ns.svc.cluster.local")["sni"],
            "outbound_.80_._.b.ns.svc.cluster.local"
        );
        // DestinationRule without tls: plain text (into c's STRICT inbound: UC).
        assert!(cluster(&b, "outbound|80||c.ns.svc.cluster.local")
            .get("transport_socket")
            .is_none());
        // A TCP Service: mTLS with Istio's TCP ALPN.
        assert_eq!(
            tls("outbound|80||d.ns.svc.cluster.local")["common_tls_context"]["alpn_protocols"],
            json!(TCP_CLIENT_ALPN)
        );
        // The collector has no sidecar: plain text.
        assert!(cluster(
            &b,
            "outbound|9090||hopwatch-collector.hopwatch.svc.cluster.local"
        )
        .get("transport_socket")
        .is_none());
    }

    #[test]
    fn without_mtls_nothing_is_tls_and_stats_keep_istios_cluster_names() {
        let b = bootstrap(
            "namespace: ns\nworkloads:\n  - name: a\n    calls: [b]\n  - name: b\n",
            "a",
        );
        assert!(!b.to_string().contains("transport_socket"));
        assert!(!b.to_string().contains("tls_inspector"));
        let tags = b["stats_config"]["stats_tags"].as_array().unwrap();
        assert_eq!(tags[0]["tag_name"], "cluster_name");
        assert_eq!(
            listener(&b, "prometheus")["address"]["socket_address"]["port_value"],
            15090
        );
    }
}
