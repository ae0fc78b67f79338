//! A chat through `wasi:nn` as a component guest (`wasm32-wasip2`): the model preloaded by
//! name, the conversation rendered as ChatML here and sent whole each turn through one
//! execution context (whose KV cache the host reuses), the answer printed when computed.
//!
//! Usage: nncomponent [--model NAME] [--prompt TEXT]... [--n-predict N] [--temperature T]
//!                    [--stats]
//! With --stats each answer is followed by the `metadata` output (token counts, JSON).
//! `nncomponent --bad-calls` makes calls the host must refuse and prints each error code.

wit_bindgen::generate!({
    path: "../../crates/shoal-host/wit",
    world: "ml",
});

use wasi::nn::graph;
use wasi::nn::tensor::{Tensor, TensorType};

fn fail(what: &str, e: wasi::nn::errors::Error) -> ! {
    eprintln!("nncomponent: {what}: {:?}: {}", e.code(), e.data());
    std::process::exit(1);
}

fn main() {
    let (mut model, mut prompts, mut stats) = ("default".to_string(), Vec::new(), false);
    let mut meta = vec!["\"temperature\":0".to_string()];
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || {
            it.next().unwrap_or_else(|| {
                eprintln!("nncomponent: {flag} needs a value");
                std::process::exit(2)
            })
        };
        match flag.as_str() {
            "--model" => model = val(),
            "--prompt" => prompts.push(val()),
            "--n-predict" => meta.push(format!("\"n-predict\":{}", val())),
            "--temperature" => meta[0] = format!("\"temperature\":{}", val()),
            "--stats" => stats = true,
            "--bad-calls" => return bad_calls(),
            _ => {
                eprintln!("nncomponent: unknown argument `{flag}`");
                std::process::exit(2)
            }
        }
    }
    let g = graph::load_by_name(&model).unwrap_or_else(|e| fail("load-by-name", e));
    let ctx = g.init_execution_context().unwrap_or_else(|e| fail("init-execution-context", e));
    let metadata = format!("{{{}}}", meta.join(","));
    let mut conversation =
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            .to_string();
    for p in &prompts {
        conversation.push_str(&format!("<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n"));
        let bytes = conversation.as_bytes();
        let inputs = vec![
            ("prompt".to_string(), Tensor::new(&[bytes.len() as u32], TensorType::U8, bytes)),
            ("metadata".to_string(), Tensor::new(&[metadata.len() as u32], TensorType::U8, metadata.as_bytes())),
        ];
        let outputs = ctx.compute(inputs).unwrap_or_else(|e| fail("compute", e));
        let (mut answer, mut counts) = (String::new(), String::new());
        for (name, t) in outputs {
            match name.as_str() {
                "output" => answer = String::from_utf8_lossy(&t.data()).into_owned(),
                "metadata" => counts = String::from_utf8_lossy(&t.data()).into_owned(),
                _ => {}
            }
        }
        println!("{answer}");
        if stats {
            println!("{counts}");
        }
        conversation.push_str(&format!("{answer}<|im_end|>\n"));
    }
}

/// Calls the host must refuse, each printed as `what: code`.
fn bad_calls() {
    let show = |what: &str, r: Result<(), wasi::nn::errors::Error>| match r {
        Ok(()) => println!("{what}: accepted"),
        Err(e) => println!("{what}: {:?}", e.code()),
    };
    show("unknown model", graph::load_by_name("no-such-model").map(drop));
    show(
        "onnx bytes",
        graph::load(&[vec![1, 2, 3]], graph::GraphEncoding::Onnx, graph::ExecutionTarget::Cpu).map(drop),
    );
    show(
        "garbage model",
        graph::load(&[b"not a gguf".to_vec()], graph::GraphEncoding::Ggml, graph::ExecutionTarget::Cpu).map(drop),
    );
    let g = graph::load_by_name("default").unwrap_or_else(|e| fail("load-by-name", e));
    let ctx = g.init_execution_context().unwrap_or_else(|e| fail("init-execution-context", e));
    show("no inputs", ctx.compute(Vec::new()).map(drop));
    let f32s = Tensor::new(&[1], TensorType::Fp32, &[0, 0, 128, 63]);
    show("fp32 prompt", ctx.compute(vec![("prompt".to_string(), f32s)]).map(drop));
    let bad = Tensor::new(&[2], TensorType::U8, &[0xff, 0xfe]);
    show("non-UTF-8 prompt", ctx.compute(vec![("prompt".to_string(), bad)]).map(drop));
    let p = Tensor::new(&[2], TensorType::U8, b"hi");
    let m = Tensor::new(&[5], TensorType::U8, b"{nope");
    show("malformed metadata", ctx.compute(vec![("prompt".to_string(), p), ("metadata".to_string(), m)]).map(drop));
    let long = "word ".repeat(6000);
    let p = Tensor::new(&[long.len() as u32], TensorType::U8, long.as_bytes());
    let m = Tensor::new(&[16], TensorType::U8, b"{\"ctx-size\":512}");
    show("prompt too long", ctx.compute(vec![("prompt".to_string(), p), ("metadata".to_string(), m)]).map(drop));
    let p = Tensor::new(&[2], TensorType::U8, b"Hi");
    let m = Tensor::new(&[16], TensorType::U8, b"{\"n-predict\":2}");
    show("still usable", ctx.compute(vec![("prompt".to_string(), p), ("metadata".to_string(), m)]).map(drop));
}
