//! `GET /metrics`: the daemon's counters in Prometheus' text format (version 0.0.4), written
//! by hand from atomics and small maps. Every label set is bounded: requests are counted by
//! route template (`/v1/actors/{id}`, never the path a client sent; paths the API lacks are
//! `other`) and status, so no client can grow the daemon's memory through its metrics.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The upper bounds of the latency histogram's buckets, in seconds (then `+Inf`).
const BUCKETS: [f64; 13] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The routes of the API, as templates (what requests are counted by).
const ROUTES: &[&str] = &[
    "/health",
    "/metrics",
    "/v1/actors",
    "/v1/actors/{id}",
    "/v1/actors/{id}/messages",
    "/v1/actors/{id}/pause",
    "/v1/actors/{id}/resume",
    "/v1/actors/{id}/snapshot",
    "/v1/actors/{id}/move",
    "/v1/snapshots",
    "/v1/snapshots/{key}",
    "/v1/snapshots/{key}/restore",
    "/v1/modules",
    "/v1/models",
    "/v1/models/{id}",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
];

/// The template of the route `path` matches, or `other`.
pub fn route(path: &str) -> &'static str {
    let segs: Vec<&str> = path.split('/').collect();
    ROUTES
        .iter()
        .find(|r| {
            let t: Vec<&str> = r.split('/').collect();
            t.len() == segs.len() && t.iter().zip(&segs).all(|(t, s)| (t.starts_with('{') && !s.is_empty()) || t == s)
        })
        .copied()
        .unwrap_or("other")
}

#[derive(Default)]
struct Histogram {
    /// Counts per bucket (not cumulative), the last for `+Inf`.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

/// The daemon's counters.
#[derive(Default)]
pub struct Metrics {
    /// Requests by (route template, status).
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// Time to the answer's head, by route template.
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    /// Tokens generated for the OpenAI endpoint's answers.
    tokens: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the registry and the pool hold now, sampled when `/metrics` is read.
#[derive(Default)]
pub struct Gauges {
    /// Whether the models are loaded and the API answers.
    pub ready: bool,
    /// Actors by state (`idle`, `busy`, `paused`, `stopped`).
    pub actors: BTreeMap<&'static str, u64>,
    /// Actors of the OpenAI endpoint (in the counts above too).
    pub pool_actors: u64,
    /// Bytes of actors' linear memory (of snapshots, for paused ones).
    pub memory_bytes: u64,
    /// Bytes of actors' KV caches and device buffers (snapshots' KV caches, for paused ones).
    pub kv_bytes: u64,
    /// The GPUs the daemon uses.
    pub gpus: Vec<shoal_engine::gpu::GpuMemory>,
}

impl Metrics {
    /// Counts a request answered with `status` after `took`.
    pub fn request(&self, route: &'static str, status: u16, took: Duration) {
        *lock(&self.requests).entry((route, status)).or_default() += 1;
        let s = took.as_secs_f64();
        let mut l = lock(&self.latency);
        let h = l.entry(route).or_default();
        let i = BUCKETS.iter().position(|b| s <= *b).unwrap_or(BUCKETS.len());
        h.counts[i] += 1;
        h.sum += s;
        h.count += 1;
    }

    /// Counts `n` tokens generated.
    pub fn tokens(&self, n: u64) {
        self.tokens.fetch_add(n, Ordering::Relaxed);
    }

    /// The text exposition.
    pub fn render(&self, g: &Gauges) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "# HELP shoal_requests_total HTTP requests answered, by route template and status.");
        let _ = writeln!(o, "# TYPE shoal_requests_total counter");
        for ((route, status), n) in lock(&self.requests).iter() {
            let _ = writeln!(o, "shoal_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
        }
        let _ = writeln!(
            o,
            "# HELP shoal_request_duration_seconds Time from a request to its answer's head (a streamed body \
             goes on after), by route template."
        );
        let _ = writeln!(o, "# TYPE shoal_request_duration_seconds histogram");
        for (route, h) in lock(&self.latency).iter() {
            let mut acc = 0;
            for (i, b) in BUCKETS.iter().enumerate() {
                acc += h.counts[i];
                let _ = writeln!(o, "shoal_request_duration_seconds_bucket{{route=\"{route}\",le=\"{b}\"}} {acc}");
            }
            acc += h.counts[BUCKETS.len()];
            let _ = writeln!(o, "shoal_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {acc}");
            let _ = writeln!(o, "shoal_request_duration_seconds_sum{{route=\"{route}\"}} {}", h.sum);
            let _ = writeln!(o, "shoal_request_duration_seconds_count{{route=\"{route}\"}} {}", h.count);
        }
        let _ = writeln!(
            o,
            "# HELP shoal_tokens_generated_total Tokens generated for /v1/chat/completions and /v1/completions answers."
        );
        let _ = writeln!(o, "# TYPE shoal_tokens_generated_total counter");
        let _ = writeln!(o, "shoal_tokens_generated_total {}", self.tokens.load(Ordering::Relaxed));
        let _ = writeln!(o, "# HELP shoal_ready Whether the models are loaded and the API answers (0: loading).");
        let _ = writeln!(o, "# TYPE shoal_ready gauge");
        let _ = writeln!(o, "shoal_ready {}", u8::from(g.ready));
        let _ = writeln!(o, "# HELP shoal_actors Actors held, by state (the OpenAI endpoint's included).");
        let _ = writeln!(o, "# TYPE shoal_actors gauge");
        for state in ["idle", "busy", "paused", "stopped"] {
            let _ = writeln!(o, "shoal_actors{{state=\"{state}\"}} {}", g.actors.get(state).copied().unwrap_or(0));
        }
        let _ = writeln!(o, "# HELP shoal_openai_pool_actors Actors of the OpenAI endpoint (idle or answering).");
        let _ = writeln!(o, "# TYPE shoal_openai_pool_actors gauge");
        let _ = writeln!(o, "shoal_openai_pool_actors {}", g.pool_actors);
        let _ = writeln!(o, "# HELP shoal_actor_memory_bytes Bytes of actors' linear memory (snapshots' when paused).");
        let _ = writeln!(o, "# TYPE shoal_actor_memory_bytes gauge");
        let _ = writeln!(o, "shoal_actor_memory_bytes {}", g.memory_bytes);
        let _ = writeln!(
            o,
            "# HELP shoal_kv_bytes Bytes of actors' KV caches and device buffers (snapshots' when paused)."
        );
        let _ = writeln!(o, "# TYPE shoal_kv_bytes gauge");
        let _ = writeln!(o, "shoal_kv_bytes {}", g.kv_bytes);
        type Field = fn(&shoal_engine::gpu::GpuMemory) -> u64;
        let gpu: [(&str, &str, Field); 4] = [
            ("shoal_gpu_memory_used_bytes", "Bytes in use on the GPU (by every process).", |m| m.used),
            ("shoal_gpu_memory_total_bytes", "Bytes of the GPU's memory.", |m| m.total),
            ("shoal_gpu_kv_used_bytes", "Bytes of the GPU's KV budget mapped to models' KV pools.", |m| m.kv_used),
            ("shoal_gpu_kv_budget_bytes", "The KV budget shared by the models on the GPU.", |m| m.kv_limit),
        ];
        for (name, help, field) in gpu {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} gauge");
            for m in &g.gpus {
                let _ = writeln!(o, "{name}{{gpu=\"{}\",name=\"{}\"}} {}", m.ordinal, label(&m.name), field(m));
            }
        }
        o
    }
}

/// A label value as the text format writes it (`\`, `"` and newlines escaped).
fn label(s: &str) -> String {
    s.chars().take(128).fold(String::new(), |mut o, c| {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
        o
    })
}

/// The exposition as an answer, with Prometheus' content type.
pub fn answer(text: String) -> axum::response::Response {
    use axum::response::IntoResponse;
    let ct = axum::http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");
    ([(axum::http::header::CONTENT_TYPE, ct)], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_are_one_line_each_with_names_escaped() {
        let gpu = shoal_engine::gpu::GpuMemory {
            ordinal: 1,
            name: "Odd \"GPU\"\nnext".into(),
            used: 5,
            total: 80,
            kv_used: 2,
            kv_limit: 8,
        };
        let text = Metrics::default().render(&Gauges { gpus: vec![gpu], ..Default::default() });
        let line = text.lines().find(|l| l.starts_with("shoal_gpu_memory_used_bytes{")).expect("a GPU line");
        assert_eq!(line, r#"shoal_gpu_memory_used_bytes{gpu="1",name="Odd \"GPU\"\nnext"} 5"#);
        assert!(text.lines().any(|l| l.ends_with("} 8") && l.starts_with("shoal_gpu_kv_budget_bytes{")), "{text}");
        let none = Metrics::default().render(&Gauges::default());
        assert!(!none.lines().any(|l| l.starts_with("shoal_gpu_memory_used_bytes{")), "no GPU, no line");
    }

    #[test]
    fn routes_are_templates() {
        assert_eq!(route("/v1/actors/7/messages"), "/v1/actors/{id}/messages");
        assert_eq!(route("/v1/actors/some-name"), "/v1/actors/{id}");
        assert_eq!(route("/v1/actors"), "/v1/actors");
        assert_eq!(route("/v1/actors/"), "other");
        assert_eq!(route("/v1/../etc/passwd"), "other");
        assert_eq!(route("/health"), "/health");
    }

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.request("/health", 200, Duration::from_millis(1));
        m.request("/health", 200, Duration::from_secs(100));
        let t = m.render(&Gauges::default());
        assert!(t.contains("shoal_requests_total{route=\"/health\",status=\"200\"} 2"), "{t}");
        assert!(t.contains("shoal_request_duration_seconds_bucket{route=\"/health\",le=\"0.005\"} 1"), "{t}");
        assert!(t.contains("shoal_request_duration_seconds_bucket{route=\"/health\",le=\"60\"} 1"), "{t}");
        assert!(t.contains("shoal_request_duration_seconds_bucket{route=\"/health\",le=\"+Inf\"} 2"), "{t}");
    }
}
