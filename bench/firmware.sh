#!/usr/bin/env bash
# Firmware rollout: DOWNLOADERS devices pull an image at once, round after
# round (aggregate download rate per round), and the telemetry ACK latency
# of STREAMERS other devices at RATE msgs/s each, first alone, then while
# the rollout runs. Gateway on CPU 0; both loads on CPU 1 (so the second
# run's client side is shared: its figures are an upper bound).
#
#   bench/firmware.sh [DOWNLOADERS] [IMAGE_BYTES] [STREAMERS] [RATE] [SECONDS] [ROUNDS] [MODE]
#
# FIRMWARE_RATE (bytes/s) sets the gateway's firmware.max_bytes_per_s
# (default: the gateway's, 128 MiB/s). ROLLOUT_NICE=19 runs the
# downloaders niced, so that the measuring client keeps CPU 1 when both
# want it (its figures then are more the gateway's own).
#
# MODE sdk: the downloaders are the Rust SDK (CRC-32, signature, SHA-256 of
# every image: on one core the SHA-256 caps the load side); wire: lean
# furrow/1 downloaders (CRC-32 only), the gateway's rate. Rounds repeat
# the rollout with a new image so that it lasts through the telemetry run.
source "$(dirname "$0")/lib.sh"
downloaders=${1:-1000}
size=${2:-1048576}
streamers=${3:-1000}
rate=${4:-10}
secs=${5:-20}
rounds=${6:-30}
mode=${7:-wire}
cargo build --release -q -p furrow --example firmware_rollout
keys=$(mktemp -d)
"$furrow" firmware keygen --out "$keys/fleet.key" >/dev/null
api_port=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
start_gateway FURROW_API__LISTEN="127.0.0.1:$api_port" \
    FURROW_FIRMWARE__SIGNING_KEY_FILE="$keys/fleet.key" \
    FURROW_LIMITS__CONNECT_RATE_PER_IP=0 \
    FURROW_FIRMWARE__MAX_BYTES_PER_S="${FIRMWARE_RATE:-134217728}"
rollout() {
    taskset -c 1 nice -n "${ROLLOUT_NICE:-0}" target/release/examples/firmware_rollout "$addr" "http://127.0.0.1:$api_port" \
        "$(cat "$keys/fleet.key.pub")" "$downloaders" "$size" "$1" "$mode"
}
steady() {
    taskset -c 1 "$furrow" bench steady --addr "$addr" "${provision[@]}" \
        --devices "$streamers" --rate "$rate" --duration "$secs" --server-pid "$gw"
}
echo "== rollout alone: $downloaders $mode devices x $size B"
rollout 3
echo "== telemetry alone: $streamers devices x $rate msgs/s"
steady
echo "== telemetry during a rollout of $rounds rounds"
rollout "$rounds" &
roll=$!
sleep 4
steady
# The telemetry run is the measure: rounds still going are stopped.
# (The function's subshell and the generator it started.)
pkill -TERM -P "$roll" 2>/dev/null || true
kill "$roll" 2>/dev/null || true
wait "$roll" 2>/dev/null || true
rm -rf "$keys"
