"""The README's first command runs `logsluice demo`: it must work as written."""

from __future__ import annotations

import os
import subprocess
import sys

from logfiles import read_records


def test_demo_runs_and_leaves_both_kinds_of_records(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOGSLUICE_", "AZURE_STORAGE"))}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "logsluice.cli",
            "demo",
            "--records",
            "2000",
            "--requests",
            "10",
            "--dir",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert "caller side:" in out.stdout and "local_files: accepted=" in out.stdout
    records = read_records(tmp_path)
    kinds = {r["kind"] for r in records}
    assert kinds == {"app", "http"}
    assert sum(r["kind"] == "app" and r["message"].startswith("cart updated") for r in records) > 1000
    http = [r for r in records if r["kind"] == "http"]
    assert {r["status"] for r in http} >= {200, 401, 500}
    assert "correct horse" not in out.stdout and "4111 1111 1111 1111" not in str(http)
