//! `hopwatch-collector`: the gRPC/HTTP server.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use hopwatch_collector::server::{bind, serve, LogFormat, ServerArgs};
use hopwatch_collector::service::Collector;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot install the SIGTERM handler");
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = ServerArgs::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    match args.log_format {
        LogFormat::Json => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .with_current_span(false)
            .init(),
        LogFormat::Text => {
            use std::io::IsTerminal;
            // Colour codes only for a person at a terminal: a file, a pipe or a
            // container log gets plain text.
            let ansi = std::io::stdout().is_terminal() && !hopwatch_collector::term::no_color_env();
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(ansi)
                .init()
        }
    }
    let collector = Arc::new(
        Collector::open_with(args.settings(), &args.data_dir, &args.persist_options())
            .with_context(|| {
                format!(
                    "opening the findings database in {}",
                    args.data_dir.display()
                )
            })?,
    );
    let (grpc, http) = bind(args.listen, args.http_listen).await?;
    tracing::info!(grpc = %args.listen, http = %args.http_listen, data_dir = %args.data_dir.display(),
        trace_quiet = ?args.trace_quiet, "hopwatch-collector started");
    serve(collector, grpc, http, shutdown_signal()).await?;
    tracing::info!("hopwatch-collector stopped");
    Ok(())
}
