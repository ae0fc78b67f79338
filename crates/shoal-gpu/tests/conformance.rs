//! One test body, every backend: each test runs on the CPU and, when they open, on
//! Vulkan and CUDA, against a float64 reference computed here. `SHOAL_TEST_BACKENDS`
//! (comma-separated names) picks the backends instead; each named must then open.
//!
//! Operands live in an `mmap`ed, page-aligned region that stands in for a guest
//! memory: it is announced to the device with `MemoryObserver::committed` (which
//! imports it on Vulkan) and released at the end, as `shoal-memory` would.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shoal_gpu::{BackendKind, DType, Device, GemmSpec, GuestSpan, OpError, OpReport, Scal, Space};
use shoal_memory::{CommittedRange, MemoryId, MemoryObserver};

/// Import granularity we round regions to (the Vulkan import needs 4 KiB; some
/// drivers want more, so use the Wasm page).
const REGION_ALIGN: usize = 65536;

// ---------------------------------------------------------------------------
// Backends

/// The variable that picks the backends to test (comma-separated names, e.g.
/// `cuda` or `cpu,vulkan`); each one named must open. Unset: the CPU and every
/// other backend that opens, the others skipped with a message.
const BACKENDS_ENV: &str = "SHOAL_TEST_BACKENDS";

struct Backends {
    devices: Vec<Device>,
    skipped: Vec<String>,
    /// Backends every per-backend test must have run on.
    required: Vec<BackendKind>,
}

fn backends_once() -> &'static Backends {
    static BACKENDS: OnceLock<Backends> = OnceLock::new();
    BACKENDS.get_or_init(|| {
        if let Some(list) = std::env::var(BACKENDS_ENV).ok().filter(|l| !l.trim().is_empty()) {
            let required: Vec<BackendKind> =
                list.split(',').map(|n| n.trim().parse().unwrap_or_else(|e| panic!("{BACKENDS_ENV}: {e}"))).collect();
            let devices = required
                .iter()
                .map(|&k| {
                    Device::open(k).unwrap_or_else(|e| panic!("{BACKENDS_ENV} names {k}, which does not open: {e}"))
                })
                .collect();
            return Backends { devices, skipped: Vec::new(), required };
        }
        let mut devices = vec![Device::open(BackendKind::Cpu).expect("the CPU backend always opens")];
        let mut skipped = Vec::new();
        for kind in [BackendKind::Vulkan, BackendKind::Cuda] {
            match Device::open(kind) {
                Ok(d) => devices.push(d),
                Err(e) => skipped.push(format!("skipping {kind}: {e}")),
            }
        }
        Backends { devices, skipped, required: vec![BackendKind::Cpu] }
    })
}

/// Every backend to test, printing why others are skipped.
fn backends(test: &str) -> Vec<&'static Device> {
    let b = backends_once();
    for s in &b.skipped {
        eprintln!("{test}: {s}");
    }
    b.devices.iter().collect()
}

/// The Vulkan device, or a skip message.
fn vulkan(test: &str) -> Option<&'static Device> {
    let b = backends_once();
    let d = b.devices.iter().find(|d| d.info().backend == BackendKind::Vulkan);
    if d.is_none() {
        let why = b.skipped.iter().find(|s| s.starts_with("skipping vulkan")).map_or("skipping vulkan", |s| s);
        eprintln!("{test}: {why}");
    }
    d
}

/// Asserts that a per-backend loop really ran on the required backends (the CPU,
/// unless `SHOAL_TEST_BACKENDS` says otherwise), and says where it ran.
fn ran_on(test: &str, ran: &[BackendKind]) {
    for k in &backends_once().required {
        assert!(ran.contains(k), "{test}: the {k} backend did not run (ran on {ran:?})");
    }
    eprintln!("{test}: ran on {ran:?}");
}

// ---------------------------------------------------------------------------
// A guest-like memory

static NEXT_ID: AtomicU64 = AtomicU64::new(1 << 48);

/// An anonymous mapping standing in for a guest memory.
struct Region {
    base: *mut u8,
    len: usize,
    id: MemoryId,
    announced: Vec<&'static Device>,
}

impl Region {
    /// A zeroed region of at least `bytes` bytes.
    fn new(bytes: usize) -> Region {
        let len = bytes.max(1).div_ceil(REGION_ALIGN) * REGION_ALIGN;
        // SAFETY: an anonymous private mapping at an address the kernel picks aliases
        // nothing; the result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap of {len} bytes failed");
        Region { base: p as *mut u8, len, id: MemoryId(NEXT_ID.fetch_add(1, Ordering::Relaxed)), announced: Vec::new() }
    }

    /// Announces the whole region to `device`, as a guest memory's commit would.
    fn announce(&mut self, device: &'static Device) {
        let range = CommittedRange { memory: self.id, base: self.base as usize, offset: 0, len: self.len };
        device.committed(range).unwrap_or_else(|e| panic!("{} refused the region: {e}", device.info().name));
        self.announced.push(device);
    }

    /// Tells every device the region is going away (it waits for their work on it).
    fn release(&mut self) {
        for d in self.announced.drain(..) {
            d.released(self.id, self.base as usize, self.len);
        }
    }

    fn span(&self) -> GuestSpan {
        // SAFETY: `base..base+len` is our live read-write mapping; it stays mapped
        // until `Drop` (which first releases it from every device), and the tests
        // touch it only between operations, never while one is in flight on it.
        unsafe { GuestSpan::new(self.base, self.len) }
    }

    fn floats(&mut self) -> &mut [f32] {
        // SAFETY: the mapping is `len` bytes, page-aligned (so f32-aligned), zero or
        // written as f32 only, and `&mut self` makes this the only view of it.
        unsafe { std::slice::from_raw_parts_mut(self.base as *mut f32, self.len / 4) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        self.release();
        // SAFETY: the mapping made in `new`, released from every device above.
        unsafe { libc::munmap(self.base as *mut _, self.len) };
    }
}

// ---------------------------------------------------------------------------
// GEMM cases and the float64 reference

/// One GEMM, laid out in a region (all offsets and strides in f32 elements).
#[derive(Clone, Debug)]
struct Case {
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    lda: usize,
    ldb: usize,
    ldc: usize,
    alpha: f32,
    beta: f32,
    a_off: usize,
    b_off: usize,
    c_off: usize,
    /// Extra bytes each view's length claims past what the matrix needs.
    slack: [usize; 3],
    /// Elements the region needs.
    elems: usize,
}

fn extent(rows: usize, cols: usize, ld: usize) -> usize {
    if rows == 0 || cols == 0 { 0 } else { (rows - 1) * ld + cols }
}

impl Case {
    /// Lays out a GEMM with strides larger than needed and odd offsets.
    #[expect(clippy::too_many_arguments, reason = "one argument per GEMM parameter reads best at the call sites")]
    fn new(rng: &mut StdRng, m: usize, n: usize, k: usize, ta: bool, tb: bool, alpha: f32, beta: f32) -> Case {
        let (a_cols, b_cols) = (if ta { m } else { k }, if tb { k } else { n });
        let lda = a_cols + rng.random_range(1..8);
        let ldb = b_cols + rng.random_range(1..8);
        let ldc = n + rng.random_range(1..8);
        let slack = [rng.random_range(0..3) * 4, rng.random_range(0..3) * 4, rng.random_range(0..3) * 4];
        // Offsets are 4-byte aligned but not aligned to the device's binding offset.
        let a_off = 1 + rng.random_range(0..40);
        let a_ext = extent(if ta { k } else { m }, a_cols, lda);
        let b_off = a_off + a_ext + 16 + rng.random_range(0..40);
        let b_ext = extent(if tb { n } else { k }, b_cols, ldb);
        let c_off = b_off + b_ext + 16 + rng.random_range(0..40);
        let elems = c_off + extent(m, n, ldc) + 16;
        Case { m, n, k, ta, tb, lda, ldb, ldc, alpha, beta, a_off, b_off, c_off, slack, elems }
    }

    fn a_ext(&self) -> usize {
        extent(if self.ta { self.k } else { self.m }, if self.ta { self.m } else { self.k }, self.lda)
    }
    fn b_ext(&self) -> usize {
        extent(if self.tb { self.n } else { self.k }, if self.tb { self.k } else { self.n }, self.ldb)
    }
    fn c_ext(&self) -> usize {
        extent(self.m, self.n, self.ldc)
    }

    fn spec(&self) -> GemmSpec {
        let view = |off: usize, ext: usize, slack: usize| ((off * 4) as u64, (ext * 4 + slack) as u64);
        GemmSpec {
            dtype: DType::F32,
            trans_a: self.ta,
            trans_b: self.tb,
            m: self.m as u64,
            n: self.n as u64,
            k: self.k as u64,
            lda: self.lda as u64,
            ldb: self.ldb as u64,
            ldc: self.ldc as u64,
            alpha: self.alpha,
            beta: self.beta,
            a: view(self.a_off, self.a_ext(), self.slack[0]),
            b: view(self.b_off, self.b_ext(), self.slack[1]),
            c: view(self.c_off, self.c_ext(), self.slack[2]),
        }
    }

    fn a(&self, img: &[f32], i: usize, p: usize) -> f32 {
        img[self.a_off + if self.ta { p * self.lda + i } else { i * self.lda + p }]
    }
    fn b(&self, img: &[f32], p: usize, j: usize) -> f32 {
        img[self.b_off + if self.tb { j * self.ldb + p } else { p * self.ldb + j }]
    }
    fn c_at(&self, i: usize, j: usize) -> usize {
        self.c_off + i * self.ldc + j
    }

    /// A region image: random values everywhere (gaps included, as sentinels), and
    /// NaN in C when beta is 0 (C must then not be read).
    fn image(&self, rng: &mut StdRng) -> Vec<f32> {
        let mut img: Vec<f32> = (0..self.elems).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        if self.beta == 0.0 {
            for i in 0..self.m {
                for j in 0..self.n {
                    img[self.c_at(i, j)] = f32::NAN;
                }
            }
        }
        img
    }

    /// `alpha·op(A)·op(B) + beta·C` in float64, row-major m×n.
    fn reference(&self, img: &[f32]) -> Vec<f64> {
        let mut out = vec![0.0f64; self.m * self.n];
        for i in 0..self.m {
            for j in 0..self.n {
                let mut s = 0.0f64;
                for p in 0..self.k {
                    s += f64::from(self.a(img, i, p)) * f64::from(self.b(img, p, j));
                }
                let mut v = f64::from(self.alpha) * s;
                if self.beta != 0.0 {
                    v += f64::from(self.beta) * f64::from(img[self.c_at(i, j)]);
                }
                out[i * self.n + j] = v;
            }
        }
        out
    }

    /// Checks an output image: C against the reference, every other element unchanged.
    fn check(&self, label: &str, init: &[f32], out: &[f32], reference: &[f64], tol: f64) {
        let mut in_c = vec![false; self.elems];
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for i in 0..self.m {
            for j in 0..self.n {
                let at = self.c_at(i, j);
                in_c[at] = true;
                let (got, want) = (out[at], reference[i * self.n + j]);
                assert!(got.is_finite(), "{label}: C[{i}][{j}] = {got} (want {want}); NaN or inf leaked");
                num += (f64::from(got) - want).powi(2);
                den += want * want;
            }
        }
        if den > 0.0 {
            let rel = (num / den).sqrt();
            assert!(rel < tol, "{label}: relative error {rel:e} ≥ {tol:e}");
        } else {
            assert_eq!(num, 0.0, "{label}: the reference is zero but the output is not");
        }
        for (at, (o, i)) in out[..self.elems].iter().zip(init).enumerate() {
            if !in_c[at] {
                assert_eq!(
                    o.to_bits(),
                    i.to_bits(),
                    "{label}: element {at} outside C changed from {i} to {o} (A at {}, B at {}, C at {})",
                    self.a_off,
                    self.b_off,
                    self.c_off
                );
            }
        }
    }
}

/// Runs `case` on `device` in a fresh region (announced or not) and checks it.
fn run_case(device: &'static Device, case: &Case, init: &[f32], reference: &[f64], announce: bool) -> OpReport {
    let label = format!("{} {case:?}", device.info().backend);
    let mut region = Region::new(case.elems * 4);
    region.floats()[..case.elems].copy_from_slice(init);
    if announce {
        region.announce(device);
    }
    let span = region.span();
    let op = case.spec().check(span.size()).unwrap_or_else(|e| panic!("{label}: spec refused: {e}"));
    let report = device.gemm(&span, &op).unwrap_or_else(|e| panic!("{label}: gemm failed: {e}"));
    let out = region.floats()[..case.elems].to_vec();
    case.check(&label, init, &out, reference, 1e-5);
    report
}

const TRANS: [(bool, bool); 4] = [(false, false), (true, false), (false, true), (true, true)];
/// (alpha, beta): never 0 or 1 except beta = 0, which comes with C full of NaN.
const SCALES: [(f32, f32); 4] = [(0.75, -1.25), (-1.5, 0.0), (2.0, 0.5), (1.25, 0.0)];

fn shapes(rng: &mut StdRng) -> Vec<(usize, usize, usize)> {
    let mut s: Vec<_> =
        (0..12).map(|_| (rng.random_range(1..200), rng.random_range(1..200), rng.random_range(1..200))).collect();
    // Edges of the GPU kernel's 64×64×16 tiles, and larger products; the last one's
    // operands pass the CUDA backend's 1 MiB in-place limit, so CUDA takes its DMA path.
    s.extend([(1, 1, 1), (64, 64, 16), (65, 63, 17), (1, 199, 3), (199, 1, 150), (300, 257, 129), (520, 410, 300)]);
    s
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn gemm_matches_a_float64_reference_on_every_backend() {
    let test = "gemm_matches_a_float64_reference_on_every_backend";
    let devices = backends(test);
    let mut rng = StdRng::seed_from_u64(0x5a0a1);
    let mut ran = Vec::new();
    let mut paths = vec!["in_place"];
    let mut cases = 0;
    for (si, (m, n, k)) in shapes(&mut rng).into_iter().enumerate() {
        for (ti, (ta, tb)) in TRANS.into_iter().enumerate() {
            let (alpha, beta) = SCALES[(si + ti) % SCALES.len()];
            let case = Case::new(&mut rng, m, n, k, ta, tb, alpha, beta);
            let init = case.image(&mut rng);
            let reference = case.reference(&init);
            for &d in &devices {
                let report = run_case(d, &case, &init, &reference, true);
                assert!(report.dispatches >= 1);
                if report.dma && !paths.contains(&"dma") {
                    paths.push("dma");
                }
                if !ran.contains(&d.info().backend) {
                    ran.push(d.info().backend);
                }
            }
            cases += 1;
        }
    }
    assert_eq!(cases, 19 * 4);
    ran_on(test, &ran);
    eprintln!("{test}: paths taken: {paths:?}");
}

#[test]
fn empty_and_degenerate_products_follow_blas() {
    let test = "empty_and_degenerate_products_follow_blas";
    let devices = backends(test);
    let mut rng = StdRng::seed_from_u64(7);
    let mut ran = Vec::new();
    // (m, n, k, alpha, beta): k = 0 and alpha = 0 leave C = beta·C (A and B unread);
    // m = 0 or n = 0 touch nothing.
    let cases = [
        (5, 7, 0, 1.5, 0.5),
        (5, 7, 0, 1.5, 0.0),
        (9, 4, 6, 0.0, -2.0),
        (9, 4, 6, 0.0, 0.0),
        (0, 7, 5, 1.0, 0.5),
        (6, 0, 5, 1.0, 0.5),
        (0, 0, 0, 1.0, 0.0),
    ];
    for (m, n, k, alpha, beta) in cases {
        for (ta, tb) in TRANS {
            let case = Case::new(&mut rng, m, n, k, ta, tb, alpha, beta);
            let mut init = case.image(&mut rng);
            if alpha == 0.0 {
                // BLAS: with alpha = 0, A and B are not read, so NaN there must not leak.
                for v in &mut init[case.a_off..case.a_off + case.a_ext()] {
                    *v = f32::NAN;
                }
                for v in &mut init[case.b_off..case.b_off + case.b_ext()] {
                    *v = f32::NAN;
                }
            }
            let mut reference = vec![0.0f64; m * n];
            for i in 0..m {
                for j in 0..n {
                    if beta != 0.0 {
                        reference[i * n + j] = f64::from(beta) * f64::from(init[case.c_at(i, j)]);
                    }
                }
            }
            for &d in &devices {
                run_case(d, &case, &init, &reference, true);
                if !ran.contains(&d.info().backend) {
                    ran.push(d.info().backend);
                }
            }
        }
    }
    ran_on(test, &ran);
}

#[test]
fn scal_scales_exactly_the_view_on_every_backend() {
    let test = "scal_scales_exactly_the_view_on_every_backend";
    let mut rng = StdRng::seed_from_u64(11);
    let mut ran = Vec::new();
    for d in backends(test) {
        for (n, alpha) in [(1usize, -1.75f32), (255, 3.0), (256, 0.5), (1000, -0.3), (70_001, 1.0e-3), (0, 2.0)] {
            let off = 3 + rng.random_range(0..61); // elements; 4-byte but not 256-byte aligned
            let elems = off + n + 8;
            let mut region = Region::new(elems * 4);
            let init: Vec<f32> = (0..elems).map(|_| rng.random_range(-10.0f32..10.0)).collect();
            region.floats()[..elems].copy_from_slice(&init);
            region.announce(d);
            let span = region.span();
            let op = Scal::check(&span, (off * 4) as u64, (n * 4) as u64, alpha).unwrap();
            let report = d.scal(&span, &op).unwrap_or_else(|e| panic!("{} scal n={n}: {e}", d.info().backend));
            let out = region.floats()[..elems].to_vec();
            for (i, (o, v)) in out.iter().zip(&init).enumerate() {
                // IEEE multiplication is correctly rounded on both backends: exact.
                let want = if (off..off + n).contains(&i) { v * alpha } else { *v };
                assert_eq!(o.to_bits(), want.to_bits(), "{} scal n={n} off={off}: element {i}", d.info().backend);
            }
            if n > 0 {
                assert!(report.in_place() || !d.info().imports_guest_memory, "{report:?}");
            }
        }
        ran.push(d.info().backend);
    }
    ran_on(test, &ran);
}

#[test]
fn asynchronous_gemms_complete_and_release_waits_for_them() {
    let test = "asynchronous_gemms_complete_and_release_waits_for_them";
    let mut rng = StdRng::seed_from_u64(13);
    let mut ran = Vec::new();
    for d in backends(test) {
        // Two products on disjoint parts of one region, in flight together.
        let c1 = Case::new(&mut rng, 150, 130, 110, false, true, 0.75, -0.5);
        let mut c2 = Case::new(&mut rng, 90, 170, 60, true, false, -1.25, 0.0);
        for off in [&mut c2.a_off, &mut c2.b_off, &mut c2.c_off, &mut c2.elems] {
            *off += c1.elems;
        }
        let elems = c2.elems;
        let mut init = c2.image(&mut rng); // NaN in c2's C (beta = 0)
        init[..c1.elems].copy_from_slice(&c1.image(&mut rng));
        let (r1, r2) = (c1.reference(&init), c2.reference(&init));

        let mut region = Region::new(elems * 4);
        region.floats()[..elems].copy_from_slice(&init);
        region.announce(d);
        let span = region.span();
        let p1 = d.submit_gemm(&span, &c1.spec().check(span.size()).unwrap()).unwrap();
        let p2 = d.submit_gemm(&span, &c2.spec().check(span.size()).unwrap()).unwrap();
        p2.wait().unwrap();
        p1.wait().unwrap();
        let out = region.floats()[..elems].to_vec();
        let label = format!("{} async", d.info().backend);
        c1.check(&label, &init[..c1.elems], &out[..c1.elems], &r1, 1e-5);
        // c1's C changed legitimately; check c2 against an image where it matches.
        let mut init2 = init.clone();
        init2[..c1.elems].copy_from_slice(&out[..c1.elems]);
        c2.check(&label, &init2, &out, &r2, 1e-5);
        drop(region);

        // Release while an operation is in flight: `released` must not return before
        // the device is done, so C is final when it returns.
        let mut region = Region::new(c1.elems * 4);
        region.floats()[..c1.elems].copy_from_slice(&init[..c1.elems]);
        region.announce(d);
        let span = region.span();
        let pending = d.submit_gemm(&span, &c1.spec().check(span.size()).unwrap()).unwrap();
        region.release();
        let out = region.floats()[..c1.elems].to_vec();
        c1.check(&format!("{label} released in flight"), &init[..c1.elems], &out, &r1, 1e-5);
        // Waiting afterwards is harmless (a copied result, already released, is refused).
        let _ = pending.wait();
        ran.push(d.info().backend);
    }
    ran_on(test, &ran);
}

#[test]
fn vulkan_works_in_place_on_announced_memory() {
    let test = "vulkan_works_in_place_on_announced_memory";
    let Some(d) = vulkan(test) else { return };
    if !d.info().imports_guest_memory {
        eprintln!("{test}: skipping: {} cannot import host memory ({:?})", d.info().name, d.info().import_note);
        return;
    }
    let mut rng = StdRng::seed_from_u64(17);
    let case = Case::new(&mut rng, 70, 90, 50, false, false, 1.5, 0.25);
    let init = case.image(&mut rng);
    let reference = case.reference(&init);
    let report = run_case(d, &case, &init, &reference, true);
    assert!(report.operands.len() >= 3, "A, B and C are bound: {report:?}");
    assert!(report.in_place(), "every binding maps the guest's own bytes: {report:?}");
    assert_eq!(report.bytes_copied, 0, "{report:?}");
    let mut guest_addrs: Vec<_> = report.operands.iter().map(|o| o.guest_addr).collect();
    guest_addrs.sort();
    guest_addrs.dedup();
    assert_eq!(guest_addrs.len(), 3, "three distinct operands: {report:?}");
}

#[test]
fn vulkan_copies_unannounced_memory_and_says_so() {
    let test = "vulkan_copies_unannounced_memory_and_says_so";
    let Some(d) = vulkan(test) else { return };
    // `GuestSpan::new`'s contract does not require a memory to be announced: a memory
    // the device never imported must still work, through the one explicit copy.
    let mut rng = StdRng::seed_from_u64(19);
    for (ta, tb) in TRANS {
        let case = Case::new(&mut rng, 77, 45, 31, ta, tb, -0.5, 1.5);
        let init = case.image(&mut rng);
        let reference = case.reference(&init);
        let report = run_case(d, &case, &init, &reference, false);
        assert!(!report.operands.is_empty());
        assert!(!report.in_place(), "nothing was imported, so nothing can be in place: {report:?}");
        assert!(report.operands.iter().all(|o| o.device_host_addr.is_none()), "{report:?}");
        assert!(report.bytes_copied > 0, "the copy fallback reports its bytes: {report:?}");
    }
    // scal takes the same fallback.
    let mut region = Region::new(4096);
    let init: Vec<f32> = (0..1024).map(|i| i as f32).collect();
    region.floats()[..1024].copy_from_slice(&init);
    let span = region.span();
    let report = d.scal(&span, &Scal::check(&span, 64, 400, -2.0).unwrap()).unwrap();
    assert!(!report.in_place() && report.bytes_copied > 0, "{report:?}");
    let out = region.floats()[..1024].to_vec();
    for (i, (o, v)) in out.iter().zip(&init).enumerate() {
        let want = if (16..116).contains(&i) { v * -2.0 } else { *v };
        assert_eq!(*o, want, "element {i}");
    }
}

#[test]
fn vulkan_forgets_a_released_memory() {
    let test = "vulkan_forgets_a_released_memory";
    let Some(d) = vulkan(test) else { return };
    let mut rng = StdRng::seed_from_u64(23);
    let case = Case::new(&mut rng, 40, 40, 40, false, false, 1.0, 0.0);
    let init = case.image(&mut rng);
    let reference = case.reference(&init);
    // Announce, use, release and unmap one region, then map and announce another at
    // the same address (where the kernel allows): the device must bind the new
    // memory's buffers, not the destroyed ones of the released memory.
    let mut region = Region::new(case.elems * 4);
    region.announce(d);
    region.floats()[..case.elems].copy_from_slice(&init);
    let span = region.span();
    d.gemm(&span, &case.spec().check(span.size()).unwrap()).unwrap();
    let len = region.len;
    let old = region.base as usize;
    drop(region);
    // SAFETY: a hint address only (no MAP_FIXED): the kernel maps elsewhere if the
    // range is taken, so nothing existing can be replaced.
    let p = unsafe {
        libc::mmap(
            old as *mut _,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let mut region =
        Region { base: p as *mut u8, len, id: MemoryId(NEXT_ID.fetch_add(1, Ordering::Relaxed)), announced: vec![] };
    if p as usize != old {
        eprintln!("{test}: note: the kernel did not reuse {old:#x} (got {p:p}); the test proves less");
    }
    region.announce(d);
    region.floats()[..case.elems].copy_from_slice(&init);
    let span = region.span();
    let report = d.gemm(&span, &case.spec().check(span.size()).unwrap()).unwrap();
    assert!(report.in_place(), "the new memory's own import is used: {report:?}");
    for o in &report.operands {
        assert!(
            (region.base as usize..region.base as usize + region.len).contains(&o.guest_addr),
            "operand outside the new memory: {report:?}"
        );
    }
    let out = region.floats()[..case.elems].to_vec();
    case.check("vulkan after release", &init, &out, &reference, 1e-5);
}

/// Exact equality, reporting the first difference.
fn same(got: &[f32], want: &[f32], label: &str) {
    assert_eq!(got.len(), want.len());
    if let Some(i) = got.iter().zip(want).position(|(g, w)| g.to_bits() != w.to_bits()) {
        panic!("{label}: element {i} is {} (want {})", got[i], want[i]);
    }
}

#[test]
fn vulkan_tiles_a_gemm_larger_than_one_binding() {
    let test = "vulkan_tiles_a_gemm_larger_than_one_binding";
    let Some(d) = vulkan(test) else { return };
    let max = d.info().max_binding_bytes;
    if max > 256 << 20 {
        eprintln!("{test}: skipping: the binding limit is {max} bytes; exceeding it would be too slow for a test");
        return;
    }
    if !d.info().imports_guest_memory {
        eprintln!("{test}: skipping: {} cannot import host memory", d.info().name);
        return;
    }
    // A square A just over the limit, stored transposed, so the planner splits along
    // k and the later tiles accumulate into C (beta applied once). Small integers
    // keep every partial sum exact in f32, so the result must match exactly.
    let side = (((max / 4) as f64 * 1.1).sqrt().ceil() as usize).next_multiple_of(8) + 3;
    let (m, k, n) = (side, side, 3);
    let t0 = std::time::Instant::now();
    let mut rng = StdRng::seed_from_u64(29);
    let (a_off, lda, b_off, c_off) = (4, m, 4 + m * k + 8, 4 + m * k + 8 + k * n + 8);
    let elems = c_off + m * n + 4;
    assert!((m * k * 4) as u64 > max, "A must exceed one binding");
    let mut region = Region::new(elems * 4);
    {
        let f = region.floats();
        for v in &mut f[a_off..a_off + m * k] {
            *v = (rng.random::<u32>() % 5) as f32 - 2.0;
        }
        for v in &mut f[b_off..b_off + k * n] {
            *v = (rng.random::<u32>() % 5) as f32 - 2.0;
        }
        for v in &mut f[c_off..c_off + m * n] {
            *v = (rng.random::<u32>() % 7) as f32 - 3.0;
        }
    }
    let (alpha, beta) = (2.0f32, -3.0f32);
    let want: Vec<f32> = {
        let f = region.floats();
        // p outermost: A is stored k×m, so this walks it in order.
        let mut acc = vec![0i64; m * n];
        for p in 0..k {
            let (arow, brow) = (&f[a_off + p * lda..a_off + p * lda + m], &f[b_off + p * n..b_off + p * n + n]);
            for (i, &a) in arow.iter().enumerate() {
                for (j, &b) in brow.iter().enumerate() {
                    acc[i * n + j] += a as i64 * b as i64;
                }
            }
        }
        let c0 = &f[c_off..c_off + m * n];
        acc.iter().zip(c0).map(|(&s, &c)| (alpha as i64 * s + beta as i64 * c as i64) as f32).collect()
    };
    region.announce(d);
    let span = region.span();
    let spec = GemmSpec {
        dtype: DType::F32,
        trans_a: true,
        trans_b: false,
        m: m as u64,
        n: n as u64,
        k: k as u64,
        lda: lda as u64,
        ldb: n as u64,
        ldc: n as u64,
        alpha,
        beta,
        a: ((a_off * 4) as u64, (m * k * 4) as u64),
        b: ((b_off * 4) as u64, (k * n * 4) as u64),
        c: ((c_off * 4) as u64, (m * n * 4) as u64),
    };
    let c0 = region.floats()[c_off..c_off + m * n].to_vec();
    let report = d.gemm(&span, &spec.check(span.size()).unwrap()).unwrap();
    assert!(report.dispatches > 1, "an operand over the binding limit needs several tiles: {report:?}");
    assert!(report.in_place(), "tiles bind windows of the imported memory: {:?}", report.operands.first());
    assert_eq!(report.bytes_copied, 0);
    same(&region.floats()[c_off..c_off + m * n], &want, &format!("in place, {} tiles", report.dispatches));

    // The same product through the copy fallback (the memory no longer announced):
    // tiles along k must each see the C the previous one wrote back.
    region.release();
    region.floats()[c_off..c_off + m * n].copy_from_slice(&c0);
    let span = region.span();
    let copied = d.gemm(&span, &spec.check(span.size()).unwrap()).unwrap();
    assert!(copied.dispatches > 1 && !copied.in_place() && copied.bytes_copied > 0, "{copied:?}");
    same(&region.floats()[c_off..c_off + m * n], &want, &format!("copied, {} tiles", copied.dispatches));
    eprintln!("{test}: {m}×{n}×{k}, {} tiles, {:.1} s", report.dispatches, t0.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------
// Device-resident buffers

#[test]
fn device_buffers_hold_operands_on_every_backend() {
    let test = "device_buffers_hold_operands_on_every_backend";
    let mut rng = StdRng::seed_from_u64(0xb0f);
    let (m, n, k) = (37usize, 29usize, 41usize);
    let mut ran = Vec::new();
    for d in backends(test) {
        let mut region = Region::new((m * k + k * n + m * n) * 4);
        region.announce(d);
        let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let f = region.floats();
        f[..m * k].copy_from_slice(&a);
        f[m * k..m * k + k * n].copy_from_slice(&b);
        let span = region.span();
        // A goes to a device buffer (at an offset); B stays in guest memory; C is a buffer.
        let buf_a = d.create_buffer(((m * k + 8) * 4) as u64).unwrap();
        let buf_c = d.create_buffer((m * n * 4) as u64).unwrap();
        d.write_buffer(buf_a, 32, &span, 0..m * k * 4).unwrap();
        let spec = GemmSpec {
            dtype: DType::F32,
            trans_a: false,
            trans_b: false,
            m: m as u64,
            n: n as u64,
            k: k as u64,
            lda: k as u64,
            ldb: n as u64,
            ldc: n as u64,
            alpha: 1.0,
            beta: 0.0,
            a: (32, (m * k * 4) as u64),
            b: ((m * k * 4) as u64, (k * n * 4) as u64),
            c: (0, (m * n * 4) as u64),
        };
        let sa = Space::Buffer { id: buf_a, size: d.buffer_size(buf_a).unwrap() };
        let sc = Space::Buffer { id: buf_c, size: d.buffer_size(buf_c).unwrap() };
        let op = spec.check_in(span.size(), [sa, Space::Guest, sc]).unwrap();
        let report = d.gemm(&span, &op).unwrap_or_else(|e| panic!("{}: {e}", d.info().name));
        assert_eq!(report.operands.len(), 1, "{}: only B is guest memory: {report:?}", d.info().name);
        // Read C back into the guest and compare with a float64 product.
        let c_at = (m * k + k * n) * 4;
        d.read_buffer(buf_c, 0, &span, c_at..c_at + m * n * 4).unwrap();
        let c = &region.floats()[m * k + k * n..m * k + k * n + m * n];
        let (mut num, mut den) = (0f64, 0f64);
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k).map(|p| a[i * k + p] as f64 * b[p * n + j] as f64).sum();
                num += (c[i * n + j] as f64 - want).powi(2);
                den += want * want;
            }
        }
        assert!((num / den).sqrt() < 1e-5, "{}: relative error {}", d.info().name, (num / den).sqrt());
        // Bad handles and ranges are errors, not faults.
        assert!(matches!(d.write_buffer(buf_a, (m * k * 4) as u64, &span, 0..64), Err(OpError::OutOfBounds(_))));
        assert!(matches!(d.read_buffer(buf_c, 2, &span, 0..8), Err(OpError::Misaligned(_))));
        assert!(matches!(d.create_buffer(0), Err(OpError::TooLarge(_))));
        d.free_buffer(buf_a).unwrap();
        d.free_buffer(buf_c).unwrap();
        assert!(matches!(d.free_buffer(buf_a), Err(OpError::BadHandle(_))));
        assert!(matches!(d.buffer_size(buf_c), Err(OpError::BadHandle(_))));
        ran.push(d.info().backend);
    }
    ran_on(test, &ran);
}

// ---------------------------------------------------------------------------
// Half-precision GEMM (f16, bf16 with f32 accumulation), where a backend has it

#[test]
fn half_precision_gemm_matches_a_float64_reference_where_supported() {
    let test = "half_precision_gemm_matches_a_float64_reference_where_supported";
    let mut rng = StdRng::seed_from_u64(0x16);
    let (m, n, k) = (67usize, 45usize, 130usize);
    let mut ran = 0;
    for d in backends(test) {
        for dtype in [DType::F16, DType::Bf16] {
            if !d.info().gemm_dtypes.contains(&dtype) {
                eprintln!("{test}: skipping {dtype:?} on {}: not supported there", d.info().backend);
                // And it says so, rather than computing something.
                continue;
            }
            type Conv = (fn(f32) -> u16, fn(u16) -> f32);
            let (to, from): Conv = match dtype {
                DType::F16 => (|x| half::f16::from_f32(x).to_bits(), |b| half::f16::from_bits(b).to_f32()),
                _ => (|x| half::bf16::from_f32(x).to_bits(), |b| half::bf16::from_bits(b).to_f32()),
            };
            for (ta, tb) in TRANS {
                let (alpha, beta) = (1.5f32, 0.5f32);
                let a: Vec<u16> = (0..m * k).map(|_| to(rng.random_range(-1.0..1.0))).collect();
                let b: Vec<u16> = (0..k * n).map(|_| to(rng.random_range(-1.0..1.0))).collect();
                let c0: Vec<u16> = (0..m * n).map(|_| to(rng.random_range(-1.0..1.0))).collect();
                let mut region = Region::new((m * k + k * n + m * n) * 2);
                region.announce(d);
                // SAFETY: the region holds (m·k + k·n + m·n) u16s, page-aligned; this is
                // the only view of it while we fill and read it.
                let h = unsafe { std::slice::from_raw_parts_mut(region.base as *mut u16, m * k + k * n + m * n) };
                h[..m * k].copy_from_slice(&a);
                h[m * k..m * k + k * n].copy_from_slice(&b);
                h[m * k + k * n..].copy_from_slice(&c0);
                let (lda, ldb) = (if ta { m } else { k }, if tb { k } else { n });
                let spec = GemmSpec {
                    dtype,
                    trans_a: ta,
                    trans_b: tb,
                    m: m as u64,
                    n: n as u64,
                    k: k as u64,
                    lda: lda as u64,
                    ldb: ldb as u64,
                    ldc: n as u64,
                    alpha,
                    beta,
                    a: (0, (m * k * 2) as u64),
                    b: ((m * k * 2) as u64, (k * n * 2) as u64),
                    c: (((m * k + k * n) * 2) as u64, (m * n * 2) as u64),
                };
                let span = region.span();
                let op = spec.check(span.size()).unwrap();
                d.gemm(&span, &op).unwrap_or_else(|e| panic!("{} {dtype:?}: {e}", d.info().name));
                // SAFETY: as above; the operation has completed.
                let h = unsafe { std::slice::from_raw_parts(region.base as *const u16, m * k + k * n + m * n) };
                let out = &h[m * k + k * n..];
                let at = |v: &[u16], r: usize, c: usize, ld: usize, t: bool| {
                    from(if t { v[c * ld + r] } else { v[r * ld + c] }) as f64
                };
                let (mut num, mut den) = (0f64, 0f64);
                for i in 0..m {
                    for j in 0..n {
                        let dot: f64 = (0..k).map(|p| at(&a, i, p, lda, ta) * at(&b, p, j, ldb, tb)).sum();
                        let want = alpha as f64 * dot + beta as f64 * from(c0[i * n + j]) as f64;
                        let got = from(out[i * n + j]) as f64;
                        assert!(got.is_finite(), "{dtype:?}: NaN/inf at ({i},{j})");
                        num += (got - want).powi(2);
                        den += want * want;
                    }
                }
                let rel = (num / den).sqrt();
                let tol = if dtype == DType::F16 { 2e-3 } else { 1e-2 };
                assert!(rel < tol, "{} {dtype:?} ta={ta} tb={tb}: ‖Δ‖/‖ref‖ = {rel}", d.info().name);
                ran += 1;
            }
        }
    }
    eprintln!("{test}: {ran} half-precision products checked");
}
