#!/usr/bin/env bash
# A shorter GPU run for the batching issue after a change to the attention kernel: the 1B shape
# (synthetic bf16 weights) batched and at long context, a parked 4,096-token cache's unpark,
# then (PART=b, with SmolLM2's GGUF carried in parts as in scripts/gpu-batch.sh) the CUDA tests.
# Binaries: .dev/f/*.xz (test-cuda, batch, generate, snapshot) and .dev/prof/synth_weights.xz.
set -u
B=/tmp/fb; mkdir -p $B
export XDG_CACHE_HOME=/tmp/shoal-cache RUST_LOG=${RUST_LOG:-warn}
for f in .dev/f/*.xz .dev/prof/synth_weights.xz; do [[ -f $f ]] && xz -dc $f > $B/$(basename $f .xz); done
chmod +x $B/*
if [[ ${PART:-a} == a ]]; then
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
  cp .dev/p1/* /tmp/
  [[ -f /tmp/l1b/tokenizer.json ]] || $B/synth_weights --out /tmp/l1b --shape llama-3.2-1b --dtype bf16 | tail -1
  $B/batch --model /tmp/l1b --backend cuda --n 1,16,64 --prompt 128 --gen 128
  $B/generate --model /tmp/l1b --backend cuda --prompt 4096 --gen 128 --repeat 3
  $B/generate --model /tmp/l1b --backend cuda --prompt 128 --gen 128 --repeat 3
  $B/snapshot --model /tmp/l1b --backend cuda --tokens 512,4096 --repeat 3
  exit 0
fi
cat /tmp/smol.part00 /tmp/smol.part01 .dev/p3/smol.part02 > /tmp/smol.gguf
SHOAL_TEST_MODEL=/tmp/smol.gguf $B/test-cuda --test-threads=1 2>&1 | grep -v "^  \|^stack\|^note" | tail -30
$B/batch --model /tmp/smol.gguf --backend cuda --n 1,16,64 --prompt 128 --gen 128
