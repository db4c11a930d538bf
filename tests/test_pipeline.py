"""The foundation through the public API: real threads, real files, real forks."""

from __future__ import annotations

import gzip
import json
import logging
import multiprocessing
import os
import re
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import logsluice
import pytest
from logfiles import assert_accounted, log_files, read_records
from loguru import logger
from support import controlled, stdlib_logger


def set_mode(tmp_path: Path, mode: str) -> None:
    (tmp_path / "control").write_text(mode)


def test_100k_records_from_4_threads_land_exactly_once_in_order(tmp_logs, loguru):
    pipeline = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs))
    pipeline.attach(loguru, level="INFO")
    per_thread = 25_000

    def produce(t: int) -> None:
        log = loguru.bind(t=t)
        for n in range(per_thread):
            log.info("record {}", n, n=n)

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    pipeline.flush(timeout=30)
    stats = pipeline.stats()["local_files"]
    pipeline.close()

    records = read_records(tmp_logs)
    assert len(records) == 4 * per_thread == stats["written"] == stats["accepted"]
    for t in range(4):
        seq = [r["fields"]["n"] for r in records if r["fields"]["t"] == t]
        assert seq == list(range(per_thread)), f"thread {t} out of order or duplicated"
    assert {r["message"] for r in records[:3]} <= {f"record {n}" for n in range(per_thread)}


def test_record_shape(tmp_logs, loguru):
    pipeline = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs))
    pipeline.attach(loguru, level="DEBUG")
    loguru.bind(user="ada").info("signed in from {}", "10.0.0.1")
    pipeline.close()
    (r,) = read_records(tmp_logs)
    assert r["message"] == "signed in from 10.0.0.1"
    assert r["fields"] == {"user": "ada"}
    assert (r["level"], r["level_no"], r["kind"]) == ("INFO", 20, "app")
    assert r["logger"] == __name__ and r["function"] == "test_record_shape" and r["line"] > 0
    assert r["process"] == os.getpid() and r["thread"] == threading.get_ident()
    assert r["ts"].endswith("Z") and len(r["ts"]) == len("2026-01-01T00:00:00.000000Z")
    assert r["exception"] is None and r["request_id"] is None


def test_nasty_input_is_stored_sanitised(tmp_logs, loguru):
    class BadRepr:
        def __repr__(self):
            raise RuntimeError("no repr")

    pipeline = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs), max_message_bytes=64 * 1024)
    pipeline.attach(loguru, level="INFO")
    loguru.info("nul\x00byte")
    loguru.info("lone \ud800 surrogate")
    loguru.info("emoji 😀 ünïcödé")
    loguru.info("x" * 10_000_000)
    loguru.bind(raw=b"\xff\xfebytes", obj=object(), bad=BadRepr(), nested={"s": {1, 2}}, big=2**80).info(
        "extras"
    )
    secret = "hunter2"  # noqa: F841 - must not appear: attach() turns diagnose off
    try:
        {}["missing"]
    except KeyError:
        loguru.exception("failed")
    pipeline.close()

    by_msg = {r["message"][:20]: r for r in read_records(tmp_logs)}
    assert "nulbyte" in by_msg
    assert "lone \ufffd surrogate" in by_msg
    assert "emoji 😀 ünïcödé" in by_msg
    big = next(r for r in by_msg.values() if r["message"].startswith("xxx"))
    assert big["message"].endswith("…[truncated, 10000000 bytes]")
    assert len(big["message"].encode()) < 64 * 1024 + 100
    extras = by_msg["extras"]["fields"]
    assert extras["raw"] == "\ufffd\ufffdbytes"
    assert extras["obj"].startswith("<object object at")
    assert extras["bad"] == "<unrepresentable BadRepr>"
    assert extras["nested"]["s"] in ("{1, 2}", "{2, 1}")
    assert extras["big"] == str(2**80)
    exc = by_msg["failed"]["exception"]
    assert exc.startswith("Traceback (most recent call last):") and "KeyError: 'missing'" in exc
    assert "hunter2" not in exc


def test_stdlib_logging_handler_and_request_id_context(tmp_logs):
    pipeline = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs))
    log = stdlib_logger(pipeline, "test.stdlib")
    token = logsluice._context.request_id.set("req-42")
    try:
        log.warning("hello %s", "world", extra={"order": {"id": 7}})
    finally:
        logsluice._context.request_id.reset(token)
    log.info("bad format %d", "not a number")
    logging.getLogger("logsluice").addHandler(pipeline.logging_handler())
    logging.getLogger("logsluice").warning("the core's own messages never loop back")
    pipeline.close()
    records = read_records(tmp_logs)
    assert [r["message"] for r in records][0] == "hello world"
    assert records[0]["request_id"] == "req-42" and records[0]["fields"] == {"order": {"id": 7}}
    assert records[0]["logger"] == "test.stdlib" and records[0]["level"] == "WARNING"
    assert records[1]["message"].startswith("bad format %d (logsluice: message formatting failed")
    assert len(records) == 2


def test_a_message_that_cannot_be_formatted_keeps_its_arguments(tmp_logs):
    pipeline = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs))
    log = stdlib_logger(pipeline, "test.stdlib.format")
    log.info("%d items", "x")
    log.info("%s and %s", "one")
    log.info("%(a)s", {"b": 1})
    pipeline.close()
    assert [r["message"] for r in read_records(tmp_logs)] == [
        "%d items (logsluice: message formatting failed: TypeError: %d format: a real number is"
        " required, not str; arguments: ('x',))",
        "%s and %s (logsluice: message formatting failed: TypeError: not enough arguments for format"
        " string; arguments: ('one',))",
        "%(a)s (logsluice: message formatting failed: KeyError: 'a'; arguments: {'b': 1})",
    ]


def test_an_unusable_exc_info_is_stored_as_a_note_saying_what_was_given(tmp_logs):
    pipeline = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs))
    log = stdlib_logger(pipeline, "test.stdlib.exc_info")
    log.error("bad tuple", exc_info=("not", "a", "tuple"))
    log.error("short tuple", exc_info=(ValueError,))
    # A LogRecord made by hand (or changed by a filter) keeps exc_info as it was given.
    for given in (ValueError("an exception, not a tuple"), 42, False, (None, None, None)):
        log.handle(logging.LogRecord(log.name, logging.ERROR, __file__, 1, f"given {given!r}", None, given))
    log.error("no exception being handled", exc_info=True)
    pipeline.close()
    by_message = {r["message"]: r["exception"] for r in read_records(tmp_logs)}
    assert by_message["bad tuple"] == (
        "logsluice: the exception could not be formatted (AttributeError: 'str' object has no"
        " attribute 'tb_frame'); given: ('not', 'a', 'tuple')"
    )
    assert by_message["short tuple"] == (
        "logsluice: the exception could not be formatted (a tuple of 1 items, not (type, value,"
        " traceback)); given: (<class 'ValueError'>,)"
    )
    assert by_message["given ValueError('an exception, not a tuple')"] == (
        "ValueError: an exception, not a tuple"
    )
    assert by_message["given 42"] == (
        "logsluice: the exception could not be formatted (not an exception or a (type, value,"
        " traceback) tuple); given: 42"
    )
    # Nothing to format, as the stdlib's formatter sees it.
    assert by_message["given False"] is None
    assert by_message["given (None, None, None)"] is None
    assert by_message["no exception being handled"] is None
    assert len(by_message) == 7


def chained(n: int, root_message: str = "root cause") -> BaseException:
    """The last of `n` exceptions, each raised from the one before (`raise ... from`) or
    while handling it, alternately."""
    current: BaseException | None = None
    for i in range(n):
        try:
            if current is None:
                raise ValueError(root_message)
            if i % 2:
                raise KeyError(f"link {i}") from current
            try:
                raise current
            except Exception:
                raise RuntimeError(f"link {i}")  # noqa: B904 - the implicit context is the point
        except Exception as e:
            current = e
    assert current is not None
    return current


def python_traceback(e: BaseException) -> str:
    return "".join(traceback.format_exception(e)).rstrip()


def test_a_deep_exception_chain_keeps_its_root_cause_and_last_raised(tmp_logs, loguru):
    pipeline = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs))
    log = stdlib_logger(pipeline, "test.stdlib.chain")
    pipeline.attach(loguru)
    deep, short, longest = chained(3000), chained(3), chained(10_005)
    log.error("deep", exc_info=deep)
    log.error("short", exc_info=short)
    log.error("longest", exc_info=longest)
    # Loguru formats the exception itself first, recursively: keep within its reach.
    loguru.opt(exception=chained(200)).error("loguru")
    pipeline.close()
    stored = {r["message"]: r["exception"] for r in read_records(tmp_logs)}
    # The root cause first, then how many were left out, then the last 15 raised exactly as
    # Python prints them (the record's end is the end of Python's own traceback).
    head, tail = stored["deep"].split("\n\n…[2984 chained exceptions left out]\n")
    root = deep
    while root.__cause__ or root.__context__:
        root = root.__cause__ or root.__context__
    assert head == python_traceback(root) and head.endswith("ValueError: root cause")
    assert tail.startswith("\nThe above exception was the direct cause of the following exception:")
    assert python_traceback(deep).endswith(tail) and tail.endswith("KeyError: 'link 2999'")
    assert tail.count("Traceback (most recent call last):") == 15
    # A short chain is Python's own traceback, untouched.
    assert stored["short"] == python_traceback(short)
    # Past 10000 links the root cause is not looked for: the marker says so.
    assert stored["longest"].startswith(
        "…[more than 9984 earlier chained exceptions left out, the root cause among them]\n"
    )
    assert python_traceback(longest).endswith(stored["longest"].split("]\n", 1)[1])
    assert stored["loguru"].startswith("Traceback (most recent call last):")
    assert "ValueError: root cause\n\n…[184 chained exceptions left out]\n" in stored["loguru"]
    assert stored["loguru"].endswith("KeyError: 'link 199'")


def test_a_chain_too_large_for_the_record_keeps_the_ends_of_both_root_cause_and_last_raised(tmp_logs):
    pipeline = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs), max_message_bytes=2000)
    log = stdlib_logger(pipeline, "test.stdlib.chain_size")
    huge_root = chained(2, root_message="x" * 100_000 + " the end of the root cause")
    log.error("huge root", exc_info=huge_root)
    many = chained(14, root_message="r" * 1000)
    log.error("many", exc_info=many)
    pipeline.close()
    stored = {r["message"]: r["exception"] for r in read_records(tmp_logs)}
    text = stored["huge root"]
    assert len(text.encode()) <= 2000
    assert text.startswith("Traceback (most recent call last):")
    assert "bytes left out of" in text and "the end of the root cause\n\nThe above exception" in text
    # The last raised is whole, with how it came from the root cause.
    last = "".join(traceback.format_exception(huge_root, chain=False)).rstrip()
    assert text.endswith("\nThe above exception was the direct cause of the following exception:\n\n" + last)
    # Those raised just before the last go first, counted in the marker.
    text = stored["many"]
    assert len(text.encode()) <= 2000
    assert text.startswith("Traceback (most recent call last):") and "r" * 900 in text
    left_out = re.search(r"\n…\[(\d+) chained exceptions left out\]\n", text)
    assert left_out is not None
    shown = text.count("Traceback (most recent call last):")
    assert shown + int(left_out[1]) == 14
    assert python_traceback(many).endswith(text[left_out.end() :])


def test_queue_full_drops_are_counted_under_a_stalled_destination(tmp_path, loguru):
    dest = controlled(tmp_path, "stall", queue_max_records=100, batch_max_records=10, attempt_timeout=60)
    pipeline = logsluice.Pipeline(dest)
    pipeline.attach(loguru, level="INFO")
    started = time.perf_counter()
    for i in range(1000):
        loguru.info("r{}", i)
    elapsed = time.perf_counter() - started
    s = pipeline.stats()["controlled"]
    assert_accounted({"controlled": s})
    assert s["dropped"]["queue_full"] >= 1000 - 100 - 10
    assert s["queue_records"] <= 100
    assert elapsed < 30  # the caller never waited for the stalled writer's 60 s attempt
    set_mode(tmp_path, "ok")
    pipeline.flush(timeout=10)
    s = pipeline.stats()["controlled"]
    assert_accounted({"controlled": s})
    assert s["in_flight"] == 0 and s["accepted"] == 1000
    lines = (tmp_path / "out.ndjson").read_text().splitlines()
    assert len(lines) == s["written"] == 1000 - s["dropped"]["queue_full"]
    pipeline.close()


def test_on_full_block_waits_for_room_instead_of_dropping(tmp_path, loguru):
    dest = controlled(
        tmp_path, "stall", queue_max_records=10, batch_max_records=5, on_full="block", block_timeout=5.0
    )
    pipeline = logsluice.Pipeline(dest)
    pipeline.attach(loguru, level="INFO")
    threading.Timer(0.5, set_mode, (tmp_path, "ok")).start()
    for i in range(100):
        loguru.info("r{}", i)
    pipeline.flush(timeout=10)
    s = pipeline.stats()["controlled"]
    assert s["written"] == 100 and s["dropped"]["queue_full"] == 0
    pipeline.close()


def test_an_unavailable_store_holds_records_through_the_breaker(tmp_path, loguru):
    dest = controlled(
        tmp_path,
        "fail",
        max_retries=0,
        breaker_threshold=3,
        breaker_cooldown=0.5,
        batch_max_records=1,
        queue_max_records=4,
    )
    pipeline = logsluice.Pipeline(dest)
    pipeline.attach(loguru, level="INFO")
    attempts = tmp_path / "out.ndjson.attempts"
    loguru.info("first")
    deadline = time.monotonic() + 10
    while pipeline.stats()["controlled"]["breaker"] != "open" and time.monotonic() < deadline:
        time.sleep(0.01)
    s = pipeline.stats()["controlled"]
    assert s["breaker"] == "open" and s["in_flight"] == 1 and s["dropped_total"] == 0
    assert "controlled transient failure" in s["last_error"]
    assert attempts.read_text().splitlines()[:3] == ["1 fail"] * 3
    # The app goes on logging: records wait behind the held one, up to the queue's bound.
    for i in range(4):
        loguru.info("held {}", i)
    with pytest.raises(TimeoutError, match="controlled: 4 records"):
        pipeline.flush(timeout=0.2)
    s = pipeline.stats()["controlled"]
    assert (s["in_flight"], s["dropped"]["queue_full"], s["dropped_total"]) == (4, 1, 1)
    set_mode(tmp_path, "ok")
    pipeline.flush(timeout=10)
    s = pipeline.stats()["controlled"]
    assert s["breaker"] == "closed" and s["written"] == 4 and s["dropped_total"] == 1
    assert s["retries"] >= 3
    assert_accounted({"controlled": s})
    stored = [json.loads(line)["message"] for line in (tmp_path / "out.ndjson").read_text().splitlines()]
    assert stored == ["first", "held 0", "held 1", "held 2"]
    pipeline.close()


def test_close_during_an_outage_counts_what_is_held_as_closed(tmp_path, loguru, caplog):
    pipeline = logsluice.Pipeline(controlled(tmp_path, "fail", max_retries=0, breaker_threshold=1))
    pipeline.attach(loguru, level="INFO")
    for i in range(5):
        loguru.info("held {}", i)
    with pytest.raises(TimeoutError):
        pipeline.flush(timeout=0.3)
    with caplog.at_level(logging.WARNING, logger="logsluice"):
        pipeline.close(timeout=0.3)
    s = pipeline.stats()["controlled"]
    assert (s["written"], s["dropped"]["closed"], s["in_flight"]) == (0, 5, 0)
    assert_accounted({"controlled": s})
    # What close() says, not the outage report that came before it.
    assert any(
        "close timed out" in r.getMessage() and "controlled: 5 records" in r.getMessage()
        for r in caplog.records
        if r.name == "logsluice"
    )


def test_transient_failures_are_retried_with_backoff(tmp_path, loguru):
    dest = controlled(tmp_path, "fail", max_retries=20, retry_initial=0.02, retry_max=0.1)
    pipeline = logsluice.Pipeline(dest)
    pipeline.attach(loguru, level="INFO")
    loguru.info("eventually")
    threading.Timer(0.3, set_mode, (tmp_path, "ok")).start()
    pipeline.flush(timeout=10)
    s = pipeline.stats()["controlled"]
    assert s["written"] == 1 and s["retries"] >= 1 and s["dropped_total"] == 0
    attempts = (tmp_path / "out.ndjson.attempts").read_text().split("\n")
    assert attempts[0] == "1 fail" and "1 ok" in attempts
    pipeline.close()


def test_permanent_failure_is_not_retried(tmp_path, loguru):
    pipeline = logsluice.Pipeline(controlled(tmp_path, "fail_permanent", max_retries=5))
    pipeline.attach(loguru, level="INFO")
    loguru.info("x")
    pipeline.flush(timeout=5)
    s = pipeline.stats()["controlled"]
    assert s["retries"] == 0 and s["dropped"]["failed"] == 1
    pipeline.close()


def test_flush_and_close_time_out_and_account_for_everything(tmp_path, loguru):
    pipeline = logsluice.Pipeline(controlled(tmp_path, "stall", attempt_timeout=60))
    pipeline.attach(loguru, level="INFO")
    for i in range(5):
        loguru.info("r{}", i)
    with pytest.raises(TimeoutError, match="controlled: 5 records"):
        pipeline.flush(timeout=0.2)  # the writer now holds these 5, stalled
    for i in range(3):
        loguru.info("queued {}", i)
    pipeline.close(timeout=0.2)
    # When close returns, only the write under way is still in flight: what waited behind
    # it is counted dropped already (the process may exit now).
    s = pipeline.stats()["controlled"]
    assert (s["in_flight"], s["dropped"]["closed"]) == (5, 3)
    pipeline.close(timeout=0.2)  # idempotent
    assert pipeline.closed
    set_mode(tmp_path, "ok")  # the stalled attempt completes; what waited behind it is dropped
    deadline = time.monotonic() + 10
    while pipeline.stats()["controlled"]["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.01)
    s = pipeline.stats()["controlled"]
    assert_accounted({"controlled": s})
    assert (s["written"], s["dropped"]["closed"], s["in_flight"]) == (5, 3, 0)
    loguru.info("after close")
    assert pipeline.stats()["controlled"]["dropped"]["closed"] == 4


def test_stats_invariant_holds_at_every_moment(tmp_path, loguru):
    pipeline = logsluice.Pipeline(controlled(tmp_path, "ok", queue_max_records=500, batch_max_records=50))
    pipeline.attach(loguru, level="INFO")
    stop = threading.Event()
    snapshots = []

    def sample():
        while not stop.is_set():
            snapshots.append(pipeline.stats())

    sampler = threading.Thread(target=sample)
    sampler.start()
    for i in range(20_000):
        loguru.info("r{}", i)
        if i == 5000:
            set_mode(tmp_path, "stall")
        if i == 10_000:
            set_mode(tmp_path, "ok")
    pipeline.flush(timeout=10)
    stop.set()
    sampler.join()
    assert len(snapshots) > 10
    for snap in snapshots:
        assert_accounted(snap)
    pipeline.close()


def test_rotation_by_size_with_gzip_and_keep(tmp_logs, loguru):
    dest = logsluice.LocalFiles(tmp_logs, max_file_bytes=20_000, compress=True, keep=3, batch_max_records=50)
    pipeline = logsluice.Pipeline(dest)
    pipeline.attach(loguru, level="INFO")
    for i in range(2000):
        loguru.info("rotating record number {}", i)
        if i % 50 == 49:
            pipeline.flush()
    pipeline.close()
    files = log_files(tmp_logs)
    assert len(files) == 4
    assert [f.name.endswith(".gz") for f in files] == [True, True, True, False]
    assert files == sorted(files)
    numbers = [int(r["message"].rsplit(" ", 1)[1]) for r in read_records(tmp_logs)]
    assert numbers == sorted(numbers) and numbers[-1] == 1999  # the newest kept, in order


def _records_by_file(directory: Path) -> dict[str, list[dict]]:
    def records(path: Path) -> list[dict]:
        with (gzip.open if path.name.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    return {path.name: records(path) for path in log_files(directory)}


def test_keep_never_removes_the_open_file_of_another_destination_in_the_process(tmp_logs, loguru):
    # One directory and prefix, one process: both destinations' files carry this pid.
    everything = logsluice.LocalFiles(tmp_logs, name="all", max_file_bytes=20_000, keep=2, rotate=None)
    errors = logsluice.LocalFiles(tmp_logs, name="errors", min_level="ERROR", keep=3, rotate=None)
    pipeline = logsluice.Pipeline(everything, errors)
    pipeline.attach(loguru, level="INFO")
    filler = "x" * 300
    for i in range(40):
        # The error first: every batch of "all" holds fillers, so a file of only ERROR
        # records is one of the errors destination's.
        loguru.error("error {}", i)
        for j in range(60):
            loguru.info("filler {} {} {}", i, j, filler)
        pipeline.flush(timeout=30)
    pipeline.close()
    stats = pipeline.stats()
    assert stats["errors"]["written"] == 40 and stats["all"]["written"] == 40 * 61
    files = _records_by_file(tmp_logs)
    errors_files = {n: rs for n, rs in files.items() if all(r["level"] == "ERROR" for r in rs)}
    on_disk = [r["message"] for rs in errors_files.values() for r in rs]
    assert on_disk == [f"error {i}" for i in range(40)], sorted(files)
    # "all" rotated dozens of times: two finished files kept, its last one, and the errors file.
    assert len(errors_files) == 1 and len(files) == 4, sorted(files)


_NAMESPACED_WRITER = """
import json, os, sys, time
import logsluice
from loguru import logger

directory, role = sys.argv[1], sys.argv[2]
marker = lambda name: os.path.join(directory, "..", name)
logger.remove()
if role == "slow":
    pipeline = logsluice.Pipeline(logsluice.LocalFiles(directory, rotate=None))
else:
    pipeline = logsluice.Pipeline(logsluice.LocalFiles(directory, max_file_bytes=20_000, keep=2, rotate=None))
pipeline.attach(logger, level="INFO")
if role == "slow":
    for i in range(60):
        logger.info("slow {}", i)
        pipeline.flush(timeout=30)
        if i == 0:
            open(marker("slow-started"), "w").close()
        time.sleep(0.03)
    # Still open until the fast writer is done: once closed, the file is finished and the
    # fast writer's keep may rightly remove it.
    open(marker("slow-done"), "w").close()
    while not os.path.exists(marker("fast-done")):
        time.sleep(0.01)
else:
    i = 0
    while not os.path.exists(marker("slow-done")) or i < 2000:
        for _ in range(50):
            logger.info("fast {} {}", i, "x" * 300)
            i += 1
        pipeline.flush(timeout=30)
written = pipeline.stats()["local_files"]["written"]
pipeline.close()
if role == "fast":
    open(marker("fast-done"), "w").close()
print(json.dumps({"pid": os.getpid(), "written": written}))
"""


def _pid_namespaces_allowed() -> bool:
    try:
        probe = ["unshare", "-p", "-f", "--mount-proc", "true"]
        return subprocess.run(probe, check=False, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _pid_namespaces_allowed(), reason="needs unshare -p (pid namespaces)")
def test_keep_never_removes_the_open_file_of_a_writer_in_another_pid_namespace(tmp_path):
    # Two containers sharing a volume: both writers are pid 1, each in its own pid namespace,
    # so neither the pid in a file name nor kill(pid, 0) says whose file is open.
    logs = tmp_path / "logs"
    logs.mkdir()
    script = tmp_path / "writer.py"
    script.write_text(_NAMESPACED_WRITER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def start(role: str) -> subprocess.Popen:
        command = ["unshare", "-p", "-f", "--mount-proc", sys.executable, str(script), str(logs), role]
        return subprocess.Popen(command, stdout=subprocess.PIPE, env=env, text=True)

    slow = start("slow")
    deadline = time.monotonic() + 30
    while not (tmp_path / "slow-started").exists():
        assert slow.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    fast = start("fast")
    fast_out, _ = fast.communicate(timeout=120)
    slow_out, _ = slow.communicate(timeout=60)
    assert slow.returncode == 0 and fast.returncode == 0
    slow_stats, fast_stats = json.loads(slow_out), json.loads(fast_out)
    assert slow_stats["pid"] == fast_stats["pid"] == 1
    assert fast_stats["written"] >= 2000  # dozens of rotations of the fast writer, each pruning
    records = read_records(logs)
    assert {r["process"] for r in records} == {1}
    slow_on_disk = [r["message"] for r in records if r["message"].startswith("slow ")]
    assert slow_stats["written"] == 60
    assert slow_on_disk == [f"slow {i}" for i in range(60)]


def test_bad_configuration_raises_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="queue_max_records must be positive"):
        logsluice.LocalFiles(tmp_path, queue_max_records=-1)
    with pytest.raises(ValueError, match="unknown option.*batch_size"):
        logsluice.LocalFiles(tmp_path, batch_size=10)
    with pytest.raises(ValueError, match="unknown option.*queue_max_records"):
        logsluice.Pipeline(logsluice.LocalFiles(tmp_path), queue_max_records=5)
    with pytest.raises(ValueError, match="cannot create directory"):
        logsluice.LocalFiles("/etc/passwd/logs")
    with pytest.raises(ValueError, match="min_level='LOUD' is not a level"):
        logsluice.LocalFiles(tmp_path, min_level="LOUD")
    with pytest.raises(ValueError, match="on_full must be"):
        logsluice.LocalFiles(tmp_path, on_full="wait")
    with pytest.raises(ValueError, match="two destinations are named"):
        logsluice.Pipeline(logsluice.LocalFiles(tmp_path / "a"), logsluice.LocalFiles(tmp_path / "b"))
    with pytest.raises(ValueError, match="kinds"):
        logsluice.LocalFiles(tmp_path, kinds=["audit"])
    with pytest.raises(ValueError, match="handoff_max_requests must be a whole number >= 1"):
        logsluice.Pipeline(logsluice.LocalFiles(tmp_path), handoff_max_requests=0)
    with pytest.raises(ValueError, match="handoff_max_bytes must be a whole number of bytes >= 1048576"):
        logsluice.Pipeline(logsluice.LocalFiles(tmp_path), handoff_max_bytes=4096)
    # Pipeline.stats() reports the middleware's counters under "http".
    with pytest.raises(ValueError, match="name=.http. is reserved"):
        logsluice.LocalFiles(tmp_path, name="http")
    # A DSN the driver cannot use fails here, not as a stream of failed batches later.
    with pytest.raises(ValueError, match="invalid DSN") as bad_dsn:
        logsluice.Pipeline(logsluice.Postgres("postgresql://app:s3cret@127.0.0.1:1/db?sslmode=bogus"))
    assert "s3cret" not in str(bad_dsn.value)
    # The same mistakes on the reading side are bad input too (the CLI's exit code 2).
    with pytest.raises(ValueError, match="invalid DSN") as bad_dsn:
        logsluice.Reader("postgresql://app:s3cret@127.0.0.1:1/db?sslmode=bogus")
    assert "s3cret" not in str(bad_dsn.value)
    with pytest.raises(ValueError, match="table must be letters"):
        logsluice.Reader("postgresql://app@127.0.0.1:1/db", table="x;y")


def test_options_of_the_wrong_kind_are_refused_not_coerced(tmp_path, monkeypatch):
    # "no" is a true string: gzip would have been on.
    for flag in ("compress", "fsync"):
        with pytest.raises(ValueError, match=f"{flag} must be True or False, got 'no'"):
            logsluice.LocalFiles(tmp_path, **{flag: "no"})
    with pytest.raises(ValueError, match="create_table must be True or False"):
        logsluice.Postgres("postgresql://app@127.0.0.1/db", create_table="false")
    with pytest.raises(ValueError, match="create_container must be True or False"):
        logsluice.AzureBlob("UseDevelopmentStorage=true", create_container=0)
    # 0.5 bytes became 0: a new file for every batch.
    with pytest.raises(ValueError, match="max_file_bytes must be a whole number"):
        logsluice.LocalFiles(tmp_path, max_file_bytes=0.5)
    # Beyond what the core holds: the error names the option, not a parser's column.
    with pytest.raises(ValueError, match="queue_max_records must be at most"):
        logsluice.LocalFiles(tmp_path, queue_max_records=10**30)
    with pytest.raises(ValueError, match="max_retries must be at most 4294967295"):
        logsluice.LocalFiles(tmp_path, max_retries=10**12)
    with pytest.raises(ValueError, match="connect_timeout must be a positive number"):
        logsluice.Postgres("postgresql://app@127.0.0.1/db", connect_timeout=float("nan"))
    # Never, as the core's other durations saturate (it was a JSON parser's error).
    never = logsluice.Postgres("postgresql://app@127.0.0.1/db", connect_timeout=float("inf"))
    logsluice.Pipeline(never).close(timeout=0)
    with pytest.raises(ValueError, match="min_level must be a level from 0 to 65535"):
        logsluice.LocalFiles(tmp_path, min_level=70000)
    with pytest.raises(ValueError, match="kinds must be a non-empty subset"):
        logsluice.LocalFiles(tmp_path, kinds=None)
    for bad in ({"name": ""}, {"prefix": 5}, {"directory": 5}, {"directory": ""}):
        with pytest.raises(ValueError):
            logsluice.LocalFiles(**{"directory": tmp_path, **bad})
    with pytest.raises(ValueError, match="application_name must be a string"):
        logsluice.Postgres("postgresql://app@127.0.0.1/db", application_name=None)
    with pytest.raises(ValueError, match="dead_letter_dir: cannot create directory"):
        logsluice.Postgres("postgresql://app@127.0.0.1/db", dead_letter_dir="/proc/nope")
    # Environment variables: numbers are levels too, and a misspelt yes/no is an error naming it.
    monkeypatch.setenv("LOGSLUICE_DIR", str(tmp_path))
    monkeypatch.setenv("LOGSLUICE_DIR_MIN_LEVEL", "30")
    pipeline = logsluice.Pipeline.from_env()
    assert pipeline.destinations[0].min_level == 30
    pipeline.close()
    monkeypatch.setenv("LOGSLUICE_DIR_MIN_LEVEL", "LOUD")
    with pytest.raises(ValueError, match="LOGSLUICE_DIR_MIN_LEVEL='LOUD' is not a level"):
        logsluice.Pipeline.from_env()
    monkeypatch.delenv("LOGSLUICE_DIR")
    monkeypatch.setenv("LOGSLUICE_POSTGRES_DSN", "postgresql://app@127.0.0.1/db")
    monkeypatch.setenv("LOGSLUICE_POSTGRES_CREATE_TABLE", "flase")
    with pytest.raises(ValueError, match="LOGSLUICE_POSTGRES_CREATE_TABLE must be one of"):
        logsluice.Pipeline.from_env()
    monkeypatch.setenv("LOGSLUICE_POSTGRES_CREATE_TABLE", "off")
    monkeypatch.setenv("LOGSLUICE_POSTGRES_MIN_LEVEL", "40")
    pipeline = logsluice.Pipeline.from_env()
    (pg,) = pipeline.destinations
    assert pg.create_table is False and pg.min_level == 40
    pipeline.close(timeout=0)


def test_flush_and_close_timeouts_and_attach_levels(tmp_path, loguru):
    pipeline = logsluice.Pipeline(logsluice.LocalFiles(tmp_path))
    for bad in (-1, float("nan"), "5"):
        with pytest.raises(ValueError, match="timeout must be a number of seconds >= 0"):
            pipeline.flush(bad)
        with pytest.raises(ValueError, match="timeout must be a number of seconds >= 0"):
            pipeline.close(bad)
    # Any case and the WARN alias, as destinations' min_level takes them.
    pipeline.attach(loguru, level="warn")
    loguru.info("below")
    loguru.warning("kept")
    with pytest.raises(ValueError, match="attach.. sets catch itself"):
        pipeline.attach(loguru, catch=False)
    pipeline.close()
    assert [r["message"] for r in read_records(tmp_path)] == ["kept"]


def test_a_stdlib_record_without_a_logger_name_is_stored(tmp_path):
    pipeline = logsluice.Pipeline(logsluice.LocalFiles(tmp_path))
    handler = pipeline.logging_handler()
    handler.handle(logging.makeLogRecord({"msg": "no name", "levelno": 20}))
    pipeline.close()
    assert [r["message"] for r in read_records(tmp_path)] == ["no name"]


def test_request_ids_survive_queue_threads_when_captured_at_creation(tmp_logs, loguru):
    import logging.handlers
    import queue

    from logsluice import _context

    pipeline = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs))
    # Written on Loguru's queue thread and on a QueueListener's: the request's context is
    # not there, so the ids are copied into each record as it is created.
    loguru.add(pipeline.loguru_sink, enqueue=True, format="{message}", level="INFO")
    patched = loguru.patch(logsluice.capture_request_context)
    records: queue.Queue = queue.Queue()
    queue_handler = logging.handlers.QueueHandler(records)
    queue_handler.addFilter(logsluice.capture_request_context)
    listener = logging.handlers.QueueListener(records, pipeline.logging_handler())
    listener.start()
    stdlib = logging.getLogger("test.queued")
    stdlib.propagate = False
    stdlib.setLevel(logging.INFO)
    stdlib.addHandler(queue_handler)
    rid_token = _context.request_id.set("req-queued")
    trace_token = _context.trace.set(("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"))
    try:
        patched.info("loguru queued")
        stdlib.info("stdlib queued")
        patched.bind(request_id="own").info("explicit id kept")
    finally:
        _context.request_id.reset(rid_token)
        _context.trace.reset(trace_token)
        stdlib.removeHandler(queue_handler)
        listener.stop()
        loguru.complete()
    pipeline.close()
    by_msg = {r["message"]: r for r in read_records(tmp_logs)}
    for message in ("loguru queued", "stdlib queued"):
        assert by_msg[message]["request_id"] == "req-queued"
        assert by_msg[message]["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert by_msg["explicit id kept"]["request_id"] == "own"


def test_routing_by_level_and_kind(tmp_path, loguru):
    everything = logsluice.LocalFiles(tmp_path / "all", name="all")
    errors = logsluice.LocalFiles(tmp_path / "errors", name="errors", min_level="ERROR")
    http_only = logsluice.LocalFiles(tmp_path / "http", name="http_only", kinds=["http"])
    pipeline = logsluice.Pipeline(everything, errors, http_only)
    pipeline.attach(loguru, level="DEBUG")
    loguru.debug("d")
    loguru.warning("w")
    loguru.error("e")
    pipeline.close()
    assert [r["message"] for r in read_records(tmp_path / "all")] == ["d", "w", "e"]
    assert [r["message"] for r in read_records(tmp_path / "errors")] == ["e"]
    assert read_records(tmp_path / "http") == []
    assert pipeline.stats()["http_only"]["accepted"] == 0


def _child_logs(directory: str, tag: str, n: int) -> int:
    logger.remove()
    pipeline = _FORK_PIPELINE
    pipeline.attach(logger, level="INFO")
    for i in range(n):
        logger.info("{} {}", tag, i)
    pipeline.flush(timeout=10)
    return pipeline.stats()["local_files"]["written"]


_FORK_PIPELINE: logsluice.Pipeline


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_child_starts_a_fresh_core(tmp_logs, loguru):
    global _FORK_PIPELINE
    pipeline = _FORK_PIPELINE = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs))
    pipeline.attach(loguru, level="INFO")
    for i in range(100):
        loguru.info("parent {}", i)  # queued in the parent when the fork happens
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            fresh = pipeline.stats()["local_files"]["accepted"] == 0
            written = _child_logs(str(tmp_logs), "child", 50)
            code = 0 if fresh and written == 50 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0

    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(3) as pool:
        written = pool.starmap(_child_logs, [(str(tmp_logs), f"pool{k}", 200) for k in range(3)])
    assert written == [200, 200, 200]
    pipeline.flush(timeout=10)
    pipeline.close()

    records = read_records(tmp_logs)
    parent = [r for r in records if r["message"].startswith("parent")]
    assert len(parent) == 100 and {r["process"] for r in parent} == {os.getpid()}
    assert len([r for r in records if r["message"].startswith("child")]) == 50
    assert len([r for r in records if r["message"].startswith("pool")]) == 600


def test_import_starts_no_thread_and_exit_flushes(tmp_path):
    script = f"""
import os, threading
import logsluice
assert threading.active_count() == 1
assert len(os.listdir('/proc/self/task')) == 1, os.listdir('/proc/self/task')
from loguru import logger
logger.remove()
p = logsluice.Pipeline(logsluice.LocalFiles({str(tmp_path)!r}))
assert len(os.listdir('/proc/self/task')) == 1  # still lazy
p.attach(logger)
for i in range(1000):
    logger.info("bye {{}}", i)
# no flush, no close: the interpreter's exit must deliver them
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert len(read_records(tmp_path)) == 1000


def test_exit_delivers_from_a_pipeline_nobody_holds_and_from_multiprocessing_children(tmp_path):
    # Children of multiprocessing end with os._exit (no atexit); the pipeline object itself
    # is gone once setup() returns: only the sink and the handler hold its core.
    script = tmp_path / "app.py"
    logs = tmp_path / "logs"
    script.write_text(
        f"""
import gc, logging, multiprocessing
import logsluice
from loguru import logger

def setup():
    logger.remove()
    pipeline = logsluice.Pipeline(logsluice.LocalFiles({str(logs)!r}))
    pipeline.attach(logger, level="INFO")
    logging.getLogger().addHandler(pipeline.logging_handler())
    logging.getLogger().setLevel(logging.INFO)

def work(tag):
    logger.info("loguru {{}}", tag)
    logging.getLogger("app").info("stdlib %s", tag)

if __name__ == "__main__":
    setup()
    gc.collect()
    work("parent")
    fork = multiprocessing.get_context("fork")
    children = [fork.Process(target=work, args=(f"process{{i}}",)) for i in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join()
    assert [child.exitcode for child in children] == [0, 0, 0]
    pool = fork.Pool(2)
    pool.map(work, [f"pool{{i}}" for i in range(4)])
    pool.close()
    pool.join()
"""
    )
    subprocess.run([sys.executable, str(script)], check=True, timeout=120, cwd=tmp_path)
    messages = sorted(r["message"] for r in read_records(logs))
    tags = ["parent"] + [f"process{i}" for i in range(3)] + [f"pool{i}" for i in range(4)]
    assert messages == sorted(f"{kind} {tag}" for tag in tags for kind in ("loguru", "stdlib"))


def test_a_dict_that_changes_while_it_is_logged_is_stored_without_raising(tmp_logs, loguru):
    class Grows:
        """Adds a key to the dict (or an attribute to the object) that holds it when shown."""

        def __init__(self, owner):
            self.owner = owner

        def __repr__(self):
            if isinstance(self.owner, dict):
                self.owner[f"added{len(self.owner)}"] = 1
            else:
                setattr(self.owner, f"added{len(vars(self.owner))}", 1)
            return "grows"

    class AttachGrows(logging.Filter):
        def filter(self, record):
            record.grows = Grows(record)
            return True

    pipeline = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs))
    pipeline.attach(loguru, level="INFO")
    state = {"user": "ada"}
    state["grows"] = Grows(state)
    loguru.bind(state=state).info("loguru state")
    stdlib = logging.getLogger("test.grows")
    stdlib.propagate = False
    handler, grows = pipeline.logging_handler(), AttachGrows()
    stdlib.addHandler(handler)
    stdlib.addFilter(grows)
    try:
        stdlib.warning("stdlib state", extra={"state": {"user": "bob"}})
    finally:
        stdlib.removeHandler(handler)
        stdlib.removeFilter(grows)
    pipeline.close()
    by_msg = {r["message"]: r for r in read_records(tmp_logs)}
    assert by_msg["loguru state"]["fields"]["state"]["user"] == "ada"
    assert by_msg["loguru state"]["fields"]["state"]["grows"] == "grows"
    assert by_msg["stdlib state"]["fields"]["state"] == {"user": "bob"}
    assert by_msg["stdlib state"]["fields"]["grows"] == "grows"


def test_odd_levels_huge_durations_and_long_bytes_are_kept(tmp_logs, loguru):
    forever = 1e20  # also what float("inf") becomes: a wait that never ends, not a crash
    dest = logsluice.LocalFiles(
        tmp_logs, min_level="WARNING", batch_max_delay=forever, retry_max=forever, breaker_cooldown=forever
    )
    pipeline = logsluice.Pipeline(dest, max_field_bytes=1000)
    pipeline.attach(loguru, level="WARNING")
    try:
        loguru.level("PAGE_ONCALL", no=70_000)
    except ValueError:
        pass  # defined by an earlier run in this process
    loguru.log("PAGE_ONCALL", "paged")
    stdlib = logging.getLogger("test.levels")
    stdlib.propagate = False
    handler = pipeline.logging_handler()
    stdlib.addHandler(handler)
    try:
        stdlib.log(70_000, "stdlib paged")
        stdlib.log(2**70, "stdlib beyond 64 bits")
    finally:
        stdlib.removeHandler(handler)
    loguru.bind(blob=b"y" * 100_000).warning("long bytes")
    pipeline.flush(timeout=float("inf"))
    pipeline.close(timeout=float("inf"))
    by_msg = {r["message"]: r for r in read_records(tmp_logs)}
    assert [by_msg[m]["level_no"] for m in ("paged", "stdlib paged", "stdlib beyond 64 bits")] == [65535] * 3
    assert by_msg["long bytes"]["fields"]["blob"].endswith("…[truncated, 100000 bytes]")
    assert_accounted(pipeline.stats())


def test_cyclic_shared_and_huge_extras_cost_a_bounded_record(tmp_logs, loguru):
    pipeline = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs), max_field_bytes=1000)
    pipeline.attach(loguru)
    looped: list = []
    looped.extend([looped] * 4)  # each level four times itself: 4**16 values unbounded

    def tree(n, parent=None):
        node = {"parent": parent, "children": []}
        node["children"] = [tree(n - 1, node) for _ in range(3)] if n else []
        return node

    shared = ["x" * 900] * 50
    fan = [shared] * 50  # no cycle, 2,500 strings of 900 bytes
    loguru.bind(looped=looped).info("looped")
    loguru.bind(node=tree(5)).info("tree")
    loguru.bind(fan=fan).info("fan")
    loguru.bind(many={f"k{i}": i for i in range(1500)}, items=list(range(1500))).info("many")
    pipeline.close()
    by_msg = {r["message"]: r for r in read_records(tmp_logs)}
    assert by_msg["looped"]["fields"]["looped"] == ["<cycle: list>"] * 4
    assert by_msg["tree"]["fields"]["node"]["children"][0]["parent"] == "<cycle: dict>"
    # The record's fields end at 16 x max_field_bytes, and say so.
    fan_json = json.dumps(by_msg["fan"]["fields"], ensure_ascii=False)
    assert 16_000 <= len(fan_json) < 20_000 and "…[truncated, 50 items]" in fan_json
    many = by_msg["many"]["fields"]
    assert len(many["many"]) == 1001 and many["many"]["…"] == "…[truncated, 1500 items]"
    assert len(many["items"]) == 1001 and many["items"][-1] == "…[truncated, 1500 items]"


def test_keys_that_change_when_written_do_not_overwrite_each_other(tmp_logs, loguru):
    pipeline = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs))
    pipeline.attach(loguru)
    stdlib = logging.getLogger("test.keys")
    stdlib.propagate = False
    handler = pipeline.logging_handler()
    stdlib.addHandler(handler)
    try:
        loguru.bind(d={1: "int", "1": "str"}, k={"a\x00": "nul", "a": "plain"}).info("dup")
        # Before Python 3.12 taskName is not a LogRecord attribute: it is the app's extra.
        stdlib.warning("stdlib", extra={"taskName": "mine", "big": 10**5000})
    finally:
        stdlib.removeHandler(handler)
    pipeline.close()
    by_msg = {r["message"]: r for r in read_records(tmp_logs)}
    assert by_msg["dup"]["fields"]["d"] == {"1#2": "int", "1": "str"}
    assert by_msg["dup"]["fields"]["k"] == {"a#2": "nul", "a": "plain"}
    fields = by_msg["stdlib"]["fields"]
    if sys.version_info < (3, 12):
        assert fields["taskName"] == "mine"
    # Past Python's 4300-digit limit for str(): hexadecimal, every digit kept.
    assert fields["big"] == hex(10**5000)


def test_lifespan_closes_the_pipeline(tmp_logs, loguru):
    import asyncio

    pipeline = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs))
    pipeline.attach(loguru)

    async def run():
        async with pipeline.lifespan(None):
            loguru.info("during")
        return pipeline.closed

    assert asyncio.run(run()) is True
    assert [r["message"] for r in read_records(tmp_logs)] == ["during"]


def test_attach_refuses_unsafe_overrides(tmp_logs, loguru):
    pipeline = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs))
    with pytest.raises(ValueError, match="diagnose"):
        pipeline.attach(loguru, diagnose=True)
    handler_id = pipeline.attach(loguru, level="WARNING", filter=lambda r: "keep" in r["message"])
    loguru.warning("keep me")
    loguru.warning("drop me")
    loguru.info("keep but too low")
    loguru.remove(handler_id)
    pipeline.close()
    assert [r["message"] for r in read_records(tmp_logs)] == ["keep me"]


def test_disk_errors_hold_records_until_the_directory_is_usable_again(tmp_path, loguru, caplog):
    directory = tmp_path / "logs"
    pipeline = logsluice.Pipeline(logsluice.LocalFiles(directory, max_retries=1, retry_initial=0.01))
    pipeline.attach(loguru)
    loguru.info("before")
    pipeline.flush()
    # Something replaces the log directory with a file: every write now fails.
    for f in directory.iterdir():
        f.unlink()
    directory.rmdir()
    directory.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="logsluice"):
        loguru.info("held")  # nothing raised into the app
        with pytest.raises(TimeoutError, match="local_files: 1 records"):
            pipeline.flush(timeout=1)
    s = pipeline.stats()["local_files"]
    assert s["dropped_total"] == 0 and s["in_flight"] == 1 and s["retries"] >= 1
    assert "cannot create directory" in s["last_error"]
    assert any(
        "store unavailable after 2 attempt(s)" in r.getMessage() and "holding 1 records" in r.getMessage()
        for r in caplog.records
        if r.name == "logsluice"
    )
    directory.unlink()  # the operator fixes it; the held batch recreates the directory
    with caplog.at_level(logging.INFO, logger="logsluice"):
        loguru.info("after")
        pipeline.close()
    assert any(
        "delivering again after" in r.getMessage() and "records held meanwhile, 0 dropped" in r.getMessage()
        for r in caplog.records
        if r.name == "logsluice"
    )
    assert [r["message"] for r in read_records(directory)] == ["held", "after"]
    s = pipeline.stats()["local_files"]
    assert s["written"] == 3 and s["dropped_total"] == 0
    assert_accounted(pipeline.stats())


EFBIG_CHILD = """
import resource, sys, logsluice
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
pipeline = logsluice.Pipeline(logsluice.LocalFiles(sys.argv[1], max_retries=0, batch_max_delay=5))
handler = pipeline.logging_handler()
import logging
log = logging.getLogger("efbig")
log.propagate = False
log.addHandler(handler)
for i in range(1000):
    log.warning("record %04d %s", i, "x" * 200)
pipeline.flush(60)
s = pipeline.stats()["local_files"]
pipeline.close()
print(s["written"], s["dropped_total"])
"""


def test_a_batch_past_the_file_size_limit_is_written_in_pieces_and_leaves_no_empty_file(tmp_path):
    # Under RLIMIT_FSIZE (EFBIG; Python ignores SIGXFSZ) one ~250 KB batch cannot go into a
    # 64 KiB file: it is halved until the pieces fit, each in a file of its own. A write cut
    # back to nothing leaves no empty file behind.
    directory = tmp_path / "logs"
    argv = [sys.executable, "-c", EFBIG_CHILD, str(directory)]
    run = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["1000", "0"], run.stdout + run.stderr
    files = log_files(directory)
    assert files and all(f.stat().st_size > 0 for f in files)
    messages = [r["message"] for r in read_records(directory)]
    assert sorted(messages) == [f"record {i:04d} {'x' * 200}" for i in range(1000)]


def test_a_prefix_too_long_for_a_file_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="prefix must be at most 180 bytes"):
        logsluice.LocalFiles(tmp_path, prefix="app-" + "x" * 240)


def test_a_time_no_record_can_hold_becomes_now_and_is_kept_in_fields(tmp_logs, loguru):
    # Not finite, or outside years 1 to 9999 in UTC: stored as the time of conversion (an
    # RFC 3339 time every destination takes), the original under fields["original_time"].
    # Before, inf and 1e15 came out as 1970-01-01T00:00:00.775807Z and -1e12 as -29719-...
    import datetime as dt

    pipeline = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs))
    pipeline.attach(loguru)
    handler = pipeline.logging_handler()
    before = dt.datetime.now(dt.timezone.utc)
    for created in (float("inf"), 1e15, -1e12, 10**30):
        record = logging.LogRecord("t", logging.INFO, __file__, 1, repr(created), None, None)
        record.created = created
        handler.handle(record)
    ahead = dt.datetime(9999, 12, 31, 23, 0, tzinfo=dt.timezone(-dt.timedelta(hours=14)))
    loguru.bind(user="ada").patch(lambda r: r.update(time=ahead)).info("ahead")
    behind = dt.datetime(1, 1, 1, 0, 30, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    loguru.patch(lambda r: r.update(time=behind)).info("behind")
    edge = dt.datetime.max.replace(tzinfo=dt.timezone.utc)  # the last time kept as it is
    loguru.patch(lambda r: r.update(time=edge)).info("edge")
    pipeline.close()
    after = dt.datetime.now(dt.timezone.utc)
    records = {r["message"]: r for r in read_records(tmp_logs)}
    kept = {
        "inf": "inf",
        "1000000000000000.0": "1000000000000000.0",
        "-1000000000000.0": "-1000000000000.0",
        str(10**30): str(10**30),
        "ahead": "9999-12-31T23:00:00-14:00",
        "behind": "0001-01-01T00:30:00+01:00",
    }
    for message, original in kept.items():
        r = records[message]
        assert before <= dt.datetime.fromisoformat(r["ts"].replace("Z", "+00:00")) <= after, r
        assert r["fields"]["original_time"] == original
    assert records["ahead"]["fields"] == {"user": "ada", "original_time": kept["ahead"]}
    assert records["edge"]["ts"] == "9999-12-31T23:59:59.999999Z"
    assert "original_time" not in records["edge"]["fields"]


def test_record_time_is_loguru_time_in_every_zone(tmp_logs, loguru):
    import datetime as dt
    from zoneinfo import ZoneInfo

    pipeline = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs))
    assert pipeline._core._fast_clock  # the layout check passed on this interpreter
    pipeline.attach(loguru)
    base = dt.datetime(2024, 3, 31, 0, 59, 59, 999_999, tzinfo=dt.timezone.utc)
    times = [
        base,
        base.astimezone(dt.timezone(dt.timedelta(hours=5, minutes=30))),
        base.astimezone(dt.timezone(-dt.timedelta(hours=9, minutes=15, seconds=1))),
        base.astimezone(ZoneInfo("Europe/Berlin")),  # not a fixed offset: the slow path
        dt.datetime(1969, 12, 31, 23, 59, 59, 1, tzinfo=dt.timezone.utc),
        dt.datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=dt.timezone(dt.timedelta(hours=1))),
    ]
    for i, when in enumerate(times):
        loguru.patch(lambda r, when=when: r.update(time=when)).info("t{}", i)
    loguru.info("now")
    pipeline.close()
    records = read_records(tmp_logs)
    for i, when in enumerate(times):
        expected = when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert records[i]["ts"] == expected, (i, when)
    now = dt.datetime.fromisoformat(records[-1]["ts"].replace("Z", "+00:00"))
    assert abs((dt.datetime.now(dt.timezone.utc) - now).total_seconds()) < 60
