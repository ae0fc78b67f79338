//! Hostile guests: each attack gets a clear error or is bounded, the host stays up, the memory
//! it holds stays under the limit it was given (measured), and a neighbour keeps answering.
//!
//! The attacks are those found when shoal was tried as an attacker would (device buffers that
//! commit host memory, `chat_render` amplification, absurd contexts, host calls that ignore the
//! deadline, endless `_initialize`, models from bytes written to a shared directory, replies
//! without end) and a few more. Tests that need the default model skip with a message where it
//! is missing (`make test` fetches it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_gpu::{BackendKind, Device};
use shoal_host::{HostError, InstanceOptions, Limits, Models, RunOptions, Runtime};

const MIB: u64 = 1 << 20;

/// The tests measure this process's resident memory: they run one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn cpu_runtime() -> Runtime {
    Runtime::new(Arc::new(Device::open(BackendKind::Cpu).expect("the CPU backend always opens"))).unwrap()
}

fn model_runtime(test: &str) -> Option<Runtime> {
    let Some(path) = shoal_host::default_model_path() else {
        eprintln!("{test}: skipping: no default model; run scripts/fetch-model.sh");
        return None;
    };
    let models = Arc::new(Models::new());
    models.add("smollm2", &path);
    models.add("default", &path);
    let device = Arc::new(Device::open(BackendKind::Cpu).unwrap());
    Some(Runtime::with_models(device, models).unwrap())
}

/// Resident bytes of this process now.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

const IMPORTS: &str = r#"
  (import "shoal_v1" "gemm" (func $gemm (param i32) (result i32)))
  (import "shoal_v1" "buffer_create" (func $buffer_create (param i64 i32) (result i32)))
  (import "shoal_v1" "buffer_free" (func $buffer_free (param i32) (result i32)))
  (import "shoal_v1" "reply" (func $reply (param i32 i32) (result i32)))
  (import "shoal_v1" "model_open" (func $model_open (param i32 i32 i32) (result i32)))
  (import "shoal_v1" "chat_render" (func $chat_render (param i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "shoal_v1" "session_create" (func $session_create (param i32 i32 i32) (result i32)))
  (import "shoal_v1" "session_eval" (func $session_eval (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_ephemeral_nn" "load" (func $nn_load (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_ephemeral_nn" "load_by_name" (func $nn_load_by_name (param i32 i32 i32) (result i32)))
  (import "wasi_ephemeral_nn" "init_execution_context" (func $nn_init (param i32 i32) (result i32)))
  (import "wasi_ephemeral_nn" "get_output" (func $nn_get_output (param i32 i32 i32 i32 i32) (result i32)))
"#;

/// A command whose `_start` runs `body`; each `(expect CALL CODE)` below traps when the call
/// returns another status.
fn command(memory_pages: u32, data: &str, body: &str) -> String {
    format!(
        "(module {IMPORTS}\n (memory (export \"memory\") {memory_pages})\n {data}\n (func (export \"_start\")\n {body}))"
    )
}

fn expect(call: &str, code: i32) -> String {
    format!("(if (i32.ne {call} (i32.const {code})) (then unreachable))\n")
}

fn run(rt: &Runtime, wat: &str, limits: Limits) -> Result<shoal_host::RunOutcome, HostError> {
    rt.run(wat.as_bytes(), &RunOptions { limits, ..Default::default() })
}

fn run_ok(rt: &Runtime, wat: &str, limits: Limits) -> shoal_host::RunOutcome {
    match run(rt, wat, limits) {
        Ok(o) => o,
        Err(e) => panic!("the guest failed: {e:?}\n--- guest ---\n{wat}"),
    }
}

fn limits(max_memory: u64) -> Limits {
    Limits { max_memory, ..Limits::default() }
}

// ---------------------------------------------------------------------------------------------
// Memory

#[test]
fn device_buffers_are_charged_to_max_memory_and_not_committed_up_front() {
    let _serial = serial();
    let rt = cpu_runtime();
    let before = rss();
    let mut body = String::new();
    for i in 0..3 {
        body += &expect(&format!("(call $buffer_create (i64.const {}) (i32.const {}))", 64 * MIB, 0x100 + 4 * i), 0);
    }
    // The fourth would pass 256 MiB with the guest's own page: refused with LimitExceeded.
    body += &expect(&format!("(call $buffer_create (i64.const {}) (i32.const 0x200))", 64 * MIB), 14);
    body += &expect(&format!("(call $buffer_create (i64.const {}) (i32.const 0x200))", 1 << 30), 14);
    // Freeing one gives its bytes back.
    body += &expect("(call $buffer_free (i32.load (i32.const 0x100)))", 0);
    body += &expect(&format!("(call $buffer_create (i64.const {}) (i32.const 0x200))", 64 * MIB), 0);
    let out = run_ok(&rt, &command(1, "", &body), limits(256 * MIB));
    let grown = rss().saturating_sub(before);
    assert!(grown < 32 * MIB, "three untouched 64 MiB buffers made the process grow by {grown} bytes");
    assert!(out.stats.peak_charged_bytes <= 256 * MIB, "{:?}", out.stats);
    assert!(out.stats.last_error.as_deref().unwrap_or("").contains("--max-memory"), "{:?}", out.stats.last_error);
}

#[test]
fn a_guest_cannot_grow_its_memory_past_max_memory() {
    let _serial = serial();
    let rt = cpu_runtime();
    let body = "(if (i32.ne (memory.grow (i32.const 200)) (i32.const -1)) (then unreachable))\n\
                (if (i32.ne (memory.grow (i32.const 64)) (i32.const 1)) (then unreachable))";
    run_ok(&rt, &command(1, "", body), limits(8 * MIB));
    // An initial memory past the limit cannot even be instantiated.
    let err = run(&rt, &command(256, "", ""), limits(8 * MIB)).unwrap_err();
    assert!(matches!(err, HostError::Instantiate(_)), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// Time

#[test]
fn an_endless_start_stops_at_the_deadline() {
    let _serial = serial();
    let rt = cpu_runtime();
    let t0 = Instant::now();
    let lim = Limits { deadline: Some(Duration::from_millis(200)), ..Limits::default() };
    let err = run(&rt, &command(1, "", "(loop $l (br $l))"), lim).unwrap_err();
    assert!(matches!(err, HostError::Deadline), "{err:?}");
    assert!(t0.elapsed() < Duration::from_secs(5), "stopped after {:?}", t0.elapsed());
}

#[test]
fn a_long_gemm_stops_at_the_deadline() {
    let _serial = serial();
    // C (8192×4096) = A (8192×2048) · B (2048×4096), f32: 137 GFLOP, seconds on two cores.
    let rt = cpu_runtime();
    let (m, n, k) = (8192u64, 4096u64, 2048u64);
    let (a, b) = (1u64 << 16, (1u64 << 16) + m * k * 4);
    let c = b + k * n * 4;
    let pages = (c + m * n * 4).div_ceil(1 << 16) as u32;
    let mut desc = Vec::new();
    for w in [0u32, 0, m as u32, n as u32, k as u32, k as u32, n as u32, n as u32] {
        desc.extend_from_slice(&w.to_le_bytes());
    }
    desc.extend_from_slice(&1f32.to_le_bytes());
    desc.extend_from_slice(&0f32.to_le_bytes());
    for (at, len) in [(a, m * k * 4), (b, k * n * 4), (c, m * n * 4)] {
        desc.extend_from_slice(&at.to_le_bytes());
        desc.extend_from_slice(&len.to_le_bytes());
    }
    let hex: String = desc.iter().map(|b| format!("\\{b:02x}")).collect();
    let data = format!("(data (i32.const 0x100) \"{hex}\")");
    let lim = Limits { deadline: Some(Duration::from_millis(300)), ..Limits::default() };
    let t0 = Instant::now();
    let err = run(&rt, &command(pages, &data, &expect("(call $gemm (i32.const 0x100))", 0)), lim).unwrap_err();
    let took = t0.elapsed();
    assert!(matches!(err, HostError::Deadline), "{err:?}");
    assert!(took < Duration::from_secs(3), "the product stopped {took:?} after a 300 ms deadline");
}

const ACTOR: &str = r#"
  (memory (export "memory") 2)
  (func (export "shoal_actor_alloc") (param i32) (result i32) (i32.const 0x1000))
"#;

fn actor(body: &str, init: &str) -> String {
    format!(
        "(module {IMPORTS}\n{ACTOR}\n (func (export \"_initialize\") {init})\n (func (export \"shoal_actor_message\") (param $p i32) (param $n i32) (result i32)\n {body}))"
    )
}

#[test]
fn an_endless_initialize_stops_at_the_deadline() {
    let _serial = serial();
    let rt = cpu_runtime();
    let prepared = rt.prepare(actor("(i32.const 0)", "(loop $l (br $l))").as_bytes()).unwrap();
    let opts = InstanceOptions {
        limits: Limits { deadline: Some(Duration::from_millis(200)), ..Limits::default() },
        ..Default::default()
    };
    let t0 = Instant::now();
    let err = rt.instantiate(&prepared, &opts).unwrap_err();
    assert!(matches!(err, HostError::Deadline), "{err:?}");
    assert!(t0.elapsed() < Duration::from_secs(5), "stopped after {:?}", t0.elapsed());
}

#[test]
fn a_spinning_handler_is_killed_from_another_thread() {
    let _serial = serial();
    let rt = cpu_runtime();
    let prepared = rt.prepare(actor("(loop $l (br $l)) (i32.const 0)", "").as_bytes()).unwrap();
    let mut inst = rt.instantiate(&prepared, &InstanceOptions::default()).unwrap();
    let kill = inst.interrupt();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        kill.kill();
        Instant::now()
    });
    let err = inst.message(b"hi", None, Box::new(|_| true)).unwrap_err();
    let stopped = Instant::now();
    let killed_at = killer.join().unwrap();
    assert!(matches!(err, HostError::Killed), "{err:?}");
    assert!(stopped.duration_since(killed_at) < Duration::from_secs(2), "stopped long after the kill");
}

// ---------------------------------------------------------------------------------------------
// Replies

#[test]
fn replies_past_max_reply_bytes_are_refused() {
    let _serial = serial();
    let rt = cpu_runtime();
    // Replies 64 KiB from its own memory 100 times, and returns the first status that is not 0.
    let body = r#"(local $i i32) (local $st i32)
        (block $done (loop $l
          (local.set $st (call $reply (i32.const 0) (i32.const 65536)))
          (br_if $done (local.get $st))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br_if $l (i32.lt_u (local.get $i) (i32.const 100)))))
        (local.get $st)"#;
    let prepared = rt.prepare(actor(body, "").as_bytes()).unwrap();
    let opts = InstanceOptions { limits: Limits { max_reply_bytes: MIB, ..Limits::default() }, ..Default::default() };
    let mut inst = rt.instantiate(&prepared, &opts).unwrap();
    let got = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let g = got.clone();
    let err = inst
        .message(
            b"x",
            None,
            Box::new(move |b| {
                g.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
                true
            }),
        )
        .unwrap_err();
    assert!(matches!(err, HostError::Handler { code: 14, .. }), "{err:?}");
    assert_eq!(got.load(std::sync::atomic::Ordering::Relaxed), MIB);
    // The instance is still usable: the next message gets its own allowance.
    let err = inst.message(b"x", None, Box::new(|_| true)).unwrap_err();
    assert!(matches!(err, HostError::Handler { code: 14, .. }), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// Neighbours

#[test]
fn a_neighbour_keeps_answering_while_a_guest_spins_and_floods() {
    let _serial = serial();
    let rt = Arc::new(cpu_runtime());
    // The hostile one: allocates buffers until refused, then spins until killed.
    let hostile = rt
        .prepare(
            actor(
                &format!(
                    "(block $full (loop $l (br_if $full (call $buffer_create (i64.const {}) (i32.const 0x100))) (br $l)))
                     (loop $spin (br $spin)) (i32.const 0)",
                    16 * MIB
                ),
                "",
            )
            .as_bytes(),
        )
        .unwrap();
    let echo = rt.prepare(actor("(call $reply (local.get $p) (local.get $n))", "").as_bytes()).unwrap();
    let opts = InstanceOptions { limits: limits(128 * MIB), ..Default::default() };
    let mut bad = rt.instantiate(&hostile, &opts).unwrap();
    let kill = bad.interrupt();
    let before = rss();
    let attacker = std::thread::spawn(move || bad.message(b"go", None, Box::new(|_| true)));
    let mut good = rt.instantiate(&echo, &InstanceOptions::default()).unwrap();
    let t0 = Instant::now();
    let mut answered = 0;
    let mut slowest = Duration::ZERO;
    while t0.elapsed() < Duration::from_millis(500) {
        let t = Instant::now();
        let out = Arc::new(std::sync::Mutex::new(Vec::new()));
        let o = out.clone();
        good.message(
            b"ping",
            None,
            Box::new(move |b| {
                o.lock().unwrap().extend_from_slice(b);
                true
            }),
        )
        .unwrap();
        assert_eq!(&*out.lock().unwrap(), b"ping");
        slowest = slowest.max(t.elapsed());
        answered += 1;
    }
    kill.kill();
    let err = attacker.join().unwrap().unwrap_err();
    assert!(matches!(err, HostError::Killed), "{err:?}");
    assert!(answered > 10, "the neighbour answered {answered} times in 0.5 s");
    assert!(slowest < Duration::from_millis(250), "the neighbour's slowest answer took {slowest:?}");
    let grown = rss().saturating_sub(before);
    assert!(grown < 128 * MIB, "the flood made the process grow by {grown} bytes");
}

// ---------------------------------------------------------------------------------------------
// Inference

#[test]
fn chat_render_cannot_amplify_one_string() {
    let _serial = serial();
    let test = "chat_render_cannot_amplify_one_string";
    let Some(rt) = model_runtime(test) else { return };
    // 4,096 records, each pointing at the same 8 MiB content, in a 12 MiB guest: 32 GiB asked.
    let mut body = String::from("(local $i i32)\n");
    body += &expect("(call $model_open (i32.const 0x10) (i32.const 7) (i32.const 0x20))", 0);
    body += "(loop $l
        (i32.store (i32.add (i32.const 0x10000) (i32.mul (local.get $i) (i32.const 16))) (i32.const 0x40))
        (i32.store (i32.add (i32.const 0x10004) (i32.mul (local.get $i) (i32.const 16))) (i32.const 4))
        (i32.store (i32.add (i32.const 0x10008) (i32.mul (local.get $i) (i32.const 16))) (i32.const 0x100000))
        (i32.store (i32.add (i32.const 0x1000c) (i32.mul (local.get $i) (i32.const 16))) (i32.const 0x800000))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br_if $l (i32.lt_u (local.get $i) (i32.const 4096))))\n";
    body += &expect(
        "(call $chat_render (i32.load (i32.const 0x20)) (i32.const 0x10000) (i32.const 4096) (i32.const 1) (i32.const 0x900000) (i32.const 0x1000) (i32.const 0x24))",
        5,
    );
    let data = r#"(data (i32.const 0x10) "smollm2") (data (i32.const 0x40) "user")"#;
    rt.models().get("smollm2").unwrap();
    let before = rss();
    let out = run_ok(&rt, &command(192, data, &body), Limits::default());
    let grown = rss().saturating_sub(before);
    assert!(grown < 64 * MIB, "rejecting the render made the process grow by {grown} bytes");
    assert!(out.stats.last_error.as_deref().unwrap_or("").contains("bytes of text"), "{:?}", out.stats.last_error);
}

#[test]
fn a_context_of_four_billion_positions_is_refused() {
    let _serial = serial();
    let test = "a_context_of_four_billion_positions_is_refused";
    let Some(rt) = model_runtime(test) else { return };
    let mut body = expect("(call $model_open (i32.const 0x10) (i32.const 7) (i32.const 0x20))", 0);
    body += &expect("(call $session_create (i32.load (i32.const 0x20)) (i32.const -1) (i32.const 0x24))", 14);
    // 8,192 positions of SmolLM2's cache (377 MB) do not fit a 64 MiB instance.
    body += &expect("(call $session_create (i32.load (i32.const 0x20)) (i32.const 8192) (i32.const 0x24))", 14);
    body += &expect("(call $session_create (i32.load (i32.const 0x20)) (i32.const 256) (i32.const 0x24))", 0);
    let data = r#"(data (i32.const 0x10) "smollm2")"#;
    let out = run_ok(&rt, &command(1, data, &body), limits(64 * MIB));
    assert!(out.stats.peak_charged_bytes <= 64 * MIB, "{:?}", out.stats);
}

#[test]
fn a_prompt_past_the_context_is_context_full_and_the_session_survives() {
    let _serial = serial();
    let test = "a_prompt_past_the_context_is_context_full_and_the_session_survives";
    let Some(rt) = model_runtime(test) else { return };
    let mut body = expect("(call $model_open (i32.const 0x10) (i32.const 7) (i32.const 0x20))", 0);
    body += &expect("(call $session_create (i32.load (i32.const 0x20)) (i32.const 64) (i32.const 0x24))", 0);
    body += &expect(
        "(call $session_eval (i32.load (i32.const 0x24)) (i32.const 0x1000) (i32.const 100) (i32.const 0) (i32.const 0))",
        13,
    );
    body += &expect(
        "(call $session_eval (i32.load (i32.const 0x24)) (i32.const 0x1000) (i32.const 10) (i32.const 0) (i32.const 0))",
        0,
    );
    let data = r#"(data (i32.const 0x10) "smollm2")"#;
    let out = run_ok(&rt, &command(1, data, &body), Limits::default());
    assert!(
        out.stats.last_error.as_deref().unwrap_or("").contains("context_length_exceeded"),
        "{:?}",
        out.stats.last_error
    );
}

#[test]
fn a_long_prompt_stops_at_the_deadline() {
    let _serial = serial();
    let test = "a_long_prompt_stops_at_the_deadline";
    let Some(rt) = model_runtime(test) else { return };
    // 4,000 prompt tokens: seconds of prefill on two cores.
    let mut body = expect("(call $model_open (i32.const 0x10) (i32.const 7) (i32.const 0x20))", 0);
    body += &expect("(call $session_create (i32.load (i32.const 0x20)) (i32.const 4096) (i32.const 0x24))", 0);
    body += &expect(
        "(call $session_eval (i32.load (i32.const 0x24)) (i32.const 0x1000) (i32.const 4000) (i32.const 0) (i32.const 0))",
        0,
    );
    let data = r#"(data (i32.const 0x10) "smollm2")"#;
    let lim = Limits { deadline: Some(Duration::from_millis(500)), ..Limits::default() };
    let t0 = Instant::now();
    let err = run(&rt, &command(1, data, &body), lim).unwrap_err();
    let took = t0.elapsed();
    assert!(matches!(err, HostError::Deadline), "{err:?}");
    assert!(took < Duration::from_secs(4), "the prompt stopped {took:?} after a 500 ms deadline");
}

// ---------------------------------------------------------------------------------------------
// wasi-nn

fn temp_model_files() -> usize {
    std::fs::read_dir(std::env::temp_dir())
        .map(|d| d.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().contains("wasi-nn")).count())
        .unwrap_or(0)
}

#[test]
fn a_model_from_bytes_is_private_and_never_written_to_a_file() {
    let _serial = serial();
    let rt = cpu_runtime();
    let names = rt.models().names();
    let files = temp_model_files();
    // A builder of 4 KiB of garbage: refused (runtime error), nothing written, nothing shared.
    let body = expect("(call $nn_load (i32.const 0x10) (i32.const 1) (i32.const 6) (i32.const 0) (i32.const 0x20))", 5);
    let data = r#"(data (i32.const 0x10) "\00\10\00\00\00\10\00\00") (data (i32.const 0x1000) "GGUF\03\00\00\00")"#;
    run_ok(&rt, &command(1, data, &body), Limits::default());
    assert_eq!(temp_model_files(), files, "a file appeared in the temporary directory");
    assert_eq!(rt.models().names(), names, "the guest's bytes reached the host's registry");
    // Bytes past the instance's limit are refused before they are copied.
    let body = expect("(call $nn_load (i32.const 0x10) (i32.const 1) (i32.const 6) (i32.const 0) (i32.const 0x20))", 7);
    let data = r#"(data (i32.const 0x10) "\00\00\00\00\00\00\f0\00")"#;
    run_ok(&rt, &command(256, data, &body), limits(20 * MIB));
}

#[test]
fn get_output_into_a_small_buffer_writes_the_size_it_needs() {
    let _serial = serial();
    let test = "get_output_into_a_small_buffer_writes_the_size_it_needs";
    let Some(rt) = model_runtime(test) else { return };
    let mut body = expect("(call $nn_load_by_name (i32.const 0x10) (i32.const 7) (i32.const 0x20))", 0);
    body += &expect("(call $nn_init (i32.load (i32.const 0x20)) (i32.const 0x24))", 0);
    // Output 1 (token counts as JSON) into one byte: too large, and its size is written.
    body += &expect(
        "(call $nn_get_output (i32.load (i32.const 0x24)) (i32.const 1) (i32.const 0x100) (i32.const 1) (i32.const 0x28))",
        7,
    );
    body += "(if (i32.lt_u (i32.load (i32.const 0x28)) (i32.const 20)) (then unreachable))";
    let data = r#"(data (i32.const 0x10) "default")"#;
    run_ok(&rt, &command(1, data, &body), Limits::default());
}
