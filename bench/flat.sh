#!/usr/bin/env bash
# End-to-end ingest benchmark: one gateway pinned to CPU 0, the load
# generator pinned to CPU 1, a fresh data directory per run.
#
#   bench/flat.sh [DEVICES] [WINDOW] [SYNCHRONOUS] [SECONDS]
#
# Prints the generator's summary and JSON line. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${1:-100}
window=${2:-64}
sync=${3:-full}
secs=${4:-10}
cargo build --release -q -p furrow -p furrow-bench
dir=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
FURROW_STORAGE__SYNCHRONOUS=$sync taskset -c 0 target/release/furrow serve \
    --data-dir "$dir" --listen "127.0.0.1:$port" 2>"$dir/gateway.log" &
gw=$!
trap 'kill -INT $gw 2>/dev/null; wait $gw 2>/dev/null; rm -rf "$dir"' EXIT
sleep 1
echo "gateway: synchronous=$sync devices=$devices window=$window"
taskset -c 1 target/release/furrow-bench flat --addr "127.0.0.1:$port" --data-dir "$dir" \
    --devices "$devices" --window "$window" --duration "$secs" 2>/dev/null
