# Shared by the bench scripts: build once, start a gateway pinned to CPU 0
# on a fresh data directory and a free port, stop it on exit.
#   start_gateway [ENV=VALUE ...]   sets $gw (pid), $dir and $addr
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release -q -p furrow
furrow=target/release/furrow
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

start_gateway() {
    dir=$(mktemp -d)
    port=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    addr="127.0.0.1:$port"
    env RUST_LOG=warn FURROW_API__LISTEN=127.0.0.1:0 "$@" taskset -c 0 "$furrow" serve --data-dir "$dir" --listen "$addr" \
        2>"$dir/gateway.log" &
    gw=$!
    trap 'kill -INT $gw 2>/dev/null; wait $gw 2>/dev/null; rm -rf "$dir"' EXIT
    for _ in $(seq 50); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "the gateway did not start: $(cat "$dir/gateway.log")" >&2
    return 1
}
