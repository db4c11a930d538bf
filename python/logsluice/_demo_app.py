"""The demo FastAPI app: the middleware and the Loguru sink on a realistic set of routes
(health check, items, a login that fails, a large upload, a streaming endpoint, one that
raises), plus `drive_traffic` to exercise it. Used by `logsluice demo` and the tests.

    app = create_app(pipeline)            # then: uvicorn.run(app, ...)
    summary = drive_traffic("http://127.0.0.1:8000")
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at
# runtime, and `Request` is imported inside create_app (FastAPI is the user's dependency).
import asyncio
import hashlib
import os
from collections import Counter
from typing import Any, Optional

DEMO_SAMPLE = {"/health": 0.0, "/metrics": 0.0, "/items/{item_id}": 0.5}


def create_app(pipeline: Any = None, **middleware_options: Any) -> Any:
    """A FastAPI app logging through `pipeline` (default: ``Pipeline.from_env()``)."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import StreamingResponse
    from loguru import logger

    from ._pipeline import Pipeline
    from .middleware import LoggingMiddleware

    if pipeline is None:
        pipeline = Pipeline.from_env()
    app = FastAPI(title="logsluice demo", lifespan=pipeline.lifespan)
    app.state.pipeline = pipeline

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True}

    @app.get("/items/{item_id}")
    async def get_item(item_id: int) -> dict:
        logger.info("looking up item {}", item_id)
        if item_id >= 1000:
            raise HTTPException(status_code=404, detail="no such item")
        return {"id": item_id, "name": f"item {item_id}"}

    @app.post("/items/{item_id}")
    async def put_item(item_id: int, request: Request) -> dict:
        data = await request.json()
        logger.info("storing item {}", item_id)
        return {"id": item_id, **data}

    @app.post("/login")
    async def login(request: Request) -> dict:
        data = await request.json()
        if data.get("password") != "correct horse":
            logger.warning("failed login for {}", data.get("user"))
            raise HTTPException(status_code=401, detail="bad credentials")
        return {"token": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhZGEifQ.c2lnbmF0dXJlLXNpZ25hdHVyZQ"}

    @app.post("/upload")
    async def upload(request: Request) -> dict:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.stream():
            digest.update(chunk)
            size += len(chunk)
        logger.info("received upload of {} bytes", size)
        return {"size": size, "sha256": digest.hexdigest()}

    @app.get("/stream")
    async def stream(events: int = 5, delay: float = 0.05) -> StreamingResponse:
        async def gen():
            for i in range(events):
                yield f"event: tick\ndata: {i}\n\n"
                await asyncio.sleep(delay)

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.get("/boom")
    async def boom() -> dict:
        logger.info("about to fail")
        raise RuntimeError("the demo endpoint failed on purpose")

    options = {"sample": DEMO_SAMPLE, **middleware_options}
    app.add_middleware(LoggingMiddleware, pipeline=pipeline, **options)
    return app


def drive_traffic(base_url: str, requests: int = 200, upload_bytes: int = 5 * 1024 * 1024) -> dict[str, Any]:
    """Sends a realistic mix to the demo app; returns status counts per route."""
    import httpx

    seen: Counter[str] = Counter()
    with httpx.Client(base_url=base_url, timeout=30.0) as client:

        def hit(method: str, path: str, route: str, **kwargs: Any) -> Optional[httpx.Response]:
            try:
                r = client.request(method, path, **kwargs)
            except httpx.HTTPError:
                seen[f"{route} failed"] += 1
                return None
            seen[f"{route} {r.status_code}"] += 1
            return r

        for i in range(requests):
            hit("GET", "/health", "/health")
            hit(
                "GET",
                f"/items/{i}",
                "/items/{item_id}",
                headers={"Authorization": "Bearer demo-token-123456"},
            )
            if i % 10 == 0:
                hit(
                    "POST",
                    f"/items/{i}",
                    "/items/{item_id}",
                    json={"name": "widget", "card": "4111 1111 1111 1111"},
                )
                hit("POST", "/login", "/login", json={"user": "ada", "password": "wrong"})
                hit("GET", f"/items/{1000 + i}", "/items/{item_id}")
            if i % 50 == 0:
                # uvicorn drops a connection whose app raised: do not reuse this one.
                hit("GET", "/boom", "/boom", headers={"Connection": "close"})
                hit("GET", "/stream", "/stream")
        hit("POST", "/upload", "/upload", content=os.urandom(upload_bytes))
    return dict(sorted(seen.items()))
