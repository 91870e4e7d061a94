#!/usr/bin/env bash
# Sets everything up, then runs the gateway on examples/gateway.yaml in front of
# the built-in echo backend (TCP) and a WebSocket echo server, shows a live TCP
# flow and a live WebSocket, and keeps running until Ctrl-C.
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
python3 tests/peers/ws_echo_server.py --listen 127.0.0.1:7081 >/dev/null &
pids+=($!)
$bin run --config "$cfg" &
gw=$!
pids+=($gw)
for _ in $(seq 100); do
  $bin status --config "$cfg" >/dev/null 2>&1 && break
  sleep 0.1
done
$bin status --config "$cfg" >/dev/null

# One TCP client and one WebSocket that stay connected for a few seconds, so
# the table has a row of each.
( printf 'hello through the kernel path\n'; sleep 3 ) | socat -t 1 - TCP:127.0.0.1:7000 &
pids+=($!)
( sleep 3 | python3 tests/peers/ws_client.py hold ws://127.0.0.1:7080/ws --count 1 >/dev/null ) &
pids+=($!)
for _ in $(seq 50); do
  [ "$($bin flows --config "$cfg" --json | grep -c '"id"')" -gt 1 ] && break
  sleep 0.1
done
echo
$bin flows --config "$cfg"
cat <<TXT

gateway is running: 127.0.0.1:7000 -> echo backend 127.0.0.1:7001 (offload: auto), and
ws://127.0.0.1:7080/ws (passthrough) and /secure (JWT) -> WebSocket echo server 127.0.0.1:7081.
Try it:
  socat - TCP:127.0.0.1:7000                 # type lines, they come back
  python3 tests/peers/ws_client.py echo ws://127.0.0.1:7080/ws --sizes 5,1000
                                             # a WebSocket through the passthrough route
  python3 tests/peers/ws_client.py echo ws://127.0.0.1:7080/secure
                                             # refused: 401, no token
  token=\$(python3 tests/peers/mint_jwt.py sign HS256 demo-secret-of-at-least-32-bytes! '{"sub":"demo"}')
  python3 tests/peers/ws_client.py echo ws://127.0.0.1:7080/secure --header "Authorization:Bearer \$token"
                                             # accepted; the backend gets X-User: demo
  $bin stats --config $cfg                   # route_refused counts the 401 by cause
  $bin flows --config $cfg                   # live flows: path, bytes, age, idle
  $bin flows --config $cfg --json
  $bin status --config $cfg                  # kernel path and map usage
Ctrl-C stops the demo.
TXT
wait "$gw"
