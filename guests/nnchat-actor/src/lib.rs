//! The same chat as `guests/nnchat`, as a shoal actor (`nnchat_actor.wasm`): inference through
//! the `wasmedge-wasi-nn` crate only; the handler export comes from the shoal guest SDK. Each
//! message is a user turn; the answer streams back as the reply. Its wasi-nn context (and so
//! its KV cache) is part of its snapshot, so a resumed actor goes on reusing the prefix.
//!
//! Arguments (given at spawn): `[--model NAME] [--temperature T] [--n-predict N]
//! [--ctx-size N] [--system TEXT] [--stats]`; with `--stats` each reply ends with output 1
//! (the token counts) as a JSON line.

use wasmedge_wasi_nn::{
    BackendError, Error, ExecutionTarget, Graph, GraphBuilder, GraphEncoding, GraphExecutionContext, TensorType,
};

struct Chat {
    // The graph must outlive its context.
    _graph: Graph,
    ctx: GraphExecutionContext,
    conversation: String,
    stats: bool,
}

fn setup() -> Result<Chat, String> {
    let (mut model, mut system, mut stats) = (
        "default".to_string(),
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face".to_string(),
        false,
    );
    let mut config = vec!["\"prefix-reuse\":true".to_string()];
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => model = val()?,
            "--system" => system = val()?,
            "--stats" => stats = true,
            "--temperature" => {
                config.push(format!("\"temperature\":{}", val()?.parse::<f64>().map_err(|e| e.to_string())?))
            }
            "--n-predict" => {
                config.push(format!("\"n-predict\":{}", val()?.parse::<u64>().map_err(|e| e.to_string())?))
            }
            "--ctx-size" => config.push(format!("\"ctx-size\":{}", val()?.parse::<u64>().map_err(|e| e.to_string())?)),
            _ => return Err(format!("unknown argument `{flag}`")),
        }
    }
    let graph = GraphBuilder::new(GraphEncoding::Ggml, ExecutionTarget::AUTO)
        .config(format!("{{{}}}", config.join(",")))
        .build_from_cache(&model)
        .map_err(|e| format!("loading the model: {e}"))?;
    let ctx = graph.init_execution_context().map_err(|e| format!("init_execution_context: {e}"))?;
    Ok(Chat { _graph: graph, ctx, conversation: format!("<|im_start|>system\n{system}<|im_end|>\n"), stats })
}

fn reply(s: &str) {
    let _ = shoal_guest::actor::reply(s.as_bytes());
}

impl Chat {
    fn turn(&mut self, user: &str) -> Result<(), Error> {
        self.conversation.push_str(&format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"));
        self.ctx.set_input(0, TensorType::U8, &[1], self.conversation.as_bytes())?;
        let mut answer = String::new();
        loop {
            match self.ctx.compute_single() {
                Ok(()) => {}
                Err(Error::BackendError(BackendError::EndOfSequence)) => break,
                Err(Error::BackendError(BackendError::ContextFull)) => break,
                Err(e) => return Err(e),
            }
            let mut buf = vec![0u8; 256];
            let n = self.ctx.get_output_single(0, &mut buf)?;
            let piece = String::from_utf8_lossy(&buf[..n]).into_owned();
            reply(&piece);
            answer.push_str(&piece);
        }
        reply("\n");
        let mut meta = vec![0u8; 1024];
        let n = self.ctx.get_output(1, &mut meta)?;
        self.ctx.fini_single()?;
        self.conversation.push_str(&format!("{answer}<|im_end|>\n"));
        if self.stats {
            reply(&format!("{}\n", String::from_utf8_lossy(&meta[..n])));
        }
        Ok(())
    }
}

struct NnChatActor(Result<Chat, String>);

impl shoal_guest::actor::Actor for NnChatActor {
    fn start() -> Self {
        NnChatActor(setup())
    }

    fn on_message(&mut self, msg: &[u8]) -> i32 {
        let chat = match &mut self.0 {
            Ok(c) => c,
            Err(e) => {
                reply(&format!("nnchat: {e}\n"));
                return 1;
            }
        };
        match chat.turn(&String::from_utf8_lossy(msg)) {
            Ok(()) => 0,
            Err(e) => {
                reply(&format!("nnchat: {e}\n"));
                3
            }
        }
    }
}

shoal_guest::export_actor!(NnChatActor);
