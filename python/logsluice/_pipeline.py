"""`Pipeline`: the one object an app creates. It owns a Rust core (started lazily, per
process) and hands out the Loguru sink, a stdlib logging handler and an ASGI lifespan."""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import multiprocessing.util
import os
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from . import _context, _core
from .destinations import ENV_BUILDERS, Destination, LocalFiles, level_number

_log = logging.getLogger("logsluice")

PIPELINE_DEFAULTS: dict[str, int] = {
    "max_message_bytes": 64 * 1024,
    "max_field_bytes": 64 * 1024,
    "handoff_max_requests": 20_000,
    "handoff_max_bytes": 64 << 20,
}
# The least each option takes, and what it counts: a message cap below 64 bytes would cut
# every record, and a hand-off smaller than one request with full bodies would drop every
# request.
_PIPELINE_MINIMUMS: dict[str, tuple[int, str]] = {
    "max_message_bytes": (64, " of bytes"),
    "max_field_bytes": (64, " of bytes"),
    "handoff_max_requests": (1, ""),
    "handoff_max_bytes": (1 << 20, " of bytes"),
    "spill_max_bytes": (1 << 20, " of bytes"),
}
# Records a store could not take before close() go to files here (None: they are dropped
# as `closed`), and the next pipeline with the same directory delivers them first.
SPILL_DEFAULTS: dict[str, Any] = {"spill_dir": None, "spill_max_bytes": 256 << 20}


def _report(level: int, message: str) -> None:
    _log.log(level, message)


_LOGURU_LEVELS = {
    **{name: name for name in ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")},
    "WARN": "WARNING",
    "FATAL": "CRITICAL",
}


def _timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"timeout must be a number of seconds >= 0 (inf waits for good), got {value!r}")
    return float(value)


class LoggingHandler(logging.Handler):
    """A stdlib handler feeding the pipeline, so uvicorn's and libraries' logs flow in too."""

    def __init__(self, pipeline: Pipeline, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self._core = pipeline._core

    def emit(self, record: logging.LogRecord) -> None:
        # The core reports its own trouble on "logsluice"; feeding that back would loop.
        name = record.name
        if isinstance(name, str) and (name == "logsluice" or name.startswith("logsluice.")):
            return
        self._core.write_logging(record)

    def handleError(self, record: logging.LogRecord) -> None:  # pragma: no cover - write_logging never raises
        pass


class Pipeline:
    """Delivers log records to destinations in batches, off the caller's thread.

    ``Pipeline(*destinations, max_message_bytes=65536, max_field_bytes=65536,
    handoff_max_requests=20000, handoff_max_bytes=64 MiB, spill_dir=None,
    spill_max_bytes=256 MiB)``. With no
    destination, records go to ``LocalFiles("./logs")``. No thread starts until the first
    record arrives; a forked child starts its own core on first use.
    """

    def __init__(self, *destinations: Destination, **options: Any) -> None:
        known = {**PIPELINE_DEFAULTS, **SPILL_DEFAULTS}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(
                f"Pipeline: unknown option(s) {', '.join(unknown)}; known: {', '.join(known)}"
                " (queue, batch and retry options belong to each destination)"
            )
        for d in destinations:
            if not isinstance(d, Destination):
                raise ValueError(f"Pipeline takes destinations such as logsluice.LocalFiles(...), got {d!r}")
        opts = {**known, **options}
        spill_dir = opts.pop("spill_dir")
        for key, value in opts.items():
            least, unit = _PIPELINE_MINIMUMS[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"Pipeline: {key} must be a whole number{unit} >= {least}, got {value!r}")
        if spill_dir is not None:
            if not isinstance(spill_dir, (str, os.PathLike)) or not os.fspath(spill_dir):
                raise ValueError(f"Pipeline: spill_dir must be a directory path or None, got {spill_dir!r}")
            spill_dir = os.path.abspath(os.fspath(spill_dir))
        opts["spill_dir"] = spill_dir
        self._options = opts
        self.destinations: tuple[Destination, ...] = destinations or (LocalFiles("./logs"),)
        specs = json.dumps([d._spec() for d in self.destinations])
        self._core = _core.Core(specs, json.dumps(opts), _report, _context.request_id, _context.trace)
        self._handler_ids: list[int] = []
        self._http_middlewares: weakref.WeakSet[Any] = weakref.WeakSet()
        self._close_callbacks: list[Any] = []
        # Held until closed: the sinks and handlers it hands out hold only the core, so a
        # pipeline nobody keeps (``Pipeline(...).attach(logger)``) must still be closed,
        # and its records flushed, at exit.
        _live_pipelines.add(self)

    @classmethod
    def from_env(cls, **options: Any) -> Pipeline:
        """Builds a pipeline from environment variables (see the README for the full list):
        ``LOGSLUICE_DIR`` for LocalFiles, ``LOGSLUICE_SPILL_DIR`` for ``spill_dir``, and each
        store's own variables. With none set, records go to ``LocalFiles("./logs")``."""
        destinations = [d for build in ENV_BUILDERS if (d := build()) is not None]
        if "spill_dir" not in options and os.environ.get("LOGSLUICE_SPILL_DIR"):
            options["spill_dir"] = os.environ["LOGSLUICE_SPILL_DIR"]
        return cls(*destinations, **options)

    @property
    def loguru_sink(self) -> _core.LoguruSink:
        """The object to pass to ``logger.add``; prefer :meth:`attach`, which sets safe options."""
        return self._core.loguru_sink()

    def attach(self, logger: Any, level: Any = "INFO", **filters: Any) -> int:
        """Adds the sink to a Loguru ``logger`` with fast, safe options and returns the handler id.

        ``format="{message}"`` (the record is stored structured, not pre-formatted) and
        ``diagnose=False`` (Loguru's default would store local variable values: secrets).
        Extra keyword arguments (``filter=...``) go to ``logger.add``.
        """
        reserved = {"format", "diagnose", "enqueue", "serialize", "colorize", "backtrace", "catch"} & set(
            filters
        )
        if reserved:
            raise ValueError(
                f"attach() sets {', '.join(sorted(reserved))} itself; pass only level and filter"
            )
        if isinstance(level, str) and level.strip().upper() in _LOGURU_LEVELS:
            # Loguru's names are upper-case; destinations take any case, and so does attach.
            level = _LOGURU_LEVELS[level.strip().upper()]
        elif not isinstance(level, str):
            level_number(level, "level")
        handler_id: int = logger.add(
            self.loguru_sink,
            level=level,
            format="{message}",
            diagnose=False,
            backtrace=False,
            enqueue=False,
            colorize=False,
            catch=True,
            **filters,
        )
        self._handler_ids.append(handler_id)
        return handler_id

    def logging_handler(self, level: Any = logging.NOTSET) -> LoggingHandler:
        """A ``logging.Handler`` that feeds this pipeline (add it to the root logger or any other)."""
        return LoggingHandler(self, level_number(level, "level") if isinstance(level, str) else level)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Counters per destination; ``accepted == written + dropped_total + spilled + in_flight``
        always holds.
        With a ``LoggingMiddleware`` attached, its request counters are under ``"http"``, with
        ``handoff_waiting`` (kept exchanges not yet redacted and queued) and ``handoff_dropped``
        (exchanges a full hand-off lane dropped)."""
        stats = self._core.stats()
        middlewares = list(self._http_middlewares)
        if middlewares:
            http: dict[str, Any] = {}
            for mw in middlewares:
                for key, value in mw.stats().items():
                    http[key] = http.get(key, 0) + value
            http["handoff_waiting"], http["handoff_dropped"] = self._core.http_lane_stats()
            stats["http"] = http
        return stats

    def _register_http(self, middleware: Any) -> None:
        self._http_middlewares.add(middleware)

    def _on_close(self, callback: Any) -> None:
        """Calls ``callback()`` (from the closing thread) when :meth:`close` starts."""
        self._close_callbacks.append(callback)

    def flush(self, timeout: float = 5.0) -> None:
        """Returns once everything accepted before the call is written or counted as dropped;
        raises ``TimeoutError`` naming what is still pending."""
        self._core.flush(_timeout(timeout))

    def close(self, timeout: float = 10.0) -> None:
        """Flushes and stops, waiting at most ``timeout`` seconds. What is not written by then is
        reported on the ``logsluice`` logger and, with ``spill_dir``, written there for the next
        start (counted as ``spilled``), else counted as dropped (reason ``closed``) before this
        returns: a connect or write to PostgreSQL or Azure Blob Storage still under way is cut
        off. Only a write to local files already under way may still succeed and is counted
        when it ends. Safe to call twice."""
        timeout = _timeout(timeout)
        if self._core.closed:
            return
        _live_pipelines.discard(self)
        for callback in self._close_callbacks:
            try:
                callback()  # e.g. a viewer ending its live streams
            except Exception:  # noqa: BLE001 - closing goes on
                _log.exception("logsluice: a close callback failed")
        pending = self._core.close(timeout)
        if pending:
            fate = (
                "spilled to spill_dir, or dropped as 'closed' where a destination never spills,"
                if self._options["spill_dir"]
                else "dropped as 'closed'"
            )
            _log.warning(
                "logsluice: close timed out after %.1fs; not yet written (%s unless a write"
                " to local files is already under way): %s",
                timeout,
                fate,
                pending,
            )

    @property
    def closed(self) -> bool:
        return bool(self._core.closed)

    @asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """ASGI lifespan: ``FastAPI(lifespan=pipeline.lifespan)`` flushes and closes at shutdown."""
        yield
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Pipeline({', '.join(repr(d) for d in self.destinations)})"


_live_pipelines: set[Pipeline] = set()

# Every pipeline closing at exit shares this budget: one per pipeline could hold exit for
# ten seconds per unreachable store.
_EXIT_CLOSE_SECONDS = 10.0


def _close_all_at_exit() -> None:
    deadline = time.monotonic() + _EXIT_CLOSE_SECONDS
    for pipeline in list(_live_pipelines):
        try:
            pipeline.close(timeout=max(0.0, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - exit must go on for the other pipelines
            _log.exception("logsluice: closing a pipeline at exit failed")
    _core._mark_interpreter_exit()


# Registered at import (no thread is started): it runs before the interpreter tears down,
# while the core may still take the GIL to report.
atexit.register(_close_all_at_exit)


class _ForkedChildHook:
    """A key for multiprocessing's after-fork registry (it holds its keys weakly)."""


_FORKED_CHILD_HOOK = _ForkedChildHook()


def _close_at_multiprocessing_exit(_: object) -> None:
    # A multiprocessing child (Process, pools, ProcessPoolExecutor) ends with os._exit:
    # atexit never runs there, but multiprocessing's own exit runs its finalizers.
    multiprocessing.util.Finalize(None, _close_all_at_exit, exitpriority=0)


# Runs in each multiprocessing child started by fork, after multiprocessing cleared the
# finalizers the child inherited.
multiprocessing.util.register_after_fork(_FORKED_CHILD_HOOK, _close_at_multiprocessing_exit)

__all__ = ["Pipeline", "LoggingHandler"]
