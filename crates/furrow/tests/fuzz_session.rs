//! The `session` fuzz target's harness in the normal test suite: a real
//! in-process gateway is fed step sequences built from the committed corpus
//! (`fuzz/corpus/session/`), from regression inputs
//! (`fuzz/regressions/session/`) and from proptest's random bytes, through
//! the very functions the fuzzer calls (see `fuzz/README.md`).

#[path = "harness/session.rs"]
mod harness;
#[path = "../../../fuzz/replay.rs"]
mod replay;

use std::path::PathBuf;

use proptest::collection::vec;
use proptest::prelude::*;

fn inputs(kind: &str) -> Vec<(PathBuf, Vec<u8>)> {
    replay::inputs(kind, "session")
}

#[test]
fn corpus_replays_cleanly() {
    let corpus = inputs("corpus");
    assert!(
        !corpus.is_empty(),
        "the committed corpus fuzz/corpus/session is missing"
    );
    for (path, data) in corpus.iter().chain(&inputs("regressions")) {
        if let Some(input) = harness::input_from_bytes(data) {
            let r = std::panic::catch_unwind(|| harness::run_one(&input));
            assert!(r.is_ok(), "{} fails the harness", path.display());
        }
    }
    harness::health_check();
}

#[test]
fn a_fresh_session_is_healthy() {
    harness::health_check();
}

proptest! {
    // Each case is a few real connections: bounded, for CI time.
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_step_sequences(
        hello_first in vec(prop_oneof![3 => Just(true), 1 => Just(false)], 1..=3),
        data in vec(any::<u8>(), 0..2048),
    ) {
        // Random bytes seldom spell a good HELLO: most connections start
        // with one, so the cases reach the active session.
        let Some(input) = harness::input_with_hellos(&data, &hello_first) else {
            return Ok(());
        };
        harness::run_one(&input);
    }
}
