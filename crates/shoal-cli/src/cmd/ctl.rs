//! The subcommands that talk to a running `shoal serve`: `ps`, `spawn`, `send`, `pause`,
//! `resume`, `snapshot`, `restore`, `kill`, `snapshots`. Each finds the daemon at `--addr`
//! (`SHOAL_ADDR`) and sends its API key, if given (`--api-key`, `SHOAL_API_KEY`).

use std::io::Write;

use anyhow::{Context, bail};
use base64::Engine as _;
use serde_json::{Value, json};

use super::serve::DEFAULT_ADDR;
use super::{EXIT_ACTOR_ERROR, Failure, http};

/// Where the daemon is.
#[derive(clap::Args, Clone)]
pub struct Addr {
    /// The daemon's address.
    #[arg(long, default_value = DEFAULT_ADDR, env = "SHOAL_ADDR")]
    addr: String,
    /// The daemon's API key, sent as `Authorization: Bearer KEY`.
    #[arg(long, env = "SHOAL_API_KEY", hide_env_values = true, value_name = "KEY")]
    api_key: Option<String>,
}

impl Addr {
    fn key(&self) -> Option<&str> {
        self.api_key.as_deref().filter(|k| !k.is_empty())
    }
}

/// `shoal ps`.
#[derive(clap::Args)]
pub struct Ps {
    #[command(flatten)]
    at: Addr,
    /// Print the daemon's JSON as it is.
    #[arg(long)]
    json: bool,
}

/// `shoal spawn`.
#[derive(clap::Args)]
pub struct Spawn {
    #[command(flatten)]
    at: Addr,
    /// `chat` (the built-in chat actor) or the name of a module in the daemon's --modules
    /// directories (`echo` for DIR/echo.wasm).
    #[arg(default_value = "chat")]
    module: String,
    /// The actor's arguments (for `chat`: --model, --temperature, --seed, --max-tokens,
    /// --context N, --context-policy error|truncate…).
    #[arg(last = true)]
    args: Vec<String>,
}

/// `shoal send`.
#[derive(clap::Args)]
pub struct Send {
    #[command(flatten)]
    at: Addr,
    /// The actor's id.
    id: u64,
    /// The message (for a chat actor: one user turn).
    text: String,
}

/// `shoal pause`, `resume`, `kill`.
#[derive(clap::Args)]
pub struct Id {
    #[command(flatten)]
    at: Addr,
    /// The actor's id.
    id: u64,
}

/// `shoal snapshot`.
#[derive(clap::Args)]
pub struct Snapshot {
    #[command(flatten)]
    at: Addr,
    /// The actor's id.
    id: u64,
    /// The key to keep it under in the daemon's store (default `actor-ID`).
    key: Option<String>,
}

/// `shoal move`.
#[derive(clap::Args)]
pub struct Move {
    #[command(flatten)]
    at: Addr,
    /// The actor's id.
    id: u64,
    /// The backend to move it to (`cpu`; a daemon on CUDA has both).
    #[arg(long)]
    backend: String,
}

/// `shoal snapshots`: list the store's snapshots, or `rm KEY` one.
#[derive(clap::Args)]
pub struct Snapshots {
    #[command(flatten)]
    at: Addr,
    #[command(subcommand)]
    what: Option<SnapshotsCmd>,
}

#[derive(clap::Subcommand)]
pub enum SnapshotsCmd {
    /// List the snapshots' keys (the default).
    Ls,
    /// Delete the snapshot KEY from the store.
    Rm {
        /// The snapshot's key.
        key: String,
    },
}

/// `shoal restore`.
#[derive(clap::Args)]
pub struct Restore {
    #[command(flatten)]
    at: Addr,
    /// The snapshot's key in the daemon's store.
    key: String,
}

/// `s` as one path segment: bytes other than letters, digits, `-`, `_` and `.` percent-encoded
/// (a key such as `../x` reaches the daemon as a key, and is refused as one).
fn escaped(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => (b as char).to_string(),
            b'.' if s != "." && s != ".." => ".".to_string(),
            b => format!("%{b:02X}"),
        })
        .collect()
}

fn call(at: &Addr, method: &str, path: &str, body: &Value) -> anyhow::Result<Value> {
    let mut out = Vec::new();
    let status =
        http::call(&at.addr, at.key(), method, path, &serde_json::to_vec(body)?, &mut |b| out.extend_from_slice(b))?;
    let v: Value = serde_json::from_slice(&out)
        .with_context(|| format!("the daemon answered {status}: {}", String::from_utf8_lossy(&out)))?;
    if status >= 300 {
        let msg = v.pointer("/error/message").and_then(Value::as_str).unwrap_or("(no message)");
        bail!("{msg} (HTTP {status})");
    }
    Ok(v)
}

pub fn ps(a: Ps) -> anyhow::Result<i32> {
    let v = call(&a.at, "GET", "/v1/actors", &json!({}))?;
    if a.json {
        println!("{v}");
        return Ok(0);
    }
    println!("{:>5}  {:<12} {:<10} {:<7} {:>8} {:>10}  TAG", "ID", "MODULE", "STATE", "BACKEND", "MESSAGES", "MEMORY");
    for x in v["actors"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let module = x["module"].as_str().unwrap_or("?");
        let module = module.rsplit('/').next().unwrap_or(module);
        println!(
            "{:>5}  {:<12} {:<10} {:<7} {:>8} {:>9.1}M  {}",
            x["id"].as_u64().unwrap_or(0),
            module,
            x["state"].as_str().unwrap_or("?"),
            x["backend"].as_str().unwrap_or("?"),
            x["messages"].as_u64().unwrap_or(0),
            x["memory_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
            x["tag"].as_str().unwrap_or("")
        );
    }
    Ok(0)
}

pub fn spawn(a: Spawn) -> anyhow::Result<i32> {
    if a.module.contains('/') {
        bail!(
            "`{}` is a path: the daemon spawns modules by name from its --modules directories \
             (start it with --modules DIR and give the file's name without .wasm)",
            a.module
        );
    }
    let v = call(&a.at, "POST", "/v1/actors", &json!({"module": a.module, "args": a.args}))?;
    println!("{}", v["id"]);
    Ok(0)
}

pub fn send(a: Send) -> anyhow::Result<i32> {
    let mut stdout = std::io::stdout().lock();
    let mut pending = Vec::new();
    let mut failed: Option<String> = None;
    let mut on = |b: &[u8]| {
        pending.extend_from_slice(b);
        while let Some(i) = pending.iter().position(|&c| c == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            let Ok(v) = serde_json::from_slice::<Value>(&line) else { continue };
            if let Some(c) = v.get("chunk").and_then(Value::as_str) {
                let _ = stdout.write_all(c.as_bytes());
                let _ = stdout.flush();
            } else if let Some(d) = v.get("data").and_then(Value::as_str) {
                // Bytes that are not text, exactly as the actor replied them.
                match base64::engine::general_purpose::STANDARD.decode(d) {
                    Ok(b) => {
                        let _ = stdout.write_all(&b);
                        let _ = stdout.flush();
                    }
                    Err(e) => failed = Some(format!("the daemon sent bad base64: {e}")),
                }
            } else if let Some(m) = v.pointer("/error/message").and_then(Value::as_str) {
                failed = Some(m.to_string());
            } else if let Some(e) = v.get("error") {
                failed = Some(e.as_str().map_or_else(|| e.to_string(), str::to_string));
            }
        }
    };
    let path = format!("/v1/actors/{}/messages", a.id);
    let status = http::call(&a.at.addr, a.at.key(), "POST", &path, a.text.as_bytes(), &mut on)?;
    if status >= 300 && failed.is_none() {
        bail!("the daemon answered HTTP {status}");
    }
    match failed {
        // A refusal of the daemon's (no such actor, paused) is an HTTP error: exit code 2.
        Some(e) if status >= 300 => bail!("{e} (HTTP {status})"),
        // The actor answered, with an error.
        Some(e) => Err(Failure { code: EXIT_ACTOR_ERROR, message: format!("actor {}: {e}", a.id) }.into()),
        None => Ok(0),
    }
}

fn op(at: &Addr, id: u64, what: &str) -> anyhow::Result<Value> {
    call(at, "POST", &format!("/v1/actors/{id}/{what}"), &json!({}))
}

pub fn pause(a: Id) -> anyhow::Result<i32> {
    let v = op(&a.at, a.id, "pause")?;
    println!("paused {} in {:.2} ms ({} bytes kept)", a.id, v["ms"].as_f64().unwrap_or(0.0), v["bytes"]);
    Ok(0)
}

pub fn resume(a: Id) -> anyhow::Result<i32> {
    let v = op(&a.at, a.id, "resume")?;
    println!("resumed {} in {:.2} ms", a.id, v["ms"].as_f64().unwrap_or(0.0));
    Ok(0)
}

pub fn snapshot(a: Snapshot) -> anyhow::Result<i32> {
    let body = a.key.as_ref().map_or_else(|| json!({}), |k| json!({"key": k}));
    let v = call(&a.at, "POST", &format!("/v1/actors/{}/snapshot", a.id), &body)?;
    println!(
        "{} ({} bytes: memory {}, KV cache {}; {:.1} ms)",
        v["key"].as_str().unwrap_or("?"),
        v["bytes"],
        v["memory_bytes"],
        v["kv_bytes"],
        v["ms"].as_f64().unwrap_or(0.0)
    );
    Ok(0)
}

pub fn restore(a: Restore) -> anyhow::Result<i32> {
    let v = call(&a.at, "POST", &format!("/v1/snapshots/{}/restore", escaped(&a.key)), &json!({}))?;
    println!("{}", v["id"]);
    eprintln!("restored {} as actor {} in {:.1} ms", a.key, v["id"], v["ms"].as_f64().unwrap_or(0.0));
    Ok(0)
}

pub fn kill(a: Id) -> anyhow::Result<i32> {
    call(&a.at, "DELETE", &format!("/v1/actors/{}", a.id), &json!({}))?;
    println!("killed {}", a.id);
    Ok(0)
}

pub fn move_to(a: Move) -> anyhow::Result<i32> {
    let v = call(&a.at, "POST", &format!("/v1/actors/{}/move", a.id), &json!({"backend": a.backend}))?;
    println!("moved {} to {} in {:.1} ms", a.id, a.backend, v["ms"].as_f64().unwrap_or(0.0));
    Ok(0)
}

pub fn snapshots(a: Snapshots) -> anyhow::Result<i32> {
    match a.what {
        None | Some(SnapshotsCmd::Ls) => {
            let v = call(&a.at, "GET", "/v1/snapshots", &json!({}))?;
            for k in v["snapshots"].as_array().map(Vec::as_slice).unwrap_or_default() {
                println!("{}", k.as_str().unwrap_or("?"));
            }
        }
        Some(SnapshotsCmd::Rm { key }) => {
            call(&a.at, "DELETE", &format!("/v1/snapshots/{}", escaped(&key)), &json!({}))?;
            println!("deleted {key}");
        }
    }
    Ok(0)
}
