//! `hopwatch`: query a hopwatch collector.
//!
//! Exit status: 0 success, 1 the collector cannot be reached or answered an error,
//! 2 usage error (clap), 3 `breaks --fail-on` found a finding at or above the severity.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use hopwatch_collector::cli::{self, Style};
use hopwatch_collector::term::{self, ColorChoice};
use hopwatch_collector::watch::{Event, Throttle};
use hopwatch_proto::v1::query_client::QueryClient;
use hopwatch_proto::v1::{
    Break, BreakKind, GetTraceRequest, ListBreaksRequest, Severity, SummaryRequest,
    WatchBreaksRequest,
};
use tonic::transport::{Channel, ClientTlsConfig};

#[derive(Parser)]
#[command(
    name = "hopwatch",
    version,
    about = "Ask the hopwatch collector where call chains broke",
    after_help = "Exit status: 0 ok, 1 collector unreachable or error, 2 usage error, 3 --fail-on matched."
)]
struct Cli {
    /// Collector gRPC URL (https:// speaks TLS, verified against the system's and
    /// Mozilla's roots, or --ca-cert).
    #[arg(
        long,
        global = true,
        env = "HOPWATCH_COLLECTOR",
        default_value = "http://127.0.0.1:9090"
    )]
    collector: String,
    /// Bound on every call to the collector (connecting included), e.g. 500ms, 10s.
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// PEM CA certificate to verify an https:// collector with (instead of the usual roots).
    #[arg(long, global = true, value_name = "FILE")]
    ca_cert: Option<std::path::PathBuf>,
    /// Colour: auto (only on a terminal), always, never. NO_COLOR (set, not empty) wins.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    color: ColorChoice,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Debug)]
enum ListOutput {
    /// Aligned columns fitted to the terminal width.
    Table,
    /// All columns, nothing truncated.
    Wide,
    Json,
    Yaml,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Debug)]
enum TreeOutput {
    Tree,
    Json,
    Yaml,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Debug)]
enum FailOn {
    Error,
    Warning,
    Info,
}

impl FailOn {
    fn severity(self) -> Severity {
        match self {
            FailOn::Error => Severity::Error,
            FailOn::Warning => Severity::Warning,
            FailOn::Info => Severity::Info,
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 30s, 15m, 2h, 7d)"))
}

#[derive(Subcommand)]
enum Cmd {
    /// List findings (breaks), most recently seen first.
    Breaks {
        /// Only this kind (e.g. TAG_DROPPED).
        #[arg(long, value_parser = cli::parse_kind)]
        kind: Option<BreakKind>,
        /// Only where this workload broke.
        #[arg(long)]
        workload: Option<String>,
        /// Only in this namespace.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Only findings seen within this duration (e.g. 15m, 2h).
        #[arg(long, value_parser = parse_duration)]
        since: Option<Duration>,
        /// At most this many (default 100).
        #[arg(long)]
        limit: Option<u32>,
        /// `json`: one array of break objects; `yaml`: the same as YAML.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: ListOutput,
        /// Exit with status 3 when a listed finding has this severity or a higher one.
        #[arg(long, value_enum, value_name = "SEVERITY")]
        fail_on: Option<FailOn>,
    },
    /// Show the joined call chain of a trace, with its breaks.
    Trace {
        /// Trace id (hex; for hops without one, the request id).
        trace_id: String,
        #[arg(short = 'o', long, value_enum, default_value = "tree")]
        output: TreeOutput,
    },
    /// Per-workload statistics.
    Summary {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: ListOutput,
    },
    /// The current findings, then new and changed ones as they are recorded; reconnects
    /// (with backoff) when the collector goes away.
    Watch {
        /// Only this kind.
        #[arg(long, value_parser = cli::parse_kind)]
        kind: Option<BreakKind>,
        /// Only where this workload broke.
        #[arg(long)]
        workload: Option<String>,
        /// Only in this namespace.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// A changed finding is printed at most once per this interval.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        interval: Duration,
        /// `json`: one JSON object per line; `yaml`: one YAML document per finding.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: ListOutput,
    },
    /// Print a shell completion script (e.g. `source <(hopwatch completions bash)`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Why the command failed, and so its exit status.
enum Failure {
    /// Exit 1: unreachable, an error answer, a timeout.
    Error(String),
    /// Exit 3: `--fail-on` matched.
    Gate(String),
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure::Error(s)
    }
}

fn now_ms() -> u64 {
    hopwatch_collector::service::now_ms()
}

fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// A connected client and what the calls need to explain failures.
struct Conn {
    client: QueryClient<Channel>,
    url: String,
    timeout: Duration,
}

/// Connects to `url` within `timeout`: TLS for https://, plaintext for http://.
async fn connect(
    url: &str,
    timeout: Duration,
    ca: Option<&std::path::Path>,
) -> Result<Conn, String> {
    let mut endpoint = Channel::from_shared(url.to_string())
        .map_err(|e| {
            format!("invalid collector URL {url:?}: {e} (expected e.g. http://127.0.0.1:9090)")
        })?
        .connect_timeout(timeout)
        .timeout(timeout);
    let tls = url.starts_with("https://");
    if tls {
        let mut cfg = ClientTlsConfig::new();
        cfg = match ca {
            Some(p) => {
                let pem = std::fs::read(p)
                    .map_err(|e| format!("reading --ca-cert {}: {e}", p.display()))?;
                cfg.ca_certificate(tonic::transport::Certificate::from_pem(pem))
            }
            None => cfg.with_enabled_roots(),
        };
        endpoint = endpoint
            .tls_config(cfg)
            .map_err(|e| format!("TLS configuration for {url}: {}", root_cause(&e)))?;
    } else if !url.starts_with("http://") {
        return Err(format!(
            "unsupported scheme in collector URL {url:?}: use http:// (plaintext) or https:// (TLS)"
        ));
    }
    let ch = match tokio::time::timeout(timeout, endpoint.connect()).await {
        Err(_) => return Err(timed_out(url, timeout, "connecting")),
        Ok(Err(e)) => {
            let cause = root_cause(&e);
            let mut msg = format!("cannot reach the collector at {url} ({cause}); is it running? Point at it with --collector URL or HOPWATCH_COLLECTOR");
            if tls {
                msg.push_str(
                    " (TLS: the URL says https://; use http:// for a plaintext collector)",
                );
            }
            return Err(msg);
        }
        Ok(Ok(ch)) => ch,
    };
    Ok(Conn {
        client: QueryClient::new(ch).max_decoding_message_size(64 * 1024 * 1024),
        url: url.to_string(),
        timeout,
    })
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cause = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        cause = s.to_string();
        src = s.source();
    }
    cause
}

fn timed_out(url: &str, timeout: Duration, what: &str) -> String {
    format!(
        "the collector at {url} did not answer within {} ({what}); raise --request-timeout, or check that --collector points at its gRPC port (default 9090)",
        human(timeout)
    )
}

/// Whether `url`'s host:port answers plain HTTP/1 (the collector's HTTP port, not gRPC).
async fn speaks_http1(url: &str, timeout: Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(hostport) = url
        .split_once("://")
        .map(|(_, r)| r.split('/').next().unwrap_or(r).to_string())
    else {
        return false;
    };
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(&hostport).await.ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: hopwatch\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).await.ok()?;
        Some(buf.get(..n)?.starts_with(b"HTTP/1."))
    };
    matches!(tokio::time::timeout(timeout, probe).await, Ok(Some(true)))
}

impl Conn {
    /// Runs one call within the timeout, turning a failure into one clear line.
    async fn call<T, F>(&self, what: &str, f: F) -> Result<T, String>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match tokio::time::timeout(self.timeout, f).await {
            Err(_) => Err(self.explain_timeout(what).await),
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(self.status_msg(s).await),
        }
    }

    async fn explain_timeout(&self, what: &str) -> String {
        if speaks_http1(&self.url, self.timeout).await {
            return self.metrics_port_msg();
        }
        timed_out(&self.url, self.timeout, what)
    }

    fn metrics_port_msg(&self) -> String {
        format!(
            "{} answers plain HTTP, not gRPC: this looks like the collector's HTTP port (/metrics, /healthz, the web view; default 9091). Point --collector at its gRPC port (default 9090)",
            self.url
        )
    }

    async fn status_msg(&self, s: tonic::Status) -> String {
        let url = &self.url;
        match s.code() {
            tonic::Code::NotFound => s.message().to_string(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
                if s.message().contains("timeout") || s.message().contains("Timeout") =>
            {
                timed_out(url, self.timeout, "waiting for the answer")
            }
            _ if s.code() != tonic::Code::InvalidArgument
                && speaks_http1(url, self.timeout).await =>
            {
                self.metrics_port_msg()
            }
            tonic::Code::Unavailable => format!(
                "cannot reach the collector at {url} ({}); is it running? Point at it with --collector URL or HOPWATCH_COLLECTOR",
                s.message()
            ),
            _ => format!("collector answered {:?}: {}", s.code(), s.message()),
        }
    }
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn print_yaml(v: &serde_json::Value) {
    match serde_yaml_ng::to_string(v) {
        Ok(s) => print!("{s}"),
        Err(e) => eprintln!("hopwatch: cannot render YAML: {e}"),
    }
}

fn style(color: ColorChoice, wide: bool) -> Style {
    Style {
        width: term::table_width(),
        color: term::use_color(color),
        wide,
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    // "host:port" is accepted as "http://host:port".
    let url = if cli.collector.contains("://") {
        cli.collector.clone()
    } else {
        format!("http://{}", cli.collector)
    };
    let timeout = cli.request_timeout;
    if let Cmd::Completions { shell } = cli.cmd {
        let mut cmd = Cli::command();
        clap_complete::generate(shell, &mut cmd, "hopwatch", &mut std::io::stdout());
        return Ok(());
    }
    let mut conn = connect(&url, timeout, cli.ca_cert.as_deref()).await?;
    match cli.cmd {
        Cmd::Completions { .. } => {}
        Cmd::Breaks {
            kind,
            workload,
            namespace,
            since,
            limit,
            output,
            fail_on,
        } => {
            let req = ListBreaksRequest {
                kind: kind.map(|k| k as i32).unwrap_or(0),
                workload: workload.unwrap_or_default(),
                namespace: namespace.unwrap_or_default(),
                since_seconds: since.map(|d| d.as_secs().max(1)).unwrap_or(0),
                limit: limit.unwrap_or(0),
            };
            let mut client = conn.client.clone();
            let r = conn.call("ListBreaks", client.list_breaks(req)).await?;
            match output {
                ListOutput::Json => print_json(&cli::breaks_json(&r.breaks)),
                ListOutput::Yaml => print_yaml(&cli::breaks_json(&r.breaks)),
                ListOutput::Table | ListOutput::Wide => print!(
                    "{}",
                    cli::breaks_table_styled(
                        &r.breaks,
                        now_ms(),
                        &style(cli.color, output == ListOutput::Wide)
                    )
                ),
            }
            if let Some(f) = fail_on {
                let min = f.severity() as i32;
                let n = r.breaks.iter().filter(|b| b.severity >= min).count();
                if n > 0 {
                    return Err(Failure::Gate(format!(
                        "{n} finding(s) at or above {} (--fail-on {})",
                        f.severity().as_str_name(),
                        f.severity().as_str_name().to_ascii_lowercase()
                    )));
                }
            }
        }
        Cmd::Trace { trace_id, output } => {
            let mut client = conn.client.clone();
            let r = conn
                .call("GetTrace", client.get_trace(GetTraceRequest { trace_id }))
                .await?;
            match output {
                TreeOutput::Json => print_json(&cli::trace_json(&r)),
                TreeOutput::Yaml => print_yaml(&cli::trace_json(&r)),
                TreeOutput::Tree => print!("{}", cli::trace_tree(&r)),
            }
        }
        Cmd::Summary { output } => {
            let mut client = conn.client.clone();
            let r = conn
                .call("Summary", client.summary(SummaryRequest {}))
                .await?;
            match output {
                ListOutput::Json => print_json(&cli::summary_json(&r)),
                ListOutput::Yaml => print_yaml(&cli::summary_json(&r)),
                ListOutput::Table | ListOutput::Wide => print!(
                    "{}",
                    cli::summary_table_styled(&r, &style(cli.color, output == ListOutput::Wide))
                ),
            }
        }
        Cmd::Watch {
            kind,
            workload,
            namespace,
            interval,
            output,
        } => {
            let filter = WatchBreaksRequest {
                kind: kind.map(|k| k as i32).unwrap_or(0),
                workload: workload.unwrap_or_default(),
                namespace: namespace.unwrap_or_default(),
            };
            watch(
                &mut conn,
                cli.ca_cert.as_deref(),
                filter,
                interval,
                output,
                cli.color,
            )
            .await?;
        }
    }
    Ok(())
}

fn print_watch(b: &Break, ev: Event, output: ListOutput, color: bool) {
    match output {
        ListOutput::Json => {
            let mut v = cli::break_json(b);
            if let Some(o) = v.as_object_mut() {
                o.insert(
                    "event".into(),
                    serde_json::json!(if ev == Event::New { "new" } else { "changed" }),
                );
            }
            println!("{v}");
        }
        ListOutput::Yaml => {
            println!("---");
            print_yaml(&cli::break_json(b));
        }
        ListOutput::Table | ListOutput::Wide => {
            let tag = if ev == Event::New {
                "NEW    "
            } else {
                "CHANGED"
            };
            let line = cli::watch_line(b);
            let line = if output == ListOutput::Table {
                match term::table_width() {
                    Some(w) => cli::truncate(&line, w.saturating_sub(8).max(20)),
                    None => line,
                }
            } else {
                line
            };
            if color {
                println!("\x1b[1m{tag}\x1b[0m {line}");
            } else {
                println!("{tag} {line}");
            }
        }
    }
}

/// `watch`: list, then stream; on a lost stream, reconnect with backoff (0.5 s doubling
/// to 30 s) and list again, printing only what is new or changed.
async fn watch(
    conn: &mut Conn,
    ca: Option<&std::path::Path>,
    filter: WatchBreaksRequest,
    interval: Duration,
    output: ListOutput,
    color: ColorChoice,
) -> Result<(), Failure> {
    let color = term::use_color(color) && matches!(output, ListOutput::Table | ListOutput::Wide);
    let mut throttle = Throttle::new(interval);
    let mut backoff = Duration::from_millis(500);
    let mut first = true;
    loop {
        // Subscribe first, then list: nothing recorded in between is missed.
        let mut client = conn.client.clone();
        let stream = conn
            .call("WatchBreaks", client.watch_breaks(filter.clone()))
            .await;
        let listed = match &stream {
            Ok(_) => {
                let mut client = conn.client.clone();
                conn.call(
                    "ListBreaks",
                    client.list_breaks(ListBreaksRequest {
                        kind: filter.kind,
                        workload: filter.workload.clone(),
                        namespace: filter.namespace.clone(),
                        since_seconds: 0,
                        limit: hopwatch_collector::server::MAX_LIMIT as u32,
                    }),
                )
                .await
            }
            Err(e) => Err(e.clone()),
        };
        let (mut stream, listed) = match (stream, listed) {
            (Ok(s), Ok(l)) => (s, l),
            (Err(e), _) | (_, Err(e)) => {
                if first {
                    return Err(Failure::Error(e));
                }
                eprintln!("hopwatch: {e}; reconnecting in {}", human(backoff));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                if let Ok(c) = connect(&conn.url, conn.timeout, ca).await {
                    *conn = c;
                }
                continue;
            }
        };
        if first && matches!(output, ListOutput::Table | ListOutput::Wide) {
            eprintln!(
                "watching {} for breaks: {} now, then new and changed ones (at most once per {} each; Ctrl-C to stop)",
                conn.url,
                listed.breaks.len(),
                human(interval)
            );
        } else if !first {
            eprintln!("hopwatch: reconnected to {}", conn.url);
        }
        first = false;
        backoff = Duration::from_millis(500);
        // Oldest first, so that the newest ends at the bottom as new ones follow.
        let mut current = listed.breaks;
        current.sort_by_key(|b| b.last_seen_unix_ms);
        for b in current {
            if let Some((ev, b)) = throttle.offer(b, Instant::now()) {
                print_watch(&b, ev, output, color);
            }
        }
        let mut tick = tokio::time::interval(
            interval
                .min(Duration::from_secs(1))
                .max(Duration::from_millis(50)),
        );
        let lost = loop {
            tokio::select! {
                m = stream.message() => match m {
                    Ok(Some(b)) => {
                        if let Some((ev, b)) = throttle.offer(b, Instant::now()) {
                            print_watch(&b, ev, output, color);
                        }
                    }
                    Ok(None) => break format!("the collector at {} ended the stream (restarting?)", conn.url),
                    Err(s) => break conn.status_msg(s).await,
                },
                _ = tick.tick() => {
                    for b in throttle.due(Instant::now()) {
                        print_watch(&b, Event::Changed, output, color);
                    }
                }
            }
        };
        eprintln!("hopwatch: {lost}; reconnecting in {}", human(backoff));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
        if let Ok(c) = connect(&conn.url, conn.timeout, ca).await {
            *conn = c;
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // Usage errors exit 2 (clap), --help/--version 0.
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Error(e)) => {
            eprintln!("hopwatch: error: {e}");
            ExitCode::from(1)
        }
        Err(Failure::Gate(e)) => {
            eprintln!("hopwatch: {e}");
            ExitCode::from(3)
        }
    }
}
