#!/usr/bin/env bash
# Resident memory per idle, authenticated connection: the gateway's RSS
# growth while N devices hold their sessions, divided by N.
#
#   bench/idle.sh [DEVICES] [furrow bench flags...]
# IDLE_HOLD=SECS holds the connections longer (3 s by default), e.g. to
# look into the gateway while they are held.
#
# Past 19,000 devices the generator runs several worker processes.
source "$(dirname "$0")/lib.sh"
devices=${1:-10000}
shift $(( $# < 1 ? $# : 1 ))
start_gateway
taskset -c 1 "$furrow" bench idle --addr "$addr" "${provision[@]}" \
    --devices "$devices" --server-pid "$gw" --duration "${IDLE_HOLD:-3}" "$@"
