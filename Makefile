# imaged developer commands. Everything installs into .venv; nothing here
# needs more than Python 3, git and make (and root for the optional system
# packages the tests use: curl, openssl).

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test venv venv-nbd sysdeps packaging-deps deb rpm bench bench-smoke clean

$(STAMP): requirements.txt requirements-test.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -r requirements-test.txt
	$(VPY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

venv: $(STAMP) venv-nbd

# libnbd's Python bindings (the NBD backend) exist only as a distribution
# package, python3-libnbd, installed for the system python. The venv sees
# that one module and nothing else of dist-packages: links to nbd.py and its
# C extension in a directory of their own, put on the venv's path by a .pth
# file. The extension is built for the system python's version: a venv of
# another version cannot load it and NBD sessions then answer 500 (tests
# needing it skip). Re-run after installing python3-libnbd.
SYSTEM_PYTHON ?= /usr/bin/python3
NBD_DIR := $(abspath $(VENV))/system-nbd
venv-nbd: $(STAMP)
	@files=$$($(SYSTEM_PYTHON) -c 'import nbd, libnbdmod; print(nbd.__file__, libnbdmod.__file__)' 2>/dev/null); \
	if [ -z "$$files" ]; then echo "warning: python3-libnbd is not installed (make sysdeps); NBD tests will skip"; exit 0; fi; \
	mkdir -p $(NBD_DIR) && ln -sf $$files $(NBD_DIR)/ && \
	site=$$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	echo "$(NBD_DIR)" > $$site/system-nbd.pth && \
	$(VPY) -c 'import nbd' 2>/dev/null || echo "warning: the venv's python cannot load the system's libnbd bindings (another Python version?); NBD tests will skip"

# Tools the end-to-end tests drive (curl as a real client, openssl for test
# certificates; losetup, mkfs.ext4 and dmsetup for the disk fault tests;
# qemu-img and qemu-nbd for imaged-client's format conversion, for
# ovirt-imageio's upload/download in the compatibility tests and the NBD
# exports of the NBD backend tests, qemu-io to write into them, nbdinfo to
# look at them, nbdkit for exports qemu-nbd cannot make: without
# multi-conn; Debian's chromium and its chromedriver for the lab page's
# browser test, driven by Selenium, never a downloaded browser), as
# tool:package; and Python modules of the system python as module:package
# (python3-libnbd: the NBD backend and imaged-client's NBD library, see
# venv-nbd). Installed with apt when missing and we may; otherwise the tests
# needing them skip and say why.
SYSDEPS := curl:curl openssl:openssl losetup:mount mkfs.ext4:e2fsprogs dmsetup:dmsetup qemu-nbd:qemu-utils qemu-img:qemu-utils qemu-io:qemu-utils nbdinfo:libnbd-bin nbdkit:nbdkit \
	chromium:chromium chromedriver:chromium-driver
SYSPYDEPS := nbd:python3-libnbd
sysdeps:
	@missing=""; for tp in $(SYSDEPS); do command -v $${tp%%:*} >/dev/null || missing="$$missing $${tp#*:}"; done; \
	for mp in $(SYSPYDEPS); do $(SYSTEM_PYTHON) -c "import $${mp%%:*}" 2>/dev/null || missing="$$missing $${mp#*:}"; done; \
	if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	    else echo "warning: missing$$missing; tests needing them will skip"; fi; \
	fi

# Tools that build the distribution packages (make deb, make rpm) and that
# the packaging tests use, plus the .deb's runtime dependencies so those
# tests run the packaged code on the system python as a host does. Installed
# with apt when missing and we may; otherwise the tests needing them skip.
PACKAGING_DEPS := debhelper dh-python python3-all python3-setuptools lintian \
	rpm cpio systemd python3-gevent python3-bottle python3-yaml python3-libnbd \
	python3-prometheus-client \
	python3-jwt python3-cryptography debootstrap systemd-container

packaging-deps:
	@command -v dpkg-query >/dev/null || exit 0; \
	missing=""; for p in $(PACKAGING_DEPS); do \
	    dpkg-query -W -f='$${db:Status-Status}' $$p 2>/dev/null | grep -qx installed \
	        || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	        apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	            apt-get install -y -qq --no-install-recommends $$missing; \
	    else echo "warning: missing$$missing; packaging tests needing them will skip"; fi; \
	fi

# Distribution packages, built in a temporary copy of the tree, into dist/.
deb: packaging-deps
	packaging/build.sh deb dist

rpm: packaging-deps
	packaging/build.sh rpm dist

# Start the daemon in lab mode (self-signed certificate, local sockets).
run: $(STAMP) venv-nbd
	$(VPY) -m imaged.lab

# The whole test suite.
test: $(STAMP) sysdeps packaging-deps venv-nbd
	$(VPY) -m pytest -q tests

# Benchmarks side by side with nginx and ovirt-imageio (docs/benchmarks.md).
# Not part of `make test`, which runs only the smoke mode (tests/test_bench_smoke.py).
# Extra options: make bench BENCH_ARGS="--reps 3 --keep"
bench: $(STAMP) venv-nbd
	$(VPY) bench/bench.py $(BENCH_ARGS)

bench-smoke: $(STAMP) venv-nbd
	$(VPY) bench/bench.py --smoke $(BENCH_ARGS)

clean:
	rm -rf $(VENV) lab build dist *.egg-info .pytest_cache
