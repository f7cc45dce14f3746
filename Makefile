# binlink — every target sets itself up; `make help` lists them.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PYTHON ?= python3

.PHONY: help setup test bench demo firmware flash install-gateway clean vectors

help:
	@echo "make demo   - simulated fleet -> gateway -> embedded MQTT broker, live view"
	@echo "make test   - every test (needs mosquitto: apt-get install -y mosquitto)"
	@echo "make bench  - benchmarks, written to build/bench.json"
	@echo "make firmware / make flash PORT=... BIN=... / make install-gateway DESTDIR=..."

$(STAMP): pyproject.toml
	@echo "==> creating virtual environment in $(VENV)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "==> installing binlink and its test/flash dependencies"
	@$(PIP) install --quiet --upgrade pip
	@$(PIP) install --quiet -e '.[test,flash]'
	@touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	@echo "==> running the test suite"
	@$(PY) -m pytest -q

bench: $(STAMP)
	@echo "==> running benchmarks (results in build/bench.json)"
	@$(PY) -m tests.bench

demo: $(STAMP)
	@echo "==> starting the demo: embedded broker, simulated fleet, gateway"
	@$(VENV)/bin/binlink demo $(DEMO_ARGS)

vectors: $(STAMP)
	@$(PY) tests/vectors/make_vectors.py

clean:
	rm -rf build

install-gateway:
	@DESTDIR="$(DESTDIR)" INSTALL_VENV="$(or $(INSTALL_VENV),1)" sh gateway/systemd/install.sh
