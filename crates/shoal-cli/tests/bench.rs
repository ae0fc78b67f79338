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
