#!/usr/bin/env bash
# A profile-guided build of the gateway (PGO): build it instrumented, run
# the project's own load generator against it over the shapes a fleet
# takes (quiet and busy devices, plain TCP, TLS and QUIC, idle connections,
# a reconnect storm), then build again with the counts those runs left, so
# that the optimiser inlines, lays out and splits code by what devices
# actually do. docs/performance.md, "Profile-guided optimisation", says
# what it gains and what it costs.
#
#   bench/pgo.sh            # prints the path of the optimised binary
#
# Needs LLVM's profile tools for this toolchain (`rustup component add
# llvm-tools`). Takes about three release builds' time (two builds plus a
# few minutes of training on loopback). The result lands in target/pgo/,
# away from target/release, so `cargo build --release` stays what it is:
# point GATEWAY_BIN at it to compare the two with the bench scripts.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [[ ! -x $profdata ]]; then
    echo "llvm-profdata not found at $profdata: run 'rustup component add llvm-tools'" >&2
    exit 1
fi
data=$(mktemp -d)
trap 'rm -rf "$data"' EXIT
# `--target` keeps the flags off build scripts and procedural macros: only
# the gateway's own code (and its dependencies') is instrumented.
echo "pgo: instrumented build" >&2
RUSTFLAGS="-Cprofile-generate=$data" cargo build --release -q -p furrow \
    --target "$host" --target-dir target/pgo-generate
# One gateway with all three listeners; the generator is the instrumented
# binary too, so that its own paths (the SDK's codec, the bench) are
# profiled as well. The instrumented binary writes its counts when it
# exits: the gateway stops on SIGINT (lib.sh's trap), the generators
# return from main.
echo "pgo: training" >&2
(
    export GATEWAY_BIN="target/pgo-generate/$host/release/furrow"
    source bench/lib.sh
    start_secure_gateway quic
    out=$(mktemp -d)
    # An instrumented build is slower: a run that ends with errors (a
    # handshake timeout in a storm) has still left its counts.
    train() { echo "pgo:   $*" >&2; bench_json pgo "$@" --server-pid "$gw" >/dev/null || echo "pgo:   (ended with errors)" >&2; }
    train steady "$addr" --devices 100 --rate 500 --duration 5 --warmup 1
    train steady "$addr" --devices 1000 --rate 50 --duration 5 --warmup 1
    train steady "$addr" --devices 10000 --rate 1 --duration 8 --warmup 2 --window 256
    train flat "$addr" --devices 100 --window 64 --duration 4
    train storm "$addr" --devices 2000 --rate 1 --warmup 2 --duration 20
    train idle "$addr" --devices 1000 --duration 2
    train steady "127.0.0.1:$tls_port" --tls "${ca[@]}" --devices 1000 --rate 5 --duration 5 --warmup 1
    train storm "127.0.0.1:$tls_port" --tls "${ca[@]}" --devices 1000 --rate 1 --warmup 2 --duration 20
    train flat "127.0.0.1:$quic_port" --quic "${ca[@]}" --devices 100 --window 64 --duration 4
    train storm "127.0.0.1:$quic_port" --quic "${ca[@]}" --devices 500 --rate 1 --warmup 2 --duration 20
    rm -rf "$out" "$certs"
)
"$profdata" merge -o "$data/furrow.profdata" "$data"
echo "pgo: optimised build" >&2
RUSTFLAGS="-Cprofile-use=$data/furrow.profdata" cargo build --release -q -p furrow \
    --target "$host" --target-dir target/pgo
echo "target/pgo/$host/release/furrow"
