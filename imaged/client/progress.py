"""
Progress reporting: a bar on a terminal, periodic lines in logs, JSON lines
for programs.

The library reports through the `Progress` interface; workers call
update() from several threads at once, so implementations lock. A transfer
has phases ("upload" or "download", then "verify" with --verify); each is
start()ed with its total and end()ed, also when it fails.
"""

import json
import os
import shutil
import threading
import time

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_size(n):
    """1536 -> '1.50 KiB'."""
    n = float(n)
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{int(n)} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds):
    """65.2 -> '0:01:05'; None -> '-:--:--' (unknown)."""
    if seconds is None:
        return "-:--:--"
    seconds = int(seconds + 0.5)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """
    Receives the progress of an operation; this base class ignores it.

    Subclass it to follow a transfer from a program (the methods may be
    called from worker threads).
    """

    def start(self, phase, total):
        """A phase begins; `total` bytes to do (None when unknown)."""

    def update(self, count):
        """`count` more bytes done."""

    def end(self):
        """The current phase ended (done, failed or interrupted)."""


class Snapshot:
    """Where a phase is: bytes done, rate and time left."""

    def __init__(self, phase, done, total, elapsed):
        self.phase = phase
        self.done = done
        self.total = total
        self.elapsed = elapsed
        self.rate = done / elapsed if elapsed > 0 else 0.0
        if total is not None and self.rate > 0:
            self.eta = max(total - done, 0) / self.rate
        else:
            self.eta = None

    @property
    def percent(self):
        if not self.total:
            return 100.0 if self.total == 0 else None
        return 100.0 * self.done / self.total

    def to_dict(self):
        return {
            "phase": self.phase,
            "done": self.done,
            "total": self.total,
            "elapsed": round(self.elapsed, 3),
            "rate": round(self.rate),
            "eta": None if self.eta is None else round(self.eta, 1),
        }


class _Reporter(Progress):
    """Tracks a phase and emits a report at most every `interval` seconds."""

    def __init__(self, stream, interval, clock=time.monotonic):
        self.stream = stream
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._phase = None
        self._total = None
        self._done = 0
        self._started = 0.0
        self._last_emit = 0.0

    def start(self, phase, total):
        with self._lock:
            self._phase, self._total, self._done = phase, total, 0
            self._started = self._last_emit = self._clock()
            self._emit(self._snapshot(self._started), final=False, first=True)

    def update(self, count):
        with self._lock:
            if self._phase is None:
                return
            self._done += count
            now = self._clock()
            if now - self._last_emit >= self.interval:
                self._last_emit = now
                self._emit(self._snapshot(now), final=False, first=False)

    def end(self):
        with self._lock:
            if self._phase is None:
                return
            self._emit(self._snapshot(self._clock()), final=True, first=False)
            self._phase = None

    def _snapshot(self, now):
        return Snapshot(self._phase, self._done, self._total, now - self._started)

    def _emit(self, snap, final, first):
        raise NotImplementedError

    def _write(self, text):
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            # A closed pipe must not fail the transfer.
            pass


def _describe(snap):
    pct = snap.percent
    pct = "   ?%" if pct is None else f"{pct:5.1f}%"
    total = "?" if snap.total is None else format_size(snap.total)
    return pct, f"{format_size(snap.done)} / {total}", f"{format_size(snap.rate)}/s"


class Bar(_Reporter):
    """A one-line bar redrawn in place on a terminal."""

    def __init__(self, stream, interval=0.1, width=None, clock=time.monotonic):
        super().__init__(stream, interval, clock)
        self._width = width

    def _columns(self):
        if self._width:
            return self._width
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = shutil.get_terminal_size((80, 24)).columns
        # Some terminals (a bare pty) report no size.
        return columns if columns >= 20 else 80

    def _emit(self, snap, final, first):
        width = self._columns()
        pct, _, rate = _describe(snap)
        total = "?" if snap.total is None else format_size(snap.total)
        # Fixed width fields keep the bar from jumping as numbers change.
        amount = f"{format_size(snap.done):>10} / {total}"
        when = format_duration(snap.elapsed) if final else \
            "ETA " + format_duration(snap.eta)
        tail = f"{amount}  {rate:>12}  {when:>11}"
        head = f"{snap.phase:<8} {pct} "
        room = width - len(head) - len(tail) - 4
        if room >= 10:
            frac = min((snap.percent or 0.0) / 100, 1.0)
            filled = int(room * frac)
            bar = "[" + "#" * filled + "." * (room - filled) + "] "
        else:
            bar = ""
        line = (head + bar + tail)[:max(width - 1, 1)]
        self._write("\r" + line.ljust(max(width - 1, 1)) + ("\n" if final else ""))


class Lines(_Reporter):
    """A progress line every `interval` seconds, and one at the end (logs)."""

    def __init__(self, stream, interval=10.0, prefix="imaged-client: ",
                 clock=time.monotonic):
        super().__init__(stream, interval, clock)
        self.prefix = prefix

    def _emit(self, snap, final, first):
        if first:
            return
        pct, amount, rate = _describe(snap)
        if final:
            text = (f"{snap.phase}: {pct.strip()} {amount} in "
                    f"{snap.elapsed:.1f} s, {rate}")
        else:
            text = (f"{snap.phase}: {pct.strip()} {amount}, {rate}, "
                    f"ETA {format_duration(snap.eta)}")
        self._write(f"{self.prefix}{text}\n")


class JsonLines(_Reporter):
    """
    One JSON object per line: {"event": "progress", "phase", "done",
    "total", "elapsed", "rate", "eta", "end"}.
    """

    def __init__(self, stream, interval=1.0, clock=time.monotonic):
        super().__init__(stream, interval, clock)

    def _emit(self, snap, final, first):
        event = {"event": "progress"}
        event.update(snap.to_dict())
        event["end"] = final
        self._write(json.dumps(event) + "\n")
