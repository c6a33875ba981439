#!/usr/bin/env bash
# What the operator's console costs, in a real headless Chromium (Debian's
# chromium and chromium-driver): time to first view of the overview and the
# device list, and the gateway's CPU while N consoles sit on the overview,
# beside the same span without any, with DEVICES devices provisioned and
# connected (idle, from `furrow bench idle` on CPU 1).
#
#   bench/console.sh [DEVICES] [CONSOLES] [SECONDS]
source "$(dirname "$0")/lib.sh"
devices=${1:-10000}
consoles=${2:-10}
seconds=${3:-60}
cargo build --release -q -p furrow --example console_load
api_port=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
api="http://127.0.0.1:$api_port"
start_gateway FURROW_API__LISTEN="127.0.0.1:$api_port"
hold=$(( 2 * seconds + 120 ))
taskset -c 1 "$furrow" bench idle --addr "$addr" "${provision[@]}" \
    --devices "$devices" --duration "$hold" > "$dir/idle.log" 2>&1 &
idle=$!
trap 'kill $idle 2>/dev/null; kill -INT $gw 2>/dev/null; wait $gw 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 600); do
    online=$(curl -sf "$api/v1/overview" | python3 -c 'import json, sys; print(json.load(sys.stdin)["devices"]["online"])' 2>/dev/null || echo 0)
    [[ $online -ge $devices ]] && break
    sleep 0.5
done
echo "gateway pid $gw (CPU 0), $online of $devices devices online"
taskset -c 1 target/release/examples/console_load --api "$api" --pid "$gw" \
    --consoles "$consoles" --seconds "$seconds"
