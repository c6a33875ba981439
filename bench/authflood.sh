#!/usr/bin/env bash
# A token-guessing flood against the gateway's defaults: ATTACKERS
# connections send HELLOs with wrong tokens for the devices' own ids as
# fast as they can, from 20 loopback addresses (127.0.200.x), while
# DEVICES valid devices reconnect once a second each and time their
# handshakes. Run twice, side by side: without the flood, then with it.
#
#   bench/authflood.sh [DEVICES] [ATTACKERS] [SECONDS] [furrow bench flags...]
#
# Reports the gateway's CPU and memory over the window, the attackers'
# attempts by outcome (ERROR 3: AUTH_FAILED, ERROR 8: BUSY from the
# connect rate), and the valid devices' handshake latency (goal: p99
# under 50 ms during the flood).
source "$(dirname "$0")/lib.sh"
devices=${1:-100}
attackers=${2:-200}
secs=${3:-30}
shift $(( $# < 3 ? $# : 3 ))
for n in 0 "$attackers"; do
    echo "== $n attackers"
    start_gateway
    taskset -c 1 "$furrow" bench authflood --addr "$addr" "${provision[@]}" \
        --devices "$devices" --rate 1 --attackers "$n" --attack-sources 20 \
        --warmup 2 --duration "$secs" --server-pid "$gw" --quiet "$@"
    kill -INT "$gw"; wait "$gw" 2>/dev/null || true
    rm -rf "$dir"
    trap - EXIT
done
