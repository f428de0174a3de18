//! `hopwatch-demo-service`: the app of every workload of the local mesh.
//!
//! Per request it calls its configured downstream services, one after the other, through
//! its sidecar's outbound listener (`Host: <svc>.<ns>.svc.cluster.local`), copying onto
//! each call only the received headers its copy policy lists: that is how a test makes an
//! app "forget" trace or tag headers. It answers JSON: the headers it received and the
//! results of its calls (nested, so a client sees what every service downstream received).
//! `GET /received` returns the headers of the last requests; `GET /healthz` answers ok.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use clap::Parser;
use hopwatch_test_envoy::httpc;
use hopwatch_test_envoy::topology::header_matches;
use serde_json::{json, Value};

#[derive(Parser, Debug, Clone)]
#[command(about = "Demo app of the hopwatch local mesh")]
struct Args {
    /// Address to serve on.
    #[arg(long)]
    listen: SocketAddr,
    /// Workload name (reported in responses).
    #[arg(long)]
    workload: String,
    #[arg(long, default_value = "default")]
    namespace: String,
    /// This instance's virtual environment (reported in responses).
    #[arg(long, default_value = "")]
    tag: String,
    /// The sidecar's outbound listener; calls go there. Without it, calls go to the
    /// service's own name, port 80 (in a pod: its Service address, captured by the
    /// sidecar as Istio captures it).
    #[arg(long)]
    outbound: Option<SocketAddr>,
    /// A second address serving only `/received` and `/healthz` (in a pod: a port the
    /// capture rules exclude, so that looking at the app does not make mesh traffic).
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// A downstream service FQDN to call per request (repeatable, in order).
    #[arg(long = "call")]
    calls: Vec<String>,
    /// A received header (or `prefix*`) to copy onto calls (repeatable).
    #[arg(long = "copy")]
    copy: Vec<String>,
    /// Answer 502 when a call fails (non-2xx or no answer).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    fail_on_error: bool,
    /// How many requests `/received` remembers.
    #[arg(long, default_value_t = 100)]
    keep: usize,
    /// Timeout of each downstream call, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    call_timeout_ms: u64,
}

struct App {
    args: Args,
    received: Mutex<VecDeque<Value>>,
}

fn headers_json(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        out.entry(name.as_str().to_string())
            .and_modify(|v| {
                v.push(',');
                v.push_str(&value)
            })
            .or_insert(value);
    }
    out
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    response
}

/// One downstream call; blocking (run on tokio's blocking pool).
fn call(app: &App, target: &str, path: &str, received: &BTreeMap<String, String>) -> (bool, Value) {
    let outbound = match app.args.outbound {
        Some(o) => o,
        None => match std::net::ToSocketAddrs::to_socket_addrs(&(target, 80u16))
            .ok()
            .and_then(|mut a| a.next())
        {
            Some(a) => a,
            None => {
                return (
                    false,
                    json!({"service": target, "error": format!("cannot resolve {target}")}),
                )
            }
        },
    };
    let mut headers = vec![("host".to_string(), target.to_string())];
    for (name, value) in received {
        if app.args.copy.iter().any(|p| header_matches(p, name)) {
            headers.push((name.clone(), value.clone()));
        }
    }
    let timeout = Duration::from_millis(app.args.call_timeout_ms);
    match httpc::request(outbound, "GET", path, &headers, b"", timeout) {
        Ok(r) => {
            let body = match serde_json::from_slice::<Value>(&r.body) {
                Ok(v) => v,
                Err(_) => Value::String(r.text()),
            };
            let resp_headers: BTreeMap<String, String> = r.headers.iter().fold(
                BTreeMap::new(),
                |mut m: BTreeMap<String, String>, (n, v)| {
                    m.entry(n.clone())
                        .and_modify(|old| {
                            old.push(',');
                            old.push_str(v)
                        })
                        .or_insert_with(|| v.clone());
                    m
                },
            );
            let sent: BTreeMap<String, String> = headers.into_iter().collect();
            (
                (200..300).contains(&r.status),
                json!({"service": target, "status": r.status, "sent": sent,
                       "headers": resp_headers, "body": body}),
            )
        }
        Err(e) => (false, json!({"service": target, "error": e.to_string()})),
    }
}

/// The admin address: only the read-only endpoints.
async fn handle_admin(state: State<Arc<App>>, request: Request) -> Response {
    match request.uri().path() {
        "/healthz" | "/received" => handle(state, request).await,
        _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "not found"})),
    }
}

async fn handle(State(app): State<Arc<App>>, request: Request) -> Response {
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    if request.uri().path() == "/healthz" {
        return json_response(StatusCode::OK, &json!({"ok": true}));
    }
    if request.uri().path() == "/received" {
        let list: Vec<Value> = app
            .received
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default();
        return json_response(StatusCode::OK, &Value::Array(list));
    }
    let received = headers_json(request.headers());
    let record = json!({"path": path, "headers": received});
    if let Ok(mut r) = app.received.lock() {
        if r.len() >= app.args.keep.max(1) {
            r.pop_front();
        }
        r.push_back(record);
    }
    let worker = Arc::clone(&app);
    let received_for_calls = received.clone();
    let path_for_calls = path.clone();
    let results = tokio::task::spawn_blocking(move || {
        worker
            .args
            .calls
            .iter()
            .map(|t| call(&worker, t, &path_for_calls, &received_for_calls))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    let failed = results.iter().any(|(ok, _)| !ok);
    let calls: Vec<Value> = results.into_iter().map(|(_, v)| v).collect();
    let status = if failed && app.args.fail_on_error {
        StatusCode::BAD_GATEWAY
    } else {
        StatusCode::OK
    };
    eprintln!(
        "{} {} -> {} ({} calls{})",
        app.args.workload,
        path,
        status.as_u16(),
        calls.len(),
        if failed { ", some failed" } else { "" }
    );
    json_response(
        status,
        &json!({
            "workload": app.args.workload,
            "namespace": app.args.namespace,
            "tag": app.args.tag,
            "received": received,
            "calls": calls,
        }),
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    eprintln!(
        "{} ({}) listening on {}; calls {:?} via {:?}; copies {:?}",
        args.workload, args.tag, args.listen, args.calls, args.outbound, args.copy
    );
    let app = Arc::new(App {
        args,
        received: Mutex::new(VecDeque::new()),
    });
    if let Some(admin) = app.args.admin_listen {
        let admin_listener = tokio::net::TcpListener::bind(admin)
            .await
            .with_context(|| format!("binding {admin}"))?;
        let admin_router = axum::Router::new()
            .fallback(handle_admin)
            .with_state(Arc::clone(&app));
        tokio::spawn(async move { axum::serve(admin_listener, admin_router).await });
    }
    let router = axum::Router::new().fallback(handle).with_state(app);
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving")?;
    Ok(())
}
