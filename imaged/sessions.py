"""
Sessions: what a client may do with which image, for how long.

The host agent adds a session through the control API; the images service
looks it up by id for every request and runs its operations under it.
Sessions live only in memory: after a restart the engine installs new ones.

A session knows its running operations, so that removing or expiring it can
cancel them and wait until they stop. Operations check `Operation.check()`
between chunks; a canceled operation also gets its `on_cancel` callback
called (the images service closes the client connection there, which wakes a
greenlet blocked on a slow client at once).
"""

import hashlib
import logging
import re
import time

import gevent
import gevent.event
import gevent.lock

from . import backends
from . import config
from . import errors
from . import metrics as metrics_
from . import validate
from .ranges import RangeSet

log = logging.getLogger("sessions")

OPS = ("read", "write")

# Fields the engine gives; everything else in a session is state. The
# engine's ImageTicket.toDict() sends all of them but `filename` (only for
# browser transfers) and `dirty` (only engines with incremental backup).
_SPEC_FIELDS = ("uuid", "url", "size", "ops", "timeout", "sparse",
                "inactivity_timeout", "transfer_id", "dirty", "filename")

# Unknown keys in session bodies are ignored, so that a newer engine keeps
# working, and logged once per key name. The set of names already logged is
# bounded: the control API must not grow memory with every odd key sent.
_MAX_LOGGED_UNKNOWN = 64
_logged_unknown = set()

# File names offered to browsers (Content-Disposition): what file systems
# take for a name.
FILENAME_MAX_CHARS = 255

# Session ids go into URLs as the last path component.
_ID_RE = re.compile(r"^[A-Za-z0-9._~-]{1,128}$")

# What logs show of a session id.
_SHOWN_ID_CHARS = 8

# Throughput sampling for the progress API.
_SAMPLE_INTERVAL_S = 0.5
_MAX_SAMPLES = 64


def check_id(session_id):
    """Raise BadRequest unless `session_id` can name a session."""
    if not isinstance(session_id, str) or not _ID_RE.match(session_id) \
            or session_id in (".", ".."):
        raise errors.BadRequest(
            "invalid session id: expected 1-128 characters of A-Z a-z 0-9 . _ ~ -")


def short_id(session_id):
    """What logs may show of a secret session id."""
    return session_id[:_SHOWN_ID_CHARS] + "..."


def name_of(spec):
    """What logs show for the session of `spec` (see Session.name)."""
    return spec["transfer_id"] or short_id(spec["uuid"])


def parse_spec(session_id, body):
    """
    Validate a session description from the engine.

    Returns a normalized dict of the engine's fields. Raises BadRequest with
    a message naming the field.
    """
    check_id(session_id)
    if not isinstance(body, dict):
        raise errors.BadRequest("invalid session: expected a JSON object")
    for key in body:
        if key not in _SPEC_FIELDS:
            _log_unknown(key)

    uuid = body.get("uuid", session_id)
    if uuid != session_id:
        raise errors.BadRequest("invalid uuid: must equal the id in the URL")

    spec = {"uuid": session_id}
    spec["url"] = _url(body)
    spec["size"] = validate.integer(body, "size")
    spec["ops"] = _ops(body)
    spec["timeout"] = validate.integer(body, "timeout")
    spec["sparse"] = validate.boolean(body, "sparse", default=False)
    # The session may list dirty extents (incremental backup, SPEC 8).
    spec["dirty"] = validate.boolean(body, "dirty", default=False)
    spec["inactivity_timeout"] = _inactivity_timeout(body)
    spec["transfer_id"] = validate.printable(body, "transfer_id", 256)
    spec["filename"] = validate.filename(body, "filename", FILENAME_MAX_CHARS)
    return spec


def _log_unknown(key):
    if key in _logged_unknown or len(_logged_unknown) >= _MAX_LOGGED_UNKNOWN:
        return
    _logged_unknown.add(key)
    # repr() and a cap: a key name must not forge or flood a log line.
    log.info("session field %.60r is not known to this version: ignored", key)


def _inactivity_timeout(body):
    """
    The session's inactivity timeout in seconds, or None for the daemon's.

    The engine's ImageTicket holds it in a Java int that defaults to 0 and
    always sends it: 0 (or null) means "not set", as ovirt-imageio reads
    it. A socket cannot wait longer than MAX_TIMEOUT_S: refuse what the
    daemon could not honour instead of failing on the first upload.
    """
    if body.get("inactivity_timeout") is None:
        return None
    return validate.integer(body, "inactivity_timeout", minval=0,
                            maxval=config.MAX_TIMEOUT_S) or None


def _ops(body):
    if "ops" not in body:
        raise validate.missing("ops")
    ops = body["ops"]
    if not isinstance(ops, list) or not ops or \
            any(op not in OPS for op in ops):
        raise errors.BadRequest(
            f"invalid ops: expected a non-empty list of 'read', 'write', got {ops!r:.60}")
    # Keep a stable order so an identical re-add compares equal.
    return [op for op in OPS if op in ops]


def _url(body):
    if "url" not in body:
        raise validate.missing("url")
    url = body["url"]
    backends.check_url(url)
    return url


class Operation:
    """
    One running GET/PUT/PATCH/checksum on a session.

    `done` grows as bytes are moved; `check()` raises Canceled once the
    session is gone, so loops stop within one chunk.
    """

    def __init__(self, kind, offset=0, length=0, on_cancel=None):
        self.kind = kind
        self.offset = offset
        self.length = length
        self.done = 0
        self.started = time.monotonic()
        self.on_cancel = on_cancel
        self.canceled = False
        self.session = None

    def check(self):
        if self.canceled:
            raise errors.Canceled("session was canceled, expired or removed")

    def progress(self, count):
        """Record `count` more bytes done."""
        self.done += count
        if self.session is not None:
            self.session.moved(count, self.kind)

    def cancel(self):
        if self.canceled:
            return
        self.canceled = True
        if self.on_cancel is not None:
            try:
                self.on_cancel()
            except Exception:
                log.exception("on_cancel of %s operation failed", self.kind)

    def info(self):
        return {
            "kind": self.kind,
            "offset": self.offset,
            "length": self.length,
            "done": self.done,
        }


class Session:
    """An authorization to read and/or write one image for a while."""

    # Operations that move image data count as transferred.
    _COUNTED = ("read", "write", "zero")

    def __init__(self, spec, clock=time.monotonic, threads=8, metrics=metrics_.NULL):
        self._clock = clock
        self._metrics = metrics
        self.spec = spec
        self.id = spec["uuid"]
        self.url = spec["url"]
        self.size = spec["size"]
        self.ops = spec["ops"]
        self.sparse = spec["sparse"]
        self.inactivity_timeout = spec["inactivity_timeout"]
        self.transfer_id = spec["transfer_id"]
        self.filename = spec["filename"]
        self.dirty = spec["dirty"]
        self.expires = clock() + spec["timeout"]
        self.canceled = False
        self.connections = 0
        self._operations = set()
        self._done = RangeSet()
        self._idle = gevent.event.Event()
        self._idle.set()
        self._last_activity = clock()
        # Throughput: bytes moved (overlaps counted again) and samples of
        # (time, bytes moved).
        self._moved = 0
        self._samples = []
        # Shared by every connection of the session: read-modify-write of an
        # unaligned edge block must not race with a neighbour's write.
        self.rmw_lock = None
        # Pool threads this session may hold: a session on dead storage
        # must not take every thread of the pool.
        self.thread_slots = gevent.lock.BoundedSemaphore(threads)
        # Called with the session when it is canceled: connections keeping
        # its image open close it.
        self._closers = []
        # Digest of the token that granted this session (imaged.tokens);
        # None for sessions added over the control API.
        self.token_key = None

    @property
    def name(self):
        """What logs show for this session: never the secret id."""
        return self.transfer_id or short_id(self.id)

    def may(self, op):
        """A write session may also read, as in ovirt-imageio."""
        if op == "read":
            return "read" in self.ops or "write" in self.ops
        return op in self.ops

    def authorize(self, op):
        """Raise Forbidden unless the session is usable for `op`."""
        if self.canceled:
            raise errors.Forbidden("session was canceled")
        if self.expired():
            raise errors.Forbidden("session expired")
        if not self.may(op):
            raise errors.Forbidden(f"session does not allow {op}")

    def expired(self):
        return self._clock() >= self.expires

    def extend(self, timeout):
        self.expires = self._clock() + timeout

    def touch(self):
        self._last_activity = self._clock()

    def idle_time(self):
        if self._operations:
            return 0.0
        return self._clock() - self._last_activity

    @property
    def active(self):
        return bool(self._operations)

    def add_operation(self, op):
        """Start tracking `op`; raises Forbidden if the session is unusable."""
        if self.canceled:
            raise errors.Forbidden("session was canceled")
        if self.expired():
            raise errors.Forbidden("session expired")
        op.session = self
        self._operations.add(op)
        self._idle.clear()
        self.touch()

    def remove_operation(self, op):
        if op not in self._operations:
            return
        self._operations.discard(op)
        if op.kind in self._COUNTED and op.done:
            self._done.add(op.offset, op.offset + op.done)
        self.touch()
        if not self._operations:
            self._idle.set()

    def count_operations(self, kinds):
        return sum(1 for op in self._operations if op.kind in kinds)

    def operations(self):
        return list(self._operations)

    def transferred(self):
        """Bytes moved by finished and ongoing operations, counted once."""
        ongoing = [(op.offset, op.offset + op.done)
                   for op in self._operations
                   if op.kind in self._COUNTED and op.done]
        return self._done.total(extra=ongoing)

    def add_closer(self, func):
        self._closers.append(func)

    def remove_closer(self, func):
        if func in self._closers:
            self._closers.remove(func)

    def cancel(self):
        """Cancel the session and every running operation."""
        self.canceled = True
        for op in list(self._operations):
            op.cancel()
        for func in list(self._closers):
            try:
                func(self)
            except Exception:
                log.exception("session %s: closing the image failed", self.name)

    def wait_idle(self, timeout):
        """Wait until no operation runs; returns False on timeout."""
        return self._idle.wait(timeout)

    def moved(self, count, kind):
        """An operation moved `count` more bytes (see Operation.progress)."""
        now = self._clock()
        self._last_activity = now
        if kind in self._COUNTED:
            self._metrics.moved(kind, count)
            self._moved += count
            # One sample per interval keeps the history small however many
            # chunks move.
            if not self._samples or now - self._samples[-1][0] >= _SAMPLE_INTERVAL_S:
                self._samples.append((now, self._moved))
                if len(self._samples) > _MAX_SAMPLES:
                    del self._samples[0]

    def throughput(self, window_s=5.0):
        """Bytes per second moved over the last `window_s` seconds."""
        now = self._clock()
        start = now - window_s
        # Baseline: the newest sample at or before the window start, or the
        # oldest one inside the window.
        base = None
        for t, b in self._samples:
            if t > start and base is not None:
                break
            base = (t, b)
            if t > start:
                break
        if base is None or now - base[0] <= 0:
            return 0.0
        return (self._moved - base[1]) / (now - base[0])

    def info(self):
        """The control API view of the session."""
        d = dict(self.spec)
        for key in ("inactivity_timeout", "transfer_id", "filename"):
            if d[key] is None:
                del d[key]
        d.update({
            # Whole seconds, as ovirt-imageio reports them (the engine and
            # Vdsm read integers).
            "expires": int(self.expires),
            "active": self.active,
            "transferred": self.transferred(),
            "connections": self.connections,
            "idle_time": int(self.idle_time()),
            "canceled": self.canceled,
        })
        return d


def _key(session_id):
    # Sessions are found by a digest of their id: how long a lookup takes
    # then tells a prober nothing about how much of a guessed id is right.
    return hashlib.sha256(session_id.encode("utf-8", "surrogateescape")).digest()


class Registry:
    """All sessions of the daemon, by id."""

    def __init__(self, remove_timeout_s=60.0, clock=time.monotonic,
                 lock_factory=None, threads_per_session=8, metrics=metrics_.NULL):
        # The daemon's imaged.metrics.Metrics; the images service reports
        # to it too.
        self.metrics = metrics
        self._sessions = {}
        # Sessions granted by signed tokens (imaged.tokens), by a digest of
        # the token: never reachable by their id alone.
        self._token_sessions = {}
        self._threads_per_session = threads_per_session
        self._clock = clock
        self.remove_timeout_s = remove_timeout_s
        self._lock_factory = lock_factory

    def add(self, spec):
        """
        Add a session from a validated spec (see parse_spec).

        Re-adding the same id with identical content only renews the
        timeout; with other content it raises Conflict.
        """
        key = _key(spec["uuid"])
        old = self._sessions.get(key)
        if old is not None and not old.canceled:
            if _same(old.spec, spec):
                old.extend(spec["timeout"])
                return old
            raise errors.Conflict("a session with this id exists with other content")
        session = Session(spec, clock=self._clock,
                          threads=self._threads_per_session, metrics=self.metrics)
        if self._lock_factory is not None:
            session.rmw_lock = self._lock_factory()
        self._sessions[key] = session
        log.info("session %s added: ops=%s size=%d timeout=%d",
                 session.name, ",".join(session.ops), session.size,
                 spec["timeout"])
        return session

    def token_session(self, key):
        """The live session made from the token with digest `key`, or None."""
        session = self._token_sessions.get(key)
        if session is None or session.canceled:
            return None
        return session

    def add_token_session(self, key, spec, max_sessions):
        """
        Add the session a verified token grants (see imaged.tokens); it
        expires with the token. Raises ServiceUnavailable when
        `max_sessions` token sessions are live.
        """
        if len(self._token_sessions) >= max_sessions:
            self.reap()
            if len(self._token_sessions) >= max_sessions:
                raise errors.ServiceUnavailable("too many token sessions, try later")
        # Its bytes count in the daemon's metrics like any session's.
        session = Session(spec, clock=self._clock,
                          threads=self._threads_per_session, metrics=self.metrics)
        session.token_key = key
        if self._lock_factory is not None:
            session.rmw_lock = self._lock_factory()
        self._token_sessions[key] = session
        log.info("session %s granted by a token: ops=%s size=%d for %d s",
                 session.name, ",".join(session.ops), session.size,
                 int(spec["timeout"]))
        return session

    def get(self, session_id):
        """Return a live session or raise NotFound."""
        session = self._sessions.get(_key(session_id))
        if session is None:
            raise errors.NotFound("no such session")
        return session

    def authorize(self, session_id, op):
        """
        Return the session if it allows `op` now.

        Unknown, expired and canceled sessions all answer Forbidden for the
        images service: a stranger learns nothing from the status.
        """
        session = self._sessions.get(_key(session_id))
        if session is None:
            raise errors.Forbidden("no such session, or it expired")
        session.authorize(op)
        return session

    def extend(self, session_id, timeout):
        session = self.get(session_id)
        session.extend(timeout)
        log.info("session %s extended by %d s", session.name, timeout)
        return session

    def remove(self, session_id):
        """
        Remove a session, cancel its operations and wait for them to stop.

        Unknown ids are fine (DELETE is idempotent). Raises Conflict if the
        operations do not stop within remove_timeout_s; the session stays
        canceled and is removed once they stop.
        """
        session = self._sessions.get(_key(session_id))
        if session is None:
            return
        self._cancel_and_wait(session)

    def remove_all(self):
        """Remove every session; raises Conflict if some did not stop."""
        busy = 0
        for session in list(self._sessions.values()):
            try:
                self._cancel_and_wait(session)
            except errors.Conflict:
                busy += 1
        if busy:
            raise errors.Conflict(f"{busy} sessions still have running operations")

    def _cancel_and_wait(self, session):
        session.cancel()
        if not session.wait_idle(self.remove_timeout_s):
            log.warning("session %s: operations did not stop within %s s",
                        session.name, self.remove_timeout_s)
            gevent.spawn(self._remove_when_idle, session)
            raise errors.Conflict("session operations did not stop in time")
        self._drop(session)

    def _remove_when_idle(self, session):
        session.wait_idle(None)
        self._drop(session)

    def _drop(self, session):
        if session.token_key is not None:
            if self._token_sessions.get(session.token_key) is session:
                del self._token_sessions[session.token_key]
                log.info("session %s (token) removed, transferred=%d",
                         session.name, session.transferred())
            return
        key = _key(session.id)
        if self._sessions.get(key) is session:
            del self._sessions[key]
            log.info("session %s removed, transferred=%d",
                     session.name, session.transferred())

    def sessions(self):
        """The sessions added over the control API."""
        return list(self._sessions.values())

    def token_sessions(self):
        """The sessions granted by signed tokens (imaged.tokens)."""
        return list(self._token_sessions.values())

    def reap(self):
        """Cancel and drop expired sessions; returns how many expired."""
        count = 0
        for session in list(self._sessions.values()) + list(self._token_sessions.values()):
            if session.expired() and not session.canceled:
                log.info("session %s expired", session.name)
                session.cancel()
                count += 1
                if session.active:
                    gevent.spawn(self._remove_when_idle, session)
                else:
                    self._drop(session)
        if count:
            self.metrics.expired(count)
        return count

    def cancel_all(self):
        """Cancel every session's operations (daemon shutdown)."""
        for session in list(self._sessions.values()) + list(self._token_sessions.values()):
            session.cancel()

    def __len__(self):
        return len(self._sessions)


def _same(a, b):
    # A timeout difference is a renewal, not other content.
    return {k: v for k, v in a.items() if k != "timeout"} == \
        {k: v for k, v in b.items() if k != "timeout"}


class Reaper:
    """A greenlet removing expired sessions every `interval_s` seconds."""

    def __init__(self, registry, interval_s):
        self._registry = registry
        self._interval_s = interval_s
        self._greenlet = None

    def start(self):
        self._greenlet = gevent.spawn(self._run)

    def stop(self):
        if self._greenlet is not None:
            self._greenlet.kill()
            self._greenlet = None

    def _run(self):
        while True:
            gevent.sleep(self._interval_s)
            try:
                self._registry.reap()
            except Exception:
                log.exception("reaping sessions failed")
