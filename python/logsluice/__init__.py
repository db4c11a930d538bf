"""logsluice: ship application and HTTP logs to PostgreSQL, Azure Blob Storage and local
files, batched and off the request path, in bounded memory.

    import logsluice
    from loguru import logger

    pipeline = logsluice.Pipeline()          # LocalFiles("./logs") by default
    pipeline.attach(logger, level="INFO")
"""

from __future__ import annotations

from ._context import capture_request_context
from ._core import __version__
from ._pipeline import LoggingHandler, Pipeline
from .azure_blob import AzureBlob
from .destinations import Destination, LocalFiles
from .middleware import LoggingMiddleware
from .postgres import Postgres
from .reader import Page, Reader, RequestView
from .viewer import viewer

__all__ = [
    "AzureBlob",
    "Destination",
    "LocalFiles",
    "LoggingHandler",
    "LoggingMiddleware",
    "Page",
    "Pipeline",
    "Postgres",
    "Reader",
    "RequestView",
    "__version__",
    "capture_request_context",
    "viewer",
]
