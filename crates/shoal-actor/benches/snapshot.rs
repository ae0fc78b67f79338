//! Snapshot and restore of a chat actor against re-prefilling its conversation, at several
//! conversation lengths; the resume time of an idle actor with 16 MiB of memory; and the
//! disk's own write and read bandwidth for the same sizes (the bound they run against).
//!
//! `cargo bench -p shoal-actor --bench snapshot -- [--model PATH] [--backend cpu|cuda]
//!  [--tokens 24,512,4096] [--repeat 5] [--dir DIR]`
//!
//! One JSON line per length (medians of `--repeat`, after one warm-up), then one for the
//! idle actor. Times: `capture` (the instance and its KV caches copied out: from the GPU on
//! CUDA), `write` (files written and fsynced, the directory switched), `read` (files read and
//! checked), `restore` (instantiate, memory and globals, caches imported: to the GPU on
//! CUDA), `reprefill` (the same tokens evaluated from nothing: what a resume without the KV
//! cache costs). `restore_speedup` is re-prefill over read + restore (from disk: the page
//! cache, as right after a write); `restore_from_memory_speedup` is re-prefill over restore
//! (a portable snapshot held in memory). `park`/`unpark` are what `shoal serve` does to pause
//! and resume an actor: the snapshot keeps device caches in the backend's own form (CUDA:
//! pinned host memory in the pool's layout), restored by DMA alone; `unpark_speedup` is
//! re-prefill over unpark. `park_write` writes the parked snapshot (device caches converted
//! as they stream to the file, as `shoal serve` and `shoal chat --save` do);
//! `snapshot_parked_MBps` is the snapshot's bytes over park + park_write.

use std::sync::Arc;
use std::time::Instant;

use shoal_actor::{Actor, ActorConfig, read_dir, write_dir};
use shoal_gpu::{BackendKind, Device};
use shoal_host::{InstanceOptions, Models, Runtime};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Writes `bytes` bytes to a file and fsyncs it, then reads it back: the disk's bandwidth
/// for this size (MB/s write, MB/s read from the page cache).
fn disk(dir: &std::path::Path, bytes: usize) -> (f64, f64) {
    use std::io::Write;
    let p = dir.join("disk-probe.bin");
    let data = vec![0x5au8; bytes];
    let t = Instant::now();
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    let w = bytes as f64 / t.elapsed().as_secs_f64() / 1e6;
    let t = Instant::now();
    let back = std::fs::read(&p).unwrap();
    let r = back.len() as f64 / t.elapsed().as_secs_f64() / 1e6;
    let _ = std::fs::remove_file(&p);
    (w, r)
}

fn main() {
    // `RUST_LOG=debug` shows where each capture and restore spends its time.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let mut model = shoal_host::default_model_path().map(|p| p.display().to_string());
    let (mut backend, mut repeat) = (BackendKind::Cpu, 5usize);
    let mut lengths = vec![24usize, 512, 4096];
    let mut dir = std::env::temp_dir().join(format!("shoal-snapshot-bench-{}", std::process::id()));
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(a) = args.next() {
        let mut v = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--model" => model = Some(v()),
            "--backend" => backend = v().parse().unwrap_or_else(|e| panic!("--backend: {e}")),
            "--tokens" => lengths = v().split(',').map(|x| x.parse().expect("--tokens N,N")).collect(),
            "--repeat" => repeat = v().parse::<usize>().expect("--repeat N").max(1),
            "--dir" => dir = v().into(),
            _ => panic!("unknown argument {a}"),
        }
    }
    let Some(model) = model else {
        eprintln!("snapshot bench: no model (scripts/fetch-model.sh, or --model PATH); nothing to measure");
        return;
    };
    let device = Arc::new(Device::open(backend).unwrap_or_else(|e| panic!("{e}")));
    let engine = shoal_host::engine_for(&device);
    let models = Arc::new(Models::with_engine(engine));
    models.add("m", std::path::Path::new(&model));
    let loaded = models.get("m").unwrap();
    let rt = Arc::new(Runtime::with_models(device, models).unwrap());
    let module = rt.prepare(shoal_guests::CHAT_ACTOR).unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    let words = ["the", "quiet", "river", "runs", "past", "old", "stone", "mills", "and", "green", "fields"];

    for &want in &lengths {
        // A conversation of about `want` tokens: one user turn, padded, and a one-token answer.
        let filler = |n: usize| (0..n).map(|i| words[i % words.len()]).collect::<Vec<_>>().join(" ");
        let per_word = loaded.tokenizer.encode(&filler(110), false).len() as f64 / 110.0;
        let template_tokens = 30;
        let n = ((want.saturating_sub(template_tokens)) as f64 / per_word).floor().max(1.0) as usize;
        let text = filler(n);
        let context = (want + 64).next_multiple_of(16).to_string();
        let opts = InstanceOptions {
            args: ["--model", "m", "--temperature", "0", "--max-tokens", "1", "--context", &context]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            program_name: Some("chat_actor.wasm".into()),
            ..Default::default()
        };
        let actor = Actor::spawn(rt.clone(), module.clone(), opts, ActorConfig::default()).unwrap();
        actor.ask(text.clone()).unwrap();
        let (mut cap, mut wr, mut rd, mut rs, mut pre) = (vec![], vec![], vec![], vec![], vec![]);
        let (mut pk, mut upk, mut pw) = (vec![], vec![], vec![]);
        let (mut bytes, mut kv_bytes, mut positions) = (0u64, 0u64, 0usize);
        let gen_dir = dir.join(format!("len-{want}"));
        for r in 0..=repeat {
            let t = Instant::now();
            let snap = actor.snapshot().unwrap();
            let c = ms(t);
            let t = Instant::now();
            let rep = write_dir(&gen_dir, &snap).unwrap();
            let w = ms(t);
            let t = Instant::now();
            let back = read_dir(&gen_dir).unwrap();
            let rd_ms = ms(t);
            let t = Instant::now();
            let restored = back.restore(&rt, &module).unwrap();
            let rs_ms = ms(t);
            drop(restored);
            // Parked (a paused actor in `shoal serve`): the backend's own form, restored here.
            let t = Instant::now();
            let parked = actor.park().unwrap();
            let pk_ms = ms(t);
            let t = Instant::now();
            let back = parked.restore(&rt, &module).unwrap();
            let upk_ms = ms(t);
            drop(back);
            // Written from the parked form (what `shoal serve` and `shoal chat --save` do):
            // device caches converted to the portable form as they stream to the file.
            let t = Instant::now();
            write_dir(&gen_dir, &parked).unwrap();
            let pw_ms = ms(t);
            drop(parked);
            // Re-prefill: the session's tokens evaluated from an empty cache.
            let tokens = &snap.state.infer.sessions[0].history;
            let mut cache = loaded.llama.new_cache(tokens.len() + 16).unwrap();
            let t = Instant::now();
            loaded.llama.forward(tokens, &mut cache).unwrap();
            let p = ms(t);
            if r > 0 {
                cap.push(c);
                wr.push(w);
                rd.push(rd_ms);
                rs.push(rs_ms);
                pre.push(p);
                pk.push(pk_ms);
                upk.push(upk_ms);
                pw.push(pw_ms);
            }
            (bytes, kv_bytes, positions) = (rep.bytes, rep.kv_bytes, snap.kv_positions());
        }
        let (disk_w, disk_r) = disk(&dir, bytes as usize);
        let (c, w, r, s, p) = (median(cap), median(wr), median(rd), median(rs), median(pre));
        let (pk, upk, pw) = (median(pk), median(upk), median(pw));
        println!(
            "{{\"bench\":\"snapshot\",\"backend\":\"{}\",\"tokens\":{positions},\"bytes\":{bytes},\"kv_bytes\":{kv_bytes},\"capture_ms\":{c:.3},\"write_ms\":{w:.3},\"read_ms\":{r:.3},\"restore_ms\":{s:.3},\"reprefill_ms\":{p:.3},\"restore_speedup\":{:.1},\"restore_from_memory_speedup\":{:.1},\"park_ms\":{pk:.3},\"unpark_ms\":{upk:.3},\"unpark_speedup\":{:.1},\"park_write_ms\":{pw:.3},\"snapshot_MBps\":{:.0},\"snapshot_parked_MBps\":{:.0},\"resume_MBps\":{:.0},\"disk_write_fsync_MBps\":{disk_w:.0},\"disk_read_MBps\":{disk_r:.0}}}",
            engine.name(),
            p / (r + s),
            p / s,
            p / upk,
            bytes as f64 / (c + w) * 1e-3,
            bytes as f64 / (pk + pw) * 1e-3,
            bytes as f64 / (r + s) * 1e-3,
        );
        actor.stop();
    }

    // An idle actor with 16 MiB of memory, all of it non-zero: pause (snapshot in memory),
    // resume (restore from it).
    let wat = r#"(module
      (memory (export "memory") 256)
      (func (export "shoal_actor_alloc") (param i32) (result i32) (i32.const 64))
      (func (export "shoal_actor_message") (param i32 i32) (result i32)
        (memory.fill (i32.const 0) (i32.const 7) (i32.const 16777216))
        (i32.const 0)))"#;
    let m = rt.prepare(wat.as_bytes()).unwrap();
    let a = Actor::spawn(rt.clone(), m.clone(), InstanceOptions::default(), ActorConfig::default()).unwrap();
    a.ask("fill").unwrap();
    let snap = a.snapshot().unwrap();
    let (mut take, mut back) = (vec![], vec![]);
    for r in 0..=repeat * 4 {
        let t = Instant::now();
        let s = a.snapshot().unwrap();
        let t1 = ms(t);
        let t = Instant::now();
        let b = Actor::restore(rt.clone(), m.clone(), s, ActorConfig::default()).unwrap();
        let t2 = ms(t);
        b.stop();
        if r > 0 {
            take.push(t1);
            back.push(t2);
        }
    }
    // Where a resume's time goes: a fresh instance of the module (its memory made and
    // committed, untouched), the restore alone (no actor thread), and the machine's own cost
    // of first-touching and filling 16 MiB (a fresh allocation, copied into).
    let (mut inst, mut direct, mut fresh) = (vec![], vec![], vec![]);
    for r in 0..=repeat * 4 {
        let t = Instant::now();
        let i = rt.instantiate(&m, &InstanceOptions::default()).unwrap();
        let t1 = ms(t);
        drop(i);
        let t = Instant::now();
        let i = rt.restore(&m, &snap.state).unwrap();
        let t2 = ms(t);
        drop(i);
        let t = Instant::now();
        let mut v = Vec::<u8>::with_capacity(snap.state.page_data.len());
        v.extend_from_slice(&snap.state.page_data);
        let t3 = ms(t);
        std::hint::black_box(&v);
        drop(v);
        if r > 0 {
            inst.push(t1);
            direct.push(t2);
            fresh.push(t3);
        }
    }
    println!(
        "{{\"bench\":\"idle-actor\",\"memory_bytes\":{},\"pause_ms\":{:.3},\"resume_ms\":{:.3},\"instantiate_ms\":{:.3},\"restore_ms\":{:.3},\"fresh_copy_ms\":{:.3}}}",
        snap.memory_bytes(),
        median(take),
        median(back),
        median(inst),
        median(direct),
        median(fresh)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
