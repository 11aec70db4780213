"""
Distribution packages: build the .deb and the .rpm the way `make deb` and
`make rpm` do (packaging/build.sh, from a clean copy of the tree), check
what they contain, then extract each into a temporary root and run the
packaged imaged from there, as a host would after installing it.

Slow: each build takes seconds to a minute. `make test` (and so CI) installs
the packaging tools first (make packaging-deps); where they are missing, the
tests that need them skip and say what to install.
"""

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "packaging" / "build.sh"
SYSTEMD_DIR = ROOT / "packaging" / "systemd"

with open(ROOT / "imaged" / "__init__.py") as f:
    VERSION = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)

pytestmark = pytest.mark.slow

# Files both packages must install (paths on the host).
COMMON_FILES = [
    "/usr/bin/imaged",
    "/usr/bin/imaged-client",
    "/etc/imaged/imaged.yaml",
    "/etc/imaged/conf.d/README",
    "/usr/lib/sysusers.d/imaged.conf",
    "/usr/lib/tmpfiles.d/imaged.conf",
    "/usr/libexec/imaged/check-pki",
    "/usr/share/imaged/imaged.yaml",
]

# Secrets never belong in a package: every host installs its own.
KEY_PATTERN = re.compile(r"\.(pem|key|crt|p12|pfx)$")


def need(*tools):
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed "
                    f"(on Debian, make packaging-deps installs it)")


def build(kind, outdir):
    """Run packaging/build.sh; returns its output, fails the test on error."""
    r = subprocess.run([str(BUILD), kind, str(outdir)], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=600)
    if r.returncode != 0:
        pytest.fail(f"packaging/build.sh {kind} failed ({r.returncode}):\n"
                    f"{r.stdout[-10000:]}")
    return r.stdout


@dataclass
class Package:
    path: Path      # the built .deb or .rpm
    outdir: Path    # build.sh output directory
    root: Path      # the package extracted, as if installed into /
    sitelib: Path   # where its Python package landed, inside root


def runtime_python():
    """
    The interpreter to run the packaged code with.

    On a host, /usr/bin/imaged runs on /usr/bin/python3 with the
    distribution's python3-gevent, -bottle, -yaml and -prometheus-client;
    make packaging-deps
    installs those here, so normally the test does the same. Where the
    system python lacks them (a developer machine without root), use this
    venv's python instead: it has the same libraries from PyPI, and
    PYTHONPATH still makes it import the packaged code, not the source tree
    (test_*_imports_packaged_code checks that).
    """
    system = "/usr/bin/python3"
    if os.path.exists(system):
        r = subprocess.run([system, "-c", "import gevent, bottle, yaml, prometheus_client"],
                           capture_output=True)
        if r.returncode == 0:
            return system
    return sys.executable


def packaged_env(pkg):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "NOTIFY_SOCKET")}
    env["PYTHONPATH"] = str(pkg.sitelib)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def packaged_module_file(pkg):
    """Where imaged.main comes from when running the packaged code."""
    r = subprocess.run(
        [runtime_python(), "-c", "import imaged.main; print(imaged.main.__file__)"],
        cwd=pkg.root, env=packaged_env(pkg), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def run_packaged(pkg, script, *args):
    """Run a packaged script (path inside the package) with its code."""
    return subprocess.run(
        [runtime_python(), str(pkg.root / script.lstrip("/")), *map(str, args)],
        cwd=pkg.root, env=packaged_env(pkg), capture_output=True, text=True,
        timeout=60)


def source_modules():
    """The package's modules, as paths relative to the imaged/ directory."""
    base = ROOT / "imaged"
    return sorted(str(p.relative_to(base)) for p in base.rglob("*.py")
                  if "__pycache__" not in p.parts)


def unit_path(pkg):
    """The unit inside the extracted package (/lib or /usr/lib)."""
    for d in ("lib/systemd/system", "usr/lib/systemd/system"):
        p = pkg.root / d / "imaged.service"
        if p.exists():
            return p
    pytest.fail("imaged.service is not in the package")


# The .deb

@pytest.fixture(scope="module")
def deb(tmp_path_factory):
    need("dpkg-buildpackage", "dh", "dpkg-deb")
    out = tmp_path_factory.mktemp("deb-out")
    build("deb", out)
    debs = glob.glob(str(out / "imaged_*_all.deb"))
    assert len(debs) == 1, debs
    root = tmp_path_factory.mktemp("deb-root")
    subprocess.run(["dpkg-deb", "-x", debs[0], str(root)], check=True)
    return Package(Path(debs[0]), out, root,
                   root / "usr" / "lib" / "python3" / "dist-packages")


def deb_field(deb, name):
    return subprocess.run(["dpkg-deb", "-f", str(deb.path), name], check=True,
                          capture_output=True, text=True).stdout.strip()


def test_deb_control(deb):
    assert deb_field(deb, "Package") == "imaged"
    assert deb_field(deb, "Version") == f"{VERSION}-1"
    assert deb_field(deb, "Architecture") == "all"
    depends = deb_field(deb, "Depends")
    # Runtime libraries from Debian, and systemd-sysusers for the user.
    for dep in ("python3-gevent", "python3-bottle", "python3-yaml",
                "python3-libnbd", "python3-prometheus-client", "systemd-sysusers",
                "python3:any"):
        assert dep in depends, depends


def test_deb_files(deb):
    listing = subprocess.run(["dpkg-deb", "-c", str(deb.path)], check=True,
                             capture_output=True, text=True).stdout
    # "mode owner size date time ./path[ -> target]"
    files = {line.split()[5][1:].rstrip("/") for line in listing.splitlines()}
    for path in COMMON_FILES + [
            "/usr/share/doc/imaged/install.md",
            "/usr/share/doc/imaged/copyright",
            "/etc/pki/imaged"]:
        assert path in files, f"{path} not in the .deb"
    assert "/lib/systemd/system/imaged.service" in files \
        or "/usr/lib/systemd/system/imaged.service" in files
    site = "/usr/lib/python3/dist-packages"
    for module in source_modules():
        assert f"{site}/imaged/{module}" in files, f"imaged/{module} not in the .deb"
    assert f"{site}/imaged-{VERSION}.egg-info" in files
    assert not [f for f in files if KEY_PATTERN.search(f)], "a key in the package"
    assert not [f for f in files if f.startswith("/etc/pki/imaged/")]
    assert not [f for f in files if f.startswith(f"{site}/tests")]


def test_deb_installs_project_files_unchanged(deb):
    pairs = [
        ("etc/imaged/imaged.yaml", ROOT / "config" / "imaged.yaml"),
        ("etc/imaged/conf.d/README", ROOT / "config" / "conf.d" / "README"),
        ("usr/lib/sysusers.d/imaged.conf", SYSTEMD_DIR / "imaged.sysusers"),
        ("usr/lib/tmpfiles.d/imaged.conf", SYSTEMD_DIR / "imaged.tmpfiles"),
        ("usr/libexec/imaged/check-pki", SYSTEMD_DIR / "check-pki"),
    ]
    for installed, source in pairs:
        assert (deb.root / installed).read_text() == source.read_text(), installed
    assert unit_path(deb).read_text() == (SYSTEMD_DIR / "imaged.service").read_text()
    assert os.access(deb.root / "usr/libexec/imaged/check-pki", os.X_OK)
    # The entry point runs on the distribution's python, like every
    # Debian python application.
    with open(deb.root / "usr/bin/imaged") as f:
        assert f.readline().strip() == "#!/usr/bin/python3"


def test_deb_maintainer_scripts(deb, tmp_path):
    control = tmp_path / "DEBIAN"
    subprocess.run(["dpkg-deb", "-e", str(deb.path), str(control)], check=True)
    # The config survives upgrades with local changes (dpkg asks).
    assert sorted((control / "conffiles").read_text().split()) == \
        ["/etc/imaged/conf.d/README", "/etc/imaged/imaged.yaml"]
    postinst = (control / "postinst").read_text()
    # User before /run/imaged (owned by it) before the service starts.
    sysusers = postinst.index("systemd-sysusers")
    tmpfiles = postinst.index("systemd-tmpfiles")
    enable = postinst.index("deb-systemd-helper enable 'imaged.service'")
    start = postinst.index("deb-systemd-invoke")
    assert sysusers < tmpfiles < start
    assert enable < start
    assert "imaged.service" in (control / "prerm").read_text()
    assert "imaged.service" in (control / "postrm").read_text()


def test_deb_lintian(deb):
    report = deb.outdir / "lintian.txt"
    if not report.exists():
        need("lintian")
        pytest.fail("lintian is installed but build.sh did not run it")
    errors = [line for line in report.read_text().splitlines()
              if line.startswith("E:")]
    assert not errors, "\n".join(errors)


def test_deb_imports_packaged_code(deb):
    assert packaged_module_file(deb) == str(deb.sitelib / "imaged" / "main.py")


def test_deb_version(deb):
    r = run_packaged(deb, "/usr/bin/imaged", "--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"imaged {VERSION}"


def test_deb_config_check(deb):
    r = run_packaged(deb, "/usr/bin/imaged",
                     "--config", deb.root / "etc/imaged/imaged.yaml", "--check")
    assert r.returncode == 0, r.stderr
    assert "configuration is valid" in r.stdout


def test_deb_check_pki(deb, tmp_path):
    # The shipped config with the TLS files moved into tmp_path, so the
    # result does not depend on this machine's /etc/pki.
    with open(deb.root / "etc/imaged/imaged.yaml") as f:
        cfg = yaml.safe_load(f)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cfg["tls"].update(cert_file=str(cert), key_file=str(key))
    config_file = tmp_path / "imaged.yaml"
    config_file.write_text(yaml.safe_dump(cfg))

    r = run_packaged(deb, "/usr/libexec/imaged/check-pki", config_file)
    assert r.returncode == 2
    assert f"tls.cert_file {cert}" in r.stderr
    assert f"tls.key_file {key}" in r.stderr
    assert "/usr/share/doc/imaged/install.md" in r.stderr

    cert.write_text("certificate\n")
    key.write_text("key\n")
    r = run_packaged(deb, "/usr/libexec/imaged/check-pki", config_file)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""

    # An invalid config is the daemon's to report, with exit status 2,
    # which the unit does not retry (it would retry a failed ExecStartPre).
    config_file.write_text("listeners: []\n")
    r = run_packaged(deb, "/usr/libexec/imaged/check-pki", config_file)
    assert r.returncode == 0, r.stderr
    r = run_packaged(deb, "/usr/bin/imaged", "--config", config_file)
    assert r.returncode == 2
    assert "listeners" in r.stderr


def test_deb_daemon_starts_and_stops(deb, tmp_path):
    """The packaged daemon serves and speaks sd_notify, as under the unit."""
    sock_dir = tempfile.mkdtemp(prefix="imaged-pkg-", dir="/tmp")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config_file = tmp_path / "imaged.yaml"
        config_file.write_text(yaml.safe_dump({"listeners": [
            {"name": "plain", "kind": "tcp", "host": "127.0.0.1", "port": port,
             "apps": ["images"]},
            {"name": "control", "kind": "unix",
             "path": os.path.join(sock_dir, "control.sock"),
             "apps": ["sessions", "progress"]},
        ]}))
        notify_path = os.path.join(sock_dir, "notify.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(notify_path)
            notify.settimeout(20)
            env = dict(packaged_env(deb), NOTIFY_SOCKET=notify_path)
            proc = subprocess.Popen(
                [runtime_python(), str(deb.root / "usr/bin/imaged"),
                 "--config", str(config_file)],
                cwd=deb.root, env=env, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True)
            try:
                assert notify.recv(4096) == b"READY=1"
                assert os.path.exists(os.path.join(sock_dir, "control.sock"))
                proc.send_signal(signal.SIGTERM)
                assert notify.recv(4096) == b"STOPPING=1"
                assert proc.wait(20) == 0, proc.stdout.read()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_deb_unit_verifies(deb):
    need("systemd-analyze")
    unit = unit_path(deb)
    # --root: the commands the unit runs must exist in the package itself.
    # --recursive-errors=no: the root holds only this package, not the
    # units it is ordered against (network.target, sysinit.target, ...).
    r = subprocess.run(
        ["systemd-analyze", "verify", "--recursive-errors=no", f"--root={deb.root}",
         str(unit)], capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr + r.stdout


# The .rpm

@pytest.fixture(scope="module")
def rpm(tmp_path_factory):
    # On Debian rpmbuild comes with the rpm package (make packaging-deps);
    # the build then skips the BuildRequires check (see build.sh), since
    # nothing on Debian is an RPM package.
    need("rpmbuild", "rpm", "rpm2cpio", "cpio")
    out = tmp_path_factory.mktemp("rpm-out")
    build("rpm", out)
    rpms = glob.glob(str(out / "imaged-*.noarch.rpm"))
    assert len(rpms) == 1, rpms
    root = tmp_path_factory.mktemp("rpm-root")
    subprocess.run(f"rpm2cpio '{rpms[0]}' | cpio -idm --quiet", shell=True,
                   cwd=root, check=True)
    sitelibs = glob.glob(str(root / "usr/lib/python3*/site-packages"))
    assert len(sitelibs) == 1, sitelibs
    return Package(Path(rpms[0]), out, root, Path(sitelibs[0]))


def rpm_query(rpm, *args):
    return subprocess.run(["rpm", "-qp", *args, str(rpm.path)], check=True,
                          capture_output=True, text=True).stdout


def test_rpm_header(rpm):
    assert rpm_query(rpm, "--qf", "%{NAME} %{VERSION} %{ARCH}") \
        == f"imaged {VERSION} noarch"
    requires = rpm_query(rpm, "--requires")
    for dep in ("python3-gevent", "python3-bottle", "python3-pyyaml",
                "python3-libnbd", "python3-prometheus_client"):
        assert dep in requires, requires


def test_rpm_files(rpm):
    flags = {}
    for line in rpm_query(rpm, "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]").splitlines():
        path, _, fflags = line.partition(" ")
        flags[path] = fflags
    for path in COMMON_FILES + ["/usr/lib/systemd/system/imaged.service",
                                "/etc/pki/imaged", "/run/imaged"]:
        assert path in flags, f"{path} not in the .rpm"
    # %config(noreplace): local changes survive upgrades (new one: .rpmnew).
    assert set(flags["/etc/imaged/imaged.yaml"]) >= {"c", "n"}
    # Created at boot by tmpfiles.d, only owned by the package.
    assert "g" in flags["/run/imaged"]
    docs = [p for p in flags if re.fullmatch(r"/usr/share/doc/imaged[^/]*/install\.md", p)]
    assert docs and "d" in flags[docs[0]]
    site = str(rpm.sitelib.relative_to(rpm.root))
    for module in source_modules():
        assert f"/{site}/imaged/{module}" in flags, f"imaged/{module} not in the .rpm"
    assert not [f for f in flags if KEY_PATTERN.search(f)], "a key in the package"
    assert not [f for f in flags if f.startswith("/etc/pki/imaged/")]


def test_rpm_scriptlets(rpm):
    scripts = rpm_query(rpm, "--scripts")
    sections = dict(re.findall(
        r"^(\w+) scriptlet \(using /bin/sh\):\n(.*?)(?=^\w+ scriptlet|\Z)",
        scripts, re.M | re.S))
    assert set(sections) >= {"preinstall", "postinstall", "preuninstall",
                             "postuninstall"}, scripts
    assert "imaged" in sections["preinstall"]          # the system user
    assert "imaged.service" in sections["postinstall"]
    assert "imaged.conf" in sections["postinstall"]    # tmpfiles
    assert "imaged.service" in sections["preuninstall"]
    assert "imaged.service" in sections["postuninstall"]


def test_rpm_imports_packaged_code(rpm):
    assert packaged_module_file(rpm) == str(rpm.sitelib / "imaged" / "main.py")


def test_rpm_runs(rpm):
    r = run_packaged(rpm, "/usr/bin/imaged", "--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"imaged {VERSION}"
    r = run_packaged(rpm, "/usr/bin/imaged",
                     "--config", rpm.root / "etc/imaged/imaged.yaml", "--check")
    assert r.returncode == 0, r.stderr


def test_rpm_spec_parses():
    """rpmspec -P: the spec and its macro fallbacks expand cleanly."""
    need("rpmspec")
    r = subprocess.run(
        ["rpmspec", "-q", "--qf", "%{VERSION}\n", "--define",
         f"_sourcedir {SYSTEMD_DIR}", str(ROOT / "packaging/rpm/imaged.spec")],
        capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [VERSION]
