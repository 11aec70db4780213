import random

import pytest

from imaged import errors
from imaged.ranges import RangeSet, parse_content_range, parse_range


@pytest.mark.parametrize("header, expected", [
    ("bytes=0-99", (0, 100)),
    ("bytes=10-", (10, 90)),
    ("bytes=-10", (90, 10)),
    ("bytes=-1000", (0, 100)),
    ("bytes=99-99", (99, 1)),
    (" bytes = 5 - 6 ", (5, 2)),
    ("bytes=0-00000000000000000000001", (0, 2)),
])
def test_parse_range(header, expected):
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", [
    "bytes=0-1,5-6", "bytes=100-", "bytes=0-100", "bytes=5-4", "bytes=-0",
    "bytes=-", "items=0-1", "bytes=a-b", "bytes=" + "9" * 30 + "-",
])
def test_parse_range_unsatisfiable(header):
    with pytest.raises(errors.RangeNotSatisfiable) as e:
        parse_range(header, 100)
    assert e.value.size == 100


def test_parse_content_range():
    assert parse_content_range("bytes 0-99/*") == (0, 99)
    assert parse_content_range("bytes 10-19/100") == (10, 19)
    assert parse_content_range("bytes 10-*/*") == (10, None)


@pytest.mark.parametrize("header", ["bytes 5-4/*", "bytes x-1/*", "0-1/*", "bytes 1-2"])
def test_parse_content_range_invalid(header):
    with pytest.raises(errors.BadRequest):
        parse_content_range(header)


def test_rangeset_counts_overlaps_once():
    s = RangeSet()
    s.add(0, 10)
    s.add(5, 15)
    s.add(20, 30)
    assert s.total() == 25
    s.add(15, 20)
    assert list(s) == [(0, 30)]
    assert s.total(extra=[(25, 40), (100, 101)]) == 41
    assert s.total() == 30


def test_rangeset_matches_a_model():
    rng = random.Random(7)
    s = RangeSet()
    model = bytearray(10000)
    for _ in range(500):
        a = rng.randrange(10000)
        b = min(10000, a + rng.randrange(300))
        s.add(a, b)
        model[a:b] = b"\1" * (b - a)
        assert s.total() == sum(model)
    starts = [a for a, _ in s]
    assert starts == sorted(starts)
