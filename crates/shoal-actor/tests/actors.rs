//! Actors and snapshots: state (memory, globals not exported, sessions with their KV cache)
//! survives a snapshot written to disk and a restore into a fresh runtime; bad snapshots
//! are refused with a clear error; a guest that traps or loops stops alone; a kill stops a
//! handler that never returns.
//! The chat tests need the default model (`scripts/fetch-model.sh`; `make test` fetches it).

use std::sync::Arc;
use std::time::Duration;

use shoal_actor::{
    Actor, ActorConfig, ActorError, Event, LocalStore, SnapshotError, SnapshotStore, read_dir, write_dir,
};
use shoal_gpu::{BackendKind, Device};
use shoal_host::{InstanceOptions, Models, Runtime};

fn runtime(models: Models) -> Arc<Runtime> {
    let device = Arc::new(Device::open(BackendKind::Cpu).unwrap());
    Arc::new(Runtime::with_models(device, Arc::new(models)).unwrap())
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("shoal-actor-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A counter actor in WAT: a global that is *not* exported, and a byte in memory page 2,
/// both bumped by each message; it replies "<global> <byte>" as two decimal digits each.
const COUNTER: &str = r#"(module
  (import "shoal_v1" "reply" (func $reply (param i32 i32) (result i32)))
  (memory (export "memory") 3)
  (global $n (mut i32) (i32.const 40))
  (global $heap (mut i32) (i32.const 1024))
  (data (i32.const 131072) "\05")
  (func (export "shoal_actor_alloc") (param $len i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $len)))
    (local.get $p))
  (func $digits (param $at i32) (param $v i32)
    (i32.store8 (local.get $at) (i32.add (i32.const 48) (i32.div_u (local.get $v) (i32.const 10))))
    (i32.store8 (i32.add (local.get $at) (i32.const 1)) (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10)))))
  (func (export "shoal_actor_message") (param $p i32) (param $len i32) (result i32)
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (i32.store8 (i32.const 131072) (i32.add (i32.load8_u (i32.const 131072)) (i32.const 2)))
    (call $digits (i32.const 16) (global.get $n))
    (i32.store8 (i32.const 18) (i32.const 32))
    (call $digits (i32.const 19) (i32.load8_u (i32.const 131072)))
    (drop (call $reply (i32.const 16) (i32.const 5)))
    (i32.const 0)))"#;

fn ask(a: &Actor, msg: &str) -> String {
    String::from_utf8(a.ask(msg).unwrap()).unwrap()
}

#[test]
fn memory_and_unexported_globals_survive_a_snapshot_on_disk() {
    let rt = runtime(Models::new());
    let m = rt.prepare(COUNTER.as_bytes()).unwrap();
    let a = Actor::spawn(rt.clone(), m.clone(), InstanceOptions::default(), ActorConfig::default()).unwrap();
    assert_eq!(ask(&a, "x"), "41 07");
    assert_eq!(ask(&a, "x"), "42 09");
    let snap = a.snapshot().unwrap();
    // Page 0 (the reply), page 2 (the counter byte): page 1 is zero and not kept.
    assert_eq!(snap.state.pages, [0, 2]);
    let dir = tmp("counter");
    write_dir(&dir, &snap).unwrap();
    assert_eq!(ask(&a, "x"), "43 11", "the original goes on");
    drop(a);

    // A fresh runtime (another process, as far as the instance can tell).
    let rt2 = runtime(Models::new());
    let m2 = rt2.prepare(COUNTER.as_bytes()).unwrap();
    let back = read_dir(&dir).unwrap();
    let b = Actor::restore(rt2.clone(), m2.clone(), back, ActorConfig::default()).unwrap();
    assert_eq!(ask(&b, "x"), "43 11", "the restored actor continues where the snapshot was");
    assert_eq!(ask(&b, "x"), "44 13");

    // A second snapshot replaces the first only when complete; one generation remains.
    write_dir(&dir, &b.snapshot().unwrap()).unwrap();
    let gens: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("gen-"))
        .collect();
    assert_eq!(gens, ["gen-000002"]);
    let c = Actor::restore(rt2, m2, read_dir(&dir).unwrap(), ActorConfig::default()).unwrap();
    assert_eq!(ask(&c, "x"), "45 15");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_snapshots_are_refused_with_a_clear_error() {
    let rt = runtime(Models::new());
    let m = rt.prepare(COUNTER.as_bytes()).unwrap();
    let a = Actor::spawn(rt.clone(), m.clone(), InstanceOptions::default(), ActorConfig::default()).unwrap();
    ask(&a, "x");
    let dir = tmp("bad");
    let store = LocalStore::new(&dir);
    store.put("s", &a.snapshot().unwrap()).unwrap();
    assert_eq!(store.list().unwrap(), ["s"]);
    let gen_dir = dir.join("s/gen-000001");
    let restore_err = || match store.get("s") {
        Err(e) => e,
        Ok(_) => panic!("a damaged snapshot was read"),
    };

    // A flipped byte in the memory pages.
    let mem = gen_dir.join("memory.bin");
    let good = std::fs::read(&mem).unwrap();
    let mut bad = good.clone();
    bad[17] ^= 0x40;
    std::fs::write(&mem, &bad).unwrap();
    let e = restore_err();
    assert!(matches!(e, SnapshotError::Corrupt { .. }) && e.to_string().contains("CRC-32"), "{e}");
    // Truncated.
    std::fs::write(&mem, &good[..good.len() - 100]).unwrap();
    let e = restore_err();
    assert!(e.to_string().contains("truncated"), "{e}");
    std::fs::write(&mem, &good).unwrap();
    assert!(store.get("s").is_ok());

    // A flipped byte in the manifest (CURRENT holds its checksum).
    let man = gen_dir.join("manifest.json");
    let text = std::fs::read_to_string(&man).unwrap();
    std::fs::write(&man, text.replacen("\"pages\": 3", "\"pages\": 4", 1)).unwrap();
    assert!(matches!(restore_err(), SnapshotError::Corrupt { .. }));
    // Another format version, with a matching checksum: refused by version.
    let v2 = text.replacen("\"version\": 1", "\"version\": 2", 1);
    std::fs::write(&man, &v2).unwrap();
    let cur = std::fs::read_to_string(dir.join("s/CURRENT")).unwrap();
    let gen_name = cur.split_whitespace().next().unwrap();
    std::fs::write(dir.join("s/CURRENT"), format!("{gen_name} {:08x} {}\n", crc32(v2.as_bytes()), v2.len())).unwrap();
    let e = restore_err();
    assert!(matches!(e, SnapshotError::Version { found: 2, .. }), "{e}");
    // CURRENT itself garbled; and no snapshot at all.
    std::fs::write(dir.join("s/CURRENT"), "whatever").unwrap();
    assert!(matches!(restore_err(), SnapshotError::Corrupt { .. }));
    assert!(matches!(store.get("nothing"), Err(SnapshotError::NotFound { .. })));
    assert!(store.get("../etc").is_err());

    // A snapshot of another module.
    let snap = a.snapshot().unwrap();
    let other = rt.prepare(COUNTER.replace("(i32.const 40)", "(i32.const 50)").as_bytes()).unwrap();
    let e = Actor::restore(rt.clone(), other, snap, ActorConfig::default()).unwrap_err();
    assert!(matches!(e, ActorError::Snapshot(SnapshotError::OtherModule { .. })), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn crc32(b: &[u8]) -> u32 {
    // The same CRC-32 (IEEE) the snapshot uses, written out so the test does not trust it.
    let mut crc = !0u32;
    for &x in b {
        crc ^= u32::from(x);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn a_guest_that_traps_or_loops_stops_alone() {
    let rt = runtime(Models::new());
    let wat = r#"(module
      (memory (export "memory") 1)
      (func (export "shoal_actor_alloc") (param i32) (result i32) (i32.const 64))
      (func (export "shoal_actor_message") (param $p i32) (param $n i32) (result i32)
        (if (i32.eq (i32.load8_u (local.get $p)) (i32.const 108)) (then (loop $l (br $l))))
        (if (i32.eq (i32.load8_u (local.get $p)) (i32.const 116)) (then unreachable))
        (if (i32.eq (i32.load8_u (local.get $p)) (i32.const 101)) (then (return (i32.const 7))))
        (i32.const 0)))"#;
    let m = rt.prepare(wat.as_bytes()).unwrap();
    let cfg = ActorConfig { deadline: Some(Duration::from_millis(100)), ..Default::default() };
    let looping = Actor::spawn(rt.clone(), m.clone(), InstanceOptions::default(), cfg.clone()).unwrap();
    let trapping = Actor::spawn(rt.clone(), m.clone(), InstanceOptions::default(), cfg.clone()).unwrap();
    let fine = Actor::spawn(rt.clone(), m.clone(), InstanceOptions::default(), cfg).unwrap();
    let t0 = std::time::Instant::now();
    let e = looping.ask("loop").unwrap_err();
    assert!(e.to_string().contains("deadline"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(looping.status().state.starts_with("stopped"));
    assert!(looping.ask("ok").is_err(), "a stopped actor takes no more messages");
    let e = trapping.ask("trap").unwrap_err();
    assert!(e.to_string().contains("trapped"), "{e}");
    // An error code from the handler is reported, and the actor lives on.
    let e = fine.ask("error").unwrap_err();
    assert!(e.to_string().contains('7'), "{e}");
    assert!(fine.ask("ok").is_ok());
    assert_eq!(fine.status().messages, 2);
    // Not an actor.
    let e = rt.prepare(b"(module (memory (export \"memory\") 1))").unwrap_err();
    assert!(e.to_string().contains("shoal_actor_alloc"), "{e}");
    assert!(rt.prepare(b"\0asm garbage").is_err());
    // Two memories, or an imported one: a snapshot could not keep them.
    let two = wat.replace("(memory (export \"memory\") 1)", "(memory (export \"memory\") 1) (memory 1)");
    let e = rt.prepare(two.as_bytes()).unwrap_err();
    assert!(e.to_string().contains("exactly one memory"), "{e}");
    let imported = wat
        .replace("(memory (export \"memory\") 1)", "(import \"env\" \"m\" (memory 1)) (export \"memory\" (memory 0))");
    assert!(rt.prepare(imported.as_bytes()).is_err());
}

/// An actor whose handler never returns (and, when `init` is set, whose `_initialize` never
/// returns either).
fn spinning(init: bool) -> String {
    format!(
        r#"(module
      (memory (export "memory") 1)
      {}
      (func (export "shoal_actor_alloc") (param i32) (result i32) (i32.const 64))
      (func (export "shoal_actor_message") (param i32 i32) (result i32)
        (loop $l (br $l))
        (i32.const 0)))"#,
        if init { r#"(func (export "_initialize") (loop $l (br $l)))"# } else { "" }
    )
}

#[test]
fn killing_an_actor_stuck_in_its_handler_does_not_hang() {
    let rt = runtime(Models::new());
    let m = rt.prepare(spinning(false).as_bytes()).unwrap();
    // No deadline: only the kill can stop it.
    let a = Actor::spawn(rt.clone(), m.clone(), InstanceOptions::default(), ActorConfig::default()).unwrap();
    let rx = a.send(b"spin".to_vec()).unwrap();
    let queued = a.send(b"after".to_vec()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(a.status().state, "busy");
    let t0 = std::time::Instant::now();
    a.kill();
    assert!(t0.elapsed() < Duration::from_secs(2), "the kill took {:?}", t0.elapsed());
    let done = rx.into_iter().find_map(|e| match e {
        Event::Done(r) => Some(r),
        Event::Chunk(_) => None,
    });
    let e = done.expect("the message ends").unwrap_err();
    assert!(e.contains("killed"), "{e}");
    let later = queued.into_iter().find_map(|e| match e {
        Event::Done(r) => Some(r),
        Event::Chunk(_) => None,
    });
    assert!(later.is_none_or(|r| r.is_err()), "a message queued behind the kill is not handled");

    // Dropping a busy actor kills it too, rather than waiting for a handler that never ends.
    let b = Actor::spawn(rt.clone(), m, InstanceOptions::default(), ActorConfig::default()).unwrap();
    let _rx = b.send(b"spin".to_vec()).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let t0 = std::time::Instant::now();
    drop(b);
    assert!(t0.elapsed() < Duration::from_secs(2), "the drop took {:?}", t0.elapsed());
}

#[test]
fn a_spawn_whose_initialize_never_returns_fails_at_its_deadline() {
    let rt = runtime(Models::new());
    let m = rt.prepare(spinning(true).as_bytes()).unwrap();
    let cfg = ActorConfig { deadline: Some(Duration::from_millis(200)), ..Default::default() };
    let t0 = std::time::Instant::now();
    let e = Actor::spawn(rt.clone(), m.clone(), InstanceOptions::default(), cfg).unwrap_err();
    assert!(matches!(e, ActorError::InitDeadline(_)) && e.to_string().contains("_initialize"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    // Its own deadline for `_initialize` wins over the handlers'.
    let cfg = ActorConfig {
        deadline: Some(Duration::from_secs(3600)),
        init_deadline: Some(Duration::from_millis(100)),
        ..Default::default()
    };
    assert!(matches!(
        Actor::spawn(rt, m, InstanceOptions::default(), cfg),
        Err(ActorError::InitDeadline(d)) if d == Duration::from_millis(100)
    ));
}

fn chat_runtime(test: &str) -> Option<Arc<Runtime>> {
    model_runtime(test, "smollm2")
}

fn model_runtime(test: &str, name: &str) -> Option<Arc<Runtime>> {
    let path = shoal_host::default_model_path();
    let Some(path) = path else {
        eprintln!("{test}: skipping: no default model; run scripts/fetch-model.sh");
        return None;
    };
    let models = Models::new();
    models.add(name, &path);
    Some(runtime(models))
}

fn chat_opts() -> InstanceOptions {
    let args = ["--temperature", "0", "--max-tokens", "24"];
    InstanceOptions {
        args: args.iter().map(|s| s.to_string()).collect(),
        program_name: Some("chat_actor.wasm".into()),
        ..Default::default()
    }
}

#[test]
fn a_chat_actor_resumed_from_disk_answers_as_if_it_never_stopped() {
    let Some(rt) = chat_runtime("a_chat_actor_resumed_from_disk_answers_as_if_it_never_stopped") else { return };
    let m = rt.prepare(shoal_guests::CHAT_ACTOR).unwrap();
    let q = ["What is the capital of France?", "And of Germany?"];

    let straight = Actor::spawn(rt.clone(), m.clone(), chat_opts(), ActorConfig::default()).unwrap();
    let a1 = ask(&straight, q[0]);
    let a2 = ask(&straight, q[1]);
    assert!(a1.contains("Paris"), "{a1}");
    assert!(a2.contains("Berlin"), "{a2}");

    let first = Actor::spawn(rt.clone(), m.clone(), chat_opts(), ActorConfig::default()).unwrap();
    assert_eq!(ask(&first, q[0]), a1);
    let snap = first.snapshot().unwrap();
    assert_eq!(snap.state.infer.sessions.len(), 1);
    assert!(snap.kv_positions() > 20, "the KV cache is in the snapshot");
    let dir = tmp("chat");
    write_dir(&dir, &snap).unwrap();
    first.stop();

    // Another runtime, models loaded again by name.
    let rt2 = chat_runtime("").unwrap();
    let m2 = rt2.prepare(shoal_guests::CHAT_ACTOR).unwrap();
    let resumed = Actor::restore(rt2.clone(), m2.clone(), read_dir(&dir).unwrap(), ActorConfig::default()).unwrap();
    assert_eq!(ask(&resumed, q[1]), a2, "greedy output identical to the actor that never stopped");

    // Weights other than those the snapshot was taken with are refused.
    let other = Models::new();
    let synth = tmp("other-weights");
    std::fs::create_dir_all(&synth).unwrap();
    let f = synth.join("m.gguf");
    std::fs::write(&f, b"not the same weights").unwrap();
    other.add("smollm2", &f);
    let rt3 = runtime(other);
    let m3 = rt3.prepare(shoal_guests::CHAT_ACTOR).unwrap();
    let e = Actor::restore(rt3, m3, read_dir(&dir).unwrap(), ActorConfig::default()).unwrap_err();
    assert!(e.to_string().contains("smollm2"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&synth);
}

#[test]
fn a_wasi_nn_context_and_its_kv_cache_travel_with_the_actor() {
    let test = "a_wasi_nn_context_and_its_kv_cache_travel_with_the_actor";
    let Some(rt) = model_runtime(test, "default") else { return };
    let m = rt.prepare(shoal_guests::NNCHAT_ACTOR).unwrap();
    let opts = InstanceOptions {
        args: ["--temperature", "0", "--n-predict", "24", "--stats"].iter().map(|s| s.to_string()).collect(),
        program_name: Some("nnchat_actor.wasm".into()),
        ..Default::default()
    };
    let q = ["What is the capital of France?", "And of Germany?"];
    // Each reply: the answer, then output 1 (token counts) as a JSON line.
    let split = |r: String| {
        let (answer, meta) = r.trim_end().rsplit_once('\n').unwrap();
        (answer.to_string(), serde_json::from_str::<serde_json::Value>(meta).unwrap())
    };
    let straight = Actor::spawn(rt.clone(), m.clone(), opts.clone(), ActorConfig::default()).unwrap();
    let (a1, _) = split(ask(&straight, q[0]));
    let (a2, _) = split(ask(&straight, q[1]));
    assert!(a1.contains("Paris") && a2.contains("Berlin"), "{a1} / {a2}");

    let first = Actor::spawn(rt.clone(), m.clone(), opts, ActorConfig::default()).unwrap();
    assert_eq!(split(ask(&first, q[0])).0, a1);
    let snap = first.snapshot().unwrap();
    assert_eq!(snap.state.nn.contexts.len(), 1);
    assert!(snap.state.nn.contexts[0].cache.is_some(), "the context's KV cache is in the snapshot");
    let dir = tmp("nnchat");
    write_dir(&dir, &snap).unwrap();
    first.stop();

    let rt2 = model_runtime(test, "default").unwrap();
    let m2 = rt2.prepare(shoal_guests::NNCHAT_ACTOR).unwrap();
    let resumed = Actor::restore(rt2, m2, read_dir(&dir).unwrap(), ActorConfig::default()).unwrap();
    let (b2, meta) = split(ask(&resumed, q[1]));
    assert_eq!(b2, a2, "the same answer as the actor that never stopped");
    let reused = meta["reused_tokens"].as_u64().unwrap();
    assert!(reused > 20, "the resumed context reuses its cached prefix: {meta}");
    let _ = std::fs::remove_dir_all(&dir);
}
