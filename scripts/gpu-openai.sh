#!/usr/bin/env bash
# The OpenAI endpoints on CUDA: `shoal serve --backend cuda` with SmolLM2 answering OpenAI's
# own Python client (crates/shoal-cli/tests/openai_client.py: seeds, n, stop, logprobs, JSON
# mode, completions, embeddings), then /metrics. Carried: .dev/bin/shoal.xz (a stripped
# release build), the model's three parts (the first two copied to /tmp by earlier calls),
# .dev/pyc/pyclient.tar.xz (OpenAI's client as setup --test installs it).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u; python3 --version
cat /tmp/smol.part00 /tmp/smol.part01 .dev/p3/smol.part02 > /tmp/smol.gguf
sha256sum /tmp/smol.gguf
xz -dc .dev/bin/shoal.xz > /tmp/shoal && chmod +x /tmp/shoal
mkdir -p /tmp/pyc && tar -C /tmp/pyc -xJf /tmp/pyclient.tar.xz
rm -rf /tmp/st
export XDG_CACHE_HOME=/tmp/shoal-cache
setsid /tmp/shoal serve --backend cuda --addr 127.0.0.1:7433 --store /tmp/st --model smollm2=/tmp/smol.gguf \
  > "$OUT/daemon.log" 2>&1 < /dev/null &
for _ in $(seq 120); do
  curl -sf localhost:7433/health > /dev/null && break
  sleep 0.5
done
curl -s localhost:7433/health; echo
PYTHONPATH=/tmp/pyc/pyclient timeout 300 python3 crates/shoal-cli/tests/openai_client.py 127.0.0.1:7433 --batch-variant \
  > "$OUT/client.log" 2>&1
echo "client exit: $?"; tail -8 "$OUT/client.log"
curl -s localhost:7433/metrics > "$OUT/metrics.txt"; grep -E "^shoal_" "$OUT/metrics.txt" | head -40
pkill -f "[/]tmp/shoal serve"
sleep 1; tail -5 "$OUT/daemon.log"
