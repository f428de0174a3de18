//! A topology resolved to concrete processes and loopback ports: every instance's app
//! port, its sidecar's inbound/outbound/admin ports, the collector's ports, and the
//! Istio-style names (workload, pod, clusters) the sidecars use.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::topology::{Topology, Workload};

/// Errors planning a mesh.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("cannot reserve a free loopback port: {0}")]
    Ports(std::io::Error),
}

/// The ports of one sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SidecarPorts {
    pub inbound: u16,
    pub outbound: u16,
    pub admin: u16,
}

/// One instance (app + optional sidecar) of a workload.
#[derive(Debug, Clone)]
pub struct InstancePlan {
    /// The workload = Service name = `app` label.
    pub service: String,
    pub namespace: String,
    /// The virtual environment; empty for the default subset.
    pub tag: String,
    /// `WORKLOAD_NAME`: the Deployment, `<service>` or `<service>-<tag with dashes>`.
    pub workload_name: String,
    /// `NAME`: the pod.
    pub pod: String,
    pub app_port: u16,
    /// The app is not started (its sidecar's inbound cluster refuses connections).
    pub app_down: bool,
    pub sidecar: Option<SidecarPorts>,
    /// What the app calls, in order: an FQDN (HTTP), or `grpc://FQDN` for a service
    /// whose port is named `grpc*` (the app calls it with gRPC).
    pub calls: Vec<String>,
    /// The app answers every request with an error of its own (500 / gRPC INTERNAL).
    pub app_error: bool,
    /// Header patterns the app copies onto its calls.
    pub copy: Vec<String>,
    pub fail_on_error: bool,
    /// The pods' `app` label.
    pub app_label: String,
    /// Istio's canonical service name (`service.istio.io/canonical-name`).
    pub canonical_name: String,
    /// The `app.kubernetes.io/name` label, when the topology sets one.
    pub k8s_name: Option<String>,
    pub service_account: String,
    /// `svc.ns.svc.<cluster domain>`.
    pub service_fqdn: String,
    /// A destination outside the mesh (reached through `PassthroughCluster`).
    pub external: bool,
}

impl InstancePlan {
    /// Where callers reach this instance: its sidecar's inbound listener, or the app.
    pub fn endpoint_port(&self) -> u16 {
        self.sidecar.map_or(self.app_port, |s| s.inbound)
    }

    /// `svc.ns.svc.<cluster domain>`.
    pub fn fqdn(&self) -> String {
        self.service_fqdn.clone()
    }

    /// A short label for logs and file names: `service` or `service@tag`.
    pub fn label(&self) -> String {
        if self.tag.is_empty() {
            self.service.clone()
        } else {
            format!("{}@{}", self.service, self.tag)
        }
    }

    /// File-name-safe form of the label (the pod for a second replica).
    pub fn file_stem(&self) -> String {
        if self.pod.ends_with("-0") {
            self.workload_name.clone()
        } else {
            self.pod.clone()
        }
    }
}

/// The whole resolved mesh.
#[derive(Debug, Clone)]
pub struct Plan {
    pub topology: Topology,
    pub collector_grpc: u16,
    pub collector_http: u16,
    /// The Zipkin collector port sidecars are given: nothing listens there (spans are not
    /// the point; the tracer is on so that sidecars create B3 span ids, as in Istio).
    pub zipkin_port: u16,
    pub instances: Vec<InstancePlan>,
}

/// The Deployment name of an instance, as virtual-environment setups name them.
pub fn workload_name(service: &str, tag: &str) -> String {
    if tag.is_empty() {
        service.to_string()
    } else {
        let dashed: String = tag
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        format!("{service}-{dashed}")
    }
}

/// Where ports come from: free ports, or consecutive ports from a base (for rendered
/// configs that must be stable).
pub enum PortSource {
    Free,
    From(u16),
}

/// Free ports are taken from this range, below the kernel's ephemeral range (32768+):
/// ports released after a bind(0) probe are soon handed out again as source ports of
/// the Envoys' own upstream connections, which then steals a listener port.
const FREE_RANGE: std::ops::Range<u32> = 12_000..32_000;

/// Next candidate port of this process (meshes started in parallel do not overlap).
static CURSOR: AtomicU32 = AtomicU32::new(0);

fn next_candidate() -> u16 {
    let span = FREE_RANGE.end - FREE_RANGE.start;
    if CURSOR.load(Ordering::Relaxed) == 0 {
        // A per-process random start, so that parallel test binaries start apart (0 means
        // "not started yet", hence the + 1).
        let seed = RandomState::new().build_hasher().finish() as u32;
        let _ = CURSOR.compare_exchange(0, seed % span + 1, Ordering::Relaxed, Ordering::Relaxed);
    }
    let n = CURSOR.fetch_add(1, Ordering::Relaxed);
    (FREE_RANGE.start + n % span) as u16
}

/// Reserves `n` distinct ports. Free ports are probed by binding them, and held until all
/// are chosen.
pub fn reserve_ports(n: usize, source: &PortSource) -> Result<Vec<u16>, PlanError> {
    match source {
        PortSource::From(base) => Ok((0..n as u16).map(|i| base + i).collect()),
        PortSource::Free => {
            let mut held = Vec::with_capacity(n);
            let mut tries = 0;
            while held.len() < n {
                tries += 1;
                if tries > 20 * n + 1000 {
                    return Err(PlanError::Ports(std::io::Error::other(
                        "no free port found in 12000-32000",
                    )));
                }
                let port = next_candidate();
                if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
                    held.push(l);
                }
            }
            held.iter()
                .map(|l| l.local_addr().map(|a| a.port()).map_err(PlanError::Ports))
                .collect()
        }
    }
}

impl Plan {
    /// Resolves `topology` with ports from `source`.
    pub fn new(topology: &Topology, source: &PortSource) -> Result<Plan, PlanError> {
        let count: usize = topology
            .workloads
            .iter()
            .map(|w| w.instances.len() * if w.has_sidecar() { 4 } else { 1 })
            .sum::<usize>()
            + 3;
        let mut ports = reserve_ports(count, source)?.into_iter();
        let mut next = || ports.next().unwrap_or_default();
        let collector_grpc = next();
        let collector_http = next();
        let zipkin_port = next();
        let mut instances = Vec::new();
        for w in &topology.workloads {
            for i in &w.instances {
                let app_port = next();
                let sidecar = w.has_sidecar().then(|| SidecarPorts {
                    inbound: next(),
                    outbound: next(),
                    admin: next(),
                });
                let workload_name = workload_name(&w.name, &i.tag);
                instances.push(InstancePlan {
                    service: w.name.clone(),
                    namespace: w.namespace(topology).to_string(),
                    tag: i.tag.clone(),
                    pod: format!("{workload_name}-{}", i.replica),
                    workload_name,
                    app_port,
                    app_down: w.instance_down(i),
                    sidecar,
                    calls: w
                        .calls
                        .iter()
                        .map(|c| {
                            if topology.calls_grpc(c) {
                                format!("grpc://{}", topology.fqdn(c))
                            } else {
                                topology.fqdn(c)
                            }
                        })
                        .collect(),
                    app_error: w.app_error,
                    copy: w.copied_headers(&topology.tag_header),
                    fail_on_error: w.fail_on_error,
                    app_label: w.app_label().to_string(),
                    canonical_name: w.canonical().to_string(),
                    k8s_name: w.canonical_name.clone(),
                    service_account: w.service_account().to_string(),
                    service_fqdn: topology.fqdn(&w.name),
                    external: w.external,
                });
            }
        }
        Ok(Plan {
            topology: topology.clone(),
            collector_grpc,
            collector_http,
            zipkin_port,
            instances,
        })
    }

    /// The instances of a service (by name), in topology order.
    pub fn instances_of<'a, 's>(
        &'a self,
        service: &'s str,
    ) -> impl Iterator<Item = &'a InstancePlan> + use<'a, 's> {
        self.instances.iter().filter(move |i| i.service == service)
    }

    /// One instance of a service by tag.
    pub fn instance(&self, service: &str, tag: &str) -> Option<&InstancePlan> {
        self.instances_of(service).find(|i| i.tag == tag)
    }

    /// The workload definition of a service.
    pub fn workload(&self, service: &str) -> Option<&Workload> {
        self.topology.workloads.iter().find(|w| w.name == service)
    }
}
