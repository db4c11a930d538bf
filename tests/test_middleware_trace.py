"""W3C trace ids of a request reach the app's own records: Loguru, stdlib and background
tasks carry the access record's trace_id/span_id, in files and in PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import uuid

import httpx
import logsluice
import pytest
from fastapi import BackgroundTasks, FastAPI
from harness.asgi import Client, read_records, scope
from logsluice import _context
from logsluice.middleware import LoggingMiddleware
from loguru import logger
from test_middleware_uvicorn import Server

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{SPAN}-01".encode()


@pytest.fixture
def pipeline(tmp_logs):
    p = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs))
    yield p
    p.close()


def traced_app(pipeline, seen: dict, later: list):
    """FastAPI app whose endpoint logs with Loguru and stdlib, runs a BackgroundTask and
    starts an asyncio task that outlives the request; all of them log."""
    app = FastAPI()
    std = logging.getLogger("test.trace")
    std.propagate = False
    std.setLevel(logging.INFO)
    std.handlers = [pipeline.logging_handler()]

    def background():
        logger.info("background task")

    async def detached():
        await asyncio.sleep(0.01)
        seen["trace_in_detached"] = _context.trace.get()
        std.info("detached task")

    @app.get("/work")
    async def work(tasks: BackgroundTasks):
        seen["trace_in_handler"] = _context.trace.get()
        logger.info("loguru in handler")
        std.info("stdlib in handler")
        tasks.add_task(background)
        later.append(asyncio.get_running_loop().create_task(detached()))
        return {"ok": True}

    app.add_middleware(LoggingMiddleware, pipeline=pipeline)
    return app


def run(app, headers: list, seen: dict, later: list, before=None) -> Client:
    """One request through `app`, inside a context where the trace variable holds `before`:
    after the request it must hold that again."""
    client = Client([b""])

    async def main():
        if before is not None:
            _context.trace.set(before)
        await app(scope("/work", headers=headers), client.receive, client.send)
        seen["trace_after"] = _context.trace.get()
        seen["rid_after"] = _context.request_id.get()
        await asyncio.gather(*later)

    asyncio.run(main())
    assert seen["trace_after"] == before and seen["rid_after"] is None
    return client


MESSAGES = {"loguru in handler", "stdlib in handler", "background task", "detached task"}


def records_of(pipeline, tmp_logs) -> tuple[dict, list[dict]]:
    pipeline.flush(timeout=30)
    records = read_records(tmp_logs)
    (access,) = [r for r in records if r["kind"] == "http"]
    app = [r for r in records if r["kind"] == "app"]
    assert {r["message"] for r in app} == MESSAGES
    assert all(r["request_id"] == access["request_id"] for r in app)
    return access, app


@pytest.mark.parametrize(
    "headers",
    [
        [(b"traceparent", TRACEPARENT)],
        # The request id header and traceparent are found in the same pass, in either order.
        [(b"x-request-id", b"req-7"), (b"host", b"test"), (b"traceparent", TRACEPARENT)],
        [(b"traceparent", TRACEPARENT), (b"x-request-id", b"req-7")],
    ],
    ids=["alone", "after-request-id", "before-request-id"],
)
def test_app_records_carry_the_trace_of_their_request(pipeline, tmp_logs, loguru, headers):
    pipeline.attach(loguru, level="INFO")
    seen: dict = {}
    later: list = []
    client = run(traced_app(pipeline, seen, later), headers, seen, later, before=("outer", "outer"))
    assert client.status == 200
    assert seen["trace_in_handler"] == seen["trace_in_detached"] == (TRACE, SPAN)
    access, app = records_of(pipeline, tmp_logs)
    assert (access["trace_id"], access["span_id"]) == (TRACE, SPAN)
    for r in app:
        assert (r["trace_id"], r["span_id"]) == (TRACE, SPAN), r["message"]
        assert r["fields"] == {}
    if any(k == b"x-request-id" for k, _ in headers):
        assert access["request_id"] == "req-7"


@pytest.mark.parametrize(
    "traceparent",
    [
        None,
        b"garbage",
        f"00-{TRACE.upper()}-{SPAN}-01".encode(),
        f"00-{'0' * 32}-{SPAN}-01".encode(),
        f"ff-{TRACE}-{SPAN}-01".encode(),
        f"00-{TRACE}-{SPAN}-01-extra".encode(),
        "é".encode(),
    ],
    ids=["absent", "garbage", "upper-case", "zero-trace", "version-ff", "extra-field", "non-ascii"],
)
def test_no_valid_traceparent_means_no_trace_ids(pipeline, tmp_logs, loguru, traceparent):
    pipeline.attach(loguru, level="INFO")
    seen: dict = {}
    later: list = []
    headers = [(b"host", b"test")] + ([(b"traceparent", traceparent)] if traceparent else [])
    run(traced_app(pipeline, seen, later), headers, seen, later)
    assert seen["trace_in_handler"] is None and seen["trace_in_detached"] is None
    access, app = records_of(pipeline, tmp_logs)
    assert access["trace_id"] is None and access["span_id"] is None
    for r in app:
        assert "trace_id" not in r and "span_id" not in r, r["message"]


def test_without_any_trace_app_records_have_no_trace_keys(pipeline, tmp_logs, loguru):
    pipeline.attach(loguru, level="INFO")
    logger.info("plain")
    logging_handler = pipeline.logging_handler()
    std = logging.getLogger("test.trace.plain")
    std.propagate = False
    std.handlers = [logging_handler]
    std.warning("plain stdlib")
    pipeline.flush(timeout=30)
    records = read_records(tmp_logs)
    assert {r["message"] for r in records} == {"plain", "plain stdlib"}
    assert all("trace_id" not in r and "span_id" not in r for r in records)


def test_explicit_trace_ids_win_over_the_request(pipeline, tmp_logs, loguru):
    pipeline.attach(loguru, level="INFO")
    std = logging.getLogger("test.trace.explicit")
    std.propagate = False
    std.setLevel(logging.INFO)
    std.handlers = [pipeline.logging_handler()]

    async def app(scope, receive, send):
        logger.bind(trace_id="mine").info("bound trace only")
        logger.bind(trace_id="t2", span_id="s2", user="ada").info("bound both")
        std.info("stdlib extra", extra={"span_id": "s3"})
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    mw = LoggingMiddleware(app, pipeline=pipeline)
    client = Client([b""])
    asyncio.run(mw(scope("/", headers=[(b"traceparent", TRACEPARENT)]), client.receive, client.send))
    pipeline.flush(timeout=30)
    by_message = {r["message"]: r for r in read_records(tmp_logs) if r["kind"] == "app"}
    # An explicit id replaces the request's pair: never the caller's trace with our span.
    assert by_message["bound trace only"]["trace_id"] == "mine"
    assert "span_id" not in by_message["bound trace only"]
    assert (by_message["bound both"]["trace_id"], by_message["bound both"]["span_id"]) == ("t2", "s2")
    assert by_message["bound both"]["fields"] == {"user": "ada"}
    assert "trace_id" not in by_message["stdlib extra"] and by_message["stdlib extra"]["span_id"] == "s3"
    assert by_message["stdlib extra"]["fields"] == {}


def test_app_rows_and_access_row_share_the_trace_in_postgres(postgres, tmp_logs, loguru):
    table = f"mw_trace_{uuid.uuid4().hex[:12]}"
    pipeline = logsluice.Pipeline(
        logsluice.Postgres(postgres.dsn, table=table), logsluice.LocalFiles(tmp_logs)
    )
    pipeline.attach(loguru, level="INFO")
    std = logging.getLogger("test.trace.pg")
    std.propagate = False
    std.setLevel(logging.INFO)
    std.handlers = [pipeline.logging_handler()]
    app = FastAPI()

    @app.get("/traced")
    async def traced():
        logger.info("loguru traced")
        std.warning("stdlib traced")
        return {"ok": True}

    app.add_middleware(LoggingMiddleware, pipeline=pipeline)
    with Server(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        assert client.get("/traced", headers={"traceparent": TRACEPARENT.decode()}).status_code == 200
        assert client.get("/traced").status_code == 200
    pipeline.flush(30)
    # App records alone in a batch (no http record beside them) still fill the trace columns.
    logger.bind(trace_id=TRACE, span_id="1111111111111111").info("later, alone")
    pipeline.flush(30)
    pipeline.close()

    rows = postgres.psql(
        f"select kind, message, span_id, method from {table} where trace_id = %s order by id", (TRACE,)
    )
    assert sorted((r[0], r[1]) for r in rows if r[0] == "app") == [
        ("app", "later, alone"),
        ("app", "loguru traced"),
        ("app", "stdlib traced"),
    ]
    assert sum(r[0] == "http" for r in rows) == 1
    assert postgres.psql(f"select count(*) from {table} where trace_id = %s", (TRACE,))[0][0] == 4
    assert {r[2] for r in rows if r[1] != "later, alone"} == {SPAN}
    # App rows leave the other http columns empty.
    assert all(r[3] is None for r in rows if r[0] == "app")
    # The untraced request's rows have no trace at all.
    assert postgres.psql(f"select count(*) from {table} where trace_id is null")[0][0] == 3

    # Readers: the trace filter finds the app rows as well, in both stores, same shape.
    for reader in (logsluice.Reader(postgres.dsn, table=table), logsluice.Reader(str(tmp_logs))):
        page = reader.query(trace_id=TRACE, since="1h", limit=50)
        kinds = sorted(r["kind"] for r in page.records)
        assert kinds == ["app", "app", "app", "http"], reader
        app_rec = next(r for r in page.records if r["message"] == "loguru traced")
        assert (app_rec["trace_id"], app_rec["span_id"]) == (TRACE, SPAN)
        assert "method" not in app_rec
        untraced = reader.query(kind="app", since="1h", limit=50).records
        assert any("trace_id" not in r for r in untraced)


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("not a pair", (None, None)),
        (("t", None), ("t", None)),
        ((1, 2, 3), (None, None)),
        ((7, "s"), ("7", "s")),
    ],
)
def test_odd_values_in_the_trace_variable_degrade(pipeline, tmp_logs, loguru, value, want):
    # Someone else may set the variable: the record keeps what makes sense, never fails.
    pipeline.attach(loguru, level="INFO")
    token = _context.trace.set(value)
    try:
        logger.info("odd")
    finally:
        _context.trace.reset(token)
    pipeline.flush(timeout=30)
    (rec,) = read_records(tmp_logs)
    assert (rec.get("trace_id"), rec.get("span_id")) == want
