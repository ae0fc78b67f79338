//! Models loaded once per host, by name, and shared by every instance that opens them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use shoal_engine::gguf::GgufFile;
use shoal_engine::models::{EngineKind, Model};
use shoal_engine::template::{ChatTemplate, TemplateError};
use shoal_engine::tokenizer::Tokenizer;

/// The name of the built-in default model.
pub const DEFAULT_MODEL: &str = "smollm2";
/// Its file name (fetched by `shoal pull smollm2`, or `scripts/fetch-model.sh` into `models/`).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// A model ready to run: weights, tokenizer, chat template, stop tokens.
pub struct LoadedModel {
    /// The name guests open it by.
    pub name: String,
    /// Where it was loaded from.
    pub path: PathBuf,
    /// The network.
    pub llama: Model,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its chat template (ChatML when the file names none shoal knows).
    pub template: ChatTemplate,
    /// Tokens that end an assistant turn.
    pub stop: Vec<u32>,
    fingerprint: OnceLock<String>,
}

impl LoadedModel {
    /// A cheap identity of the model's files, which a snapshot records so that it is not
    /// resumed on other weights by mistake: hex SHA-256 over each file's name, length, and
    /// first and last MiB (a file or a Hugging Face directory's `.json` and `.safetensors`).
    pub fn fingerprint(&self) -> &str {
        self.fingerprint.get_or_init(|| fingerprint(&self.path).unwrap_or_else(|e| format!("unreadable: {e}")))
    }
}

fn fingerprint(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::{Read, Seek, SeekFrom};
    let mut files = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json" || x == "safetensors"))
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut h = sha2::Sha256::new();
    const MIB: u64 = 1 << 20;
    for f in files.drain(..) {
        let mut file = std::fs::File::open(&f)?;
        let len = file.metadata()?.len();
        h.update(f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
        h.update(len.to_le_bytes());
        let mut buf = vec![0u8; len.min(MIB) as usize];
        file.read_exact(&mut buf)?;
        h.update(&buf);
        if len > MIB {
            file.seek(SeekFrom::Start(len - len.min(MIB)))?;
            file.read_exact(&mut buf)?;
            h.update(&buf);
        }
    }
    Ok(crate::digest::hex(&h.finalize()))
}

struct Entry {
    path: PathBuf,
    loaded: OnceLock<Result<Arc<LoadedModel>, String>>,
}

/// The host's models by name; each is loaded on first open, once, on the registry's
/// engine backend.
pub struct Models {
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    engine: EngineKind,
}

impl Default for Models {
    fn default() -> Self {
        Models::with_engine(EngineKind::Cpu)
    }
}

impl std::fmt::Debug for Models {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        f.debug_map().entries(e.iter().map(|(k, v)| (k, &v.path))).finish()
    }
}

impl Models {
    /// No models; they will run on the CPU engine.
    pub fn new() -> Models {
        Models::default()
    }

    /// No models; they will run on `engine` (the CPU, or CUDA on an NVIDIA GPU).
    pub fn with_engine(engine: EngineKind) -> Models {
        Models { entries: Mutex::new(HashMap::new()), engine }
    }

    /// The backend models are loaded on.
    pub fn engine(&self) -> EngineKind {
        self.engine
    }

    /// Names `path` as `name` (loaded when first opened).
    pub fn add(&self, name: &str, path: &Path) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), Arc::new(Entry { path: path.to_path_buf(), loaded: OnceLock::new() }));
    }

    /// The names known, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.entries.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        v.sort();
        v
    }

    /// The model named `name`, loading it on first use.
    pub fn get(&self, name: &str) -> Result<Arc<LoadedModel>, String> {
        let entry = self.entries.lock().unwrap_or_else(|e| e.into_inner()).get(name).cloned();
        let entry = entry.ok_or_else(|| {
            format!("no model named `{name}` (known: {}); name one with --model NAME=PATH", self.names().join(", "))
        })?;
        entry.loaded.get_or_init(|| load(name, &entry.path, self.engine).map(Arc::new)).clone()
    }
}

fn load(name: &str, path: &Path, engine: EngineKind) -> Result<LoadedModel, String> {
    if !path.is_dir() {
        let file = GgufFile::open(path).map_err(|e| format!("model `{name}`: {e}"))?;
        return from_gguf(name, path, &file, engine);
    }
    // A Hugging Face directory: config.json, safetensors, tokenizer.json and the chat
    // template of tokenizer_config.json.
    let t0 = std::time::Instant::now();
    let what = |e: &dyn std::fmt::Display| format!("model `{name}` ({}): {e}", path.display());
    let llama = Model::load_safetensors(path, engine).map_err(|e| what(&e))?;
    let json =
        std::fs::read_to_string(path.join("tokenizer.json")).map_err(|e| what(&format!("tokenizer.json: {e}")))?;
    let mut tokenizer = Tokenizer::from_tokenizer_json(&json).map_err(|e| what(&e))?;
    // Small JSON files of the directory; a missing or unreadable one says nothing.
    let small_json = |file: &str| {
        let f = std::fs::File::open(path.join(file)).ok()?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(f, 4 << 20), &mut text).ok()?;
        serde_json::from_str::<serde_json::Value>(&text).ok()
    };
    let config = small_json("tokenizer_config.json");
    tokenizer.apply_hf_config(config.as_ref(), small_json("config.json").as_ref());
    let jinja = config.as_ref().and_then(|v| v.get("chat_template")).and_then(|t| t.as_str());
    let template = chat_template(name, jinja, &tokenizer).map_err(|e| what(&e))?;
    Ok(finish(name, path, llama, tokenizer, template, t0))
}

/// A model's chat template from its file's Jinja (see [`ChatTemplate::from_file`]); a file
/// without one gets ChatML, and a warning that says so.
fn chat_template(name: &str, jinja: Option<&str>, tokenizer: &Tokenizer) -> Result<ChatTemplate, TemplateError> {
    let text = |id: Option<u32>| id.and_then(|i| tokenizer.token_str(i)).unwrap_or_default().to_owned();
    match ChatTemplate::from_file(jinja, &text(tokenizer.bos()), &text(tokenizer.eos()))? {
        Some(t) => Ok(t),
        None => {
            log::warn!("model `{name}` carries no chat template: conversations are rendered as ChatML");
            Ok(ChatTemplate::chat_ml())
        }
    }
}

/// A model from a parsed GGUF file (`path` is where it came from, for messages).
fn from_gguf(name: &str, path: &Path, file: &GgufFile, engine: EngineKind) -> Result<LoadedModel, String> {
    let t0 = std::time::Instant::now();
    let what = |e: &dyn std::fmt::Display| format!("model `{name}` ({}): {e}", path.display());
    let llama = Model::load_gguf(file, engine).map_err(|e| what(&e))?;
    let tokenizer = Tokenizer::from_gguf(file).map_err(|e| what(&e))?;
    let jinja = file.get("tokenizer.chat_template").and_then(|v| v.as_str());
    let template = chat_template(name, jinja, &tokenizer).map_err(|e| what(&e))?;
    Ok(finish(name, path, llama, tokenizer, template, t0))
}

/// A model from GGUF bytes in memory (a guest's own model): checked as a file is, never
/// written anywhere, known by no name in the registry. Its weights take at most
/// [`weights_bytes`] of the parsed file.
pub fn from_gguf_bytes(name: &str, file: &GgufFile, engine: EngineKind) -> Result<LoadedModel, String> {
    from_gguf(name, Path::new("(bytes from the guest)"), file, engine)
}

/// The most bytes the weights of `file` take once loaded (f32 on the CPU; less on a GPU).
pub fn weights_bytes(file: &GgufFile) -> u64 {
    file.tensors.iter().fold(0u64, |acc, t| acc.saturating_add(t.n_elements().saturating_mul(4)))
}

fn finish(
    name: &str,
    path: &Path,
    llama: Model,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    t0: std::time::Instant,
) -> LoadedModel {
    let mut stop: Vec<u32> = template.stop_tokens().iter().filter_map(|s| tokenizer.token_id(s)).collect();
    stop.extend(tokenizer.eos());
    stop.dedup();
    log::info!("loaded model `{name}` from {} on {} in {:.2?}", path.display(), llama.backend_name(), t0.elapsed());
    LoadedModel {
        name: name.to_string(),
        path: path.to_path_buf(),
        llama,
        tokenizer,
        template,
        stop,
        fingerprint: OnceLock::new(),
    }
}

/// The user's models directory, where `shoal pull` puts models: `$SHOAL_MODELS` if set,
/// else `$XDG_DATA_HOME/shoal/models`, else `~/.local/share/shoal/models` (`None` without a
/// home directory). It may not exist yet.
pub fn user_models_dir() -> Option<PathBuf> {
    let set = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = set("SHOAL_MODELS") {
        return Some(d);
    }
    if let Some(d) = set("XDG_DATA_HOME").filter(|d| d.is_absolute()) {
        return Some(d.join("shoal").join("models"));
    }
    set("HOME").map(|h| h.join(".local").join("share").join("shoal").join("models"))
}

/// Where models are looked for by name, in order: the user's models directory
/// ([`user_models_dir`]), `./models`, and the `models/` of the checkout the executable was
/// built in (`target/release/shoal`, or a test or bench in `target/release/deps/`: a folder
/// with a `Cargo.toml` up to three levels above it).
/// Each directory once; some may not exist.
pub fn model_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = user_models_dir().into_iter().collect();
    dirs.push(std::env::current_dir().map_or_else(|_| PathBuf::from("models"), |d| d.join("models")));
    if let Ok(exe) = std::env::current_exe() {
        // Only a checkout's (a folder with a Cargo.toml): never `/tmp/models` or `/models`
        // above a binary installed elsewhere, which anyone could have filled.
        dirs.extend(
            exe.ancestors().skip(2).take(3).filter(|d| d.join("Cargo.toml").is_file()).map(|d| d.join("models")),
        );
    }
    let mut seen = Vec::new();
    dirs.retain(|d| {
        let key = d.canonicalize().unwrap_or_else(|_| d.clone());
        let new = !seen.contains(&key);
        seen.push(key);
        new
    });
    dirs
}

/// Where the default model is: the first of [`model_dirs`] that holds its file.
pub fn default_model_path() -> Option<PathBuf> {
    model_dirs().into_iter().map(|d| d.join(DEFAULT_MODEL_FILE)).find(|p| p.is_file())
}

/// The engine models run on when guests compute on `device`: CUDA on an NVIDIA GPU, else
/// the CPU (the engine has no Vulkan or Metal backend yet).
pub fn engine_for(device: &shoal_gpu::Device) -> EngineKind {
    match device.info().backend {
        shoal_gpu::BackendKind::Cuda => EngineKind::Cuda,
        _ => EngineKind::Cpu,
    }
}
