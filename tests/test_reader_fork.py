"""A Reader made before os.fork() reads in the child: gunicorn --preload and multiprocessing
prefork copy a Reader (or a viewer) built at import into every worker, without the threads
of its runtime. The child builds its own runtime and connections on first use; the parent's
copies are never used nor dropped there. Tails open at the fork follow in the child too
(with pollers of the child's own), and a viewer that streamed before the fork streams and
shuts down in the child."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import pickle
import signal
import time
import uuid
import weakref

import logsluice
import pytest
from azure.storage.blob import BlobServiceClient
from fastapi.testclient import TestClient
from loguru import logger

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")

# The reader the child uses: only this global holds it, so a child can drop it too.
_READER: logsluice.Reader | None = None


def in_forked_child(fn, *args):
    """Runs ``fn(*args)`` in a child forked now and returns its result (an exception in the
    child fails the test with its text). A hang is ended by an alarm: no answer then (by the
    default action: pytest-timeout's handler is Python code, which a child stuck in the
    core never runs)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        try:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(60)
            out = ("ok", fn(*args))
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out = ("error", f"{type(e).__name__}: {e}")
        try:
            with os.fdopen(w, "wb") as f:
                pickle.dump(out, f)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert data, f"the child gave no answer (hung until its alarm?), wait status {status}"
    kind, value = pickle.loads(data)
    assert kind == "ok", value
    return value


def write(destination, messages) -> None:
    pipeline = logsluice.Pipeline(destination)
    logger.remove()
    pipeline.attach(logger)
    try:
        for m in messages:
            logger.info(m)
        pipeline.flush(timeout=60)
    finally:
        pipeline.close()
        logger.remove()


def messages(reader) -> list[str]:
    return sorted(r["message"] for r in reader.query(since="1h", limit=1000).records)


def _child_reads() -> dict:
    assert _READER is not None
    page = _READER.query(since="1h", limit=1000)
    first = page.records[0]
    return {
        "messages": sorted(r["message"] for r in page.records),
        "get": (_READER.get(first["id"]) or {}).get("message") == first["message"],
        "summary": sum(g["count"] for g in _READER.summary(since="1h", by="kind")["groups"]),
        "async": sorted(r["message"] for r in asyncio.run(_READER.aquery(since="1h", limit=1000)).records),
    }


def _child_drops_the_reader() -> bool:
    """Drops the reader without having used it: the parent's runtime and pool, copied by
    fork, go with it."""
    global _READER
    ref = weakref.ref(_READER)
    _READER = None
    gc.collect()
    return ref() is None


def reads_across_fork(want: list[str]) -> None:
    """With `_READER` (held only there, so a child can drop it): the parent reads (its
    runtime and connections exist when the fork happens), a child reads every way, a child
    that drops the reader unused leaves the parent's copy alone, and the parent reads on."""
    assert messages(_READER) == sorted(want)
    child = in_forked_child(_child_reads)
    assert child == {"messages": sorted(want), "get": True, "summary": 25, "async": sorted(want)}
    assert in_forked_child(_child_drops_the_reader) is True
    assert messages(_READER) == sorted(want)


def test_a_postgres_reader_made_before_fork_queries_in_the_child(postgres):
    global _READER
    table = f"fork_{uuid.uuid4().hex[:10]}"
    want = [f"before the fork {i}" for i in range(25)]
    write(logsluice.Postgres(postgres.dsn, table=table, batch_max_delay=0.05), want)
    _READER = logsluice.Reader(postgres.dsn, table=table, connect_timeout=10, statement_timeout=10)
    try:
        reads_across_fork(want)
    finally:
        _READER = None


_VIEWER = None


def _child_asks_the_viewer() -> tuple[int, list[str]]:
    with TestClient(_VIEWER) as client:
        r = client.get("/api/records", params={"since": "1h", "limit": 1000})
        return r.status_code, sorted(rec["message"] for rec in r.json().get("records", []))


def test_a_viewer_made_before_fork_answers_in_the_child(postgres):
    """A viewer built at import (as with gunicorn --preload) over a PostgreSQL reader."""
    global _VIEWER
    table = f"fork_{uuid.uuid4().hex[:10]}"
    want = [f"before the fork {i}" for i in range(5)]
    write(logsluice.Postgres(postgres.dsn, table=table, batch_max_delay=0.05), want)
    _VIEWER = logsluice.viewer(logsluice.Reader(postgres.dsn, table=table), allow_anonymous=True)
    try:
        assert _child_asks_the_viewer() == (200, sorted(want))
        assert in_forked_child(_child_asks_the_viewer) == (200, sorted(want))
    finally:
        _VIEWER = None


def _child_listens(dsn: str, table: str) -> tuple[int, int]:
    """LISTENs in the child and waits for the LISTEN to be up, then for the NOTIFY of a
    batch the child writes itself. Returns both hint counts."""
    assert _READER is not None
    core = _READER._core
    core.listen()
    up = core.wait_wakeup(0, 30.0)  # the child counts its own hints, from 0
    write(logsluice.Postgres(dsn, table=table, batch_max_delay=0.05), ["written by the child"])
    hinted = core.wait_wakeup(up, 30.0)
    core.unlisten()
    return up, hinted


def test_a_postgres_reader_listening_before_fork_listens_in_the_child(postgres):
    global _READER
    table = f"fork_{uuid.uuid4().hex[:10]}"
    write(logsluice.Postgres(postgres.dsn, table=table), ["creates the table"])
    _READER = logsluice.Reader(postgres.dsn, table=table)
    core = _READER._core
    try:
        core.listen()
        seen = core.wait_wakeup(0, 30.0)
        assert seen > 0  # the parent's LISTEN is up when the fork happens
        up, hinted = in_forked_child(_child_listens, postgres.dsn, table)
        assert up > 0, "the child's LISTEN never came up"
        assert hinted != up, "the child's LISTEN got no NOTIFY"
        assert "written by the child" in messages(_READER)
        # The parent's LISTEN goes on.
        seen = core.wait_wakeup(seen, 0.0)
        write(logsluice.Postgres(postgres.dsn, table=table, batch_max_delay=0.05), ["written by the parent"])
        assert core.wait_wakeup(seen, 30.0) != seen
    finally:
        core.unlisten()
        _READER = None


def test_a_blob_reader_made_before_fork_queries_in_the_child(azurite):
    global _READER
    container = f"fork-{uuid.uuid4().hex[:16]}"
    want = [f"before the fork {i}" for i in range(25)]
    write(logsluice.AzureBlob(azurite.connection_string, container=container, batch_max_delay=0.05), want)
    _READER = logsluice.Reader(azurite.connection_string, container=container, max_seconds=10)
    try:
        reads_across_fork(want)
    finally:
        _READER = None
        BlobServiceClient.from_connection_string(azurite.connection_string).delete_container(container)


def test_a_files_reader_made_before_fork_queries_in_the_child(tmp_logs):
    global _READER
    want = [f"before the fork {i}" for i in range(25)]
    write(logsluice.LocalFiles(tmp_logs), want)
    _READER = logsluice.Reader(tmp_logs)
    try:
        reads_across_fork(want)
    finally:
        _READER = None


# The subscription the parent opened before the fork: only this global holds it.
_SUB: logsluice.Subscription | None = None


def until_seen(sub, message: str, within: float = 20.0) -> list[str]:
    """The messages ``sub`` delivers until ``message`` is among them (or ``within`` seconds
    passed: the caller's assertion then shows what came)."""
    got: list[str] = []
    deadline = time.monotonic() + within
    while message not in got and time.monotonic() < deadline:
        got += [r["message"] for r in sub.get(timeout=0.5) if isinstance(r, dict)]
    return got


def _child_tails(destination) -> dict:
    """Follows in the child with the parent's subscription and with a new one of the same
    filters, then writes one record."""
    assert _READER is not None and _SUB is not None
    fresh = _READER.subscribe(poll_interval=0.05)
    write(destination(), ["written in the child"])
    return {
        "inherited": until_seen(_SUB, "written in the child"),
        "fresh": until_seen(fresh, "written in the child"),
    }


def tails_across_fork(destination) -> None:
    """With `_READER`: the parent's tail is live when the fork happens; in the child the
    parent's subscription and a new one (same filters, so the same poller before the fork)
    both deliver what the child writes; the parent's tail goes on."""
    global _SUB
    _SUB = _READER.subscribe(poll_interval=0.05)
    try:
        write(destination(), ["before the fork"])
        assert until_seen(_SUB, "before the fork") == ["before the fork"]
        child = in_forked_child(_child_tails, destination)
        assert child == {"inherited": ["written in the child"], "fresh": ["written in the child"]}
        write(destination(), ["written in the parent after the fork"])
        got = until_seen(_SUB, "written in the parent after the fork")
        assert got == ["written in the child", "written in the parent after the fork"]
    finally:
        _SUB.close()
        _SUB = None


def test_a_files_tail_open_at_the_fork_follows_in_the_child_and_the_parent(tmp_logs):
    global _READER
    _READER = logsluice.Reader(tmp_logs)
    try:
        tails_across_fork(lambda: logsluice.LocalFiles(tmp_logs, batch_max_delay=0.05))
    finally:
        _READER.close()
        _READER = None


def test_a_postgres_tail_open_at_the_fork_follows_in_the_child_and_the_parent(postgres):
    global _READER
    table = f"fork_{uuid.uuid4().hex[:10]}"
    write(logsluice.Postgres(postgres.dsn, table=table), ["creates the table"])
    _READER = logsluice.Reader(postgres.dsn, table=table)
    try:
        tails_across_fork(lambda: logsluice.Postgres(postgres.dsn, table=table, batch_max_delay=0.05))
    finally:
        _READER.close()
        _READER = None


async def _stream(viewer, directory, word: str, close: bool) -> list[str]:
    """Opens the viewer's SSE stream (ASGI, in this event loop) and writes records saying
    ``word`` until one arrives. Then leaves (``close=False``) or closes the viewer and waits
    for the stream to end. Returns the stream's event names, each record's as its message."""
    arrived, leave = asyncio.Event(), asyncio.Event()
    text: list[str] = []

    async def receive():
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body":
            text.append(message.get("body", b"").decode())
            if word in text[-1]:
                arrived.set()

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/api/stream",
        "raw_path": b"/api/stream",
        "root_path": "",
        "query_string": b"kind=app",
        "headers": [],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "scheme": "http",
        "http_version": "1.1",
    }
    served = asyncio.ensure_future(viewer(scope, receive, send))
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + 30
    while not arrived.is_set() and time.monotonic() < deadline and not served.done():
        await loop.run_in_executor(None, write, logsluice.LocalFiles(directory), [word])
        try:
            await asyncio.wait_for(arrived.wait(), 0.5)
        except asyncio.TimeoutError:
            pass
    if close:
        await viewer.aclose()
    else:
        leave.set()
    await asyncio.wait({served}, timeout=30)
    if not served.done():  # the stream did not end: leave, to see what it sent
        leave.set()
        await served
    events = []
    for block in "".join(text).split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if lines.get("event") == "record":
            events.append(json.loads(lines["data"])["message"])
        elif "event" in lines:
            events.append(lines["event"])
    return events


def _child_streams(directory) -> tuple[dict, list[str]]:
    assert _VIEWER is not None
    before = dict(_VIEWER._hub.stats())
    return before, asyncio.run(_stream(_VIEWER, directory, "streamed in the child", close=True))


def test_a_viewer_that_streamed_before_fork_streams_in_the_child(tmp_logs):
    """The parent served a stream (its session is kept for a reconnect) on an event loop of
    its own; the child serves on another: it starts with no session of the parent's, gets its
    records, and closing its viewer ends its stream with a shutdown event."""
    global _VIEWER
    _VIEWER = logsluice.viewer(logsluice.Reader(tmp_logs), allow_anonymous=True)
    try:
        parent = asyncio.run(_stream(_VIEWER, tmp_logs, "streamed in the parent", close=False))
        assert parent[0] == "streamed in the parent"
        assert _VIEWER._hub.stats()["sessions"] == 1
        stats, child = in_forked_child(_child_streams, tmp_logs)
        assert stats["sessions"] == 0 and stats["process_subscribers"] == 0
        assert child[0] == "streamed in the child" and child[-1] == "shutdown"
    finally:
        _VIEWER.close()
        _VIEWER = None
