//! Builds the guests of `guests/` (wasm32-wasip1 modules, one wasm32-wasip2 component)
//! with a nested cargo, like
//! Wasmtime's test-programs, so that tests and the CLI embed fresh guest binaries
//! and none is checked in.

use std::path::PathBuf;
use std::process::Command;

const GUESTS: &[&str] = &["gemm", "xfer", "chat", "chat_actor", "nnchat", "nnchat_actor"];

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root =
        manifest_dir.parent().and_then(|p| p.parent()).expect("crates/shoal-guests is two levels down").to_path_buf();
    let guests = root.join("guests");
    let target_dir = root.join("target").join("guests");
    // Every source file, not just the folders: a folder's own time does not change
    // when a file in it is edited.
    for dir in [guests.clone(), root.join("crates/shoal-guest"), root.join("crates/shoal-abi")] {
        watch(&dir);
    }

    // The core-module guests (wasm32-wasip1), then the component guest (wasm32-wasip2).
    build(&guests, &target_dir, &["--target", "wasm32-wasip1"]);
    build(&guests, &target_dir, &["--target", "wasm32-wasip2", "-p", "nncomponent-guest"]);
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    for (target, name) in GUESTS.iter().map(|n| ("wasm32-wasip1", *n)).chain([("wasm32-wasip2", "nncomponent")]) {
        let built = target_dir.join(target).join("release").join(format!("{name}.wasm"));
        std::fs::copy(&built, out.join(format!("{name}.wasm")))
            .unwrap_or_else(|e| panic!("cannot copy {}: {e}", built.display()));
    }
}

/// Runs `cargo build --release` in `guests/` with `extra` arguments.
fn build(guests: &std::path::Path, target_dir: &std::path::Path, extra: &[&str]) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(guests).args(["build", "--release", "--target-dir"]).arg(target_dir).args(extra);
    // The outer build's settings (rustflags, wrappers such as clippy-driver, the
    // target directory, the jobserver) must not leak into the guest build.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        let leaky = (key.starts_with("CARGO_") && key != "CARGO_HOME" && !key.starts_with("CARGO_REGISTRIES"))
            || key.starts_with("RUSTC")
            || key == "RUSTFLAGS"
            || key == "RUSTDOCFLAGS";
        if leaky {
            cmd.env_remove(&key);
        }
    }
    let status = cmd.status().expect("cannot run cargo to build the guests");
    if !status.success() {
        panic!(
            "building the guests in {} ({}) failed; are the wasm32-wasip1 and wasm32-wasip2 targets installed? (`rustup target add wasm32-wasip1 wasm32-wasip2`, which `make test` does)",
            guests.display(),
            extra.join(" ")
        );
    }
}

fn watch(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    println!("cargo:rerun-if-changed={}", dir.display());
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name();
        if name == "target" || name.to_string_lossy().starts_with('.') && name != ".cargo" {
            continue;
        }
        if path.is_dir() {
            watch(&path);
        } else {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}
