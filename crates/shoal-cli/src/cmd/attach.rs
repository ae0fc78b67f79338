//! `shoal attach ID|NAME`: a conversation with an actor on the terminal. Each line read
//! from stdin is sent as one message and its reply streamed back; end of input (Ctrl-D on
//! a terminal), or a line holding Ctrl-] (typed, then Enter), detaches, and the actor keeps running with its conversation. An actor that
//! answers with an error is reported and the conversation goes on; a refusal of the
//! daemon's (no such actor, paused) ends it.

use std::io::{BufRead, IsTerminal, Write};

use super::ctl::{Addr, call, escaped};

/// Flags of `shoal attach`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    at: Addr,
    /// The actor's id or name.
    id: String,
}

/// Ctrl-]: a line holding it detaches (typed, then Enter).
const ESCAPE: char = '\x1d';

pub fn run(a: Args) -> anyhow::Result<i32> {
    // The actor exists (and is the user's) before anything is typed.
    let v = call(&a.at, "GET", "/v1/actors", &serde_json::json!({}))?;
    let known = v["actors"].as_array().is_some_and(|l| {
        l.iter().any(|x| x["name"].as_str() == Some(&a.id) || x["id"].as_u64().is_some_and(|i| i.to_string() == a.id))
    });
    if !known {
        anyhow::bail!("no actor `{}` (see `shoal ps`)", escaped(&a.id));
    }
    let tty = std::io::stdin().is_terminal();
    if tty {
        eprintln!(
            "attached to {}: type a message and Enter; Ctrl-D (or Ctrl-] and Enter) detaches, the actor keeps running",
            a.id
        );
    }
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        if tty {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let text = line.trim_end_matches(['\n', '\r']);
        if text.contains(ESCAPE) {
            break;
        }
        if text.is_empty() {
            continue;
        }
        match super::ctl::message(&a.at, &a.id, text) {
            Ok(_) => {}
            Err(e) if e.downcast_ref::<super::Failure>().is_some() => eprintln!("shoal: {e:#}"),
            Err(e) => return Err(e),
        }
        println!();
    }
    if tty {
        eprintln!("detached from {}; it keeps running", a.id);
    }
    Ok(0)
}
