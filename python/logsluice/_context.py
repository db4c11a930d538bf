"""The request id of the HTTP request being handled, if any.

The ASGI middleware sets it per request; every Loguru and stdlib record emitted meanwhile
(background tasks included, since they copy the context) carries it as ``request_id``.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Optional

request_id: ContextVar[Optional[str]] = ContextVar("logsluice_request_id", default=None)
