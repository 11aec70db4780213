"""
Fixtures of the client tests.

Most tests share one daemon per module (`server`): starting a daemon costs
about a second, and every test uses its own session and files. Tests that
stop or break the daemon use the function scoped `daemon` fixture.
"""

import functools

import pytest

from tests.client import common
from tests.conftest import Daemon


@pytest.fixture(scope="module")
def server(tmp_path_factory, tls_files):
    """A started imaged shared by the tests of a module."""
    d = Daemon(tmp_path_factory.mktemp("daemon"), tls_files).start()
    yield d
    d.stop()


@pytest.fixture
def relays():
    """
    Factory: relays(cls, daemon, *args, **kwargs) -> a common.Relay of class
    `cls` to the daemon's plain TCP port; all are closed at the end of the
    test.
    """
    made = []

    def make(cls, daemon, *args, **kwargs):
        r = cls(("127.0.0.1", daemon.tcp_port), *args, **kwargs)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.fixture
def slow_proxy(relays):
    """Factory: slow_proxy(daemon, rate) -> common.SlowProxy to the daemon."""
    return functools.partial(relays, common.SlowProxy)


@pytest.fixture
def old_server(tmp_path):
    """An images server without OPTIONS, PATCH or extents, on tmp_path/old.raw."""
    s = common.OldServer(str(tmp_path / "old.raw"))
    yield s
    s.close()
