//! `wasi:nn` for component guests (`wit/wasi-nn.wit`), on the same engine as the
//! `wasi_ephemeral_nn` core-module ABI (`nn.rs`): graphs are the host's GGML models,
//! execution contexts hold a KV cache and reuse its prefix across computations.
//!
//! GGML over this interface (`docs/abi.md`, "wasi:nn for components"): `compute` takes the
//! prompt as a `U8` tensor named `prompt` (or the first `U8` input otherwise) and, optionally,
//! the generation settings as a `U8` tensor named `metadata` (WasmEdge's JSON keys); it
//! returns `output` (the answer's text, or the embedding's JSON in embedding mode) and
//! `metadata` (token counts as JSON), both `U8`.

use std::sync::Arc;

use wasmtime::component::{Resource, ResourceTable};

use crate::budget::{Charge, Quota};
use crate::error::{Kind, NnErrno};
use crate::models::Models;
use crate::nn::{self, Context, GraphModel, NnError, Options};

mod bindings {
    wasmtime::component::bindgen!({
        world: "ml",
        path: "wit/wasi-nn.wit",
        imports: { default: trappable },
        with: {
            "wasi:nn/graph.graph": super::Graph,
            "wasi:nn/tensor.tensor": super::Tensor,
            "wasi:nn/inference.graph-execution-context": super::ExecContext,
            "wasi:nn/errors.error": super::Error,
        },
    });
}

use bindings::wasi::nn::errors::ErrorCode;
use bindings::wasi::nn::graph::{ExecutionTarget, GraphEncoding};
use bindings::wasi::nn::tensor::TensorType;

/// A tensor a guest made or received.
pub struct Tensor {
    dimensions: Vec<u32>,
    ty: TensorType,
    data: Vec<u8>,
    /// Its bytes, charged to the instance.
    _charge: Charge,
}

/// A loaded model and the settings its contexts start with.
pub struct Graph {
    model: GraphModel,
}

/// An execution context: the KV cache and the generation settings.
pub struct ExecContext(Context);

/// An error: its code and the host's explanation.
pub struct Error {
    code: ErrorCode,
    data: String,
}

/// The `wasi:nn` state of one component instance.
pub struct NnWit {
    models: Arc<Models>,
    quota: Quota,
}

impl NnWit {
    /// `wasi:nn` over `models` (their names are what `load-by-name` finds), charging what
    /// the guest makes to `quota`.
    pub fn new(models: Arc<Models>, quota: Quota) -> NnWit {
        NnWit { models, quota }
    }

    /// A tensor of `data`, charged to the instance.
    fn tensor(&self, dimensions: Vec<u32>, ty: TensorType, data: Vec<u8>) -> Result<Tensor, NnError> {
        let charge = self.quota.budget.charge(&format!("a tensor of {} bytes", data.len()), data.len() as u64)?;
        Ok(Tensor { dimensions, ty, data, _charge: charge })
    }
}

/// What the host functions work on: the instance's `wasi:nn` state and its resource table.
pub struct NnView<'a> {
    nn: &'a mut NnWit,
    table: &'a mut ResourceTable,
}

impl<'a> NnView<'a> {
    /// A view of `nn` whose resources live in `table`.
    pub fn new(nn: &'a mut NnWit, table: &'a mut ResourceTable) -> Self {
        NnView { nn, table }
    }
}

/// Adds `wasi:nn` to a component linker.
pub fn add_to_linker<T: 'static>(
    linker: &mut wasmtime::component::Linker<T>,
    f: fn(&mut T) -> NnView<'_>,
) -> wasmtime::Result<()> {
    struct HasNn;
    impl wasmtime::component::HasData for HasNn {
        type Data<'a> = NnView<'a>;
    }
    bindings::wasi::nn::errors::add_to_linker::<T, HasNn>(linker, f)?;
    bindings::wasi::nn::tensor::add_to_linker::<T, HasNn>(linker, f)?;
    bindings::wasi::nn::inference::add_to_linker::<T, HasNn>(linker, f)?;
    bindings::wasi::nn::graph::add_to_linker::<T, HasNn>(linker, f)?;
    Ok(())
}

fn code(e: NnErrno) -> ErrorCode {
    // The WIT interface has fewer codes than the core-module one.
    match e {
        NnErrno::InvalidArgument | NnErrno::MissingMemory => ErrorCode::InvalidArgument,
        NnErrno::InvalidEncoding => ErrorCode::InvalidEncoding,
        NnErrno::UnsupportedOperation => ErrorCode::UnsupportedOperation,
        NnErrno::TooLarge | NnErrno::ContextFull | NnErrno::PromptTooLong => ErrorCode::TooLarge,
        NnErrno::NotFound | NnErrno::ModelNotFound => ErrorCode::NotFound,
        NnErrno::Busy | NnErrno::RuntimeError => ErrorCode::RuntimeError,
        NnErrno::Success | NnErrno::EndOfSequence => ErrorCode::Unknown,
    }
}

type R<T> = wasmtime::Result<Result<T, Resource<Error>>>;

impl NnView<'_> {
    fn fail<T>(&mut self, e: NnError) -> R<T> {
        if let Some(why) = e.interrupted() {
            log::info!("wasi:nn: stopped: {why}");
            return Err(wasmtime::Trap::Interrupt.into());
        }
        log::info!("wasi:nn: {:?}: {}", e.kind, e.message);
        Ok(Err(self.table.push(Error { code: code(e.nn_errno()), data: e.message })?))
    }
}

impl bindings::wasi::nn::errors::Host for NnView<'_> {}

impl bindings::wasi::nn::errors::HostError for NnView<'_> {
    fn code(&mut self, e: Resource<Error>) -> wasmtime::Result<ErrorCode> {
        Ok(self.table.get(&e)?.code)
    }

    fn data(&mut self, e: Resource<Error>) -> wasmtime::Result<String> {
        Ok(self.table.get(&e)?.data.clone())
    }

    fn drop(&mut self, e: Resource<Error>) -> wasmtime::Result<()> {
        self.table.delete(e)?;
        Ok(())
    }
}

impl bindings::wasi::nn::tensor::Host for NnView<'_> {}

impl bindings::wasi::nn::tensor::HostTensor for NnView<'_> {
    fn new(&mut self, dimensions: Vec<u32>, ty: TensorType, data: Vec<u8>) -> wasmtime::Result<Resource<Tensor>> {
        // The interface has no error here: a tensor past the instance's limit stops it.
        let t = self.nn.tensor(dimensions, ty, data).map_err(|e| wasmtime::Error::msg(e.message))?;
        Ok(self.table.push(t)?)
    }

    fn dimensions(&mut self, t: Resource<Tensor>) -> wasmtime::Result<Vec<u32>> {
        Ok(self.table.get(&t)?.dimensions.clone())
    }

    fn ty(&mut self, t: Resource<Tensor>) -> wasmtime::Result<TensorType> {
        Ok(self.table.get(&t)?.ty)
    }

    fn data(&mut self, t: Resource<Tensor>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.table.get(&t)?.data.clone())
    }

    fn drop(&mut self, t: Resource<Tensor>) -> wasmtime::Result<()> {
        self.table.delete(t)?;
        Ok(())
    }
}

impl bindings::wasi::nn::graph::Host for NnView<'_> {
    fn load(
        &mut self,
        builders: Vec<Vec<u8>>,
        encoding: GraphEncoding,
        _target: ExecutionTarget,
    ) -> R<Resource<Graph>> {
        if !matches!(encoding, GraphEncoding::Ggml | GraphEncoding::Autodetect) {
            let msg = format!("graph encoding {encoding:?}: shoal runs GGML models");
            return self.fail(nn::e(Kind::InvalidEncoding, msg));
        }
        let Some(bytes) = builders.first().filter(|b| !b.is_empty()) else {
            return self.fail(nn::e(Kind::InvalidArgument, "no model bytes"));
        };
        // The bytes were copied out of the guest by the bindings; they are charged now.
        let loaded = self
            .nn
            .quota
            .budget
            .charge(&format!("a copy of the {} bytes of a model", bytes.len()), bytes.len() as u64)
            .and_then(|copy| {
                nn::model_from_bytes(
                    &self.nn.quota,
                    self.nn.models.engine(),
                    bytes.clone(),
                    copy,
                    Kind::InvalidArgument,
                )
            });
        match loaded {
            Ok(model) => Ok(Ok(self.table.push(Graph { model })?)),
            Err(e) => self.fail(e),
        }
    }

    fn load_by_name(&mut self, name: String) -> R<Resource<Graph>> {
        match nn::open_named(&self.nn.models, &name) {
            Ok(model) => Ok(Ok(self.table.push(Graph { model: GraphModel::shared(model) })?)),
            Err(e) => self.fail(e),
        }
    }
}

impl bindings::wasi::nn::graph::HostGraph for NnView<'_> {
    fn init_execution_context(&mut self, g: Resource<Graph>) -> R<Resource<ExecContext>> {
        let model = self.table.get(&g)?.model.clone();
        let quota = self.nn.quota.clone();
        Ok(Ok(self.table.push(ExecContext(Context::new(model, Options::default(), quota)))?))
    }

    fn drop(&mut self, g: Resource<Graph>) -> wasmtime::Result<()> {
        self.table.delete(g)?;
        Ok(())
    }
}

impl bindings::wasi::nn::inference::Host for NnView<'_> {}

impl bindings::wasi::nn::inference::HostGraphExecutionContext for NnView<'_> {
    fn compute(
        &mut self,
        ctx: Resource<ExecContext>,
        inputs: Vec<(String, Resource<Tensor>)>,
    ) -> R<Vec<(String, Resource<Tensor>)>> {
        let mut prompt = None;
        let mut metadata = None;
        for (name, t) in &inputs {
            let t = self.table.get(t)?;
            if t.ty != TensorType::U8 {
                let msg = format!("input `{name}` is {:?}; GGML takes U8 tensors (prompt, metadata)", t.ty);
                return self.fail(nn::e(Kind::InvalidArgument, msg));
            }
            match name.as_str() {
                "metadata" => metadata = Some(t.data.clone()),
                "prompt" => prompt = Some(t.data.clone()),
                _ if prompt.is_none() => prompt = Some(t.data.clone()),
                _ => log::info!("wasi:nn: input `{name}` ignored (GGML takes `prompt` and `metadata`)"),
            }
        }
        let Some(prompt) = prompt else {
            return self.fail(nn::e(Kind::InvalidArgument, "no prompt: pass a U8 tensor named `prompt`"));
        };
        if String::from_utf8(prompt.clone()).is_err() {
            return self.fail(nn::e(Kind::InvalidArgument, "the prompt is not UTF-8"));
        }
        let cx = &mut self.table.get_mut(&ctx)?.0;
        let r = (|| {
            if let Some(m) = &metadata {
                cx.options.apply(m)?;
            }
            cx.prompt = Some(prompt);
            nn::compute_context(cx)
        })();
        if let Err(e) = r {
            return self.fail(e);
        }
        let (text, meta) = (cx.output.clone(), nn::metadata(cx));
        let tensors = self
            .nn
            .tensor(vec![text.len() as u32], TensorType::U8, text)
            .and_then(|out| Ok((out, self.nn.tensor(vec![meta.len() as u32], TensorType::U8, meta)?)));
        let (out, counts) = match tensors {
            Ok(t) => t,
            Err(e) => return self.fail(e),
        };
        let out = self.table.push(out)?;
        let counts = self.table.push(counts)?;
        Ok(Ok(vec![("output".to_string(), out), ("metadata".to_string(), counts)]))
    }

    fn drop(&mut self, ctx: Resource<ExecContext>) -> wasmtime::Result<()> {
        self.table.delete(ctx)?;
        Ok(())
    }
}
