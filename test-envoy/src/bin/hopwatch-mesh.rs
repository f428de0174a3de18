//! `hopwatch-mesh`: runs the local mesh of real Envoys with hopwatch.
//!
//! - `up TOPOLOGY`: start it, print the ports, run until Ctrl-C.
//! - `demo`: the README's main job on the embedded topology: start the mesh, send
//!   tagged requests through a broken chain, print `hopwatch breaks` and a `hopwatch
//!   trace` tree, stop.
//! - `render TOPOLOGY --out DIR`: write the Envoy bootstraps and a docker-compose file.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use hopwatch_test_envoy::bins;
use hopwatch_test_envoy::mesh::{new_trace_id, stop_all_children, Ingress, Mesh, MeshOptions};
use hopwatch_test_envoy::plan::Plan;
use hopwatch_test_envoy::render::render;
use hopwatch_test_envoy::topology::{Topology, DEMO_TOPOLOGY};
use serde_json::Value;

#[derive(Parser)]
#[command(about = "A local mesh of real Envoy sidecars running hopwatch")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the mesh of TOPOLOGY and keep it running until Ctrl-C.
    Up {
        topology: PathBuf,
        /// Do not start the collector (sidecars report into the void).
        #[arg(long)]
        no_collector: bool,
        /// The collector's --trace-quiet.
        #[arg(long, default_value = "2s")]
        trace_quiet: String,
    },
    /// Run the demo: a broken chain, its chain-break report and a trace tree.
    Demo {
        /// Requests to send.
        #[arg(long, default_value_t = 3)]
        requests: usize,
        /// Use this topology instead of the embedded one.
        #[arg(long)]
        topology: Option<PathBuf>,
        /// The tag the requests carry.
        #[arg(long, default_value = "dev.proj1")]
        tag: String,
    },
    /// Write the Envoy bootstraps of TOPOLOGY and a docker-compose file running them.
    Render {
        topology: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// The docker-compose file to write (default OUT/docker-compose.yaml).
        #[arg(long)]
        compose: Option<PathBuf>,
        /// First of the consecutive loopback ports the rendered mesh uses.
        #[arg(long, default_value_t = 21000)]
        base_port: u16,
    },
}

/// Set while `main` itself handles a signal (it then stops the mesh in order).
static MAIN_HANDLES_SIGNALS: AtomicBool = AtomicBool::new(false);

/// Waits for SIGINT/SIGTERM on a thread of its own. `Drop` does not run when a signal
/// ends a process, so either main is told (and drops the mesh), or this thread stops
/// every child itself and exits.
fn install_signal_handler() -> anyhow::Result<mpsc::Receiver<()>> {
    let (tx, rx) = mpsc::channel();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("signal runtime")?;
    std::thread::spawn(move || {
        runtime.block_on(async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        if MAIN_HANDLES_SIGNALS.load(Ordering::SeqCst) && tx.send(()).is_ok() {
            return;
        }
        eprintln!("\ninterrupted: stopping the mesh");
        stop_all_children();
        std::process::exit(130);
    });
    Ok(rx)
}

fn print_ports(mesh: &Mesh) {
    let plan: &Plan = mesh.plan();
    println!(
        "collector   gRPC {}  (HTTP 127.0.0.1:{}: /metrics, the web view at /)",
        mesh.collector_url(),
        plan.collector_http
    );
    for i in &plan.instances {
        let sidecar = match i.sidecar {
            Some(s) => format!(
                "inbound 127.0.0.1:{:<5}  outbound 127.0.0.1:{:<5}  admin 127.0.0.1:{}",
                s.inbound, s.outbound, s.admin
            ),
            None => "no sidecar".into(),
        };
        let app = if i.app_down {
            "down".to_string()
        } else {
            format!("127.0.0.1:{}", i.app_port)
        };
        println!("{:<28} app {:<16} {}", i.label(), app, sidecar);
    }
    println!("logs and configs: {}", mesh.run_dir().display());
}

fn up(path: PathBuf, no_collector: bool, trace_quiet: String) -> anyhow::Result<()> {
    let signals = install_signal_handler()?;
    MAIN_HANDLES_SIGNALS.store(true, Ordering::SeqCst);
    let topology = Topology::load(&path)?;
    let mut options = MeshOptions::named("up");
    options.start_collector = !no_collector;
    options.trace_quiet = trace_quiet;
    let mut mesh = Mesh::start(&topology, &options)?;
    print_ports(&mesh);
    if let Some(first) = mesh.plan().instances.first() {
        println!(
            "\ntry: curl -s -H 'host: {}' -H '{}: dev' http://127.0.0.1:{}/ | head -c 600",
            first.fqdn(),
            topology.tag_header,
            first.endpoint_port()
        );
        println!(
            "     HOPWATCH_COLLECTOR={} hopwatch breaks",
            mesh.collector_url()
        );
    }
    println!("\nrunning; Ctrl-C to stop");
    let _ = signals.recv();
    // Not println!: stdout may be a pipe its reader already closed.
    let _ = writeln!(std::io::stdout(), "stopping");
    mesh.stop();
    Ok(())
}

/// One line per service in a demo response: who answered what, nested.
fn describe_calls(body: &Value, depth: usize, out: &mut Vec<String>) {
    let Some(calls) = body["calls"].as_array() else {
        return;
    };
    for c in calls {
        let service = c["service"]
            .as_str()
            .unwrap_or("?")
            .split('.')
            .next()
            .unwrap_or("?");
        let line = if let Some(e) = c["error"].as_str() {
            format!("{service}: no answer ({e})")
        } else {
            let who = c["body"]["workload"].as_str().unwrap_or("");
            let tag = c["body"]["received"]["x-virtual-env"]
                .as_str()
                .unwrap_or("-");
            let note = c["headers"]["x-hopwatch"]
                .as_str()
                .map(|h| format!("  [x-hopwatch: {}]", short_annotation(h)))
                .unwrap_or_default();
            if who.is_empty() {
                format!("{service}: HTTP {}{note}", c["status"])
            } else {
                format!(
                    "{service}: HTTP {} from {who} (received tag {tag}){note}",
                    c["status"]
                )
            }
        };
        out.push(format!("{}{line}", "  ".repeat(depth + 1)));
        describe_calls(&c["body"], depth + 1, out);
    }
}

/// `dir=inbound; workload=w; ns=n; code=503; flags=UF; details=...,dir=outbound; ...` as
/// `w inbound 503 UF, ...` (the details are in the access logs and the trace).
fn short_annotation(header: &str) -> String {
    header
        .split(",dir=")
        .map(|entry| {
            let field = |key: &str| {
                entry
                    .trim_start_matches("dir=")
                    .split("; ")
                    .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
                    .unwrap_or("?")
                    .to_string()
            };
            let dir = entry
                .trim_start_matches("dir=")
                .split(';')
                .next()
                .unwrap_or("?");
            format!(
                "{} {} {} {}",
                field("workload"),
                dir,
                field("code"),
                field("flags")
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn demo(requests: usize, topology_path: Option<PathBuf>, tag: String) -> anyhow::Result<()> {
    install_signal_handler()?;
    let topology = match &topology_path {
        Some(p) => Topology::load(p)?,
        None => Topology::parse(DEMO_TOPOLOGY, "embedded demo topology")?,
    };
    let envoys = topology
        .workloads
        .iter()
        .filter(|w| w.sidecar)
        .map(|w| w.instances.len())
        .sum::<usize>();
    println!("==> starting the local mesh: collector + {envoys} Envoy sidecars + apps");
    let started = Instant::now();
    let mut mesh = Mesh::start(&topology, &MeshOptions::named("demo"))?;
    println!(
        "    ready in {:.1}s (logs: {})",
        started.elapsed().as_secs_f64(),
        mesh.run_dir().display()
    );
    let first = topology
        .workloads
        .first()
        .map(|w| w.name.clone())
        .unwrap_or_default();
    println!(
        "\n==> sending {requests} requests to {first} with {}: {tag}",
        topology.tag_header
    );
    for n in 1..=requests {
        // As from an ingress gateway: a started trace and a request id.
        let reply = mesh.send(
            &Ingress::new()
                .with_trace(&new_trace_id())
                .header(&topology.tag_header, &tag),
        )?;
        let body = reply.json();
        println!(
            "  request {n}: HTTP {} from {}",
            reply.status,
            body["workload"].as_str().unwrap_or("(envoy)")
        );
        let mut lines = Vec::new();
        describe_calls(&body, 1, &mut lines);
        if n == 1 {
            for l in lines {
                println!("{l}");
            }
        }
    }
    println!("\n==> waiting for the collector to analyse the traces");
    let found = mesh
        .wait_for_breaks("demo findings", Duration::from_secs(30), |b| {
            let kinds: Vec<&str> = b.iter().filter_map(|f| f["kind"].as_str()).collect();
            if topology_path.is_some() {
                // Another topology: whatever it breaks.
                !kinds.is_empty()
            } else {
                // The embedded one breaks in these two places.
                kinds.contains(&"UPSTREAM_FAILURE") && kinds.contains(&"TRACE_NOT_PROPAGATED")
            }
        })
        .or_else(|_| mesh.breaks())?;
    println!("\n$ hopwatch breaks");
    let table = mesh.cli(&["breaks"])?;
    print!("{}", table.stdout);
    eprint!("{}", table.stderr);
    let trace = found
        .iter()
        .find(|f| f["kind"] == "UPSTREAM_FAILURE")
        .or_else(|| found.first())
        .and_then(|f| {
            f["trace_ids"]
                .as_array()?
                .first()?
                .as_str()
                .map(str::to_string)
        });
    match trace {
        Some(id) => {
            println!("\n$ hopwatch trace {id}");
            let tree = mesh.cli(&["trace", &id])?;
            print!("{}", tree.stdout);
            eprint!("{}", tree.stderr);
        }
        None => println!("\n(no finding carried a trace id; nothing to draw)"),
    }
    println!("\n==> stopping the mesh");
    mesh.stop();
    if found.is_empty() {
        bail!(
            "the collector reported no chain break; see the logs in {}",
            mesh.run_dir().display()
        );
    }
    println!(
        "done: {} findings; logs kept in {}",
        found.len(),
        mesh.run_dir().display()
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Up {
            topology,
            no_collector,
            trace_quiet,
        } => up(topology, no_collector, trace_quiet),
        Cmd::Demo {
            requests,
            topology,
            tag,
        } => demo(requests, topology, tag),
        Cmd::Render {
            topology,
            out,
            compose,
            base_port,
        } => {
            let t = Topology::load(&topology)?;
            let compose = compose.unwrap_or_else(|| out.join("docker-compose.yaml"));
            let r = render(&t, &out, &compose, base_port)?;
            for f in &r.files {
                println!("wrote {}", f.display());
            }
            println!("wrote {}", r.compose.display());
            // Rendering needs no binaries; say what running it natively would need.
            if let Err(e) = bins::wasm_file() {
                println!("note: {e}");
            }
            Ok(())
        }
    }
}
