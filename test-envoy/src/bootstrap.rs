//! Envoy bootstrap of one sidecar, shaped like what istiod pushes to an istio-proxy:
//! node metadata as Istio sets it, an inbound listener to the local app
//! (`inbound|<port>||`), an outbound listener routing by authority to
//! `outbound|80|<subset>|<fqdn>` clusters with virtual-environment subset routes (most
//! specific tag first, each matching the tag and its sub-environments, then the default
//! subset) with Istio's default retry policy and no route timeout, request ids generated
//! by Envoy's UUID extension, and the topology's tracer (none by default, as in Istio
//! since 1.22; Zipkin or OpenTelemetry with a sampling percentage). The hopwatch wasm
//! filters come verbatim from the sidecar EnvoyFilter manifest.
//!
//! Services whose port is named `grpc*`/`http2*` get HTTP/2 clusters (sidecar to sidecar
//! and inbound sidecar to app, h2c), as Istio does. Policies render as istiod renders
//! them, before the hopwatch filter (Istio's HTTP filter order: ..., rbac, ..., fault,
//! ..., then an EnvoyFilter inserted before the router): `deny_all` is an RBAC filter
//! with a DENY policy named like Istio's (`ns[NS]-policy[deny-NAME]-rule[0]`) on the
//! workload's inbound side; `fault_abort` is the fault filter on every outbound side,
//! configured per route on the routes to that service.

use std::path::Path;

use serde_json::{json, Value};

use crate::manifests::{plugin_configuration_json, with_wasm_file, SidecarFilters};
use crate::mtls;
use crate::plan::{InstancePlan, Plan};
use crate::topology::{MtlsMode, RetryMode, Topology, TracingMode};

/// Where a rendered bootstrap points at files and hosts.
#[derive(Debug, Clone)]
pub struct RenderTarget<'a> {
    /// Path of the wasm file as Envoy will see it.
    pub wasm: &'a Path,
    /// Access log path (`/dev/stdout` in containers).
    pub access_log: String,
    /// Address every port lives on (loopback).
    pub host: &'a str,
    /// Where the mesh CA and workload certificates are ([`crate::mtls`]); needed when the
    /// topology uses mTLS.
    pub tls_dir: Option<&'a Path>,
}

/// The collector cluster name the manifest's plugin configuration names.
pub fn collector_cluster_name(filters: &SidecarFilters) -> String {
    plugin_configuration_json(&filters.outbound)
        .and_then(|c| c["collector_cluster"].as_str().map(str::to_string))
        // The contract's default when the manifest does not set one.
        .unwrap_or_else(|| "hopwatch-collector".to_string())
}

pub fn socket(host: &str, port: u16) -> Value {
    json!({"socket_address": {"address": host, "port_value": port}})
}

pub fn static_cluster(name: &str, host: &str, ports: &[u16], http2: bool) -> Value {
    let lb_endpoints: Vec<Value> = ports
        .iter()
        .map(|p| json!({"endpoint": {"address": socket(host, *p)}}))
        .collect();
    let mut cluster = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": if lb_endpoints.is_empty() { json!([]) } else { json!([{"lb_endpoints": lb_endpoints}]) },
        },
    });
    if http2 {
        cluster["typed_extension_protocol_options"] = json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        });
    }
    cluster
}

pub fn access_log(path: &str, side: &str, tag_header: &str) -> Value {
    let format = format!(
        "[%START_TIME%] {side} \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" \
         %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% cluster=%UPSTREAM_CLUSTER% \
         upstream=%UPSTREAM_HOST% authority=%REQ(:AUTHORITY)% tag=%REQ({tag})% \
         traceid=%REQ(X-B3-TRACEID)% spanid=%REQ(X-B3-SPANID)% requestid=%REQ(X-REQUEST-ID)%\n",
        tag = tag_header.to_ascii_uppercase()
    );
    json!({
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": path,
            "log_format": {"text_format_source": {"inline_string": format}},
        }
    })
}

/// The cluster the OpenTelemetry tracer exports spans to (gRPC; a dead port here).
pub const OTEL_CLUSTER: &str = "opentelemetry";

/// Istio's tracing block for the topology's provider (None: no tracer, Istio's default
/// since 1.22). Zipkin: 128-bit trace ids and one span per side; OpenTelemetry: W3C
/// trace context only. `random_sampling` is the provider's sampling percentage.
pub fn tracing(mode: TracingMode, sampling: f64, service: &str) -> Option<Value> {
    let provider = match mode {
        TracingMode::None => return None,
        TracingMode::Zipkin => json!({
            "name": "envoy.tracers.zipkin",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig",
                "collector_cluster": "zipkin",
                "collector_endpoint": "/api/v2/spans",
                "collector_endpoint_version": "HTTP_JSON",
                "trace_id_128bit": true,
                "shared_span_context": false,
            }
        }),
        TracingMode::Opentelemetry => json!({
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": OTEL_CLUSTER}, "timeout": "1s"},
                "service_name": service,
            }
        }),
    };
    Some(json!({
        "client_sampling": {"value": 100.0},
        "random_sampling": {"value": sampling},
        "overall_sampling": {"value": 100.0},
        "provider": provider,
    }))
}

/// Envoy's UUID request-id extension as Istio configures it: the trace decision is
/// packed into (and read from) one digit of `x-request-id`.
fn request_id_extension() -> Value {
    json!({
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
            "pack_trace_reason": true,
            "use_request_id_for_trace_sampling": true,
        }
    })
}

/// Istio's default retry policy of every outbound route
/// (`pilot/pkg/networking/core/route/retry`): every attempt carries the same trace
/// context and request id, and the upstream sees `x-envoy-attempt-count`.
pub fn istio_retry_policy() -> Value {
    json!({
        "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        "num_retries": 2,
        "retriable_status_codes": [503],
        "retry_host_predicate": [{
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate",
            },
        }],
        "host_selection_retry_max_attempts": "5",
    })
}

fn router() -> Value {
    json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
    })
}

#[allow(clippy::too_many_arguments)]
pub fn listener(
    name: &str,
    direction: &str,
    host: &str,
    port: u16,
    stat_prefix: &str,
    route_config: Value,
    before: Vec<Value>,
    wasm_filter: Value,
    access_log: Value,
    tracing: Option<Value>,
) -> Value {
    let mut http_filters = before;
    http_filters.push(wasm_filter);
    http_filters.push(router());
    let mut hcm = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": stat_prefix,
        "generate_request_id": true,
        "request_id_extension": request_id_extension(),
        "access_log": [access_log],
        "route_config": route_config,
        "http_filters": http_filters,
    });
    if let Some(t) = tracing {
        hcm["tracing"] = t;
    }
    json!({
        "name": name,
        "traffic_direction": direction,
        "address": socket(host, port),
        "filter_chains": [{
            "filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": hcm,
            }]
        }]
    })
}

/// A regex matching `tag` and its sub-environments (`dev` matches `dev`, `dev.proj1`, ...).
pub fn tag_regex(tag: &str) -> String {
    let mut escaped = String::new();
    for c in tag.chars() {
        if !c.is_ascii_alphanumeric() && c != '_' && c != '-' {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    format!("^{escaped}(\\..*)?$")
}

/// The Istio cluster name of a subset (`""` = the default subset).
pub fn outbound_cluster(subset: &str, fqdn: &str) -> String {
    format!("outbound|80|{subset}|{fqdn}")
}

/// An outbound route action as istiod writes it: no route timeout (`0s`), and the
/// topology's retry policy.
fn route_action(topology: &Topology, cluster: &str) -> Value {
    let mut action = json!({"cluster": cluster, "timeout": "0s"});
    if topology.retries == RetryMode::Istio {
        action["retry_policy"] = istio_retry_policy();
    }
    action
}

/// Envoy's RBAC filter denying every request, as istiod renders an AuthorizationPolicy
/// `deny-<workload>` with action DENY and an empty rule.
pub fn rbac_deny_all(namespace: &str, workload: &str) -> Value {
    json!({
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "DENY", "policies": {
                format!("ns[{namespace}]-policy[deny-{workload}]-rule[0]"): {
                    "permissions": [{"any": true}],
                    "principals": [{"any": true}],
                }
            }},
        }
    })
}

/// Envoy's fault filter with no configuration of its own (routes carry the fault).
pub fn fault_filter() -> Value {
    json!({
        "name": "envoy.filters.http.fault",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}
    })
}

/// The per-route fault of a VirtualService `fault.abort` (100% of the requests).
fn route_fault_abort(status: u16) -> Value {
    json!({
        "envoy.filters.http.fault": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
            "abort": {"http_status": status, "percentage": {"numerator": 100, "denominator": "HUNDRED"}},
        }
    })
}

/// The outbound route configuration every sidecar shares: one virtual host per Service.
pub fn outbound_routes(plan: &Plan) -> Value {
    let topology = &plan.topology;
    let mut virtual_hosts = Vec::new();
    for w in topology.workloads.iter().filter(|w| !w.external) {
        let ns = w.namespace(topology);
        let fqdn = topology.service_fqdn(&w.name, ns);
        let mut tags: Vec<&str> = w
            .instances
            .iter()
            .map(|i| i.tag.as_str())
            .filter(|t| !t.is_empty() && !w.missing_tag_routes.iter().any(|m| m == t))
            .collect();
        // Most specific first: more levels, then longer, so `dev.proj1` wins over `dev`.
        tags.sort_by_key(|t| {
            (
                std::cmp::Reverse(t.split('.').count()),
                std::cmp::Reverse(t.len()),
            )
        });
        let mut routes: Vec<Value> = tags
            .iter()
            .map(|t| {
                json!({
                    "name": format!("{}.{}.{}", w.name, ns, t),
                    "match": {
                        "prefix": "/",
                        "headers": [{
                            "name": topology.tag_header,
                            "string_match": {"safe_regex": {"regex": tag_regex(t)}},
                        }],
                    },
                    "route": route_action(topology, &outbound_cluster(t, &fqdn)),
                    "decorator": {"operation": format!("{fqdn}:80/*")},
                })
            })
            .collect();
        routes.push(json!({
            "name": "default",
            "match": {"prefix": "/"},
            "route": route_action(topology, &outbound_cluster("", &fqdn)),
            "decorator": {"operation": format!("{fqdn}:80/*")},
        }));
        if let Some(status) = w.fault_abort {
            for r in routes.iter_mut() {
                r["typed_per_filter_config"] = route_fault_abort(status);
            }
        }
        let short = format!("{}.{}", w.name, ns);
        virtual_hosts.push(json!({
            "name": format!("{fqdn}:80"),
            "domains": [fqdn.clone(), format!("{fqdn}:80"), w.name.clone(), format!("{}:80", w.name), short.clone(), format!("{short}:80")],
            "routes": routes,
            "include_request_attempt_count": true,
        }));
    }
    // Hosts the topology leaves unrouted: a virtual host without routes, so Envoy
    // answers 404 NR (a VirtualService whose route is missing).
    if !topology.unrouted_services.is_empty() {
        let domains: Vec<String> = topology
            .unrouted_services
            .iter()
            .flat_map(|u| {
                let fqdn = topology.fqdn(u);
                [
                    u.clone(),
                    format!("{u}:80"),
                    fqdn.clone(),
                    format!("{fqdn}:80"),
                ]
            })
            .collect();
        virtual_hosts.push(json!({"name": "unrouted", "domains": domains, "routes": []}));
    }
    // Any other host: outside the mesh, through PassthroughCluster (Istio's
    // outboundTrafficPolicy ALLOW_ANY, the default).
    virtual_hosts.push(json!({
        "name": "allow_any",
        "domains": ["*"],
        "routes": [{
            "name": "allow_any",
            "match": {"prefix": "/"},
            "route": {"cluster": PASSTHROUGH_CLUSTER, "timeout": "0s"},
        }],
        "include_request_attempt_count": true,
    }));
    json!({"name": "80", "validate_clusters": false, "virtual_hosts": virtual_hosts})
}

/// The outbound clusters of every Service: the default subset and one per tag; over mTLS
/// (the caller's certificate, Istio's SNI and ALPN) where the callee is called so.
fn outbound_clusters(
    plan: &Plan,
    host: &str,
    caller: &InstancePlan,
    tls_dir: Option<&Path>,
) -> Vec<Value> {
    let topology = &plan.topology;
    let mut clusters = Vec::new();
    for w in topology.workloads.iter().filter(|w| !w.external) {
        let fqdn = topology.service_fqdn(&w.name, w.namespace(topology));
        let tls = |subset: &str| {
            let dir = tls_dir.filter(|_| w.called_over_mtls(topology))?;
            Some(mtls::upstream_transport_socket(
                dir,
                caller,
                &topology.cluster_domain,
                &mtls::sni(80, subset, &fqdn),
                w.namespace(topology),
                w.service_account(),
            ))
        };
        let with_tls = |mut c: Value, subset: &str| {
            if let Some(t) = tls(subset) {
                c["transport_socket"] = t;
            }
            c
        };
        let ports = |tag: &str| -> Vec<u16> {
            plan.instances_of(&w.name)
                .filter(|i| i.tag == tag)
                .map(InstancePlan::endpoint_port)
                .collect()
        };
        clusters.push(with_tls(
            static_cluster(&outbound_cluster("", &fqdn), host, &ports(""), w.http2()),
            "",
        ));
        for i in &w.instances {
            if !i.tag.is_empty() {
                clusters.push(with_tls(
                    static_cluster(
                        &outbound_cluster(&i.tag, &fqdn),
                        host,
                        &ports(&i.tag),
                        w.http2(),
                    ),
                    &i.tag,
                ));
            }
        }
    }
    // Istio's PassthroughCluster is ORIGINAL_DST (the address the app connected to,
    // before iptables redirected it); here apps call their sidecar's outbound listener
    // directly, so it is the one destination outside the mesh the topology defines (or
    // no endpoint at all).
    let external: Vec<u16> = plan
        .instances
        .iter()
        .filter(|i| i.external)
        .map(|i| i.app_port)
        .collect();
    clusters.push(static_cluster(PASSTHROUGH_CLUSTER, host, &external, false));
    clusters
}

/// The cluster of destinations outside the mesh.
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";

/// The node block of a sidecar, as Istio's injector and istio-agent fill it: every pod
/// label in `LABELS` (the canonical name from `app.kubernetes.io/name`, else `app`),
/// `node.cluster` = `<app>.<ns>`, the pod's service account, IPs and cluster id.
pub fn node(instance: &InstancePlan, host: &str, cluster_domain: &str) -> Value {
    let mut labels = json!({
        "app": instance.app_label,
        "service.istio.io/canonical-name": instance.canonical_name,
        "service.istio.io/canonical-revision": "latest",
        "security.istio.io/tlsMode": "istio",
        "pod-template-hash": "5d8f7c9b6",
    });
    if let Some(name) = &instance.k8s_name {
        labels["app.kubernetes.io/name"] = json!(name);
    }
    if !instance.tag.is_empty() {
        labels["virtual-env"] = json!(instance.tag);
    }
    json!({
        "id": format!("sidecar~{host}~{}.{}~{}.svc.{cluster_domain}", instance.pod, instance.namespace, instance.namespace),
        "cluster": format!("{}.{}", instance.app_label, instance.namespace),
        "metadata": {
            "NAME": instance.pod,
            "NAMESPACE": instance.namespace,
            "WORKLOAD_NAME": instance.workload_name,
            "CLUSTER_ID": "Kubernetes",
            "INSTANCE_IPS": host,
            "SERVICE_ACCOUNT": instance.service_account,
            "MESH_ID": cluster_domain,
            "ISTIO_VERSION": "1.28.0",
            "INTERCEPTION_MODE": "REDIRECT",
            "APP_CONTAINERS": instance.service,
            "OWNER": format!("kubernetes://apis/apps/v1/namespaces/{}/deployments/{}", instance.namespace, instance.workload_name),
            "LABELS": labels,
        }
    })
}

/// Turns the inbound listener's one plain-text filter chain into what a
/// PeerAuthentication sets up: STRICT, one TLS chain requiring a mesh client certificate;
/// PERMISSIVE, that chain for TLS connections and the plain one for the rest (the TLS
/// inspector tells them apart), as Istio's virtualInbound does.
fn inbound_mtls(
    listener: &mut Value,
    mode: MtlsMode,
    dir: &Path,
    instance: &InstancePlan,
    trust_domain: &str,
) {
    let plain = listener["filter_chains"][0].clone();
    let tls = mtls::inbound_transport_socket(dir, instance, trust_domain);
    listener["filter_chains"] = json!(mtls::inbound_filter_chains(plain, mode, tls));
    listener["listener_filters"] = json!([mtls::tls_inspector()]);
}

/// The filter as this sidecar runs it: with `mtls: off` the local mesh has no mesh
/// identity at all (no certificates, every caller plain text), so the filter could tell
/// no mesh peer from an outside caller and, with the shipped `annotate_external: false`,
/// would annotate no inbound response; the mesh's scenarios read those annotations, as a
/// mesh without mTLS would set `annotate_external: true` to keep them. With STRICT or
/// PERMISSIVE mTLS the shipped default stays: peers are known by their certificates.
/// A value the topology's `filter_config` sets explicitly is kept.
pub fn filter_for_mtls_mode(filter: &Value, mode: MtlsMode) -> Value {
    let mut filter = filter.clone();
    if mode != MtlsMode::Off {
        return filter;
    }
    if let Some(mut cfg) = plugin_configuration_json(&filter) {
        if cfg.get("annotate_external").is_none() {
            cfg["annotate_external"] = Value::Bool(true);
            filter["typed_config"]["config"]["configuration"]["value"] =
                Value::String(cfg.to_string());
        }
    }
    filter
}

/// The full bootstrap of `instance`'s sidecar (None when it has no sidecar).
pub fn sidecar_bootstrap(
    plan: &Plan,
    instance: &InstancePlan,
    filters: &SidecarFilters,
    target: &RenderTarget<'_>,
) -> Option<Value> {
    let ports = instance.sidecar?;
    let host = target.host;
    let tag_header = &plan.topology.tag_header;
    let inbound_cluster = format!("inbound|{}||", instance.app_port);
    let inbound_routes = json!({
        "name": inbound_cluster,
        "validate_clusters": false,
        "virtual_hosts": [{
            "name": format!("inbound|http|{}", instance.app_port),
            "domains": ["*"],
            "routes": [{
                "name": "default",
                "match": {"prefix": "/"},
                "route": {"cluster": inbound_cluster, "timeout": "0s"},
                "decorator": {"operation": format!("{}:{}/*", instance.fqdn(), instance.app_port)},
            }],
        }],
    });
    let workload = plan.workload(&instance.service);
    // h2c to an app on a grpc-*/http2-* port, as Istio's inbound cluster does.
    let app_http2 = workload.is_some_and(|w| w.http2());
    let inbound_before = match workload {
        Some(w) if w.deny_all => vec![rbac_deny_all(&instance.namespace, &instance.service)],
        _ => vec![],
    };
    let outbound_before = if plan
        .topology
        .workloads
        .iter()
        .any(|w| w.fault_abort.is_some())
    {
        vec![fault_filter()]
    } else {
        vec![]
    };
    let mut clusters = vec![
        static_cluster(&inbound_cluster, host, &[instance.app_port], app_http2),
        static_cluster(
            &collector_cluster_name(filters),
            host,
            &[plan.collector_grpc],
            true,
        ),
        static_cluster("zipkin", host, &[plan.zipkin_port], false),
        static_cluster(OTEL_CLUSTER, host, &[plan.zipkin_port], true),
    ];
    let topology = &plan.topology;
    let tracing = || {
        tracing(
            topology.tracing,
            topology.sampling_percent(),
            &format!("{}.{}", instance.service, instance.namespace),
        )
    };
    clusters.extend(outbound_clusters(plan, host, instance, target.tls_dir));
    let mode = workload.map_or(MtlsMode::Off, |w| w.mtls(topology));
    // No certificates on disk: no mesh identity either, whatever the topology says.
    let identity_mode = if target.tls_dir.is_some() {
        mode
    } else {
        MtlsMode::Off
    };
    let inbound_filter = filter_for_mtls_mode(&filters.inbound, identity_mode);
    let outbound_filter = filter_for_mtls_mode(&filters.outbound, identity_mode);
    let mut inbound = listener(
        "virtualInbound",
        "INBOUND",
        host,
        ports.inbound,
        &format!("inbound_0.0.0.0_{}", instance.app_port),
        inbound_routes,
        inbound_before,
        with_wasm_file(&inbound_filter, target.wasm),
        access_log(&target.access_log, "inbound", tag_header),
        tracing(),
    );
    if let (Some(dir), true) = (target.tls_dir, mode != MtlsMode::Off) {
        inbound_mtls(&mut inbound, mode, dir, instance, &topology.cluster_domain);
    }
    Some(json!({
        "node": node(instance, host, &plan.topology.cluster_domain),
        "admin": {"address": socket(host, ports.admin)},
        "static_resources": {
            "listeners": [
                inbound,
                listener(
                    "virtualOutbound",
                    "OUTBOUND",
                    host,
                    ports.outbound,
                    "outbound_0.0.0.0_80",
                    outbound_routes(plan),
                    outbound_before,
                    with_wasm_file(&outbound_filter, target.wasm),
                    access_log(&target.access_log, "outbound", tag_header),
                    tracing(),
                ),
            ],
            "clusters": clusters,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::plan::PortSource;
    use crate::topology::Topology;

    /// `mtls: off` has no mesh identity: the rendered filters annotate external callers;
    /// with mTLS the shipped default (false, key absent) stays; an explicit value stays.
    #[test]
    fn annotate_external_is_on_only_without_mesh_identity() {
        let filters = crate::manifests::load_sidecar_filters(&crate::manifests::repo_root())
            .expect("shipped manifests");
        let key = |f: &Value| plugin_configuration_json(f).unwrap()["annotate_external"].clone();
        assert_eq!(
            key(&filters.inbound),
            Value::Null,
            "shipped default: absent (false)"
        );
        let off = filter_for_mtls_mode(&filters.inbound, MtlsMode::Off);
        assert_eq!(key(&off), Value::Bool(true));
        for mode in [MtlsMode::Strict, MtlsMode::Permissive] {
            assert_eq!(
                key(&filter_for_mtls_mode(&filters.inbound, mode)),
                Value::Null
            );
        }
        let mut explicit: serde_json::Map<String, Value> = serde_json::Map::new();
        explicit.insert("annotate_external".into(), Value::Bool(false));
        let pinned = crate::manifests::with_plugin_overrides(filters, &explicit);
        assert_eq!(
            key(&filter_for_mtls_mode(&pinned.inbound, MtlsMode::Off)),
            Value::Bool(false)
        );
    }

    fn routes_of(yaml: &str, service: &str) -> Vec<(String, String)> {
        let topology = Topology::parse(yaml, "t").unwrap();
        let plan = Plan::new(&topology, &PortSource::From(30000)).unwrap();
        let routes = outbound_routes(&plan);
        let vh = routes["virtual_hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| {
                v["domains"][0]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("{service}."))
            })
            .unwrap()
            .clone();
        vh["routes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let regex = r["match"]["headers"][0]["string_match"]["safe_regex"]["regex"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                (regex, r["route"]["cluster"].as_str().unwrap().to_string())
            })
            .collect()
    }

    #[test]
    fn subset_routes_fall_back_level_by_level_and_skip_missing_routes() {
        let routes = routes_of(
            "namespace: ns\nworkloads:\n  - name: b\n    missing_tag_routes: [dev.mia]\n    instances:\n      - tag: dev\n      - tag: \"\"\n      - tag: dev.proj1\n      - tag: dev.mia\n",
            "b",
        );
        let expected = [
            (
                "^dev\\.proj1(\\..*)?$",
                "outbound|80|dev.proj1|b.ns.svc.cluster.local",
            ),
            ("^dev(\\..*)?$", "outbound|80|dev|b.ns.svc.cluster.local"),
            ("", "outbound|80||b.ns.svc.cluster.local"),
        ];
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(routes, expected);
    }

    #[test]
    fn tag_regex_matches_the_tag_and_its_sub_environments_only() {
        assert_eq!(tag_regex("dev.proj1"), "^dev\\.proj1(\\..*)?$");
    }
}
