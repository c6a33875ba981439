#!/usr/bin/env bash
# Resident memory per idle, authenticated connection: the gateway's RSS
# growth while N devices hold their sessions, divided by N.
#
#   bench/idle.sh [DEVICES]     (at most ~19,000: 20,000 files per process)
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${1:-10000}
cargo build --release -q -p furrow -p furrow-bench
dir=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
RUST_LOG=warn taskset -c 0 target/release/furrow serve --data-dir "$dir" \
    --listen "127.0.0.1:$port" 2>"$dir/gateway.log" &
gw=$!
trap 'kill -INT $gw 2>/dev/null; wait $gw 2>/dev/null; rm -rf "$dir"' EXIT
sleep 1
taskset -c 1 target/release/furrow-bench idle --addr "127.0.0.1:$port" --data-dir "$dir" \
    --devices "$devices" --gateway-pid "$gw" --hold 3 2>/dev/null
