"""Small helpers shared by the test modules."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import logsluice
from fastapi import BackgroundTasks, FastAPI
from fastapi.testclient import TestClient
from logsluice.destinations import _Controlled


def controlled(tmp_path: Path, mode: str = "ok", **options) -> _Controlled:
    """The test destination: writes to tmp_path/out.ndjson, or fails as tmp_path/control says."""
    control = tmp_path / "control"
    control.write_text(mode)
    return _Controlled(str(control), str(tmp_path / "out.ndjson"), **options)


def stdlib_logger(pipeline: logsluice.Pipeline, name: str) -> logging.Logger:
    """A stdlib logger whose records go to `pipeline` only."""
    log = logging.getLogger(name)
    log.propagate = False
    log.setLevel(logging.DEBUG)
    log.addHandler(pipeline.logging_handler())
    return log


def unique_container(prefix: str = "t") -> str:
    """A container name no other test uses (Azurite is shared by the session)."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def close_with_a_write_in_io(pipeline, name: str) -> tuple[float, dict]:
    """Waits for the writer of destination `name` to take its batch into I/O that never
    ends (a peer that does not answer), then closes with a 1 s timeout: (seconds close took,
    the destination's stats)."""
    wait_for(lambda: pipeline.stats()[name]["queue_records"] == 0, what="the writer to take the batch")
    time.sleep(0.2)  # into the connect or the upload
    started = time.monotonic()
    pipeline.close(timeout=1.0)
    return time.monotonic() - started, pipeline.stats()[name]


def pages(reader, **query):
    """Every page of `reader.query(**query)`, following the cursor to the end."""
    cursor = None
    while True:
        page = reader.query(cursor=cursor, **query)
        yield page
        cursor = page.next
        if not cursor:
            return


def wait_for(check, timeout=60.0, what="condition"):
    """Polls `check` (a wait, not a timed assertion: the timeout only bounds a hang)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def shop_traffic(pipeline, logger, n_requests):
    """Drives a small FastAPI shop through `pipeline`: http records from the middleware
    (routes, 5xx with inbound ids of another shape, background tasks) and app records from
    Loguru with extra fields, then 300 plain records of every level and one traceback.
    Returns the request id of each request, by request number."""
    logger.remove()
    pipeline.attach(logger, level="DEBUG")
    app = FastAPI()

    def background(item_id: int) -> None:
        logger.bind(task="mail", item=item_id).info("background task for item {}", item_id)

    @app.get("/items/{item_id}")
    def item(item_id: int, tasks: BackgroundTasks):
        logger.bind(user={"id": item_id % 5, "name": f"u{item_id % 5}"}, cart=item_id % 3).info(
            "Loaded item {}", item_id
        )
        if item_id % 10 == 0:
            tasks.add_task(background, item_id)
        return {"id": item_id}

    @app.get("/fail/{n}")
    def fail(n: int):
        logger.bind(code=n).error("Payment FAILED for order {}", n)
        raise RuntimeError("boom")

    @app.post("/orders")
    def orders():
        logger.warning("slow provider")
        return {"ok": True}

    app.add_middleware(logsluice.LoggingMiddleware, pipeline=pipeline)
    client = TestClient(app, raise_server_exceptions=False)
    request_ids = {}
    for i in range(n_requests):
        if i % 8 == 7:
            # An inbound id of another shape: found by the bounded newest-first search.
            request_ids[i] = f"fail-{i}"
            client.get(f"/fail/{i}", headers={"x-request-id": f"fail-{i}"})
        elif i % 5 == 4:
            request_ids[i] = client.post("/orders").headers["x-request-id"]
        else:
            request_ids[i] = client.get(f"/items/{i}").headers["x-request-id"]
    for i in range(300):
        level = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"][i % 5]
        logger.bind(n=i, tags=["a", "b"] if i % 2 else ["c"], nested={"deep": {"x": i % 4}}).log(
            level, "plain record {} with <b>odd</b> 'quotes' and \"more\" 100% _under_", i
        )
    logger.opt(exception=ValueError("bad")).error("with traceback")
    return request_ids
