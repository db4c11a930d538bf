"""Apps for bench_middleware_wrk.py: the in-process bench's own endpoint, without and with
the middleware (one definition, so both benches measure the same app)."""

import os
import tempfile

import logsluice
from bench_middleware import make_app

app_none = make_app("none")

_pipeline = logsluice.Pipeline(logsluice.LocalFiles(os.environ.get("LOGSLUICE_DIR") or tempfile.mkdtemp()))
app_logsluice = make_app("logsluice", _pipeline)
app_logsluice.router.lifespan_context = _pipeline.lifespan
