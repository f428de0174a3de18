//! The Kubernetes YAML of a pod mesh, as `podman kube play` runs it (and `kubectl apply`
//! would, with images and hostPath files available on the node): one `Pod` per instance,
//! shaped like an Istio-injected pod (an `istio-init` init container installing the
//! capture rules, the app, an `istio-proxy` container running Envoy as uid 1337 with
//! the hopwatch filter), the collector's `Pod`, and the `Service`s (documentation for
//! `kubectl`; `podman kube play` gets only the pods, addresses come from `hostAliases`).
//! With mTLS, each istio-proxy mounts its own certificate, key and the mesh CA
//! (`hostPath` files under the config dir's `tls/`, which the harness writes and removes
//! with the run directory).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::capture::PROXY_UID;
use super::layout::{BOOTSTRAP_IN_POD, WASM_IN_POD};
use super::plan::{
    PodPlan, APP_ADMIN_PORT, APP_PORT, COLLECTOR_GRPC_PORT, COLLECTOR_HTTP_PORT,
    COLLECTOR_NAMESPACE, COLLECTOR_SERVICE,
};
use super::podman::Images;
use crate::mtls::{self, CertPaths};
use crate::plan::InstancePlan;

/// Where the capture rules are mounted in the init container.
pub const RULES_IN_POD: &str = "/etc/istio/capture/rules";

/// Where the mesh's CA and workload certificates ([`crate::mtls::write_mesh_certs`]) are
/// written under the config dir, for topologies with mTLS.
pub fn tls_dir(config_dir: &Path) -> PathBuf {
    config_dir.join("tls")
}

/// Host files the pods mount.
#[derive(Debug, Clone, Copy)]
pub struct HostFiles<'a> {
    /// Directory holding `<pod>.envoy.json` and `capture.rules`.
    pub config_dir: &'a Path,
    pub wasm: &'a Path,
}

/// How the collector runs.
#[derive(Debug, Clone)]
pub struct CollectorSpec {
    pub trace_quiet: String,
    pub rust_log: String,
}

/// The pod's name (`name_suffix` keeps parallel meshes apart on one host).
pub fn pod_name(inst: &InstancePlan, name_suffix: &str) -> String {
    format!("{}{name_suffix}", inst.workload_name)
}

pub fn collector_pod_name(name_suffix: &str) -> String {
    format!("{COLLECTOR_SERVICE}{name_suffix}")
}

fn host_aliases(pp: &PodPlan) -> Value {
    Value::Array(
        pp.services
            .iter()
            .map(|s| json!({"ip": s.vip.to_string(), "hostnames": s.hostnames()}))
            .collect(),
    )
}

fn host_file(name: &str, path: &Path) -> Value {
    json!({"name": name, "hostPath": {"path": path.display().to_string(), "type": "File"}})
}

/// The `Pod` of `pp.plan.instances[index]`.
pub fn instance_pod(
    pp: &PodPlan,
    index: usize,
    images: &Images,
    files: HostFiles<'_>,
    name_suffix: &str,
) -> Option<Value> {
    let inst = pp.plan.instances.get(index)?;
    let (workload, _) = pp.definition(inst)?;
    let name = pod_name(inst, name_suffix);
    let mut labels = json!({
        "app": inst.service,
        "service.istio.io/canonical-name": inst.service,
    });
    if !inst.tag.is_empty() && pp.has_subset_label(inst) {
        labels["virtual-env"] = json!(inst.tag);
    }
    let mut annotations = json!({
        // podman 4.3 fails to remove a finished "once" init container; "always" reruns
        // it on every pod start, which is what capture rules need anyway.
        "io.podman.annotations.init.container.type": "always",
    });
    let mut containers = Vec::new();
    let mut init = Vec::new();
    let mut volumes = Vec::new();
    if inst.sidecar.is_some() {
        labels["hopwatch.io/enabled"] = json!("true");
        annotations["sidecar.istio.io/status"] =
            json!(r#"{"initContainers":["istio-init"],"containers":["istio-proxy"]}"#);
        annotations["traffic.sidecar.istio.io/excludeInboundPorts"] =
            json!(APP_ADMIN_PORT.to_string());
        init.push(json!({
            "name": "istio-init",
            "image": images.proxy,
            "command": ["iptables-restore", RULES_IN_POD],
            "securityContext": {
                "runAsUser": 0,
                "capabilities": {"add": ["NET_ADMIN", "NET_RAW"]},
            },
            "volumeMounts": [{"name": "capture-rules", "mountPath": RULES_IN_POD, "readOnly": true}],
        }));
        let mut env = vec![];
        if !inst.tag.is_empty() && pp.has_subset_label(inst) {
            // Istio: proxyMetadata (or the webhook, from the pod's label) turns the tag
            // into this variable; a pod without the label gets none.
            env.push(json!({"name": "VIRTUAL_ENVIRONMENT_TAG", "value": inst.tag}));
        }
        let mut mounts = vec![
            json!({"name": "istio-envoy", "mountPath": BOOTSTRAP_IN_POD, "readOnly": true}),
            json!({"name": "hopwatch-wasm", "mountPath": WASM_IN_POD, "readOnly": true}),
        ];
        if pp.plan.topology.uses_mtls() {
            // Only this pod's own key, its certificate and the CA, at Istio's
            // file-mounted certificate paths (the bootstrap's TLS contexts read them).
            let dir = tls_dir(files.config_dir);
            let (cert, key) = mtls::instance_files(&dir, inst);
            let inside = CertPaths::mounted();
            for (name, host, path) in [
                ("istio-certs-chain", cert, inside.cert_chain),
                ("istio-certs-key", key, inside.key),
                ("istio-certs-root", mtls::ca_file(&dir), inside.root),
            ] {
                mounts.push(json!({"name": name, "mountPath": path.display().to_string(), "readOnly": true}));
                volumes.push(host_file(name, &host));
            }
        }
        containers.push(json!({
            "name": "istio-proxy",
            "image": images.proxy,
            "command": [
                "envoy", "-c", BOOTSTRAP_IN_POD, "--concurrency", "1",
                "--log-level", "warning", "--component-log-level", "wasm:info",
                "--service-node", inst.pod, "--service-cluster", inst.workload_name,
            ],
            "env": env,
            "securityContext": {"runAsUser": PROXY_UID, "runAsGroup": PROXY_UID},
            "volumeMounts": mounts,
        }));
        volumes.push(host_file(
            "capture-rules",
            &files.config_dir.join("capture.rules"),
        ));
        volumes.push(host_file(
            "istio-envoy",
            &files
                .config_dir
                .join(format!("{}.envoy.json", inst.file_stem())),
        ));
        volumes.push(host_file("hopwatch-wasm", files.wasm));
    }
    if !inst.app_down {
        let listen = if workload.listen_loopback_only {
            format!("127.0.0.1:{APP_PORT}")
        } else {
            format!("0.0.0.0:{APP_PORT}")
        };
        let mut args = vec![
            "hopwatch-demo-service".to_string(),
            "--listen".into(),
            listen,
            "--admin-listen".into(),
            format!("0.0.0.0:{APP_ADMIN_PORT}"),
            "--workload".into(),
            inst.workload_name.clone(),
            "--namespace".into(),
            inst.namespace.clone(),
            "--tag".into(),
            inst.tag.clone(),
            "--fail-on-error".into(),
            inst.fail_on_error.to_string(),
        ];
        for c in &inst.calls {
            args.push("--call".into());
            args.push(c.clone());
        }
        for c in &inst.copy {
            args.push("--copy".into());
            args.push(c.clone());
        }
        containers.insert(
            0,
            json!({
                "name": "app",
                "image": images.demo,
                // No `ports`: podman 4.3 publishes a containerPort on the host (and
                // every pod uses 8080); the Service below documents the port.
                "command": args,
            }),
        );
    }
    let mut spec = json!({
        // podman 4.3 waits 20 s for an init container to exit under "Always".
        "restartPolicy": "Never",
        "hostAliases": host_aliases(pp),
        "containers": containers,
    });
    if !init.is_empty() {
        spec["initContainers"] = Value::Array(init);
    }
    if !volumes.is_empty() {
        spec["volumes"] = Value::Array(volumes);
    }
    Some(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": inst.namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": spec,
    }))
}

/// The collector's `Pod` (no sidecar: it would report its own Report calls).
pub fn collector_pod(
    pp: &PodPlan,
    images: &Images,
    spec: &CollectorSpec,
    name_suffix: &str,
) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": collector_pod_name(name_suffix),
            "namespace": COLLECTOR_NAMESPACE,
            "labels": {"app": COLLECTOR_SERVICE},
        },
        "spec": {
            "restartPolicy": "Never",
            "hostAliases": host_aliases(pp),
            "containers": [{
                "name": "collector",
                "image": images.collector,
                "command": [
                    "hopwatch-collector",
                    "--listen", format!("0.0.0.0:{COLLECTOR_GRPC_PORT}"),
                    "--http-listen", format!("0.0.0.0:{COLLECTOR_HTTP_PORT}"),
                    "--data-dir", "/tmp/hopwatch-data",
                    "--trace-quiet", spec.trace_quiet,
                ],
                "env": [
                    {"name": "NO_COLOR", "value": "1"},
                    {"name": "RUST_LOG", "value": spec.rust_log},
                ],
            }],
        },
    })
}

/// The `Service`s (for `kubectl apply`; `podman kube play` resolves names by hostAliases).
pub fn services(pp: &PodPlan) -> Vec<Value> {
    pp.services
        .iter()
        .map(|s| {
            json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": s.name, "namespace": s.namespace},
                "spec": {
                    "selector": {"app": s.name},
                    "ports": [{"name": s.port_name, "port": s.port, "targetPort": s.target_port}],
                },
            })
        })
        .collect()
}

/// Documents as one multi-document YAML text.
pub fn to_yaml(docs: &[Value]) -> String {
    docs.iter()
        .map(|d| serde_yaml_ng::to_string(d).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Everything one `podman kube play` of a mesh needs, in play order.
#[derive(Debug, Clone, Default)]
pub struct Played {
    /// The Pod documents (collector first).
    pub docs: Vec<Value>,
    /// The static address of each document's pod (`--ip`, same order).
    pub ips: Vec<std::net::Ipv4Addr>,
    pub pods: Vec<String>,
    /// `<pod>-<container>`, as podman names them.
    pub containers: Vec<String>,
    /// `(file name in the config dir, bootstrap)` of every sidecar.
    pub bootstraps: Vec<(String, Value)>,
}

/// The pods of a mesh and the files they mount: what the pods runtime plays and what
/// `hopwatch-mesh render --runtime pods` writes.
pub fn mesh_pods(
    pp: &PodPlan,
    images: &Images,
    files: HostFiles<'_>,
    filters: &crate::manifests::SidecarFilters,
    collector: Option<&CollectorSpec>,
    name_suffix: &str,
) -> Played {
    let mut p = Played::default();
    if let Some(spec) = collector {
        let name = collector_pod_name(name_suffix);
        p.docs.push(collector_pod(pp, images, spec, name_suffix));
        p.ips.push(pp.collector_ip);
        p.containers.push(format!("{name}-collector"));
        p.pods.push(name);
    }
    for (i, inst) in pp.plan.instances.iter().enumerate() {
        if let Some(b) = super::layout::pod_sidecar_bootstrap(pp, i, filters) {
            p.bootstraps
                .push((format!("{}.envoy.json", inst.file_stem()), b));
        }
        let Some(doc) = instance_pod(pp, i, images, files, name_suffix) else {
            continue;
        };
        let name = pod_name(inst, name_suffix);
        for c in doc["spec"]["containers"].as_array().into_iter().flatten() {
            p.containers
                .push(format!("{name}-{}", c["name"].as_str().unwrap_or("?")));
        }
        p.docs.push(doc);
        if let Some(ip) = pp.pod_ips.get(i) {
            p.ips.push(*ip);
        }
        p.pods.push(name);
    }
    p
}
