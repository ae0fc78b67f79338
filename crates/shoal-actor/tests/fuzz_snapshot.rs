//! The snapshot reader, fuzzed on stable Rust: a small valid snapshot (a WAT actor's memory
//! and globals, plus a session and a wasi-nn context with tiny KV caches, no model needed) is
//! mutated case after case (numbers made huge or negative, keys dropped, values retyped,
//! strings lengthened; files truncated, flipped, resized or replaced, the checksums fixed up
//! so that most mutations reach the parser behind them), and `read_dir` must return, without
//! a panic, either a snapshot or an error of at most 1 KiB without control characters, while
//! no single allocation exceeds twice the snapshot's bytes on disk plus 16 MiB (a counting
//! global allocator watches the reading thread). KV files are fuzzed the same way through
//! `KvSnapshot::from_safetensors`.
//!
//! Mutations are drawn with `arbitrary` from a seeded generator, so a failure names its case
//! and is reproduced by the same seed. The number of cases is bounded: 1,000 snapshots and
//! 2,000 KV files by default (the file runs in about 6 s in release on 2 cores);
//! `SHOAL_FUZZ_CASES=N` runs N and 2N, `SHOAL_FUZZ_SEED=S` draws other cases (default 0):
//!
//! ```text
//! SHOAL_FUZZ_CASES=100000 SHOAL_FUZZ_SEED=7 cargo test --release -p shoal-actor --test fuzz_snapshot
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arbitrary::Unstructured;
use serde_json::{Value, json};
use shoal_actor::{Actor, ActorConfig, ModelRef, SnapshotError, read_dir, write_dir};
use shoal_engine::kv::{KvImage, KvSnapshot};
use shoal_gpu::{BackendKind, Device};
use shoal_host::{ContextState, GraphState, InstanceOptions, Models, Runtime, SessionState};

// ---- a global allocator that records the largest allocation of the thread that asks ----

struct Counting;

thread_local! {
    static WATCHING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: the allocator may run while a thread's locals are being torn down.
    if WATCHING.try_with(Cell::get).unwrap_or(false) {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    }
}

// SAFETY: every call is passed on to the system allocator unchanged; the bookkeeping only
// reads and writes thread-local cells (const-initialised, without destructors, so touching
// them never allocates).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract for `alloc` is passed on as it is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (every allocation goes there).
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as for `dealloc`; the caller's contract for `realloc` is passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result and the largest single allocation it made on this thread.
fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(0));
    WATCHING.with(|w| w.set(true));
    let r = f();
    WATCHING.with(|w| w.set(false));
    (r, LARGEST.with(Cell::get))
}

const MIB: usize = 1 << 20;

// ---- the valid snapshot every case starts from ----

/// A counter actor in WAT (as in `tests/actors.rs`): an unexported global and a byte on page 2.
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
  (func (export "shoal_actor_message") (param $p i32) (param $len i32) (result i32)
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (i32.store8 (i32.const 131072) (i32.add (i32.load8_u (i32.const 131072)) (i32.const 2)))
    (drop (call $reply (i32.const 131072) (i32.const 1)))
    (i32.const 0)))"#;

fn tiny_kv(len: usize, seed: f32) -> KvSnapshot {
    let (n_layers, kv_dim) = (2, 4);
    let n = n_layers * len * kv_dim;
    KvSnapshot {
        n_layers,
        kv_dim,
        len,
        k: (0..n).map(|i| seed + i as f32).collect(),
        v: (0..n).map(|i| -seed - i as f32).collect(),
    }
}

/// The files of a valid snapshot, by path relative to its directory: an actor's memory pages
/// and globals, with a session and a wasi-nn context (tiny KV caches) added to its state;
/// no model is loaded (reading a snapshot needs none).
fn base_snapshot() -> BTreeMap<PathBuf, Vec<u8>> {
    static BASE: std::sync::OnceLock<BTreeMap<PathBuf, Vec<u8>>> = std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        let device = Arc::new(Device::open(BackendKind::Cpu).unwrap());
        let rt = Arc::new(Runtime::with_models(device, Arc::new(Models::new())).unwrap());
        let m = rt.prepare(COUNTER.as_bytes()).unwrap();
        let a = Actor::spawn(rt, m, InstanceOptions::default(), ActorConfig::default()).unwrap();
        a.ask("x").unwrap();
        let mut snap = a.snapshot().unwrap();
        a.stop();
        let s = &mut snap.state;
        assert!(!s.pages.is_empty() && !s.globals.is_empty());
        snap.models.push(ModelRef { name: "m".into(), fingerprint: "0123456789abcdef".into() });
        s.infer.opened.push((1, "m".into()));
        s.infer.next = 3;
        s.infer.sessions.push(SessionState {
            handle: 2,
            model: "m".into(),
            context: 32,
            history: vec![1, 2, 3, 4, 5],
            step: 2,
            kv: KvImage::Portable(tiny_kv(5, 1.0)),
        });
        s.nn.next = 3;
        s.nn.graphs.push(GraphState { handle: 1, model: "m".into(), options: json!({"ctx-size": 16}) });
        s.nn.contexts.push(ContextState {
            handle: 2,
            model: "m".into(),
            options: json!({"ctx-size": 16, "reverse-prompt": "User:", "stop": [1, 2]}),
            prompt: Some(b"hi".to_vec()),
            output: b"hello".to_vec(),
            counts: [1, 2, 0],
            cache: Some((16, vec![7, 8, 9], KvImage::Portable(tiny_kv(3, 2.0)))),
        });
        let dir = tmp("base");
        write_dir(&dir, &snap).unwrap();
        let back = read_dir(&dir).expect("the base snapshot reads back");
        assert_eq!(back.state.pages, snap.state.pages);
        assert_eq!(back.state.infer.sessions[0].history, [1, 2, 3, 4, 5]);
        assert_eq!(back.state.nn.contexts[0].output, b"hello");
        let files = files_of(&dir);
        assert!(files.contains_key(Path::new("gen-000001/manifest.json")));
        let _ = std::fs::remove_dir_all(&dir);
        files
    })
    .clone()
}

fn files_of(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shoal-fuzz-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

// ---- one case: files (a path may be made a directory), then the checks ----

#[derive(Clone)]
enum Entry {
    File(Vec<u8>),
    Dir,
}

struct Case {
    files: BTreeMap<PathBuf, Entry>,
}

impl Case {
    fn new() -> Case {
        Case { files: base_snapshot().into_iter().map(|(p, b)| (p, Entry::File(b))).collect() }
    }

    /// The generation every case starts from (the base snapshot's, its first).
    fn gen_dir(&self) -> PathBuf {
        PathBuf::from("gen-000001")
    }

    fn manifest_path(&self) -> PathBuf {
        self.gen_dir().join("manifest.json")
    }

    fn bytes(&self, p: &Path) -> Option<Vec<u8>> {
        match self.files.get(p) {
            Some(Entry::File(b)) => Some(b.clone()),
            _ => None,
        }
    }

    /// The manifest, while it is still JSON.
    fn manifest(&self) -> Option<Value> {
        serde_json::from_slice(&self.bytes(&self.manifest_path())?).ok()
    }

    /// Writes `text` as the manifest; with `fix`, CURRENT names its checksum and length.
    fn set_manifest_bytes(&mut self, text: Vec<u8>, fix: bool) {
        let gen_dir = self.gen_dir();
        if fix {
            let current = format!("{} {:08x} {}\n", gen_dir.display(), crc32fast::hash(&text), text.len());
            self.files.insert("CURRENT".into(), Entry::File(current.into_bytes()));
        }
        self.files.insert(gen_dir.join("manifest.json"), Entry::File(text));
    }

    fn set_manifest(&mut self, v: &Value, pretty: bool, fix: bool) {
        let text = if pretty { serde_json::to_vec_pretty(v) } else { serde_json::to_vec(v) }.unwrap();
        self.set_manifest_bytes(text, fix);
    }

    /// The snapshot's files other than the manifest and CURRENT.
    fn data_files(&self) -> Vec<PathBuf> {
        self.files.keys().filter(|p| p.extension().is_some_and(|e| e == "bin" || e == "safetensors")).cloned().collect()
    }

    /// Makes the manifest's entry for `file` list its new length and CRC-32 (so that the
    /// mutation reaches the parser behind the checksum).
    fn fix_file_ref(&mut self, file: &Path) {
        let Some(bytes) = self.bytes(file) else { return };
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let Some(mut m) = self.manifest() else { return };
        fn visit(v: &mut Value, name: &str, bytes: &[u8]) {
            match v {
                Value::Object(o) => {
                    if o.get("name").and_then(Value::as_str) == Some(name) && o.contains_key("crc32") {
                        o.insert("bytes".into(), json!(bytes.len()));
                        o.insert("crc32".into(), json!(crc32fast::hash(bytes)));
                    }
                    o.values_mut().for_each(|x| visit(x, name, bytes));
                }
                Value::Array(a) => a.iter_mut().for_each(|x| visit(x, name, bytes)),
                _ => {}
            }
        }
        visit(&mut m, &name, &bytes);
        self.set_manifest(&m, true, true);
    }

    fn write(&self, dir: &Path) -> u64 {
        let _ = std::fs::remove_dir_all(dir);
        let mut total = 0;
        for (p, e) in &self.files {
            let path = dir.join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            match e {
                Entry::File(b) => {
                    std::fs::write(&path, b).unwrap();
                    total += b.len() as u64;
                }
                Entry::Dir => std::fs::create_dir_all(&path).unwrap(),
            }
        }
        total
    }
}

/// Reads the snapshot in `dir` (`disk` bytes on disk) and checks what the reader promises;
/// returns whether it was read.
fn check_read(dir: &Path, disk: u64, what: &str) -> Result<bool, String> {
    let (r, largest) = largest_allocation(|| std::panic::catch_unwind(|| read_dir(dir)));
    let limit = 2 * disk as usize + 16 * MIB;
    let r = r.map_err(|_| format!("{what}: read_dir panicked"))?;
    if largest > limit {
        return Err(format!("{what}: an allocation of {largest} bytes for a snapshot of {disk} bytes (limit {limit})"));
    }
    match r {
        Ok(s) => {
            if s.state.page_data.len() != s.state.pages.len() * 65536 {
                return Err(format!(
                    "{what}: read, with {} pages of {} bytes",
                    s.state.pages.len(),
                    s.state.page_data.len()
                ));
            }
            Ok(true)
        }
        Err(e) => check_message(&e.to_string()).map(|()| false).map_err(|m| format!("{what}: {m}")),
    }
}

fn check_message(msg: &str) -> Result<(), String> {
    if msg.len() > 1024 {
        return Err(format!("an error of {} bytes: {}…", msg.len(), msg.chars().take(300).collect::<String>()));
    }
    if msg.chars().any(|c| c.is_control() || ('\u{202a}'..='\u{202e}').contains(&c)) {
        return Err(format!("an error with control characters: {msg:?}"));
    }
    Ok(())
}

// ---- the mutations ----

/// A replacement value: huge, negative, fractional, retyped, long, hostile.
fn weird(u: &mut Unstructured) -> arbitrary::Result<Value> {
    Ok(match u.int_in_range(0..=27u8)? {
        0 => json!(u64::MAX),
        1 => json!(1u64 << 30),
        2 => json!(1u64 << 32),
        3 => json!(u32::MAX),
        4 => json!(65_536),
        5 => json!(65_537),
        6 => json!((1u64 << 20) + 1),
        7 => json!(-1),
        8 => json!(i64::MIN),
        9 => json!(1e300),
        10 => json!(0.5),
        11 => json!(0),
        12 => json!(u.arbitrary::<u64>()?),
        13 => json!(u.arbitrary::<i32>()?),
        14 => json!(u.arbitrary::<String>()?),
        15 => json!("A".repeat(u.int_in_range(65..=100_000)?)),
        16 => json!("\u{1}\u{1b}[2J\u{7f}\u{202e}evil\n\r\t\u{0}"),
        17 => json!("é☃𝄞".repeat(u.int_in_range(1..=64)?)),
        18 => json!("../../etc/passwd"),
        19 => json!("zz"),
        20 => Value::Null,
        21 => json!(u.arbitrary::<bool>()?),
        22 => json!([]),
        23 => json!({}),
        24 => json!([[0, u32::MAX], [u32::MAX, 1]]),
        25 => json!([u.arbitrary::<u32>()?, u.arbitrary::<u32>()?]),
        26 => Value::Array(vec![json!(0); u.int_in_range(65_537..=70_000)?]),
        _ => {
            // Nested deeper than the JSON parser's recursion limit.
            let mut v = json!(1);
            for _ in 0..u.int_in_range(100..=300)? {
                v = json!([v]);
            }
            v
        }
    })
}

#[derive(Clone, Debug)]
enum Step {
    Key(String),
    Index(usize),
}

fn paths(v: &Value, at: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(at.clone());
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                at.push(Step::Key(k.clone()));
                paths(x, at, out);
                at.pop();
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                at.push(Step::Index(i));
                paths(x, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

fn node<'a>(v: &'a mut Value, path: &[Step]) -> &'a mut Value {
    path.iter().fold(v, |v, s| match s {
        Step::Key(k) => &mut v[k.as_str()],
        Step::Index(i) => &mut v[*i],
    })
}

/// One structural mutation of a JSON value (a manifest, a safetensors header): returns what
/// it did.
fn mutate_json(u: &mut Unstructured, v: &mut Value) -> arbitrary::Result<String> {
    let mut all = Vec::new();
    paths(v, &mut Vec::new(), &mut all);
    let path = u.choose(&all)?.clone();
    let (parent, last) = match path.split_last() {
        Some((last, parent)) => (parent.to_vec(), Some(last.clone())),
        None => (Vec::new(), None),
    };
    let what = format!("{path:?}");
    Ok(match u.int_in_range(0..=6u8)? {
        0..=2 => {
            let w = weird(u)?;
            let shown: String = w.to_string().chars().take(60).collect();
            *node(v, &path) = w;
            format!("{what} = {shown}")
        }
        3 => match (node(v, &parent), last) {
            (Value::Object(o), Some(Step::Key(k))) => {
                o.remove(&k);
                format!("{what} removed")
            }
            (Value::Array(a), Some(Step::Index(i))) => {
                a.remove(i);
                format!("{what} removed")
            }
            _ => "nothing".into(),
        },
        4 => match node(v, &path) {
            Value::Number(n) => {
                let x = n.as_u64().unwrap_or(0);
                let new = match u.int_in_range(0..=3u8)? {
                    0 => json!(x.wrapping_add(1)),
                    1 => json!(x.wrapping_sub(1)),
                    2 => json!(x.wrapping_mul(65_536)),
                    _ => json!(x as i64 - 1 - (1i64 << 40)),
                };
                *node(v, &path) = new;
                format!("{what} nudged")
            }
            Value::String(s) => {
                let times = u.int_in_range(2..=2000)?;
                let chars = s.chars().count().saturating_mul(times).min(200_000);
                *s = s.chars().cycle().take(chars).collect();
                format!("{what} lengthened")
            }
            Value::Array(a) if !a.is_empty() => {
                let first = a[0].clone();
                let times = u.int_in_range(1..=100)?.min(200_000 / (first.to_string().len() + 1));
                a.extend(std::iter::repeat_n(first, times));
                format!("{what} repeated")
            }
            _ => "nothing".into(),
        },
        5 => match node(v, &path) {
            Value::Object(o) => {
                let key = u.choose(&["format", "version", "name", "bytes", "crc32", "extra", "k", "v"])?;
                o.insert((*key).into(), weird(u)?);
                format!("{what}.{key} added")
            }
            _ => "nothing".into(),
        },
        _ => match node(v, &path) {
            Value::Array(a) if a.len() >= 2 => {
                let i = u.choose_index(a.len())?;
                let j = u.choose_index(a.len())?;
                a.swap(i, j);
                format!("{what} swapped")
            }
            _ => "nothing".into(),
        },
    })
}

/// Raw bytes changed: flipped, truncated, grown, emptied.
fn mutate_bytes(u: &mut Unstructured, b: &mut Vec<u8>) -> arbitrary::Result<String> {
    Ok(match u.int_in_range(0..=4u8)? {
        0 if !b.is_empty() => {
            let i = u.choose_index(b.len())?;
            b[i] ^= 1 << u.int_in_range(0..=7)?;
            format!("bit flipped at {i}")
        }
        1 => {
            let n = u.int_in_range(0..=b.len())?;
            b.truncate(n);
            format!("truncated to {n}")
        }
        2 => {
            let n = u.int_in_range(1..=4096)?;
            let fill = u.arbitrary::<u8>()?;
            b.extend(std::iter::repeat_n(fill, n));
            format!("{n} bytes added")
        }
        3 if b.len() >= 8 => {
            let i = u.choose_index(b.len() - 7)?;
            b[i..i + 8].copy_from_slice(&u.arbitrary::<u64>()?.to_le_bytes());
            format!("8 bytes replaced at {i}")
        }
        _ => {
            b.clear();
            "emptied".into()
        }
    })
}

/// A safetensors file's header JSON mutated (its length prefix rewritten to match); its
/// bytes instead when the header is no longer whole JSON.
fn mutate_safetensors_header(u: &mut Unstructured, b: &mut Vec<u8>) -> arbitrary::Result<String> {
    let n = b.get(..8).map_or(usize::MAX, |p| u64::from_le_bytes(p.try_into().unwrap()) as usize);
    let header = b.get(8..8usize.saturating_add(n)).and_then(|h| serde_json::from_slice::<Value>(h).ok());
    let Some(mut header) = header else { return mutate_bytes(u, b) };
    let what = mutate_json(u, &mut header)?;
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&b[8 + n..]);
    *b = out;
    Ok(format!("header: {what}"))
}

/// One case's mutations (one to three), described.
fn mutate_case(u: &mut Unstructured, case: &mut Case) -> arbitrary::Result<Vec<String>> {
    let mut done = Vec::new();
    for _ in 0..u.int_in_range(1..=3u8)? {
        let fix = u.ratio(7u8, 8u8)?;
        match u.int_in_range(0..=9u8)? {
            0..=4 => {
                let Some(mut m) = case.manifest() else { continue };
                let what = mutate_json(u, &mut m)?;
                case.set_manifest(&m, u.arbitrary()?, fix);
                done.push(format!("manifest {what} (checksum fixed: {fix})"));
            }
            5 => {
                let mut b = case.bytes(&case.manifest_path()).unwrap();
                let what = mutate_bytes(u, &mut b)?;
                case.set_manifest_bytes(b, fix);
                done.push(format!("manifest bytes {what}"));
            }
            6 | 7 => {
                let files = case.data_files();
                let file = u.choose(&files)?.clone();
                let Some(mut b) = case.bytes(&file) else { continue };
                let what = if file.extension().is_some_and(|e| e == "safetensors") && u.arbitrary()? {
                    mutate_safetensors_header(u, &mut b)?
                } else {
                    mutate_bytes(u, &mut b)?
                };
                case.files.insert(file.clone(), Entry::File(b));
                if fix {
                    case.fix_file_ref(&file);
                }
                done.push(format!("{} {what} (entry fixed: {fix})", file.display()));
            }
            8 => {
                let files = case.data_files();
                let file = u.choose(&files)?.clone();
                case.files.insert(file.clone(), Entry::Dir);
                done.push(format!("{} made a directory", file.display()));
            }
            _ => {
                let text: Vec<u8> = match u.int_in_range(0..=4u8)? {
                    0 => u.arbitrary::<Vec<u8>>()?,
                    1 => b"gen-000001 zzzz 12\n".to_vec(),
                    2 => format!("gen-000001 00000000 {}\n", u.arbitrary::<u64>()?).into_bytes(),
                    3 => "gen-\u{1b}[2J 0 0\n".as_bytes().to_vec(),
                    _ => vec![b'g'; 1 << 20],
                };
                let shown = String::from_utf8_lossy(&text).chars().take(40).collect::<String>();
                case.files.insert("CURRENT".into(), Entry::File(text));
                done.push(format!("CURRENT = {shown:?}"));
            }
        }
    }
    Ok(done)
}

/// A seeded generator of the bytes `arbitrary` draws from (splitmix64).
fn draw(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out
}

fn cases() -> usize {
    std::env::var("SHOAL_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(1000)
}

fn seed() -> u64 {
    std::env::var("SHOAL_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0)
}

// ---- the tests ----

#[test]
fn mutated_snapshots_are_read_or_refused_cleanly() {
    let dir = tmp("cases");
    let (n, seed) = (cases(), seed());
    let mut outcomes = [0usize; 2];
    for i in 0..n {
        let case_seed = seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
        let bytes = draw(case_seed, 512);
        let mut u = Unstructured::new(&bytes);
        let mut case = Case::new();
        let what = mutate_case(&mut u, &mut case).unwrap_or_default().join("; ");
        let disk = case.write(&dir);
        match check_read(&dir, disk, &what) {
            Ok(read) => outcomes[usize::from(read)] += 1,
            Err(e) => panic!("case {i} (SHOAL_FUZZ_SEED={seed}): {e}"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("{n} mutated snapshots: {} refused, {} read", outcomes[0], outcomes[1]);
    assert!(outcomes[0] > n / 2, "most mutations are refused");
}

#[test]
fn mutated_kv_files_are_read_or_refused_cleanly() {
    let good = tiny_kv(5, 1.0);
    let bytes = good.to_safetensors();
    assert_eq!(KvSnapshot::from_safetensors("kv.safetensors", bytes.clone()).unwrap(), good);
    let (n, seed) = (2 * cases(), seed());
    let mut read = 0;
    for i in 0..n {
        let case_seed = seed.wrapping_mul(1_000_003).wrapping_add(i as u64) ^ 0x6b76;
        let draws = draw(case_seed, 256);
        let mut u = Unstructured::new(&draws);
        let mut b = bytes.clone();
        let mut what = Vec::new();
        for _ in 0..u.int_in_range(1..=3u8).unwrap_or(1) {
            let r = if u.arbitrary().unwrap_or(false) {
                mutate_safetensors_header(&mut u, &mut b)
            } else {
                mutate_bytes(&mut u, &mut b)
            };
            match r {
                Ok(w) => what.push(w),
                Err(_) => break,
            }
        }
        let len = b.len();
        let (r, largest) =
            largest_allocation(|| std::panic::catch_unwind(move || KvSnapshot::from_safetensors("kv.safetensors", b)));
        let what = what.join("; ");
        let Ok(r) = r else { panic!("KV case {i} (SHOAL_FUZZ_SEED={seed}), {what}: a panic") };
        let limit = 2 * len + 16 * MIB;
        assert!(largest <= limit, "KV case {i} ({what}): an allocation of {largest} bytes for a file of {len}");
        match r {
            Ok(kv) => {
                read += 1;
                let want = kv.n_layers * kv.len * kv.kv_dim;
                assert!(kv.k.len() == want && kv.v.len() == want, "KV case {i} ({what}): {kv:?}");
            }
            Err(e) => {
                if let Err(m) = check_message(&e.to_string()) {
                    panic!("KV case {i} ({what}): {m}");
                }
            }
        }
    }
    eprintln!("{n} mutated KV files: {} refused, {read} read", n - read);
}

/// The attack: a manifest over tiny real files that declares a 1 GiB page file, 65,536 pages
/// and more, a session of 2^30 tokens, a 1 GiB KV cache; or a CURRENT naming a 1 GiB manifest.
/// Each is refused before anything near its declared size is allocated.
#[test]
fn a_crafted_manifest_does_not_allocate_before_it_is_refused() {
    const GIB: u64 = 1 << 30;
    type Craft = fn(&mut Value);
    let crafts: Vec<(&str, Craft)> = vec![
        ("a 1 GiB page file", |m| {
            m["memory"]["pages"] = json!(16_384);
            m["memory"]["nonzero"] = json!([[0, 16_384]]);
            m["memory"]["file"]["bytes"] = json!(GIB);
        }),
        ("65,536 pages all listed", |m| {
            m["memory"]["pages"] = json!(65_536);
            m["memory"]["nonzero"] = json!([[0, 65_536]]);
        }),
        ("2^32 - 1 pages in one run", |m| {
            m["memory"]["pages"] = json!(u32::MAX);
            // The page file's real length: the list of 2^32 page numbers (16 GiB) was once
            // made before the count was compared with it.
            m["memory"]["nonzero"] = json!([[0, u32::MAX]]);
        }),
        ("a memory of 2^40 pages", |m| m["memory"]["pages"] = json!(1u64 << 40)),
        ("runs out of order", |m| m["memory"]["nonzero"] = json!([[2, 1], [0, 1]])),
        ("a session of 2^30 tokens", |m| {
            let s = &mut m["infer"]["sessions"][0];
            s["context"] = json!(GIB);
            s["len"] = json!(GIB);
        }),
        ("a history longer than its context", |m| {
            let s = &mut m["infer"]["sessions"][0];
            s["context"] = json!(4);
        }),
        ("a history of 2^20 + 1 tokens", |m| {
            m["infer"]["sessions"][0]["history"] = Value::Array(vec![json!(0); (1 << 20) + 1]);
        }),
        ("a 1 GiB KV cache", |m| m["infer"]["sessions"][0]["kv"]["bytes"] = json!(GIB)),
        ("a wasi-nn context of 2^40 positions", |m| {
            m["nn"]["contexts"][0]["cache"]["context"] = json!(1u64 << 40);
        }),
        ("options with 70,000 entries", |m| {
            m["nn"]["graphs"][0]["options"] = json!({ "stop": vec![0; 70_000] });
        }),
        // Four bytes, the second not on a character's boundary (it once panicked).
        ("a hex prompt that is not hex", |m| m["nn"]["contexts"][0]["prompt"] = json!("1éx")),
        ("a file name that leaves the snapshot", |m| m["memory"]["file"]["name"] = json!("../../x")),
        ("a file name with terminal escapes", |m| {
            m["memory"]["file"]["name"] = json!(format!("\u{1b}[2J{}", "x".repeat(10_000)));
        }),
        ("a model name with terminal escapes", |m| m["models"][0]["name"] = json!("\u{1b}[31mevil")),
        ("a global of another type", |m| m["globals"][0]["type"] = json!("\u{202e}i33")),
        ("a version past u32", |m| m["version"] = json!((1u64 << 32) + 1)),
    ];
    let dir = tmp("crafted");
    for (what, craft) in crafts {
        let mut case = Case::new();
        let mut m = case.manifest().unwrap();
        craft(&mut m);
        case.set_manifest(&m, false, true);
        let disk = case.write(&dir);
        let (r, largest) = largest_allocation(|| read_dir(&dir));
        let Err(e) = r else { panic!("{what}: read") };
        let msg = e.to_string();
        check_message(&msg).unwrap_or_else(|m| panic!("{what}: {m}"));
        assert!(matches!(e, SnapshotError::Corrupt { .. } | SnapshotError::Version { .. }), "{what}: {msg}");
        // The largest honest allocation: the manifest itself (2 MiB with the long history),
        // its tokens (4 MiB); memory.bin is 128 KiB.
        assert!(largest < 8 * MIB && (largest as u64) < 2 * disk + 16 * MIB as u64, "{what}: {largest} bytes");
        eprintln!("{what}: refused, largest allocation {largest} bytes: {msg}");
    }

    // CURRENT naming a 1 GiB manifest (over the real, small one), and a 1 MiB CURRENT.
    for current in [format!("gen-000001 00000000 {GIB}\n"), "g".repeat(1 << 20)] {
        let mut case = Case::new();
        case.files.insert("CURRENT".into(), Entry::File(current.into_bytes()));
        case.write(&dir);
        let (r, largest) = largest_allocation(|| read_dir(&dir));
        let e = r.expect_err("refused");
        check_message(&e.to_string()).unwrap();
        assert!(largest < MIB, "{e}: {largest} bytes");
    }

    // A KV file whose header claims 1 GiB, then one whose shape claims 2^60 values.
    let mut case = Case::new();
    let kv = case.gen_dir().join("kv-session-2.safetensors");
    let mut b = case.bytes(&kv).unwrap();
    b[..8].copy_from_slice(&GIB.to_le_bytes());
    case.files.insert(kv.clone(), Entry::File(b));
    case.fix_file_ref(&kv);
    case.write(&dir);
    let (r, largest) = largest_allocation(|| read_dir(&dir));
    let e = r.expect_err("refused");
    assert!(e.to_string().contains("header claims"), "{e}");
    assert!(largest < MIB, "{e}: {largest} bytes");
    let mut huge = tiny_kv(1, 0.0).to_safetensors();
    let text = String::from_utf8_lossy(&huge[8..]).into_owned();
    let n = u64::from_le_bytes(huge[..8].try_into().unwrap()) as usize;
    let header = text[..n].replace("[2, 1, 4]", "[1073741824, 1073741824, 1]");
    huge = [(header.len() as u64).to_le_bytes().as_slice(), header.as_bytes(), &huge[8 + n..]].concat();
    let (r, largest) = largest_allocation(|| KvSnapshot::from_safetensors("kv", huge));
    assert!(r.is_err() && largest < MIB, "{r:?}: {largest} bytes");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A named pipe where a file of the snapshot should be: refused at once (opening it to
/// read would wait for a writer forever).
#[test]
fn a_pipe_in_place_of_a_file_is_refused_without_blocking() {
    let case = Case::new();
    let dir = tmp("pipe");
    case.write(&dir);
    let mem = dir.join(case.gen_dir()).join("memory.bin");
    std::fs::remove_file(&mem).unwrap();
    let c = std::ffi::CString::new(mem.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that lives across the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let (tx, rx) = std::sync::mpsc::channel();
    let d = dir.clone();
    std::thread::spawn(move || tx.send(read_dir(&d).map(|_| ()).map_err(|e| e.to_string())));
    let r = rx.recv_timeout(std::time::Duration::from_secs(20)).expect("read_dir returns");
    let e = r.expect_err("refused");
    assert!(e.contains("not a regular file"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
