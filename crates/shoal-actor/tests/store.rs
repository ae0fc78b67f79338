//! The snapshot store never loses a snapshot: writers of one directory take turns (threads of
//! one process, and processes), a write or a removal touches only what shoal wrote, and keys
//! are checked. Snapshots are built by hand (memory pages, globals, a session with a tiny KV
//! cache): no module or model is needed to write and read them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use shoal_actor::{LocalStore, Snapshot, SnapshotError, SnapshotStore, is_snapshot_dir, read_dir, write_dir};
use shoal_engine::kv::{KvImage, KvSnapshot};
use shoal_host::{GlobalValue, InferState, InstanceState, NnState, SessionState};

const PAGE: usize = 65_536;

/// A snapshot told apart from others by `seed`: its pages, its globals and its session's
/// history and KV cache all depend on it.
fn snap(seed: u32) -> Snapshot {
    snap_of(seed, 3)
}

/// `snap(seed)` with `n` pages of memory (page 1 left zero).
fn snap_of(seed: u32, n: u32) -> Snapshot {
    let pages: Vec<u32> = [0].into_iter().chain(2..=n).collect();
    let page_data: Vec<u8> =
        (0..pages.len() * PAGE).map(|i| (i as u32).wrapping_mul(31).wrapping_add(seed) as u8).collect();
    let (n_layers, kv_dim, len) = (2, 4, 3);
    let cells = n_layers * len * kv_dim;
    let kv = KvSnapshot {
        n_layers,
        kv_dim,
        len,
        k: (0..cells).map(|i| seed as f32 + i as f32).collect(),
        v: (0..cells).map(|i| -(seed as f32) - i as f32).collect(),
    };
    Snapshot {
        module_sha256: "ab".repeat(32),
        module_size: 1234,
        models: vec![],
        created_unix_ms: 1_700_000_000_000 + u64::from(seed),
        state: InstanceState {
            args: vec![format!("--seed={seed}")],
            program_name: Some("test.wasm".into()),
            memory_pages: u64::from(n) + 1,
            pages,
            page_data,
            globals: vec![
                GlobalValue { index: 0, ty: "i32".into(), bits: u128::from(seed) },
                GlobalValue { index: 3, ty: "i64".into(), bits: u128::from(seed) << 40 },
            ],
            infer: InferState {
                opened: vec![(1, "m".into())],
                sessions: vec![SessionState {
                    handle: 2,
                    model: "m".into(),
                    context: 32,
                    history: vec![seed, seed + 1, seed + 2],
                    step: u64::from(seed),
                    kv: KvImage::Portable(kv),
                }],
                next: 3,
            },
            nn: NnState::default(),
            backend: "cpu".into(),
        },
    }
}

/// The seed of `s` if it is, in every part, the snapshot `snap(seed)` for one of `seeds`.
fn which(s: &Snapshot, seeds: &[u32]) -> Option<u32> {
    let seed: u32 = s.state.args.first()?.strip_prefix("--seed=")?.parse().ok()?;
    if !seeds.contains(&seed) {
        return None;
    }
    let want = snap_of(seed, s.state.pages.len() as u32);
    let (got, w) = (&s.state.infer.sessions, &want.state.infer.sessions[0]);
    let same_kv = match (got.first().map(|x| &x.kv), &w.kv) {
        (Some(KvImage::Portable(a)), KvImage::Portable(b)) => a.k == b.k && a.v == b.v && a.len == b.len,
        _ => false,
    };
    let same = s.state.page_data == want.state.page_data
        && s.state.pages == want.state.pages
        && s.state.memory_pages == want.state.memory_pages
        && s.state.globals == want.state.globals
        && s.created_unix_ms == want.created_unix_ms
        && got.len() == 1
        && got[0].history == w.history
        && got[0].step == w.step
        && same_kv;
    same.then_some(seed)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shoal-store-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// `dir` holds one whole snapshot and nothing else: `CURRENT` naming its one generation, the
/// lock file, no leftovers.
fn assert_one_generation(dir: &Path) {
    let all = names(dir);
    let gens: Vec<&String> = all.iter().filter(|n| n.starts_with("gen-")).collect();
    assert_eq!(gens.len(), 1, "one generation in {}: {all:?}", dir.display());
    let current = std::fs::read_to_string(dir.join("CURRENT")).unwrap();
    assert_eq!(current.split_whitespace().next(), Some(gens[0].as_str()), "{all:?}");
    let rest: BTreeSet<&str> = all.iter().map(String::as_str).filter(|n| !n.starts_with("gen-")).collect();
    assert_eq!(rest, BTreeSet::from(["CURRENT", ".lock"]), "no leftovers in {}", dir.display());
}

#[test]
fn four_threads_writing_one_key_leave_one_whole_snapshot() {
    let root = tmp("race");
    let store = Arc::new(LocalStore::new(&root));
    for round in 0..20u32 {
        let seeds: Vec<u32> = (0..4).map(|i| round * 4 + i).collect();
        let start = Arc::new(Barrier::new(4));
        let writers: Vec<_> = seeds
            .iter()
            .map(|&seed| {
                let (store, start) = (store.clone(), start.clone());
                let s = snap(seed);
                std::thread::spawn(move || {
                    start.wait();
                    store.put("k", &s).map(|_| ())
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap().unwrap_or_else(|e| panic!("round {round}: a concurrent write failed: {e}"));
        }
        let back = store.get("k").unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(which(&back, &seeds).is_some(), "round {round}: the snapshot read is one of those written");
        assert_one_generation(&root.join("k"));
    }
    assert_eq!(store.list().unwrap(), ["k"]);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn two_keys_written_at_once_each_keep_their_own() {
    let root = tmp("two-keys");
    let store = Arc::new(LocalStore::new(&root));
    for round in 0..10u32 {
        let start = Arc::new(Barrier::new(4));
        let writers: Vec<_> = (0..4u32)
            .map(|i| {
                let (store, start) = (store.clone(), start.clone());
                let (key, seed) = (if i % 2 == 0 { "a" } else { "b" }, round * 4 + i);
                std::thread::spawn(move || {
                    let s = snap(seed);
                    start.wait();
                    store.put(key, &s).map(|_| ())
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap().unwrap();
        }
        let (a, b) = ([round * 4, round * 4 + 2], [round * 4 + 1, round * 4 + 3]);
        assert!(which(&store.get("a").unwrap(), &a).is_some(), "round {round}: key a holds one of a's");
        assert!(which(&store.get("b").unwrap(), &b).is_some(), "round {round}: key b holds one of b's");
        assert_one_generation(&root.join("a"));
        assert_one_generation(&root.join("b"));
    }
    assert_eq!(store.list().unwrap(), ["a", "b"]);
    let _ = std::fs::remove_dir_all(&root);
}

/// A digest of everything `which` compares.
fn digest(s: &Snapshot) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (&s.state.page_data, &s.state.pages, s.state.memory_pages, &s.state.args, s.created_unix_ms).hash(&mut h);
    for g in &s.state.globals {
        (g.index, &g.ty, g.bits).hash(&mut h);
    }
    for x in &s.state.infer.sessions {
        (x.handle, &x.history, x.step).hash(&mut h);
        if let KvImage::Portable(kv) = &x.kv {
            (kv.len, kv.n_layers, kv.kv_dim).hash(&mut h);
            kv.k.iter().chain(&kv.v).for_each(|f| f.to_bits().hash(&mut h));
        }
    }
    h.finish()
}

#[test]
fn a_reader_never_sees_half_a_generation() {
    // Snapshots of 4 MiB, so that reads last long enough for writes to replace (and remove)
    // the generation being read.
    let dir = tmp("reader");
    write_dir(&dir, &snap_of(1000, 64)).unwrap();
    let seeds: Vec<u32> = (0..25).chain(100..125).chain([1000]).collect();
    let written: BTreeSet<u64> = seeds.iter().map(|&seed| digest(&snap_of(seed, 64))).collect();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (dir, done) = (dir.clone(), done.clone());
        std::thread::spawn(move || {
            let mut reads = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) || reads == 0 {
                let s = read_dir(&dir).unwrap_or_else(|e| panic!("a read during writes failed: {e}"));
                assert!(written.contains(&digest(&s)), "a read during writes saw a snapshot no one wrote");
                reads += 1;
            }
            reads
        })
    };
    let writers: Vec<_> = (0..2u32)
        .map(|w| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                for i in 0..25 {
                    write_dir(&dir, &snap_of(w * 100 + i, 64)).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
    assert_one_generation(&dir);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_write_waits_for_the_lock_file_held_by_another_process() {
    let dir = tmp("lock-file");
    write_dir(&dir, &snap(1)).unwrap();
    // What another process's write holds: an exclusive lock of DIR/.lock (a new open file
    // description, as another process has).
    let held = std::fs::OpenOptions::new().read(true).write(true).open(dir.join(".lock")).unwrap();
    held.lock().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = {
        let dir = dir.clone();
        std::thread::spawn(move || tx.send(write_dir(&dir, &snap(2)).map(|_| ())).unwrap())
    };
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "a write went ahead while another process held DIR/.lock"
    );
    assert!(which(&read_dir(&dir).unwrap(), &[1]).is_some(), "the snapshot is unchanged while the lock is held");
    drop(held);
    rx.recv_timeout(Duration::from_secs(30)).expect("the write goes ahead once the lock is let go").unwrap();
    writer.join().unwrap();
    assert!(which(&read_dir(&dir).unwrap(), &[2]).is_some());
    assert_one_generation(&dir);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The child's half of `writers_in_three_processes_take_turns`: writes its snapshots and exits.
fn child_writes(dir: &Path, first: u32) {
    for i in 0..10 {
        write_dir(dir, &snap(first + i)).unwrap();
    }
}

#[test]
fn writers_in_three_processes_take_turns() {
    const CHILD: &str = "SHOAL_STORE_TEST_CHILD";
    if let Ok(spec) = std::env::var(CHILD) {
        let (dir, first) = spec.split_once('|').unwrap();
        child_writes(Path::new(dir), first.parse().unwrap());
        return;
    }
    let dir = tmp("processes");
    write_dir(&dir, &snap(999)).unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = [100u32, 200]
        .iter()
        .map(|first| {
            std::process::Command::new(&exe)
                .args(["--exact", "writers_in_three_processes_take_turns", "--test-threads=1"])
                .env(CHILD, format!("{}|{first}", dir.display()))
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    child_writes(&dir, 300);
    for mut c in children {
        assert!(c.wait().unwrap().success(), "a child process's writes failed");
    }
    let all: Vec<u32> = (100..110).chain(200..210).chain(300..310).collect();
    assert!(which(&read_dir(&dir).unwrap(), &all).is_some());
    assert_one_generation(&dir);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn leftovers_of_a_crashed_writer_go_and_a_foreign_file_stops_the_write() {
    let dir = tmp("leftovers");
    write_dir(&dir, &snap(1)).unwrap();
    // A writer killed mid-write: a temporary generation with part of a file, and a CURRENT
    // being written (today's names, and the older ones without a counter).
    let stale = dir.join(".gen-000009.tmp123-4");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("memory.bin"), b"half").unwrap();
    std::fs::create_dir(dir.join(".gen-000002.tmp77")).unwrap();
    std::fs::write(dir.join(".CURRENT.tmp123-5"), b"gen-0000").unwrap();
    // A generation renamed into place whose CURRENT was never written.
    std::fs::create_dir(dir.join("gen-000003")).unwrap();
    std::fs::write(dir.join("gen-000003/manifest.json"), b"{").unwrap();
    assert!(is_snapshot_dir(&dir).unwrap());
    let r = write_dir(&dir, &snap(2)).unwrap();
    assert_eq!(r.dir, dir.join("gen-000004"), "past every generation there");
    assert_one_generation(&dir);
    assert!(which(&read_dir(&dir).unwrap(), &[2]).is_some());

    // A file shoal did not write: the write is refused, and nothing changes.
    std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
    let before = names(&dir);
    let e = write_dir(&dir, &snap(3)).unwrap_err();
    assert!(matches!(&e, SnapshotError::NotASnapshotDir { found, .. } if found == "notes.txt"), "{e}");
    assert_eq!(names(&dir), before);
    assert_eq!(std::fs::read(dir.join("notes.txt")).unwrap(), b"mine");
    assert!(which(&read_dir(&dir).unwrap(), &[2]).is_some(), "the snapshot is still the last one written");
    assert!(!is_snapshot_dir(&dir).unwrap());

    // A temporary generation holding a file shoal does not write is not a leftover of ours.
    std::fs::remove_file(dir.join("notes.txt")).unwrap();
    std::fs::create_dir(dir.join(".gen-000007.tmp5")).unwrap();
    std::fs::write(dir.join(".gen-000007.tmp5/photo.jpg"), b"jpeg").unwrap();
    let e = write_dir(&dir, &snap(3)).unwrap_err();
    assert!(matches!(&e, SnapshotError::NotASnapshotDir { found, .. } if found == ".gen-000007.tmp5/photo.jpg"), "{e}");
    assert_eq!(std::fs::read(dir.join(".gen-000007.tmp5/photo.jpg")).unwrap(), b"jpeg");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn write_dir_refuses_a_directory_it_did_not_write() {
    // A user's file.
    let dir = tmp("notes");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("notes.txt"), b"my notes").unwrap();
    let e = write_dir(&dir, &snap(1)).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(&e, SnapshotError::NotASnapshotDir { found, .. } if found == "notes.txt"), "{e}");
    assert!(msg.contains(&dir.display().to_string()) && msg.contains("`notes.txt`"), "{msg}");
    assert!(msg.contains("choose an empty or new directory"), "{msg}");
    assert_eq!(names(&dir), ["notes.txt"], "nothing written (not even the lock file)");
    assert_eq!(std::fs::read(dir.join("notes.txt")).unwrap(), b"my notes");
    assert!(!is_snapshot_dir(&dir).unwrap());

    // The user's own `gen-5` folder (what `shoal chat --save` once deleted).
    let dir = tmp("photos");
    std::fs::create_dir_all(dir.join("gen-5")).unwrap();
    std::fs::write(dir.join("gen-5/photo.jpg"), b"jpeg").unwrap();
    let e = write_dir(&dir, &snap(1)).unwrap_err();
    assert!(matches!(&e, SnapshotError::NotASnapshotDir { found, .. } if found == "gen-5/photo.jpg"), "{e}");
    assert_eq!(std::fs::read(dir.join("gen-5/photo.jpg")).unwrap(), b"jpeg");
    assert_eq!(names(&dir), ["gen-5"]);
    // ... even beside a snapshot of ours: the write is refused and the photo stays.
    std::fs::write(dir.join("CURRENT"), b"gen-000001 00000000 1\n").unwrap();
    assert!(matches!(write_dir(&dir, &snap(1)), Err(SnapshotError::NotASnapshotDir { .. })));
    assert_eq!(std::fs::read(dir.join("gen-5/photo.jpg")).unwrap(), b"jpeg");
    // A file named as the store's own but not of its making is the user's too.
    let dir = tmp("current");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("CURRENT"), b"my current reading list").unwrap();
    let e = write_dir(&dir, &snap(1)).unwrap_err();
    assert!(matches!(&e, SnapshotError::NotASnapshotDir { found, .. } if found == "CURRENT"), "{e}");
    assert_eq!(names(&dir), ["CURRENT"]);
    assert_eq!(std::fs::read(dir.join("CURRENT")).unwrap(), b"my current reading list");
    // ... but a damaged CURRENT where shoal has written (its lock file) is replaced.
    let damaged = tmp("damaged");
    write_dir(&damaged, &snap(1)).unwrap();
    std::fs::write(damaged.join("CURRENT"), b"whatever").unwrap();
    assert!(matches!(read_dir(&damaged), Err(SnapshotError::Corrupt { .. })));
    assert!(is_snapshot_dir(&damaged).unwrap());
    write_dir(&damaged, &snap(2)).unwrap();
    assert!(which(&read_dir(&damaged).unwrap(), &[2]).is_some());
    assert_one_generation(&damaged);
    // Generations alone, without CURRENT or the lock file, are no proof that shoal wrote them.
    let dir = tmp("bare-generation");
    std::fs::create_dir_all(dir.join("gen-000001")).unwrap();
    std::fs::write(dir.join("gen-000001/memory.bin"), b"x").unwrap();
    let e = write_dir(&dir, &snap(1)).unwrap_err();
    assert!(matches!(&e, SnapshotError::NotASnapshotDir { found, .. } if found == "gen-000001"), "{e}");
    assert!(dir.join("gen-000001/memory.bin").exists());

    // An empty directory, and one that does not exist.
    let empty = tmp("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert!(!is_snapshot_dir(&empty).unwrap());
    write_dir(&empty, &snap(1)).unwrap();
    assert!(which(&read_dir(&empty).unwrap(), &[1]).is_some());
    assert!(is_snapshot_dir(&empty).unwrap());
    assert_one_generation(&empty);
    let new = tmp("new").join("a/b");
    assert!(!is_snapshot_dir(&new).unwrap());
    write_dir(&new, &snap(2)).unwrap();
    assert!(which(&read_dir(&new).unwrap(), &[2]).is_some());

    // A symbolic link named like a generation: refused, its target untouched.
    #[cfg(unix)]
    {
        let target = tmp("link-target");
        std::fs::create_dir_all(&target).unwrap();
        std::fs::write(target.join("memory.bin"), b"precious").unwrap();
        let dir = tmp("link");
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink(&target, dir.join("gen-1")).unwrap();
        let e = write_dir(&dir, &snap(1)).unwrap_err();
        assert!(matches!(&e, SnapshotError::NotASnapshotDir { found, .. } if found == "gen-1"), "{e}");
        // Beside a real snapshot: still refused, and nothing followed.
        std::fs::remove_file(dir.join("gen-1")).unwrap();
        write_dir(&dir, &snap(1)).unwrap();
        std::os::unix::fs::symlink(&target, dir.join("gen-000000")).unwrap();
        assert!(matches!(write_dir(&dir, &snap(2)), Err(SnapshotError::NotASnapshotDir { .. })));
        assert_eq!(std::fs::read(target.join("memory.bin")).unwrap(), b"precious");
        assert_eq!(names(&target), ["memory.bin"]);
        assert!(which(&read_dir(&dir).unwrap(), &[1]).is_some());
        let _ = std::fs::remove_dir_all(&target);
        let _ = std::fs::remove_dir_all(&dir);
    }

    // A name with control characters is shown escaped.
    let dir = tmp("odd-name");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a\x1b[31mred\u{202e}"), b"").unwrap();
    let msg = write_dir(&dir, &snap(1)).unwrap_err().to_string();
    assert!(!msg.chars().any(|c| c.is_control() || c == '\u{202e}'), "{msg:?}");
    for d in ["notes", "photos", "current", "damaged", "bare-generation", "empty", "new", "odd-name"] {
        let _ = std::fs::remove_dir_all(tmp(d));
    }
}

#[test]
fn keys_are_checked() {
    let root = tmp("keys");
    let store = LocalStore::new(&root);
    let long = "k".repeat(200);
    for key in ["../x", ".hidden", "a/b", long.as_str(), "", ".", "..", "a b", "é", "a\0b", "/abs"] {
        let e = store.put(key, &snap(1)).unwrap_err();
        assert!(matches!(&e, SnapshotError::BadKey { .. }), "put `{key}`: {e}");
        assert!(e.to_string().len() < 400, "the key is cut: {e}");
        assert!(matches!(store.get(key), Err(SnapshotError::BadKey { .. })), "get `{key}`");
        assert!(matches!(store.remove(key), Err(SnapshotError::BadKey { .. })), "remove `{key}`");
    }
    assert!(!root.exists(), "nothing written for a bad key");
    let longest = "k".repeat(128);
    for key in ["a", "A-b_c.1", longest.as_str()] {
        store.put(key, &snap(1)).unwrap_or_else(|e| panic!("`{key}`: {e}"));
        assert!(which(&store.get(key).unwrap(), &[1]).is_some());
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn missing_keys_are_not_found_and_list_follows_put_and_remove() {
    let root = tmp("list");
    let store = LocalStore::new(&root);
    assert!(store.list().unwrap().is_empty(), "no root yet");
    assert!(matches!(store.get("a"), Err(SnapshotError::NotFound { .. })));
    assert!(matches!(store.remove("a"), Err(SnapshotError::NotFound { .. })));
    store.put("a", &snap(1)).unwrap();
    store.put("b", &snap(2)).unwrap();
    // Not keys: a directory without CURRENT, a file, a name that is not a key.
    std::fs::create_dir_all(root.join("junk")).unwrap();
    std::fs::write(root.join("x.txt"), b"").unwrap();
    std::fs::create_dir_all(root.join(".hidden")).unwrap();
    std::fs::write(root.join(".hidden/CURRENT"), b"").unwrap();
    assert_eq!(store.list().unwrap(), ["a", "b"]);
    assert!(matches!(store.remove("junk"), Err(SnapshotError::NotFound { .. })), "no snapshot there");
    assert!(root.join("junk").exists());

    store.remove("a").unwrap();
    assert!(!root.join("a").exists(), "the key's directory is gone");
    assert_eq!(store.list().unwrap(), ["b"]);
    assert!(matches!(store.get("a"), Err(SnapshotError::NotFound { .. })));
    assert!(matches!(store.remove("a"), Err(SnapshotError::NotFound { .. })));
    assert!(which(&store.get("b").unwrap(), &[2]).is_some());
    store.put("a", &snap(3)).unwrap();
    assert_eq!(store.list().unwrap(), ["a", "b"]);

    // A key's directory holding a file shoal did not write is not removed, nor is the file.
    std::fs::write(root.join("b/notes.txt"), b"mine").unwrap();
    let e = store.remove("b").unwrap_err();
    assert!(matches!(&e, SnapshotError::NotASnapshotDir { found, .. } if found == "notes.txt"), "{e}");
    assert_eq!(std::fs::read(root.join("b/notes.txt")).unwrap(), b"mine");
    assert!(which(&read_dir(&root.join("b")).unwrap(), &[2]).is_some());
    std::fs::remove_file(root.join("b/notes.txt")).unwrap();
    // A damaged snapshot is removed all the same.
    std::fs::write(root.join("b/CURRENT"), b"garbled").unwrap();
    assert!(matches!(store.get("b"), Err(SnapshotError::Corrupt { .. })));
    store.remove("b").unwrap();
    assert!(!root.join("b").exists());
    assert_eq!(store.list().unwrap(), ["a"]);
    // A key that is a symbolic link is refused; its target stays.
    #[cfg(unix)]
    {
        let elsewhere = tmp("list-elsewhere");
        write_dir(&elsewhere, &snap(4)).unwrap();
        std::os::unix::fs::symlink(&elsewhere, root.join("c")).unwrap();
        assert!(matches!(store.remove("c"), Err(SnapshotError::NotASnapshotDir { .. })));
        assert!(which(&read_dir(&elsewhere).unwrap(), &[4]).is_some());
        let _ = std::fs::remove_dir_all(&elsewhere);
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn removals_and_writes_of_one_key_take_turns() {
    let root = tmp("remove-race");
    let store = Arc::new(LocalStore::new(&root));
    let start = Arc::new(Barrier::new(4));
    let threads: Vec<_> = (0..4u32)
        .map(|t| {
            let (store, start) = (store.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                for i in 0..15 {
                    if t % 2 == 0 {
                        store.put("k", &snap(t * 100 + i)).unwrap_or_else(|e| panic!("put: {e}"));
                    } else {
                        match store.remove("k") {
                            Ok(()) | Err(SnapshotError::NotFound { .. }) => {}
                            Err(e) => panic!("remove: {e}"),
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let dir = root.join("k");
    match store.get("k") {
        Ok(s) => {
            let all: Vec<u32> = (0..15).chain(200..215).collect();
            assert!(which(&s, &all).is_some());
            assert_one_generation(&dir);
        }
        Err(SnapshotError::NotFound { .. }) => assert!(!dir.exists() || names(&dir).iter().all(|n| n == ".lock")),
        Err(e) => panic!("{e}"),
    }
    store.put("k", &snap(7)).unwrap();
    assert!(which(&store.get("k").unwrap(), &[7]).is_some());
    let _ = std::fs::remove_dir_all(&root);
}
