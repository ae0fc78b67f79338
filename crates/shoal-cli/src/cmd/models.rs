//! `shoal models [--json]`: the models in the models directories, with what their GGUF
//! headers say (read with the engine's checked reader: a file that does not parse is listed
//! with its error).

use std::path::{Path, PathBuf};

use serde::Serialize;
use shoal_engine::gguf::GgufFile;

/// Flags of `shoal models`.
#[derive(clap::Args)]
pub struct Args {
    /// One JSON object per model instead of the table.
    #[arg(long)]
    json: bool,
}

/// The most entries read from one directory (a directory of thousands is listed in part).
const MAX_ENTRIES: usize = 1000;

/// One model file.
#[derive(Serialize)]
struct Row {
    name: String,
    path: PathBuf,
    size_bytes: u64,
    architecture: Option<String>,
    quantization: Option<String>,
    error: Option<String>,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let dirs = shoal_host::model_dirs();
    let mut rows = Vec::new();
    for d in dirs.iter().filter(|d| d.is_dir()) {
        rows.extend(list(d));
    }
    if a.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(0);
    }
    let shown: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    if rows.is_empty() {
        eprintln!("shoal models: no models in {}; fetch one with `shoal pull smollm2`", shown.join(", "));
        return Ok(0);
    }
    println!("{:<24} {:>9}  {:<10} {:<8} PATH", "NAME", "SIZE", "ARCH", "QUANT");
    for r in &rows {
        let size = format!("{:.1} MB", r.size_bytes as f64 / 1e6);
        match &r.error {
            None => println!(
                "{:<24} {size:>9}  {:<10} {:<8} {}",
                r.name,
                r.architecture.as_deref().unwrap_or("?"),
                r.quantization.as_deref().unwrap_or("?"),
                r.path.display()
            ),
            Some(e) => println!("{:<24} {size:>9}  (unreadable: {e}) {}", r.name, r.path.display()),
        }
    }
    eprintln!("(looked in {}; `--model NAME` opens them by name)", shown.join(", "));
    Ok(0)
}

/// The `.gguf` files of `dir`, by file name.
fn list(dir: &Path) -> Vec<Row> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut paths: Vec<PathBuf> = entries
        .take(MAX_ENTRIES)
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let f = p.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            f.ends_with(".gguf") && !f.starts_with('.')
        })
        .collect();
    paths.sort();
    paths.into_iter().map(|p| row(&p)).collect()
}

fn row(path: &Path) -> Row {
    let mut r = Row {
        name: crate::catalog::name_of(path),
        path: path.to_path_buf(),
        size_bytes: 0,
        architecture: None,
        quantization: None,
        error: None,
    };
    match std::fs::metadata(path) {
        // Only regular files are opened: a FIFO would block, a device never end.
        Ok(m) if m.is_file() => r.size_bytes = m.len(),
        Ok(_) => {
            r.error = Some("not a regular file".into());
            return r;
        }
        Err(e) => {
            r.error = Some(e.to_string());
            return r;
        }
    }
    match GgufFile::open(path) {
        Ok(f) => {
            r.architecture = f.architecture().ok().map(str::to_string);
            r.quantization = quantization(&f);
        }
        Err(e) => r.error = Some(e.to_string()),
    }
    r
}

/// The type most of the weights are stored in (by elements, over the matrices), e.g. `Q4_1`.
fn quantization(f: &GgufFile) -> Option<String> {
    let mut by_type: Vec<(shoal_engine::gguf::GgmlType, u64)> = Vec::new();
    for t in f.tensors.iter().filter(|t| t.dims.len() >= 2) {
        match by_type.iter_mut().find(|(ty, _)| *ty == t.ggml_type) {
            Some((_, n)) => *n = n.saturating_add(t.n_elements()),
            None => by_type.push((t.ggml_type, t.n_elements())),
        }
    }
    by_type.into_iter().max_by_key(|(_, n)| *n).map(|(ty, _)| ty.to_string())
}
