"""
Disk formats: qcow2, vmdk, vhdx and vpc sources are uploaded as their
guest data through a local qemu-nbd; downloads write a valid qcow2, on
top of a backing file when asked. Checked with qemu-img itself.
"""

import json
import os
import subprocess

import pytest

from imaged import client
from tests.client.common import (MiB, assert_one_line_error, fill_random,
                                 needs_qemu_utils, qemu_img, run_cli, same_content)

pytestmark = needs_qemu_utils

SIZE = 24 * MiB


def qemu_io(path, fmt, *commands):
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    r = subprocess.run(args + [path], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def make_image(tmp_path, fmt, size=SIZE, name="src", raw=None):
    """An image in `fmt` with data, zeroes and holes; returns (path, raw twin)."""
    path = str(tmp_path / f"{name}.{fmt}")
    opts = ["-o", "subformat=dynamic"] if fmt in ("vpc", "vhdx") else []
    qemu_img("create", "-q", "-f", fmt, *opts, path, size)
    qemu_io(path, fmt, "write -P 0x41 1M 3M", "write -P 0x42 9M 64k",
            f"write -P 0x43 {size - MiB} 1M", "write -z 12M 2M")
    raw = raw or str(tmp_path / f"{name}-{fmt}.raw")
    # A sparse raw file: holes where the image reads as zeroes.
    qemu_img("convert", "-f", fmt, "-O", "raw", path, raw)
    return path, raw


def garbage_image(tmp_path, size=SIZE):
    dst = str(tmp_path / "dst.raw")
    fill_random(dst, size)
    return dst


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vhdx", "vpc"])
def test_upload_guest_data(server, tmp_path, fmt):
    src, raw = make_image(tmp_path, fmt)
    # vpc rounds the size up to its geometry.
    size = os.path.getsize(raw)
    dst = garbage_image(tmp_path, size)
    sid = server.add_session(dst, sparse=True)
    r = run_cli("upload", src, server.tls_url + sid, "--cafile", server.cert,
                "--json", "-q", "--verify", "--buffer-size", "1M")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.splitlines()[-1])
    assert result["format"] == fmt
    assert result["verified"] is True
    # Only the data was sent (5 MiB in 1 MiB chunks); the rest went as zero
    # requests.
    assert result["data_bytes"] <= 6 * MiB
    assert same_content(dst, raw)
    # Holes of the source became holes of the sparse session.
    assert os.stat(dst).st_blocks * 512 <= 8 * MiB


def test_upload_qcow2_with_backing_chain(server, tmp_path):
    base, _ = make_image(tmp_path, "qcow2", name="base")
    top = str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu_io(top, "qcow2", "write -P 0x55 2M 1M", "write -z 9M 64k")
    raw = str(tmp_path / "top.raw")
    qemu_img("convert", "-f", "qcow2", "-O", "raw", top, raw)
    dst = garbage_image(tmp_path)
    sid = server.add_session(dst)
    up = client.upload(top, server.tls_url + sid, cafile=server.cert)
    assert up.format == "qcow2"
    assert same_content(dst, raw)


def test_format_raw_sends_container_bytes(server, tmp_path):
    src, _ = make_image(tmp_path, "qcow2")
    dst = garbage_image(tmp_path)
    sid = server.add_session(dst)
    r = run_cli("upload", src, server.tls_url + sid, "--cafile", server.cert,
                "--format", "raw")
    assert r.returncode == 0, r.stderr
    with open(src, "rb") as a, open(dst, "rb") as b:
        data = a.read()
        assert b.read(len(data)) == data


def test_mismatched_format_writes_nothing(server, tmp_path):
    src, _ = make_image(tmp_path, "vmdk")
    dst = garbage_image(tmp_path)
    with open(dst, "rb") as f:
        before = f.read()
    sid = server.add_session(dst)
    r = run_cli("upload", src, server.tls_url + sid, "--cafile", server.cert,
                "--format", "qcow2")
    assert r.returncode == 1
    assert "is a vmdk image, not qcow2" in assert_one_line_error(r.stderr)
    with open(dst, "rb") as f:
        assert f.read() == before


def test_unsupported_format_writes_nothing(server, tmp_path):
    src = str(tmp_path / "src.vdi")
    qemu_img("create", "-q", "-f", "vdi", src, 4 * MiB)
    dst = garbage_image(tmp_path)
    with open(dst, "rb") as f:
        before = f.read()
    sid = server.add_session(dst)
    r = run_cli("upload", src, server.tls_url + sid, "--cafile", server.cert)
    assert r.returncode == 1
    line = assert_one_line_error(r.stderr)
    assert "is a vdi image" in line and "--format raw" in line
    with open(dst, "rb") as f:
        assert f.read() == before


def test_source_larger_than_image_writes_nothing(server, tmp_path):
    # A small qcow2 file of a guest disk larger than the image.
    src = str(tmp_path / "big.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", src, 64 * MiB)
    qemu_io(src, "qcow2", "write -P 1 0 64k")
    dst = garbage_image(tmp_path)
    with open(dst, "rb") as f:
        before = f.read()
    sid = server.add_session(dst)
    r = run_cli("upload", src, server.tls_url + sid, "--cafile", server.cert)
    assert r.returncode == 4
    assert "larger than the image" in assert_one_line_error(r.stderr)
    with open(dst, "rb") as f:
        assert f.read() == before


def allocated_clusters(path):
    """Bytes of `path` (qcow2) allocated in its own layer."""
    return sum(e["length"] for e in json.loads(qemu_img("map", "--output=json", path))
               if e["data"] and e.get("depth", 0) == 0)


@pytest.mark.parametrize("connections", [1, 4])
def test_download_qcow2(server, tmp_path, connections):
    img = str(tmp_path / "img.raw")
    make_image(tmp_path, "qcow2", raw=img)
    sid = server.add_session(img, ops=["read"])
    out = str(tmp_path / "out.qcow2")
    r = run_cli("download", server.tls_url + sid, out, "--cafile", server.cert,
                "--format", "qcow2", "--connections", connections, "--verify")
    assert r.returncode == 0, r.stderr
    assert "verified" in r.stdout
    info = json.loads(qemu_img("info", "--output=json", out))
    assert info["format"] == "qcow2" and info["virtual-size"] == SIZE
    qemu_img("check", out)
    qemu_img("compare", "-f", "raw", "-F", "qcow2", img, out)
    # Holes and zeroes stay unallocated.
    assert allocated_clusters(out) <= 6 * MiB


def test_download_qcow2_on_backing_file(server, tmp_path):
    # The backing file has other data: zero extents of the image must be
    # written as zeroes over it.
    img = str(tmp_path / "img.raw")
    make_image(tmp_path, "qcow2", raw=img)
    base = str(tmp_path / "base.raw")
    fill_random(base, SIZE)
    sid = server.add_session(img, ops=["read"])
    out = str(tmp_path / "out.qcow2")
    r = run_cli("download", server.tls_url + sid, out, "--cafile", server.cert,
                "--format", "qcow2", "--backing-file", base)
    assert r.returncode == 0, r.stderr
    info = json.loads(qemu_img("info", "--output=json", out))
    assert info["backing-filename"] == base
    qemu_img("compare", "-f", "raw", "-F", "qcow2", img, out)



def _minor_faults(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


@pytest.mark.parametrize("user_tunables,reused", [
    (None, True),
    # The user's own GLIBC_TUNABLES come after ours: they win.
    ("glibc.malloc.mmap_threshold=131072", False)])
def test_qemu_nbd_keeps_request_buffers(tmp_path, monkeypatch, user_tunables, reused):
    # qemu-nbd allocates a buffer per NBD request: with our malloc settings
    # (formats.QEMU_NBD_MALLOC_*) it reuses heap memory instead of faulting
    # in fresh pages for every request (measured: 2,051 page faults per
    # 8 MiB read without, ~860 with).
    from imaged.client import formats
    if user_tunables is None:
        monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    else:
        monkeypatch.setenv("GLIBC_TUNABLES", user_tunables)
    request = 8 * MiB
    src = str(tmp_path / "src.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", src, 4 * request)
    qemu_io(src, "qcow2", f"write -P 0x41 0 {4 * request}")
    with formats.QemuNBD(src, "qcow2") as server:
        h = server.connect()
        try:
            for i in range(2):
                h.pread(request, i * request)
            before = _minor_faults(server.proc.pid)
            reads = 12
            for i in range(reads):
                assert h.pread(request, (i % 4) * request) == b"\x41" * request
            per_read = (_minor_faults(server.proc.pid) - before) / reads
        finally:
            formats.close_handle(h)
    pages = request // os.sysconf("SC_PAGE_SIZE")
    if reused:
        assert per_read < 0.75 * pages
    else:
        assert per_read >= pages


# Reading guest data straight from the image file (formats.direct_map).

def _mapped_bytes_match(path, raw, mappings):
    with open(path, "rb") as img, open(raw, "rb") as twin:
        for m in mappings:
            img.seek(m.offset)
            twin.seek(m.start)
            if img.read(m.length) != twin.read(m.length):
                return False
    return True


def test_direct_map_points_into_the_file(tmp_path):
    from imaged.client import formats
    src, raw = make_image(tmp_path, "qcow2")
    mappings = formats.direct_map(src, "qcow2")
    # The data written by make_image: 3 MiB, 64 KiB and 1 MiB.
    assert sum(m.length for m in mappings) == 3 * MiB + 64 * 1024 + MiB
    assert _mapped_bytes_match(src, raw, mappings)


def test_direct_map_of_a_backing_chain_is_the_top_only(tmp_path):
    from imaged.client import formats
    base, _ = make_image(tmp_path, "qcow2", name="base")
    top = str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu_io(top, "qcow2", "write -P 0x55 2M 1M")
    raw = str(tmp_path / "top.raw")
    qemu_img("convert", "-f", "qcow2", "-O", "raw", top, raw)
    mappings = formats.direct_map(top, "qcow2")
    # The base's data is in the base file: not mapped into top's.
    assert [(m.start, m.length) for m in mappings] == [(2 * MiB, MiB)]
    assert _mapped_bytes_match(top, raw, mappings)


def _compressed(tmp_path):
    src, raw = make_image(tmp_path, "qcow2", name="plain")
    path = str(tmp_path / "compressed.qcow2")
    qemu_img("convert", "-c", "-f", "qcow2", "-O", "qcow2", src, path)
    return path, raw


def _external_data_file(tmp_path):
    path = str(tmp_path / "external.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o",
             f"data_file={tmp_path / 'external.data'}", path, SIZE)
    qemu_io(path, "qcow2", "write -P 0x41 1M 3M", f"write -P 0x43 {SIZE - MiB} 1M")
    raw = str(tmp_path / "external.raw")
    qemu_img("convert", "-f", "qcow2", "-O", "raw", path, raw)
    return path, raw


def _flat_vmdk(tmp_path):
    path = str(tmp_path / "flat.vmdk")
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", path, SIZE)
    qemu_io(path, "vmdk", "write -P 0x41 1M 3M")
    raw = str(tmp_path / "flat.raw")
    qemu_img("convert", "-f", "vmdk", "-O", "raw", path, raw)
    return path, raw


ELSEWHERE = {"compressed qcow2": ("qcow2", _compressed),
             "qcow2 with an external data file": ("qcow2", _external_data_file),
             "vmdk with a flat extent file": ("vmdk", _flat_vmdk)}


@pytest.mark.parametrize("kind", list(ELSEWHERE))
def test_direct_map_trusts_only_the_image_file(tmp_path, kind):
    # Compressed clusters have no offset; an external data file or a vmdk
    # extent file holds the data elsewhere: all of it goes through qemu-nbd.
    from imaged.client import formats
    fmt, make = ELSEWHERE[kind]
    path, _ = make(tmp_path)
    assert formats.direct_map(path, fmt) == []


@pytest.mark.parametrize("kind", list(ELSEWHERE))
def test_upload_data_not_in_the_image_file(server, tmp_path, kind):
    fmt, make = ELSEWHERE[kind]
    path, raw = make(tmp_path)
    dst = garbage_image(tmp_path, os.path.getsize(raw))
    sid = server.add_session(dst)
    up = client.upload(path, server.tls_url + sid, cafile=server.cert, verify=True)
    assert up.format == fmt
    assert same_content(dst, raw)


@pytest.mark.parametrize("unix_socket", [True, False], ids=["unix", "https"])
@pytest.mark.parametrize("connections", [1, 3])
def test_upload_reads_the_image_file(server, tmp_path, caplog, unix_socket, connections):
    # Data of the image file is read from the file, a backing file's data
    # and the rest through qemu-nbd. Small buffers: many pieces, requests
    # crossing mapped and unmapped ranges.
    base, _ = make_image(tmp_path, "qcow2", name="base")
    top = str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu_io(top, "qcow2", "write -P 0x55 512k 1M", "write -P 0x56 8M 2M",
            "write -z 9M 64k")
    raw = str(tmp_path / "top.raw")
    qemu_img("convert", "-f", "qcow2", "-O", "raw", top, raw)
    dst = garbage_image(tmp_path)
    sid = server.add_session(dst, sparse=True)
    caplog.set_level("INFO", logger="imaged.client")
    up = client.upload(top, server.tls_url + sid, cafile=server.cert,
                       use_unix_socket=unix_socket, connections=connections,
                       buffer_size=256 * 1024)
    assert up.transport == ("unix" if unix_socket else "https")
    assert same_content(dst, raw)
    assert f"{3 * MiB - 64 * 1024} bytes of guest data read straight from the file" \
        in caplog.text
