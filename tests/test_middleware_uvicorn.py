"""LoggingMiddleware under a real uvicorn on 127.0.0.1, driven by httpx (and a websocket
client); records read back from LocalFiles. Every test runs under both of uvicorn's flavours:
plain (h11, asyncio) and standard (httptools, uvloop: what `uvicorn[standard]` installs)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from typing import Optional

import httpx
import logsluice
import pytest
import uvicorn
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import StreamingResponse
from harness._net import free_port, wait_until
from harness.asgi import http_records, read_records
from logsluice._demo_app import create_app, drive_traffic
from loguru import logger
from websockets.sync.client import connect

FLAVOURS = {"plain": {"http": "h11", "loop": "asyncio"}, "standard": {"http": "httptools", "loop": "uvloop"}}


@pytest.fixture(params=sorted(FLAVOURS))
def flavour(request) -> dict[str, str]:
    return FLAVOURS[request.param]


class Server:
    def __init__(self, app, flavour: Optional[dict[str, str]] = None) -> None:
        """`flavour`: one of FLAVOURS, or None for uvicorn's own choice (the fastest installed)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on", **(flavour or {})
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_until(lambda: self.server.started, 20, "uvicorn to start")
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(20)


@pytest.fixture
def pipeline(tmp_logs):
    p = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs))
    yield p
    p.close()


def make_app(pipeline, **options):
    release = asyncio.Event()
    state = {"lifespan": "not started"}

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        state["lifespan"] = "started"
        async with pipeline.lifespan(app):
            yield
        state["lifespan"] = "stopped"

    app = FastAPI(lifespan=lifespan)
    app.state.flags = state

    @app.get("/sse")
    async def sse():
        async def gen():
            yield "data: first\n\n"
            await release.wait()
            yield "data: last\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.post("/release")
    async def do_release():
        release.set()
        return {"released": True}

    @app.get("/forever")
    async def forever():
        async def gen():
            while True:
                yield b"x" * 1024
                await asyncio.sleep(0.01)

        return StreamingResponse(gen(), media_type="application/octet-stream")

    @app.post("/upload")
    async def upload(request: Request):
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.stream():
            digest.update(chunk)
            size += len(chunk)
        return {"size": size, "sha256": digest.hexdigest()}

    @app.get("/boom")
    async def boom():
        logger.info("about to fail")
        raise RuntimeError("kaboom")

    @app.websocket("/ws")
    async def ws(websocket: WebSocket):
        await websocket.accept()
        text = await websocket.receive_text()
        await websocket.send_text(f"echo {text}")
        await websocket.close()

    app.add_middleware(logsluice.LoggingMiddleware, pipeline=pipeline, **options)
    return app


def test_sse_first_event_arrives_before_the_stream_ends(pipeline, tmp_logs, flavour):
    with Server(make_app(pipeline), flavour) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        with client.stream("GET", "/sse") as response:
            lines = response.iter_lines()
            # The stream cannot end before /release: this line came through unbuffered.
            assert next(lines) == "data: first"
            assert client.post("/release").json() == {"released": True}
            rest = [line for line in lines if line]
        assert rest == ["data: last"]
    sse = [r for r in http_records(pipeline, tmp_logs) if r["path"] == "/sse"]
    assert sse[0]["response_body"] == "data: first\n\ndata: last\n\n"
    assert sse[0]["ttfb_ms"] <= sse[0]["duration_ms"]


def test_10_mb_upload_arrives_intact_while_only_the_cap_is_captured(pipeline, tmp_logs, flavour):
    data = os.urandom(10 * 1024 * 1024)
    with Server(make_app(pipeline), flavour) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        r = client.post("/upload", content=data, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200
    assert r.json() == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (rec,) = [r for r in http_records(pipeline, tmp_logs) if r["path"] == "/upload"]
    assert rec["request_size"] == len(data)
    assert rec["fields"]["request_body_truncated"] is True
    cap = hashlib.sha256(data[:65536]).hexdigest()
    assert rec["request_body"] == f"[binary body: {len(data)} bytes, sha256 of the first 65536 bytes {cap}]"


def test_websocket_and_lifespan_work_through_the_middleware(pipeline, tmp_logs, flavour):
    app = make_app(pipeline)
    with Server(app, flavour) as srv:
        assert app.state.flags["lifespan"] == "started"
        with connect(f"ws://127.0.0.1:{srv.port}/ws") as ws:
            ws.send("hi")
            assert ws.recv() == "echo hi"
    assert app.state.flags["lifespan"] == "stopped"
    # The pipeline's lifespan closed it at shutdown; websockets are not access-logged.
    assert pipeline.closed
    assert [r for r in read_records(tmp_logs) if r["kind"] == "http"] == []


def test_exception_and_disconnect_records(pipeline, tmp_logs, flavour):
    handler = pipeline.attach(logger, level="INFO")
    try:
        # uvicorn closes a connection whose app raised: no keep-alive between requests.
        limits = httpx.Limits(max_keepalive_connections=0)
        with (
            Server(make_app(pipeline), flavour) as srv,
            httpx.Client(base_url=srv.url, timeout=30, limits=limits) as client,
        ):
            r = client.get("/boom", headers={"x-request-id": "boom-1"})
            assert r.status_code == 500
            assert r.headers.get("x-request-id") is None or r.headers["x-request-id"] == "boom-1"
            with client.stream("GET", "/forever") as response:
                next(response.iter_bytes())
            # Closing the stream closed the connection: the app sees the disconnect.

            def disconnected():
                return any(rec["path"] == "/forever" for rec in http_records(pipeline, tmp_logs))

            wait_until(disconnected, 30, "the /forever record")
    finally:
        logger.remove(handler)
    records = read_records(tmp_logs)
    (boom,) = [r for r in records if r["kind"] == "http" and r["path"] == "/boom"]
    assert boom["status"] == 500 and boom["level"] == "ERROR" and "RuntimeError: kaboom" in boom["exception"]
    (app_log,) = [r for r in records if r["message"] == "about to fail"]
    assert app_log["request_id"] == boom["request_id"] == "boom-1"
    (forever,) = [r for r in records if r["kind"] == "http" and r["path"] == "/forever"]
    assert forever["status"] == 499 and forever["fields"]["disconnected"] is True
    assert forever["response_size"] >= 1024


def test_demo_app_under_uvicorn(pipeline, tmp_logs, flavour):
    app = create_app(pipeline)
    with Server(app, flavour) as srv:
        summary = drive_traffic(srv.url, requests=20, upload_bytes=1024 * 1024)
    assert summary["/boom 500"] == 1
    assert summary["/login 401"] == 2
    assert summary["/upload 200"] == 1
    records = http_records(pipeline, tmp_logs)
    routes = {r["route"] for r in records}
    assert "/health" not in routes  # sampled at 0.0
    assert {"/boom", "/login", "/upload", "/stream"} <= routes
    stats = pipeline.stats()["http"]
    assert stats["seen"] == sum(summary.values())
    assert stats["seen"] == stats["kept"] + stats["sampled_out"] + stats["excluded"] + stats["rate_limited"]
    assert stats["kept"] == len(records)
    text = "".join(str(r) for r in records)
    assert "4111 1111 1111 1111" not in text and "demo-token-123456" not in text and "wrong" not in text
