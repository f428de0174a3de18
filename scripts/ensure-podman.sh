#!/usr/bin/env bash
# What the pods runtime (`hopwatch-mesh --runtime pods`, test-envoy/tests/pods.rs) needs,
# installed on a fresh Debian/Ubuntu machine as root, and nothing twice:
#   - Debian's podman, runc and iptables (apt-get),
#   - a containers.conf with the two settings podman needs on these machines
#     (`default_ulimits = []`: setting RLIMIT_NPROC is refused here; `runtime = "runc"`:
#     crun fails on this cgroup setup), exported as CONTAINERS_CONF.
# Then it checks that podman really runs a container; if it cannot, it says why and fails
# (the pods tests fail loudly too: they are never skipped).
# Sourced by scripts/ensure-tools.sh (HOPWATCH_NEED_PODMAN=1, the default of test.sh) and
# scripts/demo.sh --pods.

podman_log() { printf '==> %s\n' "$*" >&2; }

ensure_podman() {
  local missing=()
  command -v podman >/dev/null || missing+=(podman)
  command -v runc >/dev/null || [ -x /usr/sbin/runc ] || missing+=(runc)
  command -v iptables-restore >/dev/null || [ -x /usr/sbin/iptables-restore ] || missing+=(iptables)
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
      echo "error: the pods runtime needs ${missing[*]} (apt-get install -y ${missing[*]}, as root)" >&2
      return 1
    fi
    podman_log "apt-get install ${missing[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >&2
  fi
  # /usr/sbin holds runc and iptables-restore; non-login shells may lack it.
  case ":$PATH:" in *:/usr/sbin:*) ;; *) export PATH="$PATH:/usr/sbin" ;; esac

  local conf_dir="${XDG_CONFIG_HOME:-$HOME/.config}/hopwatch"
  local conf="$conf_dir/containers.conf"
  if [ -z "${CONTAINERS_CONF:-}" ]; then
    mkdir -p "$conf_dir"
    local want
    want="$(printf '%s\n' \
      '# Written by hopwatch scripts/ensure-podman.sh: what podman needs on these machines.' \
      '[containers]' \
      '# Setting RLIMIT_NPROC in containers is refused here.' \
      'default_ulimits = []' \
      '[engine]' \
      '# crun fails on this cgroup setup; Debian runc works.' \
      'runtime = "runc"')"
    if [ "$(cat "$conf" 2>/dev/null)" != "$want" ]; then
      printf '%s\n' "$want" >"$conf"
    fi
    export CONTAINERS_CONF="$conf"
  fi

  # The runtime check: `podman info` fails when podman cannot work here at all.
  local err
  if ! err="$(podman info --format '{{.Host.OCIRuntime.Name}}' 2>&1)"; then
    echo "error: podman cannot run here (CONTAINERS_CONF=$CONTAINERS_CONF): $err" >&2
    return 1
  fi
  export HOPWATCH_PODMAN_OK=1
}

ensure_podman
