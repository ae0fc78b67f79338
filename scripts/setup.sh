#!/usr/bin/env bash
# Installs what shoal's build, demo and tests need, where it is missing:
#   - the wasm32-wasip1 Rust target (the guests), and with --test the
#     aarch64-apple-darwin target (type-checking the Metal path);
#   - a Vulkan loader and Mesa's lavapipe (a CPU Vulkan driver), so the Vulkan
#     backend runs on machines without a GPU.
# Safe to run again: each step checks first.
set -euo pipefail

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

say() { echo "setup: $*" >&2; }

targets=(wasm32-wasip1 wasm32-wasip2)
(( want_test )) && targets+=(aarch64-apple-darwin)
installed=$(rustup target list --installed 2>/dev/null || true)
for t in "${targets[@]}"; do
  if ! grep -qx "$t" <<<"$installed"; then
    say "adding the Rust target $t"
    rustup target add "$t"
  fi
done

have_vulkan() {
  ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1' &&
    ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1
}
if ! have_vulkan; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1 && sudo="sudo"
    say "installing the Vulkan loader and Mesa's lavapipe (mesa-vulkan-drivers, libvulkan1)"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
  else
    say "warning: no apt-get; install a Vulkan loader and driver yourself, or use --backend cpu"
  fi
fi

# NVRTC from PyPI, so that the CUDA kernels compile in the tests on machines with
# no GPU and no CUDA toolkit (only for --test; the GPU machines have their own).
if (( want_test )); then
  nvrtc_dir=.cache/nvrtc
  if [[ ! -e $nvrtc_dir/nvidia/cu13/lib/libnvrtc.so.13 ]]; then
    if command -v python3 >/dev/null 2>&1; then
      say "fetching NVRTC for CUDA 13 (pip download nvidia-cuda-nvrtc==13.0.88)"
      mkdir -p "$nvrtc_dir"
      if python3 -m pip download -q --no-deps --only-binary=:all: nvidia-cuda-nvrtc==13.0.88 -d "$nvrtc_dir" &&
        python3 -m zipfile -e "$nvrtc_dir"/nvidia_cuda_nvrtc-13.0.88-*.whl "$nvrtc_dir"; then
        rm -f "$nvrtc_dir"/*.whl
      else
        say "warning: could not fetch NVRTC; the kernel compile test will skip"
      fi
    fi
  fi
fi

# OpenAI's Python client, for the daemon's OpenAI tests (tests/openai.rs): into .cache, once.
if (( want_test )); then
  pyclient=.cache/pyclient
  if [[ ! -d $pyclient/openai-1.109.1.dist-info ]]; then
    say "installing OpenAI's Python client for the tests (pip install --target $pyclient openai==1.109.1)"
    rm -rf "$pyclient"
    python3 -m pip install -q --disable-pip-version-check --no-warn-conflicts --target "$pyclient" openai==1.109.1
  fi
fi

# The default model (SmolLM2-135M-Instruct), for the engine's tests: fetched once.
if (( want_test )); then
  scripts/fetch-model.sh >/dev/null
fi
