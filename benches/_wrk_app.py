"""Apps for bench_middleware_wrk.py: the in-process bench's own endpoint, without middleware,
with the floor middleware and with logsluice's (one definition, so both benches measure the same app)."""

import os
import tempfile

import logsluice
from bench_middleware import make_app

app_none = make_app("none")
app_floor = make_app("floor")

_pipeline = logsluice.Pipeline(logsluice.LocalFiles(os.environ.get("LOGSLUICE_DIR") or tempfile.mkdtemp()))
app_logsluice = make_app("logsluice", _pipeline)
app_logsluice.router.lifespan_context = _pipeline.lifespan
