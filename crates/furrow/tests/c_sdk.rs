//! The C device library (sdk/c) under the workspace's test command: its
//! unit tests, the same under AddressSanitizer and UndefinedBehaviorSanitizer,
//! cppcheck, a bounded libFuzzer run of the frame decoder and of the client,
//! and its POSIX example devices against this build's gateway
//! (`sdk/c/tests/gateway_test.py`: handshake, 10,000 readings stored exactly
//! once, kill -9 and restart with nothing lost or duplicated, a command,
//! mutual TLS over mbedTLS). `make -C sdk/c check` is the whole of it.
//!
//! The C toolchain (gcc, clang with libFuzzer, cppcheck, libmbedtls-dev,
//! gcc-arm-none-eabi) comes from Debian's packages, which scripts/test.sh
//! installs when missing: a missing tool fails this test, it never skips.

use std::path::Path;
use std::process::Command;

#[test]
fn c_library_checks_and_talks_to_the_real_gateway() {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sdk/c");
    let gateway = env!("CARGO_BIN_EXE_furrow");
    let out = Command::new("make")
        .arg("-C")
        .arg(&sdk)
        .arg("check")
        .arg(format!("FURROW_BIN={gateway}"))
        // A separate build directory per run would cost the fuzz corpus;
        // the C build is small, and make rebuilds what changed.
        .env_remove("MAKEFLAGS")
        .output()
        .expect("make runs (scripts/test.sh installs the C toolchain)");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "make -C sdk/c check failed:\n{text}");
    // Each part really ran (a make that skipped one would still succeed).
    for ran in [
        "passed",       // unit tests and the sanitizer run
        "Done ",        // libFuzzer's final line (-max_total_time)
        "exactly once", // the gateway test's readings
        "all passed",   // the gateway test's end
    ] {
        assert!(text.contains(ran), "no {ran:?} in the output:\n{text}");
    }
}
