"""Live streams of the viewer over real uvicorn: SSE and WebSocket, resume by Last-Event-ID
without loss or duplicates, a forced gap, heartbeats and the lifetime limit, the subscriber
cap, 100 concurrent clients, and shutdown (viewer.aclose, pipeline close, SIGTERM)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import logsluice
import pytest
import websockets
from harness._net import free_port, port_open, wait_until
from loguru import logger
from viewer_support import TOKEN, ServerThread, client, host_app, make_reader, sse_events

pytestmark = pytest.mark.timeout(180)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Site:
    def __init__(self, directory, **viewer_options):
        self.directory = directory
        self.pipeline = logsluice.Pipeline(logsluice.LocalFiles(directory, batch_max_delay=0.05))
        self.handler = self.pipeline.attach(logger, level="DEBUG")
        app, self.view = host_app(self.pipeline, make_reader(directory), **viewer_options)
        self.server = ServerThread(app)

    def __enter__(self):
        self.server.__enter__()
        self.base = self.server.base
        return self

    def __exit__(self, *exc):
        self.view.close()
        self.server.__exit__(*exc)
        logger.remove(self.handler)
        self.pipeline.close()

    def write(self, prefix: str, count: int, pad: int = 0) -> list[str]:
        texts = [f"{prefix}-{i}" + ("." * pad if pad else "") for i in range(count)]
        for t in texts:
            logger.info(t)
        self.pipeline.flush(timeout=60)
        return texts

    def status(self) -> dict:
        with client(self.base) as c:
            return c.get("/logs/api/status").json()["streams"]

    def wait_subscribers(self, n: int) -> None:
        wait_until(lambda: self.status()["subscribers"] == n, 60, f"{n} subscribers")


def records_from(events, want: int, prefix: str):
    """Reads events until ``want`` records starting with ``prefix`` arrived; returns them and
    the last event id."""
    got, last_id, gaps = [], None, []
    for ev in events:
        if ev.get("event") == "record":
            last_id = ev["id"]
            if ev["data"]["message"].startswith(prefix):
                got.append(ev["data"]["message"])
        elif ev.get("event") == "gap":
            last_id = ev["id"]
            gaps.append(ev["data"])
        if len(got) + sum(g["count"] for g in gaps) >= want:
            break
    return got, last_id, gaps


def test_sse_headers_and_records(tmp_logs):
    with Site(tmp_logs) as site, client(site.base) as c:
        with c.stream("GET", "/logs/api/stream", params={"logger": "test_viewer_stream"}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["cache-control"] == "no-cache"
            assert r.headers["x-accel-buffering"] == "no"
            site.wait_subscribers(1)
            sent = site.write("hello", 5)
            got, last_id, _ = records_from(sse_events(r.iter_lines()), 5, "hello")
        assert got == sent and last_id


def test_sse_resume_by_last_event_id_without_loss_or_duplicates(tmp_logs):
    with Site(tmp_logs) as site, client(site.base) as c:
        with c.stream("GET", "/logs/api/stream") as r:
            site.wait_subscribers(1)
            first = site.write("a", 50)
            got1, last_id, _ = records_from(sse_events(r.iter_lines()), 20, "a")
        site.wait_subscribers(0)
        second = site.write("b", 30)  # written while the client is away
        with c.stream("GET", "/logs/api/stream", headers={"Last-Event-ID": last_id}) as r:
            got2, _, _ = records_from(sse_events(r.iter_lines()), 60, "")
        assert got1 + got2 == first + second


def test_sse_resume_after_the_session_expired(tmp_logs):
    # The position in the event id alone (time and ids seen at it) resumes the stream.
    with Site(tmp_logs, resume_window=0.01) as site, client(site.base) as c:
        with c.stream("GET", "/logs/api/stream") as r:
            site.wait_subscribers(1)
            first = site.write("a", 30)
            got1, last_id, _ = records_from(sse_events(r.iter_lines()), 10, "a")
        site.wait_subscribers(0)
        second = site.write("b", 10)
        wait_until(lambda: site.status()["sessions"] <= 1, 10, "the old session to expire")
        with c.stream("GET", "/logs/api/stream", headers={"Last-Event-ID": last_id}) as r:
            got2, _, _ = records_from(sse_events(r.iter_lines()), 30, "")
        assert got1 + got2 == first + second


def test_bad_last_event_id_is_a_400(tmp_logs):
    with Site(tmp_logs) as site, client(site.base) as c:
        r = c.get("/logs/api/stream", headers={"Last-Event-ID": "'; DROP TABLE logs; --"})
        assert r.status_code == 400 and "Last-Event-ID" in r.json()["error"]
        r = c.get("/logs/api/stream", params={"min_level": "LOUD"})
        assert r.status_code == 400


def test_slow_client_gets_an_explicit_gap(tmp_logs):
    with Site(tmp_logs, stream_buffer=20) as site, client(site.base) as c:
        with c.stream("GET", "/logs/api/stream") as r:
            site.wait_subscribers(1)
            # The client reads nothing while records pour in: socket buffers fill, then the
            # subscriber's buffer, then the records are counted as a gap.
            sent = []
            for round_no in range(40):
                sent += site.write(f"r{round_no}", 200, pad=4000)
                if site.status()["gaps"] > 0:
                    break
            assert site.status()["gaps"] > 0
            got, _, gaps = records_from(sse_events(r.iter_lines()), len(sent), "r")
        assert gaps and all(g["count"] > 0 and g["from"] <= g["until"] for g in gaps)
        assert len(got) + sum(g["count"] for g in gaps) == len(sent)
        assert len(set(got)) == len(got) and set(got) < set(sent)
        # The gap is pageable: its query lists what the stream skipped.
        q = gaps[0]["query"]
        assert q["since"] == gaps[0]["from"] and q["until"] == gaps[0]["until"]


def test_heartbeat_and_lifetime_end_with_reconnect(tmp_logs):
    with Site(tmp_logs, heartbeat=0.2, max_stream_seconds=1.0) as site, client(site.base) as c:
        with c.stream("GET", "/logs/api/stream") as r:
            events = list(sse_events(r.iter_lines()))
        kinds = [e.get("event") for e in events]
        assert "comment" in kinds  # heartbeats
        assert kinds[-1] == "reconnect"


def test_subscriber_cap(tmp_logs):
    with Site(tmp_logs, max_subscribers=2) as site, client(site.base) as c:
        with c.stream("GET", "/logs/api/stream"), c.stream("GET", "/logs/api/stream"):
            site.wait_subscribers(2)
            r = c.get("/logs/api/stream")
            assert r.status_code == 429
            assert r.json()["max_subscribers"] == 2 and "too many" in r.json()["error"]

            async def ws_refused():
                url = f"ws://127.0.0.1:{site.server.port}/logs/api/stream/ws"
                async with websockets.connect(url, additional_headers=AUTH) as ws:
                    with pytest.raises(websockets.ConnectionClosed) as closed:
                        await ws.recv()
                return closed.value.rcvd

            rcvd = asyncio.run(ws_refused())
            assert rcvd.code == 1013 and "too many live streams" in rcvd.reason


def test_websocket_frames_origin_and_auth(tmp_logs):
    with Site(tmp_logs) as site:
        url = f"ws://127.0.0.1:{site.server.port}/logs/api/stream/ws?logger=test_viewer_stream"

        async def main():
            async with websockets.connect(url, additional_headers=AUTH) as ws:
                await asyncio.get_running_loop().run_in_executor(None, site.wait_subscribers, 1)
                sent = await asyncio.get_running_loop().run_in_executor(None, site.write, "ws", 3)
                got = []
                while len(got) < 3:
                    frame = json.loads(await ws.recv())
                    if frame["event"] == "record":
                        assert frame["id"]
                        got.append(frame["data"]["message"])
                assert got == sent
            # A foreign page's origin is refused, even with valid credentials.
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(url, additional_headers=AUTH, origin="https://evil.example"):
                    pass
            assert refused.value.response.status_code == 403
            # No credentials: refused.
            with pytest.raises(websockets.InvalidStatus):
                async with websockets.connect(url):
                    pass
            # Same origin with credentials: accepted.
            async with websockets.connect(
                url, additional_headers=AUTH, origin=f"http://127.0.0.1:{site.server.port}"
            ) as ws:
                await ws.close()

        asyncio.run(main())


def test_hundred_concurrent_sse_clients(tmp_logs):
    with Site(tmp_logs) as site:

        async def one(c: httpx.AsyncClient) -> list[str]:
            async with c.stream("GET", "/logs/api/stream") as r:
                assert r.status_code == 200
                lines = r.aiter_lines()
                pending = []
                async for line in lines:
                    pending.append(line)
                    if line.startswith("data:") and "broadcast-0" in line:
                        return pending
            return pending

        async def main():
            limits = httpx.Limits(max_connections=150, max_keepalive_connections=150)
            async with httpx.AsyncClient(base_url=site.base, headers=AUTH, timeout=60, limits=limits) as c:
                tasks = [asyncio.ensure_future(one(c)) for _ in range(100)]
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, site.wait_subscribers, 100)
                await loop.run_in_executor(None, site.write, "broadcast", 1)
                return await asyncio.gather(*tasks)

        results = asyncio.run(main())
        assert len(results) == 100 and all(any("broadcast-0" in line for line in r) for r in results)


def test_aclose_and_pipeline_close_end_streams_with_shutdown(tmp_logs):
    with Site(tmp_logs) as site, client(site.base) as c:
        with c.stream("GET", "/logs/api/stream") as r:
            site.wait_subscribers(1)
            site.pipeline.close()  # the viewer was given this pipeline
            events = list(sse_events(r.iter_lines()))
        assert events[-1]["event"] == "shutdown"
        r = c.get("/logs/api/stream")
        assert r.status_code == 503


def test_sigterm_with_open_streams_exits(tmp_path):
    """uvicorn waits for open responses before it shuts down; the viewer ends its streams on
    SIGTERM, so the process exits (no graceful-shutdown timeout is set: it would wait forever)."""
    directory = tmp_path / "logs"
    directory.mkdir()
    port = free_port()
    env = {**os.environ, "VIEWER_TEST_DIR": str(directory), "PYTHONPATH": str(Path(__file__).parent)}
    argv = [sys.executable, "-m", "uvicorn", "--factory", "viewer_support:sigterm_app"]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: port_open(port), 60, "uvicorn to listen")
        base = f"http://127.0.0.1:{port}"

        async def main():
            limits = httpx.Limits(max_connections=150, max_keepalive_connections=150)
            async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as c:

                async def one() -> list[str]:
                    out = []
                    async with c.stream("GET", "/logs/api/stream") as r:
                        async for line in r.aiter_lines():
                            out.append(line)
                    return out

                tasks = [asyncio.ensure_future(one()) for _ in range(100)]

                def subscribed() -> bool:
                    r = httpx.get(f"{base}/logs/api/status")
                    return r.json()["streams"]["subscribers"] == 100

                await asyncio.get_running_loop().run_in_executor(
                    None, lambda: wait_until(subscribed, 60, "100 streams")
                )
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        results = asyncio.run(main())
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert all("event: shutdown" in r for r in results)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_websocket_resume_by_last_event_id(tmp_logs):
    with Site(tmp_logs) as site:
        url = f"ws://127.0.0.1:{site.server.port}/logs/api/stream/ws"

        async def read(ws, want: int) -> tuple[list[str], str]:
            got, last = [], ""
            while len(got) < want:
                frame = json.loads(await ws.recv())
                if frame["event"] == "record":
                    got.append(frame["data"]["message"])
                    last = frame["id"]
            return got, last

        async def main():
            loop = asyncio.get_running_loop()
            async with websockets.connect(url, additional_headers=AUTH) as ws:
                await loop.run_in_executor(None, site.wait_subscribers, 1)
                first = await loop.run_in_executor(None, site.write, "w", 20)
                got1, last = await read(ws, 8)
            await loop.run_in_executor(None, site.wait_subscribers, 0)
            second = await loop.run_in_executor(None, site.write, "x", 5)
            async with websockets.connect(f"{url}?last_event_id={last}", additional_headers=AUTH) as ws:
                got2, _ = await read(ws, 17)
            assert got1 + got2 == first + second

        asyncio.run(main())


def test_viewer_aclose_ends_streams(tmp_logs):
    with Site(tmp_logs) as site, client(site.base) as c:
        with c.stream("GET", "/logs/api/stream") as r, c.stream("GET", "/logs/api/stream") as r2:
            site.wait_subscribers(2)
            loop = site.view._hub._loop
            asyncio.run_coroutine_threadsafe(site.view.aclose(), loop).result(timeout=30)
            events = list(sse_events(r.iter_lines()))
            events2 = list(sse_events(r2.iter_lines()))
        assert events[-1]["event"] == "shutdown" and events2[-1]["event"] == "shutdown"
        assert site.status()["subscribers"] == 0
        r = c.get("/logs/api/stream")
        assert r.status_code == 503 and r.json() == {"error": "the viewer is shutting down"}


def test_sse_over_postgres_resumes_without_loss(postgres):
    """The same stream over a PostgreSQL reader: records committed by the pipeline reach the
    client, and a resume by Last-Event-ID repeats and loses nothing."""
    table = "viewer_stream"
    pipeline = logsluice.Pipeline(logsluice.Postgres(postgres.dsn, table=table, batch_max_delay=0.05))
    handler = pipeline.attach(logger, level="DEBUG")
    try:
        logger.info("create the table")
        pipeline.flush(timeout=60)
        reader = logsluice.Reader(postgres.dsn, table=table)
        app, view = host_app(pipeline, reader)
        with ServerThread(app) as server, client(server.base) as c:

            def write(prefix: str, n: int) -> list[str]:
                texts = [f"{prefix}-{i}" for i in range(n)]
                for t in texts:
                    logger.info(t)
                pipeline.flush(timeout=60)
                return texts

            with c.stream("GET", "/logs/api/stream", params={"logger": "test_viewer_stream"}) as r:
                wait_until(lambda: subscribers(c) == 1, 60, "subscribed")
                first = write("pg", 40)
                got1, last_id, _ = records_from(sse_events(r.iter_lines()), 15, "pg")
            wait_until(lambda: subscribers(c) == 0, 60, "detached")
            second = write("pq", 10)
            with c.stream(
                "GET",
                "/logs/api/stream",
                params={"logger": "test_viewer_stream"},
                headers={"Last-Event-ID": last_id},
            ) as r:
                got2, _, _ = records_from(sse_events(r.iter_lines()), 35, "p")
            view.close()
        assert got1 + got2 == first + second
    finally:
        logger.remove(handler)
        pipeline.close()


def subscribers(c: httpx.Client) -> int:
    return c.get("/logs/api/status").json()["streams"]["subscribers"]


def test_a_viewer_served_by_one_event_loop_then_another_streams_on_both(tmp_logs):
    # One viewer, two servers one after the other (a second asyncio.run, successive test
    # clients): the second loop's streams get their records and their shutdown.
    pipeline = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs, batch_max_delay=0.05))
    handler = pipeline.attach(logger, level="DEBUG")
    app, view = host_app(pipeline, make_reader(tmp_logs))
    try:
        for round_ in ("first", "second"):
            with ServerThread(app) as server, client(server.base) as c:
                with c.stream("GET", "/logs/api/stream") as r:
                    wait_until(lambda c=c: subscribers(c) == 1, 60, "a subscriber")
                    logger.info(f"{round_} loop")
                    pipeline.flush(timeout=60)
                    events = sse_events(r.iter_lines())
                    got, _, _ = records_from(events, 1, f"{round_} loop")
                    assert got == [f"{round_} loop"]
                    if round_ == "second":
                        view.close()
                        assert list(events)[-1]["event"] == "shutdown"
    finally:
        logger.remove(handler)
        pipeline.close()
