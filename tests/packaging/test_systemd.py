"""
The .deb under a real systemd: boot a Debian container with
`systemd-nspawn -b` on a debootstrapped root, install the package built by
packaging/build.sh, and let tests/packaging/systemd_check.py (run inside by
a oneshot unit) check that `systemctl start imaged` returns once the daemon
is ready, that a transfer works through the sandbox (TLS, O_DIRECT,
fallocate, fsync, SEEK_DATA, the local abstract socket, the control socket),
that the sandbox is applied, and that `systemctl stop imaged` exits cleanly.

The container has its own network namespace (only loopback), so port 54322
inside never meets anything on the host. The debootstrapped root is cached
in $IMAGED_NSPAWN_CACHE (default /var/cache/imaged-tests) per Debian release
and package list: the first run takes a few minutes more (debootstrap from
the mirror apt is configured with), later runs copy it.

Needs root, a Debian host (the root matches its release, so the .deb's
python dependency fits), debootstrap, systemd-nspawn (systemd-container)
and the .deb build tools (make packaging-deps); skips saying what is
missing otherwise.
"""

import fcntl
import glob
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "packaging" / "build.sh"
CHECK_SCRIPT = Path(__file__).with_name("systemd_check.py")

pytestmark = pytest.mark.slow

CACHE_DIR = Path(os.environ.get("IMAGED_NSPAWN_CACHE", "/var/cache/imaged-tests"))
DEFAULT_MIRROR = "http://deb.debian.org/debian"

# Besides the .deb's own dependencies: systemd as init, and the tools the
# check script uses.
BASE_PACKAGES = ["systemd", "systemd-sysv", "dbus", "python3", "openssl",
                 "ca-certificates"]

DEBOOTSTRAP_TIMEOUT_S = 900
BOOT_TIMEOUT_S = 240

# The unit's LimitNOFILE: the container needs a hard limit this high.
UNIT_NOFILE = 65536

NSPAWN = ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit"]


def need_tools():
    if os.geteuid() != 0:
        pytest.skip("booting a container needs root")
    missing = [t for t in ("debootstrap", "systemd-nspawn", "dpkg-buildpackage")
               if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (debootstrap, "
                    f"systemd-container; make packaging-deps for the build tools)")


def host_release():
    info = {}
    with open("/etc/os-release") as f:
        for line in f:
            key, _, value = line.strip().partition("=")
            info[key] = value.strip('"')
    if info.get("ID") != "debian" or not info.get("VERSION_CODENAME"):
        pytest.skip("needs a Debian host: the container root matches its release "
                    f"(this is {info.get('PRETTY_NAME', 'unknown')})")
    return info["VERSION_CODENAME"]


def mirror():
    """The Debian mirror apt uses here (deb822 or one-line sources)."""
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        with open(path) as f:
            text = f.read()
        for stanza in text.split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            if "deb" in fields.get("Types", "").split() \
                    and not fields.get("Enabled", "yes") == "no" \
                    and "security" not in fields.get("URIs", "") \
                    and fields.get("URIs"):
                return fields["URIs"].split()[0]
    if os.path.exists("/etc/apt/sources.list"):
        with open("/etc/apt/sources.list") as f:
            for line in f:
                parts = line.split()
                if parts[:1] == ["deb"] and "security" not in line:
                    return next(p for p in parts[1:] if not p.startswith("["))
    return DEFAULT_MIRROR


def deb_depends():
    """Binary package names the .deb depends on (first of alternatives)."""
    control = (ROOT / "packaging" / "debian" / "control").read_text()
    stanza = control.split("\nPackage:", 1)[1]
    depends = re.search(r"^Depends:(.*(?:\n[ \t].*)*)", stanza, re.M).group(1)
    names = []
    for item in depends.split(","):
        first = item.split("|")[0].strip()
        if first and not first.startswith("$"):
            names.append(first.split()[0])
    return names


def base_root(codename):
    """The cached debootstrapped root for `codename`; made if missing."""
    depends = sorted(set(deb_depends()) - set(BASE_PACKAGES))
    key = hashlib.sha256(" ".join([codename] + BASE_PACKAGES + depends).encode()
                         ).hexdigest()[:12]
    root = CACHE_DIR / f"{codename}-systemd-{key}"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as lock:
        # One debootstrap at a time, also across test processes.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / ".complete").exists():
            return root
        tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=CACHE_DIR))
        try:
            # It becomes "/" in the container: mkdtemp's 0700 would keep
            # every user but root out of the whole tree.
            os.chmod(tmp, 0o755)
            r = subprocess.run(
                ["debootstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES),
                 codename, str(tmp), mirror()],
                capture_output=True, text=True, timeout=DEBOOTSTRAP_TIMEOUT_S)
            if r.returncode != 0:
                pytest.skip(f"debootstrap {codename} from {mirror()} failed "
                            f"(rc {r.returncode}): {r.stdout[-800:]} {r.stderr[-800:]}")
            # The .deb's dependencies with apt inside, which (unlike
            # debootstrap's --include) resolves virtual packages, such as
            # python3-cryptography's python3-cffi-backend-api-min.
            r = subprocess.run(
                NSPAWN + ["-D", str(tmp), "--pipe", "--setenv=DEBIAN_FRONTEND=noninteractive",
                          "--", "sh", "-c", "apt-get update -q && apt-get install -y -q "
                          "--no-install-recommends " + " ".join(depends) + " && apt-get clean"],
                capture_output=True, text=True, timeout=DEBOOTSTRAP_TIMEOUT_S)
            if r.returncode != 0:
                pytest.skip(f"installing the .deb's dependencies from {mirror()} failed "
                            f"(rc {r.returncode}): {r.stdout[-800:]} {r.stderr[-800:]}")
            # The journal on disk, for the failure message of a test.
            (tmp / "var" / "log" / "journal").mkdir(parents=True, exist_ok=True)
            (tmp / ".complete").touch()
            tmp.rename(root)
            # Roots for other package lists are stale now: ~300 MiB each.
            for old in CACHE_DIR.glob(f"{codename}-systemd-*"):
                if old != root and (old / ".complete").exists():
                    shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return root


@pytest.fixture(scope="module")
def deb(tmp_path_factory):
    need_tools()
    out = tmp_path_factory.mktemp("deb")
    r = subprocess.run([str(BUILD), "deb", str(out)], capture_output=True, text=True,
                       env=dict(os.environ, LINTIAN="0"), timeout=900)
    assert r.returncode == 0, f"build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    (path,) = glob.glob(str(out / "imaged_*_all.deb"))
    return Path(path)


def nspawn(root, *argv, timeout=300):
    return subprocess.run(NSPAWN + ["-D", str(root), "--pipe", "--", *argv],
                          capture_output=True, text=True, timeout=timeout)


def prepare(root, deb):
    """Install the .deb and the check unit into the container root."""
    # debootstrap leaves no /etc/hosts; clients of the check say "localhost".
    hosts = root / "etc" / "hosts"
    if not hosts.exists():
        hosts.write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n")
    shutil.copy(deb, root / "root" / deb.name)
    r = nspawn(root, "dpkg", "-i", f"/root/{deb.name}")
    assert r.returncode == 0, f"dpkg -i failed:\n{r.stdout}\n{r.stderr}"
    # The check starts the daemon itself: `systemctl start` is what it tests.
    r = nspawn(root, "systemctl", "disable", "imaged.service")
    assert r.returncode == 0, r.stderr
    shutil.copy(CHECK_SCRIPT, root / "usr" / "local" / "bin" / "imaged-systemd-check")
    os.chmod(root / "usr" / "local" / "bin" / "imaged-systemd-check", 0o755)
    unit = root / "etc" / "systemd" / "system" / "imaged-check.service"
    unit.write_text(
        "[Unit]\n"
        "Description=check imaged.service (tests/packaging/test_systemd.py)\n"
        "After=multi-user.target\n"
        "[Service]\n"
        "Type=oneshot\n"
        "ExecStart=/usr/local/bin/imaged-systemd-check\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n")
    # The bus and logins are not needed (systemctl talks to PID 1 over its
    # private socket), and where the machine denies dbus its inotify
    # watches their start times out and holds the boot up by minutes.
    for unit_name in ("dbus.service", "dbus.socket", "systemd-logind.service"):
        masked = root / "etc" / "systemd" / "system" / unit_name
        if not masked.exists():
            masked.symlink_to("/dev/null")
    wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    (wants / "imaged-check.service").symlink_to("/etc/systemd/system/imaged-check.service")
    adapted = []
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < UNIT_NOFILE:
        # Without CAP_SYS_RESOURCE (a container host), nothing inside can
        # raise the hard limit to the unit's; a host's systemd can.
        dropin = root / "etc" / "systemd" / "system" / "imaged.service.d"
        dropin.mkdir(parents=True, exist_ok=True)
        (dropin / "test-nofile.conf").write_text(f"[Service]\nLimitNOFILE={hard}\n")
        adapted.append(f"LimitNOFILE={hard} (this machine's hard limit)")
    return adapted


def boot(root, results):
    """Boot the container until the check powers it off; returns its output."""
    argv = NSPAWN + ["-D", str(root), "-b", "--private-network", "--console=pipe",
                     f"--bind={results}:/results"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=BOOT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()        # nspawn halts the container on SIGTERM
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    return proc.returncode, out.decode(errors="replace")


def container_journal(root):
    r = subprocess.run(["journalctl", "-D", str(root / "var" / "log" / "journal"),
                        "--no-pager", "-o", "short-monotonic"],
                       capture_output=True, text=True, timeout=60)
    return r.stdout[-6000:]


def test_imaged_service_under_systemd(deb, tmp_path):
    codename = host_release()
    base = base_root(codename)
    root = tmp_path / "root"
    r = subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(root)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    os.chmod(root, 0o755)
    try:
        adapted = prepare(root, deb)
        results = tmp_path / "results"
        results.mkdir()
        rc, output = boot(root, results)
        result_file = results / "result.json"
        if not result_file.exists():
            journal = container_journal(root)
            if "Reached target" not in journal and "Startup finished" not in journal:
                pytest.skip("systemd did not boot in systemd-nspawn on this machine "
                            f"(nspawn rc {rc}): {output[-1500:]} {journal[-1500:]}")
            pytest.fail(f"the check did not finish (nspawn rc {rc}):\n{output[-3000:]}\n"
                        f"{journal}")
        result = json.loads(result_file.read_text())
        failed = [c for c in result["checks"] if not c["ok"]]
        report = "\n".join(f"{'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}"
                           for c in result["checks"])
        print(f"adapted for this machine: {adapted or 'nothing'}\n{report}")
        assert not failed, f"{report}\n\njournal of imaged:\n{result['journal'][-4000:]}"
        names = {c["name"] for c in result["checks"]}
        # Every step ran (a crash midway records fewer checks).
        for name in ("systemctl start imaged", "upload over TLS (O_DIRECT write, fsync)",
                     "systemctl stop imaged exits cleanly", "journal without errors"):
            assert name in names, report
    finally:
        shutil.rmtree(root, ignore_errors=True)
