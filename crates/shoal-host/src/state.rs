//! The state of one core-module instance: WASI, and one state per ABI (`ComputeCtx`,
//! `InferCtx`, `NnCtx`), with what they share: the instance's limits, its budget, its
//! interrupt and the current message's reply sink.
//!
//! Dependencies point one way: this module aggregates the ABIs; each ABI reaches its own
//! state through a small trait (`ComputeHost`, `InferHost`, `NnHost`) that only this module
//! implements.

use std::sync::Arc;

use shoal_gpu::Device;
use wasmtime::{Engine, Store, UpdateDeadline};
use wasmtime_wasi::p1::WasiP1Ctx;

use crate::budget::{Interrupt, Limits, MemoryLimiter, Quota, human_bytes};
use crate::compute::{ComputeCtx, ComputeHost};
use crate::error::{GuestError, Kind, err};
use crate::infer::{InferCtx, InferHost};
use crate::models::Models;
use crate::nn::{NnCtx, NnHost};
use crate::v1::{CallLog, GuestStats, V1Host};

/// Where an actor's replies go while it handles a message. It returns `false` when the
/// reply's reader has gone (the client disconnected, or the actor is being stopped): the
/// guest's `reply` then fails, so that it stops the message rather than go on for no one.
/// A sink may block while its reader is slow (backpressure), but must give up once the
/// instance's [`Interrupt`] is killed or past its deadline.
pub type ReplySink = Box<dyn FnMut(&[u8]) -> bool + Send>;

/// What a guest's `reply` fails with once its reader has gone.
pub(crate) const READER_GONE: &str = "the reply's reader has gone (the client disconnected): stop this message";

/// Per-instance state of a core module: WASI and the ABIs' tables.
pub struct HostState {
    pub(crate) wasi: WasiP1Ctx,
    pub(crate) compute: ComputeCtx,
    pub(crate) infer: InferCtx,
    pub(crate) nn: NnCtx,
    v1: CallLog,
    limiter: MemoryLimiter,
    pub(crate) quota: Quota,
    pub(crate) limits: Limits,
    pub(crate) interrupt: Interrupt,
    /// The current message's reply sink (actors only), and the bytes replied so far.
    reply: Option<(ReplySink, u64)>,
}

impl HostState {
    pub(crate) fn new(
        wasi: WasiP1Ctx,
        device: Arc<Device>,
        models: Arc<Models>,
        limits: &Limits,
        measure_rss: bool,
    ) -> HostState {
        let quota = Quota::new(limits);
        HostState {
            wasi,
            compute: ComputeCtx::new(device, quota.budget.clone(), measure_rss),
            infer: InferCtx::new(models.clone(), quota.clone()),
            nn: NnCtx::new(models, quota.clone()),
            v1: CallLog::default(),
            limiter: MemoryLimiter::new(quota.budget.clone()),
            quota,
            limits: limits.clone(),
            interrupt: Interrupt::new(),
            reply: None,
        }
    }

    /// The statistics of the run so far (waits for work in flight).
    pub(crate) fn stats(&mut self) -> GuestStats {
        let mut s = self.compute.finish();
        s.calls = self.v1.calls;
        s.errors = self.v1.errors;
        s.last_error = self.v1.last_error.clone().or_else(|| self.nn.last_error.clone());
        s.prefill_tokens = self.infer.prefill_tokens;
        s.prefill_seconds = self.infer.prefill_seconds;
        s.decode_steps = self.infer.decode_steps;
        s.decode_seconds = self.infer.decode_seconds;
        s.peak_charged_bytes = self.quota.budget.peak();
        s
    }

    /// Whether any session or wasi-nn context holds a KV cache.
    pub(crate) fn has_caches(&self) -> bool {
        self.infer.has_sessions() || self.nn.has_caches()
    }

    /// Sets the sink of the message about to be handled (`None` after it).
    pub(crate) fn set_reply(&mut self, sink: Option<ReplySink>) {
        self.reply = sink.map(|s| (s, 0));
    }
}

impl V1Host for HostState {
    fn v1_log(&mut self) -> &mut CallLog {
        &mut self.v1
    }
}

impl ComputeHost for HostState {
    fn compute(&mut self) -> &mut ComputeCtx {
        &mut self.compute
    }

    fn reply(&mut self, bytes: &[u8]) -> Result<(), GuestError> {
        let most = self.limits.max_reply_bytes;
        let Some((sink, sent)) = self.reply.as_mut() else {
            return Err(err(Kind::InvalidArgument, "reply outside a message handler (the instance is not an actor)"));
        };
        let total = *sent + bytes.len() as u64;
        if total > most {
            return Err(err(
                Kind::LimitExceeded,
                format!(
                    "the replies to one message would reach {}, past the limit of {} (max_reply_bytes)",
                    human_bytes(total),
                    human_bytes(most)
                ),
            ));
        }
        *sent = total;
        if !sink(bytes) {
            return Err(err(Kind::Busy, READER_GONE));
        }
        Ok(())
    }
}

impl InferHost for HostState {
    fn infer(&mut self) -> &mut InferCtx {
        &mut self.infer
    }
}

impl NnHost for HostState {
    fn nn(&mut self) -> &mut NnCtx {
        &mut self.nn
    }
}

/// What every store of this crate needs to be bounded: a memory limiter, and an interrupt
/// checked at every epoch tick.
pub(crate) trait Bounded: Send + 'static {
    fn limiter(&mut self) -> &mut MemoryLimiter;
    fn interrupt(&self) -> &Interrupt;
}

impl Bounded for HostState {
    fn limiter(&mut self) -> &mut MemoryLimiter {
        &mut self.limiter
    }
    fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }
}

/// A store for `state` whose linear memory is charged to its budget and whose guest code
/// stops within a tick of the epoch once its interrupt is killed or past its deadline.
pub(crate) fn bounded_store<T: Bounded>(engine: &Engine, state: T) -> Store<T> {
    let mut store = Store::new(engine, state);
    store.limiter(|s| s.limiter());
    store.epoch_deadline_callback(|cx| {
        if cx.data().interrupt().check().is_err() {
            return Err(wasmtime::Trap::Interrupt.into());
        }
        Ok(UpdateDeadline::Continue(1))
    });
    store.set_epoch_deadline(1);
    store
}
