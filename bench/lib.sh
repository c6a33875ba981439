# Shared by the bench scripts: build once, start a gateway pinned to CPU 0
# on a fresh data directory and a free port, stop it on exit.
#   start_gateway [ENV=VALUE ...]   sets $gw (pid), $dir, $addr and
#                                   $provision (the `furrow bench` flags
#                                   that provision devices into its store)
# With FURROW_DATABASE_URL=postgres://... set, the gateway stores into a
# fresh PostgreSQL database on that server (created here, dropped on exit)
# instead of SQLite. PostgreSQL itself is not pinned: it runs on either CPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# GATEWAY_BIN runs another build (the gateway and the generator alike), to
# compare two builds side by side with the same script; without it, the
# release build is brought up to date first.
[[ -n ${GATEWAY_BIN:-} ]] || cargo build --release -q -p furrow
furrow=${GATEWAY_BIN:-target/release/furrow}
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# A free loopback port: TCP, or UDP with `free_port udp`.
free_port() {
    python3 -c "import socket, sys
s = socket.socket(type=socket.SOCK_DGRAM if sys.argv[1:] == ['udp'] else socket.SOCK_STREAM)
s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])" "$@"
}

# A development CA and a server certificate for localhost (`furrow certs`)
# in a fresh directory: sets $certs.
make_certs() {
    certs=$(mktemp -d)
    "$furrow" certs ca --out "$certs" >/dev/null
    "$furrow" certs server --name localhost --out "$certs" >/dev/null
}

# A gateway with a TLS listener beside the plain one and, given `quic`, a
# QUIC listener too, all on a fresh development CA (make_certs): sets
# $tls_port, $quic_port (with `quic`) and $ca, the generator's flags that
# trust the gateway. The scripts remove $certs when they are done.
#   start_secure_gateway [quic] [ENV=VALUE ...]
start_secure_gateway() {
    local listeners=()
    make_certs
    tls_port=$(free_port)
    listeners+=(FURROW_TLS__CERT_FILE="$certs/server.pem" FURROW_TLS__KEY_FILE="$certs/server.key"
        FURROW_TLS__LISTEN="127.0.0.1:$tls_port")
    if [[ ${1:-} == quic ]]; then
        shift
        quic_port=$(free_port udp)
        listeners+=(FURROW_QUIC__LISTEN="127.0.0.1:$quic_port")
    fi
    ca=(--tls-ca "$certs/ca.pem" --tls-server-name localhost)
    start_gateway "${listeners[@]}" "$@"
}

start_gateway() {
    dir=$(mktemp -d)
    port=$(free_port)
    addr="127.0.0.1:$port"
    provision=(--data-dir "$dir")
    db=""
    local db_env=()
    if [[ -n "${FURROW_DATABASE_URL:-}" ]]; then
        db="furrow_bench_$$_$RANDOM"
        db_url=$(python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(u.urlunsplit(p._replace(path="/" + sys.argv[2])))' \
            "$FURROW_DATABASE_URL" "$db")
        psql -qX "$FURROW_DATABASE_URL" -c "CREATE DATABASE $db"
        provision=(--database "$db_url")
        db_env=(FURROW_DATABASE_URL="$db_url")
    fi
    env RUST_LOG=warn FURROW_API__LISTEN=127.0.0.1:0 "${db_env[@]}" "$@" taskset -c 0 "$furrow" serve --data-dir "$dir" --listen "$addr" \
        2>"$dir/gateway.log" &
    gw=$!
    trap 'kill -INT $gw 2>/dev/null; wait $gw 2>/dev/null; rm -rf "$dir"; [[ -z $db ]] || psql -qX "$FURROW_DATABASE_URL" -c "DROP DATABASE $db WITH (FORCE)"' EXIT
    for _ in $(seq 50); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "the gateway did not start: $(cat "$dir/gateway.log")" >&2
    return 1
}

# Runs `furrow bench KIND --addr TARGET ARGS...` on CPU 1, its devices
# provisioned into the gateway's store under a fresh prefix (NAME-N-);
# prints the path of its JSON report, written under $out.
#   bench_json NAME KIND TARGET ARGS...
bench_json() {
    local name=$1 kind=$2 target=$3; shift 3
    local n=$((${#name} + RANDOM))
    taskset -c 1 "$furrow" bench "$kind" --addr "$target" --data-dir "$dir" --prefix "$name-$n-" \
        --json "$out/$name-$n.json" "$@" >/dev/null
    echo "$out/$name-$n.json"
}

# What the gateway stores into, for the scripts' first line.
store_label() {
    if [[ -n $db ]]; then echo "PostgreSQL (fresh database $db)"; else echo "SQLite synchronous=$1"; fi
}
