#!/usr/bin/env bash
# The GPU machine's part of the engine work (issue: LLM inference), in one call:
# CPU vs CUDA vs transformers logits, and the prefill/decode benchmarks of
# docs/benchmarks.md. Binaries come prebuilt in .dev/engine.tar.xz (scripts/gpu-pack.sh
# engine). SmolLM2 is used when models/ or .dev/ holds its GGUF.
# Env: PARTS="test nn actors check bench hf" (default all), OUT (default ./gpu-out), HF_MODES
# (default "eager compiled-default"; "compiled" is reduce-overhead), BENCH_MODELS (default
# "l1b smol": which models "bench" and "hf" measure). A device call lasts at most 600 s:
# run the parts in two calls (e.g. "test nn check", then "bench hf").
set -u
OUT=${OUT:-gpu-out}
PARTS=${PARTS:-test nn actors check bench hf}
BENCH_MODELS=${BENCH_MODELS:-l1b smol}
mkdir -p "$OUT" /tmp/shoal-bin
tar -xJf .dev/engine.tar.xz -C /tmp/shoal-bin
B=/tmp/shoal-bin
export XDG_CACHE_HOME=/tmp/shoal-cache RUST_LOG=${RUST_LOG:-warn}
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
has() { [[ " $PARTS " == *" $1 "* ]]; }
bench_on() { [[ " $BENCH_MODELS " == *" $1 "* ]]; }
step "machine (results also in results.txt)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
nproc; date -u
SMOL=""
for f in models/SmolLM2-135M-Instruct.Q4_1.gguf .dev/SmolLM2-135M-Instruct.Q4_1.gguf; do [[ -f $f ]] && SMOL=$f; done
# The GGUF is larger than one call may carry: its parts come in successive calls (each
# copied to /tmp by the call that carried it: .m1/smol.part1, .m2/smol.part2, then this
# call's .dev/smol.part3).
if [[ -z $SMOL && -f /tmp/smol.part1 && -f /tmp/smol.part2 && -f .dev/smol.part3 ]]; then
  cat /tmp/smol.part1 /tmp/smol.part2 .dev/smol.part3 > /tmp/smol.gguf && SMOL=/tmp/smol.gguf
fi
[[ -z $SMOL && -f /tmp/smol.gguf ]] && SMOL=/tmp/smol.gguf
echo "SmolLM2: ${SMOL:-absent}"

step "synthetic weights: tiny and Llama-3.2-1B shape (bf16)"
[[ -f /tmp/tiny/config.json ]] || $B/synth_weights --out /tmp/tiny --shape tiny --dtype bf16 >/dev/null
[[ -f /tmp/l1b/tokenizer.json ]] || $B/synth_weights --out /tmp/l1b --shape llama-3.2-1b --dtype bf16 | tail -1
TOK=1,450,7,1023,88,12000,5,640,31,2,77,901,4000,15,16,17

if has test && [[ -n $SMOL ]]; then
  step "tests: the CUDA engine against the CPU, the KV pool"
  SHOAL_TEST_MODEL=$SMOL $B/test-cuda --test-threads=1 2>&1 | tail -12
  step "shoal chat and shoal demo on CUDA"
  mkdir -p /tmp/models && cp -f $SMOL /tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf
  SHOAL_MODELS=/tmp/models $B/shoal chat --model smollm2 --backend cuda --temperature 0 --max-tokens 24 --prompt "What is the capital of France?" --stats
  SHOAL_MODELS=/tmp/models $B/shoal demo chat --backend cuda --json | tee "$OUT/demo-chat-cuda.json"
  step "shoal chat sampling on the GPU (temperature 0.7, top-k 40): the same seed gives the same answer"
  for i in 1 2; do SHOAL_MODELS=/tmp/models $B/shoal chat --backend cuda --seed 5 --max-tokens 40 --prompt "Write one sentence about the sea." | md5sum; done
  SHOAL_MODELS=/tmp/models $B/shoal chat --backend cuda --seed 5 --max-tokens 40 --prompt "Write one sentence about the sea."
fi

if has nn && [[ -n $SMOL ]]; then
  step "wasi-nn: the wasmedge-wasi-nn guest on CUDA, and multi-turn time to first token"
  $B/shoal run --backend cuda --nn-preload default:GGML:AUTO:$SMOL $B/nnchat.wasm -- --temperature 0 --prompt "What is the capital of France?" --prompt "And of Germany?"
  $B/nn_ttft --model $SMOL --backend cuda --history 2000 --turns 4 --n-predict 16 | tee -a "$OUT/nn-ttft.jsonl"
  $B/nn_ttft --model $SMOL --backend cuda --history 100 --turns 4 --n-predict 16 | tee -a "$OUT/nn-ttft.jsonl"
fi

if has actors && [[ -n $SMOL ]]; then
  step "actors: snapshot and restore vs re-prefill on CUDA (SmolLM2, then the 1B shape)"
  $B/snapshot --model $SMOL --backend cuda --tokens 24,512,4096 --repeat 5 | sed 's/"bench":"snapshot"/"bench":"snapshot","model":"smollm2"/' | tee -a "$OUT/actors.jsonl"
  $B/snapshot --model /tmp/l1b --backend cuda --tokens 24,512,4096 --repeat 3 | sed 's/"bench":"snapshot"/"bench":"snapshot","model":"l1b"/' | tee -a "$OUT/actors.jsonl"
  step "an idle 16 MiB actor without the pool of released memories (SHOAL_MEMORY_POOL_MB=0)"
  SHOAL_MEMORY_POOL_MB=0 $B/snapshot --model /tmp/tiny --backend cuda --tokens 24 --repeat 5 | grep idle | sed 's/"idle-actor"/"idle-actor","pool":"off"/' | tee -a "$OUT/actors.jsonl"
  step "pinned host <-> GPU bandwidth (what bounds park and unpark)"
  python3 scripts/pinned_bw.py | tee -a "$OUT/actors.jsonl"
  step "a chat moved between backends: CUDA -> CPU -> CUDA, against one that never stopped"
  export SHOAL_MODELS=/tmp/models; mkdir -p /tmp/models && cp -f $SMOL /tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf
  Q=(--temperature 0 --max-tokens 24)
  $B/shoal chat --backend cuda "${Q[@]}" --prompt "What is the capital of France?" --prompt "And of Germany?" --prompt "And of Italy?" > /tmp/straight.txt
  rm -rf /tmp/mv; $B/shoal chat --backend cuda "${Q[@]}" --prompt "What is the capital of France?" --save /tmp/mv > /tmp/m1.txt
  $B/shoal chat --backend cpu --prompt "And of Germany?" --resume /tmp/mv --save /tmp/mv > /tmp/m2.txt
  $B/shoal chat --backend cuda --prompt "And of Italy?" --resume /tmp/mv > /tmp/m3.txt
  cat /tmp/straight.txt; echo "--- moved:"; cat /tmp/m1.txt /tmp/m2.txt /tmp/m3.txt
  if cat /tmp/m1.txt /tmp/m2.txt /tmp/m3.txt | cmp -s - /tmp/straight.txt; then r=identical; else r=DIFFERENT; fi
  echo "{\"bench\":\"move\",\"path\":\"cuda-cpu-cuda\",\"answers\":\"$r\"}" | tee -a "$OUT/actors.jsonl"
  step "a live actor moved CUDA -> CPU -> CUDA inside the daemon (shoal move)"
  $B/shoal serve --backend cuda --addr 127.0.0.1:7455 --store /tmp/st 2>/tmp/serve.log & sp=$!
  sleep 4; export SHOAL_ADDR=127.0.0.1:7455
  id=$($B/shoal spawn chat -- --temperature 0 --max-tokens 24)
  { $B/shoal send $id "What is the capital of France?"; $B/shoal move $id --backend cpu >&2; $B/shoal ps >&2
    $B/shoal send $id "And of Germany?"; $B/shoal move $id --backend cuda >&2
    $B/shoal send $id "And of Italy?"; } > /tmp/d.txt
  kill $sp; unset SHOAL_ADDR; cat /tmp/d.txt
  if cmp -s /tmp/d.txt /tmp/straight.txt; then r=identical; else r=DIFFERENT; fi
  echo "{\"bench\":\"move\",\"path\":\"daemon cuda-cpu-cuda\",\"answers\":\"$r\"}" | tee -a "$OUT/actors.jsonl"
  unset SHOAL_MODELS
  step "64 chat actors on one daemon, messaged at once (CUDA)"
  python3 scripts/many_actors.py $B/shoal $SMOL 64 cuda | tee -a "$OUT/actors.jsonl"
fi

if has check; then
  for m in tiny l1b; do
    TOK=1,450,7,1023,88,12000,5,640,31,2,77,901,4000,15,16,17
    [[ $m == tiny ]] && TOK=1,45,7,102,88,120,5,64,31,2,77,90,40,15,16,17
    step "logits $m: cpu (one token at a time), cuda (one at a time), cuda (prefill)"
    g=$($B/logits --model-dir /tmp/$m --out /tmp/$m-cuda.f32 --tokens $TOK --continue 32 --backend cuda); echo "$g"
    p=$($B/logits --model-dir /tmp/$m --out /tmp/$m-cudap.f32 --tokens $TOK --continue 32 --backend cuda --prefill); echo "$p"
    # The CPU side of the 1B model is slow (about a minute); CPU_1B=1 runs it too.
    if [[ $m == tiny || ${CPU_1B:-0} == 1 ]]; then
      c=$($B/logits --model-dir /tmp/$m --out /tmp/$m-cpu.f32 --tokens $TOK --continue 32 --backend cpu); echo "$c"
      python3 scripts/compare_logits.py /tmp/$m-cpu.f32 "$c" /tmp/$m-cuda.f32 "$g" | tee "$OUT/cpu-vs-cuda-$m.json"
      python3 scripts/compare_logits.py /tmp/$m-cpu.f32 "$c" /tmp/$m-cudap.f32 "$p" | tee "$OUT/cpu-vs-cuda-prefill-$m.json"
    fi
    if has hf; then
      timeout 180 python3 scripts/hf_compare.py /tmp/$m /tmp/$m-cuda.f32 "$g" 2>/dev/null | tee "$OUT/hf-vs-cuda-$m.json"
      timeout 180 python3 scripts/hf_compare.py /tmp/$m /tmp/$m-cudap.f32 "$p" 2>/dev/null | tee "$OUT/hf-vs-cuda-prefill-$m.json"
    fi
  done
  if [[ -n $SMOL ]]; then
    step "SmolLM2: cpu vs cuda, and cuda vs transformers on the same (dequantized, bf16) weights"
    [[ -f /tmp/smolhf/config.json ]] || $B/gguf_to_hf $SMOL /tmp/smolhf
    c=$($B/logits --model-dir $SMOL --out /tmp/s-cpu.f32 --tokens $TOK --continue 32 --backend cpu); echo "$c"
    g=$($B/logits --model-dir $SMOL --out /tmp/s-cuda.f32 --tokens $TOK --continue 32 --backend cuda); echo "$g"
    python3 scripts/compare_logits.py /tmp/s-cpu.f32 "$c" /tmp/s-cuda.f32 "$g" | tee "$OUT/cpu-vs-cuda-smollm2.json"
    if has hf; then
      h=$($B/logits --model-dir /tmp/smolhf --out /tmp/sh-cuda.f32 --tokens $TOK --continue 32 --backend cuda); echo "$h"
      timeout 180 python3 scripts/hf_compare.py /tmp/smolhf /tmp/sh-cuda.f32 "$h" 2>/dev/null | tee "$OUT/hf-vs-cuda-smollm2.json"
    fi
  fi
fi

if has bench; then
  step "bench: native engine on cuda"
  bench_on l1b && $B/generate --model /tmp/l1b --backend cuda --prompt 128 --gen 128 --repeat 5 | tee -a "$OUT/native.jsonl"
  [[ -n $SMOL ]] && bench_on smol && $B/generate --model $SMOL --backend cuda --prompt 128 --gen 128 --repeat 5 | tee -a "$OUT/native.jsonl"
  bench_on l1b && SHOAL_CUDA_GRAPHS=0 $B/generate --model /tmp/l1b --backend cuda --prompt 128 --gen 128 --repeat 3 | sed 's/"native"/"native-nographs"/' | tee -a "$OUT/native.jsonl"
  if [[ -x $B/shoal && -f $B/chat.wasm ]]; then
    step "bench: the same from a Wasm guest"
    bench_on l1b && $B/shoal run --backend cuda --model l1b=/tmp/l1b $B/chat.wasm -- --bench --model l1b --prompt-tokens 128 --gen 128 --repeat 5 | tee -a "$OUT/guest.jsonl"
    [[ -n $SMOL ]] && bench_on smol && $B/shoal run --backend cuda --model smollm2=$SMOL $B/chat.wasm -- --bench --model smollm2 --prompt-tokens 128 --gen 128 --repeat 5 | tee -a "$OUT/guest.jsonl"
  fi
  step "memory bandwidth (for the roofline)"
  python3 - <<'PY' | tee "$OUT/bandwidth.json"
import torch, json
x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
ts = []
for _ in range(10):
    s.record(); y.copy_(x); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e) / 1e3)
ts.sort(); t = ts[len(ts) // 2]
print(json.dumps({"copy_bytes": 2 * x.numel(), "median_s": t, "bandwidth_GBps": round(2 * x.numel() / t / 1e9, 1)}))
PY
fi
if has hf; then
  step "bench: transformers (bf16, cuda)"
  # Each mode in its own process with a time limit: torch.compile can take minutes.
  bench_on l1b && for mode in ${HF_MODES:-eager compiled-default}; do
    timeout 240 python3 scripts/hf_bench.py /tmp/l1b --modes $mode --prompt 128 --gen 128 --repeat 5 2>&1 | grep '^{' | tee -a "$OUT/transformers.jsonl"
  done
  if [[ -n $SMOL ]] && bench_on smol; then
    [[ -f /tmp/smolhf/config.json ]] || $B/gguf_to_hf $SMOL /tmp/smolhf
    for mode in ${HF_MODES:-eager compiled-default}; do
      timeout ${HF_TIMEOUT:-240} python3 scripts/hf_bench.py /tmp/smolhf --modes $mode --prompt 128 --gen 128 --repeat 5 2>&1 | grep '^{' | tee -a "$OUT/transformers.jsonl"
    done
  fi
fi
# Few files come back from the GPU machine: gather the results in one.
for f in "$OUT"/*.json "$OUT"/*.jsonl; do [[ -f $f ]] && { echo "# $(basename "$f")"; cat "$f"; }; done > /tmp/results.txt
rm -f "$OUT"/*.json "$OUT"/*.jsonl; mv /tmp/results.txt "$OUT/results.txt"
step done
