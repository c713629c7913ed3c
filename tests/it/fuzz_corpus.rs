//! Replays every committed fuzz input (`fuzz/corpus/<target>/`, `fuzz/regressions/<target>/`)
//! through the fuzz targets' own checks, on the stable toolchain: a fresh machine needs no
//! nightly to know that no input the fuzzers ever kept breaks an invariant again.

#[path = "../../fuzz/src/lib.rs"]
#[allow(dead_code, clippy::all)]
mod checks;

use std::path::Path;

/// Replays `fuzz/<kind>/<target>/*`; returns how many files each target had.
fn replay(kind: &str) -> Vec<(&'static str, usize)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind);
    let mut replayed = Vec::new();
    let mut failed = Vec::new();
    for (target, check) in checks::TARGETS {
        let dir = root.join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            replayed.push((*target, 0));
            continue;
        };
        let mut files: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        files.sort();
        replayed.push((*target, files.len()));
        for file in files {
            let data = std::fs::read(&file).expect("read corpus file");
            if std::panic::catch_unwind(|| check(&data)).is_err() {
                failed.push(file.display().to_string());
            }
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
    // A renamed target or a lost corpus folder must fail here, not replay nothing.
    for (target, n) in replay("corpus") {
        assert!(n > 0, "no corpus files for fuzz target {target}");
    }
}

#[test]
fn fuzz_regressions_stay_fixed() {
    let total: usize = replay("regressions").iter().map(|(_, n)| n).sum();
    assert!(
        total >= 7,
        "only {total} regression inputs found (7 were committed)"
    );
}
