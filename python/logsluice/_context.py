"""The request id and W3C trace ids of the HTTP request being handled, if any.

The ASGI middleware sets them per request; every Loguru and stdlib record emitted meanwhile
(background tasks included, since they copy the context) carries them as ``request_id`` and,
when the request came with a valid ``traceparent`` header, ``trace_id`` and ``span_id``.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Optional

request_id: ContextVar[Optional[str]] = ContextVar("logsluice_request_id", default=None)

# ``(trace_id, span_id)`` as lower-case hex, from the request's ``traceparent``.
trace: ContextVar[Optional[tuple[str, str]]] = ContextVar("logsluice_trace", default=None)


def capture_request_context(record: Any) -> bool:
    """Copies the current request's ids into a record while it is created, for records
    that are written on another thread, where the context is not the request's: a Loguru
    sink added with ``enqueue=True``, or a stdlib ``QueueHandler`` with a ``QueueListener``.

    Loguru: ``logger.configure(patcher=logsluice.capture_request_context)``; stdlib:
    ``queue_handler.addFilter(logsluice.capture_request_context)``. Ids the record already
    carries are kept. Returns True (as a filter, it lets every record through).
    """
    rid = request_id.get()
    ids = trace.get()
    values = {"request_id": rid, "trace_id": ids[0] if ids else None, "span_id": ids[1] if ids else None}
    if isinstance(record, dict):
        extra = record.setdefault("extra", {})
        for key, value in values.items():
            if value is not None:
                extra.setdefault(key, value)
    else:
        for key, value in values.items():
            if value is not None and getattr(record, key, None) is None:
                setattr(record, key, value)
    return True
