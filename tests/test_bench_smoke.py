"""
The benchmark harness (bench/bench.py) in its smoke mode: tiny images, one
repetition, imaged only. Proves that `make bench` works; measures nothing.
"""

import os
import re
import subprocess
import sys

from tests.conftest import ROOT, needs_tool

# The smoke run takes ~10 s here; leave room for a slow CI machine.
SMOKE_TIMEOUT_S = 240


@needs_tool("curl")
@needs_tool("openssl")
@needs_tool("dd")
@needs_tool("cmp")
def test_bench_smoke(tmp_path):
    out = tmp_path / "bench"
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "bench.py"), "--smoke",
         "--out", str(out), "--imaged-python", sys.executable],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        timeout=SMOKE_TIMEOUT_S)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "| transfer " in p.stdout
    assert "HTTPS GET (curl)" in p.stdout
    # Issue 18: the clients side by side on qcow2, and the resume row.
    assert re.search(r"\| qcow2 upload, 4 conn \(clients, both to imaged\) +\| \d+\.\d+",
                     p.stdout)
    assert re.search(r"\| qcow2 download, 1 conn \(clients, both from imaged\) +\| \d+\.\d+",
                     p.stdout)
    assert "Resume row: an upload of" in p.stdout
    assert "Machine limits" in p.stdout
    if "NBD qcow2" in p.stdout:
        # Issue 16: the export's own pace (nbdcopy) beside imaged's.
        assert "| imaged/nbdcopy |" in p.stdout
        assert re.search(r"unix socket GET \(curl\): \d+\.\d+× nbdcopy on the same export",
                         p.stdout)
        assert re.search(r"\| NBD qcow2: unix socket PUT flush \(curl\) +\| \d+\.\d+ .*"
                         r"\| \d+\.\d+×", p.stdout)
    # Issue 19's targets on server CPU per byte, with imaged's and the peer's.
    assert re.search(r"HTTPS PUT flush \(curl\): server CPU ≤ 0.85× ovirt-imageio's: "
                     r"(\d+\.\d+× \(\d+\.\d+ / \d+\.\d+ s\)|not measured)", p.stdout)
    assert re.search(r"into huge pages \(as imaged reads\) \d+\.\d+ / \d+\.\d+ GB/s",
                     p.stdout)
    # The proxy rows: imaged as a proxy in front of imaged.
    assert "| proxy HTTPS GET (curl)" in p.stdout
    assert "| proxy HTTPS PUT flush (curl)" in p.stdout
    assert re.search(r"imaged proxy peak RSS ≤ 64 MiB: max \d+ MiB", p.stdout)
    assert (out / "results.json").exists()
    # Large files are removed unless --keep.
    assert not any(n.endswith(".raw") for n in os.listdir(out / "images"))
