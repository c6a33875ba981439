#!/usr/bin/env bash
# Runs every test of the workspace. This is the README's test command.
#
# The suite needs nothing but the Rust toolchain today: SQLite is compiled
# in (rusqlite's bundled feature). Later suites that start PostgreSQL,
# Mosquitto or HAProxy install their Debian packages here when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Integration tests open thousands of sockets; the hard limit here is 20,000.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo test --workspace --all-features --no-fail-fast "$@"
