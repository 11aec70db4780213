"""requests over a unix socket: mount UnixAdapter(path) on "http+unix://"."""

import socket

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool


class _Connection(HTTPConnection):
    def __init__(self, path, **kwargs):
        super().__init__("localhost", **kwargs)
        self._path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if isinstance(self.timeout, (int, float)):
            sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class _Pool(HTTPConnectionPool):
    def __init__(self, path, **kwargs):
        super().__init__("localhost", **kwargs)
        self._path = path

    def _new_conn(self):
        self.num_connections += 1
        return _Connection(self._path, timeout=self.timeout.connect_timeout)


class UnixAdapter(HTTPAdapter):
    """Send every request of the mounted prefix to the unix socket `path`."""

    def __init__(self, path):
        super().__init__()
        self._pool = _Pool(path)

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        return self._pool

    def get_connection(self, url, proxies=None):
        return self._pool

    def close(self):
        self._pool.close()
        super().close()
