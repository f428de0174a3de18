#!/usr/bin/env bash
# Builds the container images of the pods runtime (`hopwatch-mesh --runtime pods`) locally,
# without any registry: each image is a tarball of a few host binaries, the glibc libraries
# they link and the loader, imported with `podman import` (FROM scratch, nothing else).
#
#   scripts/pod-images.sh ENVOY DEMO_SERVICE COLLECTOR
#
#   istio-proxy  the pip Envoy 1.40 binary (/usr/local/bin/envoy) and iptables-restore
#                with its xtables modules: like Istio's proxyv2 image, it serves both the
#                istio-proxy container and the init step that installs the capture rules
#   demo         hopwatch-demo-service (/usr/local/bin/hopwatch-demo-service)
#   collector    hopwatch-collector (/usr/local/bin/hopwatch-collector)
#
# Images are tagged by the sha256 of what goes into them (binaries, libraries, this
# script; a file's sha256 is remembered per inode, size and mtime), so a repeated run with the same binaries builds nothing; the newest build is
# also tagged `:latest`. Prints one line per image: `<name>=<image reference>`. Needs podman (see scripts/ensure-podman.sh).
set -euo pipefail

if [ $# -ne 3 ]; then
  echo "usage: $0 ENVOY DEMO_SERVICE COLLECTOR" >&2
  exit 2
fi
envoy="$1" demo="$2" collector="$3"
self="${BASH_SOURCE[0]}"

# The pip package's `envoy` command is a Python launcher: the binary is next to the module.
real_envoy() {
  local e="$1"
  if head -c 4 "$e" | grep -q ELF; then
    printf '%s\n' "$e"
    return
  fi
  local py
  py="$(head -1 "$e" | sed -n 's/^#!//p')"
  [ -x "${py%% *}" ] || py=python3
  $py -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))'
}

# Shared libraries (resolved paths) and the loader a set of ELF files needs.
libs_of() {
  ldd "$@" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\/lib.*ld-linux/ { print $1 }' | sort -u
}

# The sha256 of a file, remembered per (device, inode, size, mtime) so that unchanged
# binaries (Envoy is 100 MB) are not read again on every run.
hash_cache="${XDG_CACHE_HOME:-$HOME/.cache}/hopwatch/pod-image-hashes"
mkdir -p "$(dirname "$hash_cache")"
touch "$hash_cache"
declare -A known_sha=()
while read -r k v; do known_sha["$k"]="$v"; done <"$hash_cache"
file_sha() {
  local key sum
  key="$(stat -L -c '%d:%i:%s:%Y' "$1"):$1"
  sum="${known_sha[$key]:-}"
  if [ -z "$sum" ]; then
    sum="$(sha256sum <"$1" | cut -d' ' -f1)"
    known_sha["$key"]="$sum"
    printf '%s %s\n' "$key" "$sum" >>"$hash_cache"
  fi
  printf '%s\n' "$sum"
}

# build_image NAME FILE... : FILE is `src:dest` (dest inside the image) or a library path.
build_image() {
  local name="$1"
  shift
  local specs=("$@") srcs=() s
  for s in "${specs[@]}"; do srcs+=("${s%%:*}"); done
  local hash
  hash="$( (cat "$self"; printf '%s\n' "${specs[@]}"; for s in "${srcs[@]}"; do file_sha "$s"; done) | sha256sum | cut -c1-16)"
  local ref="localhost/hopwatch/$name:$hash"
  if ! podman image exists "$ref"; then
    local root
    root="$(mktemp -d)"
    # shellcheck disable=SC2064
    trap "rm -rf '$root'" RETURN
    for s in "${specs[@]}"; do
      local src="${s%%:*}" dest="${s#*:}"
      mkdir -p "$root$(dirname "$dest")"
      cp -L "$src" "$root$dest"
    done
    mkdir -p "$root/tmp" "$root/etc" "$root/var/local/lib/wasm-filters" "$root/etc/hopwatch"
    chmod 1777 "$root/tmp"
    printf 'root:x:0:0::/:/sbin/nologin\nistio-proxy:x:1337:1337::/:/sbin/nologin\n' >"$root/etc/passwd"
    printf 'root:x:0:\nistio-proxy:x:1337:\n' >"$root/etc/group"
    tar -C "$root" -c . | podman import --quiet --change 'ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin' - "$ref" >/dev/null
    echo "==> built image $ref" >&2
    # The stable name `hopwatch-mesh render --runtime pods` writes into its YAML.
    podman tag "$ref" "localhost/hopwatch/$name:latest"
    # Older builds of this image go (those still used by running pods stay).
    podman images --format '{{.Repository}}:{{.Tag}}' "localhost/hopwatch/$name" |
      grep -v -e ":$hash\$" -e ':latest$' | xargs -r podman rmi >/dev/null 2>&1 || true
  fi
  printf '%s=%s\n' "$name" "$ref"
}

# Each library at its own path (so the loader finds it as on the host).
lib_specs() {
  local l
  for l in $(libs_of "$@"); do
    printf '%s:%s\n' "$l" "$l"
    # The loader is also looked up by its canonical /lib64 name.
    case "$l" in */ld-linux-x86-64.so.2) printf '%s:%s\n' "$l" /lib64/ld-linux-x86-64.so.2 ;; esac
  done
}

envoy_elf="$(real_envoy "$envoy")"
xtables_multi="$(command -v xtables-nft-multi || echo /usr/sbin/xtables-nft-multi)"
xtables_dir=/usr/lib/x86_64-linux-gnu/xtables
for f in "$envoy_elf" "$xtables_multi" "$demo" "$collector"; do
  [ -f "$f" ] || { echo "error: $f not found (needed for the pod images)" >&2; exit 1; }
done
[ -d "$xtables_dir" ] || { echo "error: $xtables_dir not found (apt-get install iptables)" >&2; exit 1; }

mapfile -t proxy_specs < <(
  printf '%s\n' "$envoy_elf:/usr/local/bin/envoy" "$xtables_multi:/usr/sbin/iptables-restore" "$xtables_multi:/usr/sbin/iptables"
  for m in "$xtables_dir"/*.so; do printf '%s:%s\n' "$m" "$m"; done
  lib_specs "$envoy_elf" "$xtables_multi" "$xtables_dir"/*.so
)
build_image istio-proxy "${proxy_specs[@]}"

mapfile -t demo_specs < <(printf '%s\n' "$demo:/usr/local/bin/hopwatch-demo-service"; lib_specs "$demo")
build_image demo "${demo_specs[@]}"

mapfile -t collector_specs < <(printf '%s\n' "$collector:/usr/local/bin/hopwatch-collector"; lib_specs "$collector")
build_image collector "${collector_specs[@]}"
