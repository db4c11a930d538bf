"""Reading back what LocalFiles wrote, the way a user's tools would."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any


def log_files(directory: Path) -> list[Path]:
    return sorted(p for p in Path(directory).iterdir() if p.name.endswith((".ndjson", ".ndjson.gz")))


def read_records(directory: Path) -> list[dict[str, Any]]:
    records = []
    for path in log_files(directory):
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            records.extend(json.loads(line) for line in f)
    return records


def assert_accounted(stats: dict[str, Any]) -> None:
    """The invariant every snapshot must satisfy."""
    for name, s in stats.items():
        dropped = sum(s["dropped"].values())
        assert s["dropped_total"] == dropped, name
        assert s["accepted"] == s["written"] + dropped + s.get("spilled", 0) + s["in_flight"], (name, s)
