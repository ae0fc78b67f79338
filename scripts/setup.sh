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

targets=(wasm32-wasip1)
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
