//! Adversarial guests, written in WAT, against the `shoal_v1` ABI on every backend
//! that opens here (the CPU always; Vulkan and CUDA when a driver is present).
//! `SHOAL_TEST_BACKENDS` (comma-separated names) picks the backends instead.
//!
//! Each guest checks every status it gets with
//! `(if (i32.ne status EXPECTED) (then unreachable))`, inside a function named after
//! the check, so a wrong status traps and the trap's backtrace names the check.

use std::sync::{Arc, OnceLock};

use shoal_gpu::{BackendKind, Device};
use shoal_host::{GuestStats, HostError, RunOptions, Runtime};

// ---------------------------------------------------------------------------
// Backends

/// The variable that picks the backends to test (comma-separated names, e.g.
/// `cuda`); each one named must open. Unset: the CPU and every other backend that
/// opens, the others skipped with a message.
const BACKENDS_ENV: &str = "SHOAL_TEST_BACKENDS";

struct Devices {
    list: Vec<Arc<Device>>,
    skipped: Vec<String>,
    /// Backends every per-backend test must have run on.
    required: Vec<&'static str>,
}

fn devices() -> &'static Devices {
    static DEVICES: OnceLock<Devices> = OnceLock::new();
    DEVICES.get_or_init(|| {
        if let Some(names) = std::env::var(BACKENDS_ENV).ok().filter(|l| !l.trim().is_empty()) {
            let kinds: Vec<BackendKind> =
                names.split(',').map(|n| n.trim().parse().unwrap_or_else(|e| panic!("{BACKENDS_ENV}: {e}"))).collect();
            let list = kinds
                .iter()
                .map(|&k| {
                    Arc::new(
                        Device::open(k)
                            .unwrap_or_else(|e| panic!("{BACKENDS_ENV} names {k}, which does not open: {e}")),
                    )
                })
                .collect();
            return Devices { list, skipped: Vec::new(), required: kinds.iter().map(|k| k.name()).collect() };
        }
        let mut list = vec![Arc::new(Device::open(BackendKind::Cpu).expect("the CPU backend always opens"))];
        let mut skipped = Vec::new();
        for kind in [BackendKind::Vulkan, BackendKind::Cuda] {
            match Device::open(kind) {
                Ok(d) => list.push(Arc::new(d)),
                Err(e) => skipped.push(format!("skipping {kind}: {e}")),
            }
        }
        Devices { list, skipped, required: vec!["cpu"] }
    })
}

/// A runtime per backend to test, printing why others are skipped.
fn runtimes(test: &str) -> Vec<Runtime> {
    let d = devices();
    for s in &d.skipped {
        eprintln!("{test}: {s}");
    }
    d.list.iter().map(|d| Runtime::new(d.clone()).expect("runtime")).collect()
}

/// Asserts that a per-backend loop really ran on the required backends (the CPU,
/// unless `SHOAL_TEST_BACKENDS` says otherwise), and says where it ran.
fn ran_on(test: &str, ran: &[&str]) {
    for k in &devices().required {
        assert!(ran.contains(k), "{test}: the {k} backend did not run (ran on {ran:?})");
    }
    eprintln!("{test}: ran on {ran:?}");
}

fn name(rt: &Runtime) -> &'static str {
    rt.device().info().backend.name()
}

// ---------------------------------------------------------------------------
// Guests

const PAGE: u32 = 65536;

const IMPORTS: &str = r#"
  (import "shoal_v1" "abi_version" (func $abi_version (result i32)))
  (import "shoal_v1" "device_info" (func $device_info (param i32) (result i32)))
  (import "shoal_v1" "gemm" (func $gemm (param i32) (result i32)))
  (import "shoal_v1" "gemm_submit" (func $gemm_submit (param i32 i32) (result i32)))
  (import "shoal_v1" "fence_wait" (func $fence_wait (param i32) (result i32)))
  (import "shoal_v1" "scal" (func $scal (param i32 i32 f32) (result i32)))
  (import "shoal_v1" "last_op" (func $last_op (param i32) (result i32)))
  (import "shoal_v1" "last_error" (func $last_error (param i32 i32 i32) (result i32)))
  (import "shoal_v1" "buffer_create" (func $buffer_create (param i64 i32) (result i32)))
  (import "shoal_v1" "buffer_free" (func $buffer_free (param i32) (result i32)))
  (import "shoal_v1" "buffer_write" (func $buffer_write (param i32 i64 i32 i32) (result i32)))
  (import "shoal_v1" "buffer_read" (func $buffer_read (param i32 i64 i32 i32) (result i32)))
"#;

/// A GEMM descriptor as the guest SDK lays it out (88 bytes, little-endian).
#[derive(Clone, Copy, Debug)]
struct Desc {
    dtype: u32,
    flags: u32,
    m: u32,
    n: u32,
    k: u32,
    lda: u32,
    ldb: u32,
    ldc: u32,
    alpha: f32,
    beta: f32,
    a: (u64, u64),
    b: (u64, u64),
    c: (u64, u64),
}

impl Desc {
    fn bytes(&self) -> [u8; 88] {
        let mut d = [0u8; 88];
        let words = [
            self.dtype,
            self.flags,
            self.m,
            self.n,
            self.k,
            self.lda,
            self.ldb,
            self.ldc,
            self.alpha.to_bits(),
            self.beta.to_bits(),
        ];
        for (i, w) in words.iter().enumerate() {
            d[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        for (i, (off, len)) in [self.a, self.b, self.c].into_iter().enumerate() {
            d[40 + i * 16..48 + i * 16].copy_from_slice(&off.to_le_bytes());
            d[48 + i * 16..56 + i * 16].copy_from_slice(&len.to_le_bytes());
        }
        d
    }
}

// The small product every guest computes: A (2×3) at A_AT, B (3×2) at B_AT.
const A_AT: u32 = 0x1000;
const B_AT: u32 = 0x1100;
const C_AT: u32 = 0x1200;
const C2_AT: u32 = 0x1300;
const A: [f32; 6] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
const B: [f32; 6] = [7.0, 8.0, 9.0, 10.0, 11.0, 12.0];
/// A·B.
const AB: [f32; 4] = [58.0, 64.0, 139.0, 154.0];

/// `C = A·B` (2×2×3, packed, alpha 1, beta 0) with C at `c`.
fn valid(c: u32) -> Desc {
    Desc {
        dtype: 0,
        flags: 0,
        m: 2,
        n: 2,
        k: 3,
        lda: 3,
        ldb: 2,
        ldc: 2,
        alpha: 1.0,
        beta: 0.0,
        a: (A_AT.into(), 24),
        b: (B_AT.into(), 24),
        c: (c.into(), 16),
    }
}

/// Builds a WAT module whose export `run` performs named checks in order.
struct Guest {
    data: Vec<String>,
    funcs: Vec<String>,
    /// The step functions, in order.
    names: Vec<String>,
    /// `shoal_v1` calls the guest makes that count in `GuestStats::calls`.
    calls: u64,
    /// Those of them expected to fail.
    errors: u64,
    next_desc: u32,
}

impl Guest {
    /// A guest with no data (and no assumption about its memory).
    fn empty() -> Guest {
        Guest { data: Vec::new(), funcs: Vec::new(), names: Vec::new(), calls: 0, errors: 0, next_desc: 0x100 }
    }

    fn new() -> Guest {
        let mut g = Guest::empty();
        g.f32s(A_AT, &A);
        g.f32s(B_AT, &B);
        g.f32s(C_AT, &[f32::NAN; 4]);
        g.f32s(C2_AT, &[f32::NAN; 4]);
        g
    }

    fn bytes(&mut self, at: u32, bytes: &[u8]) {
        let s: String = bytes.iter().map(|b| format!("\\{b:02x}")).collect();
        self.data.push(format!("  (data (i32.const {at}) \"{s}\")"));
    }

    fn f32s(&mut self, at: u32, v: &[f32]) {
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.bytes(at, &b);
    }

    /// Places a descriptor in the data segment; returns its address.
    fn desc(&mut self, d: Desc) -> u32 {
        let at = self.next_desc;
        assert!(at + 100 <= 0x1000, "too many descriptors");
        self.next_desc += 112;
        self.bytes(at, &d.bytes());
        at
    }

    /// A step: any instructions, in a function named `check_<name>`.
    fn step(&mut self, name: &str, body: &str) {
        let func = format!("check_{name}");
        assert!(!self.names.contains(&func), "two steps named {name}");
        self.funcs.push(format!("  (func ${func}\n    {body})"));
        self.names.push(func);
    }

    /// Checks that `call` (a `shoal_v1` call expression) returns `want`.
    fn expect(&mut self, name: &str, call: &str, want: i32) {
        let counted = !call.contains("$last_error") && !call.contains("$abi_version");
        if counted {
            self.calls += 1;
            if want != 0 {
                self.errors += 1;
            }
        }
        self.step(name, &format!("(if (i32.ne {call} (i32.const {want})) (then unreachable))"));
    }

    /// Checks that the f32s at `at` are exactly `want`.
    fn expect_f32s(&mut self, name: &str, at: u32, want: &[f32]) {
        let body: String = want
            .iter()
            .enumerate()
            .map(|(i, w)| {
                format!(
                    "(if (f32.ne (f32.load (i32.const {})) (f32.const {w:?})) (then unreachable))\n    ",
                    at as usize + 4 * i
                )
            })
            .collect();
        self.step(name, &body);
    }

    fn wat(&self, memory: &str) -> String {
        let names: Vec<String> = self.names.iter().map(|n| format!("    (call ${n})")).collect();
        format!(
            "(module\n{IMPORTS}\n  {memory}\n{}\n{}\n  (func (export \"run\")\n{})\n)\n",
            self.data.join("\n"),
            self.funcs.join("\n"),
            names.join("\n")
        )
    }
}

/// Runs `wat`'s export `run`, failing with the trap (whose backtrace names the check).
fn run_ok(rt: &Runtime, wat: &str) -> GuestStats {
    match rt.call_export(wat.as_bytes(), "run") {
        Ok(stats) => stats,
        Err(e) => panic!("{}: the guest failed: {e:?}\n--- guest ---\n{wat}", name(rt)),
    }
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn bad_arguments_get_their_status_and_the_guest_keeps_running() {
    let test = "bad_arguments_get_their_status_and_the_guest_keeps_running";
    let mut ran = Vec::new();
    for rt in runtimes(test) {
        let info = rt.device().info().clone();
        let mut g = Guest::new();

        // Nothing has run yet, and no fence exists.
        g.expect("last_op_before_any_op", "(call $last_op (i32.const 0x80))", 6);
        g.expect("fence_wait_bogus", "(call $fence_wait (i32.const 12345))", 6);
        g.expect("fence_wait_zero", "(call $fence_wait (i32.const 0))", 6);
        g.expect("abi_version", "(call $abi_version)", 1);

        // device_info: out pointer out of range, then a good one.
        g.expect("device_info_out_oob", &format!("(call $device_info (i32.const {}))", PAGE - 32), 2);
        g.expect("device_info_out_at_top", "(call $device_info (i32.const -1))", 2);
        g.step(
            "device_info_wrote_nothing",
            &format!(
                "(if (i64.ne (i64.or (i64.load (i32.const {})) (i64.load (i32.const {}))) (i64.const 0)) (then unreachable))",
                PAGE - 32,
                PAGE - 8
            ),
        );
        g.expect("device_info_ok", "(call $device_info (i32.const 0x40))", 0);
        g.step(
            "device_info_contents",
            &format!(
                "(if (i32.ne (i32.load (i32.const 0x40)) (i32.const 1)) (then unreachable))
    (if (i32.ne (i32.load (i32.const 0x44)) (i32.const {})) (then unreachable))
    (if (i32.ne (i32.and (i32.load (i32.const 0x48)) (i32.const 1)) (i32.const {})) (then unreachable))",
                info.backend.abi_code(),
                u32::from(info.imports_guest_memory)
            ),
        );

        // The descriptor pointer itself out of range.
        g.expect("desc_ptr_oob", &format!("(call $gemm (i32.const {}))", PAGE - 40), 2);
        g.expect("desc_ptr_straddles_end", &format!("(call $gemm (i32.const {}))", PAGE - 87), 2);
        g.expect("desc_ptr_at_top", "(call $gemm (i32.const -8))", 2);

        // Bad descriptors, each one field off a valid product.
        let ok = valid(C_AT);
        let mut bad: Vec<(&str, Desc, i32)> = vec![
            ("c_near_end", Desc { c: ((PAGE - 8).into(), 16), ..ok }, 2),
            ("c_at_end", Desc { c: (PAGE.into(), 16), ..ok }, 2),
            ("c_far_out", Desc { c: (0xffff_ffff_0000_0000, 16), ..ok }, 2),
            ("b_past_end", Desc { b: ((PAGE - 20).into(), 24), ..ok }, 2),
            ("c_len_overflows", Desc { c: (16, 0xffff_ffff_ffff_fff0), ..ok }, 5),
            ("a_len_overflows", Desc { a: (A_AT.into(), 0xffff_ffff_ffff_fff0), ..ok }, 5),
            ("c_offset_overflows", Desc { c: (0xffff_ffff_ffff_fff0, 16), ..ok }, 5),
            ("m_k_too_large", Desc { m: u32::MAX, k: u32::MAX, ..ok }, 5),
            ("n_over_max_dim", Desc { n: (1 << 24) + 1, ..ok }, 5),
            ("c_misaligned", Desc { c: (u64::from(C_AT) + 3, 16), ..ok }, 3),
            ("a_misaligned", Desc { a: (u64::from(A_AT) + 2, 24), ..ok }, 3),
            ("c_overlaps_a", Desc { c: (u64::from(A_AT) + 8, 16), ..ok }, 4),
            ("c_overlaps_b", Desc { c: (u64::from(B_AT) + 4, 16), ..ok }, 4),
            ("lda_below_k", Desc { lda: 2, ..ok }, 1),
            ("ldb_below_n", Desc { ldb: 1, ..ok }, 1),
            ("ldc_below_n", Desc { ldc: 1, ..ok }, 1),
            ("lda_below_m_transposed", Desc { flags: 1, lda: 1, ..ok }, 1),
            ("c_view_too_short", Desc { c: (C_AT.into(), 12), ..ok }, 1),
            ("huge_ldc_view_too_short", Desc { m: 0xff_ffff, ldc: u32::MAX, ..ok }, 1),
            ("unknown_dtype", Desc { dtype: 7, ..ok }, 1),
            ("unknown_dtype_max", Desc { dtype: u32::MAX, ..ok }, 1),
            ("unknown_flag", Desc { flags: 8, ..ok }, 1),
            ("unknown_high_flag", Desc { flags: 0x8000_0001, ..ok }, 1),
        ];
        if !info.gemm_dtypes.contains(&shoal_gpu::DType::F16) {
            bad.push(("unsupported_dtype_f16", Desc { dtype: 1, ..ok }, 7));
        }
        for (check, d, want) in bad {
            let at = g.desc(d);
            g.expect(check, &format!("(call $gemm (i32.const {at}))"), want);
        }
        // None of that wrote C.
        g.step(
            "c_untouched_after_errors",
            &format!("(if (f32.eq (f32.load (i32.const {C_AT})) (f32.load (i32.const {C_AT}))) (then unreachable))"),
        );

        // gemm_submit: bad fence pointer, bad descriptor; nothing may be left in flight.
        let good = g.desc(ok);
        let bad_c = g.desc(Desc { c: (PAGE.into(), 16), ..ok });
        g.expect("submit_fence_out_oob", &format!("(call $gemm_submit (i32.const {good}) (i32.const {PAGE}))"), 2);
        g.expect("submit_bad_desc", &format!("(call $gemm_submit (i32.const {bad_c}) (i32.const 0xa0))"), 2);
        g.expect("submit_desc_oob", "(call $gemm_submit (i32.const -4) (i32.const 0xa0))", 2);
        g.expect("no_fence_was_made", "(call $fence_wait (i32.const 1))", 6);

        // scal out of range, misaligned, ragged.
        g.expect("scal_oob", &format!("(call $scal (i32.const {}) (i32.const 16) (f32.const 2))", PAGE - 8), 2);
        g.expect("scal_at_top", "(call $scal (i32.const -16) (i32.const 32) (f32.const 2))", 2);
        g.expect("scal_len_too_big", "(call $scal (i32.const 0) (i32.const -4) (f32.const 2))", 2);
        g.expect("scal_misaligned", &format!("(call $scal (i32.const {}) (i32.const 8) (f32.const 2))", A_AT + 2), 3);
        g.expect("scal_ragged_len", &format!("(call $scal (i32.const {A_AT}) (i32.const 6) (f32.const 2))"), 1);
        g.expect("scal_empty_at_end", &format!("(call $scal (i32.const {PAGE}) (i32.const 0) (f32.const 2))"), 0);
        g.expect_f32s("a_untouched_by_scal", A_AT, &A);

        // last_error explains the last failure; a bad buffer is refused.
        g.expect("last_error_ok", "(call $last_error (i32.const 0x2000) (i32.const 256) (i32.const 0xc0))", 0);
        g.step("last_error_has_text", "(if (i32.eqz (i32.load (i32.const 0xc0))) (then unreachable))");
        g.expect(
            "last_error_buf_oob",
            &format!("(call $last_error (i32.const {}) (i32.const 256) (i32.const 0xc0))", PAGE - 4),
            2,
        );

        // After all of that, a valid product still runs and is right.
        g.expect("valid_gemm", &format!("(call $gemm (i32.const {good}))"), 0);
        g.expect_f32s("valid_gemm_result", C_AT, &AB);
        g.expect("last_op_after_gemm", "(call $last_op (i32.const 0x80))", 0);
        let path = if info.imports_guest_memory { 0 } else { 1 };
        g.step(
            "last_op_contents",
            &format!(
                "(if (i32.ne (i32.load (i32.const 0x80)) (i32.const {path})) (then unreachable))
    (if (i32.lt_u (i32.load (i32.const 0x84)) (i32.const 1)) (then unreachable))"
            ),
        );
        g.expect("scal_c", &format!("(call $scal (i32.const {C_AT}) (i32.const 16) (f32.const 0.5))"), 0);
        g.expect_f32s("scal_result", C_AT, &AB.map(|v| v * 0.5));

        // Asynchronous: submit, wait, result right; the fence is then gone.
        let to_c2 = g.desc(valid(C2_AT));
        g.expect("submit_ok", &format!("(call $gemm_submit (i32.const {to_c2}) (i32.const 0xa0))"), 0);
        g.expect("fence_wait_ok", "(call $fence_wait (i32.load (i32.const 0xa0)))", 0);
        g.expect_f32s("async_result", C2_AT, &AB);
        g.expect("fence_wait_twice", "(call $fence_wait (i32.load (i32.const 0xa0)))", 6);

        let wat = g.wat("(memory (export \"memory\") 1)");
        let stats = run_ok(&rt, &wat);
        assert_eq!(stats.calls, g.calls, "{}: every shoal_v1 call is counted", name(&rt));
        assert_eq!(stats.errors, g.errors, "{}: every refused call is counted", name(&rt));
        assert_eq!(stats.ops, 4, "{}: the empty scal, gemm, scal and the async gemm ran: {stats:?}", name(&rt));
        assert!(stats.last_error.is_some());
        ran.push(name(&rt));
    }
    ran_on(test, &ran);
}

#[test]
fn device_buffers_through_the_abi() {
    let test = "device_buffers_through_the_abi";
    let mut ran = Vec::new();
    for rt in runtimes(test) {
        let mut g = Guest::new();
        let h = "(i32.load (i32.const 0x80))";
        g.expect("create_empty", "(call $buffer_create (i64.const 0) (i32.const 0x80))", 5);
        g.expect("create_absurd", "(call $buffer_create (i64.const 0x20000000000) (i32.const 0x80))", 5);
        g.expect(
            "create_out_pointer_past_the_end",
            &format!("(call $buffer_create (i64.const 64) (i32.const {PAGE}))"),
            2,
        );
        g.expect("free_unknown", "(call $buffer_free (i32.const 12345))", 6);
        g.expect("create", "(call $buffer_create (i64.const 24) (i32.const 0x80))", 0);
        g.expect("write_a", &format!("(call $buffer_write {h} (i64.const 0) (i32.const {A_AT}) (i32.const 24))"), 0);
        g.expect(
            "write_past_the_buffer",
            &format!("(call $buffer_write {h} (i64.const 8) (i32.const {A_AT}) (i32.const 24))"),
            2,
        );
        g.expect(
            "write_from_past_the_memory",
            &format!("(call $buffer_write {h} (i64.const 0) (i32.const {}) (i32.const 16))", PAGE - 8),
            2,
        );
        g.expect(
            "write_misaligned",
            &format!("(call $buffer_write {h} (i64.const 2) (i32.const {A_AT}) (i32.const 8))"),
            3,
        );
        g.expect(
            "write_unknown",
            &format!("(call $buffer_write (i32.const 777) (i64.const 0) (i32.const {A_AT}) (i32.const 8))"),
            6,
        );
        // C = A·B with A in the buffer (handle read from memory into the descriptor).
        let mut d = valid(C_AT);
        d.flags = 4;
        d.a = (0, 24);
        let at = g.desc(d);
        g.step(
            "put_handles",
            &format!("(i32.store (i32.const {}) {h}) (i64.store (i32.const {}) (i64.const 0))", at + 88, at + 92),
        );
        g.expect("gemm_from_buffer", &format!("(call $gemm (i32.const {at}))"), 0);
        g.expect_f32s("gemm_from_buffer_result", C_AT, &AB);
        let mut bad = valid(C2_AT);
        bad.flags = 4;
        let bad_at = g.desc(bad);
        g.step(
            "put_bad_handle",
            &format!(
                "(i32.store (i32.const {}) (i32.const 999)) (i64.store (i32.const {}) (i64.const 0))",
                bad_at + 88,
                bad_at + 92
            ),
        );
        g.expect("gemm_unknown_buffer", &format!("(call $gemm (i32.const {bad_at}))"), 6);
        g.expect("read_back", &format!("(call $buffer_read {h} (i64.const 0) (i32.const {C2_AT}) (i32.const 16))"), 0);
        g.expect_f32s("read_back_result", C2_AT, &A[..4]);
        g.expect("free", &format!("(call $buffer_free {h})"), 0);
        g.expect("free_twice", &format!("(call $buffer_free {h})"), 6);
        let stats = run_ok(&rt, &g.wat("(memory (export \"memory\") 1)"));
        assert_eq!((stats.calls, stats.errors), (g.calls, g.errors), "{}: {stats:?}", name(&rt));
        ran.push(name(&rt));
    }
    ran_on(test, &ran);
}

#[test]
fn a_view_past_the_end_works_after_memory_grow() {
    let test = "a_view_past_the_end_works_after_memory_grow";
    let mut ran = Vec::new();
    for rt in runtimes(test) {
        let mut g = Guest::new();
        let past = g.desc(valid(PAGE));
        let straddling = g.desc(valid(PAGE - 8));
        g.expect("c_past_the_end", &format!("(call $gemm (i32.const {past}))"), 2);
        g.expect("c_straddling_the_end", &format!("(call $gemm (i32.const {straddling}))"), 2);
        g.expect("scal_past_the_end", &format!("(call $scal (i32.const {PAGE}) (i32.const 16) (f32.const 2))"), 2);
        g.step("grow", "(if (i32.ne (memory.grow (i32.const 1)) (i32.const 1)) (then unreachable))");
        g.step(
            "fill_new_c_with_nan",
            &format!(
                "(f32.store (i32.const {}) (f32.const nan)) (f32.store (i32.const {}) (f32.const nan))
    (f32.store (i32.const {}) (f32.const nan)) (f32.store (i32.const {}) (f32.const nan))",
                PAGE,
                PAGE + 4,
                PAGE + 8,
                PAGE + 12
            ),
        );
        g.expect("c_past_the_old_end", &format!("(call $gemm (i32.const {past}))"), 0);
        g.expect_f32s("result_in_the_new_page", PAGE, &AB);
        g.expect("c_straddling_the_old_end", &format!("(call $gemm (i32.const {straddling}))"), 0);
        g.expect_f32s("result_across_the_old_end", PAGE - 8, &AB);
        g.expect(
            "scal_across_the_old_end",
            &format!("(call $scal (i32.const {}) (i32.const 16) (f32.const 2))", PAGE - 8),
            0,
        );
        g.expect_f32s("scal_result", PAGE - 8, &AB.map(|v| v * 2.0));
        g.expect("last_op", "(call $last_op (i32.const 0x80))", 0);
        if rt.device().info().imports_guest_memory {
            // The grown range was announced, so the device works on it in place.
            g.step("in_place_after_grow", "(if (i32.ne (i32.load (i32.const 0x80)) (i32.const 0)) (then unreachable))");
        }
        // The new end is enforced too.
        let past2 = g.desc(valid(2 * PAGE));
        g.expect("c_past_the_new_end", &format!("(call $gemm (i32.const {past2}))"), 2);
        let stats = run_ok(&rt, &g.wat("(memory (export \"memory\") 1)"));
        assert_eq!((stats.calls, stats.errors), (g.calls, g.errors), "{}: {stats:?}", name(&rt));
        ran.push(name(&rt));
    }
    ran_on(test, &ran);
}

#[test]
fn a_module_without_a_memory_export_gets_no_memory() {
    let test = "a_module_without_a_memory_export_gets_no_memory";
    let mut ran = Vec::new();
    for rt in runtimes(test) {
        for memory in ["(memory (export \"mem\") 1)", "(memory 1)", ""] {
            let mut g = Guest::empty(); // no data segments: there may be no memory
            g.expect("gemm", "(call $gemm (i32.const 0))", 10);
            g.expect("gemm_submit", "(call $gemm_submit (i32.const 0) (i32.const 0))", 10);
            g.expect("scal", "(call $scal (i32.const 0) (i32.const 4) (f32.const 1))", 10);
            g.expect("device_info", "(call $device_info (i32.const 0))", 10);
            g.expect("last_op", "(call $last_op (i32.const 0))", 10);
            // Needs no memory: the handle is checked first.
            g.expect("fence_wait", "(call $fence_wait (i32.const 1))", 6);
            let stats = run_ok(&rt, &g.wat(memory));
            assert_eq!((stats.calls, stats.errors), (6, 6), "{}: {memory}: {stats:?}", name(&rt));
        }
        ran.push(name(&rt));
    }
    ran_on(test, &ran);
}

#[test]
fn a_trapping_guest_is_a_trap_and_the_runtime_goes_on() {
    let test = "a_trapping_guest_is_a_trap_and_the_runtime_goes_on";
    let mut ran = Vec::new();
    for rt in runtimes(test) {
        let trapping = "(module (memory (export \"memory\") 1) (func (export \"run\") unreachable))";
        match rt.call_export(trapping.as_bytes(), "run") {
            Err(HostError::Trap(e)) => assert_eq!(
                e.downcast_ref::<wasmtime::Trap>(),
                Some(&wasmtime::Trap::UnreachableCodeReached),
                "{}: {e:?}",
                name(&rt)
            ),
            other => panic!("{}: expected a trap, got {other:?}", name(&rt)),
        }
        // An out-of-bounds access by the guest itself is a trap too.
        let oob = "(module (memory (export \"memory\") 1)
            (func (export \"run\") (drop (i32.load (i32.const 65536)))))";
        match rt.call_export(oob.as_bytes(), "run") {
            Err(HostError::Trap(e)) => {
                assert_eq!(e.downcast_ref::<wasmtime::Trap>(), Some(&wasmtime::Trap::MemoryOutOfBounds))
            }
            other => panic!("{}: expected a trap, got {other:?}", name(&rt)),
        }
        // A guest that traps with an asynchronous product in flight: the memory must
        // outlive the device's work on it (its release waits), and nothing leaks
        // into the next guest.
        let n: u32 = 256;
        let (a, b, c) = (0x1_0000u32, 0x1_0000 + n * n * 4, 0x1_0000 + 2 * n * n * 4);
        let big = Desc {
            dtype: 0,
            flags: 0,
            m: n,
            n,
            k: n,
            lda: n,
            ldb: n,
            ldc: n,
            alpha: 1.0,
            beta: 0.0,
            a: (a.into(), (n * n * 4).into()),
            b: (b.into(), (n * n * 4).into()),
            c: (c.into(), (n * n * 4).into()),
        };
        let mut g = Guest::new();
        let at = g.desc(big);
        g.expect("submit_big", &format!("(call $gemm_submit (i32.const {at}) (i32.const 0xa0))"), 0);
        g.step("trap_in_flight", "unreachable");
        match rt.call_export(g.wat("(memory (export \"memory\") 16)").as_bytes(), "run") {
            Err(HostError::Trap(e)) => {
                let msg = format!("{e:?}");
                assert!(msg.contains("trap_in_flight"), "{}: the wrong check trapped: {msg}", name(&rt));
            }
            other => panic!("{}: expected a trap, got {other:?}", name(&rt)),
        }
        // The runtime runs the next guest as if nothing happened.
        let mut g = Guest::new();
        let ok = g.desc(valid(C_AT));
        g.expect("gemm_after_trap", &format!("(call $gemm (i32.const {ok}))"), 0);
        g.expect_f32s("result_after_trap", C_AT, &AB);
        let stats = run_ok(&rt, &g.wat("(memory (export \"memory\") 1)"));
        assert_eq!((stats.calls, stats.errors, stats.ops), (1, 0, 1), "{}", name(&rt));
        ran.push(name(&rt));
    }
    ran_on(test, &ran);
}

#[test]
fn the_gemm_guest_passes_on_every_backend() {
    let test = "the_gemm_guest_passes_on_every_backend";
    let mut ran = Vec::new();
    for rt in runtimes(test) {
        for asynchronous in [false, true] {
            let mut args: Vec<String> = ["--json", "--size", "128", "--size", "67"].map(String::from).to_vec();
            if asynchronous {
                args.push("--async".into());
            }
            let opts = RunOptions { args, capture_stdout: true, ..Default::default() };
            let out = rt.run(shoal_guests::GEMM, &opts).unwrap_or_else(|e| panic!("{}: {e}", name(&rt)));
            let stdout = String::from_utf8_lossy(out.stdout.as_deref().unwrap_or_default()).into_owned();
            let label = format!("{} async={asynchronous}", name(&rt));
            assert_eq!(out.exit_code, 0, "{label}: {stdout}");
            assert!(stdout.contains("\"correct\":16384"), "{label}: {stdout}");
            assert!(stdout.contains("\"correct\":4489"), "{label}: {stdout}");
            assert!(stdout.contains(&format!("\"async\":{asynchronous}")), "{label}: {stdout}");
            if rt.device().info().imports_guest_memory {
                assert!(!stdout.contains("\"path\":\"copy\""), "{label}: a copy on an importing device: {stdout}");
                if rt.device().info().backend != BackendKind::Cuda {
                    // (CUDA may take its DMA path instead, which is no copy either.)
                    assert_eq!(out.stats.in_place_ops, out.stats.ops, "{label}: {:?}", out.stats);
                }
            }
            // The first warm-up, then per size a same-shape warm-up and the measured product.
            assert_eq!(out.stats.ops, 5, "{label}: {:?}", out.stats);
            assert_eq!(out.stats.errors, 0, "{label}: {:?}", out.stats);
        }
        ran.push(name(&rt));
    }
    ran_on(test, &ran);
}

// ---------------------------------------------------------------------------
// Host faults, isolated in a child process so that a crash fails one test

const CHILD_ENV: &str = "SHOAL_ADVERSARIAL_BACKEND";

/// Runs the ignored test `child` in a child process once per backend; it must exit 0.
fn in_child_per_backend(test: &str, child: &str) {
    let mut ran = Vec::new();
    for rt in runtimes(test) {
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", child, "--ignored", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, name(&rt))
            .output()
            .expect("spawn the child test");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: the host process died or failed running {child}: {} (a signal means a host fault)\n{stdout}\n{stderr}",
            name(&rt),
            out.status
        );
        assert!(stdout.contains("1 passed"), "{}: the child did not run {child}: {stdout}\n{stderr}", name(&rt));
        ran.push(name(&rt));
    }
    ran_on(test, &ran);
}

fn child_runtime() -> Runtime {
    let kind: BackendKind = std::env::var(CHILD_ENV).unwrap_or_else(|_| "cpu".into()).parse().expect("backend");
    Runtime::new(Arc::new(Device::open(kind).expect("the parent opened this backend"))).expect("runtime")
}

#[test]
fn an_empty_product_whose_c_ends_the_memory_is_not_a_host_fault() {
    in_child_per_backend(
        "an_empty_product_whose_c_ends_the_memory_is_not_a_host_fault",
        "child_empty_product_with_c_at_the_end_of_memory",
    );
}

#[test]
#[ignore = "run in a child process by an_empty_product_whose_c_ends_the_memory_is_not_a_host_fault"]
fn child_empty_product_with_c_at_the_end_of_memory() {
    let rt = child_runtime();
    let mut g = Guest::new();
    // m = 0 (and n = 0): C has no elements; its empty view at offset == memory size
    // is in bounds. The product is a valid no-op and must not touch byte 65536.
    let m0 = g.desc(Desc { m: 0, c: (PAGE.into(), 0), ..valid(C_AT) });
    let n0 = g.desc(Desc { n: 0, c: (PAGE.into(), 0), ..valid(C_AT) });
    g.expect("empty_m", &format!("(call $gemm (i32.const {m0}))"), 0);
    g.expect("empty_n", &format!("(call $gemm (i32.const {n0}))"), 0);
    g.expect("empty_m_async", &format!("(call $gemm_submit (i32.const {m0}) (i32.const 0xa0))"), 0);
    g.expect("empty_m_wait", "(call $fence_wait (i32.load (i32.const 0xa0)))", 0);
    let stats = run_ok(&rt, &g.wat("(memory (export \"memory\") 1)"));
    assert_eq!(stats.errors, 0, "{stats:?}");
}

#[test]
fn a_product_past_the_cuda_in_place_limit_does_not_abort_the_host() {
    in_child_per_backend(
        "a_product_past_the_cuda_in_place_limit_does_not_abort_the_host",
        "child_gemm_guest_with_operands_over_one_mib",
    );
}

#[test]
#[ignore = "run in a child process by a_product_past_the_cuda_in_place_limit_does_not_abort_the_host"]
fn child_gemm_guest_with_operands_over_one_mib() {
    let rt = child_runtime();
    // 3 × 300² f32 = 1.08 MB of operands: over the CUDA backend's 48 KiB in-place
    // limit, so CUDA moves them by DMA (other backends as usual).
    for extra in [None, Some("--async")] {
        let mut args: Vec<String> = ["--json", "--size", "300"].map(String::from).to_vec();
        args.extend(extra.map(String::from));
        let opts = RunOptions { args, capture_stdout: true, ..Default::default() };
        let out = rt.run(shoal_guests::GEMM, &opts).unwrap_or_else(|e| panic!("{}: {e}", name(&rt)));
        let stdout = String::from_utf8_lossy(out.stdout.as_deref().unwrap_or_default()).into_owned();
        assert_eq!(out.exit_code, 0, "{}: {stdout}", name(&rt));
        assert!(stdout.contains("\"correct\":90000"), "{}: {stdout}", name(&rt));
        eprintln!("{}: {}", name(&rt), stdout.trim());
    }
}
