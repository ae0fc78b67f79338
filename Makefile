# The two commands that matter on a fresh machine:
#   make demo   build shoal and run its demo (best backend; lavapipe where there is no GPU)
#   make test   the whole test suite, as CI runs it
# Both install what they need first (scripts/setup.sh).

CARGO ?= cargo
SHOAL := target/release/shoal
# The guests' own unit tests run natively (the guests' workspace builds for Wasm by default).
HOST_TARGET := $(shell rustc -vV | sed -n 's/^host: //p')
export XDG_RUNTIME_DIR ?= /tmp
# NVRTC from PyPI (scripts/setup.sh --test), for the kernel compile test.
NVRTC_LIB := $(CURDIR)/.cache/nvrtc/nvidia/cu13/lib

.PHONY: demo test setup setup-test build model lint check-metal bench

setup:
	@scripts/setup.sh

setup-test:
	@scripts/setup.sh --test

build: setup
	$(CARGO) build --release -p shoal-cli

model:
	@scripts/fetch-model.sh >/dev/null

demo: build model
	$(SHOAL) demo

# One profile (release) for everything, so Wasmtime and wgpu are compiled once.
test: setup-test
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings
	cd guests && $(CARGO) clippy --release -- -D warnings
	cd guests && $(CARGO) clippy --release --target wasm32-wasip2 -p nncomponent-guest -- -D warnings
	cd guests && $(CARGO) test --release -p chat-guest --lib --target $(HOST_TARGET)
	$(MAKE) --no-print-directory check-metal
	$(CARGO) build --release -p shoal-cli
	scripts/check-demo.sh $(SHOAL)
	LD_LIBRARY_PATH=$(NVRTC_LIB)$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH} $(CARGO) test --release --workspace

# The Metal import compiles for Apple Silicon; nothing here can run it.
check-metal:
	$(CARGO) check --release -p shoal-gpu --target aarch64-apple-darwin

bench: setup
	$(CARGO) bench -p shoal-gpu --bench roundtrip
