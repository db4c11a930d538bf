"""The viewer's ASGI app: a JSON API over a ``Reader``, live streams (SSE and WebSocket) and
one static page. Plain ASGI: no framework, so the package keeps no runtime dependency."""

from __future__ import annotations

import asyncio
import atexit
import csv
import hmac
import inspect
import io
import json
import logging
import os
import re
import secrets
import signal
import threading
import weakref
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Optional
from urllib.parse import parse_qsl

from ..reader import EXCLUDE_NAMES, FILTER_NAMES, LATEST
from . import _stream
from ._stream import dumps

_log = logging.getLogger("logsluice.viewer")

STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
STATIC_FILES = {
    "/": ("index.html", b"text/html; charset=utf-8"),
    "/static/app.js": ("app.js", b"text/javascript; charset=utf-8"),
    "/static/app.css": ("app.css", b"text/css; charset=utf-8"),
}

# Filters every listing takes: the Reader's own list (it validates the values).
FILTERS = FILTER_NAMES
PAGING = ("order", "limit", "cursor")
INTS = {"limit", "before", "after", "slowest", "process"}
FLOATS = {"min_duration_ms"}

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
COMMON_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
CSV_COLUMNS = [
    "ts",
    "level",
    "kind",
    "logger",
    "message",
    "request_id",
    "trace_id",
    "method",
    "route",
    "path",
    "status",
    "duration_ms",
    "id",
]
TOKEN_COOKIE = "logsluice_token"

# The ASGI interface as Starlette (``starlette.types``) and the ASGI spec type it: the viewer is
# an ``ASGIApp`` wherever one is expected (``app.mount("/logs", viewer)`` type-checks).
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BadRequest(ValueError):
    pass


class _Conn:
    """What ``auth`` receives when Starlette is not installed: the same attribute names as
    ``starlette.requests.HTTPConnection`` (``scope``, ``headers``, ``cookies``, ``query_params``,
    ``client``, ``url.path``)."""

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        self.query_params = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        self.cookies = _cookies(self.headers.get("cookie", ""))
        self.client = scope.get("client")
        self.type = scope.get("type")

        class _Url:
            path = scope.get("path", "")

        self.url = _Url()


def _connection(scope: Scope) -> Any:
    try:
        from starlette.requests import HTTPConnection
    except ImportError:
        return _Conn(scope)
    return HTTPConnection(scope)


def _cookies(header: str) -> dict[str, str]:
    out = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name:
            out[name] = value
    return out


class TokenAuth:
    """``auth=token_auth("s3cret")``: accepts ``Authorization: Bearer s3cret``, the viewer's
    cookie, or ``?token=s3cret`` on the page (which the viewer trades for an HttpOnly cookie and
    removes from the address bar). ``.token`` is the token (to print it, or to hand it to a
    client)."""

    token: str

    def __init__(self, token: str) -> None:
        if not isinstance(token, str) or len(token) < 16:
            raise ValueError("token_auth: the token must be a string of at least 16 characters")
        self.token = token
        self._token = token.encode()

    def matches(self, candidate: Optional[str]) -> bool:
        if not candidate:
            return False
        return hmac.compare_digest(candidate.encode(), self._token)

    def __call__(self, conn: Any) -> bool:
        header = conn.headers.get("authorization") or ""
        if header[:7].lower() == "bearer " and self.matches(header[7:].strip()):
            return True
        if self.matches(conn.cookies.get(TOKEN_COOKIE)):
            return True
        return self.matches(conn.query_params.get("token"))

    def __repr__(self) -> str:
        return "TokenAuth(token=***)"


def token_auth(token: Optional[str] = None) -> TokenAuth:
    """An ``auth`` callable checking one shared token (a random one if none is given: read it
    back from ``.token``)."""
    return TokenAuth(token or secrets.token_urlsafe(24))


# Viewers alive in this process: ended at process exit and on SIGTERM/SIGINT.
_viewers: weakref.WeakSet[Viewer] = weakref.WeakSet()
_signals_lock = threading.Lock()


def _shutdown_all() -> None:
    for v in list(_viewers):
        v._hub.shutdown()


atexit.register(_shutdown_all)


def _fresh_signals_lock() -> None:
    # Another thread may have held it at the fork: the child's copy would stay locked.
    global _signals_lock
    _signals_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_signals_lock)


def _chain_signals() -> None:
    """Ends open streams when the server is told to stop. uvicorn (and others) wait for open
    responses before they run the app's lifespan shutdown, and a mounted app gets no lifespan
    events at all: so the viewer watches the signals themselves, then hands them on to the
    server's handler. Checked whenever a stream opens, so a server that installed its
    handlers later (or restored them) is chained again."""
    if threading.current_thread() is not threading.main_thread():
        return
    with _signals_lock:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous = signal.getsignal(sig)
            except (ValueError, OSError):
                continue
            if getattr(previous, "_logsluice_viewer", False):
                continue

            def handler(signum: int, frame: Any, previous: Any = previous) -> None:
                _shutdown_all()
                if callable(previous):
                    previous(signum, frame)
                elif previous == signal.SIG_DFL:
                    signal.signal(signum, signal.SIG_DFL)
                    os.kill(os.getpid(), signum)

            handler._logsluice_viewer = True  # type: ignore[attr-defined]
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError):
                pass


class Viewer:
    """The ASGI app ``logsluice.viewer(...)`` returns. Mount it anywhere:
    ``app.mount("/logs", viewer)``. ``await viewer.aclose()`` ends its live streams."""

    def __init__(
        self,
        reader: Any,
        auth: Optional[Callable[[Any], Any]] = None,
        pipeline: Any = None,
        *,
        allow_anonymous: bool = False,
        allowed_origins: Any = (),
        max_subscribers: int = 200,
        heartbeat: float = 15.0,
        max_stream_seconds: float = 1800.0,
        stream_buffer: int = 1000,
        resume_window: float = 60.0,
        request_timeout: float = 25.0,
        export_max_records: int = 100_000,
    ) -> None:
        if reader is None or not hasattr(reader, "aquery"):
            raise ValueError("viewer: pass a logsluice.Reader (or anything with the same async methods)")
        if auth is None and not allow_anonymous:
            raise ValueError(
                "viewer: no auth given. Pass auth=callable(connection) -> bool (sync or async), e.g."
                " logsluice.viewer.token_auth(token), or allow_anonymous=True for a private network"
            )
        if auth is not None and not callable(auth):
            raise ValueError("viewer: auth must be a callable taking the connection and returning a bool")
        for name, count, least in (
            ("max_subscribers", max_subscribers, 1),
            ("stream_buffer", stream_buffer, 1),
            ("export_max_records", export_max_records, 1),
        ):
            if isinstance(count, bool) or not isinstance(count, int) or count < least:
                raise ValueError(f"viewer: {name} must be a whole number >= {least}, got {count!r}")
        for name, value in (
            ("heartbeat", heartbeat),
            ("max_stream_seconds", max_stream_seconds),
            ("resume_window", resume_window),
            ("request_timeout", request_timeout),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"viewer: {name} must be a positive number of seconds, got {value!r}")
        if isinstance(allowed_origins, str):
            allowed_origins = [allowed_origins]
        self.reader = reader
        self.auth = auth
        self.pipeline = pipeline
        self.allowed_origins = {o.rstrip("/").lower() for o in allowed_origins}
        self.request_timeout = float(request_timeout)
        self.export_max_records = export_max_records
        self._hub = _stream.Hub(
            reader,
            buffer=stream_buffer,
            max_subscribers=max_subscribers,
            heartbeat=float(heartbeat),
            max_stream_seconds=float(max_stream_seconds),
            resume_window=float(resume_window),
        )
        self._static: dict[str, bytes] = {}
        _viewers.add(self)
        if pipeline is not None:
            hook = getattr(pipeline, "_on_close", None)
            if callable(hook):
                hub = weakref.ref(self._hub)

                def end_streams() -> None:
                    h = hub()
                    if h is not None:
                        h.shutdown()

                hook(end_streams)

    # -- lifecycle -------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Ends every open stream with a ``shutdown`` event; new streams are refused (503)."""
        self._hub.shutdown()
        await asyncio.sleep(0)

    def close(self) -> None:
        """Same as :meth:`aclose`, from any thread."""
        self._hub.shutdown()

    @property
    def subscribers(self) -> int:
        return int(self._hub.stats()["subscribers"])

    def __repr__(self) -> str:
        return f"<logsluice viewer over {self.reader!r}>"

    # -- ASGI -------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind not in ("http", "websocket"):
            return
        self._hub.bind_loop()
        path = _relative_path(scope)
        try:
            if kind == "websocket":
                await self._websocket(scope, receive, send, path)
            else:
                await self._http(scope, receive, send, path)
        except BadRequest as e:
            await _json(send, 400, {"error": str(e)})

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _allowed(self, scope: Scope) -> bool:
        if self.auth is None:
            return True
        try:
            result = self.auth(_connection(scope))
            if inspect.isawaitable(result):
                result = await result
        except Exception as e:  # noqa: BLE001 - an auth error refuses, it never crashes the app
            status = getattr(e, "status_code", None)
            if status not in (401, 403):
                _log.warning("logsluice viewer: auth callable raised %s; access refused", type(e).__name__)
            return False
        return bool(result)

    def _origin_ok(self, scope: Scope) -> bool:
        headers = _headers(scope)
        origin = headers.get("origin")
        if origin is None:
            return True  # not a browser: auth alone decides
        origin = origin.rstrip("/").lower()
        if origin in self.allowed_origins:
            return True
        host = headers.get("host", "").lower()
        return bool(host) and re.sub(r"^[a-z][a-z0-9+.-]*://", "", origin) == host

    async def _http(self, scope: Scope, receive: Any, send: Any, path: str) -> None:
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            await _json(send, 405, {"error": "the viewer is read-only: GET only"}, [(b"allow", b"GET, HEAD")])
            return
        if path == "":
            # /logs -> /logs/ so the page's relative links resolve under the mount.
            last = scope.get("root_path", "").rstrip("/").rsplit("/", 1)[-1]
            await _plain(send, 307, b"", [(b"location", f"{last}/".encode("latin-1", "replace"))])
            return
        if not await self._allowed(scope):
            await _json(send, 401, {"error": "authentication required"}, [(b"www-authenticate", b"Bearer")])
            return
        if path in STATIC_FILES:
            await self._serve_static(scope, send, path)
            return
        params = _params(scope)
        if path == "/api/records":
            await self._records(send, params)
        elif path == "/api/summary":
            await self._summary(send, params)
        elif path == "/api/export":
            await self._export(send, params)
        elif path == "/api/status":
            await self._status(send)
        elif path == "/api/stream":
            await self._sse(scope, receive, send, params)
        # Blob record ids hold slashes (`app/2026/11/24/….ndjson.gz:1260`), decoded from %2F.
        elif (m := re.fullmatch(r"/api/records/(.+)/context", path)) is not None:
            await self._context(send, m.group(1), params)
        elif (m := re.fullmatch(r"/api/requests/([^/]+)", path)) is not None:
            await self._request(send, m.group(1), params)
        elif path.startswith("/api/"):
            await _json(send, 404, {"error": "no such API endpoint"})
        else:
            await _plain(send, 404, b"not found\n")

    async def _serve_static(self, scope: Scope, send: Any, path: str) -> None:
        name, ctype = STATIC_FILES[path]
        if path == "/" and isinstance(self.auth, TokenAuth):
            token = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"))).get("token")
            if token and self.auth.matches(token):
                root = scope.get("root_path", "").rstrip("/") or ""
                cookie = f"{TOKEN_COOKIE}={token}; Path={root}/; HttpOnly; SameSite=Strict"
                if scope.get("scheme") == "https":
                    cookie += "; Secure"
                headers = [(b"location", b"./"), (b"set-cookie", cookie.encode("latin-1"))]
                await _plain(send, 303, b"", headers)
                return
        body = self._static.get(name)
        if body is None:
            with open(os.path.join(STATIC_DIR, name), "rb") as f:
                body = f.read()
            self._static[name] = body
        headers = [
            (b"content-type", ctype),
            (b"content-security-policy", CSP.encode()),
            (b"cache-control", b"no-cache"),
        ]
        await _plain(send, 200, body if scope.get("method") != "HEAD" else b"", headers, len(body))

    async def _call(self, coro: Any) -> Any:
        return await asyncio.wait_for(coro, self.request_timeout)

    async def _guard(self, send: Any, make: Callable[[], Any]) -> Any:
        """Runs a reader call; bad input is a 400, a slow store a 504, a broken one a 503."""
        try:
            return await self._call(make())
        except (ValueError, TypeError) as e:
            await _json(send, 400, {"error": _one_line(e)})
        except asyncio.TimeoutError:
            await _json(send, 504, {"error": f"the query took longer than {self.request_timeout:g} s"})
        except Exception as e:  # noqa: BLE001 - never a traceback to a client
            _log.warning("logsluice viewer: reader call failed: %s", type(e).__name__)
            await _json(send, 503, {"error": "the log store is unavailable"})
        return _FAILED

    async def _records(self, send: Any, params: dict[str, str]) -> None:
        kwargs = _filters(params, FILTERS + PAGING)
        page = await self._guard(send, lambda: self.reader.aquery(**kwargs))
        if page is _FAILED:
            return
        await _json(send, 200, _page(page))

    async def _context(self, send: Any, record_id: str, params: dict[str, str]) -> None:
        kwargs = _filters(params, ("before", "after", "same"))
        result = await self._guard(send, lambda: self.reader.acontext(record_id, **kwargs))
        if result is not _FAILED:
            await _json(send, 200, _plain_data(result))

    async def _request(self, send: Any, request_id: str, params: dict[str, str]) -> None:
        # /api/requests/latest?status=5xx: the Reader picks the newest access record matching
        # the filters (filters go with "latest" only).
        allowed: tuple[str, ...] = ("grace", "search")
        if request_id == LATEST:
            allowed += tuple(f for f in FILTERS if f != "request_id")
        kwargs = _filters(params, allowed)
        result = await self._guard(send, lambda: self.reader.arequest(request_id, **kwargs))
        if result is _FAILED:
            return
        found = _attr(result, "access", None) is not None or bool(_attr(result, "records", None))
        if request_id == LATEST and not found:
            await _json(send, 404, {"error": "no request matches"})
            return
        await _json(send, 200, _plain_data(result))

    async def _summary(self, send: Any, params: dict[str, str]) -> None:
        kwargs = _filters(params, FILTERS + ("by", "bucket", "slowest"))
        result = await self._guard(send, lambda: self.reader.asummary(**kwargs))
        if result is not _FAILED:
            await _json(send, 200, _plain_data(result))

    async def _status(self, send: Any) -> None:
        body: dict[str, Any] = {"streams": self._hub.stats()}
        count = getattr(self.reader, "subscribers", None)
        if callable(count):
            body["streams"]["reader_subscriptions"] = count()
        if self.pipeline is not None:
            try:
                body["pipeline"] = self.pipeline.stats()
            except Exception as e:  # noqa: BLE001
                body["pipeline"] = {"error": type(e).__name__}
        await _json(send, 200, body)

    async def _export(self, send: Any, params: dict[str, str]) -> None:
        fmt = params.pop("format", "ndjson")
        if fmt not in ("ndjson", "csv"):
            raise BadRequest("format must be ndjson or csv")
        columns = CSV_COLUMNS
        if "columns" in params:
            columns = [c for c in params.pop("columns").split(",") if c]
            if not columns or any(not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]{0,80}", c) for c in columns):
                raise BadRequest("columns must be a comma-separated list of field names")
        kwargs = _filters(params, FILTERS + PAGING)
        limit = kwargs.pop("limit", None)
        total = self.export_max_records if limit is None else min(limit, self.export_max_records)
        kwargs["limit"] = min(1000, total)
        page = await self._guard(send, lambda: self.reader.aquery(**kwargs))
        if page is _FAILED:
            return
        ctype = b"application/x-ndjson" if fmt == "ndjson" else b"text/csv; charset=utf-8"
        filename = f"logsluice-export.{fmt}".encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", ctype),
                    (b"content-disposition", b'attachment; filename="' + filename + b'"'),
                    (b"cache-control", b"no-store"),
                    *COMMON_HEADERS,
                ],
            }
        )
        sent = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout
        if fmt == "csv":
            await send({"type": "http.response.body", "body": _csv_rows([columns]), "more_body": True})
        while True:
            records = list(_attr(page, "records", []))[: total - sent]
            sent += len(records)
            if fmt == "csv":
                chunk = _csv_rows([[_csv_cell(_dotted(r, c)) for c in columns] for r in records])
            else:
                chunk = "".join(dumps(r) + "\n" for r in records).encode()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            cursor = _attr(page, "next", None)
            if not cursor or sent >= total or loop.time() > deadline:
                break
            kwargs["cursor"] = cursor
            kwargs["limit"] = min(1000, total - sent)
            try:
                page = await self._call(self.reader.aquery(**kwargs))
            except Exception as e:  # noqa: BLE001 - headers are out: end the body
                _log.warning("logsluice viewer: export stopped: %s", type(e).__name__)
                break
        await send({"type": "http.response.body", "body": b""})

    # -- streams ---------------------------------------------------------------------------------

    async def _open_stream(self, params: dict[str, str], last_event_id: Optional[str]) -> tuple[Any, int]:
        filters = _filters(params, FILTERS)
        return await asyncio.wait_for(self._hub.open(filters, last_event_id), self.request_timeout)

    async def _sse(self, scope: Scope, receive: Any, send: Any, params: dict[str, str]) -> None:
        _chain_signals()
        if self._hub.closed:
            await _json(send, 503, {"error": "the viewer is shutting down"}, [(b"retry-after", b"5")])
            return
        if not self._hub.reserve():
            await _json(
                send,
                429,
                {
                    "error": "too many live streams in this process",
                    "max_subscribers": self._hub.max_subscribers,
                },
                [(b"retry-after", b"10")],
            )
            return
        last = params.pop("last_event_id", None) or _headers(scope).get("last-event-id")
        try:
            session, after = await self._open_stream(params, last)
        except BaseException as e:
            self._hub.release()
            if isinstance(e, (ValueError, TypeError)):
                await _json(send, 400, {"error": _one_line(e)})
                return
            if isinstance(e, Exception):
                _log.warning("logsluice viewer: opening a stream failed: %s", type(e).__name__)
                await _json(send, 503, {"error": "the log store is unavailable"})
                return
            raise
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                    *COMMON_HEADERS,
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"retry: 1000\n\n", "more_body": True})

        async def emit(event: Any, what: str) -> None:
            if what == "event":
                text = f"id: {event.event_id}\nevent: {event.kind}\ndata: {dumps(event.data)}\n\n"
            elif what == "heartbeat":
                text = ": heartbeat\n\n"
            elif what == "error":
                text = f"event: stream-error\ndata: {dumps(event.data)}\n\n"
            else:
                text = f"event: {what}\ndata: {{}}\n\n"
            await send({"type": "http.response.body", "body": text.encode(), "more_body": True})

        gone = await _run_until_disconnect(self._hub.run(session, after, emit), receive, "http.disconnect")
        if not gone:
            await send({"type": "http.response.body", "body": b""})

    async def _websocket(self, scope: Scope, receive: Any, send: Any, path: str) -> None:
        _chain_signals()
        first = await receive()
        if first.get("type") != "websocket.connect":
            return
        if path != "/api/stream/ws":
            await send({"type": "websocket.close", "code": 1008, "reason": "no such endpoint"})
            return
        if not self._origin_ok(scope):
            await send({"type": "websocket.close", "code": 1008, "reason": "origin not allowed"})
            return
        if not await self._allowed(scope):
            await send({"type": "websocket.close", "code": 1008, "reason": "authentication required"})
            return
        params = _params(scope)
        await send({"type": "websocket.accept"})
        if self._hub.closed:
            await send({"type": "websocket.close", "code": 1001, "reason": "the viewer is shutting down"})
            return
        if not self._hub.reserve():
            reason = f"too many live streams in this process (max {self._hub.max_subscribers})"
            await send({"type": "websocket.close", "code": 1013, "reason": reason})
            return
        last = params.pop("last_event_id", None)
        try:
            session, after = await self._open_stream(params, last)
        except BaseException as e:
            self._hub.release()
            if not isinstance(e, Exception):
                raise
            if not isinstance(e, (ValueError, TypeError)):
                _log.warning("logsluice viewer: opening a stream failed: %s", type(e).__name__)
                e = RuntimeError("the log store is unavailable")
            await send(
                {
                    "type": "websocket.send",
                    "text": dumps({"event": "stream-error", "data": {"error": _one_line(e)}}),
                }
            )
            await send({"type": "websocket.close", "code": 1008, "reason": "bad request"})
            return

        async def emit(event: Any, what: str) -> None:
            if what == "event":
                frame = {"event": event.kind, "id": event.event_id, "data": event.data}
            elif what == "error":
                frame = {"event": "stream-error", "data": event.data}
            else:
                frame = {"event": what}
            await send({"type": "websocket.send", "text": dumps(frame)})

        gone = await _run_until_disconnect(
            self._hub.run(session, after, emit), receive, "websocket.disconnect"
        )
        if not gone:
            await send({"type": "websocket.close", "code": 1000})


_FAILED = object()


async def _run_until_disconnect(work: Any, receive: Any, disconnect: str) -> bool:
    """Runs ``work`` until it ends or the client leaves; True if the client left."""

    async def watch() -> None:
        while True:
            message = await receive()
            if message.get("type") == disconnect:
                return

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        left = watcher.done() and not watcher.cancelled()
        for t in (task, watcher):
            if not t.done():
                t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.done() and not task.cancelled() and task.exception() is not None and not left:
        exc = task.exception()
        if not isinstance(exc, OSError):
            _log.warning("logsluice viewer: stream ended by %s", type(exc).__name__)
    return left


def _relative_path(scope: Scope) -> str:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    # Starlette >= 0.33 keeps the full path and extends root_path; older mounts cut the path.
    if root and path.startswith(root):
        path = path[len(root) :]
    return path


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _params(scope: Scope) -> dict[str, str]:
    raw = scope.get("query_string", b"").decode("latin-1")
    try:
        pairs = parse_qsl(
            raw, keep_blank_values=False, strict_parsing=False, encoding="utf-8", errors="strict"
        )
    except UnicodeDecodeError:
        raise BadRequest("the query string is not valid UTF-8") from None
    out: dict[str, str] = {}
    for k, v in pairs:
        if k == "token":
            continue
        if k in out:
            raise BadRequest(f"parameter {k!r} given twice")
        out[k] = v
    return out


def _filters(params: dict[str, str], allowed: tuple[str, ...]) -> dict[str, Any]:
    """Query parameters -> reader keyword arguments. ``field.user.id=42`` adds to ``fields``;
    ``exclude.route=/health`` adds to ``exclude`` (``exclude={"route": [...]}`` as JSON for
    several values of one name)."""
    out: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    exclude: dict[str, Any] = {}
    for key, value in params.items():
        if key.startswith("exclude.") and "exclude" in allowed:
            name = key[8:]
            if name not in EXCLUDE_NAMES:
                raise BadRequest(f"bad exclusion {name!r}; known: {', '.join(EXCLUDE_NAMES)}")
            exclude.setdefault(name, []).append(value)
            continue
        if key == "exclude" and "exclude" in allowed:
            try:
                parsed = json.loads(value)
            except ValueError:
                raise BadRequest("exclude must be a JSON object") from None
            if not isinstance(parsed, dict):
                raise BadRequest("exclude must be a JSON object")
            for name, values in parsed.items():
                exclude.setdefault(name, []).extend(values if isinstance(values, list) else [values])
            continue
        if key.startswith("field.") and "fields" in allowed:
            name = key[6:]
            if not re.fullmatch(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*", name):
                raise BadRequest(f"bad field path {name!r}")
            fields[name] = _scalar(value)
            continue
        if key not in allowed:
            raise BadRequest(f"unknown parameter {key!r}; known: {', '.join(allowed)}")
        if key == "fields":
            try:
                parsed = json.loads(value)
            except ValueError:
                raise BadRequest("fields must be a JSON object") from None
            if not isinstance(parsed, dict):
                raise BadRequest("fields must be a JSON object")
            fields.update(parsed)
        elif key in INTS:
            try:
                out[key] = int(value)
            except ValueError:
                raise BadRequest(f"{key} must be a whole number") from None
        elif key in FLOATS:
            try:
                out[key] = float(value)
            except ValueError:
                raise BadRequest(f"{key} must be a number") from None
            if out[key] != out[key] or out[key] in (float("inf"), float("-inf")):
                raise BadRequest(f"{key} must be a finite number")
        elif key == "level" and "," in value:
            out[key] = [v.strip() for v in value.split(",") if v.strip()]
        else:
            out[key] = value
    if fields:
        out["fields"] = fields
    if exclude:
        out["exclude"] = exclude
    return out


def _scalar(value: str) -> Any:
    """``42`` -> 42, ``true`` -> True, anything else stays text."""
    if re.fullmatch(r"-?\d{1,18}", value):
        return int(value)
    if re.fullmatch(r"-?\d+\.\d+", value):
        return float(value)
    return {"true": True, "false": False, "null": None}.get(value, value)


def _attr(obj: Any, name: str, default: Any) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _page(page: Any) -> dict[str, Any]:
    return {
        "records": list(_attr(page, "records", [])),
        "next": _attr(page, "next", None),
        "partial": bool(_attr(page, "partial", False)),
    }


def _plain_data(obj: Any) -> Any:
    """Whatever the reader returned, as JSON-ready data (dicts, dataclasses, named tuples)."""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, dict):
        return {str(k): _plain_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_asdict"):
        return [_plain_data(v) for v in obj]
    if hasattr(obj, "_asdict"):
        return _plain_data(obj._asdict())
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _plain_data(getattr(obj, k)) for k in obj.__dataclass_fields__}
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict):
        return _plain_data(to_dict())
    if hasattr(obj, "__slots__") or hasattr(obj, "__dict__"):
        names = list(getattr(obj, "__slots__", ())) or [k for k in vars(obj) if not k.startswith("_")]
        return {k: _plain_data(getattr(obj, k, None)) for k in names}
    return obj


def _dotted(record: Any, path: str) -> Any:
    if not isinstance(record, dict):
        return None
    if path in record:
        return record[path]
    value: Any = record.get("fields") or {}
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    text = (
        value if isinstance(value, str) else dumps(value) if isinstance(value, (dict, list)) else str(value)
    )
    # Spreadsheet formula injection: a cell must not start as a formula.
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        text = "'" + text
    return text


def _csv_rows(rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:500]


async def _json(send: Any, status: int, obj: Any, extra: Optional[list[tuple[bytes, bytes]]] = None) -> None:
    body = dumps(obj).encode()
    headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store"), *(extra or [])]
    await _plain(send, status, body, headers)


async def _plain(
    send: Any,
    status: int,
    body: bytes,
    headers: Optional[list[tuple[bytes, bytes]]] = None,
    length: Optional[int] = None,
) -> None:
    headers = list(headers or [])
    if not any(k == b"content-type" for k, _ in headers):
        headers.append((b"content-type", b"text/plain; charset=utf-8"))
    headers.append((b"content-length", str(len(body) if length is None else length).encode()))
    await send({"type": "http.response.start", "status": status, "headers": [*headers, *COMMON_HEADERS]})
    await send({"type": "http.response.body", "body": body})


_App = Viewer  # (inside the class below, ``Viewer`` names the attribute)


class _ViewerFactory:
    """``logsluice.viewer``: call it for the app, ``logsluice.viewer(reader, auth=...)``; its
    helpers ride along as typed attributes: ``logsluice.viewer.token_auth(token)``,
    ``logsluice.viewer.TokenAuth`` and ``logsluice.viewer.Viewer``."""

    token_auth = staticmethod(token_auth)
    TokenAuth = TokenAuth
    Viewer = Viewer

    def __call__(
        self,
        reader: Any,
        auth: Optional[Callable[[Any], Any]] = None,
        pipeline: Any = None,
        *,
        allow_anonymous: bool = False,
        **options: Any,
    ) -> _App:
        """A mountable ASGI app over ``reader``: ``app.mount("/logs", logsluice.viewer(reader, auth=...))``.

        ``auth(connection)`` (sync or async) is called for every HTTP request and WebSocket; a
        false result (or an exception) refuses with 401 / a WebSocket close. Without ``auth`` the
        call raises unless ``allow_anonymous=True``. Options: ``allowed_origins`` (extra WebSocket
        origins), ``max_subscribers`` (200 per process), ``heartbeat`` (15 s),
        ``max_stream_seconds`` (1800), ``stream_buffer`` (1000 events per subscriber),
        ``resume_window`` (60 s), ``request_timeout`` (25 s), ``export_max_records`` (100000).
        """
        return _App(reader, auth, pipeline, allow_anonymous=allow_anonymous, **options)


viewer = _ViewerFactory()
