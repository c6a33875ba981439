//! The `frame_decoder` fuzz target's harness in the normal test suite: the
//! committed corpus (`fuzz/corpus/frame_decoder/`) and regression inputs
//! (`fuzz/regressions/frame_decoder/`) are replayed through the very
//! function the fuzzer calls, and proptest adds fresh random inputs, so CI
//! exercises the same invariants without libFuzzer (see `fuzz/README.md`).

#[path = "harness/frame_decoder.rs"]
mod harness;
#[path = "../../../fuzz/replay.rs"]
mod replay;

use std::path::PathBuf;

use proptest::collection::vec;
use proptest::prelude::*;

fn inputs(kind: &str) -> Vec<(PathBuf, Vec<u8>)> {
    replay::inputs(kind, "frame_decoder")
}

#[test]
fn corpus_replays_cleanly() {
    let corpus = inputs("corpus");
    assert!(
        !corpus.is_empty(),
        "the committed corpus fuzz/corpus/frame_decoder is missing"
    );
    for (path, data) in corpus.iter().chain(&inputs("regressions")) {
        // The path names the input that failed.
        let r = std::panic::catch_unwind(|| harness::check(data));
        assert!(r.is_ok(), "{} fails the harness", path.display());
    }
}

#[test]
fn spec_vectors_pass_the_harness() {
    // docs/protocol.md's vectors, unsplit and cut after every byte.
    let hello = "0000001301000100 1e0007 70756d702d3137 0003 6b3379";
    let telemetry = "0000001d030000000000000000002a0000019aa3b5ec7b017b2274223a32312e357d";
    let stream = hex::decode(format!("{hello}{telemetry}").replace(' ', "")).unwrap();
    let mut input = vec![31u8];
    input.extend(std::iter::repeat_n(1u8, 31));
    input.extend_from_slice(&stream);
    harness::check(&input);
    let mut unsplit = vec![0u8];
    unsplit.extend_from_slice(&stream);
    harness::check(&unsplit);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_inputs_pass_the_harness(data in vec(any::<u8>(), 0..600)) {
        harness::check(&data);
    }

    #[test]
    fn framed_inputs_pass_the_harness(
        cuts in vec(any::<u8>(), 0..32),
        frames in vec((0u32..80, 0u8..13, prop_oneof![9 => Just(0u8), 1 => any::<u8>()], vec(any::<u8>(), 0..80)), 0..8),
    ) {
        // Mostly well-formed frames, so the parse and round-trip checks run.
        let mut data = vec![cuts.len() as u8];
        data.extend_from_slice(&cuts);
        for (len, kind, flags, body) in frames {
            let len = if len < 2 { body.len() as u32 + 2 } else { len };
            data.extend_from_slice(&len.to_be_bytes());
            data.push(kind);
            data.push(flags);
            data.extend_from_slice(&body);
        }
        harness::check(&data);
    }
}
