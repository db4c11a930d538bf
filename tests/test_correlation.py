"""An access record joins its application logs in PostgreSQL by request id."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import logsluice
from logsluice._demo_app import create_app
from loguru import logger


def test_request_id_joins_access_and_app_records_in_one_table(postgres):
    table = f"t_{uuid.uuid4().hex[:12]}"
    logger.remove()
    pipeline = logsluice.Pipeline(logsluice.Postgres(postgres.dsn, table=table))
    pipeline.attach(logger, level="INFO")
    app = create_app(pipeline, sample={})

    async def call() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://demo") as client:
            first = await client.get("/items/5")
            second = await client.get("/items/6", headers={"X-Request-ID": "inbound-id-42"})
            return [first, second]

    first, second = asyncio.run(call())
    pipeline.flush(timeout=30)
    pipeline.close()
    logger.remove()
    assert first.status_code == 200 and first.json() == {"id": 5, "name": "item 5"}
    generated = first.headers["x-request-id"]
    assert second.headers["x-request-id"] == "inbound-id-42"
    for rid, item in ((generated, 5), ("inbound-id-42", 6)):
        rows = postgres.psql(
            f"select kind, message, route, status from {table} where request_id = %s order by kind", (rid,)
        )
        assert rows == [
            ("app", f"looking up item {item}", None, None),
            ("http", rows[1][1], "/items/{item_id}", 200),
        ], rows
