//! Guests' stderr as log lines (when the runtime is told to, as `shoal serve`'s are): each
//! line a guest writes to stderr is logged at info under the target `shoal_host::guest`, in
//! whatever span the writing thread is in (an actor's thread is in one naming the actor).
//! Lines are cut at [`MAX_LINE`] bytes, control characters escaped, so a guest can neither
//! forge log lines nor grow the host's memory through its stderr.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// The longest line kept before it is logged as it is.
pub const MAX_LINE: usize = 4096;

/// A guest's stderr, logged line by line.
#[derive(Clone, Default)]
pub struct GuestStderr {
    /// The line being written (shared by every stream of the guest's stderr).
    line: Arc<Mutex<Vec<u8>>>,
}

impl GuestStderr {
    fn push(&self, bytes: &[u8]) {
        let mut line = self.line.lock().unwrap_or_else(|e| e.into_inner());
        for &b in bytes {
            if b == b'\n' {
                emit(&line);
                line.clear();
            } else {
                line.push(b);
                if line.len() >= MAX_LINE {
                    emit(&line);
                    line.clear();
                }
            }
        }
    }
}

fn emit(line: &[u8]) {
    let text: String = String::from_utf8_lossy(line).chars().flat_map(char::escape_debug).collect();
    log::info!(target: "shoal_host::guest", "{}", text.trim_end_matches("\\r"));
}

impl Drop for GuestStderr {
    fn drop(&mut self) {
        // The last clone logs what is left of an unfinished line.
        if Arc::strong_count(&self.line) == 1 {
            let line = self.line.lock().unwrap_or_else(|e| e.into_inner());
            if !line.is_empty() {
                emit(&line);
            }
        }
    }
}

impl IsTerminal for GuestStderr {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestStderr {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestStderr {
    async fn ready(&mut self) {}
}

impl OutputStream for GuestStderr {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 << 10)
    }
}

impl tokio::io::AsyncWrite for GuestStderr {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
