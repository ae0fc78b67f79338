//! OpenAI's own Python client (`openai`, installed by `scripts/setup.sh --test` into
//! `.cache/pyclient`) against `shoal serve` on the CPU: every field and endpoint the daemon
//! honours, as the client sends them (`tests/openai_client.py`). Needs the default model.

mod common;

use std::path::Path;
use std::process::Command;

use common::{model, start, tmp};

#[test]
fn the_openai_python_client_gets_what_it_asks_for() {
    if model().is_none() {
        eprintln!("skipping: no default model; run scripts/fetch-model.sh");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let pyclient = root.join(".cache/pyclient");
    assert!(
        pyclient.join("openai").is_dir(),
        "OpenAI's Python client is not installed in {}: run scripts/setup.sh --test",
        pyclient.display()
    );
    let dir = tmp("openai-client");
    let d = start(&dir.join("store"), None, &[]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(&d.addr)
        .env("PYTHONPATH", &pyclient)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(out.status.success(), "the client's checks failed:\n{stderr}\ndaemon:\n{}", d.stderr());
    assert!(stdout.contains("checks passed"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}
