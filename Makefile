# wsrelay — common tasks. `make run` starts the sidecar (in-memory broker),
# `make test` runs the whole suite (it installs redis-server if it can).

CARGO ?= cargo
ARGS  ?=

.PHONY: run build test check fmt clippy deps bench clean

## Build in release mode and run the sidecar with its defaults
## (public :8080, admin 127.0.0.1:8081, app at http://127.0.0.1:3000, in-memory broker).
run:
	$(CARGO) run --release --bin wsrelay -- $(ARGS)

build:
	$(CARGO) build --release

## What the tests need that cargo does not fetch: redis-server.
deps:
	@if command -v redis-server >/dev/null 2>&1; then \
		:; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "make: installing redis-server (the tests start their own instances on free ports)"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	elif command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		echo "make: installing redis-server with sudo"; \
		sudo DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	else \
		echo "make: the tests need redis-server (Redis or Valkey) on PATH."; \
		echo "      Install it (Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis) and rerun."; \
		exit 1; \
	fi
	@command -v redis-server >/dev/null 2>&1 || { echo "make: redis-server is still missing"; exit 1; }

## The whole suite: unit tests and integration tests over real sockets and real Redis.
test: deps
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --profile ci; \
	else \
		$(CARGO) test; \
	fi

fmt:
	$(CARGO) fmt --all

clippy:
	$(CARGO) clippy --all-targets -- -D warnings

## Exactly what CI runs.
check:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(MAKE) test

clean:
	$(CARGO) clean
