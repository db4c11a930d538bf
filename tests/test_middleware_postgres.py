"""The access record and the app's own logs of one request meet in one PostgreSQL table,
joined by request id; level routing sends failures to PostgreSQL and everything to files."""

from __future__ import annotations

import logging
import uuid

import httpx
import logsluice
import pytest
from fastapi import FastAPI, HTTPException
from harness.asgi import read_records
from loguru import logger
from test_middleware_uvicorn import Server


@pytest.fixture
def table():
    return f"mw_{uuid.uuid4().hex[:12]}"


def make_app(pipeline):
    app = FastAPI()
    std = logging.getLogger("test.mw.pg")
    std.propagate = False
    std.setLevel(logging.INFO)
    std.handlers = [pipeline.logging_handler()]

    @app.post("/orders/{order_id}")
    async def order(order_id: int, body: dict):
        logger.info("creating order {}", order_id)
        std.warning("stock low for order %s", order_id)
        if order_id == 13:
            raise HTTPException(status_code=409, detail="unlucky")
        return {"id": order_id}

    app.add_middleware(logsluice.LoggingMiddleware, pipeline=pipeline)
    return app


def test_access_record_and_app_logs_share_the_request_id_in_one_table(postgres, table, loguru, tmp_logs):
    pipeline = logsluice.Pipeline(
        logsluice.Postgres(postgres.dsn, table=table, min_level="WARNING"),
        logsluice.LocalFiles(tmp_logs),
    )
    pipeline.attach(loguru, level="INFO")
    with Server(make_app(pipeline)) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        ok = client.post("/orders/1", json={"item": "a", "password": "hunter2"})
        conflict = client.post("/orders/13", json={"item": "b"}, headers={"x-request-id": "order-13"})
    assert ok.status_code == 200 and conflict.status_code == 409
    assert conflict.headers["x-request-id"] == "order-13"
    pipeline.flush(30)
    pipeline.close()

    rows = postgres.psql(
        f"select kind, level, message, route, status, request_body from {table}"
        " where request_id = %s order by kind, id",
        ("order-13",),
    )
    kinds = [(r[0], r[1]) for r in rows]
    # The app's warning and the 409 access record, joined by request id; INFO stayed out.
    assert kinds == [("app", "WARNING"), ("http", "WARNING")]
    assert rows[1][3:5] == ("/orders/{order_id}", 409)
    assert rows[1][5] == '{"item":"b"}'
    # Failures went to PostgreSQL; the successful request only to the files.
    assert postgres.psql(f"select count(*) from {table} where kind = 'http'")[0][0] == 1
    files = read_records(tmp_logs)
    ok_id = ok.headers["x-request-id"]
    ok_records = [r for r in files if r["request_id"] == ok_id]
    assert {(r["kind"], r["level"]) for r in ok_records} == {
        ("app", "INFO"),
        ("app", "WARNING"),
        ("http", "INFO"),
    }
    (access,) = [r for r in ok_records if r["kind"] == "http"]
    assert "hunter2" not in access["request_body"]
