# binlink — every target sets itself up; `make help` lists them.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PYTHON ?= python3

.PHONY: help setup compiled system-deps test bench demo firmware flash install-gateway clean vectors

help:
	@echo "make demo   - simulated fleet -> gateway -> embedded MQTT broker, live view"
	@echo "make test   - every test (installs mosquitto and redis-server with apt-get when run as root)"
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

# the simulator's part models compiled by Cython from their unchanged source (simulator/compiled.py):
# once per change of their source; where it cannot build, everything runs as source, only slower
compiled: $(STAMP)
	@$(VENV)/bin/binlink sim --compile

# Mosquitto, Redis and OpenSSL for the tests: installed as root, else one line naming the command
system-deps:
	@VENV="$(VENV)" PYTHON="$(PYTHON)" sh tools/system-deps.sh

test: system-deps $(STAMP) compiled
	@echo "==> running the test suite (two workers: most tests wait on brokers, ptys and processes)"
	@$(PY) -m pytest -q -n 2 --dist loadgroup

bench: $(STAMP) compiled
	@echo "==> running benchmarks (results in build/bench.json)"
	@$(PY) -m tests.bench

demo: $(STAMP) compiled
	@echo "==> starting the demo: embedded broker, simulated fleet, gateway"
	@$(VENV)/bin/binlink demo $(DEMO_ARGS)

vectors: $(STAMP)
	@$(PY) tests/vectors/make_vectors.py

clean:
	rm -rf build

install-gateway:
	@DESTDIR="$(DESTDIR)" INSTALL_VENV="$(or $(INSTALL_VENV),1)" sh gateway/systemd/install.sh

firmware: $(STAMP)
	@$(PY) tools/flash.py build

# make flash PORT=/dev/ttyUSB0 BIN=market-square-1 [DRY_RUN=1] [NAME=... LAT=... LON=...] [MIP=0]
#   [REGISTRY=...] (default ~/.local/share/binlink/devices.toml; /etc/binlink/devices.toml on a gateway)
#   [KEY_FILE=...] (the key `binlink registry add --key-out` made on the gateway, instead of a new one)
#   [TRANSPORT=wifi WIFI_SSID=... WIFI_PASSWORD_FILE=... BROKER=host:port]
#   [FLASH_MICROPYTHON=1 MICROPYTHON_BIN=... MICROPYTHON_SHA256=...]
flash: $(STAMP)
	@test -n "$(PORT)" || { echo "error: give PORT=/dev/serial/by-id/... (the board's USB serial port)" >&2; exit 2; }
	@test -n "$(BIN)" || { echo "error: give BIN=<bin id>, e.g. BIN=market-square-1" >&2; exit 2; }
	@case "$(DRY_RUN)$(MIP)$(FLASH_MICROPYTHON)" in *[!01]*) echo "error: DRY_RUN, MIP and FLASH_MICROPYTHON take 1 or 0" >&2; exit 2;; esac
	@$(PY) tools/flash.py flash --port "$(PORT)" --bin "$(BIN)" $(if $(REGISTRY),--registry "$(REGISTRY)") \
		$(if $(TRANSPORT),--transport $(TRANSPORT)) $(if $(SENSOR),--sensor $(SENSOR)) \
		$(if $(DEPTH_MM),--depth-mm $(DEPTH_MM)) $(if $(FULL_MM),--full-mm $(FULL_MM)) \
		$(if $(NAME),--name "$(NAME)") $(if $(LAT),--lat $(LAT)) $(if $(LON),--lon $(LON)) \
		$(if $(WIFI_SSID),--wifi-ssid "$(WIFI_SSID)") $(if $(WIFI_PASSWORD_FILE),--wifi-password-file "$(WIFI_PASSWORD_FILE)") \
		$(if $(BROKER),--broker "$(BROKER)") $(if $(filter 0,$(MIP)),--no-mip) $(if $(PROVISION_DIR),--provision-dir "$(PROVISION_DIR)") \
		$(if $(KEY_FILE),--key-file "$(KEY_FILE)") \
		$(if $(filter 1,$(DRY_RUN)),--dry-run) $(if $(filter 1,$(FLASH_MICROPYTHON)),--flash-micropython) \
		$(if $(MICROPYTHON_BIN),--micropython-bin "$(MICROPYTHON_BIN)") $(if $(MICROPYTHON_SHA256),--micropython-sha256 $(MICROPYTHON_SHA256))
