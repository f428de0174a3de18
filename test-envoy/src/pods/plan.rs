//! A topology resolved to pods on one podman network: every instance's pod address,
//! every Service's virtual address (unused addresses of the same subnet, resolved by the
//! pods' `hostAliases`), the collector's pod and Service, and the fixed ports every pod
//! uses (as in a cluster, all apps listen on the same port of their own address).

use std::net::Ipv4Addr;

use crate::plan::{InstancePlan, Plan, PlanError, PortSource};
use crate::topology::{Instance, Topology, Workload};

/// The app's port in every pod (the Service's targetPort).
pub const APP_PORT: u16 = 8080;
/// The demo app's second, read-only port (`/received`), excluded from capture.
pub const APP_ADMIN_PORT: u16 = 8081;
/// Every Service's port.
pub const SERVICE_PORT: u16 = 80;
/// The collector's gRPC and HTTP ports (its Service port is named `grpc-report`).
pub const COLLECTOR_GRPC_PORT: u16 = 9090;
pub const COLLECTOR_HTTP_PORT: u16 = 9091;
/// Envoy's admin port (localhost only, as in istio-proxy).
pub const PROXY_ADMIN_PORT: u16 = 15000;
/// Istio's health port (`/healthz/ready`), excluded from capture.
pub const HEALTH_PORT: u16 = 15021;
/// Istio's Prometheus port (`/stats/prometheus`, Envoy's stats), excluded from capture.
pub const PROMETHEUS_PORT: u16 = 15090;
/// The collector's Service (what the manifest's `collector_cluster` names).
pub const COLLECTOR_SERVICE: &str = "hopwatch-collector";
pub const COLLECTOR_NAMESPACE: &str = "hopwatch";

/// Host numbers inside the subnet: pods from here on...
const FIRST_POD: u32 = 10;
/// ...Service addresses from here on (no pod ever gets one: the IPAM hands out only
/// the static addresses chosen here).
const FIRST_SERVICE: u32 = 200;
const LAST_SERVICE: u32 = 250;

/// Errors planning pods.
#[derive(Debug, thiserror::Error)]
pub enum PodPlanError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("too many {what} for one /24 network: {count}")]
    TooMany { what: &'static str, count: usize },
}

/// One Kubernetes Service of the mesh.
#[derive(Debug, Clone)]
pub struct ServicePlan {
    pub name: String,
    pub namespace: String,
    pub vip: Ipv4Addr,
    /// The port's name (`http-web`, `tcp-...`, `grpc-report`).
    pub port_name: String,
    pub port: u16,
    pub target_port: u16,
    /// Istio treats the port as TCP (a `tcp-...` name).
    pub tcp: bool,
}

impl ServicePlan {
    pub fn fqdn(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }
    /// The names a pod resolves to the Service address (`hostAliases`).
    pub fn hostnames(&self) -> Vec<String> {
        vec![
            self.fqdn(),
            format!("{}.{}.svc", self.name, self.namespace),
            format!("{}.{}", self.name, self.namespace),
            self.name.clone(),
        ]
    }
}

/// The resolved pod mesh.
#[derive(Debug, Clone)]
pub struct PodPlan {
    /// Names, calls and copy policies (its loopback ports are not used).
    pub plan: Plan,
    /// Pod address of `plan.instances[i]`.
    pub pod_ips: Vec<Ipv4Addr>,
    pub collector_ip: Ipv4Addr,
    /// The workloads' Services, then the collector's.
    pub services: Vec<ServicePlan>,
}

impl PodPlan {
    /// Resolves `topology` onto a network whose `n`-th address `address(n)` gives.
    pub fn new(
        topology: &Topology,
        address: impl Fn(u32) -> Ipv4Addr,
    ) -> Result<PodPlan, PodPlanError> {
        let plan = Plan::new(topology, &PortSource::From(1))?;
        let pods = plan.instances.len();
        if FIRST_POD as usize + 1 + pods >= FIRST_SERVICE as usize {
            return Err(PodPlanError::TooMany {
                what: "pods",
                count: pods,
            });
        }
        if FIRST_SERVICE as usize + topology.workloads.len() >= LAST_SERVICE as usize {
            return Err(PodPlanError::TooMany {
                what: "Services",
                count: topology.workloads.len(),
            });
        }
        let collector_ip = address(FIRST_POD);
        let pod_ips = (0..pods as u32)
            .map(|i| address(FIRST_POD + 1 + i))
            .collect();
        let mut services: Vec<ServicePlan> = topology
            .workloads
            .iter()
            .enumerate()
            .map(|(j, w)| ServicePlan {
                name: w.name.clone(),
                namespace: w.namespace(topology).to_string(),
                vip: address(FIRST_SERVICE + j as u32),
                port_name: w.service_port_name().to_string(),
                port: SERVICE_PORT,
                target_port: APP_PORT,
                tcp: w.port_is_tcp(),
            })
            .collect();
        services.push(ServicePlan {
            name: COLLECTOR_SERVICE.into(),
            namespace: COLLECTOR_NAMESPACE.into(),
            vip: address(LAST_SERVICE),
            port_name: "grpc-report".into(),
            port: COLLECTOR_GRPC_PORT,
            target_port: COLLECTOR_GRPC_PORT,
            tcp: false,
        });
        Ok(PodPlan {
            plan,
            pod_ips,
            collector_ip,
            services,
        })
    }

    /// The topology's definition of an instance.
    pub fn definition(&self, inst: &InstancePlan) -> Option<(&Workload, &Instance)> {
        let w = self.plan.workload(&inst.service)?;
        let i = w.instances.iter().find(|i| i.tag == inst.tag)?;
        Some((w, i))
    }

    /// Does the pod carry the label its subset selects?
    pub fn has_subset_label(&self, inst: &InstancePlan) -> bool {
        self.definition(inst)
            .and_then(|(_, i)| i.subset_label)
            .unwrap_or(true)
    }

    /// The Service of a workload.
    pub fn service(&self, name: &str) -> Option<&ServicePlan> {
        self.services.iter().find(|s| s.name == name)
    }

    /// The collector's Service.
    pub fn collector_service(&self) -> Option<&ServicePlan> {
        self.services.iter().find(|s| s.name == COLLECTOR_SERVICE)
    }

    /// Pod addresses of the endpoints of `service`'s `subset` (`""`: the default
    /// subset): the pods of that environment that carry its label.
    pub fn subset_endpoints(&self, service: &str, subset: &str) -> Vec<Ipv4Addr> {
        self.plan
            .instances
            .iter()
            .zip(&self.pod_ips)
            .filter(|(i, _)| i.service == service && i.tag == subset && self.has_subset_label(i))
            .map(|(_, ip)| *ip)
            .collect()
    }

    /// The pod (instance index) of a service by tag.
    pub fn index_of(&self, service: &str, tag: Option<&str>) -> Option<usize> {
        self.plan
            .instances
            .iter()
            .position(|i| i.service == service && tag.is_none_or(|t| i.tag == t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_stay_inside_the_subnet_and_subsets_follow_labels() {
        let topology = Topology::parse(
            "namespace: ns\nworkloads:\n  - name: a\n    calls: [b]\n  - name: b\n    port: tcp-web\n    instances:\n      - tag: \"\"\n      - tag: dev\n        subset_label: false\n",
            "t",
        )
        .unwrap();
        let base = u32::from(Ipv4Addr::new(10, 89, 3, 0));
        let p = PodPlan::new(&topology, |n| Ipv4Addr::from(base + n)).unwrap();
        assert_eq!(p.collector_ip, Ipv4Addr::new(10, 89, 3, 10));
        assert_eq!(p.pod_ips[0], Ipv4Addr::new(10, 89, 3, 11));
        assert_eq!(p.service("a").unwrap().vip, Ipv4Addr::new(10, 89, 3, 200));
        assert!(p.service("b").unwrap().tcp && !p.service("a").unwrap().tcp);
        assert_eq!(
            p.collector_service().unwrap().vip,
            Ipv4Addr::new(10, 89, 3, 250)
        );
        assert_eq!(p.subset_endpoints("b", ""), vec![p.pod_ips[1]]);
        assert!(p.subset_endpoints("b", "dev").is_empty(), "unlabelled pod");
    }
}
