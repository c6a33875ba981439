#!/usr/bin/env bash
# Runs every test of the workspace, the C device library's included. This
# is the README's test command.
#
# SQLite is compiled in (rusqlite's bundled feature). Tests that need a
# real MQTT broker, PostgreSQL or HAProxy start their own throwaway
# Mosquitto, PostgreSQL cluster or HAProxy, from Debian's packages, installed
# here when missing; systemd's checker (systemd-analyze verify) tests the
# unit under deploy/.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi

# Installs Debian packages for the tests and leaves the machine as it was
# otherwise: their services are neither started (a policy-rc.d that says no,
# for the install only, unless the machine has one) nor enabled at boot
# (the tests run the programs themselves).
install_pkgs() { # package...
    echo "== installing $* (needed by the tests)"
    $sudo apt-get update -qq
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
        $sudo chmod 755 "$policy"
        own_policy=1
    fi
    local before after unit rc=0
    before=$(enabled_units)
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" || rc=$?
    [ "$own_policy" = 0 ] || $sudo rm -f "$policy"
    [ "$rc" = 0 ] || return "$rc"
    after=$(enabled_units)
    for unit in $(comm -13 <(echo "$before") <(echo "$after")); do
        echo "== not enabling $unit at boot (the tests start their own)"
        $sudo systemctl disable --quiet "$unit" >/dev/null 2>&1 || true
    done
}
# Units enabled at boot: the links under /etc/systemd/system/*.wants.
enabled_units() {
    find /etc/systemd/system -path '*.wants/*' -name '*.service' -printf '%f\n' 2>/dev/null | sort -u
}
need_pkg() { # program package
    if ! command -v "$1" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$1" ]; then
        install_pkgs "$2"
    fi
}
need_pkg curl curl            # the README test runs its curl examples
need_pkg openssl openssl
need_pkg mosquitto mosquitto
need_pkg haproxy haproxy
need_pkg systemd-analyze systemd
# The C device library (sdk/c, run by crates/furrow/tests/c_sdk.rs): its
# build, sanitizers, libFuzzer (clang's runtime), cppcheck, Cortex-M code
# size, and the mbedTLS port's headers.
need_pkg make make
need_pkg clang clang
need_pkg cppcheck cppcheck
need_pkg arm-none-eabi-gcc gcc-arm-none-eabi
need_deb() { # package
    if ! dpkg -s "$1" >/dev/null 2>&1; then install_pkgs "$1"; fi
}
need_deb libclang-rt-dev
need_deb libmbedtls-dev
# The console's browser tests (crates/furrow/tests/console_browser.rs): a
# headless Chromium driven over WebDriver.
need_pkg chromium chromium
need_pkg chromedriver chromium-driver
# PostgreSQL's server programs live outside PATH (/usr/lib/postgresql/N/bin);
# the tests run initdb and pg_ctl from there (as `postgres` when root).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    need_pkg __furrow_no_such_program__ postgresql
fi

# Integration tests open thousands of sockets; the hard limit here is 20,000.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo test --workspace --all-features --no-fail-fast "$@"
