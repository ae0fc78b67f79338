//! Every request's id, log line and count. A request gets an id (the client's
//! `x-request-id` when it is 1 to 64 characters of `A-Z a-z 0-9 . _ -`, else one of the
//! daemon's), returned in the answer's `x-request-id`; what is logged while it is handled
//! is in a `request` span carrying it (and `actor=ID` once the actor is known); and one line
//! at info (target `shoal_server::request`) says its method, path, status, duration and id.
//! It is counted in [`crate::metrics`] by route template, never by the path sent.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use crate::metrics::{self, Metrics};

/// The header a request's id travels in.
pub const HEADER: &str = "x-request-id";
/// The longest request id taken from a client.
const MAX_ID: usize = 64;

/// Ids of this daemon: a per-process prefix (its start time) and a counter.
fn next_id() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    static PREFIX: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let p = PREFIX.get_or_init(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        (t.as_nanos() as u32) ^ std::process::id().rotate_left(16)
    });
    format!("{p:08x}-{:06}", N.fetch_add(1, Ordering::Relaxed) + 1)
}

/// The client's id, when it is one the daemon keeps.
fn given(req: &Request) -> Option<String> {
    let v = req.headers().get(HEADER)?.to_str().ok()?;
    let ok = (1..=MAX_ID).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    ok.then(|| v.to_string())
}

/// The middleware (outermost: it sees the guard's refusals too).
pub async fn layer(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let id = given(&req).unwrap_or_else(next_id);
    let method = req.method().clone();
    let path = crate::error::shown(req.uri().path(), 128);
    let route = metrics::route(req.uri().path());
    let span = tracing::info_span!("request", id = %id, actor = tracing::field::Empty);
    let mut r = next.run(req).instrument(span.clone()).await;
    let took = t0.elapsed();
    let status = r.status().as_u16();
    metrics.request(route, status, took);
    if let Ok(v) = HeaderValue::from_str(&id) {
        r.headers_mut().insert(HEADER, v);
    }
    span.in_scope(|| {
        tracing::info!(
            target: "shoal_server::request",
            method = %method,
            path = %path,
            status,
            ms = format_args!("{:.1}", took.as_secs_f64() * 1e3),
            "request"
        );
    });
    r
}

/// Marks the current request's span with the actor it is about.
pub fn actor(id: u64) {
    tracing::Span::current().record("actor", id);
}
