//! The inference level of the ABI, from guests: the real chat guest answers, and bad
//! calls (unknown model or session, buffers too small, tokens out of the vocabulary, a
//! full context) get their status while the guest keeps running. Needs the default
//! model (`scripts/fetch-model.sh`; `make test` fetches it).

use std::sync::Arc;

use shoal_gpu::{BackendKind, Device};
use shoal_host::{Models, RunOptions, Runtime};

/// The default model's file: where the host looks, or the checkout's `models/`.
fn model_file() -> Option<std::path::PathBuf> {
    shoal_host::default_model_path()
}

fn runtime(test: &str) -> Option<Runtime> {
    let Some(path) = model_file() else {
        eprintln!("{test}: skipping: no default model; run scripts/fetch-model.sh");
        return None;
    };
    let models = Arc::new(Models::new());
    models.add("smollm2", &path);
    let device = Arc::new(Device::open(BackendKind::Cpu).unwrap());
    Some(Runtime::with_models(device, models).unwrap())
}

#[test]
fn the_chat_guest_answers_and_keeps_the_conversation() {
    let Some(rt) = runtime("the_chat_guest_answers_and_keeps_the_conversation") else { return };
    let args = [
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        "--prompt",
        "What is the capital of France?",
        "--prompt",
        "And of Germany?",
    ]
    .map(String::from)
    .to_vec();
    let out = rt.run(shoal_guests::CHAT, &RunOptions { args, capture_stdout: true, ..Default::default() }).unwrap();
    let text = String::from_utf8_lossy(out.stdout.as_deref().unwrap());
    assert_eq!(out.exit_code, 0, "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].contains("Paris"), "{text}");
    assert!(lines[1].contains("Berlin"), "{text}");
    // The second turn reused the cache: far fewer prompt tokens than two full prompts.
    assert!(out.stats.prefill_tokens < 2 * 37 + 20, "{:?}", out.stats);
    assert_eq!(out.stats.errors, 0, "{:?}", out.stats);
}

#[test]
fn sampling_is_reproducible_for_a_seed() {
    let Some(rt) = runtime("sampling_is_reproducible_for_a_seed") else { return };
    let run = |seed: &str| {
        let args = ["--temperature", "0.9", "--seed", seed, "--max-tokens", "16", "--prompt", "Tell me a story."]
            .map(String::from)
            .to_vec();
        let out = rt.run(shoal_guests::CHAT, &RunOptions { args, capture_stdout: true, ..Default::default() }).unwrap();
        String::from_utf8_lossy(out.stdout.as_deref().unwrap()).into_owned()
    };
    assert_eq!(run("7"), run("7"));
}

const IMPORTS: &str = r#"
  (import "shoal_v1" "model_open" (func $model_open (param i32 i32 i32) (result i32)))
  (import "shoal_v1" "model_info" (func $model_info (param i32 i32) (result i32)))
  (import "shoal_v1" "tokenize" (func $tokenize (param i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "shoal_v1" "token_piece" (func $token_piece (param i32 i32 i32 i32 i32) (result i32)))
  (import "shoal_v1" "session_create" (func $session_create (param i32 i32 i32) (result i32)))
  (import "shoal_v1" "session_free" (func $session_free (param i32) (result i32)))
  (import "shoal_v1" "session_eval" (func $session_eval (param i32 i32 i32 i32 i32) (result i32)))
  (import "shoal_v1" "session_len" (func $session_len (param i32 i32) (result i32)))
  (import "shoal_v1" "session_truncate" (func $session_truncate (param i32 i32) (result i32)))
  (import "shoal_v1" "session_decode_top" (func $session_decode_top (param i32 i32 i32 i32 i32 i32) (result i32)))
"#;

#[test]
fn bad_inference_calls_get_their_status() {
    let Some(rt) = runtime("bad_inference_calls_get_their_status") else { return };
    // Memory: "smollm2" at 0x10, "nope" at 0x20, text at 0x40; model handle at 0x100,
    // session at 0x104, counts at 0x108; tokens at 0x200; logits at 0x10000.
    let checks = [
        ("unknown_model", "(call $model_open (i32.const 0x20) (i32.const 4) (i32.const 0x100))", 11),
        ("name_past_memory", "(call $model_open (i32.const 0xfffffff0) (i32.const 64) (i32.const 0x100))", 2),
        ("open", "(call $model_open (i32.const 0x10) (i32.const 7) (i32.const 0x100))", 0),
        ("info", "(call $model_info (i32.load (i32.const 0x100)) (i32.const 0x300))", 0),
        ("info_bad_model", "(call $model_info (i32.const 999) (i32.const 0x300))", 6),
        (
            "tokenize_too_small",
            "(call $tokenize (i32.load (i32.const 0x100)) (i32.const 0x40) (i32.const 30) (i32.const 0) (i32.const 0x200) (i32.const 1) (i32.const 0x108))",
            12,
        ),
        (
            "tokenize",
            "(call $tokenize (i32.load (i32.const 0x100)) (i32.const 0x40) (i32.const 30) (i32.const 0) (i32.const 0x200) (i32.const 64) (i32.const 0x108))",
            0,
        ),
        (
            "piece_out_of_vocab",
            "(call $token_piece (i32.load (i32.const 0x100)) (i32.const 0x7fffffff) (i32.const 0x300) (i32.const 64) (i32.const 0x108))",
            1,
        ),
        ("session_bad_model", "(call $session_create (i32.const 999) (i32.const 16) (i32.const 0x104))", 6),
        ("session", "(call $session_create (i32.load (i32.const 0x100)) (i32.const 4) (i32.const 0x104))", 0),
        (
            "eval_bad_session",
            "(call $session_eval (i32.const 999) (i32.const 0x200) (i32.const 1) (i32.const 0) (i32.const 0))",
            6,
        ),
        (
            "eval_context_full",
            "(call $session_eval (i32.load (i32.const 0x104)) (i32.const 0x200) (i32.const 5) (i32.const 0) (i32.const 0))",
            13,
        ),
        (
            "eval_logits_too_small",
            "(call $session_eval (i32.load (i32.const 0x104)) (i32.const 0x200) (i32.const 1) (i32.const 0x10000) (i32.const 10))",
            12,
        ),
        (
            "eval_logits_past_memory",
            "(call $session_eval (i32.load (i32.const 0x104)) (i32.const 0x200) (i32.const 1) (i32.const 0x30000) (i32.const 49152))",
            2,
        ),
        (
            "eval",
            "(call $session_eval (i32.load (i32.const 0x104)) (i32.const 0x200) (i32.const 2) (i32.const 0x10000) (i32.const 49152))",
            0,
        ),
        // The sampler record at 0x400 is zeros: greedy.
        (
            "top_too_many",
            "(call $session_decode_top (i32.load (i32.const 0x104)) (i32.const 0x200) (i32.const 1) (i32.const 0x400) (i32.const 21) (i32.const 0x20000))",
            1,
        ),
        (
            "top_past_memory",
            "(call $session_decode_top (i32.load (i32.const 0x104)) (i32.const 0x200) (i32.const 1) (i32.const 0x400) (i32.const 2) (i32.const 0x3fff0))",
            2,
        ),
        (
            "top",
            "(call $session_decode_top (i32.load (i32.const 0x104)) (i32.const 0x200) (i32.const 1) (i32.const 0x400) (i32.const 3) (i32.const 0x20000))",
            0,
        ),
        // Greedy: the chosen token is the most likely, and its log-probability at most 0.
        (
            "top_records",
            "(i32.or (i32.ne (i32.load (i32.const 0x20000)) (i32.load (i32.const 0x20008))) (f32.gt (f32.load (i32.const 0x20004)) (f32.const 0)))",
            0,
        ),
        ("len", "(call $session_len (i32.load (i32.const 0x104)) (i32.const 0x108))", 0),
        ("truncate_past_len", "(call $session_truncate (i32.load (i32.const 0x104)) (i32.const 9))", 1),
        ("truncate", "(call $session_truncate (i32.load (i32.const 0x104)) (i32.const 1))", 0),
        ("free", "(call $session_free (i32.load (i32.const 0x104)))", 0),
        ("free_twice", "(call $session_free (i32.load (i32.const 0x104)))", 6),
    ];
    let mut funcs = String::new();
    let mut calls = String::new();
    for (name, call, want) in checks {
        funcs.push_str(&format!("  (func $check_{name} (if (i32.ne {call} (i32.const {want})) (then unreachable)))\n"));
        calls.push_str(&format!("    (call $check_{name})\n"));
    }
    // An out-of-vocabulary token in the input is refused (written after tokenize).
    funcs.push_str("  (func $check_bad_token (i32.store (i32.const 0x280) (i32.const 0x7fffffff))\n    (if (i32.ne (call $session_eval (i32.load (i32.const 0x104)) (i32.const 0x280) (i32.const 1) (i32.const 0) (i32.const 0)) (i32.const 1)) (then unreachable)))\n");
    let calls = calls.replace("    (call $check_len)\n", "    (call $check_len)\n    (call $check_bad_token)\n");
    let wat = format!(
        "(module\n{IMPORTS}\n  (memory (export \"memory\") 4)\n  (data (i32.const 0x10) \"smollm2\")\n  (data (i32.const 0x20) \"nope\")\n  (data (i32.const 0x40) \"What is the capital of France?\")\n{funcs}  (func (export \"run\")\n{calls}  ))"
    );
    let stats = rt.call_export(wat.as_bytes(), "run").unwrap_or_else(|e| panic!("{e:?}\n{wat}"));
    // Every check but `top_records` is one host call.
    assert_eq!(stats.calls, checks.len() as u64, "{stats:?}");
    assert_eq!(stats.errors, checks.iter().filter(|c| c.2 != 0).count() as u64 + 1, "{stats:?}");
}

#[test]
fn missing_truncated_and_corrupt_model_files_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("shoal-bad-models-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let models = Models::new();
    models.add("missing", &dir.join("nope.gguf"));
    let garbage = dir.join("garbage.gguf");
    std::fs::write(&garbage, b"<html>not a model</html>").unwrap();
    models.add("garbage", &garbage);
    if let Some(real) = model_file() {
        // The real file cut in the middle of its tensor data, and with a flipped header byte.
        let bytes = std::fs::read(real).unwrap();
        let cut = dir.join("cut.gguf");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        models.add("cut", &cut);
        let mut flipped = bytes[..4096.min(bytes.len())].to_vec();
        flipped[5] ^= 0xff;
        let flip = dir.join("flipped.gguf");
        std::fs::write(&flip, &flipped).unwrap();
        models.add("flipped", &flip);
    } else {
        eprintln!("skipping the truncated-model cases: run scripts/fetch-model.sh");
    }
    for name in models.names() {
        let e = models.get(&name).err().unwrap_or_else(|| panic!("{name} loaded"));
        assert!(e.contains(&format!("model `{name}`")), "{name}: {e}");
        eprintln!("{name}: {e}");
    }
    // Loading failed: a guest opening it gets status 11 with the reason, the host goes on.
    assert!(models.get("nope-at-all").err().is_some_and(|e| e.contains("no model named")));
    std::fs::remove_dir_all(&dir).ok();
}
