//! The running local mesh: the collector, and per instance its demo app and its Envoy
//! sidecar, all on loopback ports, with every process's output kept in a run directory.
//!
//! Processes are stopped on every exit path: `Drop` stops them (and prints the log tails
//! when the thread is panicking, i.e. a test failed), they die with the thread that
//! started them (`PR_SET_PDEATHSIG`), and binaries can call [`stop_all_children`] from a
//! signal handler.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::bins::{self, MissingArtifact};
use crate::bootstrap::{sidecar_bootstrap, RenderTarget};
pub use crate::collector_cli::CliOutput;
use crate::collector_cli::{CliError, CollectorCli};
use crate::httpc::{self, HttpError, HttpResponse};
use crate::manifests::{self, ManifestError};
use crate::plan::{InstancePlan, Plan, PlanError, PortSource};
use crate::topology::{Topology, TopologyError};

/// Errors starting or driving the mesh.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Missing(#[from] MissingArtifact),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("{what}\n{logs}")]
    Startup { what: String, logs: String },
    #[error("no instance {0} in this mesh")]
    NoInstance(String),
    /// Running the `hopwatch` CLI, or waiting for its findings.
    #[error(transparent)]
    Cli(#[from] CliError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MeshError {
    let what = what.into();
    move |source| MeshError::Io { what, source }
}

/// Pids of every process any mesh of this process started and has not stopped yet.
static CHILDREN: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// Sends SIGTERM, then SIGKILL, to every child process still running (for signal
/// handlers of binaries: `Drop` does not run when a signal ends the process).
pub fn stop_all_children() {
    let pids: Vec<i32> = CHILDREN
        .lock()
        .map(|c| c.iter().copied().collect())
        .unwrap_or_default();
    for pid in &pids {
        // SAFETY: kill(2) with a pid we spawned; no memory is involved.
        unsafe { libc::kill(*pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    for pid in &pids {
        loop {
            let mut status = 0;
            // SAFETY: waitpid on our own child with WNOHANG.
            let r = unsafe { libc::waitpid(*pid, &mut status, libc::WNOHANG) };
            if r != 0 || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above; harmless if it already exited.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
}

/// One started process and where its output goes.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

/// How to start a mesh.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// Names the run directory (e.g. the test name).
    pub name: String,
    /// Run directory; default `target/hopwatch-mesh/<name>-<time>-<pid>-<n>`.
    pub run_dir: Option<PathBuf>,
    /// Start the collector (false: sidecars report to a port nobody listens on).
    pub start_collector: bool,
    /// `--trace-quiet` of the collector.
    pub trace_quiet: String,
    /// How long processes may take to become ready.
    pub ready_timeout: Duration,
    /// Envoy's `--log-level`.
    pub envoy_log_level: String,
    /// The demo service binary (default: [`bins::demo_service_bin`]); tests pass
    /// `CARGO_BIN_EXE_hopwatch-demo-service`.
    pub demo_service: Option<PathBuf>,
    /// Keep the run directory when the mesh is dropped without a panic (it is always
    /// kept when the dropping thread panics, i.e. a test failed).
    pub keep_run_dir: bool,
}

impl MeshOptions {
    pub fn named(name: &str) -> MeshOptions {
        MeshOptions {
            name: name.to_string(),
            run_dir: None,
            start_collector: true,
            trace_quiet: "1s".into(),
            ready_timeout: Duration::from_secs(60),
            envoy_log_level: "warning".into(),
            demo_service: None,
            keep_run_dir: true,
        }
    }
}

/// An entry request into the mesh, sent to one instance's inbound listener (as an
/// ingress gateway would).
#[derive(Debug, Clone, Default)]
pub struct Ingress {
    /// Target service; default the topology's first workload.
    pub service: Option<String>,
    /// Which instance (by its tag); default the service's first instance.
    pub instance: Option<String>,
    pub path: String,
    /// Extra request headers (trace headers, the tag header, ...).
    pub headers: Vec<(String, String)>,
}

impl Ingress {
    /// A request to the first workload.
    pub fn new() -> Ingress {
        Ingress {
            path: "/".into(),
            ..Ingress::default()
        }
    }
    /// A request to `service`.
    pub fn to(service: &str) -> Ingress {
        Ingress {
            service: Some(service.into()),
            ..Ingress::new()
        }
    }
    /// Sent to the instance of `service` with this tag.
    pub fn at(mut self, service: &str, tag: &str) -> Ingress {
        self.service = Some(service.into());
        self.instance = Some(tag.into());
        self
    }
    /// Sent to the instance with this tag.
    pub fn instance(mut self, tag: &str) -> Ingress {
        self.instance = Some(tag.into());
        self
    }
    /// Adds what an Istio ingress gateway puts on an entry request: a started B3 trace
    /// (`trace_id`, 32 hex digits; sampled) and an `x-request-id`.
    pub fn with_trace(self, trace_id: &str) -> Ingress {
        let span = trace_id.get(16..).unwrap_or(trace_id).to_string();
        self.header("x-b3-traceid", trace_id)
            .header("x-b3-spanid", &span)
            .header("x-b3-sampled", "1")
            .header("x-request-id", &format!("req-{trace_id}"))
    }
    /// Adds a request header.
    pub fn header(mut self, name: &str, value: &str) -> Ingress {
        self.headers.push((name.into(), value.into()));
        self
    }
    pub fn path(mut self, path: &str) -> Ingress {
        self.path = path.into();
        self
    }
}

/// A fresh random 128-bit trace id (32 lowercase hex digits, never zero).
pub fn new_trace_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::new();
    for _ in 0..2 {
        // RandomState is seeded randomly per instance: enough for test trace ids.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        out.push_str(&format!("{:016x}", h.finish() | 1));
    }
    out
}

/// A running mesh. Dropping it stops every process.
pub struct Mesh {
    plan: Plan,
    run_dir: PathBuf,
    procs: Vec<Proc>,
    /// Every process log, including those of processes already stopped.
    logs: Vec<(String, PathBuf)>,
    cli: Option<PathBuf>,
    keep_run_dir: bool,
}

static RUN_COUNTER: AtomicU64 = AtomicU64::new(0);

fn default_run_dir(name: &str) -> PathBuf {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let n = RUN_COUNTER.fetch_add(1, Ordering::Relaxed);
    bins::target_dir()
        .join("hopwatch-mesh")
        .join(format!("{name}-{secs}-{}-{n}", std::process::id()))
}

/// The last `lines` lines of a file (empty if unreadable).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn spawn(name: &str, mut command: Command, log: PathBuf) -> Result<Proc, MeshError> {
    let out = File::create(&log).map_err(io(format!("creating {}", log.display())))?;
    let err = out
        .try_clone()
        .map_err(io(format!("opening {}", log.display())))?;
    command.stdin(Stdio::null()).stdout(out).stderr(err);
    use std::os::unix::process::CommandExt;
    // Own process group: a terminal's Ctrl-C reaches the runner, which stops the children
    // in order, instead of killing everything at once.
    command.process_group(0);
    // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal,
    // so children never outlive the runner thread that started them, even on SIGKILL.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = command
        .spawn()
        .map_err(io(format!("starting {name} ({:?})", command.get_program())))?;
    if let Ok(mut c) = CHILDREN.lock() {
        c.insert(child.id() as i32);
    }
    Ok(Proc {
        name: name.to_string(),
        child,
        log,
    })
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

impl Mesh {
    /// Starts the mesh of `topology`: collector, apps, sidecars; returns once all are ready.
    pub fn start(topology: &Topology, options: &MeshOptions) -> Result<Mesh, MeshError> {
        let pods_only = topology.pods_only_features();
        if !pods_only.is_empty() {
            return Err(MeshError::Startup {
                what: format!(
                    "this topology needs the pods runtime (--runtime pods) for: {}",
                    pods_only.join(", ")
                ),
                logs: String::new(),
            });
        }
        let wasm = bins::wasm_file()?;
        let envoy = bins::envoy_bin()?;
        let demo = match &options.demo_service {
            Some(p) => p.clone(),
            None => bins::demo_service_bin()?,
        };
        let (collector, cli) = if options.start_collector {
            (Some(bins::collector_bin()?), Some(bins::cli_bin()?))
        } else {
            (None, bins::cli_bin().ok())
        };
        bins::warn_if_stale(
            &wasm,
            &["filter/src", "proto/hopwatch"],
            "cargo build -p hopwatch-filter --target wasm32-wasip1 --release",
        );
        bins::warn_if_stale(
            &demo,
            &["test-envoy/src"],
            "cargo build -p hopwatch-test-envoy",
        );
        if let Some(c) = &collector {
            bins::warn_if_stale(
                c,
                &["collector/src", "proto/hopwatch"],
                "cargo build -p hopwatch-collector",
            );
        }
        let filters = manifests::with_plugin_overrides(
            manifests::load_sidecar_filters(&manifests::repo_root())?,
            &topology.filter_config,
        );
        let plan = Plan::new(topology, &PortSource::Free)?;
        let run_dir = options
            .run_dir
            .clone()
            .unwrap_or_else(|| default_run_dir(&options.name));
        std::fs::create_dir_all(&run_dir).map_err(io(format!("creating {}", run_dir.display())))?;
        let mut mesh = Mesh {
            plan,
            run_dir,
            procs: Vec::new(),
            logs: Vec::new(),
            cli,
            keep_run_dir: options.keep_run_dir,
        };
        // On error, `mesh` is dropped here and stops what was started.
        mesh.start_processes(
            options,
            &wasm,
            &envoy,
            &demo,
            collector.as_deref(),
            &filters,
        )?;
        Ok(mesh)
    }

    fn start_processes(
        &mut self,
        options: &MeshOptions,
        wasm: &Path,
        envoy: &Path,
        demo: &Path,
        collector: Option<&Path>,
        filters: &manifests::SidecarFilters,
    ) -> Result<(), MeshError> {
        let deadline = Instant::now() + options.ready_timeout;
        if let Some(collector) = collector {
            let data = self.run_dir.join("collector-data");
            let mut c = Command::new(collector);
            c.arg("--listen")
                .arg(loopback(self.plan.collector_grpc).to_string())
                .arg("--http-listen")
                .arg(loopback(self.plan.collector_http).to_string())
                .arg("--data-dir")
                .arg(&data)
                .arg("--trace-quiet")
                .arg(&options.trace_quiet)
                // Plain text in the log file (tracing-subscriber honours NO_COLOR).
                .env("NO_COLOR", "1")
                .env(
                    "RUST_LOG",
                    std::env::var("HOPWATCH_COLLECTOR_LOG").unwrap_or_else(|_| "info".into()),
                );
            let p = spawn("collector", c, self.run_dir.join("collector.log"))?;
            self.track(p);
        }
        // Apps first: a sidecar that is ready must find its app listening (except the
        // apps a topology declares down).
        let plan = self.plan.clone();
        for inst in &plan.instances {
            if inst.app_down {
                continue;
            }
            let mut c = Command::new(demo);
            c.arg("--listen")
                .arg(loopback(inst.app_port).to_string())
                .arg("--workload")
                .arg(&inst.workload_name)
                .arg("--namespace")
                .arg(&inst.namespace)
                .arg("--tag")
                .arg(&inst.tag)
                .arg("--fail-on-error")
                .arg(inst.fail_on_error.to_string());
            if inst.app_error {
                c.arg("--app-error");
            }
            if let Some(s) = inst.sidecar {
                c.arg("--outbound").arg(loopback(s.outbound).to_string());
            }
            for call in &inst.calls {
                c.arg("--call").arg(call);
            }
            for h in &inst.copy {
                c.arg("--copy").arg(h);
            }
            let name = format!("app {}", inst.label());
            let p = spawn(
                &name,
                c,
                self.run_dir.join(format!("{}.app.log", inst.file_stem())),
            )?;
            self.track(p);
        }
        // mTLS: a throwaway CA and the workloads' certificates, made for this run.
        let tls_dir = self.run_dir.join("tls");
        let tls = plan.topology.uses_mtls();
        if tls {
            crate::mtls::write_mesh_certs(&plan, &tls_dir).map_err(|e| MeshError::Io {
                what: "making the mesh certificates".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
        }
        for inst in &plan.instances {
            let access_log = self
                .run_dir
                .join(format!("{}.access.log", inst.file_stem()));
            let target = RenderTarget {
                wasm,
                access_log: access_log.display().to_string(),
                host: "127.0.0.1",
                tls_dir: tls.then_some(tls_dir.as_path()),
            };
            let Some(bootstrap) = sidecar_bootstrap(&plan, inst, filters, &target) else {
                continue;
            };
            let config = self
                .run_dir
                .join(format!("{}.envoy.json", inst.file_stem()));
            let text = serde_json::to_string_pretty(&bootstrap).unwrap_or_default();
            std::fs::write(&config, text).map_err(io(format!("writing {}", config.display())))?;
            let mut c = Command::new(envoy);
            c.arg("-c")
                .arg(&config)
                .arg("--concurrency")
                .arg("1")
                .arg("--use-dynamic-base-id")
                .arg("--log-level")
                .arg(&options.envoy_log_level)
                // The filter logs through the wasm component: keep it.
                .arg("--component-log-level")
                .arg("wasm:info")
                .arg("--service-node")
                .arg(&inst.pod)
                .arg("--service-cluster")
                .arg(&inst.workload_name);
            // The filter reads its own tag from here (host_env_keys in the manifest); an
            // untagged instance must not inherit one from the runner's environment.
            if inst.tag.is_empty() {
                c.env_remove("VIRTUAL_ENVIRONMENT_TAG");
            } else {
                c.env("VIRTUAL_ENVIRONMENT_TAG", &inst.tag);
            }
            let name = format!("envoy {}", inst.label());
            let p = spawn(
                &name,
                c,
                self.run_dir.join(format!("{}.envoy.log", inst.file_stem())),
            )?;
            self.track(p);
        }
        // Wait for every process, in parallel (they started together).
        if collector.is_some() {
            let addr = loopback(self.plan.collector_http);
            self.wait_ready("collector", deadline, || {
                httpc::get(addr, "127.0.0.1", "/healthz", Duration::from_secs(2))
                    .map(|r| r.status == 200)
                    .unwrap_or(false)
            })?;
        }
        for inst in &plan.instances {
            if !inst.app_down {
                let addr = loopback(inst.app_port);
                self.wait_ready(&format!("app {}", inst.label()), deadline, || {
                    httpc::get(addr, "app", "/healthz", Duration::from_secs(2))
                        .map(|r| r.status == 200)
                        .unwrap_or(false)
                })?;
            }
            if let Some(s) = inst.sidecar {
                let addr = loopback(s.admin);
                self.wait_ready(&format!("envoy {}", inst.label()), deadline, || {
                    httpc::get(addr, "admin", "/ready", Duration::from_secs(2))
                        .map(|r| r.status == 200)
                        .unwrap_or(false)
                })?;
            }
        }
        Ok(())
    }

    fn track(&mut self, p: Proc) {
        self.logs.push((p.name.clone(), p.log.clone()));
        self.procs.push(p);
    }

    fn wait_ready(
        &mut self,
        name: &str,
        deadline: Instant,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), MeshError> {
        loop {
            if ready() {
                return Ok(());
            }
            if let Some(p) = self.procs.iter_mut().find(|p| p.name == name) {
                if let Ok(Some(status)) = p.child.try_wait() {
                    return Err(MeshError::Startup {
                        what: format!("{name} exited during startup ({status})"),
                        logs: format!("--- {} ---\n{}", p.log.display(), tail(&p.log, 12)),
                    });
                }
            }
            if Instant::now() > deadline {
                return Err(MeshError::Startup {
                    what: format!("{name} not ready in time"),
                    logs: self.logs_tail(40),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The resolved topology (ports, names).
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Where configs and logs are.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The collector's gRPC URL (what the CLI's `--collector` takes).
    pub fn collector_url(&self) -> String {
        format!("http://{}", loopback(self.plan.collector_grpc))
    }

    fn find(&self, service: &str, tag: Option<&str>) -> Result<&InstancePlan, MeshError> {
        let mut it = self.plan.instances_of(service);
        match tag {
            Some(t) => it.find(|i| i.tag == t),
            None => it.next(),
        }
        .ok_or_else(|| MeshError::NoInstance(format!("{service}@{}", tag.unwrap_or("*"))))
    }

    /// Sends an entry request; the reply is the first app's JSON (or Envoy's answer).
    pub fn send(&self, request: &Ingress) -> Result<HttpResponse, MeshError> {
        let service = match &request.service {
            Some(s) => s.clone(),
            None => self
                .plan
                .topology
                .workloads
                .first()
                .map(|w| w.name.clone())
                .unwrap_or_default(),
        };
        let inst = self.find(&service, request.instance.as_deref())?;
        let mut headers = vec![("host".to_string(), inst.fqdn())];
        headers.extend(request.headers.iter().cloned());
        let path = if request.path.is_empty() {
            "/"
        } else {
            &request.path
        };
        Ok(httpc::request(
            loopback(inst.endpoint_port()),
            "GET",
            path,
            &headers,
            b"",
            Duration::from_secs(30),
        )?)
    }

    /// The headers of the requests an instance's app received, oldest first.
    pub fn received(&self, service: &str, tag: &str) -> Result<Vec<Value>, MeshError> {
        let inst = self.find(service, Some(tag))?;
        let r = httpc::get(
            loopback(inst.app_port),
            "app",
            "/received",
            Duration::from_secs(5),
        )?;
        Ok(r.json()
            .as_array()
            .map(|a| a.iter().map(|v| v["headers"].clone()).collect())
            .unwrap_or_default())
    }

    /// Envoy stats of an instance's sidecar (`/stats?filter=...`), as `name: value` lines.
    pub fn envoy_stats(&self, service: &str, tag: &str, filter: &str) -> Result<String, MeshError> {
        let inst = self.find(service, Some(tag))?;
        let admin = inst
            .sidecar
            .ok_or_else(|| MeshError::NoInstance(format!("sidecar of {}", inst.label())))?
            .admin;
        let r = httpc::get(
            loopback(admin),
            "admin",
            &format!("/stats?filter={filter}"),
            Duration::from_secs(5),
        )?;
        Ok(r.text())
    }

    /// Runs the `hopwatch` CLI against this mesh's collector.
    pub fn cli(&self, args: &[&str]) -> Result<CliOutput, MeshError> {
        Ok(self.cli_client().run(args)?)
    }

    /// `hopwatch breaks --output json`, parsed.
    pub fn breaks(&self) -> Result<Vec<Value>, MeshError> {
        Ok(self.cli_client().breaks()?)
    }

    /// Polls `hopwatch breaks` until `done` holds for the findings, or `timeout` passes.
    pub fn wait_for_breaks(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Result<Vec<Value>, MeshError> {
        Ok(self.cli_client().wait_for_breaks(what, timeout, done)?)
    }

    fn cli_client(&self) -> CollectorCli<'_> {
        CollectorCli {
            bin: self.cli.as_deref(),
            url: self.collector_url(),
        }
    }

    /// The tail of every process log and access log of this run.
    pub fn logs_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for (name, log) in &self.logs {
            out.push_str(&format!(
                "--- {name} ({}) ---\n{}\n",
                log.display(),
                tail(log, lines)
            ));
        }
        for inst in &self.plan.instances {
            let log = self
                .run_dir
                .join(format!("{}.access.log", inst.file_stem()));
            if log.exists() {
                out.push_str(&format!(
                    "--- access log {} ---\n{}\n",
                    inst.label(),
                    tail(&log, lines)
                ));
            }
        }
        out
    }

    /// Stops every process: SIGTERM (the collector finishes its open traces), then
    /// SIGKILL after a grace period.
    pub fn stop(&mut self) {
        for p in &self.procs {
            // SAFETY: kill(2) on a child we spawned and have not reaped yet.
            unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for p in &mut self.procs {
            loop {
                match p.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = p.child.kill();
                        let _ = p.child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(25)),
                }
            }
            if let Ok(mut c) = CHILDREN.lock() {
                c.remove(&(p.child.id() as i32));
            }
        }
        self.procs.clear();
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // Stop first: Envoy flushes its access logs on exit.
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "==== hopwatch mesh logs (kept in {}) ====\n{}",
                self.run_dir.display(),
                self.logs_tail(30)
            );
        } else if !self.keep_run_dir {
            let _ = std::fs::remove_dir_all(&self.run_dir);
        }
    }
}
