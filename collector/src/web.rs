//! The web view, served on the collector's HTTP port beside `/metrics`:
//! - `/` the page, `/assets/app.js` and `/assets/app.css`: embedded in the binary
//!   (`include_str!`), no external asset, so it works offline;
//! - `/api/breaks` the findings (the `breaks --output json` shape), polled by the page
//!   every 2 s so new ones appear without a reload; optional `namespace`, `workload`,
//!   `kind`, `severity` query filters;
//! - `/api/trace/{id}` one trace's chain (the `trace --output json` shape, with its
//!   fragments);
//! - `/api/graph` the service graph with the findings on its nodes and edges.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::service::{now_ms, Collector, QueryError};
use crate::store::Filter;

const INDEX_HTML: &str = include_str!("../web/index.html");
const APP_JS: &str = include_str!("../web/app.js");
const APP_CSS: &str = include_str!("../web/app.css");

/// Most findings the page lists.
const PAGE_LIMIT: usize = 2_000;

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

fn json(v: serde_json::Value) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        v.to_string(),
    )
        .into_response()
}

fn bad_request(msg: String) -> Response {
    (StatusCode::BAD_REQUEST, msg).into_response()
}

async fn breaks(
    State(c): State<Arc<Collector>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let nonempty = |k: &str| {
        q.get(k)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let kind = match nonempty("kind") {
        Some(k) => match crate::cli::parse_kind(&k) {
            Ok(k) => Some(k),
            Err(e) => return bad_request(e),
        },
        None => None,
    };
    let filter = Filter {
        kind,
        workload: nonempty("workload"),
        namespace: nonempty("namespace"),
        since_ms: None,
    };
    let mut list = c.list_breaks(&filter, PAGE_LIMIT);
    if let Some(sev) = nonempty("severity") {
        list.retain(|b| crate::cli::severity_str(b.severity).eq_ignore_ascii_case(&sev));
    }
    json(crate::cli::breaks_json(&list))
}

async fn trace(State(c): State<Arc<Collector>>, Path(id): Path<String>) -> Response {
    match c.get_trace(&id, now_ms()) {
        Ok(t) => json(crate::cli::trace_json(&t)),
        Err(e @ QueryError::TraceNotFound(_)) => {
            (StatusCode::NOT_FOUND, e.to_string()).into_response()
        }
        Err(e) => bad_request(e.to_string()),
    }
}

async fn graph(State(c): State<Arc<Collector>>) -> Response {
    json(c.graph_json())
}

/// The web view's routes (merged into the HTTP server's router).
pub fn routes(collector: Arc<Collector>) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/assets/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/assets/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .route("/api/breaks", get(breaks))
        .route("/api/trace/{id}", get(trace))
        .route("/api/graph", get(graph))
        .with_state(collector)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_are_self_contained() {
        // Offline: no URL outside the collector.
        for (name, a) in [
            ("index.html", INDEX_HTML),
            ("app.js", APP_JS),
            ("app.css", APP_CSS),
        ] {
            // The SVG namespace is a name, not something fetched.
            let a = a.replace("\"http://www.w3.org/2000/svg\"", "");
            assert!(
                !a.contains("http://") && !a.contains("https://") && !a.contains("//cdn"),
                "{name} refers outside"
            );
        }
        assert!(INDEX_HTML.contains("/assets/app.js") && INDEX_HTML.contains("/assets/app.css"));
    }
}
