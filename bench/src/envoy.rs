//! Envoy bootstraps for the filter benchmark: one Envoy per filter configuration, each
//! with a `direct_response` listener (Envoy answers itself: all the cost is the proxy's)
//! and a listener routing to a local upstream, node metadata shaped like Istio's, and the
//! collector cluster the hopwatch plugin configuration names.
//!
//! The sidecar round trip: two more pairs of listeners in the same Envoy, as one sidecar
//! holds them. An inbound listener (the inbound filters) routes to "the app", which here
//! is the same Envoy's outbound listener (the outbound filters), whose route answers
//! itself or goes to the local upstream. The inbound route drops the tag header on the
//! way to "the app": an app that propagates its trace headers but not the tag, the case
//! the Lua filter and hopwatch exist for.

use std::path::Path;

use serde_json::{json, Value};

use crate::shapes::FAIL_PATH;

/// The workload's own virtual environment, given to Envoy as `VIRTUAL_ENVIRONMENT_TAG`
/// (read by the Lua filter with `os.getenv` and by wasm filters via `host_env_keys`).
pub const OWN_TAG: &str = "dev.proj1";

/// The upstream cluster (Istio naming) of the upstream listener's route.
pub const UPSTREAM_CLUSTER: &str = "outbound|8080||upstream.bench.svc.cluster.local";
/// The virtual-environment header.
pub const TAG_HEADER: &str = "x-virtual-env";
/// The gRPC upstream cluster (Istio naming, HTTP/2).
pub const GRPC_CLUSTER: &str = "outbound|9000||grpc-upstream.bench.svc.cluster.local";
/// The `:authority` the load generator sends.
pub const UPSTREAM_AUTHORITY: &str = "upstream.bench.svc.cluster.local:8080";

/// The Lua filter of the previous tool: stamps the sidecar's own tag (from
/// `VIRTUAL_ENVIRONMENT_TAG`) on requests that carry none, and nothing else.
pub const LUA_TAG_FILTER: &str = r#"
function envoy_on_request(request_handle)
  local headers = request_handle:headers()
  if headers:get("x-virtual-env") == nil then
    local tag = os.getenv("VIRTUAL_ENVIRONMENT_TAG")
    if tag ~= nil and tag ~= "" then
      headers:add("x-virtual-env", tag)
    end
  end
end
"#;

/// The Lua tag filter as an Envoy HTTP filter.
pub fn lua_filter() -> Value {
    json!({
        "name": "envoy.filters.http.lua",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": { "inline_string": LUA_TAG_FILTER }
        }
    })
}

/// The empty Rust proxy-wasm filter, with the same VM settings as hopwatch's manifest
/// (V8, FAIL_OPEN, `VIRTUAL_ENVIRONMENT_TAG` exposed) so it is the floor hopwatch pays.
pub fn empty_wasm_filter(wasm: &Path) -> Value {
    json!({
        "name": "bench.empty",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "bench.empty",
                "root_id": "",
                "failure_policy": "FAIL_OPEN",
                "vm_config": {
                    "vm_id": "empty",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": { "local": { "filename": wasm.display().to_string() } },
                    "environment_variables": { "host_env_keys": ["VIRTUAL_ENVIRONMENT_TAG"] }
                }
            }
        }
    })
}

/// The empty filter as a host-call probe: `spec` (e.g. `get_property=10`) is its plugin
/// configuration; see `bench/empty-filter`.
pub fn probe_filter(wasm: &Path, spec: &str) -> Value {
    let mut f = empty_wasm_filter(wasm);
    f["name"] = json!("bench.probe");
    f["typed_config"]["config"]["name"] = json!("bench.probe");
    f["typed_config"]["config"]["vm_config"]["vm_id"] = json!("probe");
    f["typed_config"]["config"]["configuration"] = json!({
        "@type": "type.googleapis.com/google.protobuf.StringValue",
        "value": spec
    });
    f
}

/// A filter from the shipped EnvoyFilter with `report_sample_rate` overridden (the only
/// change made to what users deploy, besides the wasm file path).
pub fn with_sample_rate(filter: &Value, rate: f64) -> Value {
    let mut filter = filter.clone();
    let cfg = &mut filter["typed_config"]["config"]["configuration"];
    if let Some(text) = cfg["value"].as_str() {
        if let Ok(mut plugin) = serde_json::from_str::<Value>(text) {
            plugin["report_sample_rate"] = json!(rate);
            cfg["value"] = Value::String(plugin.to_string());
        }
    }
    filter
}

/// A filter with plugin configuration keys overridden (profiling variants).
pub fn with_plugin_overrides(filter: &Value, overrides: &[(String, Value)]) -> Value {
    let mut filter = filter.clone();
    let cfg = &mut filter["typed_config"]["config"]["configuration"];
    if let Some(text) = cfg["value"].as_str() {
        if let Ok(mut plugin) = serde_json::from_str::<Value>(text) {
            for (k, v) in overrides {
                plugin[k.as_str()] = v.clone();
            }
            cfg["value"] = Value::String(plugin.to_string());
        }
    }
    filter
}

fn router() -> Value {
    json!({
        "name": "envoy.filters.http.router",
        "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" }
    })
}

/// Routes answering [`FAIL_PATH`] 503 (the failures of the `mix` traffic shape), then
/// `route` for everything else.
fn with_fail_route(route: Value) -> Vec<Value> {
    let mut fail = route.clone();
    fail["name"] = json!("fail");
    fail["match"] = json!({ "prefix": FAIL_PATH });
    if fail.get("direct_response").is_some() {
        fail["direct_response"] =
            json!({ "status": 503, "body": { "inline_string": "unavailable" } });
    }
    vec![fail, route]
}

fn listener(name: &str, port: u16, routes: Vec<Value>, http_filters: &[Value]) -> Value {
    let mut filters: Vec<Value> = http_filters.to_vec();
    filters.push(router());
    json!({
        "name": name,
        "address": { "socket_address": { "address": "127.0.0.1", "port_value": port } },
        "filter_chains": [{
            "filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": name,
                    "codec_type": "AUTO",
                    "route_config": {
                        "name": "8080",
                        "virtual_hosts": [{
                            "name": "upstream.bench.svc.cluster.local:8080",
                            "domains": ["*"],
                            "routes": routes
                        }]
                    },
                    "http_filters": filters
                }
            }]
        }]
    })
}

/// An inbound cluster to "the app" that speaks the downstream's protocol (HTTP/1.1 for
/// HTTP/1.1 callers, h2c for gRPC), as Istio's inbound clusters do.
fn app_cluster_json(name: &str, port: u16) -> Value {
    let mut c = static_cluster(name, port, false);
    c["typed_extension_protocol_options"] = json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "use_downstream_protocol_config": { "http_protocol_options": {}, "http2_protocol_options": {} }
        }
    });
    c
}

fn static_cluster(name: &str, port: u16, http2: bool) -> Value {
    let mut c = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                "socket_address": { "address": "127.0.0.1", "port_value": port }
            } } }] }]
        }
    });
    if http2 {
        c["typed_extension_protocol_options"] = json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": { "http2_protocol_options": {} }
            }
        });
    }
    c
}

/// Ports of one benchmark Envoy.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub admin: u16,
    /// Listener whose route is a `direct_response`.
    pub direct: u16,
    /// Listener whose route goes to the local upstream.
    pub proxied: u16,
    /// The local upstream server.
    pub upstream: u16,
    /// A `direct_response` listener with the inbound filter, through which the benchmark
    /// sends the inbound requests the outbound calls belong to (hopwatch outbound
    /// configurations: a real sidecar has both filters in one VM).
    pub prime: Option<u16>,
    /// The local gRPC upstream (h2c), when the gRPC shape is measured.
    pub grpc_upstream: Option<u16>,
    /// The sidecar round trip's listeners, when measured.
    pub roundtrip: Option<RoundTripPorts>,
}

/// Listeners of the sidecar round trip: `in_*` take the caller's requests (inbound
/// filters) and pass them to "the app", the matching `out_*` listener (outbound
/// filters), which answers itself (`direct`) or calls the local upstream (`proxied`).
#[derive(Debug, Clone, Copy)]
pub struct RoundTripPorts {
    pub in_direct: u16,
    pub in_proxied: u16,
    pub out_direct: u16,
    pub out_proxied: u16,
}

/// The filters of each side of the round trip.
#[derive(Debug, Clone, Copy)]
pub struct RoundTripFilters<'a> {
    pub inbound: &'a [Value],
    pub outbound: &'a [Value],
}

/// The inbound cluster (Istio naming) through which the round trip's inbound listener
/// reaches "the app" at `port`.
fn app_cluster(port: u16) -> String {
    format!("inbound|{port}||")
}

/// The bootstrap of one benchmark Envoy. `collector` is the cluster named by the plugin
/// configuration's `collector_cluster` and the local collector's gRPC port.
pub fn bootstrap(
    ports: Ports,
    http_filters: &[Value],
    prime_filters: &[Value],
    roundtrip_filters: Option<RoundTripFilters>,
    collector: Option<(&str, u16)>,
) -> Value {
    let direct_route = json!({
        "name": "direct",
        "match": { "prefix": "/" },
        "direct_response": { "status": 200, "body": { "inline_string": "ok" } }
    });
    let upstream_route = json!({
        "name": "default",
        "match": { "prefix": "/" },
        "route": { "cluster": UPSTREAM_CLUSTER, "timeout": "10s" }
    });
    // The proxied routes: gRPC calls to the gRPC upstream (when there is one), the
    // failing path, then everything else to the HTTP upstream.
    let grpc_route = ports.grpc_upstream.map(|_| {
        json!({
            "name": "grpc",
            "match": { "prefix": "/hopwatch.v1.Collector/", "grpc": {} },
            "route": { "cluster": GRPC_CLUSTER, "timeout": "10s" }
        })
    });
    let upstream_routes = || {
        let mut r: Vec<Value> = grpc_route.iter().cloned().collect();
        r.extend(with_fail_route(upstream_route.clone()));
        r
    };
    let direct_routes = || with_fail_route(direct_route.clone());
    let mut listeners = vec![
        listener("direct", ports.direct, direct_routes(), http_filters),
        listener("proxied", ports.proxied, upstream_routes(), http_filters),
    ];
    if let Some(port) = ports.prime {
        listeners.push(listener("inbound", port, direct_routes(), prime_filters));
    }
    let mut clusters = vec![static_cluster(UPSTREAM_CLUSTER, ports.upstream, false)];
    if let Some(port) = ports.grpc_upstream {
        clusters.push(static_cluster(GRPC_CLUSTER, port, true));
    }
    if let Some((name, port)) = collector {
        clusters.push(static_cluster(name, port, true));
    }
    if let (Some(rt), Some(f)) = (ports.roundtrip, roundtrip_filters) {
        for (name, inb, out, out_routes) in [
            ("rt-direct", rt.in_direct, rt.out_direct, direct_routes()),
            (
                "rt-proxied",
                rt.in_proxied,
                rt.out_proxied,
                upstream_routes(),
            ),
        ] {
            let to_app = json!({
                "name": "default",
                "match": { "prefix": "/" },
                "route": { "cluster": app_cluster(out), "timeout": "10s" },
                "request_headers_to_remove": [TAG_HEADER]
            });
            listeners.push(listener(
                &format!("{name}-in"),
                inb,
                vec![to_app],
                f.inbound,
            ));
            listeners.push(listener(
                &format!("{name}-out"),
                out,
                out_routes,
                f.outbound,
            ));
            clusters.push(app_cluster_json(&app_cluster(out), out));
        }
    }
    json!({
        "node": {
            "id": "sidecar~10.1.2.3~bench-client-7d9f8b6c5-x2x4z.bench~bench.svc.cluster.local",
            "cluster": "bench-client.bench",
            "metadata": {
                "WORKLOAD_NAME": "bench-client",
                "NAMESPACE": "bench",
                "NAME": "bench-client-7d9f8b6c5-x2x4z",
                "CLUSTER_ID": "Kubernetes",
                "SERVICE_ACCOUNT": "default",
                "LABELS": {
                    "app": "bench-client",
                    "version": "v1",
                    "virtual-env": OWN_TAG,
                    "service.istio.io/canonical-name": "bench-client"
                }
            }
        },
        "admin": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": ports.admin } } },
        "static_resources": {
            "listeners": listeners,
            "clusters": clusters
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_rate_override_keeps_the_rest_of_the_plugin_configuration() {
        let root = hopwatch_test_envoy::manifests::repo_root();
        let filters = hopwatch_test_envoy::manifests::load_sidecar_filters(&root).unwrap();
        let f = with_sample_rate(&filters.outbound, 0.01);
        let plugin = hopwatch_test_envoy::manifests::plugin_configuration_json(&f).unwrap();
        let orig =
            hopwatch_test_envoy::manifests::plugin_configuration_json(&filters.outbound).unwrap();
        assert_eq!(plugin["report_sample_rate"], 0.01);
        assert_eq!(plugin["direction"], orig["direction"]);
        assert_eq!(plugin["collector_cluster"], orig["collector_cluster"]);
    }

    #[test]
    fn bootstrap_has_both_listeners_and_the_collector_cluster() {
        let ports = Ports {
            admin: 1,
            direct: 2,
            proxied: 3,
            upstream: 4,
            prime: Some(6),
            grpc_upstream: None,
            roundtrip: None,
        };
        let b = bootstrap(
            ports,
            &[lua_filter()],
            &[],
            None,
            Some(("outbound|9090||c", 5)),
        );
        let listeners = b["static_resources"]["listeners"].as_array().unwrap();
        assert_eq!(listeners.len(), 3);
        let hcm = &listeners[0]["filter_chains"][0]["filters"][0]["typed_config"];
        let names: Vec<&str> = hcm["http_filters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["envoy.filters.http.lua", "envoy.filters.http.router"]
        );
        let clusters = b["static_resources"]["clusters"].as_array().unwrap();
        assert_eq!(clusters[1]["name"], "outbound|9090||c");
        assert!(clusters[1]["typed_extension_protocol_options"].is_object());
    }

    #[test]
    fn round_trip_passes_inbound_to_the_outbound_listener_without_the_tag() {
        let ports = Ports {
            admin: 1,
            direct: 2,
            proxied: 3,
            upstream: 4,
            prime: None,
            grpc_upstream: Some(20),
            roundtrip: Some(RoundTripPorts {
                in_direct: 10,
                in_proxied: 11,
                out_direct: 12,
                out_proxied: 13,
            }),
        };
        let inbound = [empty_wasm_filter(Path::new("in.wasm"))];
        let outbound = [lua_filter()];
        let b = bootstrap(
            ports,
            &[],
            &[],
            Some(RoundTripFilters {
                inbound: &inbound,
                outbound: &outbound,
            }),
            None,
        );
        let listeners = b["static_resources"]["listeners"].as_array().unwrap();
        let by_name = |n: &str| {
            listeners
                .iter()
                .find(|l| l["name"] == n)
                .unwrap_or_else(|| panic!("listener {n}"))
        };
        let hcm = |n: &str| by_name(n)["filter_chains"][0]["filters"][0]["typed_config"].clone();
        let rin = hcm("rt-direct-in");
        let routes = rin["route_config"]["virtual_hosts"][0]["routes"]
            .as_array()
            .unwrap();
        let main = routes.last().unwrap();
        assert_eq!(
            routes.len(),
            1,
            "the app route carries every path, gRPC too"
        );
        assert_eq!(main["route"]["cluster"], "inbound|12||");
        assert_eq!(main["request_headers_to_remove"][0], TAG_HEADER);
        assert_eq!(rin["http_filters"][0]["name"], "bench.empty");
        let rout = hcm("rt-direct-out");
        assert_eq!(rout["http_filters"][0]["name"], "envoy.filters.http.lua");
        let out_routes = rout["route_config"]["virtual_hosts"][0]["routes"]
            .as_array()
            .unwrap();
        assert_eq!(out_routes[0]["match"]["prefix"], FAIL_PATH);
        assert_eq!(out_routes[0]["direct_response"]["status"], 503);
        let clusters = b["static_resources"]["clusters"].as_array().unwrap();
        let app = clusters
            .iter()
            .find(|c| c["name"] == "inbound|13||")
            .unwrap();
        assert!(app["typed_extension_protocol_options"]
            .to_string()
            .contains("use_downstream_protocol_config"));
        let proxied_out = hcm("rt-proxied-out");
        let first = &proxied_out["route_config"]["virtual_hosts"][0]["routes"][0];
        assert_eq!(first["route"]["cluster"], GRPC_CLUSTER);
        assert!(clusters.iter().any(|c| c["name"] == GRPC_CLUSTER));
    }
}
