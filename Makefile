# Ferry: the two commands of the Quick start, and the checks CI runs.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: deps build test demo lint bench-disk clean

deps:
	@bash scripts/install-deps.sh

build: deps
	$(CARGO) build --release --workspace --bins --example guest_on_volume --example guest_image

# The whole suite: unit, property, integration with real QEMU, interop.
test: deps
	@bash scripts/reap-test-guests.sh
	$(CARGO) test --workspace --no-fail-fast

demo: build
	@bash scripts/demo.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

bench-disk: deps
	$(CARGO) run --release -p ferry-bench -- disk

clean:
	$(CARGO) clean
