# imaged developer commands. Everything installs into .venv; nothing here
# needs more than Python 3, git and make (and root for the optional system
# packages the tests use: curl, openssl).

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test venv sysdeps bench bench-smoke clean

$(STAMP): requirements.txt requirements-test.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -r requirements-test.txt
	$(VPY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

# Tools the end-to-end tests drive (curl as a real client, openssl for test
# certificates). Installed with apt when missing and we may; otherwise the
# tests needing them skip and say why.
sysdeps:
	@missing=""; for t in curl openssl; do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	    else echo "warning: missing$$missing; tests needing them will skip"; fi; \
	fi

# Start the daemon in lab mode (self-signed certificate, local sockets).
run: $(STAMP)
	$(VPY) -m imaged.lab

# The whole test suite.
test: $(STAMP) sysdeps
	$(VPY) -m pytest -q tests

clean:
	rm -rf $(VENV) lab build dist *.egg-info .pytest_cache
