# Two set-up commands on a fresh machine (see README):
#   make serve   install the service and serve the demo model pack on http://127.0.0.1:8000
#   make test    install everything (service, training, dev tools), lint (ruff) and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
PACK ?= models/demo-synthetic

.PHONY: serve test lint format install-service install-all

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# pip runs once, and again only when pyproject.toml (the dependencies) changes: each install leaves a stamp file
# in the venv, and make compares its time with pyproject.toml's. Installing everything also installs the service.
SERVICE_STAMP := $(VENV)/.installed-service
ALL_STAMP := $(VENV)/.installed-all

install-service: $(SERVICE_STAMP)
install-all: $(ALL_STAMP)

$(SERVICE_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(ALL_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[train,dev]"
	touch $@ $(SERVICE_STAMP)

serve: install-service
	$(PY) -m service --host $(HOST) --port $(PORT) --models $(PACK)

test: install-all lint
	$(PY) -m pytest -q

# ruff (configured in pyproject.toml) as linter and formatter; `make format` applies both.
lint: install-all
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install-all
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Benchmarks (separate commands, never part of `make test`; see README "Throughput and latency"):
#   make bench          in-process + HTTP throughput/latency, ours vs the peers (~20 min on 2 cores;
#                       the first run also pip-installs Ray Serve into benchmarks/.venv-peers)
#   make bench-memory   10,000 uncompressed requests (~10 min; JPEG 2000 would take ~40 min on 2 cores),
#                       memory of the server's process tree over requests
#   BENCH_ARGS passes options, e.g. `make bench BENCH_ARGS=--quick` (a smoke run of a few minutes)
BENCH_ARGS ?=
.PHONY: bench bench-memory

bench: install-all
	$(PY) -m benchmarks.throughput $(BENCH_ARGS)

bench-memory: install-all
	$(PY) -m benchmarks.memory --requests 10000 --input-sets uncompressed
