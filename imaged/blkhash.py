"""
Block based checksum, compatible with ovirt-imageio.

The image is split into blocks of `block_size` bytes (the last one may be
shorter). Each block is hashed, and the raw block digests are hashed in
order by an outer hash of the same kind; the checksum is the hex digest of
the outer hash:

    H(H(block 1) + H(block 2) + ... + H(block N))

Because blocks have fixed boundaries, the digest of an all-zero block can be
computed once and reused, so holes are hashed without reading them.

blake2b and blake2s use a 32 bytes digest (DIGEST_SIZE). The variable
length shake_128 and shake_256 also use a 32 bytes digest; other algorithms
use their natural digest size.
"""

import functools
import hashlib
from typing import NamedTuple

from . import errors
from . import util

ALGORITHM = "blake2b"
BLOCK_SIZE = 4 * 1024**2
DIGEST_SIZE = 32
MIN_BLOCK_SIZE = 1024**2
MAX_BLOCK_SIZE = 16 * 1024**2

# Hashing zeroes in chunks keeps memory bounded for any block size.
_ZERO_CHUNK = bytes(1024**2)

# Runs of zero blocks feed the outer hash this many bytes of repeated zero
# block digests per update() (see Hash.zero_blocks); large enough that
# hashlib releases the GIL and the per-call cost vanishes, small enough
# that the few cached buffers (_zero_digests) stay under 1 MiB in all.
ZERO_RUN_BATCH_BYTES = 256 * 1024


class Block(NamedTuple):
    """A block to hash: `zero` is True if it is known to read as zeroes."""

    start: int
    length: int
    zero: bool


def _new(algorithm):
    if algorithm.startswith("blake2"):
        return hashlib.new(algorithm, digest_size=DIGEST_SIZE)
    return hashlib.new(algorithm)


def _digest(h):
    if h.name.startswith("shake_"):
        return h.digest(DIGEST_SIZE)
    return h.digest()


def _hexdigest(h):
    if h.name.startswith("shake_"):
        return h.hexdigest(DIGEST_SIZE)
    return h.hexdigest()


def algorithms():
    """
    Return the sorted list of usable algorithm names.

    These are hashlib.algorithms_available, like ovirt-imageio reports,
    except the ones that cannot be constructed on this host (e.g. disabled
    by the crypto policy).
    """
    return list(_usable_algorithms())


@functools.lru_cache(maxsize=None)
def _usable_algorithms():
    usable = []
    for name in hashlib.algorithms_available:
        try:
            _hexdigest(_new(name))
        except (ValueError, TypeError):
            continue
        usable.append(name)
    return tuple(sorted(usable))


@functools.lru_cache(maxsize=64)
def _zero_digest(algorithm, length):
    h = _new(algorithm)
    view = memoryview(_ZERO_CHUNK)
    for start in range(0, length, len(_ZERO_CHUNK)):
        h.update(view[:min(len(_ZERO_CHUNK), length - start)])
    return _digest(h)


@functools.lru_cache(maxsize=4)
def _zero_digests(algorithm, block_size):
    digest = _zero_digest(algorithm, block_size)
    return digest * max(1, ZERO_RUN_BATCH_BYTES // len(digest))


def validate(algorithm, block_size):
    """Raise errors.BadRequest unless the checksum arguments are valid."""
    if algorithm not in _usable_algorithms():
        raise errors.BadRequest(
            f"Unsupported algorithm {algorithm!r}, expecting one of: "
            f"{', '.join(_usable_algorithms())}")
    if not isinstance(block_size, int) or isinstance(block_size, bool):
        raise errors.BadRequest(
            f"Invalid block_size {block_size!r}, expecting an integer")
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise errors.BadRequest(
            f"Invalid block_size {block_size}, expecting a value between "
            f"{MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}")
    if block_size % 4096:
        raise errors.BadRequest(
            f"Invalid block_size {block_size}, expecting a multiple of 4096")


def block_digest(block, algorithm=ALGORITHM):
    """The raw digest of one data block, as Hash.update() feeds it."""
    inner = _new(algorithm)
    inner.update(block)
    return _digest(inner)


class BlockHash:
    """
    The digest of one block fed in pieces (a reader whose buffer is smaller
    than a block): update() each piece in order, then digest(), which is
    block_digest() of the whole block.
    """

    def __init__(self, algorithm=ALGORITHM):
        self._h = _new(algorithm)

    def update(self, piece):
        self._h.update(piece)

    def digest(self):
        return _digest(self._h)


def zero_block_digest(length, algorithm=ALGORITHM):
    """The raw digest of an all-zero block of `length` bytes (cached)."""
    return _zero_digest(algorithm, length)


def validate_window(start, block_size):
    """Raise errors.BadRequest unless `start` is on a block boundary."""
    if start % block_size:
        raise errors.BadRequest(
            f"Invalid start {start}, expecting a multiple of block_size {block_size}")


class Hash:
    """
    Incremental block hash.

    Feed every block of the image in order: update() for a block of data,
    zero() for a block known to be all zeroes. Every block must be
    `block_size` bytes except the last one.
    """

    def __init__(self, block_size=BLOCK_SIZE, algorithm=ALGORITHM):
        self.block_size = block_size
        self.algorithm = algorithm
        self._outer = _new(algorithm)

    def update(self, block):
        """Add a data block (any bytes-like object)."""
        self._outer.update(block_digest(block, self.algorithm))

    def zero(self, length):
        """Add an all-zero block of `length` bytes without hashing it."""
        self._outer.update(_zero_digest(self.algorithm, length))

    def zero_blocks(self, count):
        """
        Add `count` all-zero blocks of `block_size` bytes.

        The outer hash gets the same digest `count` times; fed from one
        buffer of repeated digests, which costs the hash of 32 bytes per
        block and no Python per block (a loop of zero() took ~1 us a block:
        1 s for a 512 GiB image in 1 MiB blocks). hashlib releases the GIL
        while hashing such a buffer, so this may run in a pool thread.
        """
        batch = _zero_digests(self.algorithm, self.block_size)
        size = len(_zero_digest(self.algorithm, self.block_size))
        per_update = len(batch) // size
        with memoryview(batch) as view:
            while count > 0:
                n = min(count, per_update)
                self._outer.update(view[:n * size])
                count -= n

    def add_digest(self, digest):
        """Add a block by its raw digest (see block_digest())."""
        self._outer.update(digest)

    def hexdigest(self):
        """Return the checksum of the blocks added so far."""
        return _hexdigest(self._outer)


def split(extents, block_size):
    """
    Split contiguous extents into Block items of `block_size` bytes.

    The last block may be shorter. A block is zero only if every extent
    overlapping it is zero, so small zero extents are hashed as data.
    """
    return _blocks(extents, block_size, zero_runs=False)


def runs(extents, block_size):
    """
    Like split(), but whole zero blocks that follow each other inside a
    zero extent come as one Block (zero, its length a multiple of
    `block_size`), however many there are: a 2**63 byte hole is one item,
    not 2**43. Other blocks come one by one as in split().
    """
    return _blocks(extents, block_size, zero_runs=True)


def _blocks(extents, block_size, zero_runs):
    start = None
    length = 0
    zero = True
    for ext in extents:
        pos = ext.start
        remaining = ext.length
        while remaining:
            if zero_runs and start is None and ext.zero and remaining >= block_size:
                n = remaining // block_size * block_size
                yield Block(pos, n, True)
                pos += n
                remaining -= n
                continue
            if start is None:
                start, length, zero = pos, 0, True
            n = min(remaining, block_size - length)
            length += n
            zero = zero and ext.zero
            pos += n
            remaining -= n
            if length == block_size:
                yield Block(start, length, zero)
                start = None
    if start is not None:
        yield Block(start, length, zero)


def checksum_file(path, block_size=BLOCK_SIZE, algorithm=ALGORITHM):
    """
    Compute the checksum of a local file by reading all of it.

    Independent of the backends and extents, for clients and tests.
    Returns {"algorithm": ..., "block_size": ..., "checksum": ...}.
    """
    h = Hash(block_size, algorithm)
    buf = bytearray(block_size)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = _read_block(f, view)
            if n == 0:
                break
            block = view[:n]
            if util.is_zero(block):
                h.zero(n)
            else:
                h.update(block)
            if n < block_size:
                break
    return {
        "algorithm": algorithm,
        "block_size": block_size,
        "checksum": h.hexdigest(),
    }


def _read_block(f, view):
    """Fill `view` from `f`, returning less only at end of file."""
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            break
        done += n
    return done
