//! The shoal guest SDK: safe Rust over the `shoal_v1` host functions.
//!
//! Build guests for `wasm32-wasip1`. Slices go in and out; the SDK passes their
//! offsets and lengths in the guest's own memory, and the host works on those bytes
//! in place (no copy out of the sandbox). Guest code needs no `unsafe`.
//!
//! ```ignore
//! use shoal_guest::Gemm;
//! let (m, n, k) = (2, 2, 2);
//! let a = [1.0f32, 2.0, 3.0, 4.0];
//! let b = [1.0f32, 0.0, 0.0, 1.0];
//! let mut c = [0.0f32; 4];
//! Gemm::new(m, n, k).run(&a, &b, &mut c).unwrap();
//! assert_eq!(c, a);
//! ```
//!
//! The layouts and status codes are those of `docs/abi.md`; the SDK encodes and decodes
//! them with the `shoal-abi` crate, which the host uses too. It is re-exported as [`abi`],
//! for what the SDK does not wrap (an f16 or bf16 GEMM descriptor, for instance).

#![no_std]

extern crate alloc;

use alloc::string::String;
use alloc::vec;
use core::fmt;
use core::marker::PhantomData;

/// The ABI's layouts, status codes and constants (the `shoal-abi` crate).
pub use shoal_abi as abi;

mod sys {
    #[link(wasm_import_module = "shoal_v1")]
    unsafe extern "C" {
        pub fn abi_version() -> i32;
        pub fn reply(bytes: *const u8, len: u32) -> i32;
        pub fn device_info(out: *mut u8) -> i32;
        pub fn gemm(desc: *const u8) -> i32;
        pub fn gemm_submit(desc: *const u8, fence_out: *mut u32) -> i32;
        pub fn fence_wait(fence: u32) -> i32;
        pub fn scal(x: *mut f32, len: u32, alpha: f32) -> i32;
        pub fn last_op(out: *mut u8) -> i32;
        pub fn last_error(buf: *mut u8, cap: u32, len_out: *mut u32) -> i32;
        pub fn buffer_create(len: u64, handle_out: *mut u32) -> i32;
        pub fn buffer_free(handle: u32) -> i32;
        pub fn buffer_write(handle: u32, offset: u64, src: *const u8, len: u32) -> i32;
        pub fn buffer_read(handle: u32, offset: u64, dst: *mut u8, len: u32) -> i32;
        pub fn model_open(name: *const u8, len: u32, out: *mut u32) -> i32;
        pub fn model_info(model: u32, out: *mut u8) -> i32;
        pub fn chat_render(
            model: u32,
            msgs: *const u8,
            n: u32,
            add_gen: u32,
            out: *mut u8,
            cap: u32,
            len_out: *mut u32,
        ) -> i32;
        pub fn tokenize(
            model: u32,
            text: *const u8,
            len: u32,
            special: u32,
            out: *mut u32,
            cap: u32,
            n_out: *mut u32,
        ) -> i32;
        pub fn token_piece(model: u32, id: u32, out: *mut u8, cap: u32, len_out: *mut u32) -> i32;
        pub fn session_create(model: u32, context: u32, out: *mut u32) -> i32;
        pub fn session_free(session: u32) -> i32;
        pub fn session_eval(session: u32, ids: *const u32, n: u32, logits: *mut f32, cap: u32) -> i32;
        pub fn session_decode(session: u32, ids: *const u32, n: u32, params: *const u8, out: *mut u32) -> i32;
        pub fn session_decode_top(
            session: u32,
            ids: *const u32,
            n: u32,
            params: *const u8,
            top: u32,
            out: *mut u8,
        ) -> i32;
        pub fn session_len(session: u32, out: *mut u32) -> i32;
        pub fn session_truncate(session: u32, n: u32) -> i32;
    }
}

/// A status code other than success, with the host's message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    /// The stable status code (see [`Error::name`]).
    pub code: i32,
    /// The host's explanation.
    pub message: String,
}

impl Error {
    fn from_code(code: i32) -> Error {
        Error { code, message: last_error() }
    }

    /// The status code's name.
    pub fn name(&self) -> &'static str {
        match abi::Status::from_i32(self.code) {
            Some(s) if !s.is_ok() => s.name(),
            _ => "unknown status",
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (status {}): {}", self.name(), self.code, self.message)
    }
}

/// Results of SDK calls.
pub type Result<T> = core::result::Result<T, Error>;

fn check(code: i32) -> Result<()> {
    if code == abi::Status::Ok.code() { Ok(()) } else { Err(Error::from_code(code)) }
}

/// The ABI version the host implements.
pub fn abi_version() -> u32 {
    // SAFETY: takes no arguments.
    unsafe { sys::abi_version() as u32 }
}

/// The host's explanation of the last failed call ("" if none).
pub fn last_error() -> String {
    let mut buf = vec![0u8; 512];
    let mut len = 0u32;
    // SAFETY: `buf` has `buf.len()` writable bytes and `len` is a writable u32.
    let st = unsafe { sys::last_error(buf.as_mut_ptr(), buf.len() as u32, &mut len) };
    if st != 0 {
        return String::new();
    }
    buf.truncate((len as usize).min(buf.len()));
    String::from_utf8_lossy(&buf).into_owned()
}

/// Which backend the host computes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The CPU.
    Cpu,
    /// Vulkan.
    Vulkan,
    /// CUDA.
    Cuda,
    /// Metal.
    Metal,
    /// A backend this SDK does not know.
    Other(u32),
}

/// What the host's device is.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// The ABI version.
    pub abi_version: u32,
    /// The backend.
    pub backend: Backend,
    /// Whether the device works on guest memory in place.
    pub in_place: bool,
    /// The adapter's name.
    pub name: String,
}

/// Asks the host what it computes on.
pub fn device_info() -> Result<DeviceInfo> {
    let mut b = [0u8; abi::DeviceInfo::SIZE];
    // SAFETY: `b` is writable and as long as the record.
    check(unsafe { sys::device_info(b.as_mut_ptr()) })?;
    let info = abi::DeviceInfo::from_bytes(&b);
    Ok(DeviceInfo {
        abi_version: info.abi_version,
        backend: match abi::Backend::from_u32(info.backend) {
            Some(abi::Backend::Cpu) => Backend::Cpu,
            Some(abi::Backend::Vulkan) => Backend::Vulkan,
            Some(abi::Backend::Cuda) => Backend::Cuda,
            Some(abi::Backend::Metal) => Backend::Metal,
            None => Backend::Other(info.backend),
        },
        in_place: info.in_place(),
        name: String::from_utf8_lossy(info.name()).into_owned(),
    })
}

/// How the last operation reached the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// On the guest's own pages.
    InPlace,
    /// Through one explicit copy.
    Copy,
    /// Through one DMA from registered guest pages.
    Dma,
    /// All operands were in device buffers.
    Device,
    /// A path this SDK does not know.
    Other(u32),
}

/// What the last operation did.
#[derive(Clone, Copy, Debug)]
pub struct OpInfo {
    /// The path taken.
    pub path: Path,
    /// Kernel dispatches.
    pub dispatches: u32,
    /// Bytes copied between host and device.
    pub bytes_copied: u64,
    /// Growth of the host's resident memory across the call.
    pub rss_delta_bytes: i64,
}

/// Reports the last operation.
pub fn last_op() -> Result<OpInfo> {
    let mut b = [0u8; abi::LastOp::SIZE];
    // SAFETY: `b` is writable and as long as the record.
    check(unsafe { sys::last_op(b.as_mut_ptr()) })?;
    let op = abi::LastOp::from_bytes(&b);
    Ok(OpInfo {
        path: match abi::Path::from_u32(op.path) {
            Some(abi::Path::InPlace) => Path::InPlace,
            Some(abi::Path::Copy) => Path::Copy,
            Some(abi::Path::Dma) => Path::Dma,
            Some(abi::Path::Device) => Path::Device,
            None => Path::Other(op.path),
        },
        dispatches: op.dispatches,
        bytes_copied: op.bytes_copied,
        rss_delta_bytes: op.rss_delta_bytes,
    })
}

/// `C = alpha·op(A)·op(B) + beta·C` on row-major f32 matrices.
///
/// `op(A)` is `m×k`, `op(B)` is `k×n`, C is `m×n`. Row strides default to the
/// packed ones.
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    m: u32,
    n: u32,
    k: u32,
    trans_a: bool,
    trans_b: bool,
    lda: Option<u32>,
    ldb: Option<u32>,
    ldc: Option<u32>,
    alpha: f32,
    beta: f32,
}

impl Gemm {
    /// A product of an `m×k` and a `k×n` matrix, `alpha = 1`, `beta = 0`.
    pub fn new(m: u32, n: u32, k: u32) -> Gemm {
        Gemm { m, n, k, trans_a: false, trans_b: false, lda: None, ldb: None, ldc: None, alpha: 1.0, beta: 0.0 }
    }
    /// Use Aᵀ (A stored `k×m`).
    pub fn trans_a(mut self, t: bool) -> Self {
        self.trans_a = t;
        self
    }
    /// Use Bᵀ (B stored `n×k`).
    pub fn trans_b(mut self, t: bool) -> Self {
        self.trans_b = t;
        self
    }
    /// Row strides of the stored A, B and C, in elements.
    pub fn strides(mut self, lda: u32, ldb: u32, ldc: u32) -> Self {
        (self.lda, self.ldb, self.ldc) = (Some(lda), Some(ldb), Some(ldc));
        self
    }
    /// The scales.
    pub fn scale(mut self, alpha: f32, beta: f32) -> Self {
        (self.alpha, self.beta) = (alpha, beta);
        self
    }

    fn desc(&self, a: &[f32], b: &[f32], c: &[f32]) -> [u8; abi::GemmDesc::SIZE_WITH_HANDLES] {
        self.desc_in([
            (a.as_ptr() as u64, a.len(), 0),
            (b.as_ptr() as u64, b.len(), 0),
            (c.as_ptr() as u64, c.len(), 0),
        ])
    }

    /// The descriptor and its buffer handles (read by the host only when one is non-zero),
    /// with each operand as (offset, elements, buffer handle or 0).
    fn desc_in(&self, views: [(u64, usize, u32); 3]) -> [u8; abi::GemmDesc::SIZE_WITH_HANDLES] {
        let [a, b, c] = views.map(|(offset, len, _)| abi::View { offset, len: (len as u64) * 4 });
        let handles = abi::GemmHandles { a: views[0].2, b: views[1].2, c: views[2].2 };
        let flag = |on: bool, bit: u32| if on { bit } else { 0 };
        let flags = flag(self.trans_a, abi::GEMM_TRANS_A)
            | flag(self.trans_b, abi::GEMM_TRANS_B)
            | flag(handles.any(), abi::GEMM_BUFFERS);
        let desc = abi::GemmDesc {
            dtype: abi::DType::F32.code(),
            flags,
            m: self.m,
            n: self.n,
            k: self.k,
            lda: self.lda.unwrap_or(if self.trans_a { self.m } else { self.k }),
            ldb: self.ldb.unwrap_or(if self.trans_b { self.k } else { self.n }),
            ldc: self.ldc.unwrap_or(self.n),
            alpha: self.alpha,
            beta: self.beta,
            a,
            b,
            c,
        };
        desc.to_bytes_with_handles(&handles)
    }

    /// Runs the product on operands in guest memory or in device buffers (data that
    /// stays on the device between products: no transfer at all).
    pub fn run_on(&self, a: Src<'_>, b: Src<'_>, c: Dst<'_>) -> Result<()> {
        let d = self.desc_in([a.view(), b.view(), c.view()]);
        // SAFETY: the descriptor names only these slices and buffers; the host checks
        // every view and writes only C, which is borrowed mutably for the call.
        check(unsafe { sys::gemm(d.as_ptr()) })
    }

    /// Runs the product; returns when C holds the result.
    pub fn run(&self, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<()> {
        let d = self.desc(a, b, c);
        // SAFETY: the descriptor names only these slices, by their own pointers and
        // lengths; the host checks every view before use and writes only C, which
        // we borrow mutably for the call.
        check(unsafe { sys::gemm(d.as_ptr()) })
    }

    /// Starts the product and returns at once; A, B and C stay borrowed until the
    /// returned [`Pending`] is waited for (or dropped, which waits).
    pub fn submit<'a>(&self, a: &'a [f32], b: &'a [f32], c: &'a mut [f32]) -> Result<Pending<'a>> {
        let d = self.desc(a, b, c);
        let mut fence = 0u32;
        // SAFETY: as in `run`; the borrows in `Pending` keep the slices untouched by
        // safe code until the host is done.
        check(unsafe { sys::gemm_submit(d.as_ptr(), &mut fence) })?;
        Ok(Pending { fence, done: false, _borrow: PhantomData })
    }
}

/// A GEMM input: a guest slice or a device buffer.
#[derive(Clone, Copy, Debug)]
pub enum Src<'a> {
    /// f32 elements in guest memory.
    Guest(&'a [f32]),
    /// A device buffer (from element 0).
    Device(&'a DeviceBuffer),
}

/// A GEMM output: a guest slice or a device buffer.
#[derive(Debug)]
pub enum Dst<'a> {
    /// f32 elements in guest memory.
    Guest(&'a mut [f32]),
    /// A device buffer (from element 0).
    Device(&'a mut DeviceBuffer),
}

impl Src<'_> {
    fn view(&self) -> (u64, usize, u32) {
        match self {
            Src::Guest(s) => (s.as_ptr() as u64, s.len(), 0),
            Src::Device(b) => (0, b.len, b.handle),
        }
    }
}

impl Dst<'_> {
    fn view(&self) -> (u64, usize, u32) {
        match self {
            Dst::Guest(s) => (s.as_ptr() as u64, s.len(), 0),
            Dst::Device(b) => (0, b.len, b.handle),
        }
    }
}

/// f32 data that stays in device memory between operations. Freed on drop.
#[derive(Debug)]
pub struct DeviceBuffer {
    handle: u32,
    len: usize,
}

impl DeviceBuffer {
    /// A zeroed buffer of `len` f32 elements on the host's device.
    pub fn new(len: usize) -> Result<DeviceBuffer> {
        let mut handle = 0u32;
        // SAFETY: `handle` is a writable u32.
        check(unsafe { sys::buffer_create((len as u64) * 4, &mut handle) })?;
        Ok(DeviceBuffer { handle, len })
    }
    /// Elements in the buffer.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Copies `src` into the buffer from element `at`.
    pub fn write(&mut self, at: usize, src: &[f32]) -> Result<()> {
        // SAFETY: names exactly `src`; the host checks both ranges.
        check(unsafe {
            sys::buffer_write(self.handle, (at as u64) * 4, src.as_ptr() as *const u8, (src.len() * 4) as u32)
        })
    }
    /// Copies elements from `at` into `dst`.
    pub fn read(&self, at: usize, dst: &mut [f32]) -> Result<()> {
        // SAFETY: names exactly `dst`, borrowed mutably; the host checks both ranges.
        check(unsafe {
            sys::buffer_read(self.handle, (at as u64) * 4, dst.as_mut_ptr() as *mut u8, (dst.len() * 4) as u32)
        })
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: takes a handle only.
        let _ = unsafe { sys::buffer_free(self.handle) };
    }
}

/// An operation in flight. Waits on drop if not waited for.
#[derive(Debug)]
pub struct Pending<'a> {
    fence: u32,
    done: bool,
    _borrow: PhantomData<&'a mut [f32]>,
}

impl Pending<'_> {
    /// Blocks until the result is in guest memory.
    pub fn wait(mut self) -> Result<()> {
        self.done = true;
        // SAFETY: takes a handle only.
        check(unsafe { sys::fence_wait(self.fence) })
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.done {
            // SAFETY: takes a handle only.
            let _ = unsafe { sys::fence_wait(self.fence) };
        }
    }
}

/// `x = alpha·x` on the device.
pub fn scal(x: &mut [f32], alpha: f32) -> Result<()> {
    // SAFETY: names exactly `x`, borrowed mutably for the call.
    check(unsafe { sys::scal(x.as_mut_ptr(), (x.len() * 4) as u32, alpha) })
}

/// A model the host has loaded, opened by name (shared with every other guest).
#[derive(Debug)]
pub struct Model {
    handle: u32,
    /// What the model is.
    pub info: ModelInfo,
}

/// A model's vocabulary and special tokens.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// Tokens in the vocabulary.
    pub vocab_size: u32,
    /// The longest context the model was trained for.
    pub context_length: u32,
    /// Beginning of sequence, if any.
    pub bos: Option<u32>,
    /// End of sequence, if any.
    pub eos: Option<u32>,
    /// Tokens that end an assistant turn.
    pub stop: alloc::vec::Vec<u32>,
}

impl Model {
    /// Opens the host's model `name` (e.g. "smollm2").
    pub fn open(name: &str) -> Result<Model> {
        let mut handle = 0u32;
        // SAFETY: names exactly `name` and a writable u32.
        check(unsafe { sys::model_open(name.as_ptr(), name.len() as u32, &mut handle) })?;
        let mut b = [0u8; abi::ModelInfo::SIZE];
        // SAFETY: writable and as long as the record.
        check(unsafe { sys::model_info(handle, b.as_mut_ptr()) })?;
        let r = abi::ModelInfo::from_bytes(&b);
        let info = ModelInfo {
            vocab_size: r.vocab_size,
            context_length: r.context_length,
            bos: r.bos_id(),
            eos: r.eos_id(),
            stop: r.stop_ids().to_vec(),
        };
        Ok(Model { handle, info })
    }

    /// The conversation `(role, content)` rendered with the model's chat template.
    pub fn render(&self, messages: &[(&str, &str)], add_generation_prompt: bool) -> Result<String> {
        let table: alloc::vec::Vec<u8> = messages
            .iter()
            .flat_map(|(r, c)| {
                abi::ChatMessage {
                    role_ptr: r.as_ptr() as u32,
                    role_len: r.len() as u32,
                    content_ptr: c.as_ptr() as u32,
                    content_len: c.len() as u32,
                }
                .to_bytes()
            })
            .collect();
        let mut cap = 4096usize;
        loop {
            let mut out = vec![0u8; cap];
            let mut len = 0u32;
            // SAFETY: the table names our strings; `out` has `cap` writable bytes.
            let st = unsafe {
                sys::chat_render(
                    self.handle,
                    table.as_ptr(),
                    messages.len() as u32,
                    u32::from(add_generation_prompt),
                    out.as_mut_ptr(),
                    cap as u32,
                    &mut len,
                )
            };
            if st == abi::Status::TooSmall.code() && len as usize > cap {
                cap = len as usize;
                continue;
            }
            check(st)?;
            out.truncate(len as usize);
            return Ok(String::from_utf8_lossy(&out).into_owned());
        }
    }

    /// Token ids of `text` (`special`: match special tokens such as `<|im_start|>`).
    pub fn tokenize(&self, text: &str, special: bool) -> Result<alloc::vec::Vec<u32>> {
        let mut cap = text.len() + 16;
        loop {
            let mut out = vec![0u32; cap];
            let mut n = 0u32;
            // SAFETY: names `text` and `cap` writable u32s.
            let st = unsafe {
                sys::tokenize(
                    self.handle,
                    text.as_ptr(),
                    text.len() as u32,
                    u32::from(special),
                    out.as_mut_ptr(),
                    cap as u32,
                    &mut n,
                )
            };
            if st == abi::Status::TooSmall.code() && n as usize > cap {
                cap = n as usize;
                continue;
            }
            check(st)?;
            out.truncate(n as usize);
            return Ok(out);
        }
    }

    /// The bytes of one token (may be part of a UTF-8 character).
    pub fn piece(&self, id: u32) -> Result<alloc::vec::Vec<u8>> {
        let mut out = vec![0u8; 256];
        let mut len = 0u32;
        // SAFETY: 256 writable bytes.
        check(unsafe { sys::token_piece(self.handle, id, out.as_mut_ptr(), 256, &mut len) })?;
        out.truncate(len as usize);
        Ok(out)
    }
}

/// How to pick the next token (greedy when `temperature` is 0).
#[derive(Clone, Copy, Debug)]
pub struct SamplerParams {
    /// Softmax temperature; 0 = greedy.
    pub temperature: f32,
    /// Keep the k most likely (0 = all).
    pub top_k: u32,
    /// Keep the smallest set with this much probability (1 = all).
    pub top_p: f32,
    /// Penalty on recently seen tokens (1 = none).
    pub repetition_penalty: f32,
    /// Seed: the same seed gives the same tokens.
    pub seed: u64,
}

impl SamplerParams {
    /// The ABI's record of these settings.
    fn record(&self) -> [u8; abi::SamplerParams::SIZE] {
        abi::SamplerParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        }
        .to_bytes()
    }
}

impl Default for SamplerParams {
    fn default() -> Self {
        SamplerParams { temperature: 0.0, top_k: 40, top_p: 0.95, repetition_penalty: 1.0, seed: 0 }
    }
}

/// A conversation's state on the host: its own KV cache.
#[derive(Debug)]
pub struct Session {
    handle: u32,
}

impl Session {
    /// A session on `model` with room for `context` tokens (0: the host's default).
    pub fn new(model: &Model, context: u32) -> Result<Session> {
        let mut handle = 0u32;
        // SAFETY: a writable u32.
        check(unsafe { sys::session_create(model.handle, context, &mut handle) })?;
        Ok(Session { handle })
    }

    /// Runs `ids` through the model (appends them to the cache), without sampling.
    pub fn eval(&mut self, ids: &[u32]) -> Result<()> {
        // SAFETY: names exactly `ids`; no logits are written.
        check(unsafe { sys::session_eval(self.handle, ids.as_ptr(), ids.len() as u32, core::ptr::null_mut(), 0) })
    }

    /// Runs `ids` through the model and writes the last token's logits into `logits`.
    pub fn eval_logits(&mut self, ids: &[u32], logits: &mut [f32]) -> Result<()> {
        // SAFETY: names exactly `ids` and `logits` (borrowed mutably).
        check(unsafe {
            sys::session_eval(self.handle, ids.as_ptr(), ids.len() as u32, logits.as_mut_ptr(), logits.len() as u32)
        })
    }

    /// Runs `ids` through the model and samples the next token.
    pub fn decode(&mut self, ids: &[u32], params: &SamplerParams) -> Result<u32> {
        let p = params.record();
        let mut next = 0u32;
        // SAFETY: names `ids`, the sampler record and a writable u32.
        check(unsafe { sys::session_decode(self.handle, ids.as_ptr(), ids.len() as u32, p.as_ptr(), &mut next) })?;
        Ok(next)
    }

    /// Like [`Session::decode`], and also returns the chosen token's log-probability and the
    /// `top` most likely tokens with theirs (most likely first; `top` at most
    /// [`abi::TokenLogprob::MAX_TOP`]): `(chosen, alternatives)`.
    pub fn decode_top(
        &mut self,
        ids: &[u32],
        params: &SamplerParams,
        top: u32,
    ) -> Result<(abi::TokenLogprob, alloc::vec::Vec<abi::TokenLogprob>)> {
        let p = params.record();
        let mut out = vec![0u8; (1 + top as usize) * abi::TokenLogprob::SIZE];
        // SAFETY: names `ids`, the sampler record and `out`, room for `1 + top` records.
        check(unsafe {
            sys::session_decode_top(self.handle, ids.as_ptr(), ids.len() as u32, p.as_ptr(), top, out.as_mut_ptr())
        })?;
        let mut records = out.chunks_exact(abi::TokenLogprob::SIZE).map(|c| {
            let mut b = [0u8; abi::TokenLogprob::SIZE];
            b.copy_from_slice(c);
            abi::TokenLogprob::from_bytes(&b)
        });
        let chosen = records.next().unwrap_or_default();
        Ok((chosen, records.collect()))
    }

    /// Tokens in the cache.
    pub fn len(&self) -> Result<u32> {
        let mut n = 0u32;
        // SAFETY: a writable u32.
        check(unsafe { sys::session_len(self.handle, &mut n) })?;
        Ok(n)
    }

    /// Keeps only the first `n` tokens of the cache.
    pub fn truncate(&mut self, n: u32) -> Result<()> {
        // SAFETY: takes a handle and a count.
        check(unsafe { sys::session_truncate(self.handle, n) })
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: takes a handle only.
        let _ = unsafe { sys::session_free(self.handle) };
    }
}

/// Actors: a guest that handles messages, one at a time, and keeps its state in its own
/// memory between them (so that it can be snapshotted, moved and resumed).
///
/// ```ignore
/// struct Echo { seen: u32 }
/// impl shoal_guest::actor::Actor for Echo {
///     fn start() -> Self { Echo { seen: 0 } }
///     fn on_message(&mut self, msg: &[u8]) -> i32 {
///         self.seen += 1;
///         shoal_guest::actor::reply(msg).map_or(1, |_| 0)
///     }
/// }
/// shoal_guest::export_actor!(Echo);
/// ```
///
/// Build it as a `cdylib` for `wasm32-wasip1` (a WASI reactor); `docs/abi.md` ("Actors")
/// describes the exports the macro writes.
pub mod actor {
    use core::cell::UnsafeCell;

    /// An actor's behaviour.
    pub trait Actor: Sized {
        /// Makes the actor's state, at its first message.
        fn start() -> Self;
        /// Handles one message; 0 is success, anything else an error code the host reports.
        fn on_message(&mut self, msg: &[u8]) -> i32;
    }

    /// Sends bytes of the reply to the current message (call it as often as you like: the
    /// host streams each part as it comes).
    pub fn reply(bytes: &[u8]) -> crate::Result<()> {
        // SAFETY: the host reads `len` bytes at `bytes` from this instance's memory, which
        // the slice covers, and keeps no reference after the call.
        crate::check(unsafe { crate::sys::reply(bytes.as_ptr(), bytes.len() as u32) })
    }

    /// A writer whose bytes go to [`reply`].
    #[derive(Debug, Default)]
    pub struct Reply;

    impl core::fmt::Write for Reply {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            reply(s.as_bytes()).map_err(|_| core::fmt::Error)
        }
    }

    /// The actor's state (used by [`crate::export_actor!`]).
    #[doc(hidden)]
    pub struct Slot<T>(UnsafeCell<Option<T>>);

    // SAFETY: a wasm32 guest has one thread, and the host never calls into an instance
    // while another call is running on it; the slot is never shared across threads.
    unsafe impl<T> Sync for Slot<T> {}

    impl<T: Actor> Slot<T> {
        #[doc(hidden)]
        pub const fn new() -> Self {
            Slot(UnsafeCell::new(None))
        }

        #[doc(hidden)]
        pub fn handle(&self, msg: &[u8]) -> i32 {
            // SAFETY: see the `Sync` impl: no other reference to the slot's content exists
            // during this call (the host does not re-enter the handler).
            let state = unsafe { &mut *self.0.get() };
            state.get_or_insert_with(T::start).on_message(msg)
        }
    }

    /// Room for a message of `len` bytes (the `shoal_actor_alloc` export).
    #[doc(hidden)]
    pub fn alloc(len: u32) -> *mut u8 {
        let layout = core::alloc::Layout::from_size_align(len.max(1) as usize, 1).expect("a byte layout");
        // SAFETY: the layout has a non-zero size.
        unsafe { alloc::alloc::alloc(layout) }
    }

    /// Takes the message the host wrote at `ptr` (from [`alloc`]) and frees its room.
    ///
    /// # Safety
    /// `ptr` must come from [`alloc`] with the same `len`, and be used once.
    #[doc(hidden)]
    pub unsafe fn take(ptr: *mut u8, len: u32) -> alloc::vec::Vec<u8> {
        // SAFETY: the caller guarantees `ptr` holds `len` bytes allocated by `alloc`.
        let v = unsafe { core::slice::from_raw_parts(ptr, len as usize) }.to_vec();
        let layout = core::alloc::Layout::from_size_align(len.max(1) as usize, 1).expect("a byte layout");
        // SAFETY: same pointer and layout as the allocation.
        unsafe { alloc::alloc::dealloc(ptr, layout) };
        v
    }
}

/// Exports the actor handler ABI (`shoal_actor_alloc`, `shoal_actor_message`) for a type
/// implementing [`actor::Actor`].
#[macro_export]
macro_rules! export_actor {
    ($t:ty) => {
        static __SHOAL_ACTOR: $crate::actor::Slot<$t> = $crate::actor::Slot::new();

        /// Room for a message (the host writes it there).
        #[unsafe(no_mangle)]
        pub extern "C" fn shoal_actor_alloc(len: u32) -> *mut u8 {
            $crate::actor::alloc(len)
        }

        /// Handles the message at `ptr`.
        #[unsafe(no_mangle)]
        pub extern "C" fn shoal_actor_message(ptr: usize, len: u32) -> i32 {
            if ptr == 0 {
                return -1;
            }
            // SAFETY: the host passes the room `shoal_actor_alloc(len)` returned, once (an
            // address in this instance's memory, which is what a wasm32 pointer is).
            let msg = unsafe { $crate::actor::take(ptr as *mut u8, len) };
            __SHOAL_ACTOR.handle(&msg)
        }
    };
}
