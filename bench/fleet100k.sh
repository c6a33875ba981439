#!/usr/bin/env bash
# 100,000 devices on one machine of this kind, whose processes may hold at
# most 20,000 open files: GATEWAYS `furrow serve` processes share one port
# (--reuse-port) and one PostgreSQL database (the cluster: sessions, takeover
# and commands work across them), and `furrow bench` spreads its devices
# over as many worker processes and loopback source addresses. Nothing is
# pinned: the gateways, PostgreSQL and the generator share both CPUs.
#
#   FURROW_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
#     bench/fleet100k.sh [MODE] [DEVICES] [GATEWAYS] [furrow bench flags...]
#
# WARMUP and DURATION (seconds; 12 and 30) set the bench's phases, RATE the
# messages per device per second (0.1), RAMP the connection rate (10,000 a
# second: at 5,000 a second the ramp alone takes the 20 s the goal allows).
# MODE is a `furrow bench` mode (steady: every device sends one message
# every 10 s; storm: the same, then all drop at once and reconnect). A
# fresh database is created on that server and dropped on exit. On a host
# that allows more open files, one gateway process does (GATEWAYS=1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release -q -p furrow
furrow=target/release/furrow
# GATEWAY_BIN serves with another build (to compare two side by side with
# the same generator).
gateway=${GATEWAY_BIN:-$furrow}
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
mode=${1:-steady}
devices=${2:-100000}
gateways=${3:-6}
shift $(( $# < 3 ? $# : 3 ))
: "${FURROW_DATABASE_URL:?set FURROW_DATABASE_URL to a PostgreSQL server (a database is created there)}"
db="furrow_fleet_$$_$RANDOM"
db_url=$(python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(u.urlunsplit(p._replace(path="/" + sys.argv[2])))' \
    "$FURROW_DATABASE_URL" "$db")
psql -qX "$FURROW_DATABASE_URL" -c "CREATE DATABASE $db"
dir=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    psql -qX "$FURROW_DATABASE_URL" -c "DROP DATABASE $db WITH (FORCE)" || true
    rm -rf "$dir"
}
trap cleanup EXIT
port=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
# Each gateway's pool is small: GATEWAYS x (pool + LISTEN) stays within
# PostgreSQL's default 100 connections.
for i in $(seq 1 "$gateways"); do
    env RUST_LOG=warn FURROW_API__LISTEN=127.0.0.1:0 FURROW_INSTANCE_ID="gw-$i" \
        FURROW_DATABASE_URL="$db_url" FURROW_STORAGE__POOL_SIZE=8 \
        "$gateway" serve --data-dir "$dir/gw-$i" --listen "127.0.0.1:$port" --reuse-port \
        2>"$dir/gw-$i.log" &
    pids+=($!)
done
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done
sleep 1
# `furrow bench` provisions the devices (a database write each) before it
# starts the clock.
"$furrow" bench "$mode" --addr "127.0.0.1:$port" --database "$db_url" --devices "$devices" \
    --workers "$gateways" --rate "${RATE:-0.1}" --ramp "${RAMP:-10000}" --warmup "${WARMUP:-12}" --duration "${DURATION:-30}" "$@"
for i in $(seq 1 "$gateways"); do
    grep -i -E "error|panic" "$dir/gw-$i.log" | head -3 || true
done
