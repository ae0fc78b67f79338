//! Round trips "guest region → device op → guest region", in place and through a copy.
//!
//! For the CPU backend and the GPU backend (Vulkan; Metal on Apple), with `Device::scal`
//! (`x = -1·x`, exact, so the values stay ±1 and are checked at the end):
//!
//! - **in place**: the region (a page-aligned anonymous `mmap`) is announced to the device
//!   with `MemoryObserver::committed`, so the GPU backend imports it and works on its pages;
//! - **copy**: on the GPU backend, the region is announced with a length (size + 4 bytes)
//!   that is not a multiple of the import alignment, so the backend takes its explicit-copy
//!   fallback (copy in, kernel, copy back). A region that is not announced at all is not
//!   usable there (the copy back refuses it; the bench shows the error once). On the CPU
//!   backend the naive copy path is emulated: copy the region into a fresh `Vec`, scal it
//!   there, copy it back.
//!
//! Part (a) times round trips (median of N calls after a warm-up); part (b) measures the
//! resident memory one 16 MiB call adds, each path in a fresh child process so that no
//! earlier allocation of another path is reused.
//!
//! ```text
//! cargo bench -p shoal-gpu --bench roundtrip -- [--quick] [--json PATH]
//! ```
//! `--quick` stops at 16 MiB with fewer runs; `--json PATH` writes the raw results (a relative
//! path is relative to `crates/shoal-gpu`, where cargo runs benches).

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use shoal_gpu::{BackendKind, DataPath, Device, GuestSpan, OpError, OpReport, Scal};
use shoal_memory::{CommittedRange, MemoryId, MemoryObserver, resident_bytes};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
const SIZES: [usize; 5] = [4 * KIB, 64 * KIB, MIB, 16 * MIB, 256 * MIB];
/// The region of part (b).
const RESIDENT_SIZE: usize = 16 * MIB;
/// The region the warm-up of part (b) uses (same path, another size).
const RESIDENT_WARM_SIZE: usize = 64 * KIB;
/// Bytes past the region announced on the copy path, so that the announced length is not
/// a multiple of any import alignment. They are mapped (the mapping has a spare page).
const UNIMPORTABLE_TAIL: usize = 4;

#[cfg(target_vendor = "apple")]
const GPU: BackendKind = BackendKind::Metal;
#[cfg(not(target_vendor = "apple"))]
const GPU: BackendKind = BackendKind::Vulkan;

static NEXT_MEMORY: AtomicU64 = AtomicU64::new(1_000_000);

fn unique_memory() -> MemoryId {
    MemoryId(NEXT_MEMORY.fetch_add(1, Ordering::Relaxed))
}

/// A page-aligned anonymous mapping of `len` bytes plus one spare page, every page
/// touched (filled with 1.0f32).
struct Region {
    ptr: *mut u8,
    len: usize,
    map_len: usize,
}

impl Region {
    fn new(len: usize) -> Region {
        let map_len = len + shoal_memory::page_size();
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing; it
        // aliases nothing, and the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(ptr != libc::MAP_FAILED, "mmap of {map_len} bytes failed: {}", std::io::Error::last_os_error());
        let mut region = Region { ptr: ptr.cast(), len, map_len };
        region.whole_mut().fill(1.0);
        region
    }

    /// The whole mapping (region and spare page) as f32.
    fn whole_mut(&mut self) -> &mut [f32] {
        // SAFETY: the mapping is `map_len` readable and writable bytes, page-aligned (so
        // f32-aligned), and lives as long as `self`, which this borrow is tied to.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.cast::<f32>(), self.map_len / 4) }
    }

    /// The region (without the spare page) as f32.
    fn f32s(&self) -> &[f32] {
        // SAFETY: as in `whole_mut`; `len <= map_len`, and the shared borrow of `self`
        // excludes writes through `whole_mut` / `f32s_mut` while it lives.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<f32>(), self.len / 4) }
    }

    fn f32s_mut(&mut self) -> &mut [f32] {
        let n = self.len / 4;
        &mut self.whole_mut()[..n]
    }

    /// The region as a guest memory of `len` bytes.
    fn span(&self) -> GuestSpan {
        // SAFETY: the region is mapped, readable and writable until `self` is dropped, and
        // the bench only passes the span to synchronous calls that finish before anything
        // else reads or writes the region (and before it is unmapped).
        unsafe { GuestSpan::new(self.ptr, self.len) }
    }

    fn addr(&self) -> usize {
        self.ptr as usize
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr+map_len` is our mapping; every device that was told about it
        // was told of its release first (`Trip::drop`), and no borrow of it outlives `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.map_len) };
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum PathKind {
    InPlace,
    Copy,
}

/// One region set up for one path on one device.
struct Trip<'a> {
    device: &'a Device,
    region: Region,
    /// The CPU backend's copy path: copy into a fresh `Vec`, scal there, copy back.
    emulate_copy: bool,
    memory: MemoryId,
    /// The length announced with `committed`, if any.
    announced: Option<usize>,
    op: Scal,
    announce_us: Option<f64>,
    calls: u64,
}

impl<'a> Trip<'a> {
    /// Announces `region` to `device` as `path` needs.
    fn new(device: &'a Device, region: Region, path: PathKind) -> Result<Trip<'a>, String> {
        let size = region.len;
        let emulate_copy = path == PathKind::Copy && matches!(device, Device::Cpu(_));
        let announce = match path {
            PathKind::InPlace => Some(size),
            PathKind::Copy if !emulate_copy => Some(size + UNIMPORTABLE_TAIL),
            PathKind::Copy => None,
        };
        let memory = unique_memory();
        let mut announce_us = None;
        if let Some(len) = announce {
            let t = Instant::now();
            device.committed(CommittedRange { memory, base: region.addr(), offset: 0, len })?;
            announce_us = Some(t.elapsed().as_secs_f64() * 1e6);
        }
        let op = Scal::check(&region.span(), 0, size as u64, -1.0).map_err(|e| e.to_string())?;
        Ok(Trip { device, region, emulate_copy, memory, announced: announce, op, announce_us, calls: 0 })
    }

    /// One round trip.
    fn call(&mut self) -> Result<OpReport, OpError> {
        self.calls += 1;
        if self.emulate_copy {
            let mut copy = self.region.f32s().to_vec();
            // SAFETY: `copy` is a live, writable allocation of exactly `region.len` bytes,
            // used by nothing else until the synchronous `scal` below returns.
            let span = unsafe { GuestSpan::new(copy.as_mut_ptr().cast(), self.region.len) };
            let report = self.device.scal(&span, &self.op)?;
            self.region.f32s_mut().copy_from_slice(&copy);
            Ok(report)
        } else {
            self.device.scal(&self.region.span(), &self.op)
        }
    }

    /// Checks that every element went through every call (`x = (-1)^calls`).
    fn verify(&self) -> Result<(), String> {
        let want = if self.calls.is_multiple_of(2) { 1.0 } else { -1.0 };
        match self.region.f32s().iter().position(|&v| v != want) {
            None => Ok(()),
            Some(i) => {
                Err(format!("element {i} is {} after {} calls, expected {want}", self.region.f32s()[i], self.calls))
            }
        }
    }

    fn label(&self) -> &'static str {
        match (self.emulate_copy, self.announced) {
            (true, _) => "cpu copy-in/copy-out (fresh Vec per call)",
            (false, Some(len)) if len == self.region.len => "in place (announced)",
            (false, _) => "copy (announced, not importable)",
        }
    }

    /// What the device says it did, from its report.
    fn seen(&self, report: &OpReport) -> String {
        if self.emulate_copy {
            return "emulated copy".into();
        }
        match report.path() {
            DataPath::InPlace => "in_place".into(),
            DataPath::Copy => format!("copy ({} B)", report.bytes_copied),
            DataPath::Dma => "dma".into(),
            DataPath::Device => "device".into(),
        }
    }
}

impl Drop for Trip<'_> {
    fn drop(&mut self) {
        if let Some(len) = self.announced {
            self.device.released(self.memory, self.region.addr(), len);
        }
    }
}

#[derive(Serialize)]
struct RoundTrip {
    backend: BackendKind,
    path: PathKind,
    label: String,
    size: usize,
    warmup: usize,
    runs: usize,
    median_us: f64,
    min_us: f64,
    max_us: f64,
    /// 2×size / median.
    gbps: f64,
    /// The path from the device's report ("emulated copy" for the CPU copy path).
    device_saw: String,
    bytes_copied: u64,
    announce_us: Option<f64>,
    samples_us: Vec<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct ResidentCall {
    /// Resident bytes after the call minus before it.
    retained: i64,
    /// Peak resident bytes during the call (VmHWM, reset before it) minus before it.
    peak: Option<i64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Resident {
    backend: String,
    path: Option<PathKind>,
    label: String,
    region_bytes: usize,
    device_saw: String,
    /// Resident bytes the `committed` call added (in place and GPU copy paths).
    announce_added: Option<i64>,
    /// The first and second 16 MiB calls, after a warm-up on a 64 KiB region.
    calls: Vec<ResidentCall>,
    error: Option<String>,
}

#[derive(Serialize)]
struct Report {
    quick: bool,
    devices: Vec<serde_json::Value>,
    roundtrip: Vec<RoundTrip>,
    resident: Vec<Resident>,
    notes: Vec<String>,
}

fn warmup_and_runs(size: usize, quick: bool) -> (usize, usize) {
    match (size, quick) {
        (s, false) if s <= 64 * KIB => (10, 100),
        (s, true) if s <= 64 * KIB => (5, 30),
        (s, false) if s <= MIB => (5, 50),
        (s, true) if s <= MIB => (3, 20),
        (s, false) if s <= 16 * MIB => (3, 15),
        (s, true) if s <= 16 * MIB => (2, 7),
        _ => (1, 5),
    }
}

fn size_name(size: usize) -> String {
    if size >= MIB { format!("{} MiB", size / MIB) } else { format!("{} KiB", size / KIB) }
}

fn round_trips(device: &Device, size: usize, path: PathKind, quick: bool) -> Result<RoundTrip, String> {
    let (warmup, runs) = warmup_and_runs(size, quick);
    let mut trip = Trip::new(device, Region::new(size), path)?;
    let mut last = None;
    for _ in 0..warmup {
        last = Some(trip.call().map_err(|e| e.to_string())?);
    }
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let report = trip.call().map_err(|e| e.to_string())?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
        last = Some(report);
    }
    trip.verify()?;
    let report = last.unwrap_or_default();
    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    let median = if runs % 2 == 1 { sorted[runs / 2] } else { (sorted[runs / 2 - 1] + sorted[runs / 2]) / 2.0 };
    Ok(RoundTrip {
        backend: device.info().backend,
        path,
        label: trip.label().into(),
        size,
        warmup,
        runs,
        median_us: median,
        min_us: sorted[0],
        max_us: sorted[runs - 1],
        gbps: 2.0 * size as f64 / (median * 1e-6) / 1e9,
        device_saw: trip.seen(&report),
        bytes_copied: report.bytes_copied,
        announce_us: trip.announce_us,
        samples_us: samples,
    })
}

/// Peak resident bytes since the last reset (Linux VmHWM).
fn peak_resident() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Resets the peak to the current resident size (Linux ≥ 4.0).
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn delta(after: Option<u64>, before: Option<u64>) -> Option<i64> {
    Some(after? as i64 - before? as i64)
}

/// Part (b), run in a child process: the resident memory one 16 MiB call adds.
fn resident_child(backend: BackendKind, path: PathKind) -> Resident {
    let mut out = Resident { backend: backend.name().into(), path: Some(path), ..Default::default() };
    let device = match Device::open(backend) {
        Ok(d) => d,
        Err(e) => {
            out.error = Some(e.to_string());
            return out;
        }
    };
    let result = (|| -> Result<(), String> {
        // Warm-up: the same path on a region of another size (kernels compiled, pools and
        // threads started), so that the measured 16 MiB calls are the first of their size.
        {
            let mut warm = Trip::new(&device, Region::new(RESIDENT_WARM_SIZE), path)?;
            for _ in 0..3 {
                warm.call().map_err(|e| e.to_string())?;
            }
        }
        // The region's pages are touched (filled) before anything is measured.
        let region = Region::new(RESIDENT_SIZE);
        let before = resident_bytes();
        let mut trip = Trip::new(&device, region, path)?;
        out.label = trip.label().into();
        out.region_bytes = RESIDENT_SIZE;
        out.announce_added = trip.announced.and(delta(resident_bytes(), before));
        for _ in 0..2 {
            let peak_ok = reset_peak();
            let before = resident_bytes();
            let report = trip.call().map_err(|e| e.to_string())?;
            let after = resident_bytes();
            let peak = if peak_ok { delta(peak_resident(), before) } else { None };
            out.device_saw = trip.seen(&report);
            out.calls.push(ResidentCall { retained: delta(after, before).ok_or("no resident size on this OS")?, peak });
        }
        trip.verify()
    })();
    out.error = result.err();
    out
}

/// Runs part (b) for one backend and path in a fresh process.
fn resident_in_child(backend: BackendKind, path: PathKind) -> Resident {
    let fail =
        |e: String| Resident { backend: backend.name().into(), path: Some(path), error: Some(e), ..Default::default() };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return fail(format!("cannot find this executable: {e}")),
    };
    let path_arg = match path {
        PathKind::InPlace => "in_place",
        PathKind::Copy => "copy",
    };
    let out = match std::process::Command::new(exe).args(["--resident-child", backend.name(), path_arg]).output() {
        Ok(o) => o,
        Err(e) => return fail(format!("cannot run the child: {e}")),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().rev().find(|l| l.starts_with('{')).map(serde_json::from_str::<Resident>) {
        Some(Ok(r)) => r,
        Some(Err(e)) => fail(format!("bad child output: {e}")),
        None => fail(format!(
            "the child printed no result ({}); stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// Microseconds, with two decimals below 10 µs.
fn us(v: f64) -> String {
    if v < 10.0 { format!("{v:.2}") } else { format!("{v:.1}") }
}

fn mb(bytes: i64) -> String {
    format!("{:.2}", bytes as f64 / 1e6)
}

fn main() -> ExitCode {
    let mut quick = false;
    let mut json = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--json" => match args.next() {
                Some(p) => json = Some(p),
                None => {
                    eprintln!("--json needs a path");
                    return ExitCode::FAILURE;
                }
            },
            "--resident-child" => {
                let backend = args.next().and_then(|b| b.parse::<BackendKind>().ok());
                let path = match args.next().as_deref() {
                    Some("in_place") => Some(PathKind::InPlace),
                    Some("copy") => Some(PathKind::Copy),
                    _ => None,
                };
                let (Some(backend), Some(path)) = (backend, path) else {
                    eprintln!("usage: --resident-child BACKEND in_place|copy");
                    return ExitCode::FAILURE;
                };
                let r = resident_child(backend, path);
                println!("{}", serde_json::to_string(&r).expect("serializable"));
                return ExitCode::SUCCESS;
            }
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            other => eprintln!("ignoring unknown argument `{other}`"),
        }
    }

    let mut devices = Vec::new();
    let mut notes = Vec::new();
    let mut opened = Vec::new();
    for kind in [BackendKind::Cpu, GPU] {
        match Device::open(kind) {
            Ok(d) => {
                let i = d.info();
                let binding = if i.max_binding_bytes == u64::MAX {
                    "unlimited".to_string()
                } else {
                    format!("{} MiB", i.max_binding_bytes / MIB as u64)
                };
                println!(
                    "{kind}: {} (imports guest memory: {}, max binding {binding})",
                    i.name, i.imports_guest_memory
                );
                devices.push(serde_json::to_value(i).expect("serializable"));
                opened.push(d);
            }
            Err(e) => {
                println!("{kind}: skipped ({e})");
                notes.push(format!("{kind} skipped: {e}"));
            }
        }
    }

    // What an un-announced region gets on the GPU backend.
    for d in opened.iter().filter(|d| !matches!(d, Device::Cpu(_))) {
        let region = Region::new(4 * KIB);
        let span = region.span();
        let note = match Scal::check(&span, 0, region.len as u64, -1.0).map_err(|e| e.to_string()) {
            Ok(op) => match d.scal(&span, &op) {
                Ok(r) => format!("{}: an un-announced 4 KiB region: Ok, path {:?}", d.info().backend, r.path()),
                Err(e) => format!("{}: an un-announced 4 KiB region: Err({e})", d.info().backend),
            },
            Err(e) => e,
        };
        println!("note: {note}");
        notes.push(note);
    }

    let sizes: Vec<usize> = SIZES.into_iter().filter(|&s| !quick || s <= 16 * MIB).collect();
    println!();
    println!("(a) round trip guest region -> scal (x = -1*x) -> guest region; median of `runs` after `warm` calls");
    println!("    GB/s = 2 x size / median (one read and one write of the region)");
    println!(
        "{:<7} {:<42} {:>8} {:>5} {:>5} {:>12} {:>12} {:>8}  device saw",
        "backend", "path", "size", "warm", "runs", "median us", "min us", "GB/s"
    );
    let mut results = Vec::new();
    let mut failed = false;
    for d in &opened {
        for path in [PathKind::InPlace, PathKind::Copy] {
            for &size in &sizes {
                match round_trips(d, size, path, quick) {
                    Ok(r) => {
                        println!(
                            "{:<7} {:<42} {:>8} {:>5} {:>5} {:>12} {:>12} {:>8.2}  {}",
                            r.backend.name(),
                            r.label,
                            size_name(size),
                            r.warmup,
                            r.runs,
                            us(r.median_us),
                            us(r.min_us),
                            r.gbps,
                            r.device_saw
                        );
                        results.push(r);
                    }
                    Err(e) => {
                        println!("{:<7} {path:?} {}: FAILED: {e}", d.info().backend.name(), size_name(size));
                        failed = true;
                    }
                }
            }
        }
    }
    for r in results.iter().filter(|r| r.path == PathKind::InPlace && r.backend != BackendKind::Cpu) {
        if let Some(us) = r.announce_us {
            println!(
                "    {} announce (import) of {}: {us:.0} us, once per committed range",
                r.backend,
                size_name(r.size)
            );
        }
    }

    println!();
    println!(
        "(b) resident memory added by one scal on a {} region (MB = 1e6 B); each row in a fresh process,",
        size_name(RESIDENT_SIZE)
    );
    println!(
        "    region pages touched first; warm-up = 3 calls on a {} region on the same path;",
        size_name(RESIDENT_WARM_SIZE)
    );
    println!("    retained = resident after - before the call; peak = VmHWM during the call - before");
    println!(
        "{:<7} {:<42} {:>9} {:>11} {:>9} {:>11} {:>9}  device saw",
        "backend", "path", "announce", "1st retain", "1st peak", "2nd retain", "2nd peak"
    );
    let mut resident = Vec::new();
    for d in &opened {
        for path in [PathKind::InPlace, PathKind::Copy] {
            let r = resident_in_child(d.info().backend, path);
            if let Some(e) = &r.error {
                println!("{:<7} {path:?}: FAILED: {e}", r.backend);
                failed = true;
            } else {
                let cell = |i: usize, peak: bool| {
                    r.calls
                        .get(i)
                        .and_then(|c| if peak { c.peak } else { Some(c.retained) })
                        .map_or("n/a".to_string(), mb)
                };
                println!(
                    "{:<7} {:<42} {:>9} {:>11} {:>9} {:>11} {:>9}  {}",
                    r.backend,
                    r.label,
                    r.announce_added.map_or("-".to_string(), mb),
                    cell(0, false),
                    cell(0, true),
                    cell(1, false),
                    cell(1, true),
                    r.device_saw
                );
            }
            resident.push(r);
        }
    }

    if let Some(path) = json {
        let report = Report { quick, devices, roundtrip: results, resident, notes };
        match std::fs::write(&path, serde_json::to_string_pretty(&report).expect("serializable")) {
            Ok(()) => println!("\nraw results written to {path}"),
            Err(e) => {
                eprintln!("cannot write {path}: {e}");
                failed = true;
            }
        }
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
