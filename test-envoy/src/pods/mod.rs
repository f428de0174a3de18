//! The pods runtime of the local mesh (`hopwatch-mesh --runtime pods`): every instance
//! runs as a pod of containers on a podman network the mesh creates for itself, started
//! with `podman kube play` from generated Kubernetes YAML, the way an Istio-injected pod
//! runs in a cluster: an `istio-init` step installing Istio's capture rules
//! ([`capture`]), the app, and an `istio-proxy` container running the real Envoy 1.40
//! with the hopwatch filter as uid 1337, with the listener layout istiod builds
//! ([`layout`]). Services get virtual addresses on the same network, resolved by the
//! pods' `hostAliases`; the apps call `http://<svc>.<ns>.svc.cluster.local` and the
//! capture brings those calls to their sidecar. The collector runs as a pod too.
//!
//! - [`podman`]: the podman CLI, the mesh's own `--internal` network, the images.
//! - [`plan`]: addresses and ports.
//! - [`kube`]: the pods' YAML; [`render`]: `hopwatch-mesh render --runtime pods`.
//! - mTLS: the topology's `mtls` keys as in the processes runtime ([`crate::mtls`]
//!   writes the run's CA and certificates into `<run dir>/tls/`; each istio-proxy mounts
//!   its own at `/etc/certs`; [`layout`] builds the TLS contexts).
//!
//! A [`PodMesh`] tears its pods and its network down when dropped, also when a test
//! panics (the pods' logs are then copied into the run directory and printed).
//! Traffic goes only to the addresses of its own pods.

pub mod capture;
pub mod kube;
pub mod layout;
pub mod plan;
pub mod podman;
pub mod render;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::bins::{self, MissingArtifact};
use crate::collector_cli::{CliError, CliOutput, CollectorCli};
use crate::httpc::{self, HttpError, HttpResponse};
use crate::manifests::{self, ManifestError};
use crate::mesh::{tail, Ingress};
use crate::topology::Topology;
use kube::{CollectorSpec, HostFiles};
use plan::{
    PodPlan, PodPlanError, APP_ADMIN_PORT, APP_PORT, COLLECTOR_GRPC_PORT, COLLECTOR_HTTP_PORT,
    HEALTH_PORT, PROMETHEUS_PORT,
};
use podman::{Images, Network, Podman, PodmanError};

/// Errors starting or driving a pod mesh.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error(transparent)]
    Podman(#[from] PodmanError),
    #[error(transparent)]
    Plan(#[from] PodPlanError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Missing(#[from] MissingArtifact),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(transparent)]
    Tls(#[from] crate::mtls::TlsError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what}\n{logs}")]
    Startup { what: String, logs: String },
    #[error("no instance {0} in this mesh")]
    NoInstance(String),
    /// Running the `hopwatch` CLI, or waiting for its findings.
    #[error(transparent)]
    Cli(#[from] CliError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PodError {
    let what = what.into();
    move |source| PodError::Io { what, source }
}

/// How to start a pod mesh.
#[derive(Debug, Clone)]
pub struct PodMeshOptions {
    /// Names the run directory (e.g. the test name).
    pub name: String,
    pub run_dir: Option<PathBuf>,
    pub start_collector: bool,
    pub trace_quiet: String,
    pub ready_timeout: Duration,
    /// The demo service binary baked into the app image (default: [`bins::demo_service_bin`]).
    pub demo_service: Option<PathBuf>,
    /// Keep the run directory (and copy the pods' logs into it) when dropped without a
    /// panic; a panicking drop always keeps it.
    pub keep_run_dir: bool,
}

impl PodMeshOptions {
    pub fn named(name: &str) -> PodMeshOptions {
        PodMeshOptions {
            name: name.to_string(),
            run_dir: None,
            start_collector: true,
            trace_quiet: "1s".into(),
            ready_timeout: Duration::from_secs(120),
            demo_service: None,
            keep_run_dir: true,
        }
    }
}

static RUN_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The pods and network of every pod mesh of this process not stopped yet, for
/// [`remove_all_pods`] (signal handlers: `Drop` does not run when a signal ends a process).
static LIVE: Mutex<Vec<(Podman, String, Vec<String>)>> = Mutex::new(Vec::new());

/// Label of a mesh's pods (its network's name) and of its network (the runner's pid).
const RUN_LABEL: &str = "hopwatch.io/run";
const PID_LABEL: &str = "hopwatch.io/pid";

/// Removes the pods and networks left by pod meshes of processes that no longer exist
/// (a runner killed by SIGKILL cannot clean up after itself).
fn remove_leftovers(podman: &Podman) {
    let Ok(list) = podman.run(&[
        "network",
        "ls",
        "--filter",
        &format!("label={PID_LABEL}"),
        "--format",
        "{{.Name}}",
    ]) else {
        return;
    };
    for network in list.lines().map(str::trim) {
        // The mesh names its network `hopwatch-<pid>-<n>`.
        let Some(pid) = network
            .strip_prefix("hopwatch-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill(2) with signal 0 only checks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if alive {
            continue;
        }
        if let Ok(pods) = podman.run(&[
            "pod",
            "ps",
            "--filter",
            &format!("label={RUN_LABEL}={network}"),
            "--format",
            "{{.Name}}",
        ]) {
            let pods: Vec<String> = pods.lines().map(str::to_string).collect();
            remove(podman, &pods);
        }
        let _ = podman.run(&["network", "rm", "-f", network]);
    }
}

/// Removes the pods and networks of every pod mesh of this process.
pub fn remove_all_pods() {
    let live: Vec<(Podman, String, Vec<String>)> = LIVE
        .lock()
        .map(|mut l| std::mem::take(&mut *l))
        .unwrap_or_default();
    for (podman, network, pods) in live {
        remove(&podman, &pods);
        let _ = podman
            .command()
            .args(["network", "rm", "-f", &network])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `podman pod rm -f` (Envoy as PID 1 ignores SIGTERM: 1 s grace, then SIGKILL).
fn remove(podman: &Podman, pods: &[String]) {
    if pods.is_empty() {
        return;
    }
    let mut args = vec!["pod", "rm", "-f", "-t", "1"];
    args.extend(pods.iter().map(String::as_str));
    let _ = podman
        .command()
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A running pod mesh. Dropping it removes its pods and its network.
pub struct PodMesh {
    podman: Podman,
    pod_plan: PodPlan,
    run_dir: PathBuf,
    /// Every pod started (or being started), by name.
    pods: Vec<String>,
    /// Container names, for logs.
    containers: Vec<String>,
    cli: Option<PathBuf>,
    keep_run_dir: bool,
    /// Time from `start` to every pod ready.
    pub startup: Duration,
    /// Where the start-up time went: images, network, `kube play`, readiness.
    pub phases: Vec<(&'static str, Duration)>,
    /// Dropped last (after the pods): fields drop in declaration order.
    network: Option<Network>,
}

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

impl PodMesh {
    /// Builds the images, creates the network, plays the pods, waits until all are ready.
    pub fn start(topology: &Topology, options: &PodMeshOptions) -> Result<PodMesh, PodError> {
        let started = Instant::now();
        let podman = Podman::detect()?;
        let wasm = bins::wasm_file()?;
        let envoy = bins::envoy_bin()?;
        let demo = match &options.demo_service {
            Some(p) => p.clone(),
            None => bins::demo_service_bin()?,
        };
        let collector = bins::collector_bin()?;
        let cli = bins::cli_bin().ok();
        let filters = manifests::load_sidecar_filters(&manifests::repo_root())?;
        let images = podman.images(&envoy, &demo, &collector)?;
        let mut phases = vec![("images", started.elapsed())];

        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let n = RUN_COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let run_dir = options.run_dir.clone().unwrap_or_else(|| {
            bins::target_dir()
                .join("hopwatch-mesh")
                .join(format!("pods-{}-{secs}-{pid}-{n}", options.name))
        });
        std::fs::create_dir_all(&run_dir).map_err(io(format!("creating {}", run_dir.display())))?;
        remove_leftovers(&podman);
        let net_name = format!("hopwatch-{pid}-{n}");
        let network = Network::create(&podman, &net_name, &[(PID_LABEL, pid.to_string())])?;
        phases.push(("network", started.elapsed()));
        let pod_plan = PodPlan::new(topology, |i| network.address(i))?;
        let mut mesh = PodMesh {
            podman,
            pod_plan,
            run_dir,
            pods: Vec::new(),
            containers: Vec::new(),
            cli,
            keep_run_dir: options.keep_run_dir,
            startup: Duration::ZERO,
            phases,
            network: Some(network),
        };
        // On error, `mesh` is dropped here: pods and network go away.
        mesh.play(options, &images, &wasm, &filters, &format!("-{pid}x{n}"))?;
        mesh.startup = started.elapsed();
        mesh.phases.push(("ready", mesh.startup));
        Ok(mesh)
    }

    fn play(
        &mut self,
        options: &PodMeshOptions,
        images: &Images,
        wasm: &Path,
        filters: &manifests::SidecarFilters,
        suffix: &str,
    ) -> Result<(), PodError> {
        let deadline = Instant::now() + options.ready_timeout;
        let pp = self.pod_plan.clone();
        if pp.plan.topology.uses_mtls() {
            // A throwaway CA and every sidecar's certificate, made for this run (removed
            // with the run directory); each pod mounts only its own.
            crate::mtls::write_mesh_certs(&pp.plan, &kube::tls_dir(&self.run_dir))?;
        }
        let rules = self.run_dir.join("capture.rules");
        std::fs::write(&rules, capture::iptables_rules(&[APP_ADMIN_PORT]))
            .map_err(io(format!("writing {}", rules.display())))?;
        let files = HostFiles {
            config_dir: &self.run_dir,
            wasm,
        };
        let spec = CollectorSpec {
            trace_quiet: options.trace_quiet.clone(),
            rust_log: std::env::var("HOPWATCH_COLLECTOR_LOG").unwrap_or_else(|_| "info".into()),
        };
        let played = kube::mesh_pods(
            &pp,
            images,
            files,
            filters,
            options.start_collector.then_some(&spec),
            suffix,
        );
        self.pods = played.pods.clone();
        self.containers = played.containers.clone();
        if let (Ok(mut live), Some(net)) = (LIVE.lock(), self.network.as_ref()) {
            live.push((self.podman.clone(), net.name.clone(), self.pods.clone()));
        }
        for (name, b) in &played.bootstraps {
            let path = self.run_dir.join(name);
            std::fs::write(&path, serde_json::to_string_pretty(b).unwrap_or_default())
                .map_err(io(format!("writing {}", path.display())))?;
        }
        let (mut docs, ips) = (played.docs, played.ips);
        // Which mesh a pod belongs to, for removing what a killed run left behind.
        if let Some(net) = self.network.as_ref() {
            for d in &mut docs {
                d["metadata"]["labels"][RUN_LABEL] = Value::String(net.name.clone());
            }
        }
        let yaml = self.run_dir.join("pods.yaml");
        std::fs::write(&yaml, kube::to_yaml(&docs))
            .map_err(io(format!("writing {}", yaml.display())))?;
        let net = self
            .network
            .as_ref()
            .map(|n| n.name.clone())
            .unwrap_or_default();
        let mut args: Vec<String> = vec!["kube".into(), "play".into(), "--network".into(), net];
        for ip in &ips {
            args.push("--ip".into());
            args.push(ip.to_string());
        }
        args.push(yaml.display().to_string());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let played_at = Instant::now();
        if let Err(e) = self.podman.run(&refs) {
            return Err(PodError::Startup {
                what: format!("podman kube play {} failed: {e}", yaml.display()),
                logs: self.logs_tail(20),
            });
        }
        self.phases.push((
            "kube play",
            self.phases.last().map(|p| p.1).unwrap_or_default() + played_at.elapsed(),
        ));

        if options.start_collector {
            let a = addr(pp.collector_ip, COLLECTOR_HTTP_PORT);
            self.wait_ready("collector", deadline, || {
                httpc::get(a, "collector", "/healthz", Duration::from_secs(2))
                    .map(|r| r.status == 200)
                    .unwrap_or(false)
            })?;
        }
        for (i, inst) in pp.plan.instances.iter().enumerate() {
            let ip = pp.pod_ips[i];
            if !inst.app_down {
                let a = addr(ip, APP_ADMIN_PORT);
                self.wait_ready(&format!("app {}", inst.label()), deadline, || {
                    httpc::get(a, "app", "/healthz", Duration::from_secs(2))
                        .map(|r| r.status == 200)
                        .unwrap_or(false)
                })?;
            }
            if inst.sidecar.is_some() {
                let a = addr(ip, HEALTH_PORT);
                self.wait_ready(&format!("istio-proxy {}", inst.label()), deadline, || {
                    httpc::get(a, "health", "/healthz/ready", Duration::from_secs(2))
                        .map(|r| r.status == 200)
                        .unwrap_or(false)
                })?;
            }
        }
        Ok(())
    }

    fn wait_ready(
        &self,
        name: &str,
        deadline: Instant,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), PodError> {
        loop {
            if ready() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(PodError::Startup {
                    what: format!("{name} not ready in time (pods: {})", self.pod_states()),
                    logs: self.logs_tail(30),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn pod_states(&self) -> String {
        let net = self
            .network
            .as_ref()
            .map(|n| n.name.clone())
            .unwrap_or_default();
        self.podman
            .run(&[
                "ps",
                "-a",
                "--filter",
                &format!("network={net}"),
                "--format",
                "{{.Names}} {{.Status}}",
            ])
            .map(|s| s.trim().replace('\n', "; "))
            .unwrap_or_else(|e| e.to_string())
    }

    /// The resolved plan (pod and Service addresses).
    pub fn pod_plan(&self) -> &PodPlan {
        &self.pod_plan
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The pods' names (as podman knows them).
    pub fn pod_names(&self) -> &[String] {
        &self.pods
    }

    /// The network's name.
    pub fn network_name(&self) -> Option<&str> {
        self.network.as_ref().map(|n| n.name.as_str())
    }

    pub fn collector_url(&self) -> String {
        format!(
            "http://{}",
            addr(self.pod_plan.collector_ip, COLLECTOR_GRPC_PORT)
        )
    }

    fn find(&self, service: &str, tag: Option<&str>) -> Result<usize, PodError> {
        self.pod_plan
            .index_of(service, tag)
            .ok_or_else(|| PodError::NoInstance(format!("{service}@{}", tag.unwrap_or("*"))))
    }

    /// Sends an entry request to a pod's address (captured by its sidecar, as traffic
    /// from an ingress gateway is).
    pub fn send(&self, request: &Ingress) -> Result<HttpResponse, PodError> {
        let service = match &request.service {
            Some(s) => s.clone(),
            None => self
                .pod_plan
                .plan
                .topology
                .workloads
                .first()
                .map(|w| w.name.clone())
                .unwrap_or_default(),
        };
        let i = self.find(&service, request.instance.as_deref())?;
        let inst = &self.pod_plan.plan.instances[i];
        let mut headers = vec![("host".to_string(), inst.fqdn())];
        headers.extend(request.headers.iter().cloned());
        let path = if request.path.is_empty() {
            "/"
        } else {
            &request.path
        };
        Ok(httpc::request(
            addr(self.pod_plan.pod_ips[i], APP_PORT),
            "GET",
            path,
            &headers,
            b"",
            Duration::from_secs(30),
        )?)
    }

    /// The headers of the requests an instance's app received (its uncaptured admin port).
    pub fn received(&self, service: &str, tag: &str) -> Result<Vec<Value>, PodError> {
        let i = self.find(service, Some(tag))?;
        let r = httpc::get(
            addr(self.pod_plan.pod_ips[i], APP_ADMIN_PORT),
            "app",
            "/received",
            Duration::from_secs(5),
        )?;
        Ok(r.json()
            .as_array()
            .map(|a| a.iter().map(|v| v["headers"].clone()).collect())
            .unwrap_or_default())
    }

    /// Envoy's stats of an instance's istio-proxy in Prometheus form, from Istio's
    /// uncaptured `:15090/stats/prometheus` on the pod address (`filter`: a regex on the
    /// stat names, as Envoy's admin takes it).
    pub fn envoy_stats(&self, service: &str, tag: &str, filter: &str) -> Result<String, PodError> {
        let i = self.find(service, Some(tag))?;
        if self.pod_plan.plan.instances[i].sidecar.is_none() {
            return Err(PodError::NoInstance(format!("sidecar of {service}@{tag}")));
        }
        let r = httpc::get(
            addr(self.pod_plan.pod_ips[i], PROMETHEUS_PORT),
            "stats",
            &format!("/stats/prometheus?filter={filter}"),
            Duration::from_secs(5),
        )?;
        Ok(r.text())
    }

    /// Runs the `hopwatch` CLI against the collector pod.
    pub fn cli(&self, args: &[&str]) -> Result<CliOutput, PodError> {
        Ok(self.cli_client().run(args)?)
    }

    /// `hopwatch breaks --output json`, parsed.
    pub fn breaks(&self) -> Result<Vec<Value>, PodError> {
        Ok(self.cli_client().breaks()?)
    }

    /// Polls `hopwatch breaks` until `done` holds for the findings, or `timeout` passes.
    pub fn wait_for_breaks(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Result<Vec<Value>, PodError> {
        Ok(self.cli_client().wait_for_breaks(what, timeout, done)?)
    }

    fn cli_client(&self) -> CollectorCli<'_> {
        CollectorCli {
            bin: self.cli.as_deref(),
            url: self.collector_url(),
        }
    }

    /// Copies every container's log into the run directory (`<container>.log`).
    pub fn save_logs(&self) {
        for c in &self.containers {
            if let Ok(out) = self.podman.command().args(["logs", c]).output() {
                let mut text = out.stdout;
                text.extend_from_slice(&out.stderr);
                let _ = std::fs::write(self.run_dir.join(format!("{c}.log")), text);
            }
        }
    }

    /// The tail of every container's log (fetched now).
    pub fn logs_tail(&self, lines: usize) -> String {
        self.save_logs();
        let mut out = String::new();
        for c in &self.containers {
            let log = self.run_dir.join(format!("{c}.log"));
            out.push_str(&format!(
                "--- {c} ({}) ---\n{}\n",
                log.display(),
                tail(&log, lines)
            ));
        }
        out
    }

    /// Removes the pods and the network. Idempotent.
    pub fn stop(&mut self) {
        if !self.pods.is_empty() {
            if self.keep_run_dir {
                self.save_logs();
            }
            remove(&self.podman, &self.pods);
            self.pods.clear();
        }
        if let (Ok(mut live), Some(net)) = (LIVE.lock(), self.network.as_ref()) {
            live.retain(|(_, n, _)| *n != net.name);
        }
        self.network = None;
    }
}

impl Drop for PodMesh {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking {
            eprintln!(
                "==== hopwatch pod mesh logs (kept in {}) ====\n{}",
                self.run_dir.display(),
                self.logs_tail(30)
            );
        }
        self.stop();
        if !panicking && !self.keep_run_dir {
            let _ = std::fs::remove_dir_all(&self.run_dir);
        }
    }
}
