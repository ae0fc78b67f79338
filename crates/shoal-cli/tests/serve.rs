//! `shoal serve`, driven over loopback as its clients drive it: many chat actors sharing one
//! copy of the weights answering at once, a load test that loses no message, the OpenAI
//! endpoint, guests that trap or loop (and are killed while they loop, or loop in their
//! `_initialize`), conversations longer than the context, and a daemon killed (SIGKILL) while
//! it writes a snapshot, and chat actors answering beside others that are paused, moved and
//! snapshotted (their passes are shared: the answers must be the lone ones). The chat parts
//! need the default model (`scripts/fetch-model.sh`).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{ECHO, call, model, modules_dir, post, rss_kib, send, spawn, start, state_of, tmp};
use serde_json::{Value, json};

#[test]
fn a_load_test_loses_no_message_and_bad_guests_stop_alone() {
    let dir = tmp("load");
    let mods = modules_dir(&dir, &[("echo", ECHO)]);
    let d = start(&dir.join("store"), Some(&mods), &["--deadline", "0.5"]);
    let ids: Vec<u64> = (0..8).map(|_| spawn(&d.addr, "echo", &[])).collect();
    // 32 clients × 16 messages, spread over the 8 actors, all at once.
    let threads: Vec<_> = (0..32)
        .map(|c| {
            let (addr, ids) = (d.addr.clone(), ids.clone());
            std::thread::spawn(move || {
                for m in 0..16 {
                    let msg = format!("client {c} message {m}");
                    assert_eq!(send(&addr, ids[(c + m) % ids.len()], &msg).unwrap(), msg);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("no message lost or garbled");
    }
    let (_, list) = call(&d.addr, "GET", "/v1/actors", b"");
    let list: Value = serde_json::from_slice(&list).unwrap();
    let handled: u64 = list["actors"].as_array().unwrap().iter().map(|a| a["messages"].as_u64().unwrap()).sum();
    assert_eq!(handled, 32 * 16);

    // A guest that loops is stopped at its deadline; one that traps is stopped; the others
    // and the daemon go on.
    let t0 = Instant::now();
    let e = send(&d.addr, ids[0], "loop").unwrap_err();
    assert!(e.contains("deadline"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    let e = send(&d.addr, ids[1], "trap").unwrap_err();
    assert!(e.contains("trapped"), "{e}");
    assert!(send(&d.addr, ids[0], "again").is_err());
    assert_eq!(send(&d.addr, ids[2], "still here").unwrap(), "still here");

    // Pause, resume, snapshot, restore, kill; unknown ids and bad bodies are clear errors.
    assert_eq!(post(&d.addr, &format!("/v1/actors/{}/pause", ids[3]), &json!({})).0, 200);
    assert!(send(&d.addr, ids[3], "x").unwrap_err().contains("paused"));
    assert_eq!(post(&d.addr, &format!("/v1/actors/{}/resume", ids[3]), &json!({})).0, 200);
    assert_eq!(send(&d.addr, ids[3], "back").unwrap(), "back");
    let (s, v) = post(&d.addr, &format!("/v1/actors/{}/snapshot", ids[3]), &json!({"key": "e3"}));
    assert_eq!(s, 200, "{v}");
    let (s, v) = post(&d.addr, "/v1/snapshots/e3/restore", &json!({}));
    assert_eq!(s, 200, "{v}");
    let copy = v["id"].as_u64().unwrap();
    assert_eq!(send(&d.addr, copy, "copy").unwrap(), "copy");
    assert_eq!(call(&d.addr, "DELETE", &format!("/v1/actors/{copy}"), b"").0, 200);
    assert_eq!(call(&d.addr, "DELETE", &format!("/v1/actors/{copy}"), b"").0, 404);
    assert_eq!(post(&d.addr, "/v1/actors/999/pause", &json!({})).0, 404);
    assert_eq!(call(&d.addr, "POST", "/v1/actors", b"{not json").0, 400);
    // Modules are named, never paths; a snapshot that is not there is a 404.
    assert_eq!(post(&d.addr, "/v1/actors", &json!({"module": "/no/such.wasm"})).0, 400);
    assert_eq!(post(&d.addr, "/v1/actors", &json!({"module": "nosuch"})).0, 404);
    assert_eq!(post(&d.addr, "/v1/snapshots/nothing/restore", &json!({})).0, 404);
    assert_eq!(call(&d.addr, "GET", "/nowhere", b"").0, 404);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sixty_four_chat_actors_share_the_weights_and_answer_at_once() {
    if model().is_none() {
        eprintln!("skipping: no default model; run scripts/fetch-model.sh");
        return;
    }
    let dir = tmp("many");
    let d = start(&dir.join("store"), None, &[]);
    let before = rss_kib(d.child.id());
    let ids: Vec<u64> =
        (0..64).map(|_| spawn(&d.addr, "chat", &["--temperature", "0", "--max-tokens", "12"])).collect();
    let threads: Vec<_> = ids
        .iter()
        .map(|&id| {
            let addr = d.addr.clone();
            std::thread::spawn(move || send(&addr, id, "What is the capital of France?"))
        })
        .collect();
    for t in threads {
        let answer = t.join().unwrap().unwrap();
        assert!(answer.contains("Paris"), "{answer}");
    }
    let after = rss_kib(d.child.id());
    let per_actor = after.saturating_sub(before) / 64;
    eprintln!(
        "64 idle chat actors: daemon RSS {before} KiB with the model loaded, {after} KiB after; {per_actor} KiB per actor"
    );
    // The weights (about 540 MB as f32) are not copied per actor.
    assert!(per_actor < 40 << 10, "{per_actor} KiB per actor");

    // The OpenAI endpoint, whole and streamed.
    let (s, v) = post(
        &d.addr,
        "/v1/chat/completions",
        &json!({"model": "smollm2", "temperature": 0, "max_tokens": 16,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}),
    );
    assert_eq!(s, 200, "{v}");
    assert!(v["choices"][0]["message"]["content"].as_str().unwrap().contains("Paris"), "{v}");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 10);
    let (s, body) = call(
        &d.addr,
        "POST",
        "/v1/chat/completions",
        br#"{"stream": true, "temperature": 0, "max_tokens": 16, "messages": [{"role": "user", "content": "What is the capital of France?"}]}"#,
    );
    assert_eq!(s, 200);
    let text = String::from_utf8(body).unwrap();
    let content: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| *l != "[DONE]")
        .filter_map(|l| {
            serde_json::from_str::<Value>(l).ok()?["choices"][0]["delta"]["content"].as_str().map(String::from)
        })
        .collect();
    assert!(content.contains("Paris") && text.trim_end().ends_with("data: [DONE]"), "{text}");
    // A model it does not have (the request is checked first: it must be well formed).
    let hi = json!([{"role": "user", "content": "hi"}]);
    let (s, v) = post(&d.addr, "/v1/chat/completions", &json!({"model": "nope", "messages": hi}));
    assert_eq!(s, 404, "{v}");
    assert_eq!(v["error"]["code"], json!("model_not_found"), "{v}");
    let (s, v) = post(&d.addr, "/v1/chat/completions", &json!({"model": "nope", "messages": []}));
    assert_eq!(s, 400, "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_daemon_killed_while_writing_a_snapshot_leaves_the_previous_one_intact() {
    if model().is_none() {
        eprintln!("skipping: no default model; run scripts/fetch-model.sh");
        return;
    }
    let dir = tmp("kill");
    let store = dir.join("store");
    let mut d = start(&store, None, &[]);
    // A long conversation, so that a snapshot takes a while to write (~45 MB of KV cache).
    let id = spawn(&d.addr, "chat", &["--temperature", "0", "--max-tokens", "12", "--context", "2048"]);
    let filler = "the quiet river runs past old stone mills and green fields ".repeat(90);
    send(&d.addr, id, &format!("{filler}\nWhat is the capital of France?")).unwrap();
    assert_eq!(post(&d.addr, &format!("/v1/actors/{id}/snapshot"), &json!({"key": "k"})).0, 200);
    let first = shoal_actor::read_dir(&store.join("k")).unwrap();
    let mut id = id;
    for delay_ms in [0u64, 5, 15, 30, 60] {
        // A snapshot of the same key is being written when the daemon is killed.
        let addr = d.addr.clone();
        let t = std::thread::spawn(move || {
            // The daemon dies under this request: whatever happens to it is fine.
            if let Ok(mut s) = TcpStream::connect(&addr) {
                let body = br#"{"key": "k"}"#;
                let head = common::head("POST", &format!("/v1/actors/{id}/snapshot"), &[], body.len());
                let _ = s.write_all(head.as_bytes()).and_then(|()| s.write_all(body));
                let _ = s.read_to_end(&mut Vec::new());
            }
        });
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = d.child.kill(); // SIGKILL
        let _ = d.child.wait();
        let _ = t.join();
        let torn = std::fs::read_dir(store.join("k"))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains(".tmp"));
        eprintln!(
            "killed {delay_ms} ms into a snapshot: {}",
            if torn { "mid-write" } else { "before or after the write" }
        );
        let snap = shoal_actor::read_dir(&store.join("k")).expect("the snapshot is readable after SIGKILL");
        assert_eq!(snap.kv_positions(), first.kv_positions());
        d = start(&store, None, &[]);
        let (s, v) = post(&d.addr, "/v1/snapshots/k/restore", &json!({}));
        assert_eq!(s, 200, "{v}");
        id = v["id"].as_u64().unwrap();
    }
    let answer = send(&d.addr, id, "And of Germany?").unwrap();
    assert!(answer.contains("Berlin"), "{answer}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// CPU time the process has used (user and system), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are the 14th and 15th.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

#[test]
fn deleting_an_actor_stuck_in_a_loop_stops_it_at_once() {
    let dir = tmp("spin");
    let mods = modules_dir(&dir, &[("echo", ECHO)]);
    // The default deadline (600 s): only the kill can stop the loop in time.
    let d = start(&dir.join("store"), Some(&mods), &[]);
    let (spinner, other) = (spawn(&d.addr, "echo", &[]), spawn(&d.addr, "echo", &[]));
    let addr = d.addr.clone();
    let stuck = std::thread::spawn(move || send(&addr, spinner, "loop"));
    let t0 = Instant::now();
    while state_of(&d.addr, spinner).as_deref() != Some("busy") {
        assert!(t0.elapsed() < Duration::from_secs(10), "the actor never got busy");
        std::thread::sleep(Duration::from_millis(20));
    }
    let t0 = Instant::now();
    let (status, body) = call(&d.addr, "DELETE", &format!("/v1/actors/{spinner}"), b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(t0.elapsed() < Duration::from_secs(3), "the kill took {:?}", t0.elapsed());
    let e = stuck.join().unwrap().unwrap_err();
    assert!(e.contains("killed"), "{e}");
    assert!(state_of(&d.addr, spinner).is_none(), "the actor is forgotten");
    // No core keeps spinning: the idle daemon uses (almost) no CPU.
    let before = cpu_ticks(d.child.id());
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(d.child.id()) - before;
    assert!(used < 30, "the daemon used {used} ticks of CPU in the second after the kill");
    assert_eq!(send(&d.addr, other, "still here").unwrap(), "still here");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An actor whose `_initialize` never returns.
const SPIN_AT_START: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "_initialize") (loop $l (br $l)))
  (func (export "shoal_actor_alloc") (param i32) (result i32) (i32.const 64))
  (func (export "shoal_actor_message") (param i32 i32) (result i32) (i32.const 0)))"#;

#[test]
fn a_spawn_whose_initialize_loops_fails_at_the_init_deadline() {
    let dir = tmp("init");
    let mods = modules_dir(&dir, &[("spin", SPIN_AT_START), ("echo", ECHO)]);
    let d = start(&dir.join("store"), Some(&mods), &["--init-deadline", "0.5"]);
    let t0 = Instant::now();
    let (s, v) = post(&d.addr, "/v1/actors", &json!({"module": "spin"}));
    assert_eq!(s, 422, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("_initialize") && msg.contains("--init-deadline"), "{msg}");
    assert!(t0.elapsed() < Duration::from_secs(5), "the spawn took {:?}", t0.elapsed());
    // The daemon goes on.
    let id = spawn(&d.addr, "echo", &[]);
    assert_eq!(send(&d.addr, id, "fine").unwrap(), "fine");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_chat_longer_than_the_context_is_a_400_and_the_actor_answers_the_next_one() {
    if model().is_none() {
        eprintln!("skipping: no default model; run scripts/fetch-model.sh");
        return;
    }
    let dir = tmp("overflow");
    let d = start(&dir.join("store"), None, &["--max-context", "128"]);
    let long = "the quiet river runs past old stone mills and green fields ".repeat(30);
    let chat = |content: &str, stream: bool| {
        let body = json!({"model": "smollm2", "temperature": 0, "max_tokens": 16, "stream": stream,
                          "messages": [{"role": "user", "content": content}]});
        call(&d.addr, "POST", "/v1/chat/completions", &serde_json::to_vec(&body).unwrap())
    };
    for stream in [false, true] {
        let (s, body) = chat(&long, stream);
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        assert_eq!(s, 400, "{}", String::from_utf8_lossy(&body));
        let e = &v["error"];
        assert_eq!(
            (&e["code"], &e["type"], &e["param"]),
            (&json!("context_length_exceeded"), &json!("invalid_request_error"), &json!("messages")),
            "{v}"
        );
        assert!(e["message"].as_str().unwrap().starts_with("context_length_exceeded"), "{v}");
    }
    let (s, body) = chat("What is the capital of France?", false);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(s, 200, "{v}");
    assert!(v["choices"][0]["message"]["content"].as_str().unwrap().contains("Paris"), "{v}");
    // Every answer has its own id.
    let (_, again) = chat("What is the capital of France?", false);
    let again: Value = serde_json::from_slice(&again).unwrap();
    let (a, b) = (v["id"].as_str().unwrap(), again["id"].as_str().unwrap());
    assert!(a.starts_with("chatcmpl-") && b.starts_with("chatcmpl-") && a != b, "{a} {b}");
    // Fields set to what changes nothing are accepted (clients send them so).
    let quiet = json!({"model": "smollm2", "temperature": 0, "max_tokens": 8, "stop": null, "logprobs": false,
                       "user": "u1", "tools": [], "stream_options": {"include_usage": false},
                       "response_format": {"type": "text"}, "presence_penalty": 0,
                       "messages": [{"role": "user", "content": "What is the capital of France?"}]});
    let (s, body) = call(&d.addr, "POST", "/v1/chat/completions", &serde_json::to_vec(&quiet).unwrap());
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    // One model, as OpenAI's API describes it.
    let (s, body) = call(&d.addr, "GET", "/v1/models/smollm2", b"");
    let m: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((s, &m["id"], &m["object"]), (200, &json!("smollm2"), &json!("model")), "{m}");
    let (s, body) = call(&d.addr, "GET", "/v1/models/nope", b"");
    let e: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((s, &e["error"]["code"]), (404, &json!("model_not_found")), "{e}");
    // One actor served them all: the failures left it usable (the endpoint's actors are
    // listed with `?all=true` only).
    let (_, list) = call(&d.addr, "GET", "/v1/actors?all=true", b"");
    let list: Value = serde_json::from_slice(&list).unwrap();
    assert_eq!(list["actors"].as_array().unwrap().len(), 1, "{list}");

    // A chat actor: a turn too long fails with its name, `shoal send` exits with 3, and the
    // turn is not kept: the next one is answered.
    let id = spawn(&d.addr, "chat", &["--temperature", "0", "--max-tokens", "12"]);
    let e = send(&d.addr, id, &long).unwrap_err();
    assert!(e.starts_with("context_length_exceeded"), "{e}");
    let shoal = |text: &str| common::shoal().args(["send", "--addr", &d.addr, &id.to_string(), text]).output().unwrap();
    let out = shoal(&long);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("context_length_exceeded"), "{out:?}");
    let out = shoal("What is the capital of France?");
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("Paris"), "{out:?}");

    // A conversation that outgrows the context: with the default policy it fails once it no
    // longer fits; with `--context-policy truncate` the oldest turns go and it goes on.
    let args = |policy: &'static str| ["--temperature", "0", "--max-tokens", "12", "--context-policy", policy];
    let (strict, lenient) = (spawn(&d.addr, "chat", &args("error")), spawn(&d.addr, "chat", &args("truncate")));
    let questions = ["What is the capital of France?", "And of Germany?", "And of Italy?", "And of Spain?"];
    let mut strict_failed = false;
    for q in questions.iter().cycle().take(10) {
        match send(&d.addr, strict, q) {
            Ok(_) => assert!(!strict_failed, "the conversation only grows"),
            Err(e) => {
                assert!(e.starts_with("context_length_exceeded"), "{e}");
                strict_failed = true;
            }
        }
        let answer = send(&d.addr, lenient, q).unwrap();
        assert!(!answer.trim().is_empty(), "{q}: an empty answer");
    }
    assert!(strict_failed, "ten turns outgrow a context of 128 positions");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn chat_actors_answer_as_they_do_alone_while_others_are_paused_moved_and_snapshotted() {
    if model().is_none() {
        eprintln!("skipping: no default model; run scripts/fetch-model.sh");
        return;
    }
    let dir = tmp("churn");
    let d = start(&dir.join("store"), None, &[]);
    let args = ["--temperature", "0", "--max-tokens", "10"];
    let prompts = [
        "What is the capital of France?",
        "Name a colour.",
        "What is two plus two?",
        "Say hello in Spanish.",
        "What is the largest ocean?",
        "Name a fruit.",
    ];
    // Each prompt alone: one actor at a time.
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| {
            let id = spawn(&d.addr, "chat", &args);
            let a = send(&d.addr, id, p).unwrap();
            assert_eq!(call(&d.addr, "DELETE", &format!("/v1/actors/{id}"), b"").0, 200);
            a
        })
        .collect();
    // Actors that hold a conversation, to be paused, resumed, moved and snapshotted meanwhile.
    let churn: Vec<u64> = (0..3)
        .map(|_| {
            let id = spawn(&d.addr, "chat", &args);
            send(&d.addr, id, "Hi.").unwrap();
            id
        })
        .collect();
    let workers: Vec<u64> = prompts.iter().map(|_| spawn(&d.addr, "chat", &args)).collect();
    let (answers, churned) = std::thread::scope(|s| {
        let asks: Vec<_> = workers
            .iter()
            .zip(prompts)
            .map(|(&id, p)| {
                let addr = d.addr.clone();
                s.spawn(move || send(&addr, id, p))
            })
            .collect();
        let churner = s.spawn(|| {
            let mut done = 0;
            for round in 0..3 {
                for (i, &id) in churn.iter().enumerate() {
                    let a = &d.addr;
                    assert_eq!(post(a, &format!("/v1/actors/{id}/pause"), &json!({})).0, 200);
                    assert_eq!(post(a, &format!("/v1/actors/{id}/resume"), &json!({})).0, 200);
                    let (s, v) = post(a, &format!("/v1/actors/{id}/move"), &json!({"backend": "cpu"}));
                    assert_eq!(s, 200, "move: {v}");
                    let key = format!("churn-{round}-{i}");
                    let (s, v) = post(a, &format!("/v1/actors/{id}/snapshot"), &json!({"key": key}));
                    assert_eq!(s, 200, "snapshot: {v}");
                    done += 1;
                }
            }
            done
        });
        let answers: Vec<String> = asks.into_iter().map(|h| h.join().unwrap().unwrap()).collect();
        (answers, churner.join().unwrap())
    });
    assert_eq!(churned, 9);
    assert_eq!(answers, alone, "answers beside paused, moved and snapshotted actors are the lone ones");
    // The churned actors still answer, and a snapshot of one restores and answers.
    for &id in &churn {
        assert!(!send(&d.addr, id, "And a number?").unwrap().is_empty());
    }
    let (s, v) = post(&d.addr, "/v1/snapshots/churn-2-0/restore", &json!({}));
    assert_eq!(s, 200, "{v}");
    assert!(!send(&d.addr, v["id"].as_u64().unwrap(), "Bye.").unwrap().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}
