#!/usr/bin/env bash
# Sets everything up, then runs the gateway on examples/gateway.yaml in front of
# the built-in echo backend, shows one live flow, and keeps running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (the kernel path loads eBPF programs)" >&2; exit 1; }
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo xtask build
bin=target/debug/gateway
cfg=examples/gateway.yaml
$bin check --config "$cfg"

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

$bin echo --bind 127.0.0.1:7001 &
pids+=($!)
$bin run --config "$cfg" &
pids+=($!)
for _ in $(seq 100); do
  $bin status --config "$cfg" >/dev/null 2>&1 && break
  sleep 0.1
done
$bin status --config "$cfg" >/dev/null

# One client that stays connected for a few seconds, so the table has a row.
( printf 'hello through the kernel path\n'; sleep 3 ) | socat -t 1 - TCP:127.0.0.1:7000 &
pids+=($!)
for _ in $(seq 50); do
  [ "$($bin flows --config "$cfg" --json | grep -c '"id"')" -gt 0 ] && break
  sleep 0.1
done
echo
$bin flows --config "$cfg"
cat <<TXT

gateway is running: 127.0.0.1:7000 -> echo backend 127.0.0.1:7001 (offload: auto).
Try it:
  socat - TCP:127.0.0.1:7000                 # type lines, they come back
  $bin flows --config $cfg                   # live flows: path, bytes, age, idle
  $bin flows --config $cfg --json
  $bin status --config $cfg                  # kernel path and map usage
Ctrl-C stops the demo.
TXT
wait "${pids[1]}"
