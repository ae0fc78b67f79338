//! The subcommands that talk to a running `shoal serve`: `ps`, `spawn`, `send`, `pause`,
//! `resume`, `snapshot`, `restore`, `kill`, `snapshots` (and `attach`, in its own module).
//! Actors are named by id or by name. Each finds the daemon at `--addr`
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
    pub(crate) fn key(&self) -> Option<&str> {
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
    /// Show the OpenAI endpoint's actors too (marked `openai` in the NAME column's place
    /// when unnamed, and `*` after their id).
    #[arg(long)]
    all: bool,
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
    /// A name for the actor, unique among the daemon's actors: 1 to 64 characters of
    /// A-Z a-z 0-9 . _ - (not all digits). Every command that takes an id takes it too.
    #[arg(long)]
    name: Option<String>,
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
    /// The actor's id or name.
    id: String,
    /// The message (for a chat actor: one user turn).
    text: String,
}

/// `shoal pause`, `resume`, `kill`.
#[derive(clap::Args)]
pub struct Id {
    #[command(flatten)]
    at: Addr,
    /// The actor's id or name.
    id: String,
}

/// `shoal snapshot`.
#[derive(clap::Args)]
pub struct Snapshot {
    #[command(flatten)]
    at: Addr,
    /// The actor's id or name.
    id: String,
    /// The key to keep it under in the daemon's store (default `actor-ID`).
    key: Option<String>,
}

/// `shoal move`.
#[derive(clap::Args)]
pub struct Move {
    #[command(flatten)]
    at: Addr,
    /// The actor's id or name.
    id: String,
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
    /// A name for the new actor (a snapshot holds none).
    #[arg(long)]
    name: Option<String>,
}

/// `s` as one path segment: bytes other than letters, digits, `-`, `_` and `.` percent-encoded
/// (a key such as `../x` reaches the daemon as a key, and is refused as one).
pub(crate) fn escaped(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => (b as char).to_string(),
            b'.' if s != "." && s != ".." => ".".to_string(),
            b => format!("%{b:02X}"),
        })
        .collect()
}

pub(crate) fn call(at: &Addr, method: &str, path: &str, body: &Value) -> anyhow::Result<Value> {
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

/// Bytes in binary units, short (`1.5M`).
fn size(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let (mut v, mut u) = (b as f64, 0);
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{b}B") } else { format!("{v:.1}{}", UNITS[u]) }
}

/// Seconds, short (`42s`, `3m`, `5h`, `2d`).
fn age(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// Rows as columns, each as wide as its widest value; the last column is not padded.
fn table(rows: &[Vec<String>], right: &[bool]) -> String {
    let n = rows.first().map_or(0, Vec::len);
    let width: Vec<usize> = (0..n).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, v)| match (c + 1 == n, right.get(c).copied().unwrap_or(false)) {
                (true, false) => v.clone(),
                (_, true) => format!("{v:>w$}", w = width[c]),
                (false, false) => format!("{v:<w$}", w = width[c]),
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

pub fn ps(a: Ps) -> anyhow::Result<i32> {
    let path = if a.all { "/v1/actors?all=true" } else { "/v1/actors" };
    let v = call(&a.at, "GET", path, &json!({}))?;
    if a.json {
        println!("{v}");
        return Ok(0);
    }
    let mut rows = vec![
        ["ID", "NAME", "MODULE", "MODEL", "STATE", "BACKEND", "CONTEXT", "KV", "MEMORY", "MESSAGES", "AGE"]
            .map(String::from)
            .to_vec(),
    ];
    for x in v["actors"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let module = x["module"].as_str().unwrap_or("?");
        let module = module.rsplit('/').next().unwrap_or(module);
        let pool = x["pool"].as_bool().unwrap_or(false);
        let text = |k: &str| x[k].as_str().map(|s| s.chars().flat_map(char::escape_default).collect::<String>());
        rows.push(vec![
            format!("{}{}", x["id"].as_u64().unwrap_or(0), if pool { "*" } else { "" }),
            text("name").unwrap_or_else(|| if pool { "(openai)".into() } else { "-".into() }),
            module.chars().flat_map(char::escape_default).collect(),
            text("model").unwrap_or_else(|| "-".into()),
            text("state").unwrap_or_else(|| "?".into()),
            text("backend").unwrap_or_else(|| "?".into()),
            match x["context_size"].as_u64().unwrap_or(0) {
                0 => "-".to_string(),
                n => format!("{}/{n}", x["context_used"].as_u64().unwrap_or(0)),
            },
            size(x["kv_bytes"].as_u64().unwrap_or(0)),
            size(x["memory_bytes"].as_u64().unwrap_or(0)),
            x["messages"].as_u64().unwrap_or(0).to_string(),
            age(x["age_s"].as_u64().unwrap_or(0)),
        ]);
    }
    print!("{}", table(&rows, &[true, false, false, false, false, false, true, true, true, true, true]));
    if a.all {
        println!("(* the OpenAI endpoint's actors: not managed through the actor API)");
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
    let mut body = json!({"module": a.module, "args": a.args});
    if let Some(n) = &a.name {
        body["name"] = json!(n);
    }
    let v = call(&a.at, "POST", "/v1/actors", &body)?;
    println!("{}", v["id"]);
    Ok(0)
}

pub fn send(a: Send) -> anyhow::Result<i32> {
    message(&a.at, &a.id, &a.text)
}

/// Sends `text` to the actor `id` (an id or a name) and prints its reply as it streams.
pub(crate) fn message(at: &Addr, id: &str, text: &str) -> anyhow::Result<i32> {
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
    let path = format!("/v1/actors/{}/messages", escaped(id));
    let status = http::call(&at.addr, at.key(), "POST", &path, text.as_bytes(), &mut on)?;
    if status >= 300 && failed.is_none() {
        bail!("the daemon answered HTTP {status}");
    }
    match failed {
        // A refusal of the daemon's (no such actor, paused) is an HTTP error: exit code 2.
        Some(e) if status >= 300 => bail!("{e} (HTTP {status})"),
        // The actor answered, with an error.
        Some(e) => Err(Failure { code: EXIT_ACTOR_ERROR, message: format!("actor {id}: {e}") }.into()),
        None => Ok(0),
    }
}

fn op(at: &Addr, id: &str, what: &str) -> anyhow::Result<Value> {
    call(at, "POST", &format!("/v1/actors/{}/{what}", escaped(id)), &json!({}))
}

pub fn pause(a: Id) -> anyhow::Result<i32> {
    // A busy actor is paused once its message is handled: say so when that takes a while.
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let id = a.id.clone();
    let note = std::thread::spawn(move || {
        if wait.recv_timeout(std::time::Duration::from_secs(1)) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            eprintln!("waiting for actor {id} to finish its message…");
        }
    });
    let v = op(&a.at, &a.id, "pause");
    drop(done);
    let _ = note.join();
    let v = v?;
    println!("paused {} in {:.2} ms ({} bytes kept)", a.id, v["ms"].as_f64().unwrap_or(0.0), v["bytes"]);
    Ok(0)
}

pub fn resume(a: Id) -> anyhow::Result<i32> {
    let v = op(&a.at, &a.id, "resume")?;
    println!("resumed {} in {:.2} ms", a.id, v["ms"].as_f64().unwrap_or(0.0));
    Ok(0)
}

pub fn snapshot(a: Snapshot) -> anyhow::Result<i32> {
    let body = a.key.as_ref().map_or_else(|| json!({}), |k| json!({"key": k}));
    let v = call(&a.at, "POST", &format!("/v1/actors/{}/snapshot", escaped(&a.id)), &body)?;
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
    let body = a.name.as_ref().map_or_else(|| json!({}), |n| json!({"name": n}));
    let v = call(&a.at, "POST", &format!("/v1/snapshots/{}/restore", escaped(&a.key)), &body)?;
    println!("{}", v["id"]);
    eprintln!("restored {} as actor {} in {:.1} ms", a.key, v["id"], v["ms"].as_f64().unwrap_or(0.0));
    Ok(0)
}

pub fn kill(a: Id) -> anyhow::Result<i32> {
    call(&a.at, "DELETE", &format!("/v1/actors/{}", escaped(&a.id)), &json!({}))?;
    println!("killed {}", a.id);
    Ok(0)
}

pub fn move_to(a: Move) -> anyhow::Result<i32> {
    let v = call(&a.at, "POST", &format!("/v1/actors/{}/move", escaped(&a.id)), &json!({"backend": a.backend}))?;
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
