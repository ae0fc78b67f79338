//! `shoal chat --resume`: the turns of a resumed chat are kept (saved back to where it came
//! from), and `--stats` works on a resumed chat, printed after the answer's last token.

mod common;

use std::path::Path;
use std::process::Stdio;

use common::{model, shoal, tmp};

/// Runs `shoal chat` with stdout and stderr into one file, so that their order shows; the
/// exit code and everything written.
fn chat(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let log = dir.join("out.log");
    let f = std::fs::File::create(&log).unwrap();
    let st = shoal()
        .env_remove("SHOAL_MODELS")
        .args(["chat", "--backend", "cpu", "--temperature", "0", "--max-tokens", "8"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .status()
        .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    eprintln!("shoal chat {args:?}: {st}\n{text}");
    (st.code(), text)
}

/// The cached tokens `shoal chat` says it resumed with.
fn resumed_positions(text: &str) -> usize {
    let rest = text.split("resumed from ").nth(1).expect("a resume line");
    let n = rest.split(" (").nth(1).and_then(|r| r.split(' ').next()).expect("cached tokens");
    n.parse().unwrap()
}

#[test]
fn a_resumed_chat_is_saved_back_and_its_stats_come_after_the_answer() {
    let Some(m) = model() else {
        eprintln!("skipped: the default model is not fetched (scripts/fetch-model.sh)");
        return;
    };
    let d = tmp("chat-resume");
    let snap = d.join("snap");
    let spec = format!("smollm2={}", m.display());
    let s = snap.to_str().unwrap();
    let (code, _) = chat(&d, &["--model", &spec, "--prompt", "Hello!", "--save", s]);
    assert_eq!(code, Some(0));

    // Resumed without --save, with --stats: the turn is saved back to the snapshot.
    let (code, text) = chat(&d, &["--model", &spec, "--resume", s, "--stats", "--prompt", "Say one word."]);
    assert_eq!(code, Some(0));
    let first = resumed_positions(&text);
    assert!(text.contains(&format!("saved to {s}")), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    let stats = lines.iter().position(|l| l.starts_with('[') && l.contains(" tokens in ")).expect("a stats line");
    // After the answer: what comes before it (past the resume line) is the answer, and
    // nothing of the answer comes after it.
    let resumed = lines.iter().position(|l| l.contains("resumed from")).unwrap();
    assert!(stats > resumed + 1 || !lines[resumed + 1..stats].is_empty(), "{text}");
    assert!(lines[stats + 1..].iter().all(|l| l.starts_with("shoal chat: saved to")), "{text}");
    let n: usize = lines[stats][1..].split(' ').next().unwrap().parse().unwrap();
    assert!(n > 0, "{}", lines[stats]);

    // Resumed again: the second turn is there (more cached tokens than before it).
    let (code, text) = chat(&d, &["--model", &spec, "--resume", s, "--prompt", "Thanks."]);
    assert_eq!(code, Some(0));
    let second = resumed_positions(&text);
    assert!(second > first, "the resumed turn was not kept: {first} then {second} cached tokens");
    assert!(!text.contains(" tokens in "), "no stats without --stats: {text}");

    // --save elsewhere leaves the resumed snapshot as it was.
    let other = d.join("other");
    let (code, _) = chat(&d, &["--model", &spec, "--resume", s, "--prompt", "Bye.", "--save", other.to_str().unwrap()]);
    assert_eq!(code, Some(0));
    let (_, text) = chat(&d, &["--model", &spec, "--resume", s, "--prompt", "Again."]);
    let (_, text2) = chat(&d, &["--model", &spec, "--resume", other.to_str().unwrap(), "--prompt", "Hi."]);
    // `other` is the snapshot plus the turn "Bye."; the snapshot itself did not get it.
    assert!(resumed_positions(&text2) > resumed_positions(&text), "{text}\n{text2}");
}

#[test]
fn help_says_what_the_commands_do() {
    let help = |cmd: &str| {
        let out = shoal().args([cmd, "--help"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let chat = help("chat");
    assert!(chat.contains("saved back"), "{chat}");
    let run = help("run");
    for s in ["--dir", "--env", "everything after it is passed"] {
        assert!(run.contains(s), "{s} not in run --help:\n{run}");
    }
    let demo = help("demo");
    assert!(demo.contains("gemm or chat"), "{demo}");
}
