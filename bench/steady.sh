#!/usr/bin/env bash
# ACK latency below saturation: every device sends at a fixed rate.
#
#   bench/steady.sh [DEVICES] [RATE_PER_DEVICE] [SYNCHRONOUS] [SECONDS]
#
# FURROW_STORAGE__BATCH_DELAY_US in the environment sets the group-commit delay.
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${1:-100}
rate=${2:-1000}
sync=${3:-full}
secs=${4:-10}
cargo build --release -q -p furrow -p furrow-bench
dir=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
FURROW_STORAGE__SYNCHRONOUS=$sync FURROW_STORAGE__BATCH_DELAY_US=${FURROW_STORAGE__BATCH_DELAY_US:-0} RUST_LOG=warn taskset -c 0 target/release/furrow serve \
    --data-dir "$dir" --listen "127.0.0.1:$port" 2>"$dir/gateway.log" &
gw=$!
trap 'kill -INT $gw 2>/dev/null; wait $gw 2>/dev/null; rm -rf "$dir"' EXIT
sleep 1
taskset -c 1 target/release/furrow-bench steady --addr "127.0.0.1:$port" --data-dir "$dir" \
    --devices "$devices" --rate "$rate" --duration "$secs" 2>/dev/null
