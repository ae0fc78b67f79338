//! Running the daemon as people operate it: request ids and the request log, `/metrics`,
//! `/health` while the models load, a second daemon on a busy port, actors by name, the
//! OpenAI endpoint's actors kept apart, spawns checked at once, `ps` columns and CORS. On
//! the CPU; the chat parts need the default model (`scripts/fetch-model.sh`).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use common::{ECHO, get, model, modules_dir, post, request, send, serve_command, shoal, start, tmp};
use serde_json::{Value, json};

/// Waits (at most `limit`) for `f` to hold.
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// Parses Prometheus text: (name with labels, value) per sample; panics on a line that is
/// not a comment or a sample.
fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {l:?}"));
            let v: f64 = match v {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("not a value: {l:?}")),
            };
            let name = k.split('{').next().unwrap();
            assert!(name.starts_with("shoal_"), "{l}");
            assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'), "{l}");
            if let Some(labels) = k.strip_prefix(name) {
                assert!(labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')), "{l}");
            }
            (k.to_string(), v)
        })
        .collect()
}

fn metric(text: &str, key: &str) -> Option<f64> {
    samples(text).into_iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

fn metrics_text(addr: &str) -> String {
    let r = request(addr, "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("content-type").unwrap_or_default().starts_with("text/plain"), "{}", r.head);
    r.text()
}

#[test]
fn requests_carry_ids_are_logged_and_counted() {
    let dir = tmp("ops-log");
    let d = start(&dir.join("store"), None, &[]);
    let r = request(&d.addr, "GET", "/health", &[("x-request-id", "ops-req-42")], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ready");
    assert_eq!(r.header("x-request-id").as_deref(), Some("ops-req-42"));
    assert!(
        eventually(Duration::from_secs(10), || d.stderr().lines().any(|l| l.contains("ops-req-42")
            && l.contains("path=/health")
            && l.contains("status=200")
            && l.contains("INFO"))),
        "no request line: {}",
        d.stderr()
    );
    // A daemon's own id when none (or a bad one) is given.
    let long = "x".repeat(65);
    for h in [vec![], vec![("x-request-id", long.as_str())], vec![("x-request-id", "a b")]] {
        let r = request(&d.addr, "GET", "/health", &h, b"");
        let id = r.header("x-request-id").expect("an id");
        assert!(!id.is_empty() && id.len() <= 64 && id != long, "{id}");
    }

    let before = metrics_text(&d.addr);
    let key = r#"shoal_requests_total{route="/health",status="200"}"#;
    let n0 = metric(&before, key).expect("health counted");
    assert!(n0 >= 4.0, "{before}");
    for p in ["/v1/actors/no-such-actor-1", "/v1/actors/no-such-actor-2", "/../etc/passwd"] {
        request(&d.addr, "GET", p, &[], b"");
        request(&d.addr, "DELETE", p, &[], b"");
    }
    request(&d.addr, "GET", "/health", &[], b"");
    let after = metrics_text(&d.addr);
    assert_eq!(metric(&after, key), Some(n0 + 1.0), "{after}");
    assert_eq!(metric(&after, r#"shoal_requests_total{route="/v1/actors/{id}",status="404"}"#), Some(2.0), "{after}");
    assert!(!after.contains("no-such-actor") && !after.contains("passwd"), "raw paths in metrics: {after}");
    let count = metric(&after, r#"shoal_request_duration_seconds_count{route="/health"}"#).unwrap();
    let inf = metric(&after, r#"shoal_request_duration_seconds_bucket{route="/health",le="+Inf"}"#).unwrap();
    assert_eq!(count, inf);
    assert_eq!(metric(&after, "shoal_ready"), Some(1.0));
    assert!(metric(&after, r#"shoal_actors{state="idle"}"#).is_some(), "{after}");
}

/// A daemon started with `cmd`, once it says it is bound (before it has loaded anything).
struct Bound {
    child: Child,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Bound {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_bound(mut cmd: std::process::Command) -> Bound {
    let mut child = cmd.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let err = BufReader::new(child.stderr.take().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    // Killed and waited for when dropped, whatever happens next.
    let mut d = Bound { child, addr: String::new(), log: log.clone() };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in err.lines().map_while(Result::ok) {
            log.lock().unwrap().push(line.clone());
            let _ = tx.send(line);
        }
    });
    while d.addr.is_empty() {
        let line = rx.recv_timeout(Duration::from_secs(60)).expect("shoal serve says it is bound");
        if let Some(rest) = line.split("bound http://").nth(1) {
            d.addr = rest.split(';').next().unwrap().to_string();
        }
    }
    d
}

#[test]
fn health_is_503_while_loading_and_a_second_daemon_on_the_port_fails_before_loading() {
    let dir = tmp("ops-loading");
    let mut cmd = serve_command(&dir.join("store"), None, &[]);
    cmd.env("SHOAL_TEST_LOAD_DELAY_MS", "4000");
    let d = start_bound(cmd);
    let r = request(&d.addr, "GET", "/health", &[], b"");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["status"], "loading");
    let r = request(&d.addr, "GET", "/v1/actors", &[], b"");
    assert_eq!(r.status, 503);
    assert!(r.text().contains("loading its models"), "{}", r.text());
    assert!(r.header("x-request-id").is_some());

    // The port is taken: the second fails with the bind error, loading nothing.
    let mut second = serve_command(&dir.join("store2"), None, &["--addr", &d.addr]);
    second.env("RUST_LOG", "debug");
    let out = second.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("cannot listen on"), "{err}");
    assert!(!err.contains("loading model") && !err.contains("bound http://"), "{err}");

    assert!(
        eventually(Duration::from_secs(120), || request(&d.addr, "GET", "/health", &[], b"").status == 200),
        "never ready: {:?}",
        d.log.lock().unwrap()
    );
    assert_eq!(request(&d.addr, "GET", "/v1/actors", &[], b"").status, 200);
}

#[test]
fn actors_by_name() {
    let dir = tmp("ops-names");
    let mods = modules_dir(&dir, &[("echo", ECHO)]);
    let d = start(&dir.join("store"), Some(&mods), &[]);
    let (s, v) = post(&d.addr, "/v1/actors", &json!({"module": "echo", "name": "alpha"}));
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_u64().unwrap();
    let r = request(&d.addr, "POST", "/v1/actors/alpha/messages", &[], b"hi");
    assert_eq!(r.status, 200);
    assert!(r.text().contains("\"hi\""), "{}", r.text());
    let (s, v) = post(&d.addr, "/v1/actors", &json!({"module": "echo", "name": "alpha"}));
    assert_eq!(s, 409, "{v}");
    assert_eq!(v["error"]["code"], "conflict");
    let long = "n".repeat(65);
    for bad in ["", "a b", long.as_str(), "123", "../x", "é", "a/b", "x\n"] {
        let (s, v) = post(&d.addr, "/v1/actors", &json!({"module": "echo", "name": bad}));
        assert_eq!(s, 400, "{bad:?}: {v}");
    }
    assert_eq!(post(&d.addr, "/v1/actors/alpha/pause", &json!({})).0, 200);
    assert_eq!(post(&d.addr, "/v1/actors/alpha/resume", &json!({})).0, 200);
    let (_, l) = get(&d.addr, "/v1/actors");
    let a = l["actors"].as_array().unwrap().iter().find(|a| a["id"] == json!(id)).cloned().unwrap();
    assert_eq!(a["name"], "alpha", "the name survives a pause");
    assert_eq!(a["messages"], 1, "messages survive a pause");
    assert_eq!(send(&d.addr, id, "by id").unwrap(), "by id");
    assert_eq!(request(&d.addr, "DELETE", "/v1/actors/alpha", &[], b"").status, 200);
    assert_eq!(request(&d.addr, "POST", "/v1/actors/alpha/messages", &[], b"hi").status, 404);
    assert_eq!(post(&d.addr, "/v1/actors", &json!({"module": "echo", "name": "alpha"})).0, 201, "the name is free");

    // The CLI, and `ps` with a 64-character name.
    let name = format!("{}z", "n".repeat(63));
    let cli = |args: &[&str]| {
        let out = shoal().args(args).args(["--addr", &d.addr]).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let (code, out) = cli(&["spawn", "echo", "--name", &name]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = cli(&["send", &name, "hello"]);
    assert_eq!((code, out.as_str()), (Some(0), "hello"));
    let (code, out) = cli(&["spawn", "echo", "--name", &name]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("409"), "{out}");
    let (code, ps) = cli(&["ps"]);
    assert_eq!(code, Some(0), "{ps}");
    let header = ps.lines().next().unwrap();
    let row = ps.lines().find(|l| l.contains(&name)).unwrap_or_else(|| panic!("{ps}"));
    for col in ["ID", "NAME", "MODULE", "MODEL", "STATE", "CONTEXT", "KV", "MEMORY", "MESSAGES", "AGE"] {
        assert!(header.split_whitespace().any(|c| c == col), "no {col}: {header}");
    }
    for (col, value) in [("NAME", name.as_str()), ("MODULE", "echo"), ("STATE", "idle")] {
        assert_eq!(header.find(col), row.find(value), "{col} misaligned:\n{ps}");
    }
    let (code, out) = cli(&["kill", &name]);
    assert_eq!(code, Some(0), "{out}");
    assert!(!cli(&["ps"]).1.contains(&name));
}

#[test]
fn spawns_check_model_and_arguments_at_once() {
    let dir = tmp("ops-spawn");
    let d = start(&dir.join("store"), None, &[]);
    for args in [
        json!(["--model", "no-such-model"]),
        json!(["--temperature", "hot"]),
        json!(["--frobnicate"]),
        json!(["--max-tokens"]),
        json!(["--context-policy", "sometimes"]),
    ] {
        let (s, v) = post(&d.addr, "/v1/actors", &json!({"module": "chat", "args": args}));
        assert_eq!(s, 400, "{args}: {v}");
        assert_eq!(v["error"]["param"], "args", "{v}");
    }
    let (s, v) = post(&d.addr, "/v1/actors", &json!({"module": "chat", "tag": "openai"}));
    assert_eq!(s, 400, "{v}");
    assert!(common::actors(&d.addr).is_empty());
}

#[test]
fn the_openai_endpoints_actors_are_hidden_and_protected() {
    if model().is_none() {
        eprintln!("skipped: no model (scripts/fetch-model.sh)");
        return;
    }
    let dir = tmp("ops-pool");
    let d = start(&dir.join("store"), None, &[]);
    let ask = || {
        post(
            &d.addr,
            "/v1/chat/completions",
            &json!({"model": "smollm2", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}),
        )
    };
    let (s, v) = ask();
    assert_eq!(s, 200, "{v}");
    let tokens = v["usage"]["completion_tokens"].as_f64().unwrap();
    assert!(common::actors(&d.addr).is_empty(), "pool actors are hidden");
    let (_, all) = get(&d.addr, "/v1/actors?all=true");
    let pool: Vec<Value> = all["actors"].as_array().unwrap().clone();
    assert_eq!(pool.len(), 1, "{all}");
    assert_eq!(pool[0]["pool"], true);
    assert!(pool[0]["kv_bytes"].as_u64().unwrap() > 0, "its KV cache is counted: {all}");
    let (used, size) = (pool[0]["context_used"].as_u64().unwrap(), pool[0]["context_size"].as_u64().unwrap());
    assert!(used > 0 && used <= size, "{all}");
    let id = pool[0]["id"].as_u64().unwrap();
    for (m, p) in [
        ("POST", format!("/v1/actors/{id}/pause")),
        ("POST", format!("/v1/actors/{id}/move")),
        ("POST", format!("/v1/actors/{id}/messages")),
        ("POST", format!("/v1/actors/{id}/snapshot")),
        ("DELETE", format!("/v1/actors/{id}")),
    ] {
        let r = request(&d.addr, m, &p, &[], b"{}");
        assert_eq!(r.status, 403, "{m} {p}: {}", r.text());
        assert!(r.text().contains("OpenAI endpoint"), "{}", r.text());
    }
    let (s, v) = ask();
    assert_eq!(s, 200, "{v}");
    let m = metrics_text(&d.addr);
    let generated = metric(&m, "shoal_tokens_generated_total").unwrap();
    assert!(generated >= tokens + v["usage"]["completion_tokens"].as_f64().unwrap() && generated > 0.0, "{m}");
    assert_eq!(metric(&m, "shoal_openai_pool_actors"), Some(1.0), "{m}");
    assert!(metric(&m, "shoal_kv_bytes").unwrap() > 0.0, "{m}");
    let out = shoal().args(["ps", "--all", "--addr", &d.addr]).output().unwrap();
    let ps = String::from_utf8_lossy(&out.stdout);
    assert!(ps.contains(&format!("{id}*")) && ps.contains("(openai)"), "{ps}");
    let out = shoal().args(["ps", "--addr", &d.addr]).output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("(openai)"));
}

#[test]
fn cors_for_allowed_origins_only() {
    let dir = tmp("ops-cors");
    let d = start(&dir.join("store"), None, &["--allow-origin", "http://localhost:3000", "--api-key", "k3y"]);
    let ok = "http://localhost:3000";
    let pre = [
        ("origin", ok),
        ("access-control-request-method", "POST"),
        ("access-control-request-headers", "authorization, content-type"),
    ];
    let r = request(&d.addr, "OPTIONS", "/v1/actors", &pre, b"");
    assert_eq!(r.status, 204, "{}", r.all());
    assert_eq!(r.header("access-control-allow-origin").as_deref(), Some(ok));
    let headers = r.header("access-control-allow-headers").unwrap_or_default();
    assert!(headers.contains("authorization") && headers.contains("content-type"), "{headers}");
    assert!(r.header("access-control-allow-methods").unwrap_or_default().contains("post"), "{}", r.head);
    assert!(r.header("access-control-max-age").is_some());
    assert!(r.header("vary").unwrap_or_default().to_ascii_lowercase().contains("origin"));

    let r = request(&d.addr, "GET", "/v1/actors", &[("origin", ok), ("authorization", "Bearer k3y")], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin").as_deref(), Some(ok));
    // Without the key, still refused (the preflight needs none, the request does).
    let r = request(&d.addr, "GET", "/v1/actors", &[("origin", ok)], b"");
    assert_eq!(r.status, 401);

    let evil = [("origin", "http://evil.example"), ("access-control-request-method", "POST")];
    let r = request(&d.addr, "OPTIONS", "/v1/actors", &evil, b"");
    assert_eq!(r.status, 403, "{}", r.all());
    assert!(!r.head.contains("access-control-"), "{}", r.head);
    let r = request(&d.addr, "GET", "/v1/actors", &[("authorization", "Bearer k3y")], b"");
    assert_eq!(r.status, 200);
    assert!(!r.head.contains("access-control-"), "{}", r.head);
}

/// An actor that writes a line to its stderr for each message, then echoes it.
const TALKER: &str = r#"(module
  (import "shoal_v1" "reply" (func $reply (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 2000) "\00\08\00\00\0f\00\00\00")
  (data (i32.const 2048) "guest says hi\1b\n")
  (func (export "shoal_actor_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "shoal_actor_message") (param $p i32) (param $len i32) (result i32)
    (drop (call $fd_write (i32.const 2) (i32.const 2000) (i32.const 1) (i32.const 2016)))
    (drop (call $reply (local.get $p) (local.get $len)))
    (i32.const 0)))"#;

#[test]
fn log_lines_of_a_message_name_the_actor_and_its_request() {
    let dir = tmp("ops-actorlog");
    let mods = modules_dir(&dir, &[("talker", TALKER)]);
    let d = start(&dir.join("store"), Some(&mods), &[]);
    let (s, v) = post(&d.addr, "/v1/actors", &json!({"module": "talker", "name": "chatty"}));
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_u64().unwrap();
    let r = request(&d.addr, "POST", "/v1/actors/chatty/messages", &[("x-request-id", "talk-1")], b"yo");
    assert_eq!(r.status, 200, "{}", r.text());
    let actor = format!("actor={id}");
    assert!(
        eventually(Duration::from_secs(10), || d
            .stderr()
            .lines()
            .any(|l| l.contains("guest says hi") && l.contains(&actor) && l.contains("shoal_host::guest"))),
        "no guest line naming the actor: {}",
        d.stderr()
    );
    // The escape character is escaped: a guest cannot write terminal codes into the log.
    assert!(!d.stderr().contains('\u{1b}'), "{}", d.stderr());
    assert!(
        eventually(Duration::from_secs(10), || d
            .stderr()
            .lines()
            .any(|l| l.contains("talk-1") && l.contains(&actor) && l.contains("status=200"))),
        "no request line naming the actor: {}",
        d.stderr()
    );
}

#[test]
fn attach_talks_line_by_line_and_detaches_at_end_of_input() {
    use std::io::Write as _;
    let dir = tmp("ops-attach");
    let mods = modules_dir(&dir, &[("echo", ECHO)]);
    let d = start(&dir.join("store"), Some(&mods), &[]);
    assert_eq!(post(&d.addr, "/v1/actors", &json!({"module": "echo", "name": "pal"})).0, 201);
    let mut child = shoal()
        .args(["attach", "pal", "--addr", &d.addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"first line\n\nsecond line\n\x1d\nnot sent\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout, "first line\nsecond line\n", "{out:?}");
    // Detached, not killed: the actor is there, with both messages.
    let (_, l) = get(&d.addr, "/v1/actors");
    let a = &l["actors"][0];
    assert_eq!((&a["name"], &a["messages"]), (&json!("pal"), &json!(2)), "{l}");
    // No such actor: an error before anything is read.
    let out = shoal().args(["attach", "nobody", "--addr", &d.addr]).stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn names_come_back_with_their_actors_after_a_restart() {
    let dir = tmp("ops-restart");
    let mods = modules_dir(&dir, &[("echo", ECHO)]);
    let store = dir.join("store");
    let mut d = start(&store, Some(&mods), &[]);
    let (s, v) = post(&d.addr, "/v1/actors", &json!({"module": "echo", "name": "keeper"}));
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_u64().unwrap();
    assert_eq!(send(&d.addr, id, "x").unwrap(), "x");
    d.signal("TERM");
    assert!(d.wait_exit(Duration::from_secs(60)).is_some_and(|st| st.success()), "{}", d.stderr());
    let d = start(&store, Some(&mods), &[]);
    let r = request(&d.addr, "POST", "/v1/actors/keeper/messages", &[], b"back");
    assert_eq!(r.status, 200, "{}", r.text());
    let (_, l) = get(&d.addr, "/v1/actors");
    assert_eq!((&l["actors"][0]["id"], &l["actors"][0]["name"]), (&json!(id), &json!("keeper")), "{l}");
    // Still unique: the name is taken.
    assert_eq!(post(&d.addr, "/v1/actors", &json!({"module": "echo", "name": "keeper"})).0, 409);
}
