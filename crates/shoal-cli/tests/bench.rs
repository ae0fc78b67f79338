//! `shoal bench`, run as users run it: one JSON object per measured run with the speeds, a
//! table otherwise, and clear refusals of a missing file and of more tokens than the
//! model's context. The runs need the default model (`scripts/fetch-model.sh`).

mod common;

use common::{model, shoal};
use serde_json::Value;

#[test]
fn bench_prints_one_json_object_per_run_with_both_speeds() {
    if model().is_none() {
        eprintln!("skipped: no SmolLM2 model (scripts/fetch-model.sh)");
        return;
    }
    let out = shoal()
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .args(["bench", "--backend", "cpu", "--prompt", "12", "--gen", "3", "--repeat", "2", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let runs: Vec<Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).expect("JSON")).collect();
    assert_eq!(runs.len(), 2, "{runs:?}");
    for (i, r) in runs.iter().enumerate() {
        assert_eq!(r["run"], i + 1);
        assert_eq!((r["prompt"].as_u64(), r["gen"].as_u64()), (Some(12), Some(3)));
        assert_eq!(r["backend"], "cpu");
        for k in ["prefill_tok_s", "decode_tok_s"] {
            let v = r[k].as_f64().unwrap_or_else(|| panic!("{k} missing in {r}"));
            assert!(v.is_finite() && v > 0.0, "{k} = {v}");
        }
    }
    // Prefill only: no decode speed, and the table has only the prompt's row.
    let out = shoal()
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .args(["bench", "--backend", "cpu", "--prompt", "8", "--gen", "0", "--repeat", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("pp8") && !table.contains("tg0"), "{table}");
}

#[test]
fn bench_refuses_a_missing_file_and_more_tokens_than_the_context() {
    let out = shoal().args(["bench", "--backend", "cpu", "--model", "/nonexistent/model.gguf"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/model.gguf: no such file"), "{err}");
    let out = shoal().args(["bench", "--repeat", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    if model().is_none() {
        eprintln!("skipped the context check: no SmolLM2 model (scripts/fetch-model.sh)");
        return;
    }
    let out = shoal()
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .args(["bench", "--backend", "cpu", "--prompt", "1000000", "--gen", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("past smollm2's context of 8192 tokens"), "{err}");
}

#[test]
fn bench_refuses_forged_truncated_and_empty_model_files_without_panicking() {
    let dir = std::env::temp_dir().join(format!("shoal-bench-files-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("not-a-model")).unwrap();
    let mut cases = vec![
        ("empty.gguf", Vec::new()),
        ("text.gguf", b"this is not a model\n".repeat(100)),
        // A GGUF header claiming 2^62 tensors and 2^62 metadata entries.
        (
            "forged.gguf",
            [&b"GGUF"[..], &3u32.to_le_bytes(), &(1u64 << 62).to_le_bytes(), &(1u64 << 62).to_le_bytes()].concat(),
        ),
    ];
    if let Some(real) = model() {
        // The real file cut off after its first 64 KiB: its header promises what is not there.
        let mut b = std::fs::read(real).unwrap();
        b.truncate(64 << 10);
        cases.push(("truncated.gguf", b));
    }
    let mut paths: Vec<_> = cases
        .into_iter()
        .map(|(name, bytes)| {
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        })
        .collect();
    paths.push(dir.join("not-a-model"));
    for p in paths {
        let t0 = std::time::Instant::now();
        let out = shoal()
            .args(["bench", "--backend", "cpu", "--prompt", "4", "--gen", "1", "--repeat", "1", "--model"])
            .arg(&p)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {err}", p.display());
        assert!(err.contains("shoal: error:") && !err.contains("panicked"), "{}: {err}", p.display());
        assert!(t0.elapsed() < std::time::Duration::from_secs(20), "{}: {:?}", p.display(), t0.elapsed());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
