#!/usr/bin/env bash
# Builds, here, everything scripts/gpu-run.sh runs on the GPU machine, stripped and
# packed into .dev/bin.tar.xz (the GPU machine has no Rust).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p shoal-cli
stage=$(mktemp -d)
cp target/release/shoal "$stage/"
cp target/guests/wasm32-wasip1/release/{gemm,xfer}.wasm "$stage/"
bench=$(cargo bench --no-run -p shoal-gpu --bench cuda_gemm --message-format=json 2>/dev/null |
  python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="cuda_gemm" and m.get("executable"): print(m["executable"])')
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
