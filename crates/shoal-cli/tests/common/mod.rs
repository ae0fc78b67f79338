//! What the daemon's tests share: starting `shoal serve` (and stopping it), a small HTTP/1.1
//! client over raw sockets, the NDJSON replies of messages decoded, the daemon's resident
//! memory, and small actor modules in WebAssembly text.

// Each test file uses its own part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

/// The Host every request sends unless told otherwise: a name the daemon answers to.
pub const HOST: &str = "127.0.0.1";

/// The longest any request of the tests may take before it counts as hung.
pub const REQUEST_LIMIT: Duration = Duration::from_secs(30);

/// The default model, when it has been fetched (`scripts/fetch-model.sh`).
pub fn model() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    p.is_file().then_some(p)
}

/// The `shoal` binary, with no daemon address or key from the environment.
pub fn shoal() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shoal"));
    cmd.env_remove("SHOAL_API_KEY").env_remove("SHOAL_ADDR");
    cmd
}

/// A running `shoal serve`, killed (SIGKILL) when dropped.
pub struct Daemon {
    pub child: Child,
    pub addr: String,
    /// Every line it wrote to stderr so far.
    pub log: Arc<Mutex<Vec<String>>>,
    /// The thread that reads its stderr (it ends when the daemon does).
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its resident memory now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Sends it a signal (`TERM`, `KILL`…) with kill(1).
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().unwrap();
        assert!(st.success(), "kill -{sig} {}", self.pid());
    }

    /// Waits for it to exit, at most `limit` (and then for the last of its stderr).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                if let Some(r) = self.reader.take() {
                    let _ = r.join();
                }
                return Some(st);
            }
            if t0.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `shoal serve` on an ephemeral loopback port with the CPU backend, the store `store`,
/// modules from `modules` (if any), the default model (if fetched) and `extra` flags.
pub fn serve_command(store: &Path, modules: Option<&Path>, extra: &[&str]) -> Command {
    let mut cmd = shoal();
    cmd.args(["serve", "--backend", "cpu"]);
    if !extra.contains(&"--addr") {
        cmd.args(["--addr", "127.0.0.1:0"]);
    }
    cmd.arg("--store").arg(store);
    if let Some(m) = modules {
        cmd.arg("--modules").arg(m);
    }
    if let Some(m) = model() {
        cmd.arg("--model").arg(format!("smollm2={}", m.display()));
    }
    cmd.args(extra);
    cmd
}

/// Starts `cmd` (a `shoal serve`) and waits for the line that says where it listens
/// (lines before it are kept, e.g. the actors it brought back). `Err` with its exit status
/// and stderr when it exits first.
pub fn try_start(mut cmd: Command) -> Result<Daemon, (ExitStatus, String)> {
    let mut child = cmd.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().expect("shoal serve starts");
    let err = BufReader::new(child.stderr.take().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel::<String>();
    let kept = log.clone();
    // Keeps reading its stderr, so that it never blocks on a full pipe.
    let reader = std::thread::spawn(move || {
        for line in err.lines() {
            let Ok(line) = line else { break };
            kept.lock().unwrap().push(line.clone());
            let _ = tx.send(line);
        }
    });
    let t0 = Instant::now();
    let limit = Duration::from_secs(120);
    loop {
        match rx.recv_timeout(limit.saturating_sub(t0.elapsed())) {
            Ok(line) => {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap().to_string();
                    return Ok(Daemon { child, addr, log, reader: Some(reader) });
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let st = child.wait().unwrap();
                std::thread::sleep(Duration::from_millis(50));
                let text = log.lock().unwrap().join("\n");
                return Err((st, text));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("shoal serve did not listen within {limit:?}: {}", log.lock().unwrap().join("\n"));
            }
        }
    }
}

/// Starts a daemon (see [`serve_command`]); panics when it does not start.
pub fn start(store: &Path, modules: Option<&Path>, extra: &[&str]) -> Daemon {
    try_start(serve_command(store, modules, extra))
        .unwrap_or_else(|(st, err)| panic!("shoal serve {extra:?} did not start ({st}): {err}"))
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// The status line and headers, lower case.
    pub head: String,
    /// The body (chunked bodies decoded).
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().to_string())
        })
    }

    /// Everything the daemon sent, as text (for checking what it must never say).
    pub fn all(&self) -> String {
        format!("{}\n{}", self.head, self.text())
    }
}

/// Parses a whole HTTP/1.1 answer; `None` when it is not one (or is cut off).
pub fn parse(raw: &[u8]) -> Option<Reply> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let mut body = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        let (mut out, mut rest) = (Vec::new(), &body[..]);
        loop {
            let eol = rest.windows(2).position(|w| w == b"\r\n")?;
            let n = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).ok()?.trim(), 16).ok()?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(rest.get(eol + 2..eol + 2 + n)?);
            rest = rest.get(eol + 4 + n..)?;
        }
        body = out;
    }
    Some(Reply { status, head, body })
}

/// The head of a request: `Host: 127.0.0.1` unless `headers` give a Host, `headers`, the
/// body's length, `Connection: close`.
pub fn head(method: &str, path: &str, headers: &[(&str, &str)], len: usize) -> String {
    let mut h = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        h += &format!("Host: {HOST}\r\n");
    }
    for (k, v) in headers {
        h += &format!("{k}: {v}\r\n");
    }
    h += &format!("Content-Length: {len}\r\nConnection: close\r\n\r\n");
    h
}

/// One request, answered within [`REQUEST_LIMIT`].
pub fn try_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Reply> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(REQUEST_LIMIT))?;
    s.set_write_timeout(Some(REQUEST_LIMIT))?;
    // The daemon may answer (a 413, say) and close before the body is all sent: the answer
    // is read all the same.
    let sent = s.write_all(head(method, path, headers, body.len()).as_bytes()).and_then(|()| s.write_all(body));
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // Reset after its answer: the answer stands.
            Err(e) if parse(&raw).is_some() && e.kind() != std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(sent.err().unwrap_or(e)),
        }
    }
    parse(&raw).ok_or_else(|| {
        std::io::Error::other(format!("not an HTTP answer: {:?}", String::from_utf8_lossy(&raw[..raw.len().min(300)])))
    })
}

/// One request; panics when it gets no answer.
pub fn request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    try_request(addr, method, path, headers, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// One request without extra headers: its status and body.
pub fn call(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let r = request(addr, method, path, &[], body);
    (r.status, r.body)
}

/// A POST of `v`: the status and the JSON answered (`null` when it is not JSON).
pub fn post(addr: &str, path: &str, v: &Value) -> (u16, Value) {
    let r = request(addr, "POST", path, &[], &serde_json::to_vec(v).unwrap());
    (r.status, r.json())
}

/// A GET: the status and the JSON answered.
pub fn get(addr: &str, path: &str) -> (u16, Value) {
    let r = request(addr, "GET", path, &[], b"");
    (r.status, r.json())
}

/// The bytes of a message's NDJSON reply (`chunk` text and base64 `data` in order), or the
/// error it ended with. Panics on a line that is none of `chunk`, `data`, `done`, `error`,
/// and on a reply that does not end with `done` or `error`.
pub fn ndjson(body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let text = std::str::from_utf8(body).expect("NDJSON is UTF-8");
    let lines: Vec<&str> = text.split_terminator('\n').collect();
    for (i, line) in lines.iter().enumerate() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("line {i} {line:?}: {e}"));
        let last = i + 1 == lines.len();
        if let Some(c) = v.get("chunk") {
            out.extend_from_slice(c.as_str().expect("a chunk is text").as_bytes());
        } else if let Some(d) = v.get("data") {
            let d = base64::engine::general_purpose::STANDARD.decode(d.as_str().expect("data is base64")).unwrap();
            out.extend_from_slice(&d);
        } else if let Some(e) = v.get("error") {
            assert!(last, "lines after the error: {text:?}");
            return Err(e.as_str().map_or_else(|| e.to_string(), str::to_string));
        } else {
            assert_eq!(v, json!({"done": true}), "{line}");
            assert!(last, "lines after done: {text:?}");
            return Ok(out);
        }
    }
    panic!("the reply ended without done or error: {text:?}")
}

/// A message's reply, as bytes, or the error it ended with (or the daemon's refusal).
pub fn send_bytes(addr: &str, id: u64, msg: &[u8]) -> Result<Vec<u8>, String> {
    let r = request(addr, "POST", &format!("/v1/actors/{id}/messages"), &[], msg);
    if r.status != 200 {
        return Err(format!("HTTP {}: {}", r.status, r.text()));
    }
    ndjson(&r.body)
}

/// A message's reply, as text.
pub fn send(addr: &str, id: u64, msg: &str) -> Result<String, String> {
    send_bytes(addr, id, msg.as_bytes()).map(|b| String::from_utf8(b).expect("a text reply"))
}

/// Spawns an actor of `module` (`chat` or a module's name) with `args`; its id.
pub fn spawn(addr: &str, module: &str, args: &[&str]) -> u64 {
    let (s, v) = post(addr, "/v1/actors", &json!({"module": module, "args": args}));
    assert_eq!(s, 201, "spawn {module}: {v}");
    v["id"].as_u64().unwrap()
}

/// The daemon's actors.
pub fn actors(addr: &str) -> Vec<Value> {
    let (s, v) = get(addr, "/v1/actors");
    assert_eq!(s, 200, "{v}");
    v["actors"].as_array().cloned().unwrap_or_default()
}

/// Actor `id`'s state (`idle`, `busy`, `paused`…), `None` when there is no such actor.
pub fn state_of(addr: &str, id: u64) -> Option<String> {
    actors(addr).iter().find(|a| a["id"] == json!(id)).map(|a| a["state"].as_str().unwrap_or("?").to_string())
}

/// Waits (at most `limit`) for actor `id` to be in `state`.
pub fn wait_state(addr: &str, id: u64, state: &str, limit: Duration) -> bool {
    let t0 = Instant::now();
    loop {
        if state_of(addr, id).as_deref() == Some(state) {
            return true;
        }
        if t0.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process's resident memory, in KiB (0 when it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
}

/// A new, empty temporary directory for test `name`.
pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shoal-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A modules directory `dir/mods` holding `modules` (name, text), as NAME.wat.
pub fn modules_dir(dir: &Path, modules: &[(&str, &str)]) -> PathBuf {
    let m = dir.join("mods");
    std::fs::create_dir_all(&m).unwrap();
    for (name, wat) in modules {
        std::fs::write(m.join(format!("{name}.wat")), wat).unwrap();
    }
    m
}

/// An echo actor: replies with its message; `loop…` loops forever, `trap…` traps.
pub const ECHO: &str = r#"(module
  (import "shoal_v1" "reply" (func $reply (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $n (mut i32) (i32.const 0))
  (func (export "shoal_actor_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "shoal_actor_message") (param $p i32) (param $len i32) (result i32)
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (if (i32.eq (i32.load8_u (local.get $p)) (i32.const 108)) (then (loop $l (br $l))))
    (if (i32.eq (i32.load8_u (local.get $p)) (i32.const 116)) (then unreachable))
    (drop (call $reply (local.get $p) (local.get $len)))
    (i32.const 0)))"#;

/// A counter: each message adds one to its count and replies the count in decimal; `?`
/// replies it without adding; `spin` first spins for 2 seconds (by the clock).
pub const COUNTER: &str = r#"(module
  (import "shoal_v1" "reply" (func $reply (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (memory (export "memory") 1)
  (global $n (mut i32) (i32.const 0))
  (func $now (result i64)
    (drop (call $clock (i32.const 1) (i64.const 1) (i32.const 512)))
    (i64.load (i32.const 512)))
  (func (export "shoal_actor_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "shoal_actor_message") (param $p i32) (param $len i32) (result i32)
    (local $v i32) (local $q i32) (local $t0 i64)
    (if (i32.and (i32.ge_u (local.get $len) (i32.const 4))
                 (i32.eq (i32.load (local.get $p)) (i32.const 0x6e697073))) ;; "spin"
      (then
        (local.set $t0 (call $now))
        (loop $l
          (br_if $l (i64.lt_u (i64.sub (call $now) (local.get $t0)) (i64.const 2000000000))))))
    (if (i32.ne (i32.load8_u (local.get $p)) (i32.const 63)) ;; not "?"
      (then (global.set $n (i32.add (global.get $n) (i32.const 1)))))
    (local.set $v (global.get $n))
    (local.set $q (i32.const 1100))
    (loop $d
      (local.set $q (i32.sub (local.get $q) (i32.const 1)))
      (i32.store8 (local.get $q) (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
      (local.set $v (i32.div_u (local.get $v) (i32.const 10)))
      (br_if $d (local.get $v)))
    (drop (call $reply (local.get $q) (i32.sub (i32.const 1100) (local.get $q))))
    (i32.const 0)))"#;
