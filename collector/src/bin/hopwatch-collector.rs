//! `hopwatch-collector`: the gRPC/HTTP server.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use hopwatch_collector::server::{bind, serve, LogFormat, ServerArgs};
use hopwatch_collector::service::Collector;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not
/// when the future is first polled: called before the listeners are bound, a SIGTERM that
/// arrives as soon as the ports answer (an orchestrator, a test) is a graceful shutdown,
/// not the default action that kills the process.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    #[cfg(unix)]
    let int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt());
    async move {
        #[cfg(unix)]
        {
            let (mut term, mut int) = match (term, int) {
                (Ok(t), Ok(i)) => (t, i),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::error!(error = %e, "cannot install the SIGTERM/SIGINT handlers");
                    return std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = int.recv() => tracing::info!("SIGINT received"),
                _ = term.recv() => tracing::info!("SIGTERM received"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("Ctrl-C received");
        }
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
    // Before the WAL replay and before the ports answer (see shutdown_signal): a SIGTERM
    // from then on ends in a graceful shutdown.
    let shutdown = shutdown_signal();
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
    serve(collector, grpc, http, shutdown).await?;
    tracing::info!("hopwatch-collector stopped");
    Ok(())
}
