# Two set-up commands on a fresh machine (see README):
#   make serve   install the service and serve the demo model pack on http://127.0.0.1:8000
#   make test    install everything (service, training, dev tools) and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
PACK ?= models/demo-synthetic

.PHONY: serve test install-service install-all

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install-service: $(PY)
	$(PY) -m pip install -q -e .

install-all: $(PY)
	$(PY) -m pip install -q -e ".[train,dev]"

serve: install-service
	$(PY) -m service --host $(HOST) --port $(PORT) --models $(PACK)

test: install-all
	$(PY) -m pytest -q
