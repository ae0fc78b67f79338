#!/usr/bin/env bash
# The demo as a user runs it, checked: the GEMM guest on the Vulkan backend (lavapipe
# where there is no GPU) must be correct, in place, on every element; and on the CPU.
set -euo pipefail
shoal=${1:-target/release/shoal}
fail=0
for backend in vulkan cpu; do
  out=$("$shoal" demo gemm --backend "$backend" --size 128 --json)
  echo "$out"
  if ! grep -q '"correct":16384' <<<"$out" || ! grep -q '"in_place":true' <<<"$out"; then
    echo "check-demo: $backend did not give 16384/16384 correct in place" >&2
    fail=1
  fi
done
"$shoal" demo --size 200 --async >/dev/null || { echo "check-demo: the async demo failed" >&2; fail=1; }
answer=$("$shoal" chat --model smollm2 --backend cpu --temperature 0 --max-tokens 24 --prompt "What is the capital of France?")
echo "chat: $answer"
grep -q Paris <<<"$answer" || { echo "check-demo: the chat answer has no Paris" >&2; fail=1; }
if (( fail )); then exit 1; fi
echo "check-demo: vulkan, cpu, async and chat demos passed"
