"""Runs the Rust benches that drive a real Core (benches/*_core.rs, postgres_copy.rs) for the
Python benches that own the servers: built once before the timed rounds, then each run's one
`key=value ...` line parsed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(name: str) -> None:
    subprocess.run(["cargo", "bench", "--quiet", "--bench", name, "--no-run"], cwd=ROOT, check=True)


def run(name: str, settings: dict[str, str]) -> dict[str, str]:
    """The bench's printed fields; `settings` are set as LOGSLUICE_BENCH_<key> variables."""
    env = {**os.environ, **{f"LOGSLUICE_BENCH_{k}": v for k, v in settings.items()}}
    out = subprocess.run(
        ["cargo", "bench", "--quiet", "--bench", name],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dict(kv.split("=") for kv in out.split())
