//! `wasi_ephemeral_nn` (GGML): the guest written against the `wasmedge-wasi-nn` crate holds
//! a multi-turn chat and reuses its cached prefix; bad calls from WAT guests get the error
//! codes of the home runtime and the guest keeps running. Needs the default model
//! (`scripts/fetch-model.sh`; `make test` fetches it).

use std::sync::Arc;

use shoal_gpu::{BackendKind, Device};
use shoal_host::{Models, RunOptions, Runtime};

fn runtime(test: &str) -> Option<Runtime> {
    let path = shoal_host::default_model_path();
    let Some(path) = path else {
        eprintln!("{test}: skipping: no default model; run scripts/fetch-model.sh");
        return None;
    };
    let models = Arc::new(Models::new());
    models.add("default", &path);
    let device = Arc::new(Device::open(BackendKind::Cpu).unwrap());
    Some(Runtime::with_models(device, models).unwrap())
}

fn run_nnchat(rt: &Runtime, args: &[&str]) -> String {
    let opts = RunOptions {
        args: args.iter().map(|s| s.to_string()).collect(),
        capture_stdout: true,
        program_name: Some("nnchat.wasm".into()),
        ..Default::default()
    };
    let out = rt.run(shoal_guests::NNCHAT, &opts).expect("nnchat runs");
    assert_eq!(out.exit_code, 0);
    String::from_utf8(out.stdout.unwrap()).unwrap()
}

#[test]
fn the_wasmedge_guest_answers_turn_after_turn_reusing_its_prefix() {
    let Some(rt) = runtime("the_wasmedge_guest_answers_turn_after_turn_reusing_its_prefix") else { return };
    let args =
        ["--temperature", "0", "--stats", "--prompt", "What is the capital of France?", "--prompt", "And of Germany?"];
    let out = run_nnchat(&rt, &args);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(lines[0].contains("Paris"), "{out}");
    assert!(lines[2].contains("Berlin"), "{out}");
    let meta: Vec<serde_json::Value> = [lines[1], lines[3]].iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    let reused = |i: usize| meta[i]["metadata"]["reused_tokens"].as_u64().unwrap();
    let input = |i: usize| meta[i]["metadata"]["input_tokens"].as_u64().unwrap();
    assert_eq!(reused(0), 0);
    // Turn 2 resends turn 1 and its answer: all of that is in the cache already.
    assert!(reused(1) > input(0), "{meta:?}");
    assert!(meta[1]["metadata"]["output_tokens"].as_u64().unwrap() > 0);

    // Without reuse, the same answers (greedy) from a re-evaluated conversation.
    let mut plain = args.to_vec();
    plain.push("--no-prefix-reuse");
    let out2 = run_nnchat(&rt, &plain);
    let lines2: Vec<&str> = out2.lines().collect();
    assert_eq!((lines2[0], lines2[2]), (lines[0], lines[2]));
    assert!(lines2[3].contains("\"reused_tokens\":0"), "{out2}");
}

#[test]
fn n_predict_stops_the_answer() {
    let Some(rt) = runtime("n_predict_stops_the_answer") else { return };
    let out =
        run_nnchat(&rt, &["--temperature", "0", "--n-predict", "3", "--stats", "--prompt", "Count from one to ten."]);
    let meta: serde_json::Value = serde_json::from_str(out.lines().nth(1).unwrap()).unwrap();
    assert_eq!(meta["metadata"]["output_tokens"], 3, "{out}");
}

#[test]
fn embedding_mode_gives_a_unit_vector_of_the_model_width() {
    let Some(rt) = runtime("embedding_mode_gives_a_unit_vector_of_the_model_width") else { return };
    let embed = |text: &str| -> Vec<f64> {
        let out = run_nnchat(&rt, &["--embed", text]);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(v["n_embedding"], 576, "SmolLM2's width");
        v["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
    };
    let a = embed("The capital of France is Paris.");
    assert_eq!(a.len(), 576);
    let norm: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "{norm}");
    assert_eq!(a, embed("The capital of France is Paris."), "deterministic");
    assert_ne!(a, embed("Bananas are yellow."));
}

const IMPORTS: &str = r#"
  (import "wasi_ephemeral_nn" "load" (func $load (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_ephemeral_nn" "load_by_name" (func $load_by_name (param i32 i32 i32) (result i32)))
  (import "wasi_ephemeral_nn" "load_by_name_with_config" (func $load_cfg (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_ephemeral_nn" "init_execution_context" (func $init (param i32 i32) (result i32)))
  (import "wasi_ephemeral_nn" "set_input" (func $set_input (param i32 i32 i32) (result i32)))
  (import "wasi_ephemeral_nn" "compute" (func $compute (param i32) (result i32)))
  (import "wasi_ephemeral_nn" "compute_single" (func $compute_single (param i32) (result i32)))
  (import "wasi_ephemeral_nn" "get_output" (func $get_output (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_ephemeral_nn" "get_output_single" (func $get_output_single (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_ephemeral_nn" "fini_single" (func $fini_single (param i32) (result i32)))
  (import "wasi_ephemeral_nn" "unload" (func $unload (param i32) (result i32)))
  (import "wasi_ephemeral_nn" "finalize_execution_context" (func $finalize (param i32) (result i32)))
"#;

#[test]
fn bad_calls_get_wasi_nn_error_codes() {
    let Some(rt) = runtime("bad_calls_get_wasi_nn_error_codes") else { return };
    // Memory: "default" at 0x10, "nope" at 0x20, configs at 0x30 (bad JSON) and 0x40 (a
    // 4-token context), the ChatML prompt at 0x80; graph at 0x100, context at 0x104,
    // second graph at 0x108, second context at 0x10c, size at 0x110; tensors at 0x200 (the
    // prompt), 0x220 (data past the memory), 0x240 (dims past the memory); a builder
    // array at 0x260; dims at 0x280; output at 0x1000.
    let checks = [
        ("not_found", "(call $load_by_name (i32.const 0x20) (i32.const 4) (i32.const 0x100))", 103),
        (
            "bad_json",
            "(call $load_cfg (i32.const 0x10) (i32.const 7) (i32.const 0x30) (i32.const 5) (i32.const 0x100))",
            1,
        ),
        (
            "wrong_encoding",
            "(call $load (i32.const 0x260) (i32.const 1) (i32.const 0) (i32.const 0) (i32.const 0x100))",
            2,
        ),
        (
            "load_garbage",
            "(call $load (i32.const 0x260) (i32.const 1) (i32.const 6) (i32.const 0) (i32.const 0x100))",
            5,
        ),
        (
            "builders_past_memory",
            "(call $load (i32.const 0xfffffff0) (i32.const 1) (i32.const 6) (i32.const 0) (i32.const 0x100))",
            1,
        ),
        ("load", "(call $load_by_name (i32.const 0x10) (i32.const 7) (i32.const 0x100))", 0),
        ("unknown_graph", "(call $init (i32.const 999) (i32.const 0x104))", 1),
        ("init", "(call $init (i32.load (i32.const 0x100)) (i32.const 0x104))", 0),
        ("compute_without_input", "(call $compute (i32.load (i32.const 0x104)))", 8),
        ("unknown_context", "(call $compute (i32.const 999))", 1),
        ("input_data_past_memory", "(call $set_input (i32.load (i32.const 0x104)) (i32.const 0) (i32.const 0x220))", 1),
        ("input_dims_past_memory", "(call $set_input (i32.load (i32.const 0x104)) (i32.const 0) (i32.const 0x240))", 1),
        ("input_bad_index", "(call $set_input (i32.load (i32.const 0x104)) (i32.const 7) (i32.const 0x200))", 1),
        ("input", "(call $set_input (i32.load (i32.const 0x104)) (i32.const 0) (i32.const 0x200))", 0),
        ("compute_single", "(call $compute_single (i32.load (i32.const 0x104)))", 0),
        (
            "output_single",
            "(call $get_output_single (i32.load (i32.const 0x104)) (i32.const 0) (i32.const 0x1000) (i32.const 64) (i32.const 0x110))",
            0,
        ),
        (
            "output_too_large",
            "(call $get_output (i32.load (i32.const 0x104)) (i32.const 1) (i32.const 0x1000) (i32.const 4) (i32.const 0x110))",
            7,
        ),
        (
            "output_past_memory",
            "(call $get_output (i32.load (i32.const 0x104)) (i32.const 1) (i32.const 0x3fff0) (i32.const 4096) (i32.const 0x110))",
            1,
        ),
        (
            "output_bad_index",
            "(call $get_output (i32.load (i32.const 0x104)) (i32.const 5) (i32.const 0x1000) (i32.const 64) (i32.const 0x110))",
            1,
        ),
        ("fini", "(call $fini_single (i32.load (i32.const 0x104)))", 0),
        (
            "small_context",
            "(call $load_cfg (i32.const 0x10) (i32.const 7) (i32.const 0x40) (i32.const 14) (i32.const 0x108))",
            0,
        ),
        ("init_small", "(call $init (i32.load (i32.const 0x108)) (i32.const 0x10c))", 0),
        ("input_small", "(call $set_input (i32.load (i32.const 0x10c)) (i32.const 0) (i32.const 0x200))", 0),
        ("prompt_too_long", "(call $compute (i32.load (i32.const 0x10c)))", 102),
        ("finalize", "(call $finalize (i32.load (i32.const 0x10c)))", 0),
        ("finalize_twice", "(call $finalize (i32.load (i32.const 0x10c)))", 1),
        ("unload", "(call $unload (i32.load (i32.const 0x108)))", 0),
        ("unload_twice", "(call $unload (i32.load (i32.const 0x108)))", 1),
    ];
    let mut funcs = String::new();
    let mut calls = String::new();
    for (name, call, want) in checks {
        funcs.push_str(&format!("  (func $check_{name} (if (i32.ne {call} (i32.const {want})) (then unreachable)))\n"));
        calls.push_str(&format!("    (call $check_{name})\n"));
    }
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("\\{b:02x}")).collect::<String>();
    let le = |v: u32| hex(&v.to_le_bytes());
    let prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    assert!(prompt.len() <= 0x80);
    // Tensors: {dims_ptr, dims_len, type, data_ptr, data_len}.
    let tensor = |dims: u32, data: u32, len: u32| format!("{}{}{}{}{}", le(dims), le(1), le(3), le(data), le(len));
    let builders = le(0x80) + &le(prompt.len() as u32);
    let wat = format!(
        "(module\n{IMPORTS}\n  (memory (export \"memory\") 4)\n  (data (i32.const 0x10) \"default\")\n  (data (i32.const 0x20) \"nope\")\n  (data (i32.const 0x30) \"{{bad\")\n  (data (i32.const 0x40) \"{{\\\"ctx-size\\\":4}}\")\n  (data (i32.const 0x80) \"{}\")\n  (data (i32.const 0x200) \"{}\")\n  (data (i32.const 0x220) \"{}\")\n  (data (i32.const 0x240) \"{}\")\n  (data (i32.const 0x260) \"{}\")\n  (data (i32.const 0x280) \"{}\")\n{funcs}  (func (export \"run\")\n{calls}  ))",
        hex(prompt.as_bytes()),
        tensor(0x280, 0x80, prompt.len() as u32),
        tensor(0x280, 0x3fff0, 4096),
        tensor(0xfffffff0, 0x80, prompt.len() as u32),
        builders,
        le(1),
    );
    rt.call_export(wat.as_bytes(), "run").unwrap_or_else(|e| panic!("{e:?}\n{wat}"));
}

fn run_component(rt: &Runtime, args: &[&str]) -> String {
    let opts = RunOptions {
        args: args.iter().map(|s| s.to_string()).collect(),
        capture_stdout: true,
        program_name: Some("nncomponent.wasm".into()),
        ..Default::default()
    };
    assert!(shoal_host::is_component(shoal_guests::NNCOMPONENT));
    let out = rt.run(shoal_guests::NNCOMPONENT, &opts).expect("the component runs");
    assert_eq!(out.exit_code, 0);
    String::from_utf8(out.stdout.unwrap()).unwrap()
}

#[test]
fn a_component_guest_chats_through_wit_wasi_nn_reusing_its_prefix() {
    let Some(rt) = runtime("a_component_guest_chats_through_wit_wasi_nn_reusing_its_prefix") else { return };
    let out =
        run_component(&rt, &["--stats", "--prompt", "What is the capital of France?", "--prompt", "And of Germany?"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(lines[0].contains("Paris"), "{out}");
    assert!(lines[2].contains("Berlin"), "{out}");
    let meta: serde_json::Value = serde_json::from_str(lines[3]).unwrap();
    assert!(meta["reused_tokens"].as_u64().unwrap() > 30, "turn 2 reuses turn 1's cache: {meta}");
}

#[test]
fn bad_calls_through_wit_wasi_nn_are_errors_the_component_reads() {
    let Some(rt) = runtime("bad_calls_through_wit_wasi_nn_are_errors_the_component_reads") else { return };
    let out = run_component(&rt, &["--bad-calls"]);
    let want = [
        "unknown model: ErrorCode::NotFound",
        "onnx bytes: ErrorCode::InvalidEncoding",
        "garbage model: ErrorCode::InvalidArgument",
        "no inputs: ErrorCode::InvalidArgument",
        "fp32 prompt: ErrorCode::InvalidArgument",
        "non-UTF-8 prompt: ErrorCode::InvalidArgument",
        "malformed metadata: ErrorCode::InvalidArgument",
        "prompt too long: ErrorCode::TooLarge",
        "still usable: accepted",
    ];
    assert_eq!(out.lines().collect::<Vec<_>>(), want, "{out}");
}
