//! Fuzzing the model-file parsers on stable Rust (cargo fuzz needs nightly), and what it
//! costs to refuse a crafted file.
//!
//! Each case is a few KiB of random bytes read through `arbitrary::Unstructured`, as a
//! cargo-fuzz target reads its input: random bytes as they are, or small valid GGUF and
//! safetensors files built here from those bytes and then mutated (bits flipped, counts,
//! lengths and types set to huge or odd values, cuts, splices, insertions), given to
//! `GgufFile::from_bytes` and `SafetensorsFile::from_bytes`. A case passes when the parser
//! returns (no panic) and its error, if any, is at most 1,024 bytes with no control
//! character; a file that parses has every tensor and key read back under the same rule.
//!
//! Environment:
//! - `SHOAL_FUZZ_CASES=N` runs N cases per target instead of 400,000 (the default takes
//!   about 10 s in all in release on two cores; ten million, a few minutes);
//! - `SHOAL_FUZZ_SEED=S` starts from another seed (the default is fixed, so runs repeat).
//!
//! A failing case names its seed and number and is written to the temporary directory.
//!
//! This test binary counts allocations per thread (a `#[global_allocator]` over `System`),
//! so that the memory tests can assert what refusing a crafted file costs: the peak of
//! bytes live above where the parse started, and the largest single allocation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fmt::Display;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

use arbitrary::Unstructured;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shoal_engine::gguf::{GgufError, GgufFile};
use shoal_engine::safetensors::{SafetensorsError, SafetensorsFile};

// ---------------------------------------------------------------------------------------
// Counting allocations.

/// `System`, counting this thread's allocations while [`measure`] runs.
struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    /// Bytes allocated minus bytes freed since counting started (frees of older blocks
    /// make it negative).
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// Records `delta` live bytes and an allocation of `size` bytes (0 for a free).
fn record(delta: isize, size: usize) {
    // `try_with`: a thread being torn down may still free memory.
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let live = LIVE.with(|l| {
                l.set(l.get() + delta);
                l.get()
            });
            PEAK.with(|p| p.set(p.get().max(live)));
            LARGEST.with(|l| l.set(l.get().max(size)));
        }
    });
}

// SAFETY: every call goes to `System` unchanged, which upholds `GlobalAlloc`'s contract;
// the counting only touches const-initialized thread-local cells, which neither allocate
// nor unwind.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract, which is `System.alloc`'s.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            record(layout.size() as isize, layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            record(layout.size() as isize, layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller passes a block this allocator (that is, `System`) gave out,
        // with its layout.
        unsafe { System.dealloc(ptr, layout) };
        record(-(layout.size() as isize), 0);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`, and the caller's `new_size` is valid for `layout`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            record(new_size as isize - layout.size() as isize, new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What running a closure allocated on this thread.
#[derive(Debug)]
struct Cost {
    /// The most bytes live at once above where it started.
    peak: usize,
    /// The largest single allocation (or growth target of a reallocation).
    largest: usize,
}

/// Runs `f` with this thread's allocations counted.
fn measure<T>(f: impl FnOnce() -> T) -> (T, Cost) {
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    LARGEST.with(|l| l.set(0));
    COUNTING.with(|c| c.set(true));
    let out = f();
    COUNTING.with(|c| c.set(false));
    let cost = Cost { peak: PEAK.with(Cell::get).max(0) as usize, largest: LARGEST.with(Cell::get) };
    (out, cost)
}

// ---------------------------------------------------------------------------------------
// The driver.

/// Cases per target: `SHOAL_FUZZ_CASES`, or 400,000.
fn cases() -> u64 {
    std::env::var("SHOAL_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(400_000)
}

/// The first seed: `SHOAL_FUZZ_SEED`, or a fixed one.
fn seed() -> u64 {
    std::env::var("SHOAL_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5EED_5140)
}

/// The longest input of a case, in bytes.
const MAX_INPUT: usize = 4096;

/// What a run of [`drive`] saw.
#[derive(Debug)]
struct Seen {
    /// The share of cases that parsed.
    parsed: f64,
    /// Error messages with file text escaped in them (`\u{1b}`, `\x80`).
    escaped: u64,
    /// Error messages with file text cut in them (`…(N bytes)`).
    cut: u64,
}

thread_local! {
    /// Counts of [`check_message`] on this thread: escaped, cut.
    static MESSAGES: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// Runs `target` on `n` inputs of random bytes. `target` builds the file from its input,
/// so that a failing case is reproduced by its input alone, and says whether it parsed; a
/// panic names the case and writes its input to the temporary directory.
fn drive(name: &str, n: u64, target: impl Fn(&[u8]) -> bool) -> Seen {
    let seed = seed();
    MESSAGES.with(|m| m.set((0, 0)));
    let mut input = Vec::with_capacity(MAX_INPUT);
    let start = std::time::Instant::now();
    let mut parsed = 0;
    for case in 0..n {
        let mut rng = StdRng::seed_from_u64(seed ^ case.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let len = rng.random_range(0..=MAX_INPUT);
        input.resize(len, 0);
        rng.fill(&mut input[..]);
        match catch_unwind(AssertUnwindSafe(|| target(&input))) {
            Ok(ok) => parsed += u64::from(ok),
            Err(panic) => {
                let path = std::env::temp_dir().join(format!("shoal-fuzz-{name}-{seed}-{case}.bin"));
                let _ = std::fs::write(&path, &input);
                eprintln!("{name}: case {case} of seed {seed} failed; its input is in {}", path.display());
                resume_unwind(panic);
            }
        }
    }
    let (escaped, cut) = MESSAGES.with(Cell::get);
    let seen = Seen { parsed: parsed as f64 / n.max(1) as f64, escaped, cut };
    println!("{name}: {n} cases in {:.2?}: {seen:?}", start.elapsed());
    seen
}

/// An error message as the parsers must write them: short, and printable. Counts those
/// that show file text escaped or cut (see [`Seen`]).
fn check_message(err: &dyn Display) {
    let msg = err.to_string();
    assert!(msg.len() <= 1024, "an error of {} bytes: {}…", msg.len(), msg.chars().take(300).collect::<String>());
    assert!(!msg.chars().any(char::is_control), "a control character in the error: {msg:?}");
    let escaped = msg.contains("\\u{") || msg.contains("\\x");
    let cut = msg.contains(" bytes)`") || msg.contains(" bytes)\"");
    MESSAGES.with(|m| {
        let (e, c) = m.get();
        m.set((e + u64::from(escaped), c + u64::from(cut)));
    });
}

/// Infallible reads from the input (an exhausted input reads as zeros).
struct Src<'a>(Unstructured<'a>);

impl Src<'_> {
    fn int(&mut self, lo: u64, hi: u64) -> u64 {
        self.0.int_in_range(lo..=hi).unwrap_or(lo)
    }

    fn index(&mut self, len: usize) -> usize {
        if len == 0 { 0 } else { self.int(0, len as u64 - 1) as usize }
    }

    fn pick<T: Clone>(&mut self, from: &[T]) -> T {
        from[self.index(from.len())].clone()
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.int(0, one_in - 1) == 0
    }

    fn byte(&mut self) -> u8 {
        self.int(0, 255) as u8
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

/// Values that break counts, lengths and offsets.
fn odd_u64(src: &mut Src, len: usize) -> u64 {
    let len = len as u64;
    let any = src.int(0, u64::MAX);
    src.pick(&[
        0,
        1,
        2,
        3,
        8,
        13,
        24,
        31,
        32,
        255,
        1 << 16,
        1 << 20,
        64 << 20,
        1 << 31,
        1 << 32,
        1 << 40,
        1 << 62,
        i64::MAX as u64,
        u64::MAX,
        u64::MAX - 7,
        u64::MAX - 31,
        len,
        len.saturating_sub(8),
        len + 1,
        len * 2,
        any,
    ])
}

/// Byte-level mutations, `fields` being offsets of known u64 fields (counts, lengths)
/// and `types` of known u32 fields (types, dimension counts).
fn mutate(src: &mut Src, bytes: &mut Vec<u8>, fields: &[usize], types: &[usize]) {
    for _ in 0..src.int(1, 4) {
        let len = bytes.len();
        let at = src.index(len);
        match src.int(0, 10) {
            0 if len > 0 => bytes[at] ^= 1 << src.int(0, 7),
            1 if len > 0 => {
                let any = src.byte();
                bytes[at] = src.pick(&[0, 1, 0x7F, 0x80, 0xFF, 0x1B, b'"', b'\\', any]);
            }
            2 if !fields.is_empty() => {
                let at = src.pick(fields);
                let v = odd_u64(src, len);
                if at + 8 <= len {
                    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
                }
            }
            3 if !types.is_empty() => {
                let at = src.pick(types);
                let any = src.int(0, 40) as u32;
                let v: u32 = src.pick(&[0, 1, 2, 4, 5, 7, 8, 9, 10, 12, 13, 30, 99, u32::MAX, any]);
                if at + 4 <= len {
                    bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
                }
            }
            4 if len >= 8 => {
                let at = src.index(len - 7);
                let v = odd_u64(src, len);
                bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            5 => bytes.truncate(at),
            6 if len > 0 => {
                // Splice: a piece of the file copied over another place.
                let from = src.index(len);
                let n = src.index(len - from) + 1;
                let piece = bytes[from..from + n].to_vec();
                let to = src.index(len);
                let end = (to + n).min(len);
                bytes[to..end].copy_from_slice(&piece[..end - to]);
            }
            7 if len > 0 => {
                // Splice: a piece of the file inserted elsewhere.
                let from = src.index(len);
                let n = src.index((len - from).min(256)) + 1;
                let piece = bytes[from..from + n].to_vec();
                let to = src.index(len + 1);
                bytes.splice(to..to, piece);
            }
            8 => {
                let n = src.int(1, 16) as usize;
                let piece = src.bytes(n);
                let to = src.index(len + 1);
                bytes.splice(to..to, piece);
            }
            9 if len > 0 => {
                let n = (src.index(len - at) + 1).min(64);
                bytes.drain(at..at + n);
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------
// GGUF files built from the input.

/// A GGUF writer that remembers where its counts, lengths and types are.
#[derive(Default)]
struct Gguf {
    out: Vec<u8>,
    u64s: Vec<usize>,
    u32s: Vec<usize>,
}

impl Gguf {
    fn u32(&mut self, v: u32) {
        self.u32s.push(self.out.len());
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.u64s.push(self.out.len());
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    fn str(&mut self, s: &[u8]) {
        self.u64(s.len() as u64);
        self.out.extend_from_slice(s);
    }

    /// A value of wire type `ty` (arrays hold `depth` more levels at most).
    fn value(&mut self, src: &mut Src, ty: u32, depth: u32) {
        match ty {
            0 | 1 | 7 => self.out.push(if ty == 7 { src.int(0, 1) as u8 } else { src.byte() }),
            2 | 3 => self.out.extend_from_slice(&src.bytes(2)),
            4..=6 => self.out.extend_from_slice(&src.bytes(4)),
            8 => {
                let any = src.bytes(12);
                let long = [b"\x1b[2J".as_slice(), &[b'x'; 300]].concat();
                let s = src.pick(&[b"llama".to_vec(), b"hello".to_vec(), vec![0x1B, b'[', b'2', b'J'], any, long]);
                self.str(&s);
            }
            9 => {
                let elem = if depth == 0 { src.pick(&[0, 4, 6, 8]) } else { src.pick(&[0, 4, 6, 8, 9]) };
                self.u32(elem);
                let n = src.int(0, 6);
                self.u64(n);
                for _ in 0..n {
                    self.value(src, elem, depth.saturating_sub(1));
                }
            }
            _ => self.out.extend_from_slice(&src.bytes(8)),
        }
    }
}

/// A small valid GGUF file chosen by the input (key/values of every type, tensors of
/// several types, sometimes another alignment), with the offsets of its fields.
fn gguf_seed(src: &mut Src) -> Gguf {
    let mut g = Gguf::default();
    let alignment = if src.chance(4) { src.pick(&[1u64, 8, 64]) } else { 32 };
    // (name, dims, type, bytes)
    let mut tensors = Vec::new();
    for i in 0..src.int(0, 4) {
        let (ty, dims, size): (u32, Vec<u64>, u64) = match src.int(0, 4) {
            0 => (0, vec![4, 2], 32),
            1 => (1, vec![3], 6),
            2 => (8, vec![32, 2], 68),
            3 => (2, vec![32], 18),
            _ => (99, vec![7], 0),
        };
        tensors.push((format!("blk.{i}.w"), dims, ty, size));
    }
    let mut kvs: Vec<(Vec<u8>, u32)> = vec![(b"general.architecture".to_vec(), 8)];
    for i in 0..src.int(0, 5) {
        kvs.push((format!("t.k{i}").into_bytes(), src.pick(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])));
    }
    if alignment != 32 {
        kvs.push((b"general.alignment".to_vec(), 4));
    }
    g.out.extend_from_slice(b"GGUF");
    g.u32(src.pick(&[3, 3, 2]));
    g.u64(tensors.len() as u64);
    g.u64(kvs.len() as u64);
    for (key, ty) in &kvs {
        g.str(key);
        g.u32(*ty);
        if key == b"general.alignment" {
            g.out.extend_from_slice(&(alignment as u32).to_le_bytes());
        } else {
            g.value(src, *ty, 2);
        }
    }
    let mut offset = 0;
    for (name, dims, ty, size) in &tensors {
        g.str(name.as_bytes());
        g.u32(dims.len() as u32);
        for &d in dims {
            g.u64(d);
        }
        g.u32(*ty);
        g.u64(offset);
        offset = (offset + size).next_multiple_of(alignment);
    }
    for (_, _, _, size) in &tensors {
        g.out.resize(g.out.len().next_multiple_of(alignment as usize), 0);
        let data = src.bytes(*size as usize);
        g.out.extend_from_slice(&data);
    }
    g
}

/// Parses a GGUF file; if it parses, reads every tensor and key back. True if it parsed.
fn gguf_target(bytes: Vec<u8>) -> bool {
    match GgufFile::from_bytes(bytes) {
        Err(e) => {
            check_message(&e);
            false
        }
        Ok(file) => {
            for t in &file.tensors {
                if let Err(e) = file.tensor_bytes(t) {
                    check_message(&e);
                }
                if let Err(e) = file.tensor_f32(&t.name) {
                    check_message(&e);
                }
            }
            for key in file.metadata.keys() {
                for e in
                    [file.get_u64(key).err(), file.get_f32(key).err(), file.get_str(key).err()].into_iter().flatten()
                {
                    check_message(&e);
                }
            }
            if let Err(e) = file.architecture() {
                check_message(&e);
            }
            let _ = format!("{file:?}");
            true
        }
    }
}

#[test]
fn fuzz_gguf_mutated_files() {
    let seen = drive("gguf", cases(), |input| {
        let mut src = Src(Unstructured::new(input));
        let mut g = gguf_seed(&mut src);
        mutate(&mut src, &mut g.out, &g.u64s, &g.u32s);
        gguf_target(g.out)
    });
    // Mutations must leave some files whole, or only the first checks are reached; and the
    // files' text must reach some errors, or the messages are not tested.
    assert!(seen.parsed > 0.05 && seen.escaped > 0 && seen.cut > 0, "{seen:?}");
}

/// The files mutated are valid to begin with.
#[test]
fn gguf_seeds_parse() {
    let seen = drive("gguf seeds", cases() / 20, |input| {
        let g = gguf_seed(&mut Src(Unstructured::new(input)));
        gguf_target(g.out)
    });
    assert_eq!(seen.parsed, 1.0);
}

// ---------------------------------------------------------------------------------------
// Safetensors files built from the input.

/// A JSON string for a name chosen by the input: plain, escaped, binary-looking or long.
fn json_name(src: &mut Src, i: usize) -> String {
    match src.int(0, 7) {
        0 => format!("\"bin{}\"", src.bytes(6).iter().map(|b| format!("\\u{b:04x}")).collect::<String>()),
        6 => format!("\"raw{}\"", String::from_utf8_lossy(&src.bytes(6))),
        1 => "\"a\\u001b[31mred\\n\\\"q\\\"\"".to_string(),
        2 => format!("\"{}\"", "x".repeat(src.int(60, 3000) as usize)),
        3 => "\"\\ud83d\\ude00\\u0000\"".to_string(),
        4 => format!("\"__metadata__{i}\""),
        _ => format!("\"model.layers.{i}.weight\""),
    }
}

/// A small safetensors file chosen by the input, as header text and data; the header is
/// mutated as text first (the caller mutates the bytes after).
fn safetensors_seed(src: &mut Src) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut offset = 0u64;
    for i in 0..src.int(0, 4) as usize {
        let (dtype, size) = src.pick(&[("F32", 4u64), ("F16", 2), ("BF16", 2), ("I64", 8), ("U8", 1), ("Q9", 1)]);
        let shape: Vec<u64> = (0..src.int(0, 3)).map(|_| src.int(0, 4)).collect();
        let n = shape.iter().product::<u64>() * size;
        let (begin, end) = if src.chance(8) { (src.int(0, 64), src.int(0, 64)) } else { (offset, offset + n) };
        offset += n;
        let shape = shape.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
        entries.push(format!(
            "{}:{{\"dtype\":\"{dtype}\",\"shape\":[{shape}],\"data_offsets\":[{begin},{end}]}}",
            json_name(src, i)
        ));
    }
    if src.chance(3) {
        let key = json_name(src, 9);
        entries.push(format!("\"__metadata__\":{{\"format\":\"pt\",{key}:\"v\"}}"));
    }
    if src.chance(8) {
        // Deep nesting and long arrays in a field nobody reads.
        let n = src.int(1, 200) as usize;
        entries.push(format!(
            "\"x\":{{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4],\"junk\":{}{}}}",
            "[".repeat(n),
            "]".repeat(n)
        ));
    }
    let mut header = format!("{{{}}}", entries.join(","));
    // Text mutations: JSON punctuation and huge numbers.
    for _ in 0..src.int(0, 3) {
        let at = src.index(header.len() + 1);
        if !header.is_char_boundary(at) {
            continue;
        }
        let piece =
            src.pick(&["{", "}", "[", "]", ",", ":", "\"", "\\", "0", "-1", "1e99", "18446744073709551616", " "]);
        header.insert_str(at, piece);
    }
    let padding = src.int(0, 8) as usize;
    let mut out = ((header.len() + padding) as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend(std::iter::repeat_n(b' ', padding));
    let data = src.bytes(offset as usize);
    out.extend_from_slice(&data);
    out
}

/// Parses a safetensors file; if it parses, reads every tensor back. True if it parsed.
fn safetensors_target(bytes: Vec<u8>) -> bool {
    match SafetensorsFile::from_bytes("fuzz.safetensors", bytes) {
        Err(e) => {
            check_message(&e);
            false
        }
        Ok(file) => {
            for name in file.tensors().keys() {
                for e in [file.tensor_bytes(name).err(), file.tensor_f32(name).err()].into_iter().flatten() {
                    check_message(&e);
                }
            }
            if let Err(e) = file.tensor_f32("missing") {
                check_message(&e);
            }
            let _ = format!("{file:?}");
            true
        }
    }
}

#[test]
fn fuzz_safetensors_mutated_files() {
    let seen = drive("safetensors", cases(), |input| {
        let mut src = Src(Unstructured::new(input));
        let mut bytes = safetensors_seed(&mut src);
        if src.chance(2) {
            mutate(&mut src, &mut bytes, &[0], &[]);
        }
        safetensors_target(bytes)
    });
    assert!(seen.parsed > 0.05 && seen.escaped > 0 && seen.cut > 0, "{seen:?}");
}

#[test]
fn fuzz_random_bytes() {
    drive("random", cases(), |input| {
        // The first byte picks a prefix that gets past the magic or the length check.
        let (first, rest) = match input.split_first() {
            Some((&first, rest)) => (first, rest),
            None => (0, input),
        };
        let mut gguf = Vec::new();
        let mut st = Vec::new();
        match first % 4 {
            0 => {}
            1 => gguf.extend_from_slice(b"GGUF\x03\x00\x00\x00"),
            2 => {
                gguf.extend_from_slice(b"GGUF\x03\x00\x00\x00");
                gguf.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
            }
            _ => {
                st.extend_from_slice(&(rest.len() as u64 / 2).to_le_bytes());
                st.push(b'{');
            }
        }
        gguf.extend_from_slice(rest);
        st.extend_from_slice(rest);
        gguf_target(gguf) | safetensors_target(st)
    });
}

// ---------------------------------------------------------------------------------------
// What refusing a crafted file costs.

/// The most a refusal may allocate, at once or in all (the brief allowed 64 MiB; the
/// parsers need a few KiB).
const REFUSAL_LIMIT: usize = 1 << 20;

/// A GGUF file with the given key/value bytes after the header.
fn gguf_with(tensor_count: u64, kv_count: u64, body: &[u8]) -> Vec<u8> {
    let mut out = b"GGUF\x03\x00\x00\x00".to_vec();
    out.extend_from_slice(&tensor_count.to_le_bytes());
    out.extend_from_slice(&kv_count.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// A key followed by its value type.
fn key(name: &str, ty: u32) -> Vec<u8> {
    let mut out = (name.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&ty.to_le_bytes());
    out
}

/// An array header: element type and count.
fn array(elem: u32, count: u64) -> Vec<u8> {
    [elem.to_le_bytes().as_slice(), &count.to_le_bytes()].concat()
}

fn assert_refused_cheaply<E: Display>(what: &str, parse: impl FnOnce() -> Result<(), E>) {
    let (result, cost) = measure(parse);
    let err = result.err().unwrap_or_else(|| panic!("{what}: parsed"));
    println!("{what}: refused with {cost:?}: {err}");
    check_message(&err);
    assert!(cost.peak < REFUSAL_LIMIT && cost.largest < REFUSAL_LIMIT, "{what}: {cost:?}");
}

#[test]
fn refusing_crafted_gguf_files_costs_little_memory() {
    let gguf = |bytes: Vec<u8>| move || GgufFile::from_bytes(bytes).map(drop);
    let claims: Vec<(&str, Vec<u8>)> = vec![
        ("a 64 Mi-element array claimed", gguf_with(0, 1, &[key("a", 9), array(0, 64 << 20), vec![0; 64]].concat())),
        (
            "a 64 Mi-element string array claimed",
            gguf_with(0, 1, &[key("a", 9), array(8, 64 << 20), vec![0; 64]].concat()),
        ),
        (
            "nested arrays claimed",
            gguf_with(0, 1, &[key("a", 9), array(9, 2), array(9, 1 << 30), array(0, 1 << 40)].concat()),
        ),
        ("a 2^40-byte string", gguf_with(0, 1, &[key("a", 8), (1u64 << 40).to_le_bytes().to_vec()].concat())),
        ("a 2^40-byte key", gguf_with(0, 1, &(1u64 << 40).to_le_bytes())),
        ("2^32 tensors", gguf_with(1 << 32, 0, &[0; 64])),
        ("2^20 tensors", gguf_with(1 << 20, 0, &[0; 64])),
        ("2^32 metadata keys", gguf_with(0, 1 << 32, &[0; 64])),
        ("2^16 metadata keys", gguf_with(0, 1 << 16, &[0; 64])),
    ];
    for (what, bytes) in claims {
        assert_refused_cheaply(what, gguf(bytes));
    }

    // The report: an array of 64 Mi one-byte elements that is really there took 2.2 GB
    // (64 Mi `Value`s of 32 bytes) before the file was refused.
    let mut bytes = gguf_with(0, 1, &[key("a", 9), array(0, 64 << 20)].concat());
    bytes.resize(bytes.len() + (64 << 20), 1);
    assert_refused_cheaply("a 64 Mi-element array of bytes", gguf(bytes));
    // The same with 8 Mi empty strings (8 bytes each in the file, 32 parsed).
    let mut bytes = gguf_with(0, 1, &[key("a", 9), array(8, 9 << 20)].concat());
    bytes.resize(bytes.len() + (72 << 20), 0);
    assert_refused_cheaply("a 9 Mi-element array of empty strings", gguf(bytes));
}

#[test]
fn refusing_crafted_safetensors_files_costs_little_memory() {
    let st = |bytes: Vec<u8>| move || SafetensorsFile::from_bytes("crafted", bytes).map(drop);
    let header = |text: &[u8]| [(text.len() as u64).to_le_bytes().as_slice(), text].concat();
    assert_refused_cheaply("a 2^40-byte header", st([(1u64 << 40).to_le_bytes().as_slice(), b"{}"].concat()));
    assert_refused_cheaply("a header past the end", st([(99u64 << 20).to_le_bytes().as_slice(), b"{}"].concat()));
    // 16 MiB of `0,` would have been 8 Mi `serde_json::Value`s, 512 MiB with the Vec's slack.
    let mut text = b"{\"a\":[".to_vec();
    text.extend(b"0,".repeat(8 << 20));
    text.extend_from_slice(b"0]}");
    assert_refused_cheaply("an array of 8 Mi zeros", st(header(&text)));
    // 7 bytes of `{"":0},` would have been a B-tree node of about 640 bytes each.
    let mut text = b"{\"a\":[".to_vec();
    text.extend(b"{\"\":0},".repeat(1 << 20));
    text.extend_from_slice(b"{}]}");
    assert_refused_cheaply("an array of 1 Mi small objects", st(header(&text)));
    // A million tensors of one byte.
    let mut text = b"{".to_vec();
    for i in 0..1_000_000 {
        text.extend_from_slice(format!("\"{i}\":{{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[0,1]}},").as_bytes());
    }
    text.extend_from_slice(b"\"z\":{}}");
    let mut bytes = header(&text);
    bytes.push(0);
    assert_refused_cheaply("a million tensors", st(bytes));
}

/// Valid files of the same kinds still parse: the limits are far from real models.
#[test]
fn realistic_files_are_within_the_limits() {
    // 50,000 tensors, more than any real safetensors file holds.
    let mut text = b"{".to_vec();
    for i in 0..50_000 {
        text.extend_from_slice(
            format!("\"model.layers.{i}.mlp.weight\":{{\"dtype\":\"U8\",\"shape\":[1,1],\"data_offsets\":[0,1]}},")
                .as_bytes(),
        );
    }
    text.extend_from_slice(b"\"__metadata__\":{\"format\":\"pt\"}}");
    let mut bytes = [(text.len() as u64).to_le_bytes().as_slice(), &text].concat();
    bytes.push(0);
    let (file, cost) = measure(|| SafetensorsFile::from_bytes("big", bytes));
    let file = file.unwrap();
    assert_eq!(file.tensors().len(), 50_000);
    println!("a header of 50,000 tensors ({} bytes) parsed with {cost:?}", text.len());

    // A vocabulary of 262,144 tokens with scores and types (Gemma's size).
    let n = 262_144u64;
    let mut body = [key("tokenizer.ggml.tokens", 9), array(8, n)].concat();
    for i in 0..n {
        let t = format!("tok{i}");
        body.extend_from_slice(&(t.len() as u64).to_le_bytes());
        body.extend_from_slice(t.as_bytes());
    }
    body.extend_from_slice(&[key("tokenizer.ggml.scores", 9), array(6, n)].concat());
    body.resize(body.len() + 4 * n as usize, 0);
    body.extend_from_slice(&[key("tokenizer.ggml.token_type", 9), array(5, n)].concat());
    body.resize(body.len() + 4 * n as usize, 0);
    let (file, cost) = measure(|| GgufFile::from_bytes(gguf_with(0, 3, &body)));
    let file = file.unwrap();
    assert_eq!(file.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()).map(<[_]>::len), Some(n as usize));
    println!("a vocabulary of {n} tokens parsed with {cost:?}");
}

/// Errors of both readers name the variant they are, so that a change of kind is seen.
#[test]
fn crafted_claims_give_the_expected_errors() {
    let err = GgufFile::from_bytes(gguf_with(1 << 32, 0, &[0; 64])).unwrap_err();
    assert!(matches!(err, GgufError::Corrupt(_)), "{err}");
    let err = GgufFile::from_bytes(gguf_with(0, 1, &[key("a", 8), (1u64 << 40).to_le_bytes().to_vec()].concat()))
        .unwrap_err();
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");
    let err = SafetensorsFile::from_bytes("x", [(1u64 << 40).to_le_bytes().as_slice(), b"{}"].concat()).unwrap_err();
    assert!(matches!(err, SafetensorsError::Corrupt { .. }), "{err}");
}

/// The model by which the safetensors reader bounds a header's parsed size before parsing
/// it (`JsonCost` in src/safetensors.rs, copied here) holds for `serde_json` as built: for
/// texts made of each kind of JSON value, the most live at once while `serde_json` parses
/// them stays under the estimate. A change of `serde_json` (a larger `Value`, the
/// `preserve_order` feature turned on by another crate) that breaks it fails here.
#[test]
fn the_header_cost_model_bounds_what_serde_json_allocates() {
    fn estimate(text: &[u8]) -> u64 {
        let (mut values, mut arrays, mut objects, mut strings) = (1u64, 0u64, 0u64, 0u64);
        let (mut in_string, mut escaped) = (false, false);
        for &b in text {
            if in_string {
                match b {
                    _ if escaped => escaped = false,
                    b'\\' => escaped = true,
                    b'"' => in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => {
                    in_string = true;
                    strings += 1;
                }
                b'{' => objects += 1,
                b'[' => {
                    arrays += 1;
                    values += 1;
                }
                b':' | b',' => values += 1,
                _ => {}
            }
        }
        64 * values + 128 * arrays + 640 * objects + 32 * strings + text.len() as u64
    }
    let array_of = |item: &str, k: usize| format!("{{\"a\":[{}0]}}", item.repeat(k));
    let mut texts: Vec<String> =
        ["0,", "{\"\":0},", "{\"a\":0,\"b\":0},", "[0],", "[[0]],", "[0,0,0,0,0],", "\"a\",", "\"\",", "[],", "{},"]
            .iter()
            .map(|item| array_of(item, (1 << 20) / item.len()))
            .collect();
    // Many members in one object, in order and shuffled; and tensors' entries.
    let members = |key: &dyn Fn(u64) -> String| {
        let body: Vec<String> = (0..100_000).map(|i| format!("\"{}\":0", key(i))).collect();
        format!("{{{}}}", body.join(","))
    };
    texts.push(members(&|i| format!("k{i}")));
    texts.push(members(&|i| format!("{:08}", i * 2_654_435_761 % 100_000_000)));
    let entries: Vec<String> = (0..20_000)
        .map(|i| format!("\"model.layers.{i}.w\":{{\"dtype\":\"U8\",\"shape\":[1,1],\"data_offsets\":[0,1]}}"))
        .collect();
    texts.push(format!("{{{}}}", entries.join(",")));
    for text in texts {
        let (parsed, cost) = measure(|| serde_json::from_slice::<serde_json::Value>(text.as_bytes()).map(drop));
        parsed.unwrap();
        let estimate = estimate(text.as_bytes());
        let head: String = text.chars().take(40).collect();
        println!("{head:>40}…: {} bytes, estimated {estimate}, took {cost:?}", text.len());
        assert!(cost.peak as u64 <= estimate, "{head}: {cost:?} > {estimate}");
    }
}
