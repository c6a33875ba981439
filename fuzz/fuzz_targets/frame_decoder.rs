//! Arbitrary bytes, cut at points taken from the input, through
//! `FrameDecoder` under several maxima; every frame parsed, re-encoded and
//! decoded again. The checks live in the harness, shared with the test
//! suite (`crates/furrow-proto/tests/fuzz_corpus.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/furrow-proto/tests/harness/frame_decoder.rs"]
mod harness;

fuzz_target!(|data: &[u8]| harness::check(data));
