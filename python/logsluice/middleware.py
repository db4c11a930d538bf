"""`LoggingMiddleware`: one record per HTTP exchange, from a pure ASGI middleware.

    app.add_middleware(logsluice.LoggingMiddleware, pipeline=pipeline, sample={"/health": 0.0})

Every message passes through unmodified and undelayed (the only change: the request id is
echoed in a response header, on a copy of the start message). Bodies are copied as the app
reads and sends them, up to a cap and a time limit; the middleware never calls
``receive()`` itself. The per-request bookkeeping (ids, clocks, body copies, the decision
to keep) lives in a native ``HttpExchange``: the wrappers here only pass each message to
it. The finished exchange goes to the core in one non-blocking call; redaction and
serialisation happen there, in Rust, without the GIL, off the event loop.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

from . import _core
from .destinations import check_flag

_log = logging.getLogger("logsluice")

UNMATCHED_ROUTE = "<unmatched>"
"""The ``route`` of requests no route matched (404s, for example)."""

_DEFAULTS = _core.redaction_defaults()
DEFAULT_REDACT_HEADERS: tuple[str, ...] = tuple(_DEFAULTS["headers"])
"""Header names redacted by default (matched case- and separator-insensitively, by substring)."""
DEFAULT_REDACT_KEYS: tuple[str, ...] = tuple(_DEFAULTS["keys"])
"""Query, form and JSON keys redacted by default (same matching; rules of 3 characters or
fewer match whole keys only)."""

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]
# (scope["app"], scope["root_path"], scope["path"]) as they were when the request entered:
# routers rewrite the shared scope on the way in.
_Entry = tuple[Any, str, str]


# RFC 9110 token characters.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class _Pattern:
    """A route template (``/items/{item_id}``), a glob (``/static/*``) or a plain path.
    Matches a request's route template exactly, or its concrete path."""

    __slots__ = ("text", "regex")

    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or not text:
            raise ValueError(f"route patterns must be non-empty strings, got {text!r}")
        self.text = text
        if "{" in text:
            parts = re.split(r"(\{[^{}]*\})", text)
            rx = "".join(
                (".*" if p.endswith(":path}") else "[^/]+") if p.startswith("{") else _glob(p) for p in parts
            )
        else:
            rx = _glob(text)
        self.regex = re.compile(rx + r"\Z")

    def matches_route(self, route: Optional[str]) -> bool:
        return route is not None and (route == self.text or self.regex.match(route) is not None)

    def matches_path(self, path: str) -> bool:
        return self.regex.match(path) is not None


class _RoutePlan:
    """The sampling decision for one route template, with what still depends on the
    concrete path: patterns may match either, so only the route's part can be cached."""

    __slots__ = ("excluded", "exclude_by_path", "rules_by_path", "result")

    def __init__(
        self,
        route: Optional[str],
        exclude: list[_Pattern],
        rules: list[tuple[_Pattern, float]],
        default_rate: float,
    ) -> None:
        self.excluded = any(p.matches_route(route) for p in exclude)
        self.exclude_by_path = [p for p in exclude if not p.matches_route(route)]
        # Rules are tried in order: those before the first that matches the route can
        # still win by the path.
        self.rules_by_path: list[tuple[_Pattern, float]] = []
        self.result = (default_rate, False)
        for pattern, rate in rules:
            if pattern.matches_route(route):
                self.result = (rate, False)
                break
            self.rules_by_path.append((pattern, rate))

    def decide(self, path: str) -> tuple[float, bool]:
        if self.excluded or any(p.matches_path(path) for p in self.exclude_by_path):
            return (0.0, True)
        for pattern, rate in self.rules_by_path:
            if pattern.matches_path(path):
                return (rate, False)
        return self.result


def _glob(text: str) -> str:
    return fnmatch.translate(text)[4:-3] if any(c in text for c in "*?[") else re.escape(text)


class _Bucket:
    """A token bucket: ``rate`` records per second, bursts up to one second's worth."""

    __slots__ = ("rate", "tokens", "stamp")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = max(rate, 1.0)
        self.stamp = time.monotonic()

    def ready(self, now: float) -> bool:
        """Refills for the time passed; whether a token is there to take."""
        if now > self.stamp:
            self.tokens = min(max(self.rate, 1.0), self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        return self.tokens >= 1.0

    def take(self, now: float) -> bool:
        if self.ready(now):
            self.tokens -= 1.0
            return True
        return False


def _rate(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number from 0.0 to 1.0, got {value!r}")
    return float(value)


def _positive(name: str, value: Any, optional: bool = False) -> Any:
    if optional and value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value <= 0:
        raise ValueError(f"{name} must be a positive number{' or None' if optional else ''}, got {value!r}")
    return value


def _names(name: str, value: Any) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be a list of strings, got {value!r}")
    out = list(value)
    if not all(isinstance(v, str) and v for v in out):
        raise ValueError(f"{name} must be a list of non-empty strings, got {value!r}")
    return out


class LoggingMiddleware:
    """Pure ASGI middleware: one ``kind="http"`` record per request (see the README for
    every option and field). ``stats()`` counts every request seen, kept, sampled out,
    excluded, rate limited, and internal errors (which never reach the app)."""

    def __init__(
        self,
        app: Any,
        *,
        pipeline: Any,
        sample: Optional[Mapping[str, float]] = None,
        default_sample_rate: float = 1.0,
        exclude: Iterable[str] = (),
        slow_request_ms: float = 1000.0,
        rate_limit: Optional[float] = None,
        route_rate_limit: Optional[float] = None,
        error_rate_limit: Optional[float] = None,
        max_body_bytes: int = 64 * 1024,
        request_body_timeout: float = 2.0,
        response_body_timeout: float = 3.0,
        capture_request_body: bool = True,
        capture_response_body: bool = True,
        capture_auth_failure_bodies: bool = False,
        redact_headers: Iterable[str] = (),
        redact_query: Iterable[str] = (),
        redact_body_keys: Iterable[str] = (),
        redact_defaults: bool = True,
        scrub_values: bool = True,
        request_id_header: Optional[str] = "X-Request-ID",
        echo_request_id: bool = True,
        trusted_proxies: Iterable[str] = (),
        max_user_agent_bytes: int = 512,
    ) -> None:
        core = getattr(pipeline, "_core", None)
        if not isinstance(core, _core.Core):
            raise ValueError(f"LoggingMiddleware needs pipeline=logsluice.Pipeline(...), got {pipeline!r}")
        self.app = app
        if sample is not None and not isinstance(sample, Mapping):
            raise ValueError(f"sample must be a mapping of route patterns to rates, got {sample!r}")
        sample = dict(sample or {})
        self._rules = [(_Pattern(p), _rate(f"sample[{p!r}]", r)) for p, r in sample.items()]
        self._default_rate = _rate("default_sample_rate", default_sample_rate)
        self._exclude = [_Pattern(p) for p in _names("exclude", exclude)]
        self._rate_limit = _positive("rate_limit", rate_limit, optional=True)
        self._route_rate_limit = _positive("route_rate_limit", route_rate_limit, optional=True)
        error_rate_limit = _positive("error_rate_limit", error_rate_limit, optional=True)
        self._global_bucket = _Bucket(self._rate_limit) if self._rate_limit else None
        self._error_bucket = _Bucket(error_rate_limit) if error_rate_limit else None
        self._route_buckets: dict[str, _Bucket] = {}
        if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 0:
            raise ValueError(f"max_body_bytes must be a whole number >= 0, got {max_body_bytes!r}")
        handoff_max_bytes = getattr(pipeline, "_options", {}).get("handoff_max_bytes")
        if handoff_max_bytes is not None and 2 * max_body_bytes + 64 * 1024 > handoff_max_bytes:
            # A request with both bodies at the cap would never fit: every such record dropped.
            raise ValueError(
                f"max_body_bytes={max_body_bytes} does not fit the pipeline's handoff_max_bytes="
                f"{handoff_max_bytes}: both bodies at the cap plus 64 KiB of headers must fit; "
                "raise handoff_max_bytes or lower max_body_bytes"
            )
        if request_id_header is not None and not (isinstance(request_id_header, str) and request_id_header):
            raise ValueError(f"request_id_header must be a header name or None, got {request_id_header!r}")
        if request_id_header is not None and not _HEADER_NAME.fullmatch(request_id_header):
            # The name goes out in every response: servers refuse an invalid one (h11 fails
            # the whole response).
            raise ValueError(
                f"request_id_header must be an HTTP header name (letters, digits and "
                f"!#$%&'*+-.^_`|~), got {request_id_header!r}"
            )
        base_headers = list(DEFAULT_REDACT_HEADERS) if check_flag("redact_defaults", redact_defaults) else []
        base_keys = list(DEFAULT_REDACT_KEYS) if redact_defaults else []
        if isinstance(max_user_agent_bytes, float):
            raise ValueError(f"max_user_agent_bytes must be a whole number, got {max_user_agent_bytes!r}")
        keep_all = not self._rules and not self._exclude and self._default_rate >= 1.0
        config = {
            "headers": base_headers + _names("redact_headers", redact_headers),
            "query": base_keys + _names("redact_query", redact_query),
            "body_keys": base_keys + _names("redact_body_keys", redact_body_keys),
            "scrub_values": check_flag("scrub_values", scrub_values),
            "capture_auth_failure_bodies": check_flag(
                "capture_auth_failure_bodies", capture_auth_failure_bodies
            ),
            "max_body_bytes": max(max_body_bytes, 1),
            "max_user_agent_bytes": int(_positive("max_user_agent_bytes", max_user_agent_bytes)),
            "trusted_proxies": _names("trusted_proxies", trusted_proxies),
            "capture": {
                "max_body": max_body_bytes,
                "capture_request": check_flag("capture_request_body", capture_request_body)
                and max_body_bytes > 0,
                "capture_response": check_flag("capture_response_body", capture_response_body)
                and max_body_bytes > 0,
                "request_timeout": float(_positive("request_body_timeout", request_body_timeout)),
                "response_timeout": float(_positive("response_body_timeout", response_body_timeout)),
                "slow_ms": float(_positive("slow_request_ms", slow_request_ms)),
                "request_id_header": request_id_header,
                "echo": check_flag("echo_request_id", echo_request_id) and request_id_header is not None,
                # Every request kept: no route is needed until the record is built.
                "keep_all": keep_all,
                "limited": bool(self._rate_limit or self._route_rate_limit or error_rate_limit),
            },
        }
        self._sink = _core.HttpSink(core, json.dumps(config))
        self._rate_cache: dict[Optional[str], _RoutePlan] = {}
        self._template_cache: dict[str, str] = {}
        register = getattr(pipeline, "_register_http", None)
        if register is not None:
            register(self)

    # -- the ASGI callable ---------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            # Also sets the request id in this request's context.
            ex = self._sink.begin(scope, self)
        except Exception as e:  # noqa: BLE001 - the app runs as if we were not here
            self._internal_error(e)
            await self.app(scope, receive, send)
            return

        # The wrappers take the exchange and the server's callables as default values, not
        # from this scope: no cell objects per request (three fewer objects for the garbage
        # collector to track, about 800 fewer instructions). ASGI calls them as receive()
        # and send(message).
        async def receive_copy(_receive: Receive = receive, _ex: Any = ex) -> Message:
            message = await _receive()
            _ex.received(message)
            return message

        async def send_copy(message: Message, _send: Send = send, _ex: Any = ex) -> None:
            out = _ex.sending(message)
            try:
                await _send(out)
            except OSError:
                # The client went away (uvicorn's ClientDisconnected is an OSError).
                _ex.disconnected()
                raise
            if out is message:
                # A copy is only ever made of a response start (to echo the request id),
                # which never completes the response: nothing to tell the exchange.
                _ex.sent()

        try:
            await self.app(scope, receive_copy, send_copy)
        except BaseException as e:
            ex.raised(e)
            raise
        else:
            ex.end()

    # -- counters ------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """``seen == kept + sampled_out + excluded + rate_limited`` once requests finish
        (requests whose hand-off failed count only in ``seen`` and ``internal_errors``)."""
        counts, _ = self._sink.counters()
        return dict(counts)

    @property
    def last_internal_error(self) -> Optional[str]:
        """The type name of the last internal failure (never seen by the app)."""
        return self._sink.counters()[1]

    def _internal_error(self, e: BaseException) -> None:
        try:
            self._sink.internal_error(type(e).__name__)
        except Exception:  # noqa: BLE001 - the app must not see it either
            _log.exception("logsluice: the middleware could not count an internal error (%r)", e)

    # -- identity and sampling -----------------------------------------------------------

    def _rate_for(self, route: Optional[str], path: str) -> tuple[float, bool]:
        """(sample rate, excluded) for a request; the route's part cached per template."""
        cacheable = route is not None and route != UNMATCHED_ROUTE
        plan = self._rate_cache.get(route) if cacheable else None
        if plan is None:
            plan = _RoutePlan(route, self._exclude, self._rules, self._default_rate)
            if cacheable:
                if len(self._rate_cache) > 4096:
                    self._rate_cache.clear()
                self._rate_cache[route] = plan
        return plan.decide(path)

    def _decide(self, scope: Scope, entry: _Entry, full_path: str) -> tuple[str, float, bool]:
        """(route, sample rate, excluded), asked by the native exchange when sampling
        rules or exclusions are set."""
        route = self._route_of(scope, entry)
        rate, excluded = self._rate_for(route, full_path)
        return route, rate, excluded

    def _route_of(self, scope: Scope, entry: _Entry) -> str:
        """The route template; never raises. FastAPI's own route context first (recent
        versions nest included routers), then ``scope["route"]``, then a walk of the
        app's routes; mount prefixes are prepended as templates."""
        try:
            inner = None
            fastapi_scope = scope.get("fastapi")
            if fastapi_scope is not None:
                ctx = fastapi_scope.get("effective_route_context")
                if ctx is not None:
                    # The template as declared (`/files/{p:path}`), as scope["route"].path
                    # gives it for routes outside included routers.
                    for source in (getattr(ctx, "starlette_route", None), ctx):
                        inner = getattr(source, "path", None) or getattr(source, "path_format", None)
                        if inner:
                            break
            if inner is None:
                route = scope.get("route")
                if route is not None:
                    inner = route.path
                elif "endpoint" in scope:
                    return _walk_routes(entry[0] or self.app, scope, entry) or UNMATCHED_ROUTE
                else:
                    return UNMATCHED_ROUTE
            if not isinstance(inner, str):
                return UNMATCHED_ROUTE
            root_path = scope.get("root_path", "")
            if root_path == entry[1]:
                return inner
            prefix = self._template_cache.get(root_path)
            if prefix is None:
                prefix = _mount_prefix(entry[0] or self.app, scope, entry)
                if len(self._template_cache) > 1024:
                    self._template_cache.clear()
                self._template_cache[root_path] = prefix
            return prefix + inner
        except Exception as e:  # noqa: BLE001
            self._internal_error(e)
            return UNMATCHED_ROUTE

    def _allow(self, route: str, tail: bool) -> bool:
        now = time.monotonic()
        if tail:
            return self._error_bucket is None or self._error_bucket.take(now)
        buckets = [] if self._global_bucket is None else [self._global_bucket]
        if self._route_rate_limit is not None:
            bucket = self._route_buckets.get(route)
            if bucket is None:
                if len(self._route_buckets) > 4096:
                    self._route_buckets.clear()
                bucket = self._route_buckets[route] = _Bucket(self._route_rate_limit)
            buckets.append(bucket)
        # A token is spent only when every bucket has one: a route over its own limit
        # must not use up the global budget of the others.
        if not all(b.ready(now) for b in buckets):
            return False
        for b in buckets:
            b.tokens -= 1.0
        return True


def _walk_routes(app: Any, scope: Scope, entry: _Entry) -> Optional[str]:
    """The full template of a request that went through mounts (or a Starlette without
    ``scope["route"]``): the app's routes matched again, mount prefixes joined."""
    from starlette.routing import Match, Mount

    routes = _routes_of(app)
    probe = {**scope, "root_path": entry[1], "path": entry[2]}
    probe.pop("app_root_path", None)
    prefix = ""
    for _ in range(16):
        if not routes:
            return None
        partial = None
        for route in routes:
            match, child = route.matches(probe)
            if match is Match.FULL:
                break
            if match is Match.PARTIAL and partial is None:
                partial = route
        else:
            return prefix + partial.path if partial is not None else None
        if isinstance(route, Mount):
            prefix += route.path
            probe.update(child)
            routes = route.routes
            if not routes:
                return prefix + "/{path:path}"
            continue
        return prefix + route.path
    return None


def _routes_of(app: Any) -> Any:
    routes = getattr(app, "routes", None)
    if routes is None:
        routes = getattr(getattr(app, "router", None), "routes", None)
    return routes


def _mount_prefix(app: Any, scope: Scope, entry: _Entry) -> str:
    """The template of the mounts a request went through (``/tenants/{tenant}``); the
    concrete prefix when the mounts cannot be matched again."""
    final_root = scope.get("root_path", "")
    concrete = final_root[len(entry[1]) :] if final_root.startswith(entry[1]) else final_root
    try:
        from starlette.routing import Match, Mount
    except ImportError:
        return concrete
    probe = {**scope, "root_path": entry[1], "path": entry[2]}
    probe.pop("app_root_path", None)
    prefix = ""
    routes = _routes_of(app)
    for _ in range(16):
        if probe.get("root_path", "") == final_root:
            return prefix
        for route in routes or ():
            if not isinstance(route, Mount):
                continue
            match, child = route.matches(probe)
            if match is Match.FULL:
                prefix += route.path
                probe.update(child)
                routes = route.routes
                break
        else:
            return concrete
    return concrete


__all__ = ["DEFAULT_REDACT_HEADERS", "DEFAULT_REDACT_KEYS", "UNMATCHED_ROUTE", "LoggingMiddleware"]
