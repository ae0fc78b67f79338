//! The guests of `guests/`, compiled to `wasm32-wasip1` by this crate's build
//! script and embedded here, so that the CLI and the tests always run guests built
//! from the sources beside them.

/// `guests/gemm`: the GEMM reference check (`gemm [--size N]... [--async] [--json]`).
pub const GEMM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/gemm.wasm"));

/// `guests/xfer`: round trips through `scal`, timed in the guest (`xfer [--bytes N]... [--repeat R]`).
pub const XFER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/xfer.wasm"));

/// `guests/chat`: the chat agent (`chat [--model NAME] [--temperature T] [--seed S] [--max-tokens N] [--prompt TEXT]...`).
pub const CHAT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/chat.wasm"));
/// `guests/nnchat`: a multi-turn chat written only against the `wasmedge-wasi-nn` crate
/// (`nnchat [--model NAME] [--prompt TEXT]... [--temperature T] [--n-predict N] [--stats]`).
pub const NNCHAT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/nnchat.wasm"));
/// `guests/chat` built as an actor (`chat_actor.wasm`): each message is one user turn, the
/// answer streams back as the reply; settings are its spawn arguments (those of `chat`).
pub const CHAT_ACTOR: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/chat_actor.wasm"));
/// `guests/nnchat-actor`: nnchat as an actor (inference through `wasmedge-wasi-nn` only;
/// each message a user turn; its wasi-nn context and KV cache are part of its snapshot).
pub const NNCHAT_ACTOR: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/nnchat_actor.wasm"));
/// `guests/nncomponent`: a chat through the component-model `wasi:nn` interface (a
/// `wasm32-wasip2` component: `nncomponent [--model NAME] [--prompt TEXT]... [--stats]`).
pub const NNCOMPONENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/nncomponent.wasm"));
