#!/usr/bin/env bash
# The chunked decode attention and the tensor-core prompt attention on the GPU machine:
# logits of a 700-token prompt (two chunks) and 16 decoded tokens, tensor cores vs the earlier
# tiled kernel vs the CPU, for heads of 64 (the 1B shape) and 128 values; then prefill and
# decode at 4,096 and 128 tokens of context, and batched decode. Binaries: .dev/f/*.xz.
set -u
B=/tmp/tb; mkdir -p $B
export XDG_CACHE_HOME=/tmp/shoal-cache RUST_LOG=${RUST_LOG:-warn}
for f in .dev/f/*.xz; do xz -dc $f > $B/$(basename $f .xz); done; chmod +x $B/*
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
[[ -f /tmp/l1b/tokenizer.json ]] || $B/synth_weights --out /tmp/l1b --shape llama-3.2-1b --dtype bf16 | tail -1
[[ -f /tmp/h128/tokenizer.json ]] || $B/synth_weights --out /tmp/h128 --shape heads-128 --dtype bf16 | tail -1
for m in l1b h128; do
  V=$([[ $m == l1b ]] && echo 128000 || echo 31000)
  TOK=$(python3 -c "print(','.join(str((i*7919+13)%$V+1) for i in range(700)))")
  $B/logits --model-dir /tmp/$m --out /tmp/mma.f32 --tokens $TOK --prefill --continue 16 --backend cuda | cut -c1-200
  SHOAL_CUDA_MMA_ATTENTION=0 $B/logits --model-dir /tmp/$m --out /tmp/tiled.f32 --tokens $TOK --prefill --continue 16 --backend cuda | cut -c1-200
  $B/logits --model-dir /tmp/$m --out /tmp/cpu.f32 --tokens $TOK --prefill --continue 16 --backend cpu | cut -c1-200
  python3 - <<'PY'
import numpy as np
t, p, c = (np.fromfile(f"/tmp/{n}.f32", dtype=np.float32) for n in ("mma", "tiled", "cpu"))
rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
print({"mma_vs_tiled": rel(t, p), "mma_vs_cpu": rel(t, c), "tiled_vs_cpu": rel(p, c),
       "argmax": [int(t.argmax()), int(p.argmax()), int(c.argmax())]})
PY
done
${PRE:-true}
$B/generate --model /tmp/l1b --backend cuda --prompt 4096 --gen 128 --repeat 3
$B/generate --model /tmp/l1b --backend cuda --prompt 128 --gen 128 --repeat 3
$B/batch --model /tmp/l1b --backend cuda --n ${NS:-1,16,64} --prompt 128 --gen 128
