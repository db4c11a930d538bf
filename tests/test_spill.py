"""The spill directory: records a store could not take before close() are saved to disk and
delivered by the next start, through the public API and real stores."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import logsluice
import pytest
from harness._net import free_port
from logfiles import assert_accounted
from support import controlled

# Fail fast and hold: an outage, as far as these tests care.
OUTAGE = {"max_retries": 0, "breaker_threshold": 1, "breaker_cooldown": 60.0, "batch_max_delay": 0.05}


def stored(tmp_path: Path) -> list[str]:
    out = tmp_path / "out.ndjson"
    return [json.loads(line)["message"] for line in out.read_text().splitlines()] if out.exists() else []


def spill_files(spill: Path, suffix: str = ".spill") -> list[Path]:
    return sorted(p for p in spill.iterdir() if p.name.endswith(suffix))


def spill_during_outage(tmp_path, spill, loguru, n, **options):
    """Logs `n` records into a failing destination and closes: they end up in `spill`."""
    pipeline = logsluice.Pipeline(controlled(tmp_path, "fail", **OUTAGE), spill_dir=spill, **options)
    pipeline.attach(loguru, level="INFO")
    for i in range(n):
        loguru.info("held {}", i)
    pipeline.close(timeout=0.3)
    return pipeline.stats()["controlled"]


def test_records_held_at_close_are_spilled_and_delivered_by_the_next_start(tmp_path, loguru, caplog):
    spill = tmp_path / "spill"
    with caplog.at_level(logging.INFO, logger="logsluice"):
        s = spill_during_outage(tmp_path, spill, loguru, 50)
    assert (s["spilled"], s["dropped_total"], s["in_flight"], s["written"]) == (50, 0, 0, 0)
    assert_accounted({"controlled": s})
    [file] = spill_files(spill)
    assert [json.loads(line)["message"] for line in file.read_text().splitlines()] == [
        f"held {i}" for i in range(50)
    ]
    assert any("50 records spilled" in r.getMessage() for r in caplog.records)
    assert stored(tmp_path) == []

    (tmp_path / "control").write_text("ok")
    # No record needs to be logged: construction starts the replay.
    pipeline = logsluice.Pipeline(controlled(tmp_path, "ok"), spill_dir=spill)
    pipeline.flush(10)
    pipeline.close()
    s = pipeline.stats()["controlled"]
    assert (s["replayed"], s["written"], s["accepted"], s["dropped_total"]) == (50, 50, 50, 0)
    assert stored(tmp_path) == [f"held {i}" for i in range(50)]
    assert list(spill.iterdir()) == []


def test_postgres_outage_past_close_reaches_the_table_after_a_restart(postgres, tmp_path, loguru):
    table = f"t_{uuid.uuid4().hex[:12]}"
    spill = tmp_path / "spill"
    nowhere = postgres.dsn.replace(f":{postgres.port}/", f":{free_port()}/")
    assert nowhere != postgres.dsn
    down = logsluice.Postgres(nowhere, table=table, connect_timeout=1, **OUTAGE)
    pipeline = logsluice.Pipeline(down, spill_dir=spill)
    pipeline.attach(loguru, level="INFO")
    for i in range(300):
        loguru.info("spilled {}", i)
    pipeline.close(timeout=0.5)
    s = pipeline.stats()["postgres"]
    assert (s["spilled"], s["dropped_total"], s["in_flight"]) == (300, 0, 0)
    [file] = spill_files(spill)
    assert len(file.read_text().splitlines()) == 300

    # The next start reaches the real server (the spill is keyed by name and table, not by
    # host and port).
    pipeline = logsluice.Pipeline(logsluice.Postgres(postgres.dsn, table=table), spill_dir=spill)
    pipeline.attach(loguru, level="INFO")
    loguru.info("new")
    pipeline.flush(60)
    pipeline.close()
    s = pipeline.stats()["postgres"]
    assert (s["replayed"], s["written"], s["dropped_total"]) == (300, 301, 0)
    rows = [r[0] for r in postgres.psql(f"select message from {table} order by id")]
    assert rows == [*(f"spilled {i}" for i in range(300)), "new"]
    assert list(spill.iterdir()) == []


def test_azure_blob_outage_past_close_reaches_the_container_after_a_restart(azurite, tmp_path, loguru):
    from test_azure_blob import read_blobs, unique_container

    container = unique_container()
    spill = tmp_path / "spill"

    def blob(**extra):
        return logsluice.AzureBlob(azurite.connection_string, container=container, **extra)

    azurite.stop()
    try:
        pipeline = logsluice.Pipeline(blob(attempt_timeout=2.0, **OUTAGE), spill_dir=spill)
        pipeline.attach(loguru, level="INFO")
        for i in range(40):
            loguru.info("blob {}", i)
        pipeline.close(timeout=0.5)
    finally:
        azurite.start()
    s = pipeline.stats()["azure_blob"]
    assert (s["spilled"], s["dropped_total"], s["in_flight"]) == (40, 0, 0)
    pipeline = logsluice.Pipeline(blob(batch_max_delay=0.05), spill_dir=spill)
    pipeline.flush(60)
    pipeline.close()
    s = pipeline.stats()["azure_blob"]
    assert (s["replayed"], s["written"], s["dropped_total"]) == (40, 40, 0)
    messages = [r["message"] for _, _, _, records in read_blobs(azurite, container) for r in records]
    assert sorted(messages) == sorted(f"blob {i}" for i in range(40))
    assert list(spill.iterdir()) == []


def spills_of_several_processes(tmp_path, loguru, spill: Path, processes: int, each: int, tag: str) -> None:
    """`processes` spill files in `spill`, `each` records ("{tag}{process} {i}") apiece, as
    that many processes closing in an outage leave them (each spills into a directory of its
    own first: a start with the shared one would take the last one's spill in and spill it
    again with its own)."""
    for round_ in range(processes):
        own = tmp_path / f"spill{round_}"
        pipeline = logsluice.Pipeline(controlled(tmp_path, "fail", **OUTAGE), spill_dir=own)
        pipeline.attach(loguru, level="INFO")
        for i in range(each):
            loguru.info("{}{} {}", tag, round_, i)
        pipeline.close(timeout=0.2)
        loguru.remove()
        for f in own.iterdir():
            f.rename(spill / f.name)


def test_several_pipelines_starting_together_deliver_each_spilled_record_once(tmp_path, loguru):
    spill = tmp_path / "spill"
    spill.mkdir()
    spills_of_several_processes(tmp_path, loguru, spill, processes=4, each=25, tag="r")
    assert len(spill_files(spill)) == 4
    (tmp_path / "control").write_text("ok")
    start = threading.Barrier(4)
    pipelines = []

    def begin() -> None:
        start.wait()
        pipelines.append(logsluice.Pipeline(controlled(tmp_path, "ok"), spill_dir=spill))

    threads = [threading.Thread(target=begin) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in pipelines:
        p.flush(10)
        p.close()
    assert sum(p.stats()["controlled"]["replayed"] for p in pipelines) == 100
    assert sorted(stored(tmp_path)) == sorted(f"r{r} {i}" for r in range(4) for i in range(25))
    assert list(spill.iterdir()) == []


def test_two_processes_starting_together_deliver_each_spilled_record_once(tmp_path, loguru):
    spill = tmp_path / "spill"
    spill.mkdir()
    spills_of_several_processes(tmp_path, loguru, spill, processes=6, each=10, tag="p")
    (tmp_path / "control").write_text("ok")
    control, out = str(tmp_path / "control"), str(tmp_path / "out.ndjson")
    script = (
        "import sys, logsluice\n"
        "from logsluice.destinations import _Controlled\n"
        "sys.stdin.readline()\n"  # both start at once
        f"p = logsluice.Pipeline(_Controlled({control!r}, {out!r}), spill_dir={str(spill)!r})\n"
        "p.flush(10); p.close()\n"
        "print(p.stats()['controlled']['replayed'])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
        )
        for _ in range(2)
    ]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    replayed = [int(p.communicate(timeout=60)[0]) for p in procs]
    assert sum(replayed) == 60
    assert sorted(stored(tmp_path)) == sorted(f"p{r} {i}" for r in range(6) for i in range(10))
    assert list(spill.iterdir()) == []


def test_damaged_lines_are_skipped_counted_and_reported_once(tmp_path, loguru, caplog):
    spill = tmp_path / "spill"
    spill_during_outage(tmp_path, spill, loguru, 5)
    [file] = spill_files(spill)
    good = file.read_text().splitlines()
    damaged = [good[0], "garbage", good[1], '{"ts": 1}', "", good[2], good[3], good[4][:20]]
    file.write_text("\n".join(damaged))  # the last line cut short, as by a crash
    (tmp_path / "control").write_text("ok")
    with caplog.at_level(logging.WARNING, logger="logsluice"):
        pipeline = logsluice.Pipeline(controlled(tmp_path, "ok"), spill_dir=spill)
        pipeline.flush(10)
        pipeline.close()
    s = pipeline.stats()["controlled"]
    assert (s["replayed"], s["written"], s["spill_bad_lines"]) == (4, 4, 3)
    assert stored(tmp_path) == [f"held {i}" for i in range(4)]
    assert len([r for r in caplog.records if "spill_bad_lines" in r.getMessage()]) == 1
    assert list(spill.iterdir()) == []


def test_a_spill_larger_than_the_queue_is_fed_in_as_room_frees(tmp_path, loguru):
    spill = tmp_path / "spill"
    spill_during_outage(tmp_path, spill, loguru, 500)
    (tmp_path / "control").write_text("ok")
    small = controlled(tmp_path, "ok", queue_max_records=20, batch_max_records=5)
    pipeline = logsluice.Pipeline(small, spill_dir=spill)
    pipeline.attach(loguru, level="INFO")
    loguru.info("new")
    pipeline.flush(10)
    # The replay keeps at most half the queue: what the app logs meanwhile finds room.
    for _ in range(200):
        s = pipeline.stats()["controlled"]
        if s["replayed"] == 500 and s["in_flight"] == 0:
            break
        # Half the queue (10 spilled records) and the app's one.
        assert s["queue_records"] <= 20 // 2 + 1
        pipeline.flush(10)
    pipeline.close()
    s = pipeline.stats()["controlled"]
    assert (s["replayed"], s["written"], s["dropped_total"]) == (500, 501, 0)
    messages = stored(tmp_path)
    assert sorted(m for m in messages if m != "new") == sorted(f"held {i}" for i in range(500))


def test_closing_again_mid_replay_loses_and_repeats_nothing(tmp_path, loguru):
    spill = tmp_path / "spill"
    spill_during_outage(tmp_path, spill, loguru, 300)
    # The store is still down at the next start: the replay holds, and close spills again.
    again = logsluice.Pipeline(
        controlled(tmp_path, "fail", queue_max_records=40, batch_max_records=10, **OUTAGE), spill_dir=spill
    )
    again.attach(loguru, level="INFO")
    loguru.info("second run")
    again.close(timeout=0.3)
    s = again.stats()["controlled"]
    assert 0 < s["replayed"] < 300 and s["spilled"] == s["accepted"] and s["dropped_total"] == 0
    assert not spill_files(spill, ".claimed")
    loguru.remove()
    (tmp_path / "control").write_text("ok")
    last = logsluice.Pipeline(controlled(tmp_path, "ok"), spill_dir=spill)
    last.flush(10)
    for _ in range(100):
        if not list(spill.iterdir()):
            break
        last.flush(10)
    last.close()
    messages = stored(tmp_path)
    assert sorted(messages) == sorted([*(f"held {i}" for i in range(300)), "second run"])
    assert list(spill.iterdir()) == []


def test_a_full_spill_directory_drops_with_its_own_reason(tmp_path, loguru):
    spill = tmp_path / "spill"
    loguru_big = "x" * 2000
    pipeline = logsluice.Pipeline(
        controlled(tmp_path, "fail", **OUTAGE), spill_dir=spill, spill_max_bytes=1 << 20
    )
    pipeline.attach(loguru, level="INFO")
    for i in range(1000):
        loguru.info("{} {}", i, loguru_big)
    pipeline.close(timeout=0.3)
    s = pipeline.stats()["controlled"]
    assert s["spilled"] > 0 and s["dropped"]["spill_full"] > 0
    assert s["spilled"] + s["dropped"]["spill_full"] == 1000
    assert_accounted({"controlled": s})
    assert sum(p.stat().st_size for p in spill.iterdir()) <= 1 << 20


def test_a_bad_spill_dir_fails_at_construction(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="spill_dir"):
        logsluice.Pipeline(controlled(tmp_path, "ok"), spill_dir=blocker / "sub")
    with pytest.raises(ValueError, match="spill_dir"):
        logsluice.Pipeline(controlled(tmp_path, "ok"), spill_dir=42)
    with pytest.raises(ValueError, match="spill_max_bytes"):
        logsluice.Pipeline(controlled(tmp_path, "ok"), spill_dir=tmp_path, spill_max_bytes=10)


def test_without_a_spill_dir_held_records_are_dropped_as_closed(tmp_path, loguru):
    pipeline = logsluice.Pipeline(controlled(tmp_path, "fail", **OUTAGE))
    pipeline.attach(loguru, level="INFO")
    for i in range(5):
        loguru.info("held {}", i)
    pipeline.close(timeout=0.2)
    s = pipeline.stats()["controlled"]
    assert (s["spilled"], s["dropped"]["closed"]) == (0, 5)


def test_local_files_never_spill(tmp_path, loguru):
    spill = tmp_path / "spill"
    pipeline = logsluice.Pipeline(logsluice.LocalFiles(tmp_path / "logs"), spill_dir=spill)
    pipeline.attach(loguru, level="INFO")
    loguru.info("kept locally")
    pipeline.close()
    assert pipeline.stats()["local_files"]["written"] == 1
    assert list(spill.iterdir()) == []
    # Held at close (its directory replaced by a file): dropped as closed, not spilled.
    directory = tmp_path / "broken"
    pipeline = logsluice.Pipeline(
        logsluice.LocalFiles(directory, max_retries=0, breaker_threshold=1, breaker_cooldown=60.0),
        spill_dir=spill,
    )
    pipeline.attach(loguru, level="INFO")
    directory.rmdir()
    directory.write_text("not a directory")
    loguru.info("held")
    with pytest.raises(TimeoutError):
        pipeline.flush(timeout=0.5)
    pipeline.close(timeout=0.3)
    s = pipeline.stats()["local_files"]
    assert (s["spilled"], s["dropped"]["closed"], s["in_flight"]) == (0, 1, 0)
    assert list(spill.iterdir()) == []
