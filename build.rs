//! Links the release binary's hot code together: `build/symbol-order.txt` lists the
//! functions start-up, an idle daemon and a proxied request run (made by
//! `bench/symbol-order.sh`), and the linker places them first in `.text`. The kernel maps
//! code in runs around each page touched, so scattered code costs resident memory:
//! gathered, an idle daemon's RSS is about 3.5 MiB smaller. Names the file lists that
//! the build no longer has are skipped; a stale list costs memory, never correctness.

use std::env;
use std::path::Path;
use std::process::Command;

const ORDER: &str = "build/symbol-order.txt";

fn main() {
    println!("cargo:rerun-if-changed={ORDER}");
    println!("cargo:rerun-if-env-changed=OPSGATE_NO_SYMBOL_ORDER");
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

/// Only where the linker is known to be rust-lld, which reads the list: x86_64 Linux
/// (glibc) from Rust 1.90 on, when no other linker is configured. GNU ld would refuse
/// the option; other targets build as before. `OPSGATE_NO_SYMBOL_ORDER=1` opts out.
fn wanted() -> bool {
    let var = |k: &str| env::var(k).unwrap_or_default();
    if var("PROFILE") != "release" || !var("OPSGATE_NO_SYMBOL_ORDER").is_empty() {
        return false;
    }
    if var("TARGET") != "x86_64-unknown-linux-gnu" {
        return false;
    }
    let flags = var("CARGO_ENCODED_RUSTFLAGS");
    if flags.contains("linker") || flags.contains("link-self-contained") {
        return false;
    }
    if env::vars().any(|(k, _)| k.starts_with("CARGO_TARGET_") && k.ends_with("_LINKER")) {
        return false;
    }
    rustc_minor().is_some_and(|minor| minor >= 90)
}

/// The compiler's minor version (`rustc 1.95.0 (...)` -> 95).
fn rustc_minor() -> Option<u32> {
    let out = Command::new(env::var("RUSTC").ok()?)
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let version = text.split_whitespace().nth(1)?;
    let mut parts = version.split('.');
    (parts.next()? == "1").then_some(())?;
    parts.next()?.parse().ok()
}
