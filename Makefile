# Rampart: `make run` builds and starts the gateway on configs/gateway.toml; `make test` runs every test.
# Both install what they need (Debian packages via apt, crates via cargo). Run as root.

CARGO        ?= cargo
CONFIG       ?= configs/gateway.toml
APT_PACKAGES := wireguard-go wireguard-tools iproute2 iputils-ping iperf3 socat netcat-openbsd curl python3 jq procps nginx openssh-server openssh-client openssh-sftp-server nftables chromium nodejs postgresql qemu-system-x86
export CARGO_TERM_COLOR := never

.PHONY: all build release run test deps ui ui-test-deps s3s-fs lint unit e2e bench bench-flows bench-peers bench-onramp fuzz fuzz-build fuzz-merge

all: build

build: ui
	$(CARGO) build

release: ui
	$(CARGO) build --release

## The review UI's third-party assets (asciinema-player, @xterm/xterm, the HPKE library) from npm with the
## lockfile, embedded into the binary by build.rs (never committed).
ui:
	@if [ ! -f ui/node_modules/.package-lock.json ] || [ ui/package-lock.json -nt ui/node_modules/.package-lock.json ]; then \
	  npm ci --prefix ui --ignore-scripts --no-audit --no-fund; else echo "ui: npm assets present"; fi

## playwright-core for the browser tests (drives Debian's chromium; no browser download).
ui-test-deps:
	@if [ ! -f tests/ui/node_modules/.package-lock.json ] || [ tests/ui/package-lock.json -nt tests/ui/node_modules/.package-lock.json ]; then \
	  npm ci --prefix tests/ui --ignore-scripts --no-audit --no-fund; else echo "ui-test-deps: present"; fi

## The S3 protocol server the fleet tests upload recordings to (s3s-fs from crates.io, a test tool never linked
## or shipped): built once into target/s3s-fs/bin, skipped when that version is there.
S3S_FS_VERSION := 0.14.1
s3s-fs:
	@if [ -x target/s3s-fs/bin/s3s-fs ] && grep -q '"s3s-fs $(S3S_FS_VERSION) ' target/s3s-fs/.crates.toml 2>/dev/null; then echo "s3s-fs: present"; else \
	  $(CARGO) install --locked --root target/s3s-fs s3s-fs@$(S3S_FS_VERSION) --features binary; fi

## Start the gateway in the foreground on the default config (Ctrl-C stops it).
run: release
	./target/release/rampart run -c $(CONFIG)

## Install the Debian packages the tests drive (real WireGuard clients, iperf3, ...). Idempotent.
deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "deps: installing$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else echo "deps: all present"; fi

lint: ui
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --all-targets --features test-hooks -- -D warnings

## Unit, property and in-memory scenario tests (the namespace helper's tests need root).
unit: ui
	$(CARGO) test --features test-hooks --lib --bins

## End-to-end tests with real wireguard-go clients in network namespaces (root). The `test-hooks` feature
## adds control requests only tests use (e.g. stalling the data path to show /health notices).
e2e: deps ui ui-test-deps s3s-fs
	@for t in tests/e2e_*.rs; do \
	  [ -e "$$t" ] || continue; \
	  name=$$(basename $$t .rs); \
	  $(CARGO) test --features test-hooks --test $$name -- --test-threads=1 || exit 1; \
	done

## Relay benchmark vs wireguard-go / boringtun-cli (root, ~10 min, not part of `make test`); see docs/benchmarks.md.
bench:
	bench/relay.sh

## Flow table micro-benchmark (insert/lookup cost and memory per flow at 1M flows).
bench-flows:
	$(CARGO) bench --bench flow_table

## Scale in devices: memory per device, apply time and first handshake of the last of 100,000 devices, tick cost.
bench-peers:
	$(CARGO) bench --bench peers

## The SEQPACKET on-ramp's core cost per packet next to WireGuard device-to-device.
bench-onramp:
	$(CARGO) bench --bench onramp_conn

## Fuzzing with cargo-fuzz (not part of `make test`: `make unit` replays the committed corpus fuzz/corpus on stable).
## `make fuzz FUZZ_SECONDS=1800` runs every target in turn; `make fuzz FUZZ_TARGETS=packet` one; each run's log
## (final stats: executions, coverage) is fuzz/work/<target>.log. `make fuzz-merge` adds to fuzz/corpus only the
## inputs of fuzz/work that reach new coverage. docs/security.md.
FUZZ_TARGETS ?= $(basename $(notdir $(wildcard fuzz/fuzz_targets/*.rs)))
FUZZ_SECONDS ?= 60
FUZZ_FLAGS   := -s none -a
fuzz-build:
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	RUSTC_BOOTSTRAP=1 $(CARGO) fuzz build $(FUZZ_FLAGS) $(if $(filter 1,$(words $(FUZZ_TARGETS))),$(FUZZ_TARGETS))

fuzz: fuzz-build
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/work/$$t; \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $(FUZZ_FLAGS) $$t fuzz/work/$$t fuzz/corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
	    >fuzz/work/$$t.log 2>&1; rc=$$?; \
	  if [ $$rc -ne 0 ]; then tail -n 40 fuzz/work/$$t.log; exit 1; fi; \
	  echo "$$t:"; grep -E '^Done|^stat::(number_of_executed_units|average_exec_per_sec|new_units_added)' fuzz/work/$$t.log; \
	  grep -E '^#[0-9]+' fuzz/work/$$t.log | tail -n 1; \
	done

fuzz-merge: fuzz-build
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/work/$$t; \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $(FUZZ_FLAGS) $$t fuzz/corpus/$$t fuzz/work/$$t -- -merge=1 \
	    -timeout=10 -rss_limit_mb=4096 2>&1 | grep -E 'MERGE-OUTER: [0-9]+ new files' || exit 1; \
	done

## The whole suite: lint, unit/property/scenario tests, end-to-end tests, and the appliance image boot test.
## The image's release build (niced, in its own target directory so the two cargo runs never wait on one lock)
## runs while the end-to-end tests run, which mostly wait on the network; its log is build/image-build.log.
test: deps image-deps lint unit
	@mkdir -p build; \
	$(MAKE) --no-print-directory image IMAGE_TARGET=$(CURDIR)/target/image >build/image-build.log 2>&1 & img=$$!; \
	$(MAKE) --no-print-directory e2e; rc=$$?; \
	wait $$img; irc=$$?; \
	if [ $$irc -ne 0 ]; then tail -n 60 build/image-build.log; echo "make image failed: build/image-build.log"; \
	else tail -n 1 build/image-build.log; fi; \
	[ $$rc -eq 0 ] && [ $$irc -eq 0 ] || exit 1; \
	IMAGE_TARGET=$(CURDIR)/target/image $(CURDIR)/tests/image_test.sh $(IMAGE_OUT)

include firmware-image/image.mk
