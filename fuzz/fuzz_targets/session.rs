//! The gateway's session state machine fed arbitrary step sequences over
//! real loopback connections to an in-process gateway. The harness and its
//! checks live in `crates/furrow/tests/harness/session.rs`, shared with the
//! test suite (`crates/furrow/tests/fuzz_session.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/furrow/tests/harness/session.rs"]
mod harness;

fuzz_target!(|input: harness::Input| harness::run_one(&input));
