"""
Metrics: what the daemon did, in the Prometheus text format (GET /metrics).

One `Metrics` per daemon, with its own CollectorRegistry (never the
process-global one, so two daemons in one process, as in tests, do not mix
their figures). The rest of the daemon calls a few plain methods; nothing
here knows HTTP but `render()`.

Cost on the data path: bytes are counted once per chunk (8 MiB by
default), never per byte or per send; the counter for each operation kind
is looked up once, here, so a chunk costs one Counter.inc(): a lock and an
addition, ~1 us (timeit on the shared benchmark machine), against the
~3 ms it takes to move 8 MiB at 3 GB/s: 0.03%, below what `make bench`
can see (docs/benchmarks.md, "Metrics"). Gauges (sessions, connections) are
computed when scraped, not maintained on the data path.
"""

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST

# Operation kinds whose bytes are counted (what a client moves).
BYTE_OPS = ("read", "write", "zero")

# Methods imaged answers; anything else a client sends is counted as
# "other", so a stranger cannot grow the label set without bound.
METHODS = ("GET", "PUT", "PATCH", "POST", "DELETE", "OPTIONS", "HEAD")

# Request durations span 1 ms (a 4 KiB read, an OPTIONS) to hours (a
# multi-TiB upload on one request).
DURATION_BUCKETS_S = (0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10, 60, 300, 1800,
                      float("inf"))


class Metrics:
    """The daemon's counters and gauges, in a private registry."""

    CONTENT_TYPE = CONTENT_TYPE

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._bytes = Counter(
            "imaged_bytes", "Image bytes moved by clients, by operation",
            ["op"], registry=r)
        # One child per kind, resolved once: labels() per chunk would cost
        # a dict lookup and a lock more.
        self._bytes_by_op = {op: self._bytes.labels(op) for op in BYTE_OPS}
        self._requests = Counter(
            "imaged_requests", "HTTP requests answered, by method and status",
            ["method", "status"], registry=r)
        self._duration = Histogram(
            "imaged_request_duration_seconds",
            "Time from a request's arrival to the end of its answer",
            ["method"], buckets=DURATION_BUCKETS_S, registry=r)
        self._operations = Counter(
            "imaged_operations", "Finished operations, by kind and result "
            "(ok, canceled, client gone, error)", ["op", "result"], registry=r)
        # Children of the per-request metrics by their labels, looked up
        # once each: labels() takes a lock and builds its key every time
        # (timeit: request() 6.7 -> 2.1 us, operation() 1.9 -> 0.7). Keyed by
        # the labels, never by what a client sent: bounded sets.
        self._request_children = {}
        self._operation_children = {}
        self._aborted = Counter(
            "imaged_operations_aborted",
            "Operations that did not complete (canceled, client gone, error)",
            ["op"], registry=r)
        self._expired = Counter(
            "imaged_sessions_expired", "Sessions removed by the reaper on expiry",
            registry=r)
        self._sessions = Gauge(
            "imaged_sessions", "Sessions installed over the control API", registry=r)
        self._token_sessions = Gauge(
            "imaged_token_sessions", "Live sessions granted by signed tokens",
            registry=r)
        self._active = Gauge(
            "imaged_sessions_active", "Sessions with a running operation "
            "(token sessions included)", registry=r)
        self._connections = Gauge(
            "imaged_connections_open", "Open client connections, all listeners",
            registry=r)

    def watch(self, registry, connections):
        """
        Compute the gauges when scraped: sessions of `registry` (an
        imaged.sessions.Registry), and `connections()`, the number of open
        client connections.
        """
        self._sessions.set_function(lambda: len(registry))
        self._token_sessions.set_function(lambda: len(registry.token_sessions()))
        self._active.set_function(
            lambda: sum(1 for s in registry.sessions() + registry.token_sessions()
                        if s.active))
        self._connections.set_function(connections)

    # Hooks, called by the rest of the daemon.

    def moved(self, op, count):
        """An operation of kind `op` moved `count` more bytes."""
        counter = self._bytes_by_op.get(op)
        if counter is not None:
            counter.inc(count)

    def request(self, method, status, seconds):
        """A request was answered (`status` None: no answer was sent)."""
        if method not in METHODS:
            method = "other"
        children = self._request_children.get((method, status))
        if children is None:
            children = self._request_children[(method, status)] = (
                self._requests.labels(method, str(status or "none")),
                self._duration.labels(method))
        children[0].inc()
        children[1].observe(seconds)

    def operation(self, op, result):
        """An operation ended with `result`."""
        child = self._operation_children.get((op, result))
        if child is None:
            child = self._operation_children[(op, result)] = \
                self._operations.labels(op, result)
        child.inc()
        if result != "ok":
            self._aborted.labels(op).inc()

    def expired(self, count=1):
        self._expired.inc(count)

    def render(self):
        """The exposition in the Prometheus text format (bytes)."""
        return prometheus_client.generate_latest(self.registry)


class Null:
    """Metrics that count nothing: for objects built without a daemon."""

    def moved(self, op, count):
        pass

    def request(self, method, status, seconds):
        pass

    def operation(self, op, result):
        pass

    def expired(self, count=1):
        pass


NULL = Null()
