#!/usr/bin/env bash
# A shorter GPU run for the batching issue (after scripts/gpu-batch.sh, once llama.cpp's figures
# of the same weights are taken): PART=a: the 1B shape (synthetic bf16 weights) batched, at long
# context, and a parked 4,096-token cache's unpark; PART=b (SmolLM2's GGUF carried in parts as in
# scripts/gpu-batch.sh): the CUDA tests, SmolLM2 batched, chat actors in the daemon.
# Binaries: .dev/engine.tar.xz (scripts/gpu-pack.sh engine).
set -u
B=/tmp/fb; mkdir -p $B
export XDG_CACHE_HOME=/tmp/shoal-cache RUST_LOG=${RUST_LOG:-warn}
[[ -f .dev/engine.tar.xz ]] && tar -xJf .dev/engine.tar.xz -C $B
if [[ ${PART:-a} == a ]]; then
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
  cp .dev/p1/* /tmp/
  [[ -f /tmp/l1b/tokenizer.json ]] || $B/synth_weights --out /tmp/l1b --shape llama-3.2-1b --dtype bf16 | tail -1
  $B/batch --model /tmp/l1b --backend cuda --n 1,4,16,64,256 --prompt 128 --gen 128
  $B/generate --model /tmp/l1b --backend cuda --prompt 4096 --gen 128 --repeat 3
  $B/generate --model /tmp/l1b --backend cuda --prompt 128 --gen 128 --repeat 3
  $B/snapshot --model /tmp/l1b --backend cuda --tokens 4096 --repeat 3 | grep '"snapshot"'
  exit 0
fi
cat /tmp/smol.part00 /tmp/smol.part01 .dev/p3/smol.part02 > /tmp/smol.gguf
SHOAL_TEST_MODEL=/tmp/smol.gguf $B/test-cuda --test-threads=1 2>&1 | grep -v "^  \|^stack\|^note" | tail -25
$B/batch --model /tmp/smol.gguf --backend cuda --n 1,4,16,64,256 --prompt 128 --gen 128
timeout 200 python3 scripts/daemon_batch.py $B/shoal /tmp/smol.gguf cuda 1,16,64,256 128
