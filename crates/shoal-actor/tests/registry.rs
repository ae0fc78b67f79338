//! The registry against hostile clients, and its journal: a reply nobody reads holds at
//! most its queue (measured), an abandoned reply stops the message, a kill or a deadline is
//! never held behind a full queue; the cap on actors holds under concurrent spawns; listings
//! never wait on a busy actor; checkpoints do not wait past their bound; actors, their ids
//! and their state outlive the registry through the journal, a damaged checkpoint stays
//! alone, a kill deletes its checkpoint. No model needed: tiny WAT actors on the CPU.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_actor::{
    ActorConfig, Event, Journal, JournalError, LocalStore, REPLY_QUEUE, Recovered, Registry, RegistryError,
};
use shoal_gpu::{BackendKind, Device};
use shoal_host::{InstanceOptions, Limits, Models, Runtime};

const MIB: u64 = 1 << 20;
const CHUNK: usize = 64 << 10;
const CHUNKS: u32 = 10_000;

/// The tests measure this process's resident memory: they run one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Resident bytes of this process now.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shoal-registry-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// One actor for every test; the first byte of a message says what it does:
/// - `c`: bumps a counter (a global not exported) and replies it as two digits;
/// - `f`: floods: replies 10,000 parts of 64 KiB, part `i` starting with `i` (u32, little
///   endian), then bytes `k % 251`; stops at the first `reply` that fails, returning its
///   status, which it keeps;
/// - `l`: replies the status it kept (two digits);
/// - `s`: spins for 2 s (WASI's monotonic clock), then replies `spun`;
/// - `i`: spins forever.
const TOOL: &str = r#"(module
  (import "shoal_v1" "reply" (func $reply (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (memory (export "memory") 4)
  (global $n (mut i32) (i32.const 0))
  (global $last (mut i32) (i32.const 0))
  (func (export "shoal_actor_alloc") (param i32) (result i32) (i32.const 200000))
  (func $now (result i64)
    (drop (call $clock (i32.const 1) (i64.const 1) (i32.const 0)))
    (i64.load (i32.const 0)))
  (func $two (param $v i32)
    (i32.store8 (i32.const 16) (i32.add (i32.const 48) (i32.rem_u (i32.div_u (local.get $v) (i32.const 10)) (i32.const 10))))
    (i32.store8 (i32.const 17) (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
    (drop (call $reply (i32.const 16) (i32.const 2))))
  (func (export "shoal_actor_message") (param $p i32) (param $len i32) (result i32)
    (local $op i32) (local $i i32) (local $st i32) (local $t0 i64)
    (local.set $op (i32.load8_u (local.get $p)))
    (if (i32.eq (local.get $op) (i32.const 99)) (then
      (global.set $n (i32.add (global.get $n) (i32.const 1)))
      (call $two (global.get $n))
      (return (i32.const 0))))
    (if (i32.eq (local.get $op) (i32.const 108)) (then
      (call $two (global.get $last))
      (return (i32.const 0))))
    (if (i32.eq (local.get $op) (i32.const 105)) (then (loop $l (br $l))))
    (if (i32.eq (local.get $op) (i32.const 115)) (then
      (local.set $t0 (call $now))
      (loop $l (br_if $l (i64.lt_u (i64.sub (call $now) (local.get $t0)) (i64.const 2000000000))))
      (i32.store (i32.const 16) (i32.const 0x6e757073))
      (drop (call $reply (i32.const 16) (i32.const 4)))
      (return (i32.const 0))))
    (if (i32.eq (local.get $op) (i32.const 102)) (then
      (local.set $i (i32.const 0))
      (loop $fill
        (i32.store8 (i32.add (i32.const 65536) (local.get $i)) (i32.rem_u (local.get $i) (i32.const 251)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br_if $fill (i32.lt_u (local.get $i) (i32.const 65536))))
      (local.set $i (i32.const 0))
      (loop $l
        (i32.store (i32.const 65536) (local.get $i))
        (local.set $st (call $reply (i32.const 65536) (i32.const 65536)))
        (if (local.get $st) (then (global.set $last (local.get $st)) (return (local.get $st))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br_if $l (i32.lt_u (local.get $i) (i32.const 10000))))
      (return (i32.const 0))))
    (i32.const 1)))"#;

fn runtime() -> Arc<Runtime> {
    let device = Arc::new(Device::open(BackendKind::Cpu).expect("the CPU backend always opens"));
    Arc::new(Runtime::with_models(device, Arc::new(Models::new())).unwrap())
}

fn config(deadline: Option<Duration>) -> ActorConfig {
    ActorConfig {
        deadline,
        init_deadline: Some(Duration::from_secs(10)),
        // Room for the whole flood (625 MiB) in one message.
        limits: Limits { max_reply_bytes: 1 << 30, ..Limits::default() },
    }
}

fn registry(dir: &Path, deadline: Option<Duration>) -> Registry {
    Registry::new(runtime(), Arc::new(LocalStore::new(dir.join("store"))), config(deadline))
}

fn spawn(reg: &Registry) -> Result<u64, RegistryError> {
    let m = reg.module("tool", TOOL.as_bytes())?;
    reg.spawn("tool", m, InstanceOptions::default(), "test")
}

fn ask(reg: &Registry, id: u64, msg: &str) -> Result<String, String> {
    let rx = reg.send(id, msg.as_bytes().to_vec()).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for ev in rx {
        match ev {
            Event::Chunk(c) => out.extend_from_slice(&c),
            Event::Done(Ok(())) => return Ok(String::from_utf8(out).unwrap()),
            Event::Done(Err(e)) => return Err(e),
        }
    }
    Err("the reply ended without its Done".into())
}

fn state(reg: &Registry, id: u64) -> String {
    reg.list().into_iter().find(|a| a.id == id).map_or_else(|| "gone".into(), |a| a.state)
}

/// Waits (at most 10 s) until actor `id`'s state is no longer `busy`; returns it.
fn settled(reg: &Registry, id: u64) -> String {
    let t0 = Instant::now();
    loop {
        let s = state(reg, id);
        if s != "busy" || t0.elapsed() > Duration::from_secs(10) {
            return s;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn check_chunk(i: u32, c: &[u8]) {
    assert_eq!(c.len(), CHUNK, "part {i}");
    assert_eq!(u32::from_le_bytes(c[..4].try_into().unwrap()), i, "parts out of order");
    assert!(c[4..].iter().enumerate().all(|(k, &b)| b as usize == (k + 4) % 251), "part {i} is damaged");
}

// ---------------------------------------------------------------------------------------------
// Replies

#[test]
fn an_unread_reply_holds_at_most_its_queue_then_arrives_whole_and_in_order() {
    let _serial = serial();
    let dir = tmp("flood");
    let reg = registry(&dir, None);
    let id = spawn(&reg).unwrap();
    assert_eq!(ask(&reg, id, "c").unwrap(), "01");
    let before = rss();
    let rx = reg.send(id, b"f".to_vec()).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let grown = rss().saturating_sub(before);
    // The queue (64 parts of 64 KiB) plus the part in hand, and slack.
    assert!(grown < 32 * MIB, "an unread reply grew the process by {} MiB in 1 s", grown / MIB);
    assert_eq!(state(&reg, id), "busy", "the actor waits for its reader");
    let mut i = 0;
    for ev in rx {
        match ev {
            Event::Chunk(c) => {
                check_chunk(i, &c);
                i += 1;
            }
            Event::Done(r) => {
                assert_eq!(r, Ok(()));
                break;
            }
        }
    }
    assert_eq!(i, CHUNKS);
    assert_eq!(settled(&reg, id), "idle");
    assert_eq!(ask(&reg, id, "c").unwrap(), "02");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dropping_the_receiver_fails_the_guests_reply_and_ends_the_message() {
    let _serial = serial();
    let dir = tmp("drop");
    let reg = registry(&dir, None);
    let id = spawn(&reg).unwrap();
    let rx = reg.send(id, b"f".to_vec()).unwrap();
    for i in 0..3 {
        match rx.recv().unwrap() {
            Event::Chunk(c) => check_chunk(i, &c),
            Event::Done(r) => panic!("done early: {r:?}"),
        }
    }
    drop(rx);
    assert_eq!(settled(&reg, id), "idle", "the message ended");
    // The guest's `reply` failed with `busy` (9), and it stopped there.
    assert_eq!(ask(&reg, id, "l").unwrap(), "09");
    assert_eq!(ask(&reg, id, "c").unwrap(), "01", "the actor answers the next message");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_kill_or_a_deadline_is_not_held_behind_a_full_reply_queue() {
    let _serial = serial();
    let dir = tmp("kill-full");
    let reg = registry(&dir, None);
    let id = spawn(&reg).unwrap();
    let rx = reg.send(id, b"f".to_vec()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(state(&reg, id), "busy");
    let t0 = Instant::now();
    reg.kill(id).unwrap();
    assert!(t0.elapsed() < Duration::from_secs(1), "the kill took {:?}", t0.elapsed());
    // What was queued is still there; then the reply ends.
    let parts = rx.iter().filter(|e| matches!(e, Event::Chunk(_))).count();
    assert!(parts <= REPLY_QUEUE + 1, "{parts} parts");

    // A deadline passes while the queue is full: the message ends.
    let reg = registry(&dir, Some(Duration::from_millis(300)));
    let id = spawn(&reg).unwrap();
    let t0 = Instant::now();
    let rx = reg.send(id, b"f".to_vec()).unwrap();
    let s = settled(&reg, id);
    assert!(t0.elapsed() < Duration::from_secs(2), "the deadline was held {:?}", t0.elapsed());
    assert_ne!(s, "busy");
    drop(rx);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// The cap

#[test]
fn the_cap_on_actors_holds_even_under_concurrent_spawns() {
    let _serial = serial();
    let dir = tmp("cap");
    let mut reg = registry(&dir, None);
    reg.set_max_actors(3);
    let ids: Vec<u64> = (0..3).map(|_| spawn(&reg).unwrap()).collect();
    let e = spawn(&reg).unwrap_err();
    assert!(matches!(e, RegistryError::TooManyActors { max: 3 }), "{e:?}");
    assert_eq!(e.to_string(), "the daemon holds its most actors (3, --max-actors); kill one first");
    let m = reg.module("tool", TOOL.as_bytes()).unwrap();
    let e = reg.spawn_transient("tool", m, InstanceOptions::default(), "openai").unwrap_err();
    assert!(matches!(e, RegistryError::TooManyActors { .. }), "{e:?}");
    // A restore counts too (and fails before reading the store).
    reg.snapshot(ids[0], "one").unwrap();
    assert!(matches!(reg.restore("one", "api"), Err(RegistryError::TooManyActors { .. })));
    // Paused ones count.
    reg.pause(ids[1]).unwrap();
    assert!(matches!(spawn(&reg), Err(RegistryError::TooManyActors { .. })));
    reg.kill(ids[0]).unwrap();
    let back = reg.restore("one", "api").unwrap().0;
    assert!(matches!(spawn(&reg), Err(RegistryError::TooManyActors { .. })));
    for id in [back, ids[1], ids[2]] {
        reg.kill(id).unwrap();
    }
    assert!(reg.list().is_empty());

    // 8 threads spawning at once, 4 times each: never more than 3.
    let made = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..4 {
                    match spawn(&reg) {
                        Ok(_) => {
                            made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(RegistryError::TooManyActors { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                    assert!(reg.list().len() <= 3);
                }
            });
        }
    });
    assert_eq!(made.into_inner(), 3);
    assert_eq!(reg.list().len(), 3);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Never waiting on a busy actor

#[test]
fn listing_does_not_wait_while_a_pause_waits_on_a_busy_actor() {
    let _serial = serial();
    let dir = tmp("list");
    let reg = registry(&dir, None);
    let busy = spawn(&reg).unwrap();
    let other = spawn(&reg).unwrap();
    let rx = reg.send(busy, b"s".to_vec()).unwrap();
    std::thread::scope(|s| {
        let pause = s.spawn(|| reg.pause(busy));
        // The pause takes the slot, and waits for the handler's 2 s.
        std::thread::sleep(Duration::from_millis(200));
        assert!(!pause.is_finished());
        let t0 = Instant::now();
        let list = reg.list();
        let took = t0.elapsed();
        assert!(took < Duration::from_millis(200), "the listing took {took:?}");
        assert_eq!(list.len(), 2);
        assert_eq!(list.iter().find(|a| a.id == busy).unwrap().state, "busy");
        assert_eq!(list.iter().find(|a| a.id == other).unwrap().state, "idle");
        // Neither does a kill of another actor.
        let t0 = Instant::now();
        reg.kill(other).unwrap();
        assert!(t0.elapsed() < Duration::from_millis(500));
        pause.join().unwrap().unwrap();
    });
    let spun: Vec<Event> = rx.iter().collect();
    assert!(matches!(&spun[..], [Event::Chunk(c), Event::Done(Ok(()))] if c == b"spun"), "{spun:?}");
    assert_eq!(state(&reg, busy), "paused");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_checkpoint_does_not_wait_on_a_busy_actor_past_its_bound() {
    let _serial = serial();
    let dir = tmp("bounded");
    let mut reg = registry(&dir, None);
    reg.set_journal(Journal::open(dir.join(".daemon")).unwrap());
    let id = spawn(&reg).unwrap();
    assert_eq!(ask(&reg, id, "c").unwrap(), "01");
    assert!(reg.checkpoint(false, Duration::from_secs(5))[0].result.is_ok());
    let rx = reg.send(id, b"s".to_vec()).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let t0 = Instant::now();
    let r = reg.checkpoint(false, Duration::from_millis(200));
    assert!(t0.elapsed() < Duration::from_secs(1), "the checkpoint took {:?}", t0.elapsed());
    let e = r[0].result.as_ref().unwrap_err();
    assert!(e.contains("busy for more than") && e.contains("previous checkpoint is kept"), "{e}");
    // Listings go on meanwhile; the withdrawn request does not disturb the actor.
    assert_eq!(state(&reg, id), "busy");
    assert!(rx.iter().any(|e| matches!(e, Event::Done(Ok(())))));
    assert_eq!(ask(&reg, id, "c").unwrap(), "02");
    // An idle actor is not busy, even for a checkpoint that waits for nothing.
    let r = reg.checkpoint(true, Duration::ZERO);
    assert!(matches!(r[0].result, Ok(n) if n > 0), "{r:?}");
    drop(reg);
    let mut reg = registry(&dir, None);
    reg.set_journal(Journal::open(dir.join(".daemon")).unwrap());
    assert!(reg.recover().iter().all(|r| r.result.is_ok()));
    assert_eq!(ask(&reg, id, "c").unwrap(), "03");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// The journal

fn ok_ids(r: &[Recovered]) -> Vec<u64> {
    r.iter().filter(|r| r.result.is_ok()).map(|r| r.id).collect()
}

#[test]
fn actors_their_ids_and_their_state_outlive_the_registry() {
    let _serial = serial();
    let dir = tmp("journal");
    let jdir = dir.join(".daemon");
    let open = |dir: &Path| {
        let mut reg = registry(dir, None);
        reg.set_journal(Journal::open(dir.join(".daemon")).unwrap());
        reg
    };

    let reg = open(&dir);
    let (a, b, c) = (spawn(&reg).unwrap(), spawn(&reg).unwrap(), spawn(&reg).unwrap());
    let m = reg.module("tool", TOOL.as_bytes()).unwrap();
    let t = reg.spawn_transient("tool", m, InstanceOptions::default(), "openai").unwrap();
    for (id, n) in [(a, 1), (b, 2), (c, 3)] {
        for _ in 0..n {
            ask(&reg, id, "c").unwrap();
        }
    }
    reg.pause(b).unwrap();
    // Another daemon on the same store is refused while this one lives.
    match Journal::open(&jdir) {
        Err(e @ JournalError::InUse { pid: Some(p), .. }) => {
            assert_eq!(p, std::process::id());
            assert!(e.to_string().starts_with(&format!("another shoal serve (pid {p}) uses the store")), "{e}");
        }
        other => panic!("{other:?}"),
    }
    let r = reg.checkpoint(false, Duration::from_secs(5));
    assert_eq!(r.iter().map(|c| c.id).collect::<Vec<_>>(), [a, b, c], "the transient actor is not checkpointed");
    assert!(r.iter().all(|c| matches!(c.result, Ok(n) if n > 0)), "{r:?}");
    let ids_before = [a, b, c, t];
    drop(reg);

    let reg = open(&dir);
    let rec = reg.recover();
    assert_eq!(ok_ids(&rec), [a, b, c], "{rec:?}");
    assert!(rec.iter().all(|r| r.module == "tool"));
    let list = reg.list();
    assert_eq!(list.iter().map(|x| x.id).collect::<Vec<_>>(), [a, b, c]);
    assert!(list.iter().all(|x| x.tag == "test" && x.persistent));
    assert_eq!(state(&reg, b), "paused");
    assert_eq!(ask(&reg, a, "c").unwrap(), "02", "the counter continues");
    assert!(reg.send(b, b"c".to_vec()).is_err(), "still paused");
    reg.resume(b).unwrap();
    assert_eq!(ask(&reg, b, "c").unwrap(), "03");
    // Ids never repeat: a new actor's is above all before.
    let d = spawn(&reg).unwrap();
    assert!(ids_before.iter().all(|&x| d > x), "{d} vs {ids_before:?}");

    // changed_only: the untouched `c` is skipped; then nothing, then only what changed.
    let r = reg.checkpoint(true, Duration::from_secs(5));
    assert_eq!(r.iter().map(|x| x.id).collect::<Vec<_>>(), [a, b, d], "{r:?}");
    assert!(reg.checkpoint(true, Duration::from_secs(5)).is_empty());
    ask(&reg, d, "c").unwrap();
    let r = reg.checkpoint(true, Duration::from_secs(5));
    assert_eq!(r.iter().map(|x| x.id).collect::<Vec<_>>(), [d]);

    // A kill deletes the checkpoint.
    assert!(jdir.join(format!("actors/{c}.json")).is_file() && jdir.join(format!("actors/{c}")).is_dir());
    reg.kill(c).unwrap();
    assert!(!jdir.join(format!("actors/{c}.json")).exists() && !jdir.join(format!("actors/{c}")).exists());
    drop(reg);

    // A damaged checkpoint comes back alone in its report; the others come back.
    std::fs::write(jdir.join(format!("actors/{a}/CURRENT")), b"not a generation\n").unwrap();
    let reg = open(&dir);
    let rec = reg.recover();
    assert_eq!(rec.iter().map(|x| x.id).collect::<Vec<_>>(), [a, b, d], "{rec:?}");
    assert_eq!(ok_ids(&rec), [b, d], "{rec:?}");
    let why = rec[0].result.as_ref().unwrap_err();
    assert!(why.contains(&format!("actors/{a}/CURRENT")), "{why}");
    assert!(jdir.join(format!("actors/{a}.json")).is_file(), "left on disk");
    assert_eq!(ask(&reg, b, "c").unwrap(), "04");
    assert_eq!(ask(&reg, d, "c").unwrap(), "02");
    assert!(matches!(reg.kill(a), Err(RegistryError::NoSuchActor(_))));
    drop(reg);

    // A damaged record, and a damaged id file.
    std::fs::write(jdir.join(format!("actors/{b}.json")), br#"{"id": 1, "extra": true}"#).unwrap();
    let reg = open(&dir);
    let rec = reg.recover();
    assert_eq!(ok_ids(&rec), [d], "{rec:?}");
    drop(reg);
    std::fs::write(jdir.join("next-id"), b"seven\n").unwrap();
    let e = Journal::open(&jdir).unwrap_err();
    assert!(e.to_string().contains("next-id") && !e.to_string().contains("seven"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_a_journal_ids_count_from_one_and_nothing_is_written() {
    let _serial = serial();
    let dir = tmp("nojournal");
    let reg = registry(&dir, None);
    assert_eq!(spawn(&reg).unwrap(), 1);
    assert_eq!(spawn(&reg).unwrap(), 2);
    assert!(reg.checkpoint(false, Duration::from_secs(1)).is_empty());
    assert!(reg.recover().is_empty());
    reg.kill(1).unwrap();
    assert_eq!(spawn(&reg).unwrap(), 3);
    assert!(!dir.exists());
}
