"""
Byte ranges: HTTP Range / Content-Range parsing and a set of merged ranges.

Parsing follows RFC 9110 section 14 for the single-range forms the images
API supports; everything else is refused with a clear error.
"""

import bisect
import re

from . import errors

_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")
_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(\d+)\s*-\s*(\d+|\*)\s*/\s*(\d+|\*)\s*$")

# Longer numbers are not offsets in any image.
_MAX_DIGITS = 20


def _too_long(digits):
    # Leading zeros are allowed (RFC 9110 numbers are 1*DIGIT).
    return len(digits.lstrip("0")) > _MAX_DIGITS


def parse_range(header, size):
    """
    Parse a GET `Range` header against a resource of `size` bytes.

    Returns (offset, length). Supports `bytes=a-b`, `bytes=a-` and
    `bytes=-n`. Multiple ranges, malformed headers and ranges that do not
    fit in [0, size) raise RangeNotSatisfiable carrying `size`.
    """
    if "," in header:
        raise errors.RangeNotSatisfiable("multiple ranges are not supported", size)
    m = _RANGE_RE.match(header)
    if not m or (not m.group(1) and not m.group(2)) or \
            _too_long(m.group(1)) or _too_long(m.group(2)):
        raise errors.RangeNotSatisfiable(f"invalid range: {header!r:.80}", size)
    first, last = m.group(1), m.group(2)
    if not first:
        # Suffix range: the last n bytes.
        n = int(last)
        if n == 0 or size == 0:
            raise errors.RangeNotSatisfiable("empty suffix range", size)
        n = min(n, size)
        return size - n, n
    first = int(first)
    if first >= size:
        raise errors.RangeNotSatisfiable(
            f"range starts at {first}, beyond the image size {size}", size)
    if not last:
        return first, size - first
    last = int(last)
    if last < first:
        raise errors.RangeNotSatisfiable(f"invalid range: {header!r:.80}", size)
    if last >= size:
        # RFC 9110 allows clipping, but ovirt-imageio clients expect exact
        # ranges: asking past the end is a client bug worth reporting.
        raise errors.RangeNotSatisfiable(
            f"range ends at {last}, beyond the image size {size}", size)
    return first, last - first + 1


def parse_content_range(header):
    """
    Parse a PUT `Content-Range: bytes a-b/*` (or `/total`) header.

    Returns (offset, last or None). Raises BadRequest when malformed.
    """
    m = _CONTENT_RANGE_RE.match(header)
    if not m or any(_too_long(g) for g in m.groups()):
        raise errors.BadRequest(f"invalid Content-Range: {header!r:.80}")
    first = int(m.group(1))
    last = None if m.group(2) == "*" else int(m.group(2))
    if last is not None and last < first:
        raise errors.BadRequest(f"invalid Content-Range: {header!r:.80}")
    return first, last


class RangeSet:
    """
    A set of half-open byte ranges [start, end), kept merged and sorted.

    Used to count transferred bytes once, however often a client reads or
    writes the same range.
    """

    def __init__(self):
        self._starts = []
        self._ends = []

    def add(self, start, end):
        if end <= start:
            return
        # Find every range touching [start, end] and merge them.
        i = bisect.bisect_left(self._ends, start)
        j = bisect.bisect_right(self._starts, end)
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    def total(self, extra=()):
        """Bytes covered, including the `extra` (start, end) ranges."""
        if not extra:
            return sum(e - s for s, e in zip(self._starts, self._ends))
        merged = RangeSet()
        merged._starts = list(self._starts)
        merged._ends = list(self._ends)
        for s, e in extra:
            merged.add(s, e)
        return merged.total()

    def __iter__(self):
        return iter(zip(self._starts, self._ends))

    def __len__(self):
        return len(self._starts)
