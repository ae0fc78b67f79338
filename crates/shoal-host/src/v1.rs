//! What every `shoal_v1` call shares, compute and inference alike: the log of calls behind
//! `last_error` and the guest's statistics, and the one function that turns a call's result
//! into its status (or stops the guest when the call was interrupted).

use wasmtime::Caller;

use crate::error::{GuestError, Status};

/// The import module name of this ABI version.
pub const MODULE: &str = shoal_abi::MODULE;

/// Calls, failures and the last failure's message, for `last_error` and the run's report.
#[derive(Debug, Default, Clone)]
pub(crate) struct CallLog {
    pub(crate) calls: u64,
    pub(crate) errors: u64,
    pub(crate) last_error: Option<String>,
}

/// A store whose guests call `shoal_v1`.
pub(crate) trait V1Host: Send + 'static {
    /// The instance's call log.
    fn v1_log(&mut self) -> &mut CallLog;
}

/// Turns a result into a status, remembering the message for `last_error`. An interrupted
/// call (deadline, kill) stops the guest instead: a trap, which the epoch check would raise
/// at its next instruction anyway.
pub(crate) fn finish<T: V1Host>(
    caller: &mut Caller<'_, T>,
    name: &str,
    r: Result<(), GuestError>,
) -> wasmtime::Result<i32> {
    let log = caller.data_mut().v1_log();
    log.calls += 1;
    match r {
        Ok(()) => Ok(Status::Ok as i32),
        Err(e) => {
            if let Some(why) = e.interrupted() {
                log::info!("guest call {MODULE}::{name} stopped: {why}");
                return Err(wasmtime::Trap::Interrupt.into());
            }
            log.errors += 1;
            let status = e.status();
            log::debug!("guest call {MODULE}::{name} failed ({status:?}): {}", e.message);
            log.last_error = Some(format!("{name}: {}", e.message));
            Ok(status as i32)
        }
    }
}

/// What one instance did through the ABI (the CLI reports it).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GuestStats {
    /// Calls to `shoal_v1` functions.
    pub calls: u64,
    /// Calls that returned an error status.
    pub errors: u64,
    /// Operations that ran on the device (GEMM, scal).
    pub ops: u64,
    /// Operations that worked on the guest's own pages (pointer identity).
    pub in_place_ops: u64,
    /// Bytes copied between host and device over all operations.
    pub bytes_copied: u64,
    /// Largest growth of resident memory across one operation, in bytes.
    pub max_rss_delta_bytes: i64,
    /// Seconds spent in operations (submit to completion).
    pub op_seconds: f64,
    /// The last operation's report.
    pub last_report: Option<shoal_gpu::OpReport>,
    /// The last error message.
    pub last_error: Option<String>,
    /// Prompt tokens evaluated (several per call) and the seconds they took.
    pub prefill_tokens: u64,
    /// Seconds of prompt evaluation.
    pub prefill_seconds: f64,
    /// One-token evaluations (decode steps) and their seconds.
    pub decode_steps: u64,
    /// Seconds of decode steps.
    pub decode_seconds: f64,
    /// The most bytes the instance held at once against its `--max-memory` (linear memory,
    /// device buffers, KV caches, models from bytes).
    pub peak_charged_bytes: u64,
}
