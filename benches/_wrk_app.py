"""Apps for bench_middleware_wrk.py: the in-process bench's own endpoint (one definition, so
both benches measure the same app). uvicorn asks for `app_<variant>`; only that variant is
built, so a baseline process runs no pipeline threads."""

import os
import tempfile
from typing import Any

import logsluice
from bench_middleware import make_app

VARIANTS = ("none", "floor", "logsluice", "logsluice_noecho")


def __getattr__(name: str) -> Any:
    variant = name.removeprefix("app_")
    if not name.startswith("app_") or variant not in VARIANTS:
        raise AttributeError(name)
    if variant in ("none", "floor"):
        return make_app(variant)
    pipeline = logsluice.Pipeline(logsluice.LocalFiles(os.environ.get("LOGSLUICE_DIR") or tempfile.mkdtemp()))
    if variant == "logsluice":
        app = make_app("logsluice", pipeline)
    else:
        # What the request id echo costs the server: the same middleware without it.
        app = make_app("none")
        app.add_middleware(logsluice.LoggingMiddleware, pipeline=pipeline, echo_request_id=False)
    app.router.lifespan_context = pipeline.lifespan
    return app
