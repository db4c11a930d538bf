"""PostgreSQL read side, live parts: the writer's NOTIFY wake-up hint (sent after commit,
coalesced) that lets tails poll early, and the async twins awaiting the core's own futures
(no executor thread per call, cancellation drops the query)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
import uuid

import logsluice
import psycopg
import pytest
from loguru import logger


def make_table(dsn: str, n: int = 0, notify: bool = True) -> str:
    table = f"live_{uuid.uuid4().hex[:10]}"
    p = logsluice.Pipeline(logsluice.Postgres(dsn, table=table, notify=notify))
    logger.remove()
    p.attach(logger)
    logger.info("creates the table")
    for i in range(n):
        logger.bind(i=i).info("record {}", i)
    p.flush(timeout=30)
    p.close()
    logger.remove()
    return table


def writer(dsn: str, table: str, **options) -> logsluice.Pipeline:
    p = logsluice.Pipeline(logsluice.Postgres(dsn, table=table, batch_max_delay=0.01, **options))
    logger.remove()
    p.attach(logger)
    return p


def arrival(sub: logsluice.Subscription, message: str, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if any(r.get("message") == message for r in sub.get(timeout=0.2) if isinstance(r, dict)):
            return True
    return False


def test_notify_wakes_a_tail_long_before_its_poll_interval(postgres):
    table = make_table(postgres.dsn)
    reader = logsluice.Reader(postgres.dsn, table=table)
    p = writer(postgres.dsn, table)
    try:
        with reader.subscribe(poll_interval=30.0) as sub:
            time.sleep(1.5)  # the LISTEN is up and its first poll done: only a hint can deliver now
            logger.info("woken by NOTIFY")
            p.flush(timeout=30)
            # 30 s poll interval: without the hint the record would come at the next poll.
            assert arrival(sub, "woken by NOTIFY", within=10.0)
    finally:
        p.close()
        logger.remove()
        reader.close()


def test_without_notify_the_tail_waits_for_its_poll(postgres):
    """The control for the test above: the same tail, a writer with notify=False."""
    table = make_table(postgres.dsn)
    reader = logsluice.Reader(postgres.dsn, table=table)
    p = writer(postgres.dsn, table, notify=False)
    try:
        with reader.subscribe(poll_interval=30.0) as sub:
            time.sleep(1.5)  # the LISTEN is up, and its first poll done
            logger.info("no hint sent")
            p.flush(timeout=30)
            assert not arrival(sub, "no hint sent", within=3.0)
    finally:
        p.close()
        logger.remove()
        reader.close()


def test_writer_notifies_are_coalesced_and_follow_the_last_commit(postgres):
    table = make_table(postgres.dsn)
    channel = f"logsluice_public_{table}"
    listen = psycopg.connect(postgres.dsn, autocommit=True)
    listen.execute(f"LISTEN {channel}")
    p = writer(postgres.dsn, table)
    seen = []
    try:
        start = time.monotonic()
        batches = 0
        while time.monotonic() - start < 2.0:
            logger.info("burst {}", batches)
            p.flush(timeout=30)  # one committed batch per record
            batches += 1
        last_commit = time.monotonic()
        burst = last_commit - start
        # The hint still owed for the last batches goes out on the writer's next idle tick.
        for n in listen.notifies(timeout=3.0):
            seen.append((time.monotonic(), n.channel, n.payload))
        assert batches >= 20, batches
        assert seen, "no NOTIFY received"
        assert {(c, pl) for _, c, pl in seen} == {(channel, "")}
        # At most one per 250 ms (plus the trailing one), far fewer than the batches.
        assert len(seen) <= burst / 0.25 + 2, (len(seen), burst)
        assert len(seen) < batches / 4, (len(seen), batches)
        # The last batch was announced after it committed.
        assert seen[-1][0] >= last_commit
        # Every batch committed: the hints never came at the cost of data.
        assert postgres.psql(f"select count(*) from {table} where message like 'burst %%'")[0][0] == batches
    finally:
        p.close()
        logger.remove()
        listen.close()


class Locked:
    """Holds an ACCESS EXCLUSIVE lock on a table, so every query on it waits."""

    def __init__(self, dsn: str, table: str) -> None:
        self.conn = psycopg.connect(dsn)
        self.conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")

    def release(self) -> None:
        if self.conn is not None:
            self.conn.rollback()
            self.conn.close()
            self.conn = None


def test_fifty_concurrent_aqueries_on_one_loop_that_keeps_ticking(postgres):
    table = make_table(postgres.dsn, n=200)
    reader = logsluice.Reader(postgres.dsn, table=table)
    expected = [r["message"] for r in reader.query(limit=30, text="record").records]
    assert len(expected) == 30
    ticks = []

    async def heartbeat():
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    async def main():
        beat = asyncio.create_task(heartbeat())
        threads_before = threading.active_count()
        lock = Locked(postgres.dsn, table)
        calls = [asyncio.ensure_future(reader.aquery(limit=30, text="record")) for _ in range(50)]
        await asyncio.sleep(0)
        try:
            # Every query waits on the lock, in the core: the loop goes on ticking and no
            # thread was started for them.
            assert reader._core.in_flight() == 50
            n = len(ticks)
            await asyncio.sleep(0.5)
            assert len(ticks) > n + 10
            assert not any(c.done() for c in calls)
            assert threading.active_count() == threads_before
        finally:
            lock.release()
        pages = await asyncio.gather(*calls)
        ctx = await reader.acontext(pages[0].records[5]["id"], before=2, after=2)
        view = await reader.arequest("no-such-request")
        summary = await reader.asummary(by="level", since="1h")
        beat.cancel()
        return pages, ctx, view, summary

    pages, ctx, view, summary = asyncio.run(main())
    assert all([r["message"] for r in page.records] == expected for page in pages)
    assert ctx == reader.context(pages[0].records[5]["id"], before=2, after=2)
    assert len(ctx["before"]) == len(ctx["after"]) == 2
    assert view.access is None and view.records == []
    assert {g["key"]["level"]: g["count"] for g in summary["groups"]} == {"INFO": 201}
    assert reader._core.in_flight() == 0


def test_cancelled_aquery_drops_its_query_and_is_never_set(postgres):
    table = make_table(postgres.dsn, n=10)
    reader = logsluice.Reader(postgres.dsn, table=table)
    loop_errors = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: loop_errors.append(ctx))
        lock = Locked(postgres.dsn, table)
        try:
            task = asyncio.ensure_future(reader.aquery(limit=5))
            while reader._core.in_flight() != 1:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The lock is still held: the query could only have ended by being dropped.
            while reader._core.in_flight() != 0:
                await asyncio.sleep(0.01)
        finally:
            lock.release()
        await asyncio.sleep(0.3)
        return await reader.aquery(limit=5)

    page = asyncio.run(main())
    assert len(page.records) == 5
    assert loop_errors == []


def test_async_bad_input_is_a_value_error(postgres):
    table = make_table(postgres.dsn)
    reader = logsluice.Reader(postgres.dsn, table=table)

    async def main():
        with pytest.raises(ValueError, match="status"):
            await reader.aquery(status="6xx")
        with pytest.raises(TypeError, match="colour"):
            await reader.aquery(colour="red")
        with pytest.raises(ValueError):
            await reader.asummary(by="nothing")

    asyncio.run(main())


DROPPED_READER = """
import asyncio, gc, sys, time
import logsluice, psycopg

dsn, table = sys.argv[1], sys.argv[2]
reader = logsluice.Reader(dsn, table=table)
lock = psycopg.connect(dsn)
lock.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
loop = asyncio.new_event_loop()

async def start():
    task = asyncio.ensure_future(reader.aquery(limit=5))
    while reader._core.in_flight() != 1:
        await asyncio.sleep(0.01)
    return task

task = loop.run_until_complete(start())
loop.close()  # the application goes away with the query still waiting in the core
del task, reader
gc.collect()
lock.rollback()  # the query completes now, after its reader and loop are gone
time.sleep(1.0)
print(len(logsluice.Reader(dsn, table=table).query(limit=5).records))
"""


def test_a_reader_dropped_with_a_query_in_flight_goes_quietly(postgres, tmp_path):
    table = make_table(postgres.dsn, n=10)
    script = tmp_path / "dropped.py"
    script.write_text(DROPPED_READER)
    r = subprocess.run(
        [sys.executable, str(script), postgres.dsn, table],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "5"
    assert "panicked" not in r.stderr, r.stderr
