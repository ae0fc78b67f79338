//! The subcommands that talk to a running `shoal serve`: `ps`, `spawn`, `send`, `pause`,
//! `resume`, `snapshot`, `restore`, `kill`.

use std::io::Write;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::serve::DEFAULT_ADDR;
use super::{EXIT_ACTOR_ERROR, Failure, http};

/// Where the daemon is.
#[derive(clap::Args, Clone)]
pub struct Addr {
    /// The daemon's address.
    #[arg(long, default_value = DEFAULT_ADDR, env = "SHOAL_ADDR")]
    addr: String,
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
    /// `chat` (the built-in chat actor) or the path of an actor module.
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

/// `shoal restore`.
#[derive(clap::Args)]
pub struct Restore {
    #[command(flatten)]
    at: Addr,
    /// The snapshot's key in the daemon's store.
    key: String,
}

fn call(addr: &str, method: &str, path: &str, body: &Value) -> anyhow::Result<Value> {
    let mut out = Vec::new();
    let status = http::call(addr, method, path, &serde_json::to_vec(body)?, &mut |b| out.extend_from_slice(b))?;
    let v: Value = serde_json::from_slice(&out)
        .with_context(|| format!("the daemon answered {status}: {}", String::from_utf8_lossy(&out)))?;
    if status >= 300 {
        let msg = v.pointer("/error/message").and_then(Value::as_str).unwrap_or("(no message)");
        bail!("{msg} (HTTP {status})");
    }
    Ok(v)
}

pub fn ps(a: Ps) -> anyhow::Result<i32> {
    let v = call(&a.at.addr, "GET", "/v1/actors", &json!({}))?;
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
    let module = if a.module == "chat" {
        a.module
    } else {
        // The daemon reads the file: give it an absolute path.
        std::fs::canonicalize(&a.module).with_context(|| format!("module {}", a.module))?.display().to_string()
    };
    let v = call(&a.at.addr, "POST", "/v1/actors", &json!({"module": module, "args": a.args}))?;
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
            } else if let Some(m) = v.pointer("/error/message").and_then(Value::as_str) {
                failed = Some(m.to_string());
            } else if let Some(e) = v.get("error") {
                failed = Some(e.as_str().map_or_else(|| e.to_string(), str::to_string));
            }
        }
    };
    let status = http::call(&a.at.addr, "POST", &format!("/v1/actors/{}/messages", a.id), a.text.as_bytes(), &mut on)?;
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

fn op(addr: &str, id: u64, what: &str) -> anyhow::Result<Value> {
    call(addr, "POST", &format!("/v1/actors/{id}/{what}"), &json!({}))
}

pub fn pause(a: Id) -> anyhow::Result<i32> {
    let v = op(&a.at.addr, a.id, "pause")?;
    println!("paused {} in {:.2} ms ({} bytes kept)", a.id, v["ms"].as_f64().unwrap_or(0.0), v["bytes"]);
    Ok(0)
}

pub fn resume(a: Id) -> anyhow::Result<i32> {
    let v = op(&a.at.addr, a.id, "resume")?;
    println!("resumed {} in {:.2} ms", a.id, v["ms"].as_f64().unwrap_or(0.0));
    Ok(0)
}

pub fn snapshot(a: Snapshot) -> anyhow::Result<i32> {
    let body = a.key.as_ref().map_or_else(|| json!({}), |k| json!({"key": k}));
    let v = call(&a.at.addr, "POST", &format!("/v1/actors/{}/snapshot", a.id), &body)?;
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
    let v = call(&a.at.addr, "POST", &format!("/v1/snapshots/{}/restore", a.key), &json!({}))?;
    println!("{}", v["id"]);
    eprintln!("restored {} as actor {} in {:.1} ms", a.key, v["id"], v["ms"].as_f64().unwrap_or(0.0));
    Ok(0)
}

pub fn kill(a: Id) -> anyhow::Result<i32> {
    call(&a.at.addr, "DELETE", &format!("/v1/actors/{}", a.id), &json!({}))?;
    println!("killed {}", a.id);
    Ok(0)
}

pub fn move_to(a: Move) -> anyhow::Result<i32> {
    let v = call(&a.at.addr, "POST", &format!("/v1/actors/{}/move", a.id), &json!({"backend": a.backend}))?;
    println!("moved {} to {} in {:.1} ms", a.id, a.backend, v["ms"].as_f64().unwrap_or(0.0));
    Ok(0)
}
