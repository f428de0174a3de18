//! `hopwatch-demo-service`: the app of every workload of the local mesh.
//!
//! Per request it calls its configured downstream services, one after the other, through
//! its sidecar's outbound listener (`Host: <svc>.<ns>.svc.cluster.local`), copying onto
//! each call only the received headers its copy policy lists: that is how a test makes an
//! app "forget" trace or tag headers. It answers JSON: the headers it received and the
//! results of its calls (nested, so a client sees what every service downstream received).
//! `GET /received` returns the headers of the last requests; `GET /healthz` answers ok.
//!
//! The same port also serves gRPC (h2c, `hopwatch.demo.v1.Demo/Call`, see
//! `proto/demo.proto`), as an app behind a sidecar on a `grpc-*` port: a call does what
//! an HTTP request does and answers the same JSON in its reply. A call target given as
//! `grpc://FQDN` is called with gRPC (request metadata = the copied headers).
//! `--app-error` makes the app answer every request with an error of its own: HTTP 500,
//! gRPC INTERNAL.

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
use hopwatch_test_envoy::demo_grpc::demo_client::DemoClient;
use hopwatch_test_envoy::demo_grpc::demo_server::{Demo, DemoServer};
use hopwatch_test_envoy::demo_grpc::{CallReply, CallRequest};
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
    /// The sidecar's outbound listener; calls go there.
    #[arg(long)]
    outbound: Option<SocketAddr>,
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
    /// Answer every request with an error of the app's own (HTTP 500, gRPC INTERNAL),
    /// without making calls.
    #[arg(long)]
    app_error: bool,
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
    let Some(outbound) = app.args.outbound else {
        return (
            false,
            json!({"service": target, "error": "no outbound listener configured"}),
        );
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

/// One gRPC call to `fqdn` through the sidecar's outbound listener (`:authority` is the
/// FQDN, as an app's gRPC client sets it), with the copied headers as metadata.
async fn grpc_call(
    app: &App,
    fqdn: &str,
    path: &str,
    received: &BTreeMap<String, String>,
) -> (bool, Value) {
    let target = format!("grpc://{fqdn}");
    let Some(outbound) = app.args.outbound else {
        return (
            false,
            json!({"service": target, "error": "no outbound listener configured"}),
        );
    };
    let timeout = Duration::from_millis(app.args.call_timeout_ms);
    let channel = async {
        let origin: axum::http::Uri = format!("http://{fqdn}").parse()?;
        let ep = tonic::transport::Endpoint::from_shared(format!("http://{outbound}"))?
            .origin(origin)
            .connect_timeout(timeout)
            .timeout(timeout);
        anyhow::Ok(ep.connect().await?)
    }
    .await;
    let channel = match channel {
        Ok(c) => c,
        Err(e) => return (false, json!({"service": target, "error": e.to_string()})),
    };
    let mut request = tonic::Request::new(CallRequest {
        path: path.to_string(),
    });
    let mut sent = BTreeMap::new();
    for (name, value) in received {
        if !app.args.copy.iter().any(|p| header_matches(p, name)) {
            continue;
        }
        let key = tonic::metadata::MetadataKey::from_bytes(name.as_bytes());
        let val = tonic::metadata::MetadataValue::try_from(value.as_str());
        if let (Ok(k), Ok(v)) = (key, val) {
            request.metadata_mut().insert(k, v);
            sent.insert(name.clone(), value.clone());
        }
    }
    let meta_json = |m: &tonic::metadata::MetadataMap| headers_json(&m.clone().into_headers());
    match DemoClient::new(channel).call(request).await {
        Ok(reply) => {
            let headers = meta_json(reply.metadata());
            let body = serde_json::from_str::<Value>(&reply.get_ref().json)
                .unwrap_or_else(|_| Value::String(reply.get_ref().json.clone()));
            (
                true,
                json!({"service": target, "status": 200, "grpc_status": 0, "sent": sent,
                       "headers": headers, "body": body}),
            )
        }
        Err(status) => (
            false,
            json!({"service": target, "status": 200, "grpc_status": status.code() as i32,
                   "grpc_message": status.message(), "sent": sent,
                   "headers": meta_json(status.metadata())}),
        ),
    }
}

/// How a request ended, whichever protocol it came by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// A call failed and `--fail-on-error` is set.
    CallFailed,
    /// `--app-error`.
    AppError,
}

/// What the app does per request (HTTP or gRPC): remember the received headers, make
/// the calls, and build the answer.
async fn serve(
    app: Arc<App>,
    path: String,
    received: BTreeMap<String, String>,
) -> (Outcome, Value) {
    let record = json!({"path": path, "headers": received});
    if let Ok(mut r) = app.received.lock() {
        if r.len() >= app.args.keep.max(1) {
            r.pop_front();
        }
        r.push_back(record);
    }
    let reply = |calls: Vec<Value>| {
        json!({
            "workload": app.args.workload,
            "namespace": app.args.namespace,
            "tag": app.args.tag,
            "received": received,
            "calls": calls,
        })
    };
    if app.args.app_error {
        eprintln!("{} {} -> app error", app.args.workload, path);
        return (Outcome::AppError, reply(vec![]));
    }
    let mut results = Vec::with_capacity(app.args.calls.len());
    for target in &app.args.calls {
        let r = match target.strip_prefix("grpc://") {
            Some(fqdn) => grpc_call(&app, fqdn, &path, &received).await,
            None => {
                let (worker, t, p, rcv) = (
                    Arc::clone(&app),
                    target.clone(),
                    path.clone(),
                    received.clone(),
                );
                tokio::task::spawn_blocking(move || call(&worker, &t, &p, &rcv))
                    .await
                    .unwrap_or_else(|e| (false, json!({"service": target, "error": e.to_string()})))
            }
        };
        results.push(r);
    }
    let failed = results.iter().any(|(ok, _)| !ok);
    let calls: Vec<Value> = results.into_iter().map(|(_, v)| v).collect();
    let outcome = if failed && app.args.fail_on_error {
        Outcome::CallFailed
    } else {
        Outcome::Ok
    };
    eprintln!(
        "{} {} -> {:?} ({} calls{})",
        app.args.workload,
        path,
        outcome,
        calls.len(),
        if failed { ", some failed" } else { "" }
    );
    (outcome, reply(calls))
}

/// The gRPC face of the app.
struct GrpcDemo {
    app: Arc<App>,
}

#[tonic::async_trait]
impl Demo for GrpcDemo {
    async fn call(
        &self,
        request: tonic::Request<CallRequest>,
    ) -> Result<tonic::Response<CallReply>, tonic::Status> {
        let received = headers_json(&request.metadata().clone().into_headers());
        let path = request.into_inner().path;
        let path = if path.is_empty() {
            "/".to_string()
        } else {
            path
        };
        let (outcome, body) = serve(Arc::clone(&self.app), path, received).await;
        match outcome {
            Outcome::Ok => Ok(tonic::Response::new(CallReply {
                json: body.to_string(),
            })),
            Outcome::CallFailed => Err(tonic::Status::internal("a downstream call failed")),
            Outcome::AppError => Err(tonic::Status::internal("app error")),
        }
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
    let (outcome, body) = serve(app, path, received).await;
    let status = match outcome {
        Outcome::Ok => StatusCode::OK,
        Outcome::CallFailed => StatusCode::BAD_GATEWAY,
        Outcome::AppError => StatusCode::INTERNAL_SERVER_ERROR,
    };
    json_response(status, &body)
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
    // gRPC (h2c) and HTTP/1.1 on one port: axum's server tells them apart.
    let grpc = DemoServer::new(GrpcDemo {
        app: Arc::clone(&app),
    });
    let router = axum::Router::new()
        .route_service("/hopwatch.demo.v1.Demo/{*rest}", grpc)
        .fallback(handle)
        .with_state(app);
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving")?;
    Ok(())
}
