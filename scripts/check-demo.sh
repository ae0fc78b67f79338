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
# Turns 1 and 2 in one process, and turn 1 saved then turn 2 resumed, answer the same.
q1="What is the capital of France?"; q2="And of Germany?"
snap=$(mktemp -d)
both=$("$shoal" chat --backend cpu --temperature 0 --max-tokens 24 --prompt "$q1" --prompt "$q2")
one=$("$shoal" chat --backend cpu --temperature 0 --max-tokens 24 --prompt "$q1" --save "$snap/chat")
two=$("$shoal" chat --backend cpu --prompt "$q2" --resume "$snap/chat")
rm -rf "$snap"
echo "chat --save/--resume: $one / $two"
[[ "$one"$'\n'"$two" == "$both" ]] || { echo "check-demo: resumed chat differs from the uninterrupted one: [$both]" >&2; fail=1; }
grep -q Berlin <<<"$two" || { echo "check-demo: the resumed answer has no Berlin" >&2; fail=1; }
if (( fail )); then exit 1; fi
echo "check-demo: vulkan, cpu, async, chat and chat --save/--resume demos passed"
