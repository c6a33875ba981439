#!/usr/bin/env bash
# Reconnect storm: N devices stream at 1 msg/s, then all drop their
# connections at once and reconnect; time until every one is back and
# acknowledged again.
#
#   bench/storm.sh [DEVICES] [furrow bench flags...]
source "$(dirname "$0")/lib.sh"
devices=${1:-10000}
shift $(( $# < 1 ? $# : 1 ))
start_gateway
taskset -c 1 "$furrow" bench storm --addr "$addr" "${provision[@]}" \
    --devices "$devices" --rate 1 --warmup 3 --duration 30 "$@"
