"""
The daemon: builds the apps and listeners from the config, runs until
SIGTERM/SIGINT, then stops cleanly.

Start-up order matters: every listener is bound before READY=1 is sent to
systemd, so a client started after the unit is up always finds the sockets.
Shutdown cancels all sessions first, so running transfers end as failures
(never as a reported success) before the listeners close.
"""

import logging
import os
import signal
import socket

import gevent
import gevent.event
import gevent.hub

from . import metrics
from . import sessions
from . import server
from . import tls
from .apps import images as images_app
from .apps import metrics as metrics_app
from .apps import progress as progress_app
from .apps import sessions as sessions_app
from .apps import ui as ui_app

log = logging.getLogger("daemon")


class Daemon:
    """The running imaged: registry, reaper and listeners."""

    def __init__(self, cfg):
        self.config = cfg
        self.metrics = metrics.Metrics()
        self.registry = sessions.Registry(
            remove_timeout_s=cfg["sessions"]["remove_timeout_s"],
            lock_factory=_thread_lock,
            threads_per_session=cfg["threads"]["per_session"],
            metrics=self.metrics)
        self.metrics.watch(self.registry, self._open_connections)
        self.reaper = sessions.Reaper(
            self.registry, cfg["sessions"]["reaper_interval_s"])
        self.listeners = []
        self._stopped = gevent.event.Event()

    def start(self):
        """Bind every listener and start serving; raises OSError on failure."""
        if any(lst["kind"] == "tls" for lst in self.config["listeners"]):
            tls.check_key_file(self.config["tls"]["key_file"])
        hub = gevent.get_hub()
        hub.threadpool.maxsize = self.config["threads"]["pool_size"]
        apps = self._make_apps()
        try:
            for lst in self.config["listeners"]:
                mounted = {}
                for name in lst["apps"]:
                    for prefix in apps[name][0]:
                        mounted[prefix] = apps[name][1]
                listener = server.Listener(
                    lst, server.Dispatcher(mounted), self.config["tls"], self.config,
                    metrics=self.metrics)
                self.listeners.append(listener)
        except BaseException:
            self._close_listeners(0)
            raise
        for listener in self.listeners:
            listener.start()
        self.reaper.start()
        # Before READY=1: a stop request right after it must be handled.
        self._install_signal_handlers()
        log.info("imaged ready")
        sd_notify("READY=1")

    def _make_apps(self):
        images = images_app.make_app(
            self.registry, self.config, unix_socket=self._local_socket())
        return {
            "images": (images_app.PREFIXES, images),
            "sessions": (sessions_app.PREFIXES,
                         sessions_app.make_app(self.registry, self.config)),
            "progress": (("/progress/",),
                         progress_app.make_app(self.registry, self.config)),
            "metrics": (metrics_app.PREFIXES, metrics_app.make_app(self.metrics)),
            "ui": (ui_app.PREFIXES, ui_app.make_app(self.config)),
        }

    def _open_connections(self):
        return sum(len(lst.server.links) for lst in self.listeners)

    def _local_socket(self):
        """The unix socket serving images, reported to clients in OPTIONS."""
        for lst in self.config["listeners"]:
            if lst["kind"] == "unix" and "images" in lst["apps"]:
                return lst["path"]
        return None

    def serve_forever(self):
        """Run until SIGTERM or SIGINT has stopped the daemon."""
        self._stopped.wait()

    def _install_signal_handlers(self):
        # A shell starting us in the background leaves SIGINT ignored, and
        # an ignored signal stays ignored: take it back first.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        gevent.signal_handler(signal.SIGTERM, self._on_signal, "SIGTERM")
        gevent.signal_handler(signal.SIGINT, self._on_signal, "SIGINT")

    def _on_signal(self, name):
        log.info("received %s, stopping", name)
        gevent.spawn(self.stop)

    def stop(self):
        """Abort transfers, close listeners; safe to call twice."""
        if self._stopped.is_set():
            return
        sd_notify("STOPPING=1")
        self.reaper.stop()
        # Cancel first: a transfer cut by the shutdown must end as a failure.
        self.registry.cancel_all()
        self._close_listeners(self.config["server"]["stop_timeout_s"])
        log.info("imaged stopped")
        self._stopped.set()

    def _close_listeners(self, timeout):
        # All at once: the grace period is shared, not paid per listener.
        for listener in self.listeners:
            listener.close()
        gevent.joinall([gevent.spawn(self._stop_listener, lst, timeout)
                        for lst in self.listeners])

    @staticmethod
    def _stop_listener(listener, timeout):
        try:
            listener.stop(timeout)
        except Exception:
            log.exception("stopping listener %s failed", listener.name)


def _thread_lock():
    # Read-modify-write runs in threadpool threads: it needs a real thread
    # lock, not the gevent one monkey patching would give.
    from gevent import monkey
    return monkey.get_original("threading", "Lock")()


def sd_notify(state):
    """Tell systemd our state (the sd_notify datagram protocol); no-op
    outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", addr, e)
