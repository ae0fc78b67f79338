#!/usr/bin/env bash
# The GPU machine's part of shoal's CUDA work, in one call: checks, tests,
# compute-sanitizer, and the benchmarks of docs/benchmarks.md. It runs from the
# repository root on a machine with an NVIDIA GPU and no Rust: the binaries come
# prebuilt in .dev/bin.tar.xz (scripts/gpu-pack.sh builds it here).
# Output: a log on stdout and raw files under $OUT (or ./gpu-out).
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT" /tmp/shoal-bin
tar -xJf .dev/bin.tar.xz -C /tmp/shoal-bin
B=/tmp/shoal-bin
export XDG_CACHE_HOME=/tmp/shoal-cache RUST_LOG=${RUST_LOG:-warn}
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
if [[ -d .gl ]]; then for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig; fi
export VK_DRIVER_FILES=${VK_DRIVER_FILES:-/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json}

step machine
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv | tee "$OUT/gpu.txt"
nproc; date -u

step "shoal devices"
$B/shoal devices

step "demo: gemm on cuda, 128 (json)"
$B/shoal demo gemm --backend cuda --size 128 --json | tee "$OUT/demo-cuda-128.json"
step "demo: gemm on cuda, 1024 2048 4096 (checked element by element in the guest)"
$B/shoal demo gemm --backend cuda --size 1024 --size 2048 --size 4096 --json
step "demo: async, and vulkan on the NVIDIA driver"
$B/shoal demo gemm --backend cuda --size 300 --async --json
$B/shoal demo gemm --backend vulkan --size 128 --size 1024 --json

if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  for t in $B/test-*; do
    step "test $(basename "$t")"
    "$t" --test-threads=2 2>&1 | tail -25
  done
  step "compute-sanitizer memcheck: adversarial guests on CUDA"
  SHOAL_TEST_BACKENDS=cuda compute-sanitizer --tool memcheck --leak-check no --error-exitcode 99 \
    $B/test-adversarial --test-threads=1 2>&1 | tail -15
  echo "compute-sanitizer exit: ${PIPESTATUS[0]}"
fi

if [[ "${SKIP_BENCH:-0}" != 1 ]]; then
  step "bench: raw CUDA transfer reference (nvcc)"
  nvcc -O3 -arch=sm_90 -o /tmp/xfer benches/cuda/xfer.cu && /tmp/xfer 30 | tee "$OUT/raw-xfer.jsonl"
  step "bench: the same round trips from a Wasm guest through shoal (scal, in place)"
  $B/shoal run --backend cuda $B/xfer.wasm -- --repeat 30 \
    --bytes 4096 --bytes 65536 --bytes 1048576 --bytes 4194304 --bytes 16777216 --bytes 67108864 --bytes 268435456 \
    | tee "$OUT/shoal-xfer.jsonl"
  step "bench: raw mapped in place, by launch size and page size"
  /tmp/xfer 20 sweep | tee "$OUT/raw-sweep.jsonl"
  step "bench: GEMM natively (shoal engine, raw cuBLAS)"
  $B/cuda_gemm --sizes 128,256,512,1024,2048,4096,8192 --repeat 10 | tee "$OUT/native-gemm.jsonl"
  step "bench: GEMM from a Wasm guest"
  $B/shoal run --backend cuda $B/gemm.wasm -- --bench 10 \
    --size 128 --size 256 --size 512 --size 1024 --size 2048 --size 4096 --size 8192 | tee "$OUT/guest-gemm.jsonl"
  step "bench: GEMM from a Wasm guest, operands in device buffers"
  $B/shoal run --backend cuda $B/gemm.wasm -- --bench 10 --device \
    --size 128 --size 256 --size 512 --size 1024 --size 2048 --size 4096 --size 8192 | tee "$OUT/guest-gemm-device.jsonl"
  step "demo: device buffers, checked"
  $B/shoal run --backend cuda $B/gemm.wasm -- --device --json --size 1000 --size 2048
fi
step done
