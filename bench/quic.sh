#!/usr/bin/env bash
# QUIC against TLS over TCP, side by side on one gateway with both
# listeners (pinned to CPU 0; the generator on CPU 1), alternating rounds:
#   1. throughput: `bench flat`, DEVICES devices, window 64, TLS vs QUIC;
#   2. reconnect storm: STORM devices reconnect at once, TLS with session
#      resumption vs QUIC with resumption and 0-RTT. Rate = devices / time
#      until all are back (handshake + HELLO/WELCOME + the first ACK), and
#      the gateway's CPU per reconnect. STORM may list several sizes,
#      comma-separated (500,1000,2000);
#   3. an address change mid-stream (examples/quic_migration.rs): the ACK
#      latency before and after, and the longest wait between ACKs.
#
#   bench/quic.sh [ROUNDS] [DEVICES] [STORM]
# Prints one line per run. Loopback only.
source "$(dirname "$0")/lib.sh"
rounds=${1:-3}
devices=${2:-100}
storm=${3:-2000}
cargo build --release -q -p furrow --example quic_migration
api_port=$(free_port)
start_secure_gateway quic FURROW_API__LISTEN="127.0.0.1:$api_port"
# The gateway's own count of 0-RTT resumptions by outcome.
zero_rtt() {
    curl -s "http://127.0.0.1:$api_port/metrics" | python3 -c "
import sys
c = {}
for l in sys.stdin:
    if l.startswith('furrow_quic_0rtt_total{'):
        k = l.split('outcome=\"')[1].split('\"')[0]; c[k] = int(float(l.split()[-1]))
print(' '.join(f'{k}={v}' for k, v in sorted(c.items())) or 'none')"
}
# Datagrams the kernel dropped for want of room in a UDP socket's receive
# buffer (all sockets of the machine: run nothing else meanwhile).
udp_drops() { awk '/^Udp:/ { if (h) print $6; h = 1 }' /proc/net/snmp; }
out=$(mktemp -d)
for r in $(seq "$rounds"); do
    echo "round $r"
    for v in tls quic; do
        if [ $v = tls ]; then a="127.0.0.1:$tls_port"; t=--tls; else a="127.0.0.1:$quic_port"; t=--quic; fi
        f=$(bench_json "flat-$v" flat "$a" --devices "$devices" --window 64 --duration 8 --warmup 2 \
            --server-pid "$gw" $t "${ca[@]}")
        python3 -c "import json,sys; r=json.load(open('$f')); print(f'  flat {\"$v\":5} {r[\"msgs_per_s\"]:>10.0f} msgs/s  cpu/msg {r.get(\"server_cpu_us_per_msg\") or 0:.2f} us  ack p50 {r[\"ack_us\"][\"p50\"]/1000:.2f} ms')"
    done
    for n in ${storm//,/ }; do
        for v in tls quic; do
            if [ $v = tls ]; then a="127.0.0.1:$tls_port"; t=--tls; else a="127.0.0.1:$quic_port"; t=--quic; fi
            drops=$(udp_drops)
            f=$(bench_json "storm-$v" storm "$a" --devices "$n" --rate 1 --warmup 2 --duration 20 \
                --server-pid "$gw" $t "${ca[@]}")
            echo "  UDP receive-buffer drops during the run: $(($(udp_drops) - drops))"
            python3 -c "
import json; r=json.load(open('$f')); s=r['storm']; ms=s['all_back_ms'] or float('nan')
cpu = (r.get('server_cpu_s') or 0) * 1e6 / max(s['back'], 1)
print(f'  storm {\"$v\":5} {s[\"back\"]}/{r[\"connected\"]} back in {ms:.0f} ms: {s[\"back\"]/ms*1000:>8.0f} reconnects/s; back p50 {s[\"back_us\"][\"p50\"]/1000:.1f} ms, p99 {s[\"back_us\"][\"p99\"]/1000:.1f} ms; gateway CPU {cpu:.0f} us per reconnect; errors {r[\"errors\"]}')"
        done
    done
    echo "  gateway 0-RTT so far: $(zero_rtt)"
    taskset -c 1 target/release/examples/quic_migration "127.0.0.1:$quic_port" \
        "http://127.0.0.1:$api_port" "$certs/ca.pem" 200 6 | sed 's/^/  /'
done
rm -rf "$certs"
