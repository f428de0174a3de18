//! The topology file: which workloads the local mesh runs, their instances (one per
//! virtual environment), whom they call, which headers their apps copy, and the faults
//! to inject (no sidecar, app down, no endpoints, missing tag routes, unrouted hosts).
//!
//! ```yaml
//! namespace: demo                 # default namespace of every workload
//! tag_header: x-virtual-env       # optional (default x-virtual-env)
//! unrouted_services: [ghost]      # hosts callers may call but have no route for (NR)
//! filter_config:                  # keys set over the manifest's plugin configuration,
//!   tag_baggage_key: sd-routing-key  #   on both sides of every sidecar (optional)
//! tracing: none                   # none (Istio's default) | zipkin | opentelemetry
//! sampling: 1                     # % of requests the tracer samples (Istio's default 1)
//! retries: istio                  # istio (Istio's default policy) | none
//! workloads:
//!   - name: frontend              # = the Service name and the `app` label
//!     calls: [cart, ghost]        # in order, per request ("svc" or "svc.ns")
//!     copy: all                   # all | none | [groups or header names]
//!     drop: [tag]                 # removed from `copy` (groups or header names)
//!     fail_on_error: true         # answer 502 when a call fails (default true)
//!     instances:                  # default: one instance without tag
//!       - tag: ""                 # the default subset
//!       - tag: dev.proj1
//!   - name: pricing
//!     sidecar: false              # no Envoy: callers reach the app directly
//!   - name: stock
//!     app_down: true              # sidecar up, app not listening (UF)
//!     instances:
//!       - tag: ""
//!       - tag: ""
//!         replica: 1              # a second pod of the same subset
//!         app_down: true          # (per instance) a flaky subset: retries go to pod 0
//!   - name: empty
//!     instances: []               # a Service with no endpoints (UH)
//!   - name: cart
//!     missing_tag_routes: [dev.mia]  # callers have no route for this subset
//!     app_label: cart-app            # the pods' `app` label (default: name)
//!     canonical_name: shop-cart      # `app.kubernetes.io/name` = Istio's canonical name
//!     service_account: cart-sa       # default: name
//!   - name: api
//!     external: true                 # outside the mesh: reached via PassthroughCluster
//!     host: api.example.com          # the name apps call it by
//! cluster_domain: cluster.local      # the cluster domain (and SPIFFE trust domain)
//! mtls: off                          # off | permissive | strict (PeerAuthentication)
//! # per workload: peer_authentication: permissive|strict|off (overrides mtls),
//! #               destination_rule_without_tls: true (callers send plain text: UC)
//!   - name: payments
//!     port: grpc-api              # the Service port name: grpc-* / http2-* give HTTP/2
//!                                 # clusters and h2c app<->sidecar (as Istio does); the
//!                                 # app is then called with gRPC (default: http)
//!     app_error: true             # the app answers 500 (gRPC: INTERNAL) itself
//!     deny_all: true              # an AuthorizationPolicy DENY on it: Envoy's RBAC
//!                                 # filter before hopwatch on its inbound side
//!     fault_abort: 503            # a VirtualService fault abort for it: Envoy's fault
//!                                 # filter before hopwatch on every caller's outbound side
//! ```
//!
//! Header groups: `b3` (`x-b3-*`, `b3`), `w3c` (`traceparent`, `tracestate`), `trace`
//! (both), `request-id` (`x-request-id`), `tag` (the tag header), `baggage`, `sw8`
//! (SkyWalking: `sw8`, `sw8-*`), `uber` (Jaeger: `uber-trace-id`, `uberctx-*`), `datadog`
//! (`x-datadog-*`). `all` is every group. A name ending in `*` is a prefix; any other
//! name is a header (e.g. a custom id `my-trace-id`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors reading or checking a topology.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot read topology {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("topology {origin} is not valid: {source}")]
    Yaml {
        origin: String,
        source: serde_yaml_ng::Error,
    },
    #[error("topology {origin}: {what}")]
    Invalid { origin: String, what: String },
}

/// The default tag header of virtual environments.
pub const DEFAULT_TAG_HEADER: &str = "x-virtual-env";
/// The default namespace of a topology.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A whole topology file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default = "default_tag_header")]
    pub tag_header: String,
    /// Hosts that apps call but for which no sidecar has a route: Envoy answers 404 `NR`.
    #[serde(default)]
    pub unrouted_services: Vec<String>,
    /// Plugin configuration keys set over the shipped manifest's, for every sidecar
    /// (e.g. `tag_baggage_key`, `tag_aliases`, `correlation_headers`).
    #[serde(default)]
    pub filter_config: serde_json::Map<String, serde_json::Value>,
    /// The tracer of every sidecar, as an Istio telemetry provider sets it up.
    #[serde(default)]
    pub tracing: TracingMode,
    /// Percentage of requests the tracer samples (`random_sampling`); Istio's default
    /// is 1 %. Only meaningful with a tracer.
    #[serde(default)]
    pub sampling: Option<f64>,
    /// The retry policy of every outbound route.
    #[serde(default)]
    pub retries: RetryMode,
    /// mTLS between sidecars: the PeerAuthentication mode of every sidecar's inbound side
    /// (`off`: plain text everywhere). With `permissive` or `strict`, callers' sidecars
    /// use mTLS towards every workload with a sidecar (Istio's auto mTLS).
    #[serde(default)]
    pub mtls: MtlsMode,
    /// The Kubernetes cluster domain (`<svc>.<ns>.svc.<domain>`) and SPIFFE trust domain.
    #[serde(default = "default_cluster_domain")]
    pub cluster_domain: String,
    pub workloads: Vec<Workload>,
}

/// Which tracer the sidecars run (Istio's `meshConfig.defaultProviders.tracing`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TracingMode {
    /// No tracer (Istio's default since 1.22): Envoy injects no trace headers, requests
    /// carry only `x-request-id` (Envoy's UUID request-id extension).
    #[default]
    None,
    /// A Zipkin provider: B3 headers on every request, `x-b3-sampled: 0` on the ones
    /// not sampled.
    Zipkin,
    /// An OpenTelemetry provider: W3C `traceparent` / `tracestate` only.
    Opentelemetry,
}

/// PeerAuthentication mode of a sidecar's inbound side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    /// No mTLS at all (plain text between sidecars).
    #[default]
    Off,
    /// mTLS and plain text accepted on the same port.
    Permissive,
    /// Only mTLS with a client certificate of the mesh.
    Strict,
}

/// Istio's sampling percentage when a tracer is on and none is set.
pub const ISTIO_DEFAULT_SAMPLING: f64 = 1.0;

/// The retry policy of the outbound routes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetryMode {
    /// Istio's default on every outbound route: 2 retries on connect-failure,
    /// refused-stream, unavailable, cancelled and 503, other hosts first, with
    /// `x-envoy-attempt-count`.
    #[default]
    Istio,
    /// No retries (a VirtualService with `retries: {attempts: 0}`).
    None,
}

/// One workload (= one Kubernetes Service with its Deployments, one per environment).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub calls: Vec<String>,
    #[serde(default)]
    pub copy: CopySpec,
    #[serde(default)]
    pub drop: Vec<String>,
    #[serde(default = "yes")]
    pub fail_on_error: bool,
    #[serde(default = "yes")]
    pub sidecar: bool,
    #[serde(default)]
    pub app_down: bool,
    #[serde(default = "default_instances")]
    pub instances: Vec<Instance>,
    /// Tags whose subset exists (clusters, endpoints) but whose route callers lack, so
    /// requests for them fall back to a less specific subset.
    #[serde(default)]
    pub missing_tag_routes: Vec<String>,
    /// The pods' `app` label (default: the Service name `name`).
    #[serde(default)]
    pub app_label: Option<String>,
    /// The pods' `app.kubernetes.io/name` label, which Istio's injector makes the
    /// canonical service name (default: none, so the canonical name is the `app` label).
    #[serde(default)]
    pub canonical_name: Option<String>,
    /// The pods' service account (default: the Service name).
    #[serde(default)]
    pub service_account: Option<String>,
    /// A destination outside the mesh (no Service, no sidecar): callers' sidecars have
    /// no route for it and send it through `PassthroughCluster`. The test starts it as
    /// a plain listener on 127.0.0.1; `host` is the name apps call it by.
    #[serde(default)]
    pub external: bool,
    /// The host name of an `external` destination (default: `name`).
    #[serde(default)]
    pub host: Option<String>,
    /// This workload's PeerAuthentication mode (default: the topology's `mtls`).
    #[serde(default)]
    pub peer_authentication: Option<MtlsMode>,
    /// A DestinationRule for this Service without a `tls` setting: callers send plain
    /// text to it even when the mesh uses mTLS (into a STRICT listener: 503 UC).
    #[serde(default)]
    pub destination_rule_without_tls: bool,
    /// The Service port name; Istio takes the protocol from its prefix: `grpc`/`grpc-*`
    /// (gRPC over HTTP/2), `http2`/`http2-*` (HTTP/2), `http`/`http-*` (HTTP/1.1).
    #[serde(default = "default_port")]
    pub port: String,
    /// The app answers every request with a 500 (gRPC: INTERNAL) of its own.
    #[serde(default)]
    pub app_error: bool,
    /// An AuthorizationPolicy with action DENY for every request selects this workload:
    /// its inbound sidecar runs Envoy's RBAC filter before hopwatch (Istio's order).
    #[serde(default)]
    pub deny_all: bool,
    /// A VirtualService fault abort with this HTTP status for this service: every
    /// caller's outbound sidecar runs Envoy's fault filter before hopwatch, configured on
    /// the routes to this service (as istiod renders it).
    #[serde(default)]
    pub fault_abort: Option<u16>,
    /// Pods runtime only: the app listens on 127.0.0.1 only, not on the pod address the
    /// inbound sidecar connects to (UF, as in Istio since 1.10).
    #[serde(default)]
    pub listen_loopback_only: bool,
    /// Pods runtime only: subsets the callers' routes send traffic to but whose
    /// DestinationRule subset is not defined yet (a rollout applied in the wrong order):
    /// the route names a cluster the sidecar does not have.
    #[serde(default)]
    pub undefined_subsets: Vec<String>,
}

/// One instance (Deployment) of a workload, in one virtual environment.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    /// The virtual environment (`virtual-env` label, `VIRTUAL_ENVIRONMENT_TAG`); empty for
    /// the default subset.
    #[serde(default)]
    pub tag: String,
    /// Overrides the workload's `app_down` for this instance.
    #[serde(default)]
    pub app_down: Option<bool>,
    /// Pods runtime only: `false` when the pod lacks the label its subset selects
    /// (`virtual-env`, like a missing `version` label): it runs, but no subset has it.
    #[serde(default)]
    pub subset_label: Option<bool>,
    /// Which pod of its Deployment this instance is (`<workload>-<replica>`): several
    /// instances with the same tag are endpoints of one subset (retries go to another).
    #[serde(default)]
    pub replica: u32,
}

/// Which received headers an app copies onto its calls.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum CopySpec {
    /// `all` or `none`.
    Word(String),
    /// Groups and header names.
    List(Vec<String>),
}

impl Default for CopySpec {
    fn default() -> Self {
        CopySpec::Word("all".to_string())
    }
}

fn default_cluster_domain() -> String {
    "cluster.local".to_string()
}
fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_string()
}
fn default_tag_header() -> String {
    DEFAULT_TAG_HEADER.to_string()
}
fn default_port() -> String {
    "http".to_string()
}
fn yes() -> bool {
    true
}
fn default_instances() -> Vec<Instance> {
    vec![Instance::default()]
}

/// Expands a header group (or returns the name itself, lowercased).
fn expand_group(item: &str, tag_header: &str) -> Vec<String> {
    match item.to_ascii_lowercase().as_str() {
        "b3" => vec!["x-b3-*".into(), "b3".into()],
        "w3c" => vec!["traceparent".into(), "tracestate".into()],
        "trace" => vec![
            "x-b3-*".into(),
            "b3".into(),
            "traceparent".into(),
            "tracestate".into(),
        ],
        "request-id" => vec!["x-request-id".into()],
        "tag" => vec![tag_header.to_ascii_lowercase()],
        "all" => all_headers(tag_header),
        "baggage" => vec!["baggage".into()],
        "sw8" => vec!["sw8".into(), "sw8-*".into()],
        "uber" => vec!["uber-trace-id".into(), "uberctx-*".into()],
        "datadog" => vec!["x-datadog-*".into()],
        other => vec![other.to_string()],
    }
}

/// Every header (pattern) that `copy: all` copies.
fn all_headers(tag_header: &str) -> Vec<String> {
    let mut all = expand_group("trace", tag_header);
    all.push("x-request-id".into());
    all.push(tag_header.to_ascii_lowercase());
    for other in ["baggage", "sw8", "uber", "datadog"] {
        all.extend(expand_group(other, tag_header));
    }
    all
}

/// Does `header` (lowercase) match a copy pattern (`x-b3-*` style prefix or exact)?
pub fn header_matches(pattern: &str, header: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => header.starts_with(prefix),
        None => header == pattern,
    }
}

impl Workload {
    /// The workload's namespace (its own, else the topology's).
    pub fn namespace<'a>(&'a self, topology: &'a Topology) -> &'a str {
        self.namespace.as_deref().unwrap_or(&topology.namespace)
    }

    /// The header patterns the app copies, after `copy` and `drop`.
    pub fn copied_headers(&self, tag_header: &str) -> Vec<String> {
        let base: Vec<String> = match &self.copy {
            CopySpec::Word(w) if w == "all" => all_headers(tag_header),
            CopySpec::Word(w) if w == "none" => Vec::new(),
            CopySpec::Word(w) => expand_group(w, tag_header),
            CopySpec::List(items) => items
                .iter()
                .flat_map(|i| expand_group(i, tag_header))
                .collect(),
        };
        let dropped: BTreeSet<String> = self
            .drop
            .iter()
            .flat_map(|i| expand_group(i, tag_header))
            .collect();
        let mut out: Vec<String> = Vec::new();
        for h in base {
            if !dropped.contains(&h) && !out.contains(&h) {
                out.push(h);
            }
        }
        out
    }

    /// This workload's PeerAuthentication mode.
    pub fn mtls(&self, topology: &Topology) -> MtlsMode {
        self.peer_authentication.unwrap_or(topology.mtls)
    }

    /// Whether callers reach this workload over mTLS (Istio's auto mTLS: a sidecar, a
    /// mesh with mTLS, no DestinationRule turning it off).
    pub fn called_over_mtls(&self, topology: &Topology) -> bool {
        topology.mtls != MtlsMode::Off && self.has_sidecar() && !self.destination_rule_without_tls
    }

    /// Whether the pods run a sidecar (never for an external destination).
    pub fn has_sidecar(&self) -> bool {
        self.sidecar && !self.external
    }

    /// The pods' `app` label.
    pub fn app_label(&self) -> &str {
        self.app_label.as_deref().unwrap_or(&self.name)
    }

    /// The canonical service name Istio derives: `app.kubernetes.io/name`, else `app`.
    pub fn canonical(&self) -> &str {
        self.canonical_name.as_deref().unwrap_or(self.app_label())
    }

    /// The pods' service account.
    pub fn service_account(&self) -> &str {
        self.service_account.as_deref().unwrap_or(&self.name)
    }

    /// The port speaks gRPC (`grpc`, `grpc-*`): callers' apps call it with gRPC.
    pub fn grpc(&self) -> bool {
        self.port == "grpc" || self.port.starts_with("grpc-")
    }

    /// The port speaks HTTP/2 between sidecars and to the app (`grpc*`, `http2*`).
    pub fn http2(&self) -> bool {
        self.grpc() || self.port == "http2" || self.port.starts_with("http2-")
    }

    /// The Service port's name.
    pub fn service_port_name(&self) -> &str {
        &self.port
    }

    /// Is the Service port treated as TCP (named `tcp-...`, or `tcp`; pods runtime only:
    /// both sidecars run a TCP proxy for it and no HTTP filter sees the hop)?
    pub fn port_is_tcp(&self) -> bool {
        self.port == "tcp" || self.port.starts_with("tcp-")
    }

    /// Is this instance's app down?
    pub fn instance_down(&self, instance: &Instance) -> bool {
        instance.app_down.unwrap_or(self.app_down)
    }
}

impl Topology {
    /// Parses and checks a topology; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Topology, TopologyError> {
        let topology: Topology =
            serde_yaml_ng::from_str(text).map_err(|source| TopologyError::Yaml {
                origin: origin.to_string(),
                source,
            })?;
        topology.validate(origin)?;
        Ok(topology)
    }

    /// Reads and checks a topology file.
    pub fn load(path: &Path) -> Result<Topology, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Topology::parse(&text, &path.display().to_string())
    }

    /// The workload a call target (`svc` or `svc.ns`) refers to, if any.
    pub fn find_workload(&self, target: &str) -> Option<&Workload> {
        self.workloads
            .iter()
            .find(|w| target == w.name || target == format!("{}.{}", w.name, w.namespace(self)))
    }

    /// The options of this topology that only the pods runtime models (they need pod
    /// addresses, Service ports and capture), as `workload: option` strings.
    pub fn pods_only_features(&self) -> Vec<String> {
        let mut out = Vec::new();
        for w in &self.workloads {
            if w.port_is_tcp() {
                out.push(format!("{}: port {}", w.name, w.port));
            }
            if w.listen_loopback_only {
                out.push(format!("{}: listen_loopback_only", w.name));
            }
            if !w.undefined_subsets.is_empty() {
                out.push(format!("{}: undefined_subsets", w.name));
            }
            if w.instances.iter().any(|i| i.subset_label.is_some()) {
                out.push(format!("{}: subset_label", w.name));
            }
        }
        out
    }

    /// Whether the workload behind a call target is called with gRPC.
    pub fn calls_grpc(&self, target: &str) -> bool {
        self.find_workload(target).is_some_and(Workload::grpc)
    }

    /// Whether any sidecar uses mTLS (the mesh then needs its certificates).
    pub fn uses_mtls(&self) -> bool {
        self.mtls != MtlsMode::Off
            || self
                .workloads
                .iter()
                .any(|w| w.peer_authentication.is_some_and(|m| m != MtlsMode::Off))
    }

    /// The tracer's sampling percentage (Istio's 1 % unless set).
    pub fn sampling_percent(&self) -> f64 {
        self.sampling.unwrap_or(ISTIO_DEFAULT_SAMPLING)
    }

    /// The FQDN of a Service: `svc.ns.svc.<cluster domain>`.
    pub fn service_fqdn(&self, service: &str, namespace: &str) -> String {
        format!("{service}.{namespace}.svc.{}", self.cluster_domain)
    }

    /// The external destination apps reach through `PassthroughCluster`, if any.
    pub fn external(&self) -> Option<&Workload> {
        self.workloads.iter().find(|w| w.external)
    }

    /// The FQDN (`svc.ns.svc.<cluster domain>`) a call target resolves to (an external
    /// destination: its host).
    pub fn fqdn(&self, target: &str) -> String {
        match self.find_workload(target) {
            Some(w) if w.external => w.host.clone().unwrap_or_else(|| w.name.clone()),
            Some(w) => self.service_fqdn(&w.name, w.namespace(self)),
            None if target.contains('.') => format!("{target}.svc.{}", self.cluster_domain),
            None => self.service_fqdn(target, &self.namespace),
        }
    }

    fn validate(&self, origin: &str) -> Result<(), TopologyError> {
        let bad = |what: String| TopologyError::Invalid {
            origin: origin.to_string(),
            what,
        };
        if self.workloads.is_empty() {
            return Err(bad("no workloads".into()));
        }
        if self.workloads.iter().filter(|w| w.external).count() > 1 {
            return Err(bad(
                "at most one external workload (PassthroughCluster has one endpoint here)".into(),
            ));
        }
        for w in self.workloads.iter().filter(|w| w.external) {
            if !w.calls.is_empty() || w.instances.len() != 1 {
                return Err(bad(format!(
                    "external workload {}: no calls, one instance (it never has a sidecar)",
                    w.name
                )));
            }
        }
        if let Some(p) = self.sampling {
            if !(0.0..=100.0).contains(&p) {
                return Err(bad(format!("sampling {p} must be a percentage (0-100)")));
            }
            if self.tracing == TracingMode::None {
                return Err(bad("sampling is set but tracing is none".into()));
            }
        }
        let dns_label = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        let tag_ok = |s: &str| {
            s.len() <= 128
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
        };
        let mut names = BTreeSet::new();
        for w in &self.workloads {
            if !dns_label(&w.name) {
                return Err(bad(format!(
                    "workload name {:?} must be a DNS label (a-z, 0-9, -)",
                    w.name
                )));
            }
            if !names.insert((w.name.clone(), w.namespace(self).to_string())) {
                return Err(bad(format!("workload {} is defined twice", w.name)));
            }
            let mut tags = BTreeSet::new();
            for i in &w.instances {
                if !tag_ok(&i.tag) {
                    return Err(bad(format!("workload {}: invalid tag {:?}", w.name, i.tag)));
                }
                if !tags.insert((i.tag.clone(), i.replica)) {
                    return Err(bad(format!(
                        "workload {}: two instances with tag {:?} and replica {}",
                        w.name, i.tag, i.replica
                    )));
                }
            }
            if !w.has_sidecar() && !w.calls.is_empty() && !w.external {
                return Err(bad(format!(
                    "workload {}: a workload without sidecar cannot make calls here \
                     (it would have no outbound listener)",
                    w.name
                )));
            }
            // tcp/tcp-*: a port Istio treats as TCP (the pods runtime models it).
            let port_ok = ["http", "http2", "grpc", "tcp"]
                .iter()
                .any(|p| w.port == *p || w.port.starts_with(&format!("{p}-")));
            if !port_ok {
                return Err(bad(format!(
                    "workload {}: port name {:?} must be http, http2, grpc or tcp, alone or with a -suffix",
                    w.name, w.port
                )));
            }
            if w.fault_abort.is_some_and(|c| !(200..600).contains(&c)) {
                return Err(bad(format!(
                    "workload {}: fault_abort must be an HTTP status (200-599)",
                    w.name
                )));
            }
            if let CopySpec::Word(word) = &w.copy {
                if word.is_empty() {
                    return Err(bad(format!("workload {}: empty copy", w.name)));
                }
            }
        }
        for w in &self.workloads {
            for call in &w.calls {
                let known = self.find_workload(call).is_some()
                    || self.unrouted_services.iter().any(|u| u == call);
                if !known {
                    return Err(bad(format!(
                        "workload {} calls {call:?}, which is neither a workload nor listed \
                         in unrouted_services",
                        w.name
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The embedded default topology of `hopwatch-mesh demo`.
pub const DEMO_TOPOLOGY: &str = include_str!("../topologies/demo.yaml");

/// Directory of the shipped topology files.
pub fn topologies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("topologies")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_and_drop_expand_groups() {
        let t = Topology::parse(
            "workloads:\n  - name: a\n    drop: [trace]\n  - name: b\n    copy: [tag, request-id]\n",
            "t",
        )
        .unwrap();
        assert_eq!(
            t.workloads[0].copied_headers("x-virtual-env"),
            vec![
                "x-request-id",
                "x-virtual-env",
                "baggage",
                "sw8",
                "sw8-*",
                "uber-trace-id",
                "uberctx-*",
                "x-datadog-*"
            ]
        );
        assert_eq!(
            t.workloads[1].copied_headers("x-virtual-env"),
            vec!["x-virtual-env", "x-request-id"]
        );
        // The other tracers' groups, `all` inside a list, custom names.
        let t = Topology::parse(
            "workloads:\n  - name: a\n    copy: [uber, datadog, my-trace-id]\n  - name: b\n    copy: [all, my-trace-id]\n    drop: [trace, baggage, sw8, uber, datadog]\n",
            "t",
        )
        .unwrap();
        assert_eq!(
            t.workloads[0].copied_headers("x-virtual-env"),
            vec!["uber-trace-id", "uberctx-*", "x-datadog-*", "my-trace-id"]
        );
        assert_eq!(
            t.workloads[1].copied_headers("x-virtual-env"),
            vec!["x-request-id", "x-virtual-env", "my-trace-id"]
        );
        assert!(header_matches("x-b3-*", "x-b3-traceid"));
        assert!(!header_matches("b3", "x-b3-traceid"));
    }

    #[test]
    fn port_names_give_the_protocol() {
        let t = Topology::parse(
            "workloads:\n  - name: a\n    calls: [b, c]\n  - name: b\n    port: grpc-api\n  - name: c\n    port: http2\n",
            "t",
        )
        .unwrap();
        assert!(!t.workloads[0].http2() && !t.calls_grpc("a"));
        assert!(t.workloads[1].grpc() && t.workloads[1].http2() && t.calls_grpc("b"));
        assert!(!t.workloads[2].grpc() && t.workloads[2].http2());
        let err = Topology::parse("workloads:\n  - name: a\n    port: udp-x\n", "t").unwrap_err();
        assert!(err.to_string().contains("port name"), "{err}");
    }

    #[test]
    fn unknown_call_targets_are_refused() {
        let err = Topology::parse("workloads:\n  - name: a\n    calls: [nope]\n", "t").unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn pods_only_options_are_named_so_the_processes_runtime_can_refuse_them() {
        let t = Topology::parse(
            "workloads:\n  - name: a\n    port: tcp-db\n    instances: [{tag: x, subset_label: false}]\n  - name: b\n",
            "t",
        )
        .unwrap();
        assert_eq!(
            t.pods_only_features(),
            vec!["a: port tcp-db", "a: subset_label"]
        );
        assert!(t.workloads[0].port_is_tcp() && !t.workloads[1].port_is_tcp());
        assert_eq!(t.workloads[1].service_port_name(), "http");
        let healthy = Topology::load(&topologies_dir().join("healthy.yaml")).unwrap();
        assert!(healthy.pods_only_features().is_empty());
    }

    #[test]
    fn every_shipped_topology_is_valid() {
        let mut n = 0;
        for entry in std::fs::read_dir(topologies_dir()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                Topology::load(&path).unwrap();
                n += 1;
            }
        }
        assert!(n > 0);
        Topology::parse(DEMO_TOPOLOGY, "demo").unwrap();
    }
}
