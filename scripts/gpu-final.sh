#!/usr/bin/env bash
# The batching issue's figures in one lease, in calls less than 30 s apart (the machine stays
# warm between them); binaries from `scripts/gpu-pack.sh engine` (.dev/engine.tar.xz), the
# SmolLM2 GGUF in three parts (.dev/p1, .dev/p2, .dev/p3: one per call, as a call carries at
# most 64 MiB), llama.cpp's source in .dev/peers:
#   STEP=1 (carry .dev/peers .dev/p1): llama.cpp's build starts in the background; weights.
#   STEP=2 (carry .dev/p2): the second part.
#   STEP=3 (carry .dev/p3 .dev/engine.tar.xz): the GGUF whole; the CUDA tests (they do not
#           time anything, so the build beside them does not matter).
#   STEP=4: once llama.cpp is built: llama.cpp's batched decode, prefill and decode at depth.
#   STEP=5: shoal's: the batch bench (1B shape, SmolLM2), prefill/decode at 4,096 and 128 with
#           park/unpark, chat actors in the daemon (with 256 idle actors beside 64 active).
set -u
B=/tmp/fb; mkdir -p $B
export XDG_CACHE_HOME=/tmp/shoal-cache RUST_LOG=${RUST_LOG:-warn}
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
SMOL=/tmp/smol.gguf LB=/tmp/lc/llama.cpp/build/bin
case ${STEP:-1} in
1)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; date -u
  mkdir -p /tmp/lc && tar -xJf .dev/peers/llama.cpp-src.tar.xz -C /tmp/lc && cp scripts/hf2gguf_bf16.py /tmp/
  (cd /tmp/lc/llama.cpp && setsid nohup bash -c 'cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >/tmp/lc/cmake.log 2>&1 \
    && cmake --build build -j 14 --target llama-bench llama-batched-bench >/tmp/lc/build.log 2>&1; echo done >/tmp/lc/status' \
    </dev/null >/dev/null 2>&1 &)
  cp .dev/p1/* /tmp/ ;;
2) cp .dev/p2/* /tmp/ ;;
3)
  cat /tmp/smol.part00 /tmp/smol.part01 .dev/p3/smol.part02 > $SMOL && ls -la $SMOL
  tar -xJf .dev/engine.tar.xz -C $B
  [[ -f /tmp/l1b/tokenizer.json ]] || $B/synth_weights --out /tmp/l1b --shape llama-3.2-1b --dtype bf16 | tail -1
  step "CUDA tests"
  SHOAL_TEST_MODEL=$SMOL $B/test-cuda --test-threads=1 2>&1 | grep -v "^  \|^stack\|^note" | tail -30
  SHOAL_TEST_MODEL=$SMOL $B/test-cuda_device 2>&1 | grep -v "^  \|^stack\|^note" | tail -12 ;;
4)
  for i in $(seq 1 100); do [[ -f /tmp/lc/status ]] && break; sleep 5; done
  step "llama.cpp build"; tail -2 /tmp/lc/build.log
  [[ -f /tmp/l1b-bf16.gguf ]] || GGUF_PY=/tmp/lc/llama.cpp/gguf-py python3 /tmp/hf2gguf_bf16.py /tmp/l1b /tmp/l1b-bf16.gguf | tail -1
  for M in /tmp/l1b-bf16.gguf $SMOL; do
    step "llama-batched-bench $M"
    $LB/llama-batched-bench -m $M -c 65536 -b 2048 -ub 512 -npp 128 -ntg 128 -npl 1,4,16,64,256 -ngl 99 -fa on 2>&1 | grep -E "^\|"
  done
  step "llama-bench, 1B shape: prefill 4096, decode 128 at depth 0 and 4096"
  $LB/llama-bench -m /tmp/l1b-bf16.gguf -p 4096 -n 128 -r 3 -ngl 99 -fa on 2>&1 | grep -E "^\|"
  $LB/llama-bench -m /tmp/l1b-bf16.gguf -p 0 -n 128 -d 4096 -r 3 -ngl 99 -fa on 2>&1 | grep -E "^\|" ;;
5)
  step "shoal batch bench"
  $B/batch --model /tmp/l1b --backend cuda --n 1,4,16,64,256 --prompt 128 --gen 128
  $B/batch --model $SMOL --backend cuda --n 1,4,16,64,256 --prompt 128 --gen 128
  step "shoal generate, 1B shape: 4096 and 128 tokens of context (park/unpark of the prompt's cache)"
  $B/generate --model /tmp/l1b --backend cuda --prompt 4096 --gen 128 --repeat 3
  $B/generate --model /tmp/l1b --backend cuda --prompt 128 --gen 128 --repeat 3 ;;
6)
  # Output to files, not a pipe: a daemon left behind by `timeout` would hold a pipe open.
  # Fresh stores: actors checkpointed by an earlier run would come back and count.
  rm -rf /tmp/batch-store-*
  step "chat actors in the daemon, SmolLM2"
  timeout -k 5 250 python3 scripts/daemon_batch.py $B/shoal $SMOL cuda 1,16,64,256 128 >/tmp/daemon.txt 2>&1 </dev/null
  tail -c 3000 /tmp/daemon.txt; rm -rf /tmp/batch-store-*
  step "256 idle actors beside 64 active"
  IDLE=256 timeout -k 5 250 python3 scripts/daemon_batch.py $B/shoal $SMOL cuda 64 128 >/tmp/idle.txt 2>&1 </dev/null
  tail -c 1500 /tmp/idle.txt ;;
esac
