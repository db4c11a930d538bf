"""``logsluice.viewer(reader, auth=...)``: a mountable ASGI app to find logs again.

    app.mount("/logs", logsluice.viewer(reader, auth=require_admin, pipeline=pipeline))

A JSON API (``/api/records``, ``/api/records/{id}/context``, ``/api/requests/{id}``,
``/api/summary``, ``/api/export``, ``/api/status``), live streams (Server-Sent Events at
``/api/stream``, a WebSocket at ``/api/stream/ws``) and one page at ``/``.
"""

from __future__ import annotations

from ._app import TokenAuth, Viewer, token_auth, viewer

__all__ = ["TokenAuth", "Viewer", "token_auth", "viewer"]
