//! A chat agent. The conversation lives in this guest's memory; each user turn is
//! rendered with the model's chat template, only the tokens the session has not seen
//! are evaluated (the KV cache keeps the rest), and the answer streams to stdout.
//!
//! Usage: chat [--model NAME] [--temperature T] [--seed S] [--max-tokens N]
//!             [--context N] [--prompt TEXT]... [--stats]
//! Without --prompt it reads one user turn per line from stdin.
//!
//! `chat --bench [--model NAME] [--prompt-tokens 128] [--gen 128] [--repeat 5]` measures
//! prefill and decode from this guest exactly as the engine's native `generate` bench does
//! (same token ids, greedy, fresh session per repeat after one warm-up) and prints one
//! JSON line.

use std::io::{BufRead, Write};
use std::time::Instant;

use shoal_guest::{Model, SamplerParams, Session};

struct Args {
    model: String,
    params: SamplerParams,
    max_tokens: u32,
    context: u32,
    prompts: Vec<String>,
    stats: bool,
    bench: Option<(usize, usize, usize)>,
}

fn parse() -> Args {
    let mut a = Args {
        model: "smollm2".into(),
        params: SamplerParams::default(),
        max_tokens: 256,
        context: 0,
        prompts: Vec::new(),
        stats: false,
        bench: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--model" => a.model = val(),
            "--temperature" => a.params.temperature = val().parse().unwrap_or_else(|_| usage("bad --temperature")),
            "--seed" => a.params.seed = val().parse().unwrap_or_else(|_| usage("bad --seed")),
            "--top-k" => a.params.top_k = val().parse().unwrap_or_else(|_| usage("bad --top-k")),
            "--top-p" => a.params.top_p = val().parse().unwrap_or_else(|_| usage("bad --top-p")),
            "--repeat-penalty" => {
                a.params.repetition_penalty = val().parse().unwrap_or_else(|_| usage("bad --repeat-penalty"))
            }
            "--max-tokens" => a.max_tokens = val().parse().unwrap_or_else(|_| usage("bad --max-tokens")),
            "--context" => a.context = val().parse().unwrap_or_else(|_| usage("bad --context")),
            "--prompt" => a.prompts.push(val()),
            "--stats" => a.stats = true,
            "--bench" => a.bench = Some(a.bench.unwrap_or((128, 128, 5))),
            "--prompt-tokens" | "--gen" | "--repeat" => {
                let v: usize = val().parse().unwrap_or_else(|_| usage(&format!("bad {flag}")));
                let b = a.bench.get_or_insert((128, 128, 5));
                match flag.as_str() {
                    "--prompt-tokens" => b.0 = v,
                    "--gen" => b.1 = v,
                    _ => b.2 = v.max(1),
                }
            }
            _ => usage(&format!("unknown argument `{flag}`")),
        }
    }
    a
}

fn usage(msg: &str) -> ! {
    eprintln!("chat: {msg}");
    eprintln!(
        "usage: chat [--model NAME] [--temperature T] [--seed S] [--max-tokens N] [--context N] [--prompt TEXT]..."
    );
    std::process::exit(2);
}

fn fail(msg: &str) -> ! {
    eprintln!("chat: {msg}");
    std::process::exit(1);
}

/// The conversation and what the session has already evaluated.
struct Chat {
    model: Model,
    session: Session,
    messages: Vec<(String, String)>,
    /// Tokens in the session's cache, in order.
    seen: Vec<u32>,
}

impl Chat {
    /// Answers one user turn, streaming the reply; returns (tokens generated, seconds).
    fn turn(&mut self, user: &str, a: &Args, out: &mut impl Write) -> (u32, f64) {
        self.messages.push(("user".into(), user.into()));
        let msgs: Vec<(&str, &str)> = self.messages.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
        let text = self.model.render(&msgs, true).unwrap_or_else(|e| fail(&e.to_string()));
        let prompt = self.model.tokenize(&text, true).unwrap_or_else(|e| fail(&e.to_string()));
        // Reuse the cache for the prefix the session has already seen.
        let common = self.seen.iter().zip(&prompt).take_while(|(x, y)| x == y).count();
        let common = common.min(prompt.len() - 1);
        if common < self.seen.len() {
            self.session.truncate(common as u32).unwrap_or_else(|e| fail(&e.to_string()));
            self.seen.truncate(common);
        }
        let mut input: Vec<u32> = prompt[common..].to_vec();
        let mut reply = Vec::<u8>::new();
        let mut printed = 0usize;
        let t0 = Instant::now();
        let mut generated = 0;
        while generated < a.max_tokens {
            let next = match self.session.decode(&input, &a.params) {
                Ok(t) => t,
                Err(e) if e.code == 13 => {
                    eprintln!("\nchat: the context is full");
                    break;
                }
                Err(e) => fail(&e.to_string()),
            };
            self.seen.extend_from_slice(&input);
            generated += 1;
            if self.model.info.stop.contains(&next) || Some(next) == self.model.info.eos {
                // Keep the stop token in the conversation's cache on the next turn.
                break;
            }
            reply.extend(self.model.piece(next).unwrap_or_else(|e| fail(&e.to_string())));
            // Print whole UTF-8 characters as they complete.
            let valid = match std::str::from_utf8(&reply[printed..]) {
                Ok(s) => s.len(),
                Err(e) => e.valid_up_to(),
            };
            if valid > 0 {
                let _ = out.write_all(&reply[printed..printed + valid]);
                let _ = out.flush();
                printed += valid;
            }
            input = vec![next];
        }
        let secs = t0.elapsed().as_secs_f64();
        let _ = writeln!(out);
        let _ = out.flush();
        self.messages.push(("assistant".into(), String::from_utf8_lossy(&reply).into_owned()));
        (generated, secs)
    }
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
    let a = parse();
    let model = Model::open(&a.model).unwrap_or_else(|e| fail(&e.to_string()));
    if let Some(b) = a.bench {
        bench(&a, &model, b);
        return;
    }
    let session = Session::new(&model, a.context).unwrap_or_else(|e| fail(&e.to_string()));
    let mut chat = Chat { model, session, messages: Vec::new(), seen: Vec::new() };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let run = |user: &str, chat: &mut Chat, out: &mut std::io::StdoutLock| {
        let (n, secs) = chat.turn(user, &a, out);
        if a.stats {
            eprintln!("[{n} tokens in {secs:.2} s, {:.1} tokens/s]", n as f64 / secs.max(1e-9));
        }
    };
    if !a.prompts.is_empty() {
        for p in &a.prompts {
            run(p, &mut chat, &mut out);
        }
        return;
    }
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        run(&line, &mut chat, &mut out);
    }
}
