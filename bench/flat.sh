#!/usr/bin/env bash
# End-to-end ingest benchmark: one gateway pinned to CPU 0, the load
# generator pinned to CPU 1, a fresh data directory per run.
#
#   bench/flat.sh [DEVICES] [WINDOW] [SYNCHRONOUS] [SECONDS] [furrow bench flags...]
#
# Prints the generator's summary. Loopback only.
source "$(dirname "$0")/lib.sh"
devices=${1:-100}
window=${2:-64}
sync=${3:-full}
secs=${4:-10}
shift $(( $# < 4 ? $# : 4 ))
start_gateway FURROW_STORAGE__SYNCHRONOUS="$sync"
echo "gateway: $(store_label "$sync")"
taskset -c 1 "$furrow" bench flat --addr "$addr" "${provision[@]}" \
    --devices "$devices" --window "$window" --duration "$secs" --server-pid "$gw" "$@"
