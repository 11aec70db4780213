"""
A throwaway imaged daemon for tests, tools/load.py and bench/bench.py.

    d = Daemon(workdir, cert_file, key_file,
               overrides={"images": {"max_readers": 2},
                          "listeners": {"plain": None,
                                        "local": {"path": "\\0/imaged-x"}}})
    d.start()          # subprocess; returns when it sent READY=1
    ...
    d.stop()           # SIGTERM to its PID; returns the exit status

The config is built from `base_config()` (four loopback listeners named
remote (TLS), plain (TCP), local (unix, images) and control (unix,
sessions and progress), logging to a file in workdir) with `overrides`
merged over it the way config drop-ins merge (mappings key by key, lists
and scalars replaced), and one addition: `listeners` may be a mapping of
listener name to a mapping merged into that listener (None drops it; a
new name adds a listener). A list replaces all the listeners.

The config file exists from construction on (`config_file`), so a test
can run the daemon itself with it; configure() merges more overrides and
rewrites it. Nothing here imports gevent: the benchmark and the load tool
use it from their own processes, and a test process stays free of it.
This module only uses the standard library and PyYAML.
"""

import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Seconds to wait for the daemon to send READY=1, and to exit after SIGTERM.
START_TIMEOUT_S = 20
STOP_TIMEOUT_S = 20

# Poll interval while waiting for READY=1, so a daemon that exits at once
# (a bad config exits with status 2) is reported without waiting it out.
START_POLL_S = 0.1


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def merge(base, overrides):
    """
    A copy of `base` with `overrides` merged over it: mappings key by key,
    anything else replaced. `listeners` given as a mapping merges by
    listener name into a list of listeners (see the module docstring); two
    such mappings merge into one, so overrides can be combined before they
    meet the base config.
    """
    result = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        if key == "listeners" and isinstance(value, dict) \
                and isinstance(result.get(key), list):
            result[key] = merge_listeners(result[key], value)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def merge_listeners(listeners, by_name):
    """`listeners` (a list) with per-name overrides; None drops a listener."""
    result = []
    for lst in listeners:
        name = lst["name"]
        if name not in by_name:
            result.append(copy.deepcopy(lst))
        elif by_name[name] is not None:
            result.append(merge(lst, by_name[name]))
    known = {lst["name"] for lst in listeners}
    for name, value in by_name.items():
        if name not in known and value is not None:
            result.append(dict(copy.deepcopy(value), name=name))
    return result


def ovirt_imageio_config(run_dir, port, cert_file, key_file, local_socket,
                         control_socket, log_file):
    """
    The text of a conf.d file for an ovirt-imageio daemon beside imaged
    (tests and benchmarks): its defaults but for paths, port and
    privileges; TLS on 127.0.0.1:`port`, its local unix socket, control
    over a unix socket, its log into `log_file`.
    """
    return f"""\
[daemon]
run_dir = {run_dir}
drop_privileges = false
systemd_enable = false

[tls]
enable = true
key_file = {key_file}
cert_file = {cert_file}

[remote]
host = 127.0.0.1
port = {port}

[local]
enable = true
socket = {local_socket}

[control]
transport = unix
socket = {control_socket}

[handlers]
keys = logfile

[handler_logfile]
args = ("{log_file}",)
"""


class DaemonError(Exception):
    """The daemon did not start or stop as expected; the message says why."""


class Daemon:
    """
    An imaged subprocess with its own config, sockets and log.

    Attributes callers use: config_file, log_file, control_path, local_path,
    tls_port, tcp_port, cert, key, sock_dir, proc (subprocess.Popen),
    pid, notifications (sd_notify states received), output (its stdout and
    stderr, after stop()).
    """

    def __init__(self, workdir, cert_file, key_file, overrides=None,
                 python=None, sock_dir=None, output_file=None, spawn=None):
        """
        workdir: where the config and the log go (created if missing).
        sock_dir: where the unix sockets go; by default a new short
        directory in /tmp (socket paths are limited to 107 bytes), removed
        by stop(). python: the interpreter to run imaged with (default this
        one). output_file: the daemon's stdout/stderr (default
        workdir/imaged.out). spawn: called like subprocess.Popen to start
        the process (the benchmark tracks its processes with it).
        """
        self.dir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.cert, self.key = cert_file, key_file
        self.python = python or sys.executable
        self._own_sock_dir = sock_dir is None
        self.sock_dir = sock_dir or tempfile.mkdtemp(prefix="imaged-", dir="/tmp")
        self.control_path = os.path.join(self.sock_dir, "control.sock")
        self.local_path = os.path.join(self.sock_dir, "images.sock")
        self.notify_path = os.path.join(self.sock_dir, "notify.sock")
        self.tls_port = free_port()
        self.tcp_port = free_port()
        self.log_file = os.path.join(str(workdir), "imaged.log")
        self.output_file = output_file or os.path.join(str(workdir), "imaged.out")
        self.config_file = os.path.join(str(workdir), "imaged.yaml")
        self._spawn = spawn or subprocess.Popen
        self.proc = None
        self.output = ""
        self.notifications = []
        self._notify = None
        self.config = merge(self.base_config(), overrides)
        self._write_config()

    def base_config(self):
        """The config before overrides: loopback listeners, a log file."""
        return {
            "tls": {"cert_file": self.cert, "key_file": self.key},
            "listeners": [
                {"name": "remote", "kind": "tls", "host": "127.0.0.1",
                 "port": self.tls_port, "apps": ["images"]},
                {"name": "plain", "kind": "tcp", "host": "127.0.0.1",
                 "port": self.tcp_port, "apps": ["images"]},
                {"name": "local", "kind": "unix", "path": self.local_path,
                 "apps": ["images"]},
                {"name": "control", "kind": "unix", "path": self.control_path,
                 "apps": ["sessions", "progress"]},
            ],
            "logging": {"file": self.log_file},
        }

    def configure(self, overrides):
        """Merge more overrides into the config (before start())."""
        self.config = merge(self.config, overrides)
        self._write_config()
        return self

    def listener(self, name):
        """The config of the listener `name` (None if it was dropped)."""
        for lst in self.config["listeners"]:
            if lst["name"] == name:
                return lst
        return None

    def _write_config(self):
        with open(self.config_file, "w") as f:
            yaml.safe_dump(self.config, f)

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def start(self, timeout=START_TIMEOUT_S):
        """Start the daemon and wait for READY=1; returns self."""
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            if os.path.exists(self.notify_path):
                os.unlink(self.notify_path)
            notify.bind(self.notify_path)
        except OSError:
            notify.close()
            raise
        # Kept open until the daemon exited: it also sends STOPPING=1.
        self._notify = notify
        env = dict(os.environ, NOTIFY_SOCKET=self.notify_path)
        with open(self.output_file, "ab") as out:
            self.proc = self._spawn(
                [self.python, "-m", "imaged", "--config", self.config_file],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT)
        try:
            self.wait_notification("READY=1", timeout)
        except DaemonError as e:
            self.stop()
            raise DaemonError(f"imaged did not start: {e}\n"
                              f"{self.output}{self.log_tail()}") from None
        return self

    def wait_notification(self, state, timeout=START_TIMEOUT_S):
        """Wait until the daemon sent `state` (e.g. "STOPPING=1")."""
        deadline = time.monotonic() + timeout
        while state not in self.notifications:
            if self.proc.poll() is not None:
                self._drain_notifications()
                if state in self.notifications:
                    return
                raise DaemonError(f"imaged exited with status {self.proc.returncode} "
                                  f"before {state}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise DaemonError(f"no {state} from imaged within {timeout} s")
            self._notify.settimeout(min(left, START_POLL_S))
            try:
                self.notifications.append(self._notify.recv(4096).decode())
            except socket.timeout:
                pass

    def _drain_notifications(self):
        self._notify.setblocking(False)
        while True:
            try:
                self.notifications.append(self._notify.recv(4096).decode())
            except (BlockingIOError, OSError):
                break

    def stop(self, sig=signal.SIGTERM, timeout=STOP_TIMEOUT_S):
        """
        Stop the daemon (signal its PID, wait, SIGKILL after `timeout`) and
        clean up its sockets; returns its exit status. Idempotent.
        """
        if self.proc is None:
            return None
        if self._notify is None:
            return self.proc.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._drain_notifications()
        self._notify.close()
        self._notify = None
        try:
            with open(self.output_file, errors="replace") as f:
                self.output = f.read()
        except OSError:
            self.output = ""
        if self._own_sock_dir:
            shutil.rmtree(self.sock_dir, ignore_errors=True)
        else:
            for path in (self.notify_path, self.control_path, self.local_path):
                try:
                    os.unlink(path)
                except OSError:
                    pass
        return self.proc.returncode

    def log(self):
        """The daemon's log file so far."""
        try:
            with open(self.log_file, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_tail(self, lines=20):
        return "".join(self.log().splitlines(keepends=True)[-lines:])

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
