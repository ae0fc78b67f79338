#!/usr/bin/env bash
# The tiled prompt attention on the GPU machine, without SmolLM2: last-position logits of a
# 700-token prompt (two chunks) on the 1B shape, CUDA tiled vs CUDA per-token vs the CPU; then
# prefill at 4,096 and batched decode. Binaries: .dev/f/*.xz (batch, generate, logits,
# synth_weights).
set -u
B=/tmp/tb; mkdir -p $B
export XDG_CACHE_HOME=/tmp/shoal-cache RUST_LOG=${RUST_LOG:-warn}
for f in .dev/f/*.xz; do xz -dc $f > $B/$(basename $f .xz); done; chmod +x $B/*
[[ -f /tmp/l1b/tokenizer.json ]] || $B/synth_weights --out /tmp/l1b --shape llama-3.2-1b --dtype bf16 | tail -1
TOK=$(python3 -c 'print(",".join(str((i*7919+13)%128000+1) for i in range(700)))')
SHOAL_CUDA_TILED_ATTENTION=1 $B/logits --model-dir /tmp/l1b --out /tmp/tiled.f32 --tokens $TOK --prefill --continue 16 --backend cuda | cut -c1-300
SHOAL_CUDA_TILED_ATTENTION=0 $B/logits --model-dir /tmp/l1b --out /tmp/plain.f32 --tokens $TOK --prefill --continue 16 --backend cuda | cut -c1-300
$B/logits --model-dir /tmp/l1b --out /tmp/cpu.f32 --tokens $TOK --prefill --continue 16 --backend cpu | cut -c1-300
python3 - <<'PY'
import numpy as np
t, p, c = (np.fromfile(f"/tmp/{n}.f32", dtype=np.float32) for n in ("tiled", "plain", "cpu"))
rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
print({"tiled_vs_plain": rel(t, p), "tiled_vs_cpu": rel(t, c), "plain_vs_cpu": rel(p, c),
       "argmax": [int(t.argmax()), int(p.argmax()), int(c.argmax())]})
PY
$B/generate --model /tmp/l1b --backend cuda --prompt 4096 --gen 128 --repeat 3
SHOAL_CUDA_TILED_ATTENTION=0 $B/generate --model /tmp/l1b --backend cuda --prompt 4096 --gen 32 --repeat 1
$B/batch --model /tmp/l1b --backend cuda --n 1,16,64 --prompt 128 --gen 128
