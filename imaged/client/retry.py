"""
Retrying idempotent requests after transient failures.

Every request of a transfer is idempotent: a GET of a range, a PUT with
Content-Range, a PATCH zero or flush, the JSON queries. A reset connection,
a timeout or a 503 (the server or a proxy in front of it busy or
restarting) is therefore retried on a new connection after an exponential
backoff, and the transfer goes on. A 4xx answer is final: the server
understood and refused (an expired session stays expired).

One Retry is shared by all the connections of a transfer; it counts the
retries for the summary.
"""

import logging
import threading
import time

from . import errors

log = logging.getLogger("imaged.client")

DEFAULT_RETRIES = 5
# First wait; doubled after each failed attempt, up to MAX_DELAY_S. With the
# defaults a request is given up after 0.5+1+2+4+8 = 15.5 s of waits (plus
# its timeouts): long enough for a daemon restart or a proxy failover.
DEFAULT_DELAY_S = 0.5
MAX_DELAY_S = 30.0

# Statuses of a busy or restarting server or proxy.
RETRY_STATUSES = (502, 503, 504)


def transient(e):
    """True if the failure `e` may pass: worth another attempt."""
    if isinstance(e, errors.ConnectionLostError):
        # Includes TransferTimeout; not an abort (see Connection.abort).
        return not getattr(e, "aborted", False)
    if isinstance(e, errors.HTTPError):
        return e.status in RETRY_STATUSES
    return False


class Retry:
    """
    The retry policy of a transfer: up to `retries` more attempts of each
    request, waiting `delay` seconds before the first and twice as long
    before each next one (at most MAX_DELAY_S). `count` is how many
    retries happened, over all connections.
    """

    def __init__(self, retries=DEFAULT_RETRIES, delay=DEFAULT_DELAY_S):
        if retries < 0:
            raise errors.ClientError("retries must not be negative")
        if delay < 0:
            raise errors.ClientError("retry delay must not be negative")
        self.retries = retries
        self.delay = delay
        self.count = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def counted(self):
        """Count a retry made elsewhere (a stale keep-alive connection)."""
        with self._lock:
            self.count += 1

    def stop(self):
        """Wake up every waiting retry: the transfer is being stopped."""
        self._stopped.set()

    def call(self, what, func, reconnect):
        """
        Return func(), calling it again after transient failures.

        `reconnect()` drops the broken connection before the next attempt.
        `what` names the request in messages.
        """
        delay = self.delay
        attempt = 0
        while True:
            try:
                return func()
            except errors.ClientError as e:
                if attempt >= self.retries or not transient(e) or self._stopped.is_set():
                    raise
                attempt += 1
                with self._lock:
                    self.count += 1
                log.warning("%s failed (%s); retry %d of %d in %.1f s",
                            what, e, attempt, self.retries, delay)
                reconnect()
                if self._stopped.wait(delay):
                    raise
                delay = min(delay * 2, MAX_DELAY_S)


# No retries: what callers get when they pass none.
NEVER = Retry(0)
