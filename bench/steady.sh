#!/usr/bin/env bash
# ACK latency below saturation: every device sends at a fixed rate.
#
#   bench/steady.sh [DEVICES] [RATE_PER_DEVICE] [SYNCHRONOUS] [SECONDS] [furrow bench flags...]
#
# FURROW_STORAGE__BATCH_DELAY_US in the environment sets the group-commit delay.
source "$(dirname "$0")/lib.sh"
devices=${1:-100}
rate=${2:-1000}
sync=${3:-full}
secs=${4:-10}
shift $(( $# < 4 ? $# : 4 ))
start_gateway FURROW_STORAGE__SYNCHRONOUS="$sync" \
    FURROW_STORAGE__BATCH_DELAY_US="${FURROW_STORAGE__BATCH_DELAY_US:-0}"
taskset -c 1 "$furrow" bench steady --addr "$addr" "${provision[@]}" \
    --devices "$devices" --rate "$rate" --duration "$secs" --server-pid "$gw" "$@"
