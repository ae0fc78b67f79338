//! `shoal serve` attacked over loopback, as a hostile client (or a careless one) would: module
//! names that are paths, links, FIFOs or secrets; requests from other hosts, web pages and
//! without the key; heads without end, requests half sent or cut off, bodies too large;
//! readers that never read; more actors than allowed; requests of the wrong shape; replies
//! that are not text; snapshots racing each other; a daemon stopped (SIGTERM) or killed
//! (SIGKILL) with actors in it, and two daemons on one store. Each test starts its own daemon,
//! is bounded in time, and checks what the daemon answers, what it holds (its resident memory,
//! from /proc) and that the other actors keep answering.
//!
//! The tests that need the default model (`scripts/fetch-model.sh`) skip without it.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{
    COUNTER, ECHO, actors, call, get, model, modules_dir, parse, post, request, send, send_bytes, serve_command, shoal,
    spawn, start, state_of, tmp, try_request, try_start, wait_state,
};
use serde_json::{Value, json};

/// A MiB in KiB, as /proc counts resident memory.
const MIB: u64 = 1 << 10;

/// The highest resident memory of a process while it is watched.
struct Peak {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<u64>,
}

impl Peak {
    fn watch(pid: u32) -> Peak {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut top = 0;
            while !s.load(Ordering::Relaxed) {
                top = top.max(common::rss_kib(pid));
                std::thread::sleep(Duration::from_millis(5));
            }
            top.max(common::rss_kib(pid))
        });
        Peak { stop, thread }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Whether the daemon closed `s`: reads (discarding) until the end, at most `limit`. The
/// bytes read come back too.
fn closed_by_peer(s: &mut TcpStream, limit: Duration) -> (bool, Vec<u8>) {
    let t0 = Instant::now();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let left = limit.saturating_sub(t0.elapsed());
        if left.is_zero() {
            return (false, got);
        }
        s.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return (true, got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return (false, got),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // Reset or aborted: closed.
            Err(_) => return (true, got),
        }
    }
}

/// What came back on a socket, for messages: the status line, or how it ended.
fn answer_of(bytes: &[u8]) -> String {
    match parse(bytes) {
        Some(r) => format!("HTTP {}", r.status),
        None if bytes.is_empty() => "closed without an answer".into(),
        None => format!("{:?}", String::from_utf8_lossy(&bytes[..bytes.len().min(80)])),
    }
}

// ---------------------------------------------------------------------------------------
// 1. Module loading

const SECRET: &str = "SHOAL-TEST-SECRET-7d1f0c";
const ENV_SECRET: &str = "SHOAL-ENV-SECRET-a93b2e";

#[test]
fn module_names_are_never_paths_links_fifos_or_secrets() {
    let dir = tmp("modules");
    let mods = modules_dir(&dir, &[("echo", ECHO)]);
    let secret = dir.join("secret.txt");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    std::os::unix::fs::symlink(&secret, mods.join("link.wasm")).unwrap();
    std::os::unix::fs::symlink(&secret, mods.join("textlink.wat")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", mods.join("zero.wasm")).unwrap();
    std::os::unix::fs::symlink("/proc/self/environ", mods.join("environ.wat")).unwrap();
    std::os::unix::fs::symlink(&dir, mods.join("up.wasm")).unwrap();
    let fifo = mods.join("fifo.wasm");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    std::fs::write(mods.join("big.wasm"), format!("{SECRET} ").repeat(100)).unwrap();
    std::fs::write(mods.join("bad.wat"), SECRET).unwrap();
    std::fs::write(mods.join("worse.wat"), format!("(module (func (export \"f\") {SECRET}))")).unwrap();
    std::fs::write(mods.join("half.wasm"), format!("\0asm\x01\0\0\0{SECRET}")).unwrap();
    std::fs::create_dir(mods.join("dir.wasm")).unwrap();
    let mut cmd = serve_command(&dir.join("store"), Some(&mods), &["--max-module-bytes", "1K"]);
    cmd.env("SHOAL_TEST_ENV_SECRET", ENV_SECRET);
    let d = try_start(cmd).unwrap_or_else(|(st, e)| panic!("{st}: {e}"));

    // Warm up: one spawn of a good module, so that what it allocates once is counted before.
    let echo = spawn(&d.addr, "echo", &[]);
    assert_eq!(send(&d.addr, echo, "hi").unwrap(), "hi");
    let before = d.rss_kib();
    let long = "a".repeat(5000);
    let names: Vec<&str> = vec![
        "/proc/self/environ",
        "../x",
        "/dev/zero",
        "../secret.txt",
        "../secret",
        "..",
        ".",
        "./echo",
        "mods/../secret.txt",
        "%2e%2e%2fsecret.txt",
        "echo/",
        "echo\0",
        " echo",
        "\u{202e}echo",
        "",
        &long,
        "link",
        "link.wasm",
        "textlink",
        "zero",
        "environ",
        "up",
        "fifo",
        "fifo.wasm",
        "big",
        "bad",
        "bad.wat",
        "worse",
        "half",
        "dir",
        "dir.wasm",
        "nosuch",
    ];
    let mut slowest = Duration::ZERO;
    for round in 0..3 {
        for name in &names {
            let t0 = Instant::now();
            let r = request(&d.addr, "POST", "/v1/actors", &[], &serde_json::to_vec(&json!({"module": name})).unwrap());
            let took = t0.elapsed();
            slowest = slowest.max(took);
            let all = r.all();
            if round == 0 {
                let shown: String = name.chars().take(24).collect();
                eprintln!("module {shown:?}: HTTP {} in {took:.1?}: {}", r.status, r.json()["error"]["message"]);
            }
            assert!((400..500).contains(&r.status), "module {name:?}: HTTP {}: {all}", r.status);
            assert!(took < Duration::from_secs(2), "module {name:?} took {took:?}");
            assert!(!all.contains(SECRET), "module {name:?}: the answer quotes the secret file: {all}");
            assert!(!all.contains(ENV_SECRET), "module {name:?}: the answer quotes the environment: {all}");
            assert!(!all.contains("PATH="), "module {name:?}: the answer quotes the environment: {all}");
        }
    }
    let after = d.rss_kib();
    eprintln!(
        "module attacks: daemon RSS {before} KiB before, {after} KiB after {} refused spawns; slowest {slowest:.1?}",
        3 * names.len()
    );
    assert!(after < before + 16 * MIB, "RSS grew from {before} KiB to {after} KiB");
    // Nothing was spawned; the daemon, the FIFO and the secret are as they were.
    assert_eq!(actors(&d.addr).len(), 1);
    assert_eq!(send(&d.addr, echo, "still here").unwrap(), "still here");
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), format!("{SECRET}\n"));
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&std::fs::metadata(&fifo).unwrap().file_type()));
    // The listing names regular files only.
    let (s, v) = get(&d.addr, "/v1/modules");
    assert_eq!(s, 200, "{v}");
    let listed: Vec<&str> = v["modules"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    for hidden in ["link", "textlink", "zero", "environ", "up", "fifo", "dir"] {
        assert!(!listed.contains(&hidden), "{hidden} listed: {v}");
    }
    assert!(listed.contains(&"echo"), "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// 2. Host, Origin, API key

#[test]
fn host_origin_and_api_key_are_checked() {
    let dir = tmp("guard");
    let mods = modules_dir(&dir, &[("echo", ECHO)]);
    let key = "k3y-ZX81-test-only";
    let d = start(&dir.join("store"), Some(&mods), &["--api-key", key, "--allow-origin", "http://localhost:3000"]);
    let a = d.addr.as_str();
    let port = a.rsplit(':').next().unwrap();
    let bearer = format!("Bearer {key}");
    let auth = ("Authorization", bearer.as_str());
    let status = |path: &str, headers: &[(&str, &str)]| {
        let r = request(a, "GET", path, headers, b"");
        assert!(!r.all().contains(key), "the answer quotes the key: {}", r.all());
        r.status
    };

    let r = request(a, "GET", "/v1/actors", &[], b"");
    assert_eq!(r.status, 401, "{}", r.all());
    assert_eq!(r.header("www-authenticate").as_deref(), Some("bearer"), "{}", r.head);
    let short = format!("Bearer {}", &key[..key.len() - 1]);
    let long = format!("Bearer {key}x");
    let basic = format!("Basic {key}");
    for wrong in ["Bearer wrong", short.as_str(), long.as_str(), basic.as_str(), key, "Bearer ", "Bearer"] {
        assert_eq!(status("/v1/actors", &[("Authorization", wrong)]), 401, "Authorization: {wrong}");
    }
    assert_eq!(status("/v1/actors", &[auth]), 200);
    assert_eq!(status("/health", &[]), 200);
    // A spawn without the key does nothing.
    let r = request(a, "POST", "/v1/actors", &[], br#"{"module": "echo"}"#);
    assert_eq!(r.status, 401, "{}", r.all());
    let r = request(a, "POST", "/v1/actors", &[auth], br#"{"module": "echo"}"#);
    assert_eq!(r.status, 201, "{}", r.all());
    let id = r.json()["id"].as_u64().unwrap();

    // DNS rebinding: a page whose name points at 127.0.0.1 sends its own name.
    let evil_port = format!("evil.example:{port}");
    let tricky = format!("127.0.0.1.evil.example:{port}");
    for host in ["evil.example", evil_port.as_str(), tricky.as_str(), "localhost.", "127.0.0.2"] {
        assert_eq!(status("/v1/actors", &[("Host", host), auth]), 403, "Host: {host}");
        assert_eq!(status("/health", &[("Host", host)]), 403, "Host: {host} on /health");
    }
    let local = format!("localhost:{port}");
    let v6 = format!("[::1]:{port}");
    for host in [local.as_str(), v6.as_str(), "LOCALHOST", "127.0.0.1"] {
        assert_eq!(status("/v1/actors", &[("Host", host), auth]), 200, "Host: {host}");
    }
    // CSRF: web pages send their Origin.
    for origin in ["http://evil.example", "null", "http://localhost:3001", "https://localhost:3000"] {
        assert_eq!(status("/v1/actors", &[("Origin", origin), auth]), 403, "Origin: {origin}");
    }
    assert_eq!(status("/v1/actors", &[("Origin", "http://localhost:3000"), auth]), 200);
    assert_eq!(status("/v1/actors", &[("Origin", "http://localhost:3000")]), 401);

    // The client verbs send SHOAL_API_KEY.
    let out = shoal().args(["ps", "--addr", a]).env("SHOAL_API_KEY", key).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("{id}")), "{out:?}");
    let out = shoal().args(["send", "--addr", a, &id.to_string(), "via cli"]).env("SHOAL_API_KEY", key).output();
    let out = out.unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"via cli");
    for (what, env) in [("no key", None), ("a wrong key", Some("nope"))] {
        let mut cmd = shoal();
        cmd.args(["ps", "--addr", a]);
        if let Some(k) = env {
            cmd.env("SHOAL_API_KEY", k);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        eprintln!("shoal ps with {what}: {:?}: {}", out.status.code(), err.trim());
        assert!(!out.status.success(), "{what}: {out:?}");
        assert!(err.contains("401"), "{what}: {err}");
    }
    drop(d);

    // Beyond loopback only with a key.
    let store = dir.join("store-any");
    let (st, err) = match try_start(serve_command(&store, None, &["--addr", "0.0.0.0:0"])) {
        Ok(d) => panic!("listening on {} without a key", d.addr),
        Err(e) => e,
    };
    eprintln!("--addr 0.0.0.0:0 without a key: {st}: {}", err.trim());
    assert!(!st.success());
    assert!(err.contains("--api-key"), "{err}");
    let d = try_start(serve_command(&store, None, &["--addr", "0.0.0.0:0", "--api-key", key]))
        .unwrap_or_else(|(st, e)| panic!("with a key: {st}: {e}"));
    let port = d.addr.rsplit(':').next().unwrap();
    let at = format!("127.0.0.1:{port}");
    assert_eq!(request(&at, "GET", "/v1/actors", &[auth], b"").status, 200);
    assert_eq!(request(&at, "GET", "/v1/actors", &[], b"").status, 401);
    assert_eq!(request(&at, "GET", "/v1/actors", &[("Host", "evil.example"), auth], b"").status, 403);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// 3. Slow and broken clients

/// Sends `prefix`, then `filler` again and again (up to 64 MiB) without ever ending the
/// head. Returns the bytes the daemon took, whether it closed the connection, what it
/// answered, and how long it took.
fn endless_head(addr: &str, prefix: &[u8], filler: &[u8]) -> (usize, bool, String, Duration) {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let chunk: Vec<u8> = filler.iter().copied().cycle().take(64 << 10).collect();
    let mut sent = 0;
    let mut closed = false;
    let r = s.write_all(prefix);
    if r.is_ok() {
        while sent < 64 << 20 {
            match s.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    // Timed out: it stops reading; reset or broken pipe: it closed.
                    closed = !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
                    break;
                }
            }
        }
    }
    let (closed_after, got) = closed_by_peer(&mut s, Duration::from_secs(3));
    (sent, closed || closed_after, answer_of(&got), t0.elapsed())
}

#[test]
fn an_endless_head_is_cut_off_and_costs_no_memory() {
    let dir = tmp("endless");
    let d = start(&dir.join("store"), None, &[]);
    assert_eq!(call(&d.addr, "GET", "/health", b"").0, 200);
    let before = d.rss_kib();
    let cases: [(&str, &[u8], &[u8]); 4] = [
        ("a request line without end", b"GET /", b"a"),
        ("a header line without end", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: ", b"a"),
        ("headers without end", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"X-A: b\r\n"),
        ("a header name without end", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"x"),
    ];
    for (what, prefix, filler) in cases {
        let peak = Peak::watch(d.pid());
        let (sent, closed, answer, took) = endless_head(&d.addr, prefix, filler);
        let top = peak.finish();
        eprintln!(
            "{what}: the daemon took {} KiB, then {} ({answer}) after {took:.1?}; RSS {before} KiB before, peak {top} KiB (+{} KiB)",
            sent >> 10,
            if closed { "closed the connection" } else { "kept it open" },
            top.saturating_sub(before)
        );
        assert!(closed, "{what}: the daemon kept the connection open after {} KiB", sent >> 10);
        assert!(sent < 64 << 20, "{what}: the daemon read all 64 MiB");
        assert!(answer == "HTTP 431" || answer == "HTTP 400" || answer.starts_with("closed"), "{what}: {answer}");
        assert!(top < before + 32 * MIB, "{what}: RSS from {before} KiB to {top} KiB");
    }
    assert_eq!(call(&d.addr, "GET", "/health", b"").0, 200);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn half_sent_requests_are_timed_out_and_lock_nobody_out() {
    let dir = tmp("halfsent");
    let d = start(&dir.join("store"), None, &["--max-connections", "64", "--request-timeout", "2"]);
    let timeout = Duration::from_secs(2);
    assert_eq!(call(&d.addr, "GET", "/health", b"").0, 200);
    let before = d.rss_kib();
    let t0 = Instant::now();
    let mut socks = Vec::new();
    for i in 0..300 {
        let mut s = TcpStream::connect(&d.addr).unwrap();
        let _ = match i % 3 {
            0 => Ok(()),
            1 => s.write_all(b"POST /v1/actors HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le"),
            _ => s.write_all(b"POST /v1/actors HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{\"module\""),
        };
        socks.push(s);
    }
    eprintln!("300 half-sent requests opened in {:.1?}", t0.elapsed());

    // Meanwhile, a client is answered at once: served, or told to come back.
    let mut during = Vec::new();
    for _ in 0..5 {
        let t1 = Instant::now();
        let r = try_request(&d.addr, "GET", "/health", &[], b"");
        let took = t1.elapsed();
        let shown = r.as_ref().map_or_else(|e| format!("error: {e}"), |r| format!("HTTP {}", r.status));
        during.push(format!("{shown} in {took:.1?}"));
        assert!(took < Duration::from_secs(1), "a request during the attack took {took:?} ({shown})");
        assert!(matches!(r.as_ref().map(|r| r.status), Ok(200 | 503)), "during the attack: {shown}");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("requests during the attack: {during:?}");

    // After the request timeout, requests are served again.
    std::thread::sleep(timeout.saturating_sub(t0.elapsed()));
    let back = loop {
        if let Ok(r) = try_request(&d.addr, "GET", "/health", &[], b"")
            && r.status == 200
        {
            break t0.elapsed();
        }
        assert!(t0.elapsed() < timeout + Duration::from_secs(4), "no request served again after {:?}", t0.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("served again {back:.1?} after the attack began (--request-timeout 2)");
    assert!(back < timeout + Duration::from_secs(2), "served again only after {back:?}");

    // Every half-sent request's connection was closed by the daemon.
    let mut open: Vec<usize> = (0..socks.len()).collect();
    let mut answers = std::collections::BTreeMap::<String, usize>::new();
    let mut got: Vec<Vec<u8>> = vec![Vec::new(); socks.len()];
    let deadline = t0 + timeout + Duration::from_secs(4);
    while !open.is_empty() && Instant::now() < deadline {
        open.retain(|&i| {
            let s = &mut socks[i];
            s.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break false,
                    Ok(n) => got[i].extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break true,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break false,
                }
            }
        });
        std::thread::sleep(Duration::from_millis(50));
    }
    for (i, g) in got.iter().enumerate() {
        if !open.contains(&i) {
            *answers.entry(answer_of(g)).or_default() += 1;
        }
    }
    let after = d.rss_kib();
    eprintln!(
        "half-sent connections closed by the daemon within {:.1?}: {}; answers {answers:?}; still open: {}; RSS {before} KiB before, {after} KiB after",
        t0.elapsed(),
        300 - open.len(),
        open.len()
    );
    assert!(open.is_empty(), "{} half-sent connections still open {:?} after they began", open.len(), t0.elapsed());
    assert!(actors(&d.addr).is_empty(), "a half-sent spawn spawned");
    assert_eq!(call(&d.addr, "GET", "/health", b"").0, 200);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sends `bytes`, then ends the request there (`half`: shuts the writing side, else closes
/// the socket); returns whether the daemon closed it within 3 s, and what it answered.
fn cut_off(addr: &str, bytes: &[u8], half: bool) -> (bool, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(bytes).unwrap();
    if half {
        s.shutdown(Shutdown::Write).unwrap();
        let (closed, got) = closed_by_peer(&mut s, Duration::from_secs(3));
        (closed, answer_of(&got))
    } else {
        drop(s);
        (true, "(closed by the client)".into())
    }
}

#[test]
fn requests_cut_off_are_never_carried_out() {
    let dir = tmp("cutoff");
    let mods = modules_dir(&dir, &[("echo", ECHO)]);
    let d = start(&dir.join("store"), Some(&mods), &["--request-timeout", "1"]);
    let id = spawn(&d.addr, "echo", &[]);
    assert_eq!(send(&d.addr, id, "one").unwrap(), "one");
    let del = format!("DELETE /v1/actors/{id} HTTP/1.1\r\n");
    let heads = [
        format!("{del}Host: 127.0.0.1\r\n"),
        format!("{del}Host: 127.0.0.1\r\nContent-Length: 0\r\n"),
        format!("{del}Host: 127.0.0.1\r\nContent-Length: 0\r\n\r"),
        format!("{del}Host: 127.0"),
        format!("DELETE /v1/actors/{id} HTTP/1.1"),
        format!("DELETE /v1/actors/{id}"),
    ];
    let msg = format!("POST /v1/actors/{id}/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    let snap = format!("POST /v1/actors/{id}/snapshot HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    let spawn_head = "POST /v1/actors HTTP/1.1\r\nHost: 127.0.0.1\r\n";
    let bodies = [
        format!("{spawn_head}Content-Length: 40\r\n\r\n{{\"module\": \"echo\"}}"),
        format!("{spawn_head}Transfer-Encoding: chunked\r\n\r\n12\r\n{{\"module\": \"echo\"}}\r\n"),
        format!("{spawn_head}Transfer-Encoding: chunked\r\n\r\n12\r\n{{\"module\": \"echo\"}}"),
        format!("{msg}Content-Length: 10\r\n\r\nabc"),
        format!("{msg}Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"),
        format!("{snap}Content-Length: 30\r\n\r\n{{\"key\": \"cut\"}}"),
    ];
    for (i, bytes) in heads.iter().chain(&bodies).enumerate() {
        for half in [true, false] {
            let (closed, answer) = cut_off(&d.addr, bytes.as_bytes(), half);
            if half {
                eprintln!("cut off {:?}: {answer}", bytes.lines().last().unwrap_or(""));
                assert!(closed, "request {i} ({bytes:?}): the daemon kept the connection open");
                assert!(!answer.starts_with("HTTP 2"), "request {i} ({bytes:?}) was carried out: {answer}");
            }
        }
    }
    // The same bodies, held open: the request timeout ends them, unanswered or 408.
    for bytes in &bodies {
        let t0 = Instant::now();
        let mut s = TcpStream::connect(&d.addr).unwrap();
        s.write_all(bytes.as_bytes()).unwrap();
        let (closed, got) = closed_by_peer(&mut s, Duration::from_secs(4));
        let answer = answer_of(&got);
        eprintln!("held open {:?}: {answer} after {:.1?}", bytes.lines().last().unwrap_or(""), t0.elapsed());
        assert!(closed, "{bytes:?}: still open after {:?}", t0.elapsed());
        assert!(!answer.starts_with("HTTP 2"), "{bytes:?} was carried out: {answer}");
    }
    // Give a request that slipped through the time to be carried out, then look.
    std::thread::sleep(Duration::from_millis(300));
    let list = actors(&d.addr);
    assert_eq!(list.len(), 1, "only the first actor: {list:?}");
    assert_eq!(list[0]["id"], json!(id), "{list:?}");
    assert_eq!(list[0]["state"], json!("idle"), "{list:?}");
    assert_eq!(list[0]["messages"], json!(1), "a cut-off message was delivered: {list:?}");
    let (_, v) = get(&d.addr, "/v1/snapshots");
    assert_eq!(v["snapshots"], json!([]), "{v}");
    assert_eq!(send(&d.addr, id, "again").unwrap(), "again");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bodies_past_max_body_are_413() {
    let dir = tmp("maxbody");
    let mods = modules_dir(&dir, &[("echo", ECHO)]);
    let d = start(&dir.join("store"), Some(&mods), &["--max-body", "1K", "--request-timeout", "5"]);
    let id = spawn(&d.addr, "echo", &[]);
    // At the limit: taken whole.
    let at: Vec<u8> = (0..1024).map(|i| b'a' + (i % 26) as u8).collect();
    assert_eq!(send_bytes(&d.addr, id, &at).unwrap(), at);
    let big_spawn = serde_json::to_vec(&json!({"module": "echo", "tag": "x".repeat(2000)})).unwrap();
    let r = request(&d.addr, "POST", "/v1/actors", &[], &big_spawn);
    assert_eq!(r.status, 413, "{}", r.all());
    for n in [1025, 4096, 1 << 20] {
        let t0 = Instant::now();
        let r = try_request(&d.addr, "POST", &format!("/v1/actors/{id}/messages"), &[], &vec![b'x'; n]);
        let shown = r.as_ref().map_or_else(|e| format!("error: {e}"), |r| format!("HTTP {}", r.status));
        eprintln!("a message of {n} bytes: {shown} in {:.1?}", t0.elapsed());
        assert_eq!(r.map(|r| r.status).ok(), Some(413), "{n} bytes: {shown}");
    }
    // Chunked, past the limit.
    let mut s = TcpStream::connect(&d.addr).unwrap();
    write!(s, "POST /v1/actors/{id}/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    for _ in 0..4 {
        let _ = write!(s, "200\r\n{}\r\n", "y".repeat(512));
    }
    let (_, got) = closed_by_peer(&mut s, Duration::from_secs(3));
    assert_eq!(answer_of(&got), "HTTP 413", "chunked");
    let list = actors(&d.addr);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["messages"], json!(1), "a refused message was delivered: {list:?}");
    // A length announced past the limit is refused before the body comes.
    let t0 = Instant::now();
    let mut s = TcpStream::connect(&d.addr).unwrap();
    write!(s, "POST /v1/actors/{id}/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000000000\r\n\r\n")
        .unwrap();
    let (closed, got) = closed_by_peer(&mut s, Duration::from_secs(7));
    let took = t0.elapsed();
    eprintln!("Content-Length: 10^12 and no body: {} after {took:.1?} (--request-timeout 5)", answer_of(&got));
    assert_eq!(answer_of(&got), "HTTP 413", "after {took:?}");
    assert!(closed && took < Duration::from_secs(2), "answered after {took:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// 4. Streams

/// `f…`: replies 64 KiB of `A` 100,000 times (it stops when a reply fails); else echoes.
const FLOOD: &str = r#"(module
  (import "shoal_v1" "reply" (func $reply (param i32 i32) (result i32)))
  (memory (export "memory") 3)
  (func (export "shoal_actor_alloc") (param i32) (result i32) (i32.const 131072))
  (func (export "shoal_actor_message") (param $p i32) (param $len i32) (result i32)
    (local $i i32)
    (if (i32.eq (i32.load8_u (local.get $p)) (i32.const 102))
      (then
        (memory.fill (i32.const 0) (i32.const 65) (i32.const 65536))
        (loop $l
          (if (call $reply (i32.const 0) (i32.const 65536)) (then (return (i32.const 0))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br_if $l (i32.lt_u (local.get $i) (i32.const 100000))))
        (return (i32.const 0))))
    (drop (call $reply (local.get $p) (local.get $len)))
    (i32.const 0)))"#;

#[test]
fn a_reader_that_never_reads_holds_its_actor_not_the_daemon() {
    let dir = tmp("stream");
    let mods = modules_dir(&dir, &[("flood", FLOOD), ("echo", ECHO)]);
    let d = start(&dir.join("store"), Some(&mods), &["--deadline", "60"]);
    let (flood, echo) = (spawn(&d.addr, "flood", &[]), spawn(&d.addr, "echo", &[]));
    assert_eq!(send(&d.addr, flood, "warm").unwrap(), "warm");
    assert_eq!(send(&d.addr, echo, "warm").unwrap(), "warm");
    let before = d.rss_kib();
    let peak = Peak::watch(d.pid());
    let mut s = TcpStream::connect(&d.addr).unwrap();
    s.write_all(common::head("POST", &format!("/v1/actors/{flood}/messages"), &[], 1).as_bytes()).unwrap();
    s.write_all(b"f").unwrap();
    let t0 = Instant::now();
    assert!(wait_state(&d.addr, flood, "busy", Duration::from_secs(2)), "the flood never started");
    let mut slowest = Duration::ZERO;
    let mut n = 0;
    while t0.elapsed() < Duration::from_secs(3) {
        let t1 = Instant::now();
        let m = format!("ping {n}");
        assert_eq!(send(&d.addr, echo, &m).unwrap(), m);
        slowest = slowest.max(t1.elapsed());
        n += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let state = state_of(&d.addr, flood);
    let top = peak.finish();
    eprintln!(
        "a reader that never reads, 3 s: daemon RSS {before} KiB before, peak {top} KiB (+{} KiB); the flood actor {state:?}; \
         {n} echo messages meanwhile, slowest {slowest:.1?}",
        top.saturating_sub(before)
    );
    assert_eq!(state.as_deref(), Some("busy"), "the actor is held by its reader");
    assert!(top < before + 64 * MIB, "RSS from {before} KiB to {top} KiB");
    assert!(slowest < Duration::from_secs(1), "an echo took {slowest:?}");
    // The reader goes away: the actor is let go.
    drop(s);
    let t1 = Instant::now();
    assert!(wait_state(&d.addr, flood, "idle", Duration::from_secs(3)), "still {:?}", state_of(&d.addr, flood));
    eprintln!("the flood actor idle {:.1?} after its reader left", t1.elapsed());
    assert_eq!(send(&d.addr, flood, "again").unwrap(), "again");
    assert_eq!(call(&d.addr, "GET", "/health", b"").0, 200);
    let after = d.rss_kib();
    eprintln!("daemon RSS {after} KiB once the reader left");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// 5. Caps

#[test]
fn max_actors_is_held_under_a_race_too() {
    let dir = tmp("caps");
    let mods = modules_dir(&dir, &[("echo", ECHO)]);
    let d = start(&dir.join("store"), Some(&mods), &["--max-actors", "3"]);
    let ids: Vec<u64> = (0..3).map(|_| spawn(&d.addr, "echo", &[])).collect();
    let (s, v) = post(&d.addr, "/v1/actors", &json!({"module": "echo"}));
    assert_eq!(s, 429, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("--max-actors"), "{v}");
    // A restore takes a seat too; so does a paused actor.
    assert_eq!(post(&d.addr, &format!("/v1/actors/{}/snapshot", ids[0]), &json!({"key": "cap"})).0, 200);
    let (s, v) = post(&d.addr, "/v1/snapshots/cap/restore", &json!({}));
    assert_eq!(s, 429, "{v}");
    assert_eq!(post(&d.addr, &format!("/v1/actors/{}/pause", ids[1]), &json!({})).0, 200);
    assert_eq!(post(&d.addr, "/v1/actors", &json!({"module": "echo"})).0, 429);
    assert_eq!(call(&d.addr, "DELETE", &format!("/v1/actors/{}", ids[2]), b"").0, 200);
    // One seat, eight spawns at once: one gets it.
    let barrier = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (addr, b) = (d.addr.clone(), barrier.clone());
            std::thread::spawn(move || {
                b.wait();
                post(&addr, "/v1/actors", &json!({"module": "echo"})).0
            })
        })
        .collect();
    let mut statuses: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    statuses.sort();
    eprintln!("eight spawns racing for one seat: {statuses:?}");
    assert_eq!(statuses, [201, 429, 429, 429, 429, 429, 429, 429]);
    assert_eq!(actors(&d.addr).len(), 3);
    assert_eq!(call(&d.addr, "DELETE", &format!("/v1/actors/{}", ids[0]), b"").0, 200);
    let (s, v) = post(&d.addr, "/v1/snapshots/cap/restore", &json!({}));
    assert_eq!(s, 200, "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// 6. Typed requests

fn assert_refused(r: (u16, Value), want: &[u16], names: &str, what: &str) {
    let (s, v) = r;
    eprintln!("{what}: HTTP {s}: {}", v["error"]["message"]);
    assert!(want.contains(&s), "{what}: HTTP {s} (want {want:?}): {v}");
    let msg = v["error"]["message"].as_str().unwrap_or("");
    assert!(msg.contains(names), "{what}: the error does not name `{names}`: {v}");
}

#[test]
fn requests_of_the_wrong_shape_are_400s_that_name_the_field() {
    let dir = tmp("typed");
    let mods = modules_dir(&dir, &[("echo", ECHO)]);
    let store = dir.join("store");
    let d = start(&store, Some(&mods), &[]);
    let a = d.addr.as_str();
    let spawn_with = |v: Value| post(a, "/v1/actors", &v);
    assert_refused(spawn_with(json!({"module": "echo", "args": [1, 2]})), &[400], "args", "args: [1, 2]");
    assert_refused(spawn_with(json!({"module": "echo", "args": "x"})), &[400], "args", "args: \"x\"");
    assert_refused(spawn_with(json!({"module": "echo", "args": [["a"]]})), &[400], "args", "args: [[\"a\"]]");
    let many: Vec<String> = (0..300).map(|i| i.to_string()).collect();
    assert_refused(spawn_with(json!({"module": "echo", "args": many})), &[400], "args", "300 args");
    assert_refused(spawn_with(json!({"module": "echo", "bogus": 1})), &[400], "bogus", "an unknown field");
    assert_refused(spawn_with(json!({"module": 5})), &[400], "module", "module: 5");
    assert_refused(spawn_with(json!({"module": "echo", "tag": "\u{7}"})), &[400], "tag", "a control tag");
    assert_refused(spawn_with(json!([])), &[400], "JSON", "a list");
    for raw in [&b"{"[..], b"null", b"\"echo\""] {
        let r = request(a, "POST", "/v1/actors", &[], raw);
        assert_eq!(r.status, 400, "{:?}: {}", String::from_utf8_lossy(raw), r.all());
    }
    assert!(actors(a).is_empty());

    // Snapshot keys.
    let id = spawn(a, "echo", &[]);
    let snap = |v: Value| post(a, &format!("/v1/actors/{id}/snapshot"), &v);
    for key in ["../../etc", ".daemon", "", "a/b", "..", "~root", "a\\b", &"k".repeat(300)] {
        let (s, v) = snap(json!({"key": key}));
        assert_eq!(s, 400, "key {key:?}: {v}");
    }
    assert_refused(snap(json!({"key": 5})), &[400], "key", "key: 5");
    assert_refused(snap(json!({"key": "ok", "extra": 1})), &[400], "extra", "an unknown field");
    assert!(!dir.join("etc").exists() && !Path::new("/etc/CURRENT").exists());
    // Keys that are not there, or not keys.
    let (status, e) = post(a, "/v1/snapshots/nokey/restore", &json!({}));
    assert_eq!(status, 404);
    // OpenAI's error shape, `code` a string even where the error names none.
    assert_eq!((&e["error"]["type"], &e["error"]["code"]), (&json!("not_found_error"), &json!("not_found")), "{e}");
    assert_eq!(call(a, "DELETE", "/v1/snapshots/nokey", b"").0, 404);
    for path in ["..%2Fx", "..%2F..%2Fetc", "%2e%2e", ".daemon", "%2edaemon", "a%00b", "..", "%2F"] {
        let del = call(a, "DELETE", &format!("/v1/snapshots/{path}"), b"");
        let res = call(a, "POST", &format!("/v1/snapshots/{path}/restore"), b"");
        eprintln!("snapshot {path:?}: DELETE HTTP {}, restore HTTP {}", del.0, res.0);
        assert!(matches!(del.0, 400 | 404), "DELETE {path}: {} {}", del.0, String::from_utf8_lossy(&del.1));
        assert!(matches!(res.0, 400 | 404), "restore {path}: {} {}", res.0, String::from_utf8_lossy(&res.1));
    }
    assert!(store.join(".daemon").is_dir(), "the journal is gone");
    // A directory of the user's in the store is neither written into nor deleted.
    std::fs::create_dir_all(store.join("mine")).unwrap();
    std::fs::write(store.join("mine/notes.txt"), "mine").unwrap();
    let outside = dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("keep.txt"), "keep").unwrap();
    std::os::unix::fs::symlink(&outside, store.join("link")).unwrap();
    for key in ["mine", "link"] {
        let (s, v) = snap(json!({"key": key}));
        eprintln!("snapshot into the user's {key:?}: HTTP {s}: {}", v["error"]["message"]);
        assert!((400..500).contains(&s), "snapshot into {key}: HTTP {s}: {v}");
        let (s, b) = call(a, "DELETE", &format!("/v1/snapshots/{key}"), b"");
        assert!((400..500).contains(&s), "DELETE {key}: HTTP {s}: {}", String::from_utf8_lossy(&b));
    }
    assert_eq!(std::fs::read_to_string(store.join("mine/notes.txt")).unwrap(), "mine");
    let left: Vec<_> = std::fs::read_dir(&outside).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left, ["keep.txt"], "written through the link");

    // The OpenAI endpoint: checked before any model is used.
    if model().is_none() {
        eprintln!("skipping the OpenAI part: no default model; run scripts/fetch-model.sh");
    } else {
        let user = json!([{"role": "user", "content": "hi"}]);
        let cases = [
            (json!({"messages": user, "max_tokens": -5}), "max_tokens"),
            (json!({"messages": user, "max_tokens": 0}), "max_tokens"),
            (json!({"messages": user, "max_tokens": "5"}), "max_tokens"),
            (json!({"messages": user, "n": 1_000_000}), "n"),
            (json!({"messages": user, "temperature": 9}), "temperature"),
            (json!({"messages": "x"}), "messages"),
            (json!({"messages": []}), "messages"),
            (json!({"messages": [{"role": "wizard", "content": "hi"}]}), "role"),
            (json!({"messages": [{"role": "user", "content": 5}]}), "messages"),
            (json!({}), "messages"),
            (json!({"messages": user, "n": 0}), "n"),
            // Honoured fields with values out of range, named.
            (json!({"messages": user, "stop": ["a", "b", "c", "d", "e"]}), "stop"),
            (json!({"messages": user, "stop": ""}), "stop"),
            (json!({"messages": user, "stop": ["x".repeat(257)]}), "stop"),
            (json!({"messages": user, "logprobs": true, "top_logprobs": 21}), "top_logprobs"),
            (json!({"messages": user, "top_logprobs": 2}), "top_logprobs"),
            (json!({"messages": user, "response_format": {"type": "json_schema"}}), "response_format"),
            (json!({"messages": user, "stream_options": {"include_usage": "yes"}}), "stream_options"),
            // Fields shoal does not honour are refused, not dropped; unknown ones too.
            (json!({"messages": user, "tools": [{"type": "function"}]}), "tools"),
            (json!({"messages": user, "presence_penalty": 0.5}), "presence_penalty"),
            (json!({"messages": user, "temprature": 0.5}), "temprature"),
        ];
        for (body, names) in cases {
            let t0 = Instant::now();
            let r = post(a, "/v1/chat/completions", &body);
            assert!(t0.elapsed() < Duration::from_secs(2), "{body}: {:?}", t0.elapsed());
            assert_refused(r, &[400], names, &body.to_string());
        }
        assert_eq!(actors(a).len(), 1, "a refused completion left an actor");
    }
    // A body that is JSON and then something else is not JSON.
    let before = actors(a).len();
    let r = request(a, "POST", "/v1/actors", &[], b"{\"module\": \"echo\"} x");
    eprintln!("a spawn's JSON followed by ` x`: HTTP {}", r.status);
    assert_eq!(r.status, 400, "{}", r.all());
    assert_eq!(actors(a).len(), before, "spawned");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// 7. Binary replies

/// `@`: replies the bytes 0 to 255 (in two parts); `#…`: replies the rest of the message a
/// byte at a time; else replies the message as it is.
fn bin_module() -> String {
    let bytes: String = (0..=255u8).map(|b| format!("\\{b:02x}")).collect();
    format!(
        r#"(module
  (import "shoal_v1" "reply" (func $reply (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 1024) "{bytes}")
  (func (export "shoal_actor_alloc") (param i32) (result i32) (i32.const 4096))
  (func (export "shoal_actor_message") (param $p i32) (param $len i32) (result i32)
    (local $i i32)
    (if (i32.and (i32.gt_u (local.get $len) (i32.const 0)) (i32.eq (i32.load8_u (local.get $p)) (i32.const 64)))
      (then
        (drop (call $reply (i32.const 1024) (i32.const 129)))
        (drop (call $reply (i32.const 1153) (i32.const 127)))
        (return (i32.const 0))))
    (if (i32.and (i32.gt_u (local.get $len) (i32.const 0)) (i32.eq (i32.load8_u (local.get $p)) (i32.const 35)))
      (then
        (local.set $i (i32.const 1))
        (block $out
          (loop $l
            (br_if $out (i32.ge_u (local.get $i) (local.get $len)))
            (drop (call $reply (i32.add (local.get $p) (local.get $i)) (i32.const 1)))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br $l)))
        (return (i32.const 0))))
    (drop (call $reply (local.get $p) (local.get $len)))
    (i32.const 0)))"#
    )
}

#[test]
fn replies_that_are_not_text_come_back_byte_for_byte() {
    let dir = tmp("binary");
    let bin = bin_module();
    let mods = modules_dir(&dir, &[("bin", &bin)]);
    let d = start(&dir.join("store"), Some(&mods), &[]);
    let id = spawn(&d.addr, "bin", &[]);
    let all: Vec<u8> = (0..=255u8).collect();
    assert_eq!(send_bytes(&d.addr, id, &all).unwrap(), all, "the bytes 0 to 255, echoed");
    let rev: Vec<u8> = (0..=255u8).rev().collect();
    assert_eq!(send_bytes(&d.addr, id, &rev).unwrap(), rev, "the bytes 255 to 0, echoed");
    assert_eq!(send_bytes(&d.addr, id, b"@").unwrap(), all, "the bytes 0 to 255 in two parts");
    // Characters cut between parts are joined; bytes that are no character stay bytes.
    let mut mixed = "aé漢🎉".as_bytes().to_vec();
    mixed.extend_from_slice(&[0x80, 0xff, 0xc3, b'z', 0xe2, 0x82]);
    let mut msg = vec![b'#'];
    msg.extend_from_slice(&mixed);
    let r = request(&d.addr, "POST", &format!("/v1/actors/{id}/messages"), &[], &msg);
    assert_eq!(r.status, 200, "{}", r.all());
    assert_eq!(common::ndjson(&r.body).unwrap(), mixed, "{}", r.text());
    let text: String = r
        .text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?["chunk"].as_str().map(String::from))
        .collect();
    assert!(text.contains("é漢🎉") && !text.contains('\u{fffd}'), "{}", r.text());
    assert_eq!(send_bytes(&d.addr, id, "plain text ü".as_bytes()).unwrap(), "plain text ü".as_bytes());
    // `shoal send` writes the bytes as they are.
    let out = shoal().args(["send", "--addr", &d.addr, &id.to_string(), "@"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, all, "shoal send's stdout");
    let out = shoal().args(["send", "--addr", &d.addr, &id.to_string(), "#é\u{1}x"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, "é\u{1}x".as_bytes());
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// 8. Snapshot races

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.contains(".tmp")).collect()
        })
        .unwrap_or_default()
}

#[test]
fn snapshots_racing_for_one_key_leave_one_whole_snapshot() {
    let dir = tmp("race");
    let mods = modules_dir(&dir, &[("counter", COUNTER)]);
    let store = dir.join("store");
    let d = start(&store, Some(&mods), &[]);
    let a = d.addr.as_str();
    let (x, y) = (spawn(a, "counter", &[]), spawn(a, "counter", &[]));
    for _ in 0..3 {
        send(a, x, "+").unwrap();
    }
    for _ in 0..7 {
        send(a, y, "+").unwrap();
    }
    assert_eq!(send(a, x, "?").unwrap(), "3");
    assert_eq!(send(a, y, "?").unwrap(), "7");
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for round in 0..20 {
        let barrier = Arc::new(Barrier::new(4));
        let jobs = [(x, "race"), (y, "race"), (x, "twice"), (x, "twice")];
        let threads: Vec<_> = jobs
            .into_iter()
            .map(|(id, key)| {
                let (addr, b) = (d.addr.clone(), barrier.clone());
                std::thread::spawn(move || {
                    b.wait();
                    post(&addr, &format!("/v1/actors/{id}/snapshot"), &json!({"key": key}))
                })
            })
            .collect();
        for (t, (id, key)) in threads.into_iter().zip(jobs) {
            let (s, v) = t.join().unwrap();
            assert_eq!(s, 200, "round {round}: snapshot of {id} to {key}: {v}");
        }
        for (key, want) in [("race", &["3", "7"][..]), ("twice", &["3"][..])] {
            let (s, v) = post(a, &format!("/v1/snapshots/{key}/restore"), &json!({}));
            assert_eq!(s, 200, "round {round}: restore {key}: {v}");
            let back = v["id"].as_u64().unwrap();
            let n = send(a, back, "?").unwrap();
            assert!(want.contains(&n.as_str()), "round {round}: {key} restored with {n}, want one of {want:?}");
            if key == "race" {
                *seen.entry(n).or_default() += 1;
            }
            assert_eq!(call(a, "DELETE", &format!("/v1/actors/{back}"), b"").0, 200);
            let left = leftovers(&store.join(key));
            assert!(left.is_empty(), "round {round}: {key}: {left:?}");
        }
    }
    eprintln!("20 rounds of two actors snapshotted to one key: restored {seen:?}");

    // A snapshot of a busy actor waits for its message; listings do not wait for it.
    let busy = spawn(a, "counter", &[]);
    let addr = d.addr.clone();
    let spin = std::thread::spawn(move || send(&addr, busy, "spin"));
    assert!(wait_state(a, busy, "busy", Duration::from_secs(2)), "the spin never started");
    let addr = d.addr.clone();
    let t0 = Instant::now();
    let snap = std::thread::spawn(move || post(&addr, &format!("/v1/actors/{busy}/snapshot"), &json!({"key": "busy"})));
    std::thread::sleep(Duration::from_millis(100));
    let mut slowest = Duration::ZERO;
    let mut states = Vec::new();
    while !snap.is_finished() && t0.elapsed() < Duration::from_secs(5) {
        let t1 = Instant::now();
        let list = actors(a);
        slowest = slowest.max(t1.elapsed());
        let st = list.iter().find(|v| v["id"] == json!(busy)).map(|v| v["state"].clone());
        states.push(st);
        let t1 = Instant::now();
        assert_eq!(send(a, x, "?").unwrap(), "3");
        slowest = slowest.max(t1.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (s, v) = snap.join().unwrap();
    eprintln!(
        "a snapshot of a busy actor: HTTP {s} after {:.1?}; {} listings and messages meanwhile, slowest {slowest:.1?}",
        t0.elapsed(),
        states.len()
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(spin.join().unwrap().unwrap(), "1");
    // Busy while the handler runs; once it ends the snapshot is written (the actor shows idle
    // meanwhile, for as long as the disk takes).
    let busy_first = states.iter().take_while(|s| s.as_ref() == Some(&json!("busy"))).count();
    assert!(busy_first >= 3, "the snapshot did not wait for the handler: {states:?}");
    assert!(states[busy_first..].iter().all(|s| s.as_ref() == Some(&json!("idle"))), "{states:?}");
    assert!(slowest < Duration::from_millis(500), "a listing or message took {slowest:?}");
    let (s, v) = post(a, "/v1/snapshots/busy/restore", &json!({}));
    assert_eq!(s, 200, "{v}");
    assert_eq!(send(a, v["id"].as_u64().unwrap(), "?").unwrap(), "1");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// 9. Actors outlive the daemon

fn ids_of(addr: &str) -> Vec<(u64, String)> {
    let mut v: Vec<(u64, String)> = actors(addr)
        .iter()
        .map(|a| (a["id"].as_u64().unwrap(), a["state"].as_str().unwrap_or("?").to_string()))
        .collect();
    v.sort();
    v
}

#[test]
fn actors_outlive_the_daemon_and_ids_never_repeat() {
    let dir = tmp("outlive");
    let mods = modules_dir(&dir, &[("counter", COUNTER)]);
    let store = dir.join("store");
    let mut d = start(&store, Some(&mods), &["--shutdown-wait", "5"]);
    let a = d.addr.clone();
    let ids: Vec<u64> = (0..3).map(|_| spawn(&a, "counter", &[])).collect();
    let gone = spawn(&a, "counter", &[]);
    assert_eq!(call(&a, "DELETE", &format!("/v1/actors/{gone}"), b"").0, 200);
    for (i, &id) in ids.iter().enumerate() {
        for _ in 0..i + 2 {
            send(&a, id, "+").unwrap();
        }
    }
    assert_eq!(post(&a, &format!("/v1/actors/{}/pause", ids[2]), &json!({})).0, 200);
    let mut every_id = vec![ids[0], ids[1], ids[2], gone];

    // SIGTERM: checkpointed, exit 0.
    let t0 = Instant::now();
    d.signal("TERM");
    let st = d.wait_exit(Duration::from_secs(10));
    eprintln!("SIGTERM: {st:?} after {:.1?}: {}", t0.elapsed(), d.stderr().lines().last().unwrap_or(""));
    assert!(st.is_some_and(|s| s.success()), "{st:?}: {}", d.stderr());
    assert!(t0.elapsed() < Duration::from_secs(6), "shutdown took {:?}", t0.elapsed());
    drop(d);

    let mut d = start(&store, Some(&mods), &["--checkpoint", "1"]);
    let a = d.addr.clone();
    eprintln!("restarted: {}", d.stderr());
    let want = vec![(ids[0], "idle".to_string()), (ids[1], "idle".to_string()), (ids[2], "paused".to_string())];
    assert_eq!(ids_of(&a), want);
    assert_eq!(send(&a, ids[0], "?").unwrap(), "2");
    assert_eq!(send(&a, ids[1], "?").unwrap(), "3");
    assert!(send(&a, ids[2], "?").unwrap_err().contains("paused"));
    assert_eq!(post(&a, &format!("/v1/actors/{}/resume", ids[2]), &json!({})).0, 200);
    assert_eq!(send(&a, ids[2], "?").unwrap(), "4");
    assert_eq!(send(&a, ids[0], "+").unwrap(), "3");
    assert_eq!(send(&a, ids[1], "+").unwrap(), "4");
    assert_eq!(send(&a, ids[2], "+").unwrap(), "5");
    let e = spawn(&a, "counter", &[]);
    assert!(every_id.iter().all(|&i| e > i), "new id {e} after {every_id:?}");
    every_id.push(e);
    assert_eq!(send(&a, e, "+").unwrap(), "1");
    assert_eq!(send(&a, e, "+").unwrap(), "2");

    // SIGKILL after two checkpoint intervals: nothing of that is lost.
    std::thread::sleep(Duration::from_millis(2500));
    d.signal("KILL");
    assert!(d.wait_exit(Duration::from_secs(5)).is_some());
    drop(d);
    let d = start(&store, Some(&mods), &[]);
    let a = d.addr.clone();
    eprintln!("restarted after SIGKILL: {}", d.stderr());
    let back: Vec<u64> = ids_of(&a).iter().map(|(i, _)| *i).collect();
    assert_eq!(back, [ids[0], ids[1], ids[2], e], "{:?}", ids_of(&a));
    for (id, n) in [(ids[0], "3"), (ids[1], "4"), (ids[2], "5"), (e, "2")] {
        assert_eq!(send(&a, id, "?").unwrap(), n, "actor {id}");
    }
    let f = spawn(&a, "counter", &[]);
    assert!(every_id.iter().all(|&i| f > i), "new id {f} after {every_id:?}");

    // One daemon per store.
    let (st, err) = match try_start(serve_command(&store, Some(&mods), &[])) {
        Ok(d2) => panic!("a second daemon on the store listens on {}", d2.addr),
        Err(e) => e,
    };
    eprintln!("a second daemon on the store: {st}: {}", err.trim());
    assert!(!st.success());
    assert!(err.contains(&store.display().to_string()), "{err}");
    // The first goes on.
    assert_eq!(send(&a, f, "+").unwrap(), "1");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_daemon_with_an_actor_stuck_in_a_loop_still_stops_in_time() {
    let dir = tmp("stuck");
    let mods = modules_dir(&dir, &[("echo", ECHO), ("counter", COUNTER)]);
    let store = dir.join("store");
    let wait = Duration::from_secs(2);
    let mut d = start(&store, Some(&mods), &["--shutdown-wait", "2"]);
    let a = d.addr.clone();
    let (stuck, fine) = (spawn(&a, "echo", &[]), spawn(&a, "counter", &[]));
    assert_eq!(send(&a, fine, "+").unwrap(), "1");
    let addr = a.clone();
    let client =
        std::thread::spawn(move || try_request(&addr, "POST", &format!("/v1/actors/{stuck}/messages"), &[], b"loop"));
    assert!(wait_state(&a, stuck, "busy", Duration::from_secs(2)), "the loop never started");
    let t0 = Instant::now();
    d.signal("TERM");
    let st = d.wait_exit(2 * wait + Duration::from_secs(3));
    let took = t0.elapsed();
    let r = client.join().unwrap();
    eprintln!(
        "SIGTERM with an actor looping: {st:?} after {took:.1?}; its client got {}; stderr: {}",
        r.as_ref().map_or_else(|e| format!("error: {e}"), |r| format!("HTTP {} {:?}", r.status, r.text())),
        d.stderr()
    );
    assert!(st.is_some_and(|s| s.success()), "{st:?} after {took:?}: {}", d.stderr());
    drop(d);
    // The actor that was idle comes back as it was.
    let d = start(&store, Some(&mods), &[]);
    eprintln!("restarted: {}", d.stderr());
    assert_eq!(send(&d.addr, fine, "?").unwrap(), "1");
    let back = ids_of(&d.addr);
    eprintln!("back: {back:?}");
    assert!(back.iter().any(|(i, s)| *i == fine && s == "idle"), "{back:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// 10. `shoal chat --save` into a directory of the user's

#[test]
fn chat_save_never_writes_into_a_directory_of_the_users() {
    let Some(m) = model() else {
        eprintln!("skipping: no default model; run scripts/fetch-model.sh");
        return;
    };
    let dir = tmp("chatsave");
    let chat = |to: &Path| {
        shoal()
            .args(["chat", "--backend", "cpu", "--temperature", "0", "--max-tokens", "4", "--prompt", "Hi"])
            .arg("--model")
            .arg(format!("smollm2={}", m.display()))
            .arg("--save")
            .arg(to)
            .output()
            .unwrap()
    };
    // A new directory, and then the same again: saved, and replaced.
    let to = dir.join("fresh");
    for _ in 0..2 {
        let out = chat(&to);
        assert!(out.status.success(), "{out:?}");
        assert!(shoal_actor::read_dir(&to).is_ok());
    }
    // A file named as the store's own (`CURRENT`) but not written by it is the user's too.
    let cases = [("notes", "notes.txt"), ("photos", "gen-000001/photo.jpg"), ("current", "CURRENT")];
    for (name, file) in cases {
        let to = dir.join(name);
        let path = to.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "the user's own").unwrap();
        let out = chat(&to);
        let err = String::from_utf8_lossy(&out.stderr);
        eprintln!("chat --save into a directory holding {file}: {:?}: {}", out.status.code(), err.trim());
        assert!(!out.status.success(), "{file}: {out:?}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "the user's own", "{file}");
        let mut left: Vec<String> =
            walk(&to).iter().map(|p| p.strip_prefix(&to).unwrap().display().to_string()).collect();
        left.sort();
        assert_eq!(left, [file], "{file}: the directory now holds {left:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The files under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if e.file_type().unwrap().is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}

// ---------------------------------------------------------------------------------------
// 11. `shoal snapshots`

#[test]
fn shoal_snapshots_lists_and_removes() {
    let dir = tmp("snapcli");
    let mods = modules_dir(&dir, &[("counter", COUNTER)]);
    let store = dir.join("store");
    let d = start(&store, Some(&mods), &[]);
    let a = d.addr.as_str();
    let id = spawn(a, "counter", &[]);
    for key in ["one", "two"] {
        let out = shoal().args(["snapshot", "--addr", a, &id.to_string(), key]).output().unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let run = |args: &[&str]| {
        let out = shoal().args(["snapshots", "--addr", a]).args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for args in [&[][..], &["ls"]] {
        let (ok, out, err) = run(args);
        assert!(ok, "{args:?}: {err}");
        assert_eq!(out, "one\ntwo\n", "{args:?}");
    }
    let (ok, out, err) = run(&["rm", "one"]);
    assert!(ok, "{out} {err}");
    assert!(!store.join("one").exists(), "the snapshot's directory is left");
    assert_eq!(run(&["ls"]).1, "two\n");
    for key in ["one", "../x", ".daemon", "nope"] {
        let (ok, out, err) = run(&["rm", key]);
        eprintln!("shoal snapshots rm {key:?}: {}", err.trim());
        assert!(!ok, "rm {key}: {out}");
        assert!(err.contains("HTTP 404") || err.contains("HTTP 400"), "rm {key}: {err}");
    }
    std::fs::create_dir_all(store.join("mine")).unwrap();
    std::fs::write(store.join("mine/notes.txt"), "mine").unwrap();
    let (ok, _, err) = run(&["rm", "mine"]);
    eprintln!("shoal snapshots rm mine (the user's): {}", err.trim());
    assert!(!ok && !err.contains("HTTP 5"), "{err}");
    assert_eq!(std::fs::read_to_string(store.join("mine/notes.txt")).unwrap(), "mine");
    assert!(store.join(".daemon").is_dir());
    assert_eq!(run(&["ls"]).1, "two\n");
    // The rest of the snapshot still restores.
    let (s, v) = post(a, "/v1/snapshots/two/restore", &json!({}));
    assert_eq!(s, 200, "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The OpenAI endpoint's actors of a daemon (tag `openai`).
fn openai_actors(addr: &str) -> Vec<Value> {
    // Listed only on request (`?all=true`): they are the endpoint's, not the user's.
    let (s, v) = get(addr, "/v1/actors?all=true");
    assert_eq!(s, 200, "{v}");
    let all = v["actors"].as_array().cloned().unwrap_or_default();
    assert!(actors(addr).iter().all(|a| a["tag"] != "openai"), "pool actors listed by default");
    all.into_iter().filter(|a| a["tag"] == "openai" && a["pool"] == true).collect()
}

/// An OpenAI request whose client goes away (streamed, after its first event; or not
/// streamed, before its answer) frees its actor: none is left busy or leaked, and the next
/// request is answered.
#[test]
fn an_abandoned_openai_request_frees_its_actor() {
    if model().is_none() {
        eprintln!("skipped: the default model is not fetched (scripts/fetch-model.sh)");
        return;
    }
    let dir = tmp("openai-abandoned");
    let d = start(&dir.join("store"), None, &["--openai-pool", "2"]);
    let a = d.addr.as_str();
    let body = |stream: bool| {
        serde_json::to_vec(&json!({"messages": [{"role": "user", "content": "Count from one to five hundred."}],
                                   "max_tokens": 4000, "temperature": 0, "stream": stream}))
        .unwrap()
    };
    for stream in [true, false] {
        for _ in 0..3 {
            let b = body(stream);
            let mut s = TcpStream::connect(a).unwrap();
            s.write_all(common::head("POST", "/v1/chat/completions", &[], b.len()).as_bytes()).unwrap();
            s.write_all(&b).unwrap();
            if stream {
                // Wait for the first event, then go away.
                let mut first = [0u8; 256];
                let n = s.read(&mut first).unwrap();
                assert!(String::from_utf8_lossy(&first[..n]).contains("200"), "{}", String::from_utf8_lossy(&first));
            } else {
                std::thread::sleep(Duration::from_millis(300));
            }
            // The request's actor is at work when its client goes away.
            let working = openai_actors(a);
            assert!(working.iter().any(|x| x["state"] == "busy"), "stream={stream}: no actor at work: {working:?}");
            drop(s);
        }
        // Every abandoned request's actor is killed: none stays busy making an answer no one reads.
        let t0 = Instant::now();
        loop {
            let busy: Vec<Value> = openai_actors(a).into_iter().filter(|x| x["state"] != "idle").collect();
            let all = openai_actors(a);
            if busy.is_empty() && all.len() <= 2 {
                eprintln!(
                    "stream={stream}: {} pool actors left, all idle, {:.0?} after the clients left",
                    all.len(),
                    t0.elapsed()
                );
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "stream={stream}: actors left working: {all:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // The endpoint still answers.
    let (s, v) =
        post(a, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}));
    assert_eq!(s, 200, "{v}");
    assert!(openai_actors(a).len() <= 2);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// 9. The OpenAI surface added for clients: model ids in paths, fields not honoured yet

#[test]
fn model_ids_in_paths_and_unknown_fields_are_refused_quickly_and_shown_escaped() {
    let dir = tmp("openai-surface");
    let d = start(&dir.join("store"), None, &[]);
    let a = &d.addr;
    let long = "m".repeat(8000);
    let ids = ["nope", "..%2F..%2Fetc%2Fpasswd", "%00", "smollm2%0d%0aX-Evil:%201", "%F0%9F%92%A3", long.as_str()];
    for id in ids {
        let t0 = Instant::now();
        let (s, body) = call(a, "GET", &format!("/v1/models/{id}"), b"");
        assert!(t0.elapsed() < Duration::from_secs(2), "{id}: {:?}", t0.elapsed());
        let v: Value =
            serde_json::from_slice(&body).unwrap_or_else(|_| panic!("{id}: {}", String::from_utf8_lossy(&body)));
        assert_eq!((s, &v["error"]["code"]), (404, &json!("model_not_found")), "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.len() < 400 && !msg.chars().any(|c| c.is_control()), "{msg:?}");
    }
    // Every request past the listing's own route still gets the list.
    let (s, _) = call(a, "GET", "/v1/models", b"");
    assert_eq!(s, 200);

    // Ten thousand unknown fields, and one whose name is 100 KB: a 400 naming (a shown part
    // of) the first, at once, and the daemon unmoved.
    let mut many = serde_json::Map::new();
    many.insert("messages".into(), json!([{"role": "user", "content": "hi"}]));
    for i in 0..10_000 {
        many.insert(format!("x{i:05}"), json!(i));
    }
    let huge =
        format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}], \"{}\": 1}}", "k".repeat(100_000));
    for body in [serde_json::to_vec(&Value::Object(many)).unwrap(), huge.into_bytes()] {
        let t0 = Instant::now();
        let (s, reply) = call(a, "POST", "/v1/chat/completions", &body);
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        let v: Value = serde_json::from_slice(&reply).unwrap();
        assert_eq!(
            (s, &v["error"]["code"], &v["error"]["param"]),
            (400, &json!("unsupported_parameter"), &json!("body")),
            "{v}"
        );
        assert!(v["error"]["message"].as_str().unwrap().len() < 200, "{v}");
    }
    assert!(actors(a).is_empty(), "a refused completion left an actor");
    let _ = std::fs::remove_dir_all(&dir);
}
