#!/usr/bin/env bash
# After a change to the decode attention kernels' shared ending (write_split): CUDA against
# the CPU on three shapes, one per decode kernel (heads of 64: the 1B shape; 128; 16: `tiny`,
# the per-position kernel), a 700-token prompt (tiny: 200) and 16 greedy tokens; then decode
# speed at 4,096 and batched. Binaries: .dev/f/*.xz.
set -u
B=/tmp/tb; mkdir -p $B
export XDG_CACHE_HOME=/tmp/shoal-cache RUST_LOG=${RUST_LOG:-warn}
for f in .dev/f/*.xz; do xz -dc $f > $B/$(basename $f .xz); done; chmod +x $B/*
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
for s in llama-3.2-1b:l1b:128000:700 heads-128:h128:31000:700 tiny:tiny:290:200; do
  IFS=: read -r shape dir vocab n <<<"$s"
  [[ -f /tmp/$dir/tokenizer.json ]] || $B/synth_weights --out /tmp/$dir --shape $shape --dtype bf16 >/dev/null
  TOK=$(python3 -c "print(','.join(str((i*7919+13)%$vocab+1) for i in range($n)))")
  $B/logits --model-dir /tmp/$dir --out /tmp/g.f32 --tokens $TOK --prefill --continue 16 --backend cuda > /tmp/g.json
  $B/logits --model-dir /tmp/$dir --out /tmp/c.f32 --tokens $TOK --prefill --continue 16 --backend cpu > /tmp/c.json
  python3 - "$dir" <<'PY'
import json, sys, numpy as np
g, c = (np.fromfile(f"/tmp/{n}.f32", dtype=np.float32) for n in ("g", "c"))
tg, tc = (json.load(open(f"/tmp/{n}.json"))["tokens"] for n in ("g", "c"))
print({"shape": sys.argv[1], "cuda_vs_cpu": float(np.linalg.norm(g - c) / np.linalg.norm(c)),
       "same_tokens": tg == tc, "argmax": [int(g.argmax()), int(c.argmax())]})
PY
done
$B/generate --model /tmp/l1b --backend cuda --prompt 4096 --gen 128 --repeat 3
$B/batch --model /tmp/l1b --backend cuda --n 1,64 --prompt 128 --gen 128
