SHELL := /bin/bash
# wsrelay — common tasks. `make run` starts the sidecar (in-memory broker),
# `make test` runs the whole suite (it installs redis-server if it can).

CARGO ?= cargo
ARGS  ?=

.PHONY: run build test check fmt clippy deps need socketio-deps bench clean fuzz fuzz-smoke

## Build in release mode and run the sidecar with its defaults
## (public :8080, admin 127.0.0.1:8081, app at http://127.0.0.1:3000, in-memory broker).
run:
	$(CARGO) run --release --bin wsrelay -- $(ARGS)

build:
	$(CARGO) build --release

## What the tests need that cargo does not fetch: redis-server, and python3
## (the README's example app runs in the suite).
deps:
	@$(MAKE) --no-print-directory need PROG=redis-server PKG=redis-server
	@$(MAKE) --no-print-directory need PROG=python3 PKG=python3-minimal
	@$(MAKE) --no-print-directory need PROG=node PKG=nodejs
	@$(MAKE) --no-print-directory need PROG=npm PKG=npm
	@$(MAKE) --no-print-directory socketio-deps

## The Socket.IO tests' real clients, in the repo's own folder: socket.io-client
## (npm ci, package-lock.json) and python-socketio (a venv, pinned requirements.txt).
SIO := tests/socketio
socketio-deps: $(SIO)/node_modules/.installed $(SIO)/.venv/.installed

$(SIO)/node_modules/.installed: $(SIO)/package-lock.json
	cd $(SIO) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

$(SIO)/.venv/.installed: $(SIO)/requirements.txt
	@python3 -c 'import ensurepip, venv' 2>/dev/null || $(MAKE) --no-print-directory need PROG=no-such-program-venv PKG=python3-venv || python3 -c 'import ensurepip, venv'
	python3 -m venv $(SIO)/.venv
	$(SIO)/.venv/bin/pip install --quiet --disable-pip-version-check -r $(SIO)/requirements.txt
	@touch $@

need:
	@if command -v $(PROG) >/dev/null 2>&1; then \
		:; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "make: installing $(PKG) for the tests"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(PKG) >/dev/null \
		|| { echo "make: could not install $(PKG); install $(PROG) yourself and rerun"; exit 1; }; \
	elif command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		echo "make: installing $(PKG) with sudo for the tests"; \
		sudo DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(PKG) >/dev/null \
		|| { echo "make: could not install $(PKG); install $(PROG) yourself and rerun"; exit 1; }; \
	else \
		echo "make: the tests need $(PROG) on PATH (tests start their own instances on free ports)."; \
		echo "      Install it (Debian/Ubuntu: sudo apt-get install $(PKG)) and rerun."; \
		exit 1; \
	fi
	@command -v $(PROG) >/dev/null 2>&1 || { echo "make: $(PROG) is still missing"; exit 1; }

## The benchmark (release build, loopback, ~5 minutes): fan-out, idle
## memory, connect rate and HTTP proxy against nginx; rewrites the results
## in docs/BENCHMARKS.md. Installs redis-server, nginx and wrk if it can.
bench: deps
	@$(MAKE) --no-print-directory need PROG=nginx PKG=nginx-light
	@$(MAKE) --no-print-directory need PROG=wrk PKG=wrk
	$(CARGO) build --release
	$(CARGO) bench --bench relay

## The whole suite: unit tests and integration tests over real sockets and real
## Redis (with real socket.io-client and python-socketio clients), then the
## browser client under Node, dashboards and alerts under a real Prometheus,
## and the demo stack in headless Chromium (their targets are below).
test: deps
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --profile ci; \
	else \
		$(CARGO) test; \
	fi
	$(CARGO) build --bin wsrelay
	@$(MAKE) --no-print-directory test-js test-python test-observability test-browser

fmt:
	$(CARGO) fmt --all

clippy:
	$(CARGO) clippy --all-targets -- -D warnings

## Exactly what CI runs.
check:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(MAKE) test

## Fuzz every parser that reads untrusted input (client frames, admin API
## bodies, what arrives from Redis, config files) for FUZZ_SECONDS each,
## with cargo-fuzz on the nightly toolchain. A crash stops with the input
## saved under fuzz/artifacts/ (make it a regression test).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := client_frame admin_body redis_envelope config_file socketio_packet

fuzz:
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	@rustup toolchain list | grep -q nightly || { echo "make: fuzzing needs the nightly toolchain (rustup toolchain install nightly)"; exit 1; }
	@for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/corpus/$$t; \
		echo "== fuzz $$t for $(FUZZ_SECONDS)s"; \
		(cd fuzz && $(CARGO) +nightly fuzz run $$t corpus/$$t seeds/$$t -- -max_total_time=$(FUZZ_SECONDS) 2>&1 | grep -E "^Done|ERROR|SUMMARY" ; exit $${PIPESTATUS[0]}) || exit 1; \
	done

## What CI runs: each target briefly.
fuzz-smoke:
	@$(MAKE) --no-print-directory fuzz FUZZ_SECONDS=10

clean:
	$(CARGO) clean

## --- Browser client, demo stack, dashboards and alerts ---------------------
## (clients/js, deploy/demo, deploy/grafana, deploy/prometheus). The tests run
## the binary in WSRELAY_BIN (relative to the repo root); `make test` builds
## the debug one first. npm packages go to clients/js/node_modules (npm ci,
## locked); programs come from apt like the other test dependencies.
WSRELAY_BIN ?= target/debug/wsrelay

.PHONY: js-deps demo-deps browser-deps observability-deps test-js test-browser test-observability demo demo-stop soak
.PHONY: python-deps test-python

js-deps:
	@$(MAKE) --no-print-directory need PROG=node PKG=nodejs
	@$(MAKE) --no-print-directory need PROG=npm PKG=npm
	@$(MAKE) --no-print-directory need PROG=redis-server PKG=redis-server

demo-deps:
	@$(MAKE) --no-print-directory need PROG=python3 PKG=python3-minimal
	@$(MAKE) --no-print-directory need PROG=redis-server PKG=redis-server
	@$(MAKE) --no-print-directory need PROG=nginx PKG=nginx-light
	@$(MAKE) --no-print-directory need PROG=prometheus PKG=prometheus

browser-deps: js-deps demo-deps
	@$(MAKE) --no-print-directory need PROG=chromium PKG=chromium

observability-deps: demo-deps
	@$(MAKE) --no-print-directory need PROG=promtool PKG=prometheus

## The browser client under Node against a real sidecar (~5 s).
test-js: js-deps
	WSRELAY_BIN=$(WSRELAY_BIN) clients/js/test/run.sh

## The app-side Python package (clients/python, wsrelay-socketio): a venv in
## its folder with the pinned test dependencies and the package (editable).
PY := clients/python
python-deps: $(PY)/.venv/.installed

$(PY)/.venv/.installed: $(PY)/requirements-test.txt $(PY)/pyproject.toml
	@$(MAKE) --no-print-directory need PROG=redis-server PKG=redis-server
	@python3 -c 'import ensurepip, venv' 2>/dev/null || $(MAKE) --no-print-directory need PROG=no-such-program-venv PKG=python3-venv || python3 -c 'import ensurepip, venv'
	python3 -m venv $(PY)/.venv
	$(PY)/.venv/bin/pip install --quiet --disable-pip-version-check -r $(PY)/requirements-test.txt
	$(PY)/.venv/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e $(PY)
	@touch $@

## ruff, mypy --strict, and pytest against two real sidecars, Redis and two
## apps with two workers each (~10 s).
test-python: python-deps
	cd $(PY) && .venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy
	cd deploy/openwebui && ../../$(PY)/.venv/bin/ruff check . && ../../$(PY)/.venv/bin/ruff format --check .
	cd deploy/soak && ../../$(PY)/.venv/bin/ruff check . && ../../$(PY)/.venv/bin/ruff format --check . && python3 -m unittest -q test_check
	cd $(PY) && WSRELAY_BIN=$(abspath $(WSRELAY_BIN)) .venv/bin/python -m pytest -q

## The demo stack in headless Chromium over the DevTools protocol (~15 s).
test-browser: browser-deps
	WSRELAY_BIN=$(WSRELAY_BIN) deploy/demo/test.sh

## promtool on the alert rules, and a real Prometheus scraping the demo's sidecars (~10 s).
test-observability: observability-deps
	WSRELAY_BIN=$(WSRELAY_BIN) python3 deploy/observability/test.py

## --- Open WebUI, the real app (outside make test and CI) -------------------
## open-webui==0.12.4 goes into a venv outside the repo (several GB, ~5 min
## the first time), with wsrelay-socketio; deploy/openwebui/ changes one line
## of its socket/main.py (and checks that the diff is that line).
OWUI_VENV ?= $(HOME)/.cache/wsrelay/openwebui-venv
.PHONY: openwebui-deps openwebui-proof openwebui-measure

openwebui-deps: browser-deps
	$(CARGO) build --release --bin wsrelay
	@test -x $(OWUI_VENV)/bin/python || python3 -m venv $(OWUI_VENV)
	$(OWUI_VENV)/bin/pip install --quiet --disable-pip-version-check open-webui==0.12.4
	$(OWUI_VENV)/bin/pip install --quiet --disable-pip-version-check --force-reinstall --no-deps ./clients/python

## Two replicas behind two sidecars and a round-robin nginx, in headless
## Chromium, over WebSocket then long-polling (~3 min); rewrites docs/openwebui.png.
openwebui-proof: openwebui-deps
	cd deploy/openwebui && $(OWUI_VENV)/bin/python proof.py --venv $(OWUI_VENV) --bin ../../target/release/wsrelay --screenshot ../../docs/openwebui.png

## The app replicas' CPU per streamed token and the time to first token,
## Open WebUI's own Socket.IO server vs wsrelay (~2 min).
openwebui-measure: openwebui-deps
	cd deploy/openwebui && $(OWUI_VENV)/bin/python measure.py --venv $(OWUI_VENV) --bin ../../target/release/wsrelay

## deploy/docker-compose.yml as local processes: Redis, two app + wsrelay
## replicas, nginx on 127.0.0.1:8000, Prometheus on 127.0.0.1:9090.
## REDIS=sentinel: a master, a replica and three sentinels instead of one Redis.
demo: demo-deps
	$(CARGO) build --release --bin wsrelay
	python3 deploy/demo/demo.py up --bin target/release/wsrelay $(if $(REDIS),--redis $(REDIS))

## Chaos soak, not part of `make test`: three sidecars behind nginx, Redis
## with AOF (SOAK_REDIS=sentinel: master, replica, three sentinels), an app
## with hooks, self-recovering clients of both protocols, random overlapping
## faults, and an independent checker (deploy/soak/soak.py). SOAK_MINUTES
## (10); SOAK_SEED replays a schedule.
soak: demo-deps js-deps socketio-deps
	@$(MAKE) --no-print-directory need PROG=ss PKG=iproute2
	@[ -d clients/js/node_modules/ws ] || (cd clients/js && npm ci --no-audit --no-fund --loglevel=error)
	$(CARGO) build --release --bin wsrelay
	python3 deploy/soak/soak.py $(if $(SOAK_MINUTES),--minutes $(SOAK_MINUTES)) $(if $(SOAK_SEED),--seed $(SOAK_SEED)) $(if $(SOAK_REDIS),--redis $(SOAK_REDIS))

## Stops exactly what `make demo` started (its pid files in deploy/demo/run/).
demo-stop:
	python3 deploy/demo/demo.py down
