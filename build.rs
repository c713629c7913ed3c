//! Links the release binary's hot code together: `build/symbol-order.txt` lists the
//! functions start-up, an idle daemon and a proxied request run (made by
//! `bench/symbol-order.sh`), and the linker places them first in `.text`. The kernel maps
//! code in runs around each page touched, so scattered code costs resident memory:
//! gathered, an idle daemon's RSS is about 3.5 MiB smaller. Names the file lists that
//! the build no longer has are skipped; a stale list costs memory, never correctness.
//! It also has Cargo recompile the crate when a variable the rustc wrapper
//! (`build/rustc-pgo.sh`) reads changes, which Cargo would not notice otherwise.

use std::env;
use std::path::Path;
use std::process::Command;

const ORDER: &str = "build/symbol-order.txt";

fn main() {
    println!("cargo:rerun-if-changed={ORDER}");
    println!("cargo:rerun-if-env-changed=OPSGATE_NO_SYMBOL_ORDER");
    println!("cargo:rerun-if-env-changed=OPSGATE_NO_PGO");
    println!("cargo:rerun-if-env-changed=OPSGATE_PGO_WARN");
    if !wanted() {
        return;
    }
    let order = Path::new(&env::var("CARGO_MANIFEST_DIR").unwrap()).join(ORDER);
    if !order.is_file() {
        return;
    }
    println!(
        "cargo:rustc-link-arg-bin=opsgate=-Wl,--symbol-ordering-file={}",
        order.display()
    );
    println!("cargo:rustc-link-arg-bin=opsgate=-Wl,--no-warn-symbol-ordering");
}

/// Only where the linker is lld, which reads the list: rustc is asked how it links a
/// program for this target with these flags (rust-lld is its default for x86_64 Linux
/// from Rust 1.90 on; GNU ld would refuse the option). `OPSGATE_NO_SYMBOL_ORDER=1` opts
/// out; other targets and linkers build as before.
fn wanted() -> bool {
    let var = |k: &str| env::var(k).unwrap_or_default();
    if var("PROFILE") != "release" || !var("OPSGATE_NO_SYMBOL_ORDER").is_empty() {
        return false;
    }
    if var("CARGO_CFG_TARGET_OS") != "linux" {
        return false;
    }
    links_with_lld(&var("TARGET")).unwrap_or(false)
}

/// Links an empty program as the crate will be linked and reads the linker's command line.
fn links_with_lld(target: &str) -> Option<bool> {
    let out = std::path::PathBuf::from(env::var("OUT_DIR").ok()?);
    let src = out.join("probe.rs");
    std::fs::write(&src, "fn main() {}\n").ok()?;
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let mut rustc = Command::new(env::var("RUSTC").ok()?);
    rustc.args(flags.split('\x1f').filter(|f| !f.is_empty()));
    // A linker set in Cargo's config reaches rustc as `-C linker`, not through RUSTFLAGS.
    if let Ok(linker) = env::var("RUSTC_LINKER") {
        rustc.arg(format!("-Clinker={linker}"));
    }
    let output = rustc
        .args(["--print", "link-args", "--target", target, "-o"])
        .arg(out.join("probe"))
        .arg(&src)
        .output()
        .ok()?;
    let args = String::from_utf8_lossy(&output.stdout);
    Some(output.status.success() && (args.contains("-fuse-ld=lld") || args.contains("rust-lld")))
}
