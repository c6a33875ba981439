#!/usr/bin/env bash
# The growth rows over TLS and over QUIC, side by side on one gateway with
# both listeners (pinned to CPU 0; the generator on CPU 1): the same
# offered rate spread over more and more devices, steady mode, window 256,
# devices connecting at 1,000 a second (faster, 10,000 full QUIC
# handshakes overrun one core and their retries run into the measurement).
#
#   bench/quic_growth.sh [ROWS...]     ROW = DEVICESxRATE, default:
#                                      100x500 1000x50 10000x5 10000x1
# Prints one line per row and transport: acked/s, ACK p50/p99, gateway CPU
# per message. Loopback only.
source "$(dirname "$0")/lib.sh"
rows=("$@")
[ ${#rows[@]} -gt 0 ] || rows=(100x500 1000x50 10000x5 10000x1)
start_secure_gateway quic
out=$(mktemp -d)
for row in "${rows[@]}"; do
    n=${row%x*}
    rate=${row#*x}
    for v in tls quic; do
        if [ $v = tls ]; then a="127.0.0.1:$tls_port"; t=--tls; else a="127.0.0.1:$quic_port"; t=--quic; fi
        f=$(bench_json "g-$v-$n-$rate" steady "$a" --devices "$n" --ramp 1000 --rate "$rate" --window 256 \
            --duration 8 --warmup 3 --server-pid "$gw" $t "${ca[@]}")
        python3 -c "
import json; r=json.load(open('$f'))
print(f'$row {\"$v\":4} acked/s {r[\"msgs_per_s\"]:>8.0f}  ack p50 {r[\"ack_us\"][\"p50\"]/1000:7.2f} ms  p99 {r[\"ack_us\"][\"p99\"]/1000:8.2f} ms  cpu/msg {r.get(\"server_cpu_us_per_msg\") or 0:6.2f} us  errors {r[\"errors\"]}')"
    done
done
rm -rf "$certs"
