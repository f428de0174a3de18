#!/usr/bin/env bash
# Runs every hopwatch test, exactly what CI runs (`.ci/run` calls this):
#   lints, native unit/integration tests, the filter's logic on wasm32 under
#   wasm-bindgen-test, the filter inside a real Envoy 1.40, the collector's gRPC and CLI
#   tests, the manifest validation (real `envoy --mode validate`), the end-to-end
#   local-mesh scenarios, the operator checks (`promtool check metrics` on a live
#   collector's /metrics and `promtool check rules` on the shipped PrometheusRule:
#   collector/tests/monitoring.rs; the web view in headless Chromium:
#   test-envoy/tests/web_view.rs; the quick start's Envoy install into a fresh venv:
#   test-envoy/tests/quickstart.rs). Installs what it needs on a fresh machine
#   (scripts/ensure-tools.sh: Envoy into target/venv; Debian prometheus, chromium,
#   chromium-driver, nodejs as root).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
log() { printf '\n==> %s\n' "$*"; }
# Every `cargo test` is teed here, to sum the results into one closing line.
results="$(mktemp)"
trap 'rm -f "$results"' EXIT

# shellcheck source=scripts/ensure-tools.sh
source scripts/ensure-tools.sh
echo "tools: $(envoy --version 2>/dev/null | grep -o '/1\.40\.[0-9]*/' | tr -d /) envoy ($(command -v envoy)), $(promtool --version 2>/dev/null | head -1), $(chromium --version 2>/dev/null)"

log "build: the filter (wasm32-wasip1, release) that the Envoy tests load"
cargo build --locked -p hopwatch-filter --target wasm32-wasip1 --release
wasm=target/wasm32-wasip1/release/hopwatch_filter.wasm
size=$(stat -c %s "$wasm")
echo "hopwatch_filter.wasm: $size bytes (budget 153600)"
if [ "$size" -gt 153600 ]; then
  echo "error: $wasm is $size bytes, over the 150 KB budget" >&2
  exit 1
fi

log "build: collector and CLI (used by the end-to-end tests)"
cargo build --locked -p hopwatch-collector --bins

log "lint: rustfmt and clippy (native and wasm32-wasip1)"
cargo fmt --all --check
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo clippy --locked -p hopwatch-filter --target wasm32-wasip1 -- -D warnings

log "test: filter logic on wasm32-unknown-unknown (wasm-bindgen-test under node)"
CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
  cargo test --locked -p hopwatch-filter --target wasm32-unknown-unknown 2>&1 | tee -a "$results"

log "test: the workspace (unit, gRPC, CLI, filter in Envoy, manifests, end-to-end mesh)"
cargo test --locked --workspace 2>&1 | tee -a "$results"

# pipefail made any failing run above exit already; this sums what ran.
passed=$(grep -Eo '^test result: [a-zA-Z]+\. [0-9]+ passed' "$results" | awk '{ n += $4 } END { print n + 0 }')
failed=$(grep -Eo '; [0-9]+ failed' "$results" | awk '{ n += $2 } END { print n + 0 }')
log "all tests passed in $(( $(date +%s) - start ))s"
echo "hopwatch: $passed passed, $failed failed"
