#!/usr/bin/env bash
# The GPU machine's part of the batching work (issue: many actors, one GPU), in two calls
# within 30 s of each other (the machine stays warm between them):
#   PART=a: unpack the binaries (.dev/engine.tar.xz, scripts/gpu-pack.sh engine), start
#           llama.cpp's build in the background (its source tarball in .dev/peers), keep
#           the first third of SmolLM2's GGUF (.dev/p1), and measure the 1B shape (synthetic
#           bf16 weights) with the batch bench;
#   PART=b: the rest of the GGUF (/tmp/smol.part01 from a call that carried .dev/p2, and
#           .dev/p3); the CUDA tests (batched equals alone); SmolLM2
#           natively and as chat actors in the daemon; then llama.cpp's batched decode on the
#           same weights, once its build is done.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT" /tmp/shoal-bin
B=/tmp/shoal-bin
export XDG_CACHE_HOME=/tmp/shoal-cache RUST_LOG=${RUST_LOG:-warn}
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
NS=${NS:-1,4,16,64,256}
if [[ ${PART:-a} == a ]]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nproc; date -u
  tar -xJf .dev/engine.tar.xz -C $B
  cp .dev/p1/* /tmp/
  step "synthetic weights: Llama-3.2-1B shape (bf16)"
  [[ -f /tmp/l1b/tokenizer.json ]] || $B/synth_weights --out /tmp/l1b --shape llama-3.2-1b --dtype bf16 | tail -1
  step "batch bench, 1B shape, CUDA"
  $B/batch --model /tmp/l1b --backend cuda --n $NS --prompt 128 --gen 128 | tee -a "$OUT/batch.jsonl"
  # llama.cpp builds while the next calls run (its build would slow the measurement above).
  if [[ ! -x /tmp/lc/llama.cpp/build/bin/llama-batched-bench ]]; then
    mkdir -p /tmp/lc && tar -xJf .dev/peers/llama.cpp-src.tar.xz -C /tmp/lc && cp scripts/hf2gguf_bf16.py /tmp/
    (cd /tmp/lc/llama.cpp && setsid nohup bash -c 'cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_APP=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >/tmp/lc/cmake.log 2>&1 \
      && cmake --build build -j 12 --target llama-bench llama-batched-bench >/tmp/lc/build.log 2>&1; echo done >/tmp/lc/status' \
      </dev/null >/dev/null 2>&1 &)
  fi
  exit 0
fi
cat /tmp/smol.part00 /tmp/smol.part01 .dev/p3/smol.part02 > /tmp/smol.gguf
SMOL=/tmp/smol.gguf
ls -la $SMOL
step "CUDA tests (batched equals alone, the KV pool, CUDA against the CPU)"
SHOAL_TEST_MODEL=$SMOL $B/test-cuda --test-threads=1 2>&1 | grep -v "^  \|^stack\|^note" | tail -40
step "batch bench, SmolLM2 Q4_1, CUDA"
$B/batch --model $SMOL --backend cuda --n $NS --prompt 128 --gen 128 | tee -a "$OUT/batch.jsonl"
step "chat actors in the daemon, SmolLM2, CUDA"
timeout 200 python3 scripts/daemon_batch.py $B/shoal $SMOL cuda ${DAEMON_NS:-1,16,64} 128 | tee -a "$OUT/daemon.jsonl"
step "llama.cpp build"
for i in $(seq 1 60); do [[ -f /tmp/lc/status ]] && break; sleep 5; done
tail -3 /tmp/lc/build.log
LB=/tmp/lc/llama.cpp/build/bin
if [[ -x $LB/llama-batched-bench ]]; then
  [[ -f /tmp/l1b-bf16.gguf ]] || GGUF_PY=/tmp/lc/llama.cpp/gguf-py python3 /tmp/hf2gguf_bf16.py /tmp/l1b /tmp/l1b-bf16.gguf | tail -1
  for M in /tmp/l1b-bf16.gguf $SMOL; do
    step "llama-batched-bench $M"
    $LB/llama-batched-bench -m $M -c 65536 -b 2048 -ub 512 -npp 128 -ntg 128 -npl ${NS//,/,} -ngl 99 -fa on 2>&1 | grep -E "^\|" | tee -a "$OUT/llama-batched.txt"
  done
  step "llama-bench, 1B shape: prefill 4096, decode 128"
  $LB/llama-bench -m /tmp/l1b-bf16.gguf -p 4096 -n 128 -r 3 -ngl 99 -fa on 2>&1 | grep -E "^\|" | tee -a "$OUT/llama-bench.txt"
fi
step "shoal, 1B shape: prefill 4096 then decode 128 (batch 1), and decode at a context of 128"
$B/generate --model /tmp/l1b --backend cuda --prompt 4096 --gen 128 --repeat 3 | tee -a "$OUT/generate.jsonl"
$B/generate --model /tmp/l1b --backend cuda --prompt 128 --gen 128 --repeat 3 | tee -a "$OUT/generate.jsonl"
