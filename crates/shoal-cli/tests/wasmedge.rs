//! `shoal run` takes WasmEdge's command lines as they are pasted: `--dir HOST:GUEST`,
//! `--env K=V`, the guest's arguments after the module (no `--` needed), `--nn-preload`
//! with errors that say what to fix, and a guest that dies on a wasi-nn error reported by
//! that error, not by its backtrace.

mod common;

use std::path::Path;
use std::process::Output;

use common::{model, shoal, tmp};

/// A WASI command that prints its arguments, then its environment (each NUL-terminated),
/// then `in.txt` of its first preopened directory (fd 3), and writes `out.txt` there.
/// Exit code 10: `in.txt` could not be opened; 11: `out.txt` could not be created.
const PROBE: &str = r#"(module
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $env_sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $env_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 16384) "in.txt")
  (data (i32.const 16400) "out.txt")
  (data (i32.const 16416) "written by the guest\n")
  (func $out (param $fd i32) (param $p i32) (param $len i32)
    (i32.store (i32.const 16) (local.get $p))
    (i32.store (i32.const 20) (local.get $len))
    (drop (call $write (local.get $fd) (i32.const 16) (i32.const 1) (i32.const 24))))
  (func (export "_start")
    (drop (call $args_sizes (i32.const 0) (i32.const 4)))
    (drop (call $args_get (i32.const 256) (i32.const 1024)))
    (call $out (i32.const 1) (i32.const 1024) (i32.load (i32.const 4)))
    (drop (call $env_sizes (i32.const 8) (i32.const 12)))
    (drop (call $env_get (i32.const 8192) (i32.const 9216)))
    (call $out (i32.const 1) (i32.const 9216) (i32.load (i32.const 12)))
    (if (call $open (i32.const 3) (i32.const 0) (i32.const 16384) (i32.const 6) (i32.const 0)
          (i64.const 0x1fffffff) (i64.const 0x1fffffff) (i32.const 0) (i32.const 28))
      (then (call $exit (i32.const 10))))
    (i32.store (i32.const 16) (i32.const 20480))
    (i32.store (i32.const 20) (i32.const 4096))
    (drop (call $read (i32.load (i32.const 28)) (i32.const 16) (i32.const 1) (i32.const 36)))
    (call $out (i32.const 1) (i32.const 20480) (i32.load (i32.const 36)))
    (if (call $open (i32.const 3) (i32.const 0) (i32.const 16400) (i32.const 7) (i32.const 9)
          (i64.const 0x1fffffff) (i64.const 0x1fffffff) (i32.const 0) (i32.const 32))
      (then (call $exit (i32.const 11))))
    (call $out (i32.load (i32.const 32)) (i32.const 16416) (i32.const 21))))"#;

/// A wasi-nn guest that loads the model `nosuch` by name and traps when that fails, as a
/// guest that unwraps the error does.
const UNWRAPS: &str = r#"(module
  (import "wasi_ephemeral_nn" "load_by_name" (func $load (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "nosuch")
  (func $deep3 (if (call $load (i32.const 64) (i32.const 6) (i32.const 128)) (then unreachable)))
  (func $deep2 (call $deep3))
  (func $deep1 (call $deep2))
  (func (export "_start") (call $deep1)))"#;

fn run_in(dir: &Path, args: &[&str]) -> Output {
    let out = shoal().current_dir(dir).arg("run").args(args).output().expect("shoal runs");
    eprintln!(
        "shoal run {args:?}: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn probe_dir(name: &str) -> std::path::PathBuf {
    let d = tmp(name);
    std::fs::write(d.join("probe.wat"), PROBE).unwrap();
    std::fs::write(d.join("in.txt"), "hello from the host\n").unwrap();
    d
}

#[test]
fn dir_env_and_guest_arguments_after_the_module() {
    let d = probe_dir("wasmedge-dir");
    let out = run_in(
        &d,
        &[
            "--backend",
            "cpu",
            "--dir",
            ".:.",
            "--env",
            "GREETING=hi there",
            "--env",
            "EMPTY=",
            "probe.wat",
            "--flag",
            "-x",
            "--",
            "v",
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    // The guest's arguments: everything after the module, hyphens and a later `--` included.
    assert!(stdout.starts_with("probe.wat\0--flag\0-x\0--\0v\0"), "{stdout:?}");
    assert!(stdout.contains("GREETING=hi there\0EMPTY=\0"), "{stdout:?}");
    assert!(!stdout.contains("PATH="), "the host's environment leaked: {stdout:?}");
    assert!(stdout.ends_with("hello from the host\n"), "{stdout:?}");
    // Read-write, as WasmEdge preopens.
    assert_eq!(std::fs::read_to_string(d.join("out.txt")).unwrap(), "written by the guest\n");
}

#[test]
fn dir_forms_and_a_missing_directory() {
    let d = probe_dir("wasmedge-forms");
    std::fs::create_dir(d.join("data")).unwrap();
    std::fs::write(d.join("data/in.txt"), "from data\n").unwrap();
    // HOST:GUEST with another guest path, and a leading `--` before the guest's arguments.
    let out = run_in(&d, &["--backend", "cpu", "--dir", "data:/data", "probe.wat", "--", "a"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.starts_with("probe.wat\0a\0"), "{stdout:?}");
    assert!(stdout.ends_with("from data\n"), "{stdout:?}");
    assert!(d.join("data/out.txt").is_file());
    // DIR alone: the same path on both sides.
    let out = run_in(&d, &["--backend", "cpu", "--dir", "data", "probe.wat"]);
    assert_eq!(out.status.code(), Some(0));
    // A symlink out of the preopened directory is not followed.
    std::fs::create_dir(d.join("jail")).unwrap();
    std::os::unix::fs::symlink("../in.txt", d.join("jail/in.txt")).unwrap();
    let out = run_in(&d, &["--backend", "cpu", "--dir", "jail", "probe.wat"]);
    assert_eq!(out.status.code(), Some(10));
    // No --dir: the guest sees no files.
    let out = run_in(&d, &["--backend", "cpu", "probe.wat"]);
    assert_eq!(out.status.code(), Some(10));
    // A directory that is not there, or a file: said before anything runs.
    let out = run_in(&d, &["--backend", "cpu", "--dir", "nope:.", "probe.wat"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such directory: nope"));
    let out = run_in(&d, &["--backend", "cpu", "--dir", "in.txt", "probe.wat"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in.txt is not a directory"));
    let out = run_in(&d, &["--bogus", "probe.wat"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bogus"));
    let out = run_in(&d, &["--backend", "cpu", "--env", "NOEQUALS", "probe.wat"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected K=V"));
}

#[test]
fn nn_preload_errors_say_what_to_fix() {
    let d = probe_dir("wasmedge-preload");
    std::fs::write(d.join("model.gguf"), b"GGUF").unwrap();
    let cases: &[(&str, &[&str])] = &[
        ("default:GGML:model.gguf", &["3 of the 4 parts", "NAME:GGML:TARGET:PATH"]),
        ("model.gguf", &["1 of the 4 parts", "NAME:GGML:TARGET:PATH"]),
        ("default:ONNX:AUTO:model.gguf", &["encoding `ONNX`", "NAME:GGML:TARGET:PATH"]),
        ("default:GGML:TPU:model.gguf", &["target `TPU`", "AUTO, CPU, GPU"]),
        (":GGML:AUTO:model.gguf", &["the name (first part) is empty"]),
        ("default:GGML:AUTO:missing.gguf", &["no such file: missing.gguf"]),
    ];
    for (spec, says) in cases {
        let out = run_in(&d, &["--backend", "cpu", "--nn-preload", spec, "probe.wat"]);
        assert_eq!(out.status.code(), Some(2), "{spec}");
        let err = String::from_utf8_lossy(&out.stderr);
        for s in *says {
            assert!(err.contains(s), "--nn-preload {spec}: {s:?} not in {err}");
        }
    }
}

#[test]
fn a_guest_that_dies_on_a_wasi_nn_error_gets_the_error_not_a_backtrace() {
    let d = tmp("wasmedge-unwrap");
    std::fs::write(d.join("unwraps.wat"), UNWRAPS).unwrap();
    std::fs::write(d.join("x.gguf"), b"GGUF").unwrap();
    // The model is named but never opened: a bad file is not the point here.
    let out = run_in(&d, &["--backend", "cpu", "--nn-preload", "default:GGML:AUTO:x.gguf", "unwraps.wat"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no model named `nosuch`"), "{err}");
    assert!(err.contains("preloaded: default"), "{err}");
    assert!(err.contains("unreachable"), "{err}");
    assert!(!err.contains("backtrace") && !err.contains("deep3"), "{err}");
    assert!(err.lines().count() <= 2, "{err}");
}

#[test]
fn nnchat_as_pasted_from_llamaedge() {
    let Some(m) = model() else {
        eprintln!("skipped: the default model is not fetched (scripts/fetch-model.sh)");
        return;
    };
    let d = tmp("wasmedge-nnchat");
    std::fs::write(d.join("nnchat.wasm"), shoal_guests::NNCHAT).unwrap();
    std::os::unix::fs::symlink(&m, d.join("model.gguf")).unwrap();
    let args = [
        "--backend",
        "cpu",
        "--dir",
        ".:.",
        "--nn-preload",
        "default:GGML:AUTO:model.gguf",
        "nnchat.wasm",
        "--prompt",
        "What is the capital of France?",
        "--temperature",
        "0",
        "--n-predict",
        "16",
    ];
    let out = run_in(&d, &args);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Paris"));
    // A name that was not preloaded: the guest says it failed, shoal says why.
    let out = run_in(
        &d,
        &["--backend", "cpu", "--nn-preload", "default:GGML:AUTO:model.gguf", "nnchat.wasm", "--model", "other"],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no model named `other` (preloaded: default"), "{err}");
}
