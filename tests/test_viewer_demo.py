"""`logsluice demo --serve`: the demo app keeps running with the viewer mounted; the printed
URL and token open it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest
from harness._net import free_port, wait_until

pytestmark = pytest.mark.timeout(180)


def test_demo_serve_prints_url_and_token_that_open_the_viewer(tmp_logs):
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "logsluice.cli",
        "demo",
        "--serve",
        "--port",
        str(port),
        "--dir",
        str(tmp_logs),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name in list(env):
        if name.startswith("LOGSLUICE_"):
            del env[name]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not any(line.startswith("token:") for line in lines):
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        url = next(line.split()[1] for line in lines if line.startswith("viewer:"))
        token = next(line.split()[1] for line in lines if line.startswith("token:"))
        assert url == f"http://127.0.0.1:{port}/logs/?token={token}"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            assert c.get("/logs/api/records").status_code == 401

            def http_records() -> int:
                r = c.get(
                    "/logs/api/records", params={"kind": "http"}, headers={"Authorization": f"Bearer {token}"}
                )
                return len(r.json()["records"]) if r.status_code == 200 else 0

            wait_until(lambda: http_records() >= 50, 120, "the demo traffic in the viewer")
            page = c.get(url, follow_redirects=True)
            assert page.status_code == 200 and "static/app.js" in page.text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) in (0, -signal.SIGINT, 130)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
