#!/usr/bin/env bash
# Runs every test of the workspace. This is the README's test command.
#
# SQLite is compiled in (rusqlite's bundled feature). Tests that need a
# real MQTT broker start their own throwaway Mosquitto, from Debian's
# package, installed here when missing; so are HAProxy and systemd, whose
# checkers (haproxy -c, systemd-analyze verify) test the files under
# deploy/. (PostgreSQL will follow the same rule.)
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

# Integration tests open thousands of sockets; the hard limit here is 20,000.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo test --workspace --all-features --no-fail-fast "$@"
