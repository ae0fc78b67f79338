#!/usr/bin/env bash
# Builds, here, everything scripts/gpu-run.sh runs on the GPU machine, stripped and
# packed into .dev/bin.tar.xz (the GPU machine has no Rust).
set -euo pipefail
cd "$(dirname "$0")/.."
artifact() { # cargo JSON on stdin -> executable of target $1
  python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]==sys.argv[1] and m.get("executable"): print(m["executable"])' "$1"
}
if [[ "${1:-}" == engine ]]; then
  # The engine's examples and bench, the CLI and the chat guest: scripts/gpu-engine.sh.
  cargo build --release -p shoal-cli
  stage=$(mktemp -d)
  for ex in logits synth_weights gguf_to_hf; do
    cp "$(cargo build --release -p shoal-engine --example $ex --message-format=json 2>/dev/null | artifact $ex)" "$stage/"
  done
  cp "$(cargo bench --no-run -p shoal-engine --bench generate --message-format=json 2>/dev/null | artifact generate)" "$stage/generate"
  cp "$(cargo bench --no-run -p shoal-engine --bench batch --message-format=json 2>/dev/null | artifact batch)" "$stage/batch"
  cp "$(cargo bench --no-run -p shoal-host --bench nn_ttft --message-format=json 2>/dev/null | artifact nn_ttft)" "$stage/nn_ttft"
  cp "$(cargo bench --no-run -p shoal-actor --bench snapshot --message-format=json 2>/dev/null | artifact snapshot)" "$stage/snapshot"
  cp "$(cargo test --release --no-run -p shoal-engine --test cuda --message-format=json 2>/dev/null | artifact cuda)" "$stage/test-cuda"
  cp "$(cargo test --release --no-run -p shoal-engine --test cuda_device --message-format=json 2>/dev/null | artifact cuda_device)" "$stage/test-cuda_device"
  cp target/release/shoal "$stage/"
  cp target/guests/wasm32-wasip1/release/{chat,nnchat}.wasm "$stage/"
  strip "$stage"/logits "$stage"/synth_weights "$stage"/gguf_to_hf "$stage"/generate "$stage"/batch "$stage"/nn_ttft "$stage"/snapshot "$stage"/shoal "$stage"/test-cuda "$stage"/test-cuda_device
  mkdir -p .dev
  tar -cJf .dev/engine.tar.xz -C "$stage" .
  rm -rf "$stage"
  ls -la .dev/engine.tar.xz
  exit 0
fi
cargo build --release -p shoal-cli
stage=$(mktemp -d)
cp target/release/shoal "$stage/"
cp target/guests/wasm32-wasip1/release/{gemm,xfer}.wasm "$stage/"
bench=$(cargo bench --no-run -p shoal-gpu --bench cuda_gemm --message-format=json 2>/dev/null | artifact cuda_gemm)
cp "$bench" "$stage/cuda_gemm"
cargo test --release --no-run --workspace --message-format=json 2>/dev/null | python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["test"]:
        print(m["target"]["name"], m["executable"])' | while read -r name exe; do
  cp "$exe" "$stage/test-$name"
done
strip "$stage"/shoal "$stage"/cuda_gemm "$stage"/test-*
mkdir -p .dev
tar -cJf .dev/bin.tar.xz -C "$stage" .
rm -rf "$stage"
ls -la .dev/bin.tar.xz
