# darkroom: `make run` starts everything on this machine; `make test` runs the test suite.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
ML_STAMP := $(VENV)/.installed-ml
TORCH ?= torch==2.13.0

.PHONY: frontend run test test-fast lint format bench bench-chain bench-ingest bench-leases bench-readmodel bench-caption bench-generate bench-notify bench-projection bench-frontend chaos install install-ml clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(STAMP)

# The model functions need torch and friends. The pinned torch goes in first so that the
# `ml` extra's range keeps it (on a CPU machine it is the local CPU wheel).
$(ML_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet '$(TORCH)'
	$(BIN)/pip install --quiet -e '.[ml,dev]'
	touch $@

install-ml: $(ML_STAMP)

# The browser app (SvelteKit, in frontend/): built to frontend/build, which the gateway serves.
FRONTEND_DEPS := frontend/node_modules/.installed
FRONTEND_SOURCES := $(shell find frontend/src frontend/static frontend/scripts -type f 2>/dev/null)

$(FRONTEND_DEPS): frontend/package.json frontend/package-lock.json
	cd frontend && npm ci --no-audit --no-fund
	touch $@

frontend/build/index.html: $(FRONTEND_DEPS) $(FRONTEND_SOURCES) frontend/vite.config.ts
	cd frontend && npm run build

frontend: frontend/build/index.html

run: install-ml frontend
	$(BIN)/darkroom up $(ARGS)

# The tests build tiny models through the real transformers/diffusers code: the ML stack too.
# The frontend's component tests, then everything else (browser tests included: they need
# the built app and Debian's chromium, which .ci/run installs).
test: install-ml frontend
	cd frontend && npm test
	$(BIN)/python -m pytest -n 2 --dist loadfile $(ARGS)

test-fast: install-ml
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

lint: install-ml $(FRONTEND_DEPS)
	cd frontend && npm run check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: bench-chain bench-ingest bench-leases bench-readmodel bench-caption

bench-chain: install
	$(BIN)/python -m tests.bench.bench_chain $(ARGS)

bench-ingest: install
	$(BIN)/python -m tests.bench.bench_ingest $(ARGS)

bench-leases: install
	$(BIN)/python -m tests.bench.bench_leases $(ARGS)

# Needs numpy (the ml extra brings it) and about 10 GB of disk for 10^6 images.
bench-readmodel: install-ml
	$(BIN)/python -m tests.bench.bench_readmodel $(ARGS)

bench-caption: install-ml
	$(BIN)/python -m tests.bench.bench_caption $(ARGS)

bench-generate: install-ml
	$(BIN)/python -m tests.bench.bench_generate $(ARGS)

# 1,000 SSE subscribers on one gateway (and a 1-subscriber baseline), then the webhooks.
bench-notify: install
	$(BIN)/python -m tests.bench.bench_notify $(ARGS)

# Read-your-event on /api/events: live events with and without waiting for notify's projection.
bench-projection: install
	$(BIN)/python -m tests.bench.bench_projection $(ARGS)

# The browser app in headless Chromium over 100,000 images (needs the built app: make frontend).
bench-frontend: install-ml frontend
	$(BIN)/python -m tests.bench.bench_frontend $(ARGS)

# Faults on the real stack (worker, nats-server, S3, PostgreSQL, a NATS cluster's leader).
chaos: install
	$(BIN)/python -m tests.bench.bench_chaos $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
