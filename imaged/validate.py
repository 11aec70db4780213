"""
Validation of request values: one set of rules for the sessions and the
images APIs.

Every check raises errors.BadRequest with a message naming the field, so a
client (or the host agent) learns exactly what to fix. Values from JSON
bodies and from query strings have their own entry points; the rules behind
them are the same.
"""

from . import errors

# The largest integer any field may hold: offsets, sizes and timeouts all
# end up in 64-bit signed integers somewhere below us.
MAX_INT = 2**63 - 1

# Marks a field without default: it must be given.
REQUIRED = object()


def missing(name):
    """The error for a required field that was not given."""
    return errors.BadRequest(f"missing {name}: required field")


def integer(obj, name, minval=0, maxval=MAX_INT, default=REQUIRED):
    """
    The integer `obj[name]` of a JSON object, within [minval, maxval].

    JSON booleans are not integers here, although Python thinks so.
    """
    if name not in obj:
        if default is REQUIRED:
            raise missing(name)
        return default
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.BadRequest(
            f"invalid {name}: expected an integer, got {value!r:.40}")
    return in_range(name, value, minval, maxval)


def in_range(name, value, minval=0, maxval=MAX_INT):
    """`value` if minval <= value <= maxval, else BadRequest naming `name`."""
    if minval is not None and value < minval:
        raise errors.BadRequest(f"invalid {name}: must be >= {minval}, got {value}")
    if maxval is not None and value > maxval:
        raise errors.BadRequest(f"invalid {name}: too large, at most {maxval}")
    return value


def boolean(obj, name, default=REQUIRED):
    """The boolean `obj[name]` of a JSON object."""
    if name not in obj:
        if default is REQUIRED:
            raise missing(name)
        return default
    value = obj[name]
    if not isinstance(value, bool):
        raise errors.BadRequest(
            f"invalid {name}: expected true or false, got {value!r:.40}")
    return value


def json_object(value, what="body"):
    """`value` if it is a JSON object (dict)."""
    if not isinstance(value, dict):
        raise errors.BadRequest(f"invalid {what}: expected a JSON object")
    return value


def query_integer(query, name, default=REQUIRED, minval=0, maxval=MAX_INT):
    """The integer query parameter `name`: ASCII digits only."""
    raw = query.get(name)
    if raw is None:
        if default is REQUIRED:
            raise missing(name)
        return default
    # isdigit() alone takes "²", which int() refuses; a sign or "_" is no
    # part of a number on the wire.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19:
        raise errors.BadRequest(f"invalid {name}: expected a non-negative integer")
    return in_range(name, int(raw), minval, maxval)


def query_choice(query, name, choices, default):
    """The query parameter `name`, one of `choices`."""
    value = query.get(name, default)
    if value not in choices:
        raise errors.BadRequest(
            f"invalid {name}: expected one of {', '.join(choices)}, got {value!r:.40}")
    return value


def filename(obj, name, max_chars):
    """
    An optional file name to offer a browser: 1 to `max_chars` printable
    characters, none of them a quote, slash or backslash, no leading or
    trailing space, not "." or "..". Such a name needs no escaping in a
    header (quotes and backslashes would, and browsers unescape them
    differently) and is no path on any file system.
    """
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise errors.BadRequest(f"invalid {name}: expected a string, got {value!r:.40}")
    if not 0 < len(value) <= max_chars:
        raise errors.BadRequest(
            f"invalid {name}: expected 1-{max_chars} characters, got {len(value)}")
    # isprintable() is False for control characters (CR, LF, NUL, DEL,
    # C1), line and paragraph separators, format characters and lone
    # surrogates: none may reach a header or a user's file system.
    if not value.isprintable() or set(value) & _FILENAME_FORBIDDEN \
            or value in (".", "..") or value != value.strip():
        raise errors.BadRequest(
            f'invalid {name}: no control characters, quotes, "/" or "\\", '
            f'leading or trailing spaces')
    return value


_FILENAME_FORBIDDEN = set('"/\\')


def printable(obj, name, max_chars, default=None):
    """An optional printable string of at most `max_chars` characters."""
    value = obj.get(name, default)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_chars or not value.isprintable():
        # It may go into log lines: no newline may forge one.
        raise errors.BadRequest(
            f"invalid {name}: expected a printable string of at most {max_chars} characters")
    return value
