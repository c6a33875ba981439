#!/usr/bin/env bash
# Runs every test of the workspace. This is the README's test command.
#
# SQLite is compiled in (rusqlite's bundled feature). Tests that need a
# real MQTT broker, PostgreSQL or HAProxy start their own throwaway
# Mosquitto, PostgreSQL cluster or HAProxy, from Debian's packages, installed
# here when missing; systemd's checker (systemd-analyze verify) tests the
# unit under deploy/.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkg() { # program package
    if ! command -v "$1" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$1" ]; then
        echo "== installing $2 (needed by the tests)"
        if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$2"
    fi
}
need_pkg mosquitto mosquitto
need_pkg haproxy haproxy
need_pkg systemd-analyze systemd
# PostgreSQL's server programs live outside PATH (/usr/lib/postgresql/N/bin);
# the tests run initdb and pg_ctl from there (as `postgres` when root).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    need_pkg __furrow_no_such_program__ postgresql
fi

# Integration tests open thousands of sockets; the hard limit here is 20,000.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo test --workspace --all-features --no-fail-fast "$@"
