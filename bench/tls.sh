#!/usr/bin/env bash
# TLS against plain TCP, side by side on one gateway with both listeners
# (pinned to CPU 0; the generator on CPU 1), alternating rounds:
#   1. throughput: `bench flat`, DEVICES devices, window 64, plain vs TLS;
#   2. handshakes: `bench storm`, STORM devices reconnect at once, TLS with
#      full handshakes (--tls-no-resume) vs resumed sessions, and plain.
#      Rate = devices / time until all are back (TCP + TLS + HELLO/WELCOME
#      + the first ACK).
#
#   bench/tls.sh [ROUNDS] [DEVICES] [STORM]
# Prints one line per run and the medians. Loopback only.
source "$(dirname "$0")/lib.sh"
rounds=${1:-3}
devices=${2:-100}
storm=${3:-2000}
api_port=$(free_port)
start_secure_gateway FURROW_API__LISTEN="127.0.0.1:$api_port"
# The gateway's own count of TLS handshakes by outcome (full, resumed).
handshakes() {
    curl -s "http://127.0.0.1:$api_port/metrics" | python3 -c "
import sys
c = {}
for l in sys.stdin:
    if l.startswith('furrow_tls_handshakes_total{'):
        k = l.split('outcome=\"')[1].split('\"')[0]; c[k] = int(float(l.split()[-1]))
print(' '.join(f'{k}={v}' for k, v in sorted(c.items())))"
}
out=$(mktemp -d)
tls=(--tls "${ca[@]}")
for r in $(seq "$rounds"); do
    echo "round $r"
    for v in plain tls; do
        if [ $v = tls ]; then a="127.0.0.1:$tls_port"; extra=("${tls[@]}"); else a=$addr; extra=(); fi
        f=$(bench_json "flat-$v" flat "$a" --devices "$devices" --window 64 --duration 8 --warmup 2 \
            --server-pid "$gw" "${extra[@]}")
        python3 -c "import json,sys; r=json.load(open('$f')); print(f'  flat {\"$v\":5} {r[\"msgs_per_s\"]:>10.0f} msgs/s  cpu/msg {r.get(\"server_cpu_us_per_msg\") or 0:.2f} us')"
    done
    for v in plain full resumed; do
        case $v in
            plain) a=$addr; extra=() ;;
            full) a="127.0.0.1:$tls_port"; extra=("${tls[@]}" --tls-no-resume) ;;
            resumed) a="127.0.0.1:$tls_port"; extra=("${tls[@]}") ;;
        esac
        f=$(bench_json "storm-$v" storm "$a" --devices "$storm" --rate 1 --warmup 2 --duration 10 "${extra[@]}")
        echo "  gateway TLS handshakes so far: $(handshakes)"
        python3 -c "
import json; r=json.load(open('$f')); s=r['storm']; ms=s['all_back_ms']
print(f'  storm {\"$v\":7} {s[\"back\"]}/{r[\"connected\"]} back in {ms:.0f} ms: {s[\"back\"]/ms*1000:>8.0f} reconnects/s; connect+handshake p50 {r[\"connect_us\"][\"p50\"]/1000:.1f} ms')"
    done
done
rm -rf "$certs"
