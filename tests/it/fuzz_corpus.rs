//! Replays every committed fuzz input (`fuzz/corpus/<target>/`, `fuzz/regressions/<target>/`)
//! through the fuzz targets' own checks, on the stable toolchain: a fresh machine needs no
//! nightly to know that no input the fuzzers ever kept breaks an invariant again.

#[path = "../../fuzz/src/lib.rs"]
#[allow(dead_code, clippy::all)]
mod checks;

use std::path::Path;

fn replay(kind: &str) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind);
    let mut replayed = 0;
    let mut failed = Vec::new();
    for (target, check) in checks::TARGETS {
        let dir = root.join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        files.sort();
        for file in files {
            let data = std::fs::read(&file).expect("read corpus file");
            if std::panic::catch_unwind(|| check(&data)).is_err() {
                failed.push(file.display().to_string());
            }
            replayed += 1;
        }
    }
    assert!(
        failed.is_empty(),
        "inputs failing their checks: {failed:#?}"
    );
    replayed
}

#[test]
fn fuzz_corpus_replays_clean() {
    let n = replay("corpus");
    assert!(n >= checks::TARGETS.len(), "only {n} corpus files found");
}

#[test]
fn fuzz_regressions_stay_fixed() {
    replay("regressions");
}
