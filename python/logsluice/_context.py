"""The request id and W3C trace ids of the HTTP request being handled, if any.

The ASGI middleware sets them per request; every Loguru and stdlib record emitted meanwhile
(background tasks included, since they copy the context) carries them as ``request_id`` and,
when the request came with a valid ``traceparent`` header, ``trace_id`` and ``span_id``.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Optional

request_id: ContextVar[Optional[str]] = ContextVar("logsluice_request_id", default=None)

# ``(trace_id, span_id)`` as lower-case hex, from the request's ``traceparent``.
trace: ContextVar[Optional[tuple[str, str]]] = ContextVar("logsluice_trace", default=None)
