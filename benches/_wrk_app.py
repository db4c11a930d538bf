"""Apps for bench_middleware_wrk.py: the same FastAPI endpoint with and without the middleware."""

import json
import os
import tempfile

import logsluice
from fastapi import FastAPI, Request
from starlette.responses import Response


def _app() -> FastAPI:
    app = FastAPI()

    @app.post("/items/{item_id}")
    async def items(item_id: int, request: Request) -> Response:
        data = await request.json()
        data["id"] = item_id
        return Response(json.dumps(data).encode(), media_type="application/json")

    return app


app_none = _app()

_pipeline = logsluice.Pipeline(logsluice.LocalFiles(os.environ.get("LOGSLUICE_DIR") or tempfile.mkdtemp()))
app_logsluice = _app()
app_logsluice.router.lifespan_context = _pipeline.lifespan
app_logsluice.add_middleware(logsluice.LoggingMiddleware, pipeline=_pipeline)
