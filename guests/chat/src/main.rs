//! A chat agent. The conversation lives in this guest's memory; each user turn is
//! rendered with the model's chat template, only the tokens the session has not seen
//! are evaluated (the KV cache keeps the rest), and the answer streams to stdout.
//!
//! Usage: chat [--model NAME] [--temperature T] [--seed S] [--max-tokens N]
//!             [--context N] [--context-policy error|truncate] [--prompt TEXT]... [--stats]
//! Without --prompt it reads one user turn per line from stdin.
//!
//! `chat --bench [--model NAME] [--prompt-tokens 128] [--gen 128] [--repeat 5]` measures
//! prefill and decode from this guest exactly as the engine's native `generate` bench does
//! (same token ids, greedy, fresh session per repeat after one warm-up) and prints one
//! JSON line.

use std::io::BufRead;
use std::time::Instant;

use chat_actor::{Args, Chat};
use shoal_guest::{Model, SamplerParams, Session};

fn usage(msg: &str) -> ! {
    eprintln!("chat: {msg}");
    eprintln!(
        "usage: chat [--model NAME] [--temperature T] [--seed S] [--max-tokens N] [--context N] [--context-policy error|truncate] [--prompt TEXT]..."
    );
    std::process::exit(2);
}

fn fail(msg: &str) -> ! {
    eprintln!("chat: {msg}");
    std::process::exit(1);
}

/// Prefill and decode tokens/s from the guest (see the module docs).
fn bench(a: &Args, model: &Model, (prompt, gen_n, repeat): (usize, usize, usize)) {
    let vocab = model.info.vocab_size as u64;
    let tokens: Vec<u32> = (0..prompt as u64).map(|i| ((i * 2_654_435_761 + 17) % (vocab - 1)) as u32 + 1).collect();
    let greedy = SamplerParams { temperature: 0.0, ..SamplerParams::default() };
    let (mut pre, mut dec) = (Vec::new(), Vec::new());
    for r in 0..=repeat {
        let mut s = Session::new(model, (prompt + gen_n + 1) as u32).unwrap_or_else(|e| fail(&e.to_string()));
        let t = Instant::now();
        let mut next = s.decode(&tokens, &greedy).unwrap_or_else(|e| fail(&e.to_string()));
        let p = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..gen_n {
            next = s.decode(&[next], &greedy).unwrap_or_else(|e| fail(&e.to_string()));
        }
        let d = t.elapsed().as_secs_f64();
        if r > 0 {
            pre.push(prompt as f64 / p);
            dec.push(gen_n as f64 / d);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|x, y| x.total_cmp(y));
        v[v.len() / 2]
    };
    let runs = format!("{{\"prefill\":{pre:.1?},\"decode\":{dec:.1?}}}");
    println!(
        "{{\"driver\":\"wasm-guest\",\"model\":\"{}\",\"prompt\":{prompt},\"gen\":{gen_n},\"repeat\":{repeat},\"prefill_tok_s\":{:.1},\"decode_tok_s\":{:.1},\"runs\":{runs}}}",
        a.model,
        median(&mut pre),
        median(&mut dec)
    );
}

fn main() {
    let a = chat_actor::parse(std::env::args().skip(1)).unwrap_or_else(|e| usage(&e));
    if let Some(b) = a.bench {
        let model = Model::open(&a.model).unwrap_or_else(|e| fail(&e.to_string()));
        bench(&a, &model, b);
        return;
    }
    let mut chat = Chat::new(&a).unwrap_or_else(|e| fail(&e));
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if !a.prompts.is_empty() {
        for p in &a.prompts {
            chat.turn(p, &a, &mut out).unwrap_or_else(|e| fail(&e.to_string()));
        }
        return;
    }
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        // A turn too long for the context is said and skipped; the chat goes on.
        match chat.turn(&line, &a, &mut out) {
            Ok(_) => {}
            Err(e @ chat_actor::TurnError::ContextFull(_)) => eprintln!("chat: {e}"),
            Err(e) => fail(&e.to_string()),
        }
    }
}
