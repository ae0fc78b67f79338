//! A multi-turn chat in the style of WasmEdge's llama-chat app, using only the
//! `wasmedge-wasi-nn` crate: the model comes preloaded by name (`--nn-preload
//! default:GGML:AUTO:model.gguf`), the conversation is rendered as ChatML here and the whole
//! of it is sent every turn, the answer streams token by token through `compute_single`.
//!
//! Usage: nnchat [--model NAME] [--prompt TEXT]... [--temperature T] [--n-predict N]
//!               [--ctx-size N] [--no-prefix-reuse] [--system TEXT] [--stats]
//! `nnchat --embed TEXT` prints the model's embedding of TEXT instead (metadata
//! `"embedding": true`, `compute`, output 0).
//! Without --prompt it reads one user turn per line from stdin. With --stats each answer is
//! followed by a JSON line: time to first token, the turn's time, and output 1 (token counts).

use std::io::{BufRead, Write};
use std::time::Instant;

use wasmedge_wasi_nn::{BackendError, Error, ExecutionTarget, GraphBuilder, GraphEncoding, TensorType};

struct Args {
    model: String,
    prompts: Vec<String>,
    system: String,
    embed: Option<String>,
    config: serde_like::Config,
    stats: bool,
}

/// The metadata JSON, written by hand (the guest depends on wasmedge-wasi-nn only).
mod serde_like {
    #[derive(Default)]
    pub struct Config {
        pub temperature: Option<f64>,
        pub n_predict: Option<u64>,
        pub ctx_size: Option<u64>,
        pub prefix_reuse: bool,
        pub embedding: bool,
    }

    impl Config {
        pub fn json(&self) -> String {
            let mut parts = vec![format!("\"prefix-reuse\":{}", self.prefix_reuse)];
            if self.embedding {
                parts.push("\"embedding\":true".to_string());
            }
            if let Some(t) = self.temperature {
                parts.push(format!("\"temperature\":{t}"));
            }
            if let Some(n) = self.n_predict {
                parts.push(format!("\"n-predict\":{n}"));
            }
            if let Some(n) = self.ctx_size {
                parts.push(format!("\"ctx-size\":{n}"));
            }
            format!("{{{}}}", parts.join(","))
        }
    }
}

fn parse() -> Args {
    let mut a = Args {
        model: "default".into(),
        prompts: Vec::new(),
        system: "You are a helpful AI assistant named SmolLM, trained by Hugging Face".into(),
        embed: None,
        config: serde_like::Config { prefix_reuse: true, ..Default::default() },
        stats: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--model" => a.model = val(),
            "--prompt" => a.prompts.push(val()),
            "--system" => a.system = val(),
            "--temperature" => {
                a.config.temperature = Some(val().parse().unwrap_or_else(|_| usage("bad --temperature")))
            }
            "--n-predict" => a.config.n_predict = Some(val().parse().unwrap_or_else(|_| usage("bad --n-predict"))),
            "--ctx-size" => a.config.ctx_size = Some(val().parse().unwrap_or_else(|_| usage("bad --ctx-size"))),
            "--no-prefix-reuse" => a.config.prefix_reuse = false,
            "--embed" => {
                a.embed = Some(val());
                a.config.embedding = true;
            }
            "--stats" => a.stats = true,
            _ => usage(&format!("unknown argument `{flag}`")),
        }
    }
    a
}

fn usage(msg: &str) -> ! {
    eprintln!("nnchat: {msg}");
    eprintln!(
        "usage: nnchat [--model NAME] [--prompt TEXT]... [--temperature T] [--n-predict N] [--ctx-size N] [--no-prefix-reuse] [--system TEXT] [--stats]"
    );
    std::process::exit(2);
}

fn fail(what: &str, e: Error) -> ! {
    eprintln!("nnchat: {what}: {e}");
    std::process::exit(1);
}

fn main() {
    let a = parse();
    let graph = GraphBuilder::new(GraphEncoding::Ggml, ExecutionTarget::AUTO)
        .config(a.config.json())
        .build_from_cache(&a.model)
        .unwrap_or_else(|e| fail("loading the model", e));
    let mut ctx = graph.init_execution_context().unwrap_or_else(|e| fail("init_execution_context", e));
    if let Some(text) = &a.embed {
        ctx.set_input(0, TensorType::U8, &[1], text.as_bytes()).unwrap_or_else(|e| fail("set_input", e));
        ctx.compute().unwrap_or_else(|e| fail("compute", e));
        let mut buf = vec![0u8; 1 << 20];
        let n = ctx.get_output(0, &mut buf).unwrap_or_else(|e| fail("get_output", e));
        println!("{}", String::from_utf8_lossy(&buf[..n]));
        return;
    }
    let mut conversation = format!("<|im_start|>system\n{}<|im_end|>\n", a.system);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut turn = |user: &str, out: &mut std::io::StdoutLock| {
        conversation.push_str(&format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"));
        ctx.set_input(0, TensorType::U8, &[1], conversation.as_bytes()).unwrap_or_else(|e| fail("set_input", e));
        let t0 = Instant::now();
        let mut first_token_s = None;
        let mut answer = String::new();
        loop {
            match ctx.compute_single() {
                Ok(()) => {}
                Err(Error::BackendError(BackendError::EndOfSequence)) => break,
                Err(Error::BackendError(BackendError::ContextFull)) => {
                    eprintln!("nnchat: the context is full");
                    break;
                }
                Err(e) => fail("compute_single", e),
            }
            first_token_s.get_or_insert(t0.elapsed().as_secs_f64());
            let mut buf = vec![0u8; 256];
            let n = ctx.get_output_single(0, &mut buf).unwrap_or_else(|e| fail("get_output_single", e));
            let piece = String::from_utf8_lossy(&buf[..n]).into_owned();
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
            answer.push_str(&piece);
        }
        let _ = writeln!(out);
        let mut meta = vec![0u8; 1024];
        let n = ctx.get_output(1, &mut meta).unwrap_or_else(|e| fail("get_output(1)", e));
        ctx.fini_single().unwrap_or_else(|e| fail("fini_single", e));
        conversation.push_str(&format!("{answer}<|im_end|>\n"));
        if a.stats {
            let _ = writeln!(
                out,
                "{{\"ttft_s\":{:.4},\"turn_s\":{:.4},\"metadata\":{}}}",
                first_token_s.unwrap_or(0.0),
                t0.elapsed().as_secs_f64(),
                String::from_utf8_lossy(&meta[..n])
            );
        }
    };
    if !a.prompts.is_empty() {
        for p in &a.prompts {
            turn(p, &mut out);
        }
        return;
    }
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if !line.trim().is_empty() {
            turn(&line, &mut out);
        }
    }
}
