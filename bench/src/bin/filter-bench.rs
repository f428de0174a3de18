//! filter-bench: the cost per request of hopwatch in a real Envoy (one worker), next to no
//! filter, the empty Rust proxy-wasm filter (the floor) and the Lua tag filter of the
//! previous tool. Configurations run side by side in one run, in alternating rounds, so
//! ratios hold on a noisy machine. Prints figures and PASS/MISS against the targets of
//! issue 6; never fails on them.
//!
//! `filter-bench upstream-server PORT` is the tiny local upstream (spawned by the bench
//! itself, pinned with the load generator).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use serde_json::{json, Value};

use hopwatch_bench::envoy::{self, Ports};
use hopwatch_bench::wrk::Side;
use hopwatch_bench::wrk::{self, Load, WrkResult};
use hopwatch_bench::{
    free_port, http_get, http_request, median, proc_cpu_seconds, proc_status_kib, verdict,
    wait_for_port, wait_until, Proc, ScratchDir, Table,
};
use hopwatch_test_envoy::manifests;

#[derive(Parser, Debug)]
#[command(
    about = "hopwatch filter benchmark: Envoy req/s, latency and memory per filter configuration"
)]
struct Args {
    /// The Envoy 1.40 binary.
    #[arg(long, default_value = "envoy")]
    envoy: PathBuf,
    /// hopwatch's wasm (default: target/wasm32-wasip1/release/hopwatch_filter.wasm).
    #[arg(long)]
    filter_wasm: Option<PathBuf>,
    /// The empty proxy-wasm filter (default: target/wasm32-wasip1/release/hopwatch_empty_filter.wasm).
    #[arg(long)]
    empty_wasm: Option<PathBuf>,
    /// hopwatch-collector binary the hopwatch configurations report to (default:
    /// target/release/hopwatch-collector).
    #[arg(long)]
    collector: Option<PathBuf>,
    /// Configurations, comma-separated: none, empty-wasm, lua, hopwatch-out@RATE,
    /// hopwatch-in@RATE (RATE overrides report_sample_rate; without @RATE the manifest's).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "none,empty-wasm,lua,hopwatch-out@0.01,hopwatch-out@1.0,hopwatch-in@0.01,hopwatch-in@1.0"
    )]
    configs: Vec<String>,
    /// Routes: direct (direct_response) and/or proxied (local upstream).
    #[arg(long, value_delimiter = ',', default_value = "direct,proxied")]
    routes: Vec<String>,
    /// Alternating rounds (each runs every configuration once per route).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 8)]
    seconds: u32,
    /// Warm-up seconds per configuration and route (discarded).
    #[arg(long, default_value_t = 2)]
    warmup: u32,
    /// wrk connections.
    #[arg(long, default_value_t = 16)]
    connections: u32,
    /// wrk threads.
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// CPU list for Envoy (taskset -c).
    #[arg(long, default_value = "0")]
    envoy_cpu: String,
    /// CPU list for wrk, the upstream and the collector.
    #[arg(long, default_value = "1")]
    load_cpu: String,
    /// Keep the scratch directory (configs, logs).
    #[arg(long)]
    keep: bool,
    /// Also profile the Envoys with `perf record` during the measured rounds and print
    /// where their CPU goes (Envoy's code, the wasm/Lua JIT code, the kernel, libc) per
    /// configuration (µs per request when a single route is measured).
    #[arg(long)]
    perf: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    None,
    EmptyWasm,
    Lua,
    Hopwatch {
        inbound: bool,
        rate: Option<f64>,
    },
    /// The empty filter as a host-call probe (`probe+get_property=10`): prices host calls.
    Probe,
}

#[derive(Debug, Clone)]
struct Config {
    name: String,
    kind: Kind,
    /// Plugin configuration overrides (profiling variants), `+key=value` in the name.
    overrides: Vec<(String, Value)>,
}

fn parse_config(name: &str) -> Result<Config> {
    let mut parts = name.split('+');
    let s = parts.next().unwrap_or_default();
    let mut overrides = Vec::new();
    for kv in parts {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("{name:?}: override {kv:?} is not key=value"))?;
        let v = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
        overrides.push((k.to_string(), v));
    }
    let kind = match s {
        "none" => Kind::None,
        "empty-wasm" => Kind::EmptyWasm,
        "lua" => Kind::Lua,
        "probe" => Kind::Probe,
        _ => {
            let (side, rate) = match s.split_once('@') {
                Some((side, r)) => (side, Some(r.parse::<f64>().context("sample rate")?)),
                None => (s, None),
            };
            let inbound = match side {
                "hopwatch-out" => false,
                "hopwatch-in" => true,
                _ => bail!("unknown configuration {s:?}"),
            };
            Kind::Hopwatch { inbound, rate }
        }
    };
    if !overrides.is_empty() && !matches!(kind, Kind::Hopwatch { .. } | Kind::Probe) {
        bail!("{name:?}: overrides apply to hopwatch and probe configurations only");
    }
    Ok(Config {
        name: name.to_string(),
        kind,
        overrides,
    })
}

fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("upstream-server") {
        let port: u16 = argv.get(2).context("port")?.parse()?;
        return upstream_server(port);
    }
    run(Args::parse())
}

/// The local upstream: HTTP/1.1 keep-alive, answers every request `200 ok`; `/probe`
/// echoes the request headers (to check what the filter under test sent upstream).
fn upstream_server(port: u16) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        loop {
            let (mut sock, _) = listener.accept().await?;
            let _ = sock.set_nodelay(true);
            tokio::spawn(async move {
                const OK: &[u8] =
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";
                let mut buf: Vec<u8> = Vec::with_capacity(8192);
                let mut out: Vec<u8> = Vec::with_capacity(8192);
                let mut chunk = [0u8; 16384];
                loop {
                    let n = match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    let mut start = 0;
                    while let Some(end) = find(&buf[start..], b"\r\n\r\n") {
                        let req = &buf[start..start + end + 4];
                        if req.starts_with(b"GET /probe") {
                            let body = String::from_utf8_lossy(req).to_lowercase();
                            out.extend_from_slice(
                                format!(
                                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{}",
                                    body.len(),
                                    body
                                )
                                .as_bytes(),
                            );
                        } else {
                            out.extend_from_slice(OK);
                        }
                        start += end + 4;
                    }
                    buf.drain(..start);
                    if !out.is_empty() {
                        if sock.write_all(&out).await.is_err() {
                            return;
                        }
                        out.clear();
                    }
                }
            });
        }
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Distinct traces in the request pool (small enough for the filter's correlation store:
/// the traces a workload serves at one time).
const POOL: usize = 200;
/// The tag inbound requests carry (the environment the chain runs in).
const RECEIVED_TAG: &str = "dev.proj1.alice";

struct RunningEnvoy {
    config: Config,
    proc: Proc,
    ports: Ports,
}

fn run(args: Args) -> Result<()> {
    let root = manifests::repo_root();
    let filter_wasm = args
        .filter_wasm
        .clone()
        .unwrap_or_else(|| root.join("target/wasm32-wasip1/release/hopwatch_filter.wasm"));
    let empty_wasm = args
        .empty_wasm
        .clone()
        .unwrap_or_else(|| root.join("target/wasm32-wasip1/release/hopwatch_empty_filter.wasm"));
    let collector_bin = args
        .collector
        .clone()
        .unwrap_or_else(|| root.join("target/release/hopwatch-collector"));

    let mut configs = Vec::new();
    for c in &args.configs {
        let cfg = parse_config(c)?;
        let missing = match cfg.kind {
            Kind::EmptyWasm | Kind::Probe if !empty_wasm.exists() => Some(&empty_wasm),
            Kind::Hopwatch { .. } if !filter_wasm.exists() => Some(&filter_wasm),
            _ => None,
        };
        match missing {
            Some(p) => eprintln!("skipping {}: {} not built", cfg.name, p.display()),
            None => configs.push(cfg),
        }
    }
    if !configs.iter().any(|c| c.kind == Kind::None) {
        bail!("the `none` configuration is required (ratios are relative to it)");
    }
    for r in &args.routes {
        if r != "direct" && r != "proxied" {
            bail!("unknown route {r:?} (direct, proxied)");
        }
    }
    let uses_hopwatch = configs
        .iter()
        .any(|c| matches!(c.kind, Kind::Hopwatch { .. }));

    let scratch = ScratchDir::new("hopwatch-filter-bench", args.keep)?;
    let dir = scratch.path.clone();
    println!("# hopwatch filter benchmark");
    println!(
        "envoy {} | --concurrency 1 on cpu {} | wrk -t{} -c{} -d{}s --latency on cpu {} | {} rounds x {} routes x {} configs (+{}s warm-up each)",
        envoy_version(&args.envoy),
        args.envoy_cpu,
        args.threads,
        args.connections,
        args.seconds,
        args.load_cpu,
        args.rounds,
        args.routes.len(),
        configs.len(),
        args.warmup
    );
    let total =
        (args.rounds * args.seconds + args.warmup) as usize * args.routes.len() * configs.len();
    println!("expected duration: ~{}s; scratch: {}", total, dir.display());

    // The local upstream, pinned with the load generator.
    let upstream_port = free_port()?;
    let self_exe = std::env::current_exe()?;
    let _upstream = Proc::spawn(
        "upstream",
        Some(&args.load_cpu),
        &self_exe,
        &["upstream-server".into(), upstream_port.to_string()],
        &[],
        &dir.join("upstream.log"),
    )?;
    wait_for_port(upstream_port, Duration::from_secs(10))?;

    // The collector the hopwatch configurations report to.
    let sidecar = manifests::load_sidecar_filters(&root)?;
    let collector_cluster = manifests::plugin_configuration_json(&sidecar.outbound)
        .and_then(|p| p["collector_cluster"].as_str().map(str::to_string))
        .unwrap_or_else(|| "hopwatch-collector".to_string());
    let mut collector: Option<(Proc, u16, u16)> = None;
    if uses_hopwatch {
        if collector_bin.exists() {
            let grpc = free_port()?;
            let http = free_port()?;
            let data = dir.join("collector-data");
            let p = Proc::spawn(
                "collector",
                Some(&args.load_cpu),
                &collector_bin,
                &[
                    "--listen".into(),
                    format!("127.0.0.1:{grpc}"),
                    "--http-listen".into(),
                    format!("127.0.0.1:{http}"),
                    "--data-dir".into(),
                    data.display().to_string(),
                ],
                &[("RUST_LOG", "warn")],
                &dir.join("collector.log"),
            )?;
            wait_for_port(grpc, Duration::from_secs(20))
                .with_context(|| format!("collector did not start:\n{}", p.log_tail(20)))?;
            collector = Some((p, grpc, http));
        } else {
            eprintln!(
                "warning: {} not built: hopwatch reports go to a cluster with no collector",
                collector_bin.display()
            );
        }
    }
    let collector_port = match &collector {
        Some((_, grpc, _)) => *grpc,
        None => free_port()?,
    };

    // One Envoy per configuration, all kept running; only one is loaded at a time.
    let mut envoys: Vec<RunningEnvoy> = Vec::new();
    let hopwatch_filter = |inbound: bool, rate: Option<f64>, overrides: &[(String, Value)]| {
        let f = if inbound {
            &sidecar.inbound
        } else {
            &sidecar.outbound
        };
        let f = manifests::with_wasm_file(f, &filter_wasm);
        let f = match rate {
            Some(r) => envoy::with_sample_rate(&f, r),
            None => f,
        };
        envoy::with_plugin_overrides(&f, overrides)
    };
    for (i, cfg) in configs.iter().enumerate() {
        let (filters, prime_filters): (Vec<Value>, Vec<Value>) = match &cfg.kind {
            Kind::None => (vec![], vec![]),
            Kind::EmptyWasm => (vec![envoy::empty_wasm_filter(&empty_wasm)], vec![]),
            Kind::Lua => (vec![envoy::lua_filter()], vec![]),
            Kind::Probe => {
                let spec: Vec<String> = cfg
                    .overrides
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                (
                    vec![envoy::probe_filter(&empty_wasm, &spec.join(","))],
                    vec![],
                )
            }
            Kind::Hopwatch {
                inbound: true,
                rate,
            } => (vec![hopwatch_filter(true, *rate, &cfg.overrides)], vec![]),
            Kind::Hopwatch {
                inbound: false,
                rate,
            } => (
                vec![hopwatch_filter(false, *rate, &cfg.overrides)],
                vec![hopwatch_filter(true, *rate, &cfg.overrides)],
            ),
        };
        let ports = Ports {
            admin: free_port()?,
            direct: free_port()?,
            proxied: free_port()?,
            upstream: upstream_port,
            prime: if prime_filters.is_empty() {
                None
            } else {
                Some(free_port()?)
            },
        };
        let boot = envoy::bootstrap(
            ports,
            &filters,
            &prime_filters,
            Some((&collector_cluster, collector_port)),
        );
        let cfg_path = dir.join(format!("envoy-{i}-{}.json", sanitize(&cfg.name)));
        std::fs::write(&cfg_path, serde_json::to_string_pretty(&boot)?)?;
        let proc = Proc::spawn(
            &cfg.name,
            Some(&args.envoy_cpu),
            &args.envoy,
            &[
                "-c".into(),
                cfg_path.display().to_string(),
                "--concurrency".into(),
                "1".into(),
                "--disable-hot-restart".into(),
                "--log-level".into(),
                "warn".into(),
            ],
            &[("VIRTUAL_ENVIRONMENT_TAG", envoy::OWN_TAG)],
            &dir.join(format!("envoy-{i}-{}.log", sanitize(&cfg.name))),
        )?;
        envoys.push(RunningEnvoy {
            config: cfg.clone(),
            proc,
            ports,
        });
    }
    for e in &mut envoys {
        let ready = wait_until(Duration::from_secs(30), || {
            matches!(http_get(e.ports.admin, "/ready"), Ok((200, _)))
        });
        if !ready || !e.proc.alive() {
            bail!(
                "envoy {} not ready:\n{}",
                e.config.name,
                e.proc.log_tail(30)
            );
        }
        wait_for_port(e.ports.direct, Duration::from_secs(10))?;
        wait_for_port(e.ports.proxied, Duration::from_secs(10))?;
    }

    // The request pool: 200 traces, exactly 2 of them (1%) in the 0.01 sample (by the
    // filter's own sampling rule), so report_sample_rate 0.01 reports 1% of the hops.
    let pool = wrk::request_pool(POOL, POOL / 100, |t| {
        hopwatch_filter::sampling::sampled(0.01, t, "")
    });
    let out_script = dir.join("outbound-requests.lua");
    let in_script = dir.join("inbound-requests.lua");
    std::fs::write(
        &out_script,
        wrk::pool_script(
            &pool,
            Side::Outbound,
            envoy::UPSTREAM_AUTHORITY,
            "/api/v1/items",
        ),
    )?;
    std::fs::write(
        &in_script,
        wrk::pool_script(
            &pool,
            Side::Inbound { tag: RECEIVED_TAG },
            "bench-client.bench.svc.cluster.local:8080",
            "/api/v1/items",
        ),
    )?;
    let load = |seconds: u32, connections: u32, script: &Path| Load {
        connections,
        threads: args.threads,
        seconds,
        cpus: Some(args.load_cpu.clone()),
        script: Some(script.to_path_buf()),
    };
    let script_of = |e: &RunningEnvoy| match e.config.kind {
        Kind::Hopwatch { inbound: true, .. } => &in_script,
        _ => &out_script,
    };
    // hopwatch outbound: the inbound requests these calls are made while serving go
    // through the sidecar's inbound listener first (within the correlation TTL), as in a
    // real sidecar; not measured.
    let prime = |e: &RunningEnvoy| -> Result<()> {
        if let Some(port) = e.ports.prime {
            wrk::run(
                &load(1, 1, &in_script),
                &format!("http://127.0.0.1:{port}/api/v1/items"),
            )
            .with_context(|| format!("priming {}", e.config.name))?;
        }
        Ok(())
    };

    // Sanity: what each configuration sends upstream for an outbound call whose inbound
    // request carried RECEIVED_TAG (the tag must be restored by hopwatch; Lua stamps the
    // sidecar's own), and that the wasm VMs are up.
    println!("\n## Sanity (one request per configuration through the upstream route)\n");
    println!(
        "inbound requests carry x-virtual-env: {RECEIVED_TAG}; the app's outbound calls propagate the trace headers but not the tag; the sidecar's own tag is {}\n",
        envoy::OWN_TAG
    );
    let mut sanity = Table::new(&[
        "config",
        "status",
        "x-virtual-env upstream",
        "wasm VMs active",
    ]);
    for e in &envoys {
        prime(e)?;
        let p = &pool[0];
        let mut headers = vec![
            ("x-request-id", p.request_id.as_str()),
            ("x-b3-traceid", p.trace_id.as_str()),
            ("x-b3-sampled", "1"),
        ];
        if matches!(e.config.kind, Kind::Hopwatch { inbound: true, .. }) {
            headers.push(("x-b3-spanid", p.inbound_span.as_str()));
            headers.push(("x-virtual-env", RECEIVED_TAG));
        } else {
            headers.push(("x-b3-spanid", p.outbound_span.as_str()));
            headers.push(("x-b3-parentspanid", p.inbound_span.as_str()));
        }
        let probe = http_request(e.ports.proxied, "/probe", &headers);
        let (status, tag) = match probe {
            Ok((s, body)) => (
                s.to_string(),
                body.lines()
                    .find_map(|l| {
                        l.strip_prefix("x-virtual-env:")
                            .map(|v| v.trim().to_string())
                    })
                    .unwrap_or_else(|| "-".into()),
            ),
            Err(err) => (format!("error: {err}"), "-".into()),
        };
        let vms = stat_value(e.ports.admin, "wasm.envoy.wasm.runtime.v8.active")
            .map(|v| v.to_string())
            .unwrap_or_else(|| "-".into());
        sanity.row(vec![e.config.name.clone(), status, tag, vms]);
    }
    print!("{}", sanity.render());

    let url = |e: &RunningEnvoy, route: &str| {
        let port = if route == "direct" {
            e.ports.direct
        } else {
            e.ports.proxied
        };
        format!("http://127.0.0.1:{port}/api/v1/items")
    };

    // Threads of each Envoy (for attributing perf samples), then perf itself.
    let mut tid_config: BTreeMap<u32, String> = BTreeMap::new();
    let mut perf_proc: Option<(Proc, PathBuf)> = None;
    if args.perf {
        for e in &envoys {
            if let Ok(rd) = std::fs::read_dir(format!("/proc/{}/task", e.proc.pid())) {
                for t in rd.flatten() {
                    if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse().ok()) {
                        tid_config.insert(tid, e.config.name.clone());
                    }
                }
            }
        }
        let pids: Vec<String> = envoys.iter().map(|e| e.proc.pid().to_string()).collect();
        let data = dir.join("perf.data");
        match Proc::spawn(
            "perf",
            None,
            Path::new("perf"),
            &[
                "record".into(),
                "-F".into(),
                "499".into(),
                "-o".into(),
                data.display().to_string(),
                "-p".into(),
                pids.join(","),
            ],
            &[],
            &dir.join("perf.log"),
        ) {
            Ok(p) => {
                std::thread::sleep(Duration::from_secs(1));
                perf_proc = Some((p, data));
            }
            Err(e) => eprintln!("warning: perf not started: {e}"),
        }
    }

    // Warm-up (discarded).
    if args.warmup > 0 {
        for route in &args.routes {
            for e in &envoys {
                prime(e)?;
                wrk::run(
                    &load(args.warmup, args.connections, script_of(e)),
                    &url(e, route),
                )
                .with_context(|| format!("warm-up {} {route}", e.config.name))?;
            }
        }
    }

    // Alternating rounds; the starting configuration rotates each round.
    let mut results: BTreeMap<(String, String), Vec<WrkResult>> = BTreeMap::new();
    // Envoy CPU microseconds per request, per run.
    let mut cpu_per_req: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    // Envoy CPU utilisation during each run (1.0 = its core saturated).
    let mut cpu_util: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    let started = Instant::now();
    for round in 0..args.rounds {
        for route in &args.routes {
            let n = envoys.len();
            for k in 0..n {
                let e = &envoys[(k + round as usize) % n];
                prime(e)?;
                let cpu0 = proc_cpu_seconds(e.proc.pid()).unwrap_or(0.0);
                let r = wrk::run(
                    &load(args.seconds, args.connections, script_of(e)),
                    &url(e, route),
                )
                .with_context(|| format!("{} {route}", e.config.name))?;
                let cpu = proc_cpu_seconds(e.proc.pid()).unwrap_or(0.0) - cpu0;
                let cpu_us = 1e6 * cpu / r.requests.max(1) as f64;
                cpu_per_req
                    .entry((route.clone(), e.config.name.clone()))
                    .or_default()
                    .push(cpu_us);
                let util = cpu / r.seconds.max(1e-9);
                cpu_util
                    .entry((route.clone(), e.config.name.clone()))
                    .or_default()
                    .push(util);
                println!(
                    "round {} {:8} {:18} {:>8.0} req/s  p50 {:>6.0}us  p99 {:>6.0}us  envoy {:>5.1} us CPU/req, {:>3.0}% CPU{}",
                    round + 1,
                    route,
                    e.config.name,
                    r.rps,
                    r.p50_us,
                    r.p99_us,
                    cpu_us,
                    100.0 * util,
                    if r.non_2xx + r.socket_errors > 0 {
                        format!("  (non-2xx {}, socket errors {})", r.non_2xx, r.socket_errors)
                    } else {
                        String::new()
                    }
                );
                let _ = std::io::stdout().flush();
                results
                    .entry((route.clone(), e.config.name.clone()))
                    .or_default()
                    .push(r);
            }
        }
    }
    println!("measured in {:.0}s", started.elapsed().as_secs_f64());

    let perf_shares = perf_proc.take().map(|(mut p, data)| {
        p.stop(Duration::from_secs(30));
        perf_attribution(&data, &tid_config)
    });

    // Memory and reporting counters, after all the load.
    let mut mem: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for e in &mut envoys {
        if !e.proc.alive() {
            println!(
                "WARNING: envoy {} exited:\n{}",
                e.config.name,
                e.proc.log_tail(20)
            );
            continue;
        }
        let rss = proc_status_kib(e.proc.pid(), "VmRSS").unwrap_or(0) as f64 / 1024.0;
        let hwm = proc_status_kib(e.proc.pid(), "VmHWM").unwrap_or(0) as f64 / 1024.0;
        mem.insert(e.config.name.clone(), (rss, hwm));
    }

    let mut json_routes = serde_json::Map::new();
    let mut target_rows: Vec<Vec<String>> = Vec::new();
    for route in &args.routes {
        let title = if route == "direct" {
            "direct_response route (Envoy answers itself: all the cost is the proxy's)"
        } else {
            "proxied route (local upstream on the load CPU)"
        };
        println!("\n## {title}\n");
        let none = results
            .get(&(route.clone(), "none".to_string()))
            .cloned()
            .unwrap_or_default();
        let lua = results.get(&(route.clone(), "lua".to_string())).cloned();
        let mut table = Table::new(&[
            "config",
            "req/s (median)",
            "x none",
            "x lua",
            "+us/req",
            "CPU us/req",
            "x none (CPU)",
            "envoy CPU %",
            "p50 us",
            "p99 us",
            "RSS MiB",
            "peak RSS MiB",
            "req/s per round",
        ]);
        let mut json_cfgs = serde_json::Map::new();
        for e in &envoys {
            let rs = match results.get(&(route.clone(), e.config.name.clone())) {
                Some(rs) => rs,
                None => continue,
            };
            let rps = median(&rs.iter().map(|r| r.rps).collect::<Vec<_>>());
            let ratio_none = median(
                &rs.iter()
                    .zip(&none)
                    .map(|(r, n)| r.rps / n.rps)
                    .collect::<Vec<_>>(),
            );
            let ratio_lua = lua.as_ref().map(|l| {
                median(
                    &rs.iter()
                        .zip(l)
                        .map(|(r, l)| r.rps / l.rps)
                        .collect::<Vec<_>>(),
                )
            });
            let none_rps = median(&none.iter().map(|r| r.rps).collect::<Vec<_>>());
            let added_us = 1e6 / rps - 1e6 / none_rps;
            let p50 = median(&rs.iter().map(|r| r.p50_us).collect::<Vec<_>>());
            let p99 = median(&rs.iter().map(|r| r.p99_us).collect::<Vec<_>>());
            let (rss, hwm) = mem
                .get(&e.config.name)
                .copied()
                .unwrap_or((f64::NAN, f64::NAN));
            let cpu_us = cpu_per_req
                .get(&(route.clone(), e.config.name.clone()))
                .map(|v| median(v))
                .unwrap_or(f64::NAN);
            let none_cpu = cpu_per_req
                .get(&(route.clone(), "none".to_string()))
                .map(|v| median(v))
                .unwrap_or(f64::NAN);
            let lua_cpu = cpu_per_req
                .get(&(route.clone(), "lua".to_string()))
                .map(|v| median(v));
            let cpu_ratio = none_cpu / cpu_us;
            let util = cpu_util
                .get(&(route.clone(), e.config.name.clone()))
                .map(|v| median(v))
                .unwrap_or(f64::NAN);
            table.row(vec![
                e.config.name.clone(),
                format!("{rps:.0}"),
                format!("{ratio_none:.3}"),
                ratio_lua
                    .map(|r| format!("{r:.3}"))
                    .unwrap_or_else(|| "-".into()),
                format!("{added_us:+.2}"),
                format!("{cpu_us:.2}"),
                format!("{cpu_ratio:.3}"),
                format!("{:.0}", 100.0 * util),
                format!("{p50:.0}"),
                format!("{p99:.0}"),
                format!("{rss:.1}"),
                format!("{hwm:.1}"),
                rs.iter()
                    .map(|r| format!("{:.0}", r.rps))
                    .collect::<Vec<_>>()
                    .join(" / "),
            ]);
            json_cfgs.insert(
                e.config.name.clone(),
                json!({
                    "rps_median": rps, "ratio_none": ratio_none, "ratio_lua": ratio_lua,
                    "added_us_per_request": added_us, "envoy_cpu_us_per_request": cpu_us, "cpu_ratio_none": cpu_ratio, "envoy_cpu_utilisation": util, "p50_us": p50, "p99_us": p99,
                    "rss_mib": rss, "peak_rss_mib": hwm,
                    "rounds": rs.iter().map(|r| json!({"rps": r.rps, "p50_us": r.p50_us, "p99_us": r.p99_us, "requests": r.requests, "non_2xx": r.non_2xx, "socket_errors": r.socket_errors})).collect::<Vec<_>>(),
                }),
            );
            // Targets of issue 6.
            if let (
                Kind::Hopwatch {
                    inbound: false,
                    rate,
                },
                true,
            ) = (&e.config.kind, e.config.overrides.is_empty())
            {
                let rate = *rate;
                let rate = rate.unwrap_or(1.0);
                if (rate - 0.01).abs() < 1e-9 {
                    target_rows.push(vec![
                        format!("{} >= 0.75x none", e.config.name),
                        route.clone(),
                        format!("{ratio_none:.3}x"),
                        format!("{cpu_ratio:.3}x"),
                        verdict(ratio_none >= 0.75).into(),
                    ]);
                    if let Some(rl) = ratio_lua {
                        target_rows.push(vec![
                            format!("{} >= 0.9x lua", e.config.name),
                            route.clone(),
                            format!("{rl:.3}x"),
                            lua_cpu
                                .map(|l| format!("{:.3}x", l / cpu_us))
                                .unwrap_or_else(|| "-".into()),
                            verdict(rl >= 0.9).into(),
                        ]);
                    }
                } else if (rate - 1.0).abs() < 1e-9 {
                    target_rows.push(vec![
                        format!("{} >= 0.65x none", e.config.name),
                        route.clone(),
                        format!("{ratio_none:.3}x"),
                        format!("{cpu_ratio:.3}x"),
                        verdict(ratio_none >= 0.65).into(),
                    ]);
                }
            }
        }
        print!("{}", table.render());
        println!(
            "\n(ratios: median over rounds of req/s / the same round's req/s of the reference; +us/req: 1e6/req/s - 1e6/req/s of none; CPU us/req: Envoy's own CPU time (all threads, /proc) per request, median over rounds, and x none (CPU) = none's CPU us/req / this one's, a cross-check robust to other load on the machine; envoy CPU %: 100 = its core saturated, i.e. Envoy is the bottleneck; RSS after the whole run)"
        );
        json_routes.insert(route.clone(), Value::Object(json_cfgs));
    }

    // hopwatch's own counters: did reports flow?
    let mut report_rows = Table::new(&[
        "config",
        "hops seen",
        "hops reported",
        "share reported",
        "batches sent",
        "dropped / failed",
        "collector cluster rq (total / 2xx)",
    ]);
    let mut counter_lines: Vec<(String, Vec<String>)> = Vec::new();
    for e in &envoys {
        if !matches!(e.config.kind, Kind::Hopwatch { .. }) {
            continue;
        }
        let stats = http_get(e.ports.admin, "/stats")
            .map(|(_, b)| b)
            .unwrap_or_default();
        let mut sums: BTreeMap<&str, u64> = BTreeMap::new();
        let mut lines = Vec::new();
        for l in stats.lines() {
            let Some((name, value)) = l.split_once(": ") else {
                continue;
            };
            let Ok(v) = value.trim().parse::<u64>() else {
                continue;
            };
            if let Some(rest) = name.strip_prefix("wasmcustom.hopwatch.") {
                if v > 0 {
                    lines.push(format!("{rest}: {v}"));
                }
                let key = rest.split_once('.').map(|(_, k)| k).unwrap_or(rest);
                for (want, label) in [
                    ("hops_seen", "seen"),
                    ("hops_reported", "reported"),
                    ("batches_sent", "batches"),
                ] {
                    if key == want {
                        *sums.entry(label).or_default() += v;
                    }
                }
                if key.contains("drop") || key.contains("fail") || key.contains("error") {
                    *sums.entry("dropped").or_default() += v;
                }
            } else if let Some(rest) = name.strip_prefix(&format!("cluster.{collector_cluster}.")) {
                if rest == "upstream_rq_total" {
                    *sums.entry("rq").or_default() += v;
                }
                if rest == "upstream_rq_2xx" {
                    *sums.entry("rq2xx").or_default() += v;
                }
            }
        }
        let g = |k: &str| sums.get(k).copied().unwrap_or(0);
        report_rows.row(vec![
            e.config.name.clone(),
            g("seen").to_string(),
            g("reported").to_string(),
            format!(
                "{:.2}%",
                100.0 * g("reported") as f64 / g("seen").max(1) as f64
            ),
            g("batches").to_string(),
            g("dropped").to_string(),
            format!("{} / {}", g("rq"), g("rq2xx")),
        ]);
        counter_lines.push((e.config.name.clone(), lines));
    }
    if !counter_lines.is_empty() {
        println!("\n## hopwatch reporting (Envoy stats, whole run incl. warm-up and the inbound requests of outbound configurations)\n");
        print!("{}", report_rows.render());
        println!("\nnon-zero wasmcustom.hopwatch.* counters:");
        for (name, lines) in &counter_lines {
            println!("  {name}: {}", lines.join(", "));
        }
    }
    if let Some((p, _, http)) = &collector {
        let metrics = http_get(*http, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default();
        let m: BTreeMap<String, f64> = hopwatch_bench::parse_prometheus(&metrics)
            .into_iter()
            .collect();
        let g = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
        println!(
            "\ncollector: {} hops received in {} batches, {} reports dropped by filters, {} traces analysed, {} findings",
            g("hopwatch_hops_received_total"),
            g("hopwatch_batches_received_total"),
            g("hopwatch_reports_dropped_by_filters_total"),
            g("hopwatch_traces_analysed_total"),
            g("hopwatch_findings_total")
        );
        if let Some(rss) = hopwatch_bench::rss_mib(p.pid()) {
            println!("  collector RSS {rss:.1} MiB");
        }
    }

    // wasm size.
    println!("\n## Targets (issue 6)\n");
    let mut targets = Table::new(&[
        "target",
        "route",
        "measured (req/s ratio)",
        "cross-check (Envoy CPU/req ratio)",
        "verdict",
    ]);
    for r in target_rows {
        targets.row(r);
    }
    if let Ok(meta) = std::fs::metadata(&filter_wasm) {
        let bytes = meta.len();
        targets.row(vec![
            "hopwatch_filter.wasm <= 256 KB".into(),
            "-".into(),
            format!("{bytes} bytes ({:.1} KiB)", bytes as f64 / 1024.0),
            "-".into(),
            verdict(bytes <= 256 * 1024).into(),
        ]);
    }
    if let Ok(meta) = std::fs::metadata(&empty_wasm) {
        targets.row(vec![
            "(empty filter wasm, for scale)".into(),
            "-".into(),
            format!("{} bytes", meta.len()),
            "-".into(),
            "-".into(),
        ]);
    }
    print!("{}", targets.render());

    if let Some(shares) = &perf_shares {
        print_perf(shares, &args.routes, &cpu_per_req, &envoys);
    }

    if let Some(path) = &args.json_out {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&json!({
                "routes": json_routes,
                "args": format!("{args:?}"),
            }))?,
        )?;
    }

    // Envoy logs: wasm failures make hopwatch configurations look like `none`.
    for e in &envoys {
        let log = std::fs::read_to_string(&e.proc.log).unwrap_or_default();
        let bad: Vec<&str> = log
            .lines()
            .filter(|l| {
                let l = l.to_lowercase();
                l.contains("panic")
                    || l.contains("wasm") && (l.contains("error") || l.contains("fail"))
            })
            .take(5)
            .collect();
        if !bad.is_empty() {
            println!(
                "\nWARNING: envoy {} logged:\n  {}",
                e.config.name,
                bad.join("\n  ")
            );
        }
    }
    for mut e in envoys {
        e.proc.stop(Duration::from_secs(3));
    }
    Ok(())
}

/// perf samples per configuration and code class: Envoy's binary (including V8's
/// runtime and the proxy-wasm host functions), JIT code (the wasm filter compiled by V8,
/// or LuaJIT), the kernel, and the rest (libc, vdso).
type PerfShares = BTreeMap<String, BTreeMap<&'static str, u64>>;

const PERF_CLASSES: [&str; 4] = ["envoy", "jit", "kernel", "libc+other"];

fn perf_attribution(data: &Path, tid_config: &BTreeMap<u32, String>) -> PerfShares {
    let out = std::process::Command::new("perf")
        .args(["report", "-i"])
        .arg(data)
        .args(["--sort", "pid,dso", "--stdio", "-q", "-n", "-t", "|"])
        .output();
    let text = match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(e) => {
            eprintln!("warning: perf report failed: {e}");
            return PerfShares::new();
        }
    };
    let mut shares = PerfShares::new();
    for line in text.lines() {
        let cols: Vec<&str> = line.split('|').map(str::trim).collect();
        if cols.len() < 4 {
            continue;
        }
        let (Ok(samples), Some(tid)) = (
            cols[1].parse::<u64>(),
            cols[2]
                .split(':')
                .next()
                .and_then(|t| t.trim().parse::<u32>().ok()),
        ) else {
            continue;
        };
        let Some(config) = tid_config.get(&tid) else {
            continue;
        };
        let dso = cols[3];
        let class = if dso == "envoy" {
            "envoy"
        } else if dso.starts_with("[JIT]") || dso.contains("luajit") {
            "jit"
        } else if dso.starts_with("[kernel") {
            "kernel"
        } else {
            "libc+other"
        };
        *shares
            .entry(config.clone())
            .or_default()
            .entry(class)
            .or_default() += samples;
    }
    shares
}

fn print_perf(
    shares: &PerfShares,
    routes: &[String],
    cpu_per_req: &BTreeMap<(String, String), Vec<f64>>,
    envoys: &[RunningEnvoy],
) {
    let single = (routes.len() == 1).then(|| routes[0].clone());
    println!(
        "\n## Where Envoy's CPU goes (perf record of the Envoys during the measured runs{})\n",
        match &single {
            Some(r) => format!(", {r} route: us of CPU per request"),
            None => ": share of samples, all routes".into(),
        }
    );
    let mut t = Table::new(&[
        "config",
        "samples",
        "CPU us/req",
        "Envoy binary",
        "JIT (wasm/Lua)",
        "kernel",
        "libc+other",
    ]);
    for e in envoys {
        let Some(m) = shares.get(&e.config.name) else {
            continue;
        };
        let total: u64 = m.values().sum();
        let cpu = single.as_ref().and_then(|r| {
            cpu_per_req
                .get(&(r.clone(), e.config.name.clone()))
                .map(|v| median(v))
        });
        let mut row = vec![
            e.config.name.clone(),
            total.to_string(),
            cpu.map(|c| format!("{c:.1}")).unwrap_or_else(|| "-".into()),
        ];
        for class in PERF_CLASSES {
            let share = m.get(class).copied().unwrap_or(0) as f64 / total.max(1) as f64;
            row.push(match cpu {
                Some(c) => format!("{:.1}", share * c),
                None => format!("{:.1}%", 100.0 * share),
            });
        }
        t.row(row);
    }
    print!("{}", t.render());
    println!("\n(the Envoy wheel is stripped and V8 writes no perf map: classes are by DSO only)");
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn envoy_version(envoy: &Path) -> String {
    std::process::Command::new(envoy)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let s = String::from_utf8_lossy(&o.stdout).to_string();
            let v = s.split("version:").nth(1)?;
            v.split('/').nth(1).map(str::to_string)
        })
        .unwrap_or_else(|| "?".into())
}

/// A counter or gauge from Envoy's admin `/stats`.
fn stat_value(admin: u16, name: &str) -> Option<u64> {
    let (_, body) = http_get(
        admin,
        &format!("/stats?filter=^{}$", name.replace('.', "\\.")),
    )
    .ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: "))?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_parse() {
        assert_eq!(parse_config("none").unwrap().kind, Kind::None);
        assert_eq!(
            parse_config("hopwatch-out@0.01").unwrap().kind,
            Kind::Hopwatch {
                inbound: false,
                rate: Some(0.01)
            }
        );
        assert_eq!(
            parse_config("hopwatch-in").unwrap().kind,
            Kind::Hopwatch {
                inbound: true,
                rate: None
            }
        );
        assert!(parse_config("bogus").is_err());
        let c = parse_config("hopwatch-out@0.01+annotate_response=never+correlation_buckets=256")
            .unwrap();
        assert_eq!(
            c.overrides,
            vec![
                ("annotate_response".to_string(), json!("never")),
                ("correlation_buckets".to_string(), json!(256))
            ]
        );
        assert!(parse_config("lua+x=1").is_err());
        let p = parse_config("probe+get_property=10").unwrap();
        assert_eq!(p.kind, Kind::Probe);
        assert_eq!(p.overrides, vec![("get_property".to_string(), json!(10))]);
    }
}
