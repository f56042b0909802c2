# Two set-up commands for a fresh machine: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
PYTHON ?= python3

.PHONY: install run test peers bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,postgres]"
	touch $@

## Start the node on the embedded default (SQLite + ./var, AE PACSNODE, port 11112).
run: install
	$(VENV)/bin/pacsnode serve

## The real peers the tests and benchmarks use: DCMTK, Orthanc, dicom3tools,
## Debian's Chromium for the browser tests (Playwright drives /usr/bin/chromium; it
## downloads no browser of its own), and docker-compose and kubectl, which
## tests/test_deploy.py runs offline to validate deploy/ (no Docker daemon needed).
## Debian's kubectl is the package kubernetes-client; it is added only when no kubectl
## is on PATH, since another kubectl package would conflict with it over /usr/bin/kubectl.
peers:
	@if command -v storescu >/dev/null && command -v echoscu >/dev/null \
	    && command -v storescp >/dev/null && command -v Orthanc >/dev/null \
	    && command -v dciodvfy >/dev/null && [ -x /usr/bin/chromium ] \
	    && command -v docker-compose >/dev/null && command -v kubectl >/dev/null; then \
	  echo "peers present: DCMTK, Orthanc, dicom3tools, Chromium, docker-compose, kubectl"; \
	else \
	  kubectl=$$(command -v kubectl >/dev/null || echo kubernetes-client); \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
	    dcmtk orthanc dicom3tools chromium docker-compose $$kubectl >/dev/null; \
	fi

test: install peers
	$(PY) -m pytest

bench: install peers
	$(PY) bench/run.py --tls
	$(PY) bench/inference.py
	$(PY) bench/guard.py
	$(PY) bench/e2e.py
	$(PY) bench/throughput.py
	$(PY) bench/db_scale.py

clean:
	rm -rf $(VENV) var bench/out
