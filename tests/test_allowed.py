"""
images.allowed_dirs (SPEC §10): checked when a session is added (403 to the
host agent) and on the opened file; a block device reached through a
symlink inside an allowed directory, as Vdsm lays out block volumes, is
allowed, nothing else outside. Real loop devices where the machine allows.
"""

import json
import os
import uuid

import pytest

from imaged import allowed
from imaged import errors

from tests.hardening_helpers import loop_device

MiB = 1024**2


@pytest.fixture
def layout(tmp_path):
    """An oVirt-like tree: rhev/ is allowed, outside/ is not."""
    rhev = tmp_path / "rhev" / "data-center" / "mnt" / "blockSD" / "sd1"
    images = rhev / "images" / "img1"
    images.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    return tmp_path, str(tmp_path / "rhev"), images, outside


def test_inside_file_and_links_inside(layout):
    _, rhev, images, _ = layout
    (images / "vol.raw").write_bytes(b"x")
    os.symlink(images / "vol.raw", images / "link")
    allowed.check_path(str(images / "vol.raw"), [rhev])
    allowed.check_path(str(images / "link"), [rhev])


@pytest.mark.parametrize("target", ["outside-file", "char-device", "directory", "missing"])
def test_links_out_to_anything_but_a_block_device_are_refused(layout, target):
    _, rhev, images, outside = layout
    if target == "outside-file":
        (outside / "secret").write_bytes(b"SECRET")
        dest = outside / "secret"
    elif target == "char-device":
        dest = "/dev/zero"
    elif target == "directory":
        dest = outside
    else:
        dest = outside / "nothing"
    os.symlink(dest, images / "vol")
    with pytest.raises(errors.Forbidden, match="allowed directories"):
        allowed.check_path(str(images / "vol"), [rhev])


def test_no_dirs_means_no_check(layout):
    allowed.check_path("/etc/shadow", [])


# Real block devices.

@pytest.fixture
def device(tmp_path):
    backing = tmp_path / "backing.img"
    with open(backing, "wb") as f:
        f.write(b"\xab" * MiB)
        f.truncate(4 * MiB)
    with loop_device(backing) as dev:
        yield dev


def test_block_device_through_a_link_inside(layout, device):
    root, rhev, images, outside = layout
    # Vdsm: IMAGE/VOLUME -> /dev/SD/VOLUME -> ../dm-N; the middle link is
    # outside the allowed directories.
    os.symlink(device, outside / "lv")
    os.symlink(outside / "lv", images / "vol")
    allowed.check_path(str(images / "vol"), [rhev])
    fd = os.open(str(images / "vol"), os.O_RDONLY)
    try:
        allowed.check_opened(fd, str(images / "vol"), [rhev])
    finally:
        os.close(fd)


@pytest.mark.parametrize("how", ["direct", "link-outside", "dotdot", "dir-link"])
def test_block_device_otherwise_is_refused(layout, device, how):
    root, rhev, images, outside = layout
    if how == "direct":
        path = device
    elif how == "link-outside":
        os.symlink(device, outside / "vol")
        path = str(outside / "vol")
    elif how == "dotdot":
        os.symlink(device, outside / "vol")
        path = f"{images}/../../../../../../../outside/vol"
    else:
        # A directory link out of the allowed tree, holding a device link.
        os.symlink(device, outside / "vol")
        os.symlink(outside, images / "out")
        path = str(images / "out" / "vol")
    with pytest.raises(errors.Forbidden):
        allowed.check_path(path, [rhev])


def test_link_swapped_after_open_is_refused(layout, device, tmp_path):
    _, rhev, images, outside = layout
    os.symlink(device, images / "vol")
    fd = os.open(str(images / "vol"), os.O_RDONLY)
    try:
        # The name now leads elsewhere: the opened device is not what an
        # allowed link points to any more.
        os.unlink(images / "vol")
        os.symlink("/dev/null", images / "vol")
        with pytest.raises(errors.Forbidden):
            allowed.check_opened(fd, str(images / "vol"), [rhev])
    finally:
        os.close(fd)


def test_daemon_serves_a_linked_block_device(make_daemon, layout, device):
    root, rhev, images, outside = layout
    os.symlink(device, outside / "lv")
    os.symlink(outside / "lv", images / "vol")
    d = make_daemon({"images": {"allowed_dirs": [rhev]}})
    c = d.control()
    sid = str(uuid.uuid4())
    body = {"url": f"file://{images}/vol", "size": 4 * MiB, "ops": ["write"],
            "timeout": 60, "transfer_id": "t-block"}
    r = c.put(d.control_url + sid, data=json.dumps(body))
    assert r.status_code == 200, r.text
    s = d.https()
    assert s.get(d.tls_url + sid, headers={"Range": "bytes=0-3"}).content == b"\xab" * 4
    data = os.urandom(4 * MiB)
    assert s.put(d.tls_url + sid, data=data).status_code == 200
    with open(device, "rb") as f:
        assert f.read() == data


@pytest.mark.parametrize("how", ["direct", "link-outside"])
def test_daemon_refuses_at_add_with_403(make_daemon, layout, device, how):
    root, rhev, images, outside = layout
    if how == "direct":
        url = f"file://{device}"
    else:
        (outside / "secret").write_bytes(b"S" * MiB)
        os.symlink(outside / "secret", images / "vol")
        url = f"file://{images}/vol"
    d = make_daemon({"images": {"allowed_dirs": [rhev]}})
    c = d.control()
    sid = str(uuid.uuid4())
    r = c.put(d.control_url + sid, data=json.dumps(
        {"url": url, "size": MiB, "ops": ["read"], "timeout": 60}))
    assert r.status_code == 403
    assert "allowed directories" in r.text
    assert c.get(d.control_url + sid).status_code == 404
    assert sid not in d.log()


def test_daemon_checks_the_opened_file_again(make_daemon, layout, device):
    # Allowed when added, swapped for a link out before the first request:
    # the open refuses it.
    root, rhev, images, outside = layout
    os.symlink(device, images / "vol")
    (outside / "secret").write_bytes(b"S" * MiB)
    d = make_daemon({"images": {"allowed_dirs": [rhev]}})
    sid = d.add_session(f"{images}/vol", size=MiB, ops=["read"])
    os.unlink(images / "vol")
    os.symlink(outside / "secret", images / "vol")
    r = d.https().get(d.tls_url + sid)
    assert r.status_code == 403
    assert b"S" * 16 not in r.content
