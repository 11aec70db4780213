import hashlib

import pytest

from imaged import blkhash
from imaged import errors
from imaged.backends import Extent
from imaged.backends.file import FileBackend

MiB = 1024**2


def reference(data, block_size, algorithm="blake2b"):
    """The checksum as specified, computed the obvious way."""
    def new():
        if algorithm.startswith("blake2"):
            return hashlib.new(algorithm, digest_size=32)
        return hashlib.new(algorithm)

    def digest(h):
        return h.digest(32) if algorithm.startswith("shake") else h.digest()

    outer = new()
    for start in range(0, len(data), block_size):
        inner = new()
        inner.update(data[start:start + block_size])
        outer.update(digest(inner))
    return outer.hexdigest(32) if algorithm.startswith("shake") \
        else outer.hexdigest()


def checksum_with_extents(path, block_size=blkhash.BLOCK_SIZE,
                          algorithm=blkhash.ALGORITHM):
    """Compute the checksum like the daemon: read only the data blocks."""
    h = blkhash.Hash(block_size, algorithm)
    buf = bytearray(block_size)
    zero_blocks = 0
    with FileBackend(path, "r") as b:
        for block in blkhash.split(b.extents(), block_size):
            if block.zero:
                h.zero(block.length)
                zero_blocks += 1
            else:
                view = memoryview(buf)[:block.length]
                assert b.readinto(block.start, view) == block.length
                h.update(view)
    return h.hexdigest(), zero_blocks


SPEC_DATA = b"x" * (5 * MiB) + b"\0" * (3 * MiB) + b"y" * 100


def test_reference_value():
    outer = hashlib.blake2b(digest_size=32)
    for start in range(0, len(SPEC_DATA), 4 * MiB):
        block = SPEC_DATA[start:start + 4 * MiB]
        outer.update(hashlib.blake2b(block, digest_size=32).digest())
    assert reference(SPEC_DATA, 4 * MiB) == outer.hexdigest()


def test_checksum_file(tmp_path):
    path = tmp_path / "image"
    path.write_bytes(SPEC_DATA)
    assert blkhash.checksum_file(str(path)) == {
        "algorithm": "blake2b",
        "block_size": 4 * MiB,
        "checksum": reference(SPEC_DATA, 4 * MiB),
    }


def test_checksum_sparse_with_extents(tmp_path):
    path = tmp_path / "image"
    with open(path, "wb") as f:
        f.write(b"x" * (5 * MiB))
        f.seek(8 * MiB)
        f.write(b"y" * 100)
    checksum, _ = checksum_with_extents(str(path))
    assert checksum == reference(SPEC_DATA, 4 * MiB)
    assert checksum == blkhash.checksum_file(str(path))["checksum"]


def test_checksum_zero_blocks(tmp_path):
    # Blocks 2 and 3 are holes, hashed with the zero block digest.
    data = b"x" * (5 * MiB) + bytes(11 * MiB) + b"y" * 100
    path = tmp_path / "image"
    with open(path, "wb") as f:
        f.write(data[:5 * MiB])
        f.seek(16 * MiB)
        f.write(b"y" * 100)
    checksum, zero_blocks = checksum_with_extents(str(path))
    assert zero_blocks == 2
    assert checksum == reference(data, 4 * MiB)
    assert blkhash.checksum_file(str(path))["checksum"] == checksum


def test_checksum_empty(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert blkhash.checksum_file(str(path))["checksum"] == \
        reference(b"", 4 * MiB)


def test_checksum_zero_tail(tmp_path):
    # A short all-zero last block uses a zero digest of its own length.
    data = b"x" * MiB + bytes(MiB + 12345)
    path = tmp_path / "image"
    with open(path, "wb") as f:
        f.write(data[:MiB])
        f.truncate(len(data))
    expected = reference(data, MiB)
    assert blkhash.checksum_file(str(path), MiB)["checksum"] == expected
    assert checksum_with_extents(str(path), MiB) == (expected, 2)


@pytest.mark.parametrize("algorithm", blkhash.algorithms())
def test_all_algorithms(tmp_path, algorithm):
    data = b"a" * MiB + bytes(MiB) + b"b" * 1000
    path = tmp_path / "image"
    path.write_bytes(data)
    result = blkhash.checksum_file(str(path), MiB, algorithm)
    assert result["algorithm"] == algorithm
    assert result["checksum"] == reference(data, MiB, algorithm)


def test_algorithms():
    algorithms = blkhash.algorithms()
    assert algorithms == sorted(algorithms)
    assert "blake2b" in algorithms
    assert "sha256" in algorithms
    assert set(algorithms) <= hashlib.algorithms_available
    # Callers cannot corrupt the cached list.
    algorithms.append("bogus")
    assert "bogus" not in blkhash.algorithms()


@pytest.mark.parametrize("length", [1, 4096, MiB, MiB + 1, 4 * MiB])
def test_hash_zero_same_as_update(length):
    a = blkhash.Hash(4 * MiB)
    a.zero(length)
    b = blkhash.Hash(4 * MiB)
    b.update(bytes(length))
    assert a.hexdigest() == b.hexdigest()


def E(start, length, zero):
    return Extent(start, length, zero)


@pytest.mark.parametrize("extents,expected", [
    # Nothing.
    ([], []),
    # One zero extent spanning several blocks, short last block.
    ([E(0, 250, True)], [(0, 100, True), (100, 100, True), (200, 50, True)]),
    # One small data extent makes its block data.
    ([E(0, 130, True), E(130, 1, False), E(131, 169, True)],
     [(0, 100, True), (100, 100, False), (200, 100, True)]),
    # Small extents merge into one block.
    ([E(0, 30, False), E(30, 30, True), E(60, 40, False), E(100, 10, True)],
     [(0, 100, False), (100, 10, True)]),
    # Zero extents ending on and crossing block boundaries.
    ([E(0, 100, True), E(100, 150, False), E(250, 150, True)],
     [(0, 100, True), (100, 100, False), (200, 100, False),
      (300, 100, True)]),
    # Extents not starting at 0 (a window).
    ([E(50, 100, True), E(150, 10, False)],
     [(50, 100, True), (150, 10, False)]),
])
def test_split(extents, expected):
    assert list(blkhash.split(extents, 100)) == expected


def test_split_huge_zero_extent():
    blocks = list(blkhash.split([E(0, 1024 * MiB + 1, True)], 4 * MiB))
    assert len(blocks) == 257
    assert all(b.zero for b in blocks)
    assert blocks[-1] == (1024 * MiB, 1, True)


@pytest.mark.parametrize("extents,expected", [
    # A zero run of whole blocks is one item; the short last block is not.
    ([E(0, 250, True)], [(0, 200, True), (200, 50, True)]),
    # A data byte splits the zero runs around its block.
    ([E(0, 130, True), E(130, 1, False), E(131, 469, True)],
     [(0, 100, True), (100, 100, False), (200, 400, True)]),
    # A zero extent starting inside a block: that block alone, then a run.
    ([E(0, 50, False), E(50, 550, True)], [(0, 100, False), (100, 500, True)]),
    # Two zero extents: a block made of both is a single zero block.
    ([E(0, 150, True), E(150, 150, True)],
     [(0, 100, True), (100, 100, True), (200, 100, True)]),
])
def test_runs(extents, expected):
    assert list(blkhash.runs(extents, 100)) == expected


def test_runs_of_a_2_63_byte_hole_is_one_item():
    size = 2**63 - 1
    assert list(blkhash.runs([E(0, size, True)], MiB)) == [
        (0, size // MiB * MiB, True), (size // MiB * MiB, size % MiB, True)]


@pytest.mark.parametrize("algorithm", ["blake2b", "sha256", "shake_128"])
@pytest.mark.parametrize("count", [1, 2, 32767, 32768, 32769, 100000])
def test_zero_blocks_same_as_zero_block_by_block(algorithm, count):
    a = blkhash.Hash(MiB, algorithm)
    a.update(b"x")
    a.zero_blocks(count)
    b = blkhash.Hash(MiB, algorithm)
    b.update(b"x")
    for _ in range(count):
        b.zero(MiB)
    assert a.hexdigest() == b.hexdigest()


@pytest.mark.parametrize("block_size", [MiB, 4 * MiB, 16 * MiB, MiB + 4096])
def test_validate_ok(block_size):
    blkhash.validate("blake2b", block_size)
    blkhash.validate("sha256", block_size)


@pytest.mark.parametrize("algorithm,block_size,message", [
    ("bogus", 4 * MiB, "Unsupported algorithm"),
    (None, 4 * MiB, "Unsupported algorithm"),
    ("blake2b", "4194304", "expecting an integer"),
    ("blake2b", 4.0 * MiB, "expecting an integer"),
    ("blake2b", True, "expecting an integer"),
    ("blake2b", 0, "between"),
    ("blake2b", MiB - 4096, "between"),
    ("blake2b", 16 * MiB + 4096, "between"),
    ("blake2b", MiB + 512, "multiple of 4096"),
])
def test_validate_error(algorithm, block_size, message):
    with pytest.raises(errors.BadRequest) as e:
        blkhash.validate(algorithm, block_size)
    assert message in str(e.value)
