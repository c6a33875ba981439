//! Reading committed fuzz inputs for the normal test suites (included with
//! `#[path]` by `crates/furrow-proto/tests/fuzz_corpus.rs` and
//! `crates/furrow/tests/fuzz_session.rs`): the files of
//! `fuzz/KIND/TARGET/` (KIND: `corpus` or `regressions`), in name order.

use std::path::PathBuf;

/// The inputs, with their paths; none if the folder does not exist.
pub fn inputs(kind: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz")
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .map(|p| {
            let data = std::fs::read(&p).expect("a committed fuzz input is readable");
            (p, data)
        })
        .collect();
    out.sort();
    out
}
