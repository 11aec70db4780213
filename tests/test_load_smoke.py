"""
tools/load.py in its quick mode: a few seconds of mixed load on 200
connections plus the stall scenario, against its own daemon. Asserts that
it ran without a single error and printed its report.
"""

import json
import os
import subprocess
import sys

from tests.conftest import ROOT, needs_tool


@needs_tool("openssl")
def test_load_quick_mode(tmp_path):
    out = tmp_path / "load.json"
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "load.py"), "--duration", "5",
         "--stall-duration", "1.5", "--json", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=300)
    report_text = p.stdout
    assert p.returncode == 0, report_text
    for words in ("requests/s", "errors 0", "p50 ms", "p99 ms", "daemon RSS",
                  "stall phase", "alone", "with stalled", "alone again",
                  "daemon exit status: 0", "result: PASS"):
        assert words in report_text, f"{words!r} missing from:\n{report_text}"

    report = json.loads(out.read_text())
    main = report["main"]
    assert main["errors"] == 0 and main["error_samples"] == []
    assert main["requests"] > 0
    assert set(main["kinds"]) == {"get", "put", "zero", "extents"}
    assert main["verify_failures"] == 0 and main["verified_writes"] > 0
    stall = report["stall"]
    for run in ("alone", "with_stalled", "alone_again"):
        assert stall[run]["errors"] == 0, stall[run]
    # The stalled clients really were stalled the whole run, and were let go
    # at once when they closed.
    assert stall["readers_blocked_before_run"] == stall["stalled_readers"]
    assert stall["readers_still_stalled_after_run"] == stall["stalled_readers"]
    assert stall["released"]
    daemon = report["daemon"]
    assert daemon["rss_max_mib"] > 0
    # Nothing leaked once every client was gone.
    assert daemon["fds_settled"] <= daemon["fds_idle"]
    assert report["daemon_exit_status"] == 0
    # The work directory is gone.
    assert "workdir" not in report
