//! `hopwatch`: query a hopwatch collector.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use hopwatch_collector::cli;
use hopwatch_proto::v1::query_client::QueryClient;
use hopwatch_proto::v1::{
    BreakKind, GetTraceRequest, ListBreaksRequest, SummaryRequest, WatchBreaksRequest,
};
use tonic::transport::Channel;

#[derive(Parser)]
#[command(
    name = "hopwatch",
    version,
    about = "Ask the hopwatch collector where call chains broke"
)]
struct Cli {
    /// Collector gRPC URL.
    #[arg(
        long,
        global = true,
        env = "HOPWATCH_COLLECTOR",
        default_value = "http://127.0.0.1:9090"
    )]
    collector: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum TableOrJson {
    Table,
    Json,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum TreeOrJson {
    Tree,
    Json,
}

fn parse_since(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 30s, 15m, 2h, 7d)"))
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
        #[arg(long)]
        namespace: Option<String>,
        /// Only findings seen within this duration (e.g. 15m, 2h).
        #[arg(long, value_parser = parse_since)]
        since: Option<Duration>,
        /// At most this many (default 100).
        #[arg(long)]
        limit: Option<u32>,
        /// `json`: one array of break objects.
        #[arg(long, value_enum, default_value = "table")]
        output: TableOrJson,
    },
    /// Show the joined call chain of a trace, with its breaks.
    Trace {
        /// Trace id (hex; for hops without one, the request id).
        trace_id: String,
        #[arg(long, value_enum, default_value = "tree")]
        output: TreeOrJson,
    },
    /// Per-workload statistics.
    Summary {
        #[arg(long, value_enum, default_value = "table")]
        output: TableOrJson,
    },
    /// Stream findings as they are recorded.
    Watch {
        /// Only this kind.
        #[arg(long, value_parser = cli::parse_kind)]
        kind: Option<BreakKind>,
        /// Only where this workload broke.
        #[arg(long)]
        workload: Option<String>,
        /// Only in this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// `json`: one JSON object per line.
        #[arg(long, value_enum, default_value = "table")]
        output: TableOrJson,
    },
}

fn now_ms() -> u64 {
    hopwatch_collector::service::now_ms()
}

async fn connect(url: &str) -> Result<QueryClient<Channel>, String> {
    let endpoint = Channel::from_shared(url.to_string())
        .map_err(|e| {
            format!("invalid collector URL {url:?}: {e} (expected e.g. http://127.0.0.1:9090)")
        })?
        .connect_timeout(Duration::from_secs(5));
    let ch = endpoint.connect().await.map_err(|e| {
        let mut cause = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            cause = s.to_string();
            src = s.source();
        }
        format!("cannot reach the collector at {url} ({cause}); is it running? Point at it with --collector URL or HOPWATCH_COLLECTOR")
    })?;
    Ok(QueryClient::new(ch).max_decoding_message_size(64 * 1024 * 1024))
}

fn status_msg(url: &str, s: tonic::Status) -> String {
    match s.code() {
        tonic::Code::Unavailable => format!(
            "cannot reach the collector at {url} ({}); is it running? Point at it with --collector URL or HOPWATCH_COLLECTOR",
            s.message()
        ),
        tonic::Code::NotFound => s.message().to_string(),
        _ => format!("collector answered {:?}: {}", s.code(), s.message()),
    }
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

async fn run(cli: Cli) -> Result<(), String> {
    // "host:port" is accepted as "http://host:port".
    let url = if cli.collector.contains("://") {
        cli.collector.clone()
    } else {
        format!("http://{}", cli.collector)
    };
    let mut client = connect(&url).await?;
    match cli.cmd {
        Cmd::Breaks {
            kind,
            workload,
            namespace,
            since,
            limit,
            output,
        } => {
            let r = client
                .list_breaks(ListBreaksRequest {
                    kind: kind.map(|k| k as i32).unwrap_or(0),
                    workload: workload.unwrap_or_default(),
                    namespace: namespace.unwrap_or_default(),
                    since_seconds: since.map(|d| d.as_secs().max(1)).unwrap_or(0),
                    limit: limit.unwrap_or(0),
                })
                .await
                .map_err(|s| status_msg(&url, s))?
                .into_inner();
            match output {
                TableOrJson::Json => print_json(&cli::breaks_json(&r.breaks)),
                TableOrJson::Table => print!("{}", cli::breaks_table(&r.breaks, now_ms())),
            }
        }
        Cmd::Trace { trace_id, output } => {
            let r = client
                .get_trace(GetTraceRequest { trace_id })
                .await
                .map_err(|s| status_msg(&url, s))?
                .into_inner();
            match output {
                TreeOrJson::Json => print_json(&cli::trace_json(&r)),
                TreeOrJson::Tree => print!("{}", cli::trace_tree(&r)),
            }
        }
        Cmd::Summary { output } => {
            let r = client
                .summary(SummaryRequest {})
                .await
                .map_err(|s| status_msg(&url, s))?
                .into_inner();
            match output {
                TableOrJson::Json => print_json(&cli::summary_json(&r)),
                TableOrJson::Table => print!("{}", cli::summary_table(&r)),
            }
        }
        Cmd::Watch {
            kind,
            workload,
            namespace,
            output,
        } => {
            let mut stream = client
                .watch_breaks(WatchBreaksRequest {
                    kind: kind.map(|k| k as i32).unwrap_or(0),
                    workload: workload.unwrap_or_default(),
                    namespace: namespace.unwrap_or_default(),
                })
                .await
                .map_err(|s| status_msg(&url, s))?
                .into_inner();
            if output == TableOrJson::Table {
                eprintln!("watching {url} for breaks (Ctrl-C to stop)");
            }
            loop {
                match stream.message().await {
                    Ok(Some(b)) => match output {
                        TableOrJson::Json => println!("{}", cli::break_json(&b)),
                        TableOrJson::Table => println!("{}", cli::watch_line(&b)),
                    },
                    Ok(None) => {
                        return Err(format!(
                            "the collector at {url} ended the stream (shutting down?)"
                        ))
                    }
                    Err(s) => return Err(status_msg(&url, s)),
                }
            }
        }
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hopwatch: error: {e}");
            ExitCode::FAILURE
        }
    }
}
