//! Reads the filter's Envoy configuration out of `envoyfilter-manifests/`, so that the
//! local mesh and the tests run exactly what users deploy (one source of truth).
//!
//! The sidecar EnvoyFilter carries, per `SIDECAR_INBOUND` / `SIDECAR_OUTBOUND` patch, the
//! whole HTTP filter (`name` + wasm `typed_config`) as Istio inserts it before the router.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Path of the sidecar EnvoyFilter, relative to the repository root.
pub const SIDECAR_ENVOYFILTER: &str = "envoyfilter-manifests/sidecar/hopwatch-envoyfilter.yaml";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid YAML: {source}")]
    Yaml {
        path: PathBuf,
        source: serde_yaml_ng::Error,
    },
    #[error("{path}: {what}")]
    Shape { path: PathBuf, what: String },
}

/// The wasm HTTP filters the sidecar EnvoyFilter inserts, as Envoy JSON config.
#[derive(Debug, Clone)]
pub struct SidecarFilters {
    /// `{ "name": ..., "typed_config": { "@type": ...Wasm, "config": ... } }`
    pub inbound: Value,
    pub outbound: Value,
}

/// The repository root (the workspace directory holding `envoyfilter-manifests/`).
pub fn repo_root() -> PathBuf {
    // CARGO_MANIFEST_DIR is test-envoy/; its parent is the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Every YAML document of a (possibly multi-document) manifest file, as JSON values.
pub fn read_yaml_documents(path: &Path) -> Result<Vec<Value>, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut docs = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(&text) {
        let value: Value =
            serde::Deserialize::deserialize(document).map_err(|source| ManifestError::Yaml {
                path: path.to_path_buf(),
                source,
            })?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// Loads the inbound and outbound wasm filters from the sidecar EnvoyFilter under `root`:
/// the first HTTP_FILTER patch per side, the one for current proxies (Istio >= 1.25,
/// `failure_policy`; the later ones, matched by `proxy.proxyVersion` to Istio 1.22-1.24,
/// carry `fail_open` instead).
pub fn load_sidecar_filters(root: &Path) -> Result<SidecarFilters, ManifestError> {
    let path = root.join(SIDECAR_ENVOYFILTER);
    let shape = |what: &str| ManifestError::Shape {
        path: path.clone(),
        what: what.to_string(),
    };
    let docs = read_yaml_documents(&path)?;
    let envoyfilter = docs
        .iter()
        .find(|d| d["kind"] == "EnvoyFilter")
        .ok_or_else(|| shape("no EnvoyFilter document"))?;
    let patches = envoyfilter["spec"]["configPatches"]
        .as_array()
        .ok_or_else(|| shape("spec.configPatches is not a list"))?;
    let find = |context: &str| {
        patches
            .iter()
            .find(|p| p["applyTo"] == "HTTP_FILTER" && p["match"]["context"] == context)
            .map(|p| p["patch"]["value"].clone())
            .filter(|v| v.is_object())
            .ok_or_else(|| shape(&format!("no HTTP_FILTER patch with a value for {context}")))
    };
    Ok(SidecarFilters {
        inbound: find("SIDECAR_INBOUND")?,
        outbound: find("SIDECAR_OUTBOUND")?,
    })
}

/// The filter with its wasm code pointed at `wasm` (the manifests mount it at a path
/// inside istio-proxy; locally it is the built file).
pub fn with_wasm_file(filter: &Value, wasm: &Path) -> Value {
    let mut filter = filter.clone();
    filter["typed_config"]["config"]["vm_config"]["code"] = serde_json::json!({
        "local": { "filename": wasm.display().to_string() }
    });
    filter
}

/// The filters with `overrides` set over their plugin configuration (both sides alike).
pub fn with_plugin_overrides(
    mut filters: SidecarFilters,
    overrides: &serde_json::Map<String, Value>,
) -> SidecarFilters {
    if overrides.is_empty() {
        return filters;
    }
    for f in [&mut filters.inbound, &mut filters.outbound] {
        let mut cfg = plugin_configuration_json(f).unwrap_or_default();
        for (k, v) in overrides {
            cfg[k.as_str()] = v.clone();
        }
        f["typed_config"]["config"]["configuration"]["value"] = Value::String(cfg.to_string());
    }
    filters
}

/// The plugin configuration (the JSON string of the `StringValue`) of a filter.
pub fn plugin_configuration(filter: &Value) -> Option<&str> {
    filter["typed_config"]["config"]["configuration"]["value"].as_str()
}

/// The plugin configuration parsed as JSON (for reading keys such as `collector_cluster`).
pub fn plugin_configuration_json(filter: &Value) -> Option<Value> {
    plugin_configuration(filter).and_then(|s| serde_json::from_str(s).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecar_filters_load_from_the_shipped_manifest() {
        let filters = load_sidecar_filters(&repo_root()).unwrap();
        let inbound = plugin_configuration_json(&filters.inbound).unwrap();
        let outbound = plugin_configuration_json(&filters.outbound).unwrap();
        assert_eq!(inbound["direction"], "inbound");
        assert_eq!(outbound["direction"], "outbound");
        let vm = |f: &Value| f["typed_config"]["config"]["vm_config"]["vm_id"].clone();
        assert_eq!(
            vm(&filters.inbound),
            vm(&filters.outbound),
            "one vm_id for both sides"
        );
        let moved = with_wasm_file(&filters.outbound, Path::new("/tmp/x.wasm"));
        assert_eq!(
            moved["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"],
            "/tmp/x.wasm"
        );
    }
}
