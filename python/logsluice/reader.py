"""The read side: one set of filters over PostgreSQL, LocalFiles directories and Azure Blob
containers.

    reader = logsluice.Reader("postgresql://app@db/app")      # or Reader("./logs"), Reader.from_env(),
    # Reader(AzureBlob(...)), Reader("<Azure Storage connection string>", container="logs")
    page = reader.query(since="1h", min_level="ERROR", limit=50)
    page.records, page.next, page.partial
    reader.request("0190c3a4-...")       # the access record and every app record of a request
    reader.context(record_id, before=20, after=20)
    reader.summary(since="24h", by="route")
    for record in reader.tail(kind="http", status="5xx"): ...

Filtering, paging, cursors and scanning run in the Rust core with the GIL released. Over
PostgreSQL the ``a*`` twins await the core's own futures (no thread per call); over files
they run the scan in the event loop's default executor. Either way the loop never blocks.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as _dt
import functools
import inspect
import json
import math
import os
import re
import threading
import time
import weakref
from collections.abc import AsyncIterator, Collection, Generator, Iterable, Iterator, Mapping
from typing import Any, Optional, Union

from . import _core
from .destinations import LocalFiles

__all__ = ["Gap", "Page", "Reader", "RequestView", "Subscription"]

FILTER_NAMES = (
    "since",
    "until",
    "level",
    "min_level",
    "kind",
    "logger",
    "process",
    "request_id",
    "trace_id",
    "method",
    "route",
    "path",
    "status",
    "min_duration_ms",
    "text",
    "fields",
    "exclude",
)

# What ``exclude`` takes: each name to one value or a list of values.
EXCLUDE_NAMES = ("level", "kind", "logger", "method", "route", "status", "request_id", "path", "text")

# An Azure Storage connection string starts with one of its keys.
_CONNECTION_STRING = re.compile(
    r"^\s*(DefaultEndpointsProtocol|AccountName|AccountKey|BlobEndpoint|UseDevelopmentStorage|"
    r"SharedAccessSignature|EndpointSuffix)\s*=",
    re.IGNORECASE,
)
_BLOB_KEYS = (
    "connection_string",
    "account_url",
    "credential",
    "container_url",
    "container",
    "prefix",
    "name_template",
)

TimeLike = Union[str, int, float, _dt.datetime, _dt.date, _dt.timedelta, None]


def _time(value: TimeLike) -> Any:
    """datetime (naive = UTC), date, timedelta (that long ago), number (epoch seconds),
    ISO 8601 text or an age like ``"15m"`` -> what the core parses."""
    if value is None or isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, _dt.timedelta):
        return f"{value.total_seconds()}s"
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return value.astimezone(_dt.timezone.utc).isoformat()
    if isinstance(value, _dt.date):
        return value.isoformat()
    raise ValueError(f"not a time: {value!r}")


def _request(filters: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in filters.items():
        if value is None:
            continue
        if key in ("since", "until"):
            value = _time(value)
        elif key == "exclude":
            value = _exclude(value)
        out[key] = value
    return out


def _check_names(where: str, names: Iterable[str], allowed: Collection[str] = FILTER_NAMES) -> None:
    """An unknown filter name is a TypeError, as for any Python keyword argument (``query()``
    raises one by itself)."""
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        extra = sorted(n for n in set(allowed) - set(FILTER_NAMES) if not n.startswith("_"))
        known = [n for n in FILTER_NAMES if n in allowed] + extra
        raise TypeError(
            f"{where}() got unexpected keyword argument(s) {', '.join(unknown)}; known: {', '.join(known)}"
        )


class _NotApplicable(ValueError):
    """Options given to something they do not apply to (``table=`` for a directory, ``until``
    for a tail). ``names`` and ``what`` let the CLI name its own flags."""

    def __init__(self, where: str, names: Iterable[str], what: str) -> None:
        self.names, self.what = list(names), what
        verb = "does" if len(self.names) == 1 else "do"
        super().__init__(f"{where}: {', '.join(self.names)} {verb} not apply to {what}")


def _number(
    where: str,
    name: str,
    value: Any,
    *,
    least: float,
    most: Optional[float] = None,
    above: bool = False,
    whole: bool = False,
) -> Any:
    """``value`` as a finite number from ``least`` (exclusive when ``above``) to ``most``;
    ``whole``: an int. Otherwise a ValueError naming the option."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and whole:
        ok = isinstance(value, int) or float(value).is_integer()
    if ok:
        ok = (value > least if above else value >= least) and (most is None or value <= most)
    if not ok:
        what = "a whole number" if whole else "a number of seconds"
        low = f"above {least:g}" if above else f">= {least:g}"
        # (A bound that is only the store's integer width is not worth showing.)
        bound = f"{low} and <= {most:g}" if most is not None and most < 1e15 else low
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}{name} must be {what} {bound}, got {value!r}")
    return int(value) if whole else float(value)


# tail/subscribe: a poll at most every 10 ms (0 would spin), at least once a day; a look-back
# of up to a day (each poll reads it again).
POLL_INTERVAL_RANGE = (0.01, 86_400.0)
MAX_LOOKBACK = 86_400.0


def check_poll_interval(value: Any, name: str = "poll_interval", where: str = "") -> float:
    """``value`` as a tail's poll interval in seconds; ValueError naming ``name`` otherwise."""
    low, high = POLL_INTERVAL_RANGE
    return float(_number(where, name, value, least=low, most=high))


def _follow_options(
    where: str, poll_interval: Any, lookback: Any, max_buffer: Any, filters: Mapping[str, Any]
) -> tuple[float, float, int]:
    """Checks a tail's own options (no I/O) before anything starts: a poller that spins, never
    delivers or only delivers Gap markers must not start at all. A tail has no end: ``until``
    is refused rather than dropped."""
    _check_names(where, filters)
    if filters.get("until") is not None:
        raise _NotApplicable(where, ["until"], "a live tail, which has no end (a query reads up to a time)")
    return (
        check_poll_interval(poll_interval, where=where),
        float(_number(where, "lookback", lookback, least=0.0, most=MAX_LOOKBACK)),
        int(_number(where, "max_buffer", max_buffer, least=1, whole=True)),
    )


def _exclude(exclude: Optional[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    """A mapping of name to value(s); tuples and sets become lists (the core validates)."""
    if exclude is None:
        return None
    if not isinstance(exclude, Mapping):
        raise ValueError(f"exclude must be a mapping of {', '.join(EXCLUDE_NAMES)} to values")
    return {k: list(v) if isinstance(v, (tuple, set, frozenset)) else v for k, v in exclude.items()}


class Page:
    """One page of a query: ``records`` (dicts with the NDJSON field names plus ``id``),
    ``next`` (an opaque cursor, or None at the end) and ``partial`` (the query's budget ran
    out: pass ``next`` to continue)."""

    __slots__ = ("next", "partial", "records")

    def __init__(self, records: list[dict[str, Any]], next: Optional[str], partial: bool) -> None:
        self.records = records
        self.next = next
        self.partial = partial

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def to_dict(self) -> dict[str, Any]:
        return {"records": self.records, "next": self.next, "partial": self.partial}

    def __repr__(self) -> str:
        return f"Page({len(self.records)} records, next={'…' if self.next else None}, partial={self.partial})"


# A request with app records and no access record is taken as still running while its newest
# record is this recent; an older one was sampled out, excluded or rate limited.
IN_PROGRESS_SECONDS = 300.0


class RequestView:
    """What happened to one request: the ``access`` record (kind http, or None while the
    request is still running or when it was not kept), the app ``records`` with its request id
    in time order, the ``trace`` records sharing its trace id (other request ids), and
    ``in_progress``: no access record and app records from the last five minutes."""

    __slots__ = ("access", "in_progress", "records", "request_id", "trace")

    def __init__(
        self,
        request_id: str,
        access: Optional[dict[str, Any]],
        records: list[dict[str, Any]],
        trace: list[dict[str, Any]],
    ) -> None:
        self.request_id = request_id
        self.access = access
        self.records = records
        self.trace = trace
        newest = max((_parse_ts(r.get("ts")) for r in records), default=None)
        recent = newest is not None and time.time() - newest < IN_PROGRESS_SECONDS
        self.in_progress = access is None and recent

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "access": self.access,
            "records": self.records,
            "trace": self.trace,
            "in_progress": self.in_progress,
        }

    def __repr__(self) -> str:
        return (
            f"RequestView({self.request_id!r}, access={'yes' if self.access else 'no'}, "
            f"{len(self.records)} records, in_progress={self.in_progress})"
        )


class Gap:
    """Records a subscriber lost because it did not keep up: ``count`` of them, with times
    from ``since`` to ``until`` (query that range to page through them)."""

    __slots__ = ("count", "since", "until")

    def __init__(self, count: int, since: str, until: str) -> None:
        self.count, self.since, self.until = count, since, until

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "since": self.since, "until": self.until}

    def __repr__(self) -> str:
        return f"Gap(count={self.count}, since={self.since!r}, until={self.until!r})"


def _uuid7_time(request_id: str) -> Optional[float]:
    """Seconds since the epoch in a UUIDv7 (what the middleware generates), else None."""
    hexits = request_id.replace("-", "")
    if len(hexits) != 32 or len(request_id) != 36 or hexits[12] != "7":
        return None
    try:
        ms = int(hexits[:12], 16)
    except ValueError:
        return None
    return ms / 1000.0


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat()


class Subscription:
    """One live follower of a :class:`_Poller`: a bounded buffer of new records. When the
    buffer is full, further records are counted into a :class:`Gap` instead of piling up."""

    def __init__(self, poller: _Poller, max_buffer: int) -> None:
        self._poller = poller
        self._items: collections.deque[Any] = collections.deque()
        self._max = max_buffer
        self._gap: Optional[list[Any]] = None
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.closed = False

    def _push(self, records: list[dict[str, Any]]) -> None:
        with self._cond:
            for r in records:
                if len(self._items) >= self._max:
                    if self._gap is None:
                        self._gap = [0, r.get("ts"), r.get("ts")]
                    self._gap[0] += 1
                    self._gap[2] = r.get("ts")
                    continue
                if self._gap is not None:
                    self._items.append(Gap(*self._gap))
                    self._gap = None
                self._items.append(r)
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # loop closed
                pass

    def _after_fork(self) -> None:
        """In a forked child: locks a parent's thread may have held are made anew, and only
        the waits of the loop running in the forking thread (the one thread the child has)
        are kept."""
        self._cond = threading.Condition()
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        self._waiters = [w for w in self._waiters if w[0] is here]

    def _take(self) -> list[Any]:
        items = list(self._items)
        self._items.clear()
        if self._gap is not None and not items:
            items.append(Gap(*self._gap))
            self._gap = None
        return items

    def get(self, timeout: Optional[float] = None) -> list[Any]:
        """New records (and :class:`Gap` markers), waiting up to ``timeout`` seconds; []
        when none arrived or the subscription was closed."""
        self._poller.run_here()
        with self._cond:
            if not self._items and self._gap is None and not self.closed:
                self._cond.wait(timeout)
            return self._take()

    async def aget(self, timeout: Optional[float] = None) -> list[Any]:
        """Like :meth:`get`, awaiting without blocking the event loop."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        self._poller.run_here()
        with self._cond:
            items = self._take()
            if items or self.closed:
                return items
            self._waiters.append((loop, event))
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._cond:
                self._waiters.remove((loop, event))
        with self._cond:
            return self._take()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:
                pass
        self._poller.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _delivery_key(rid: Any) -> Any:
    """A record's id as it stays across rotation: LocalFiles gzips a finished file under a
    new name (``x.ndjson:311`` is then ``x.ndjson.gz:311``, the same offset), and the
    tail's lookback reads it again there."""
    return rid.replace(".ndjson.gz:", ".ndjson:", 1) if isinstance(rid, str) else rid


class _Poller:
    """One polling thread per (reader, filters): every subscriber with the same filters
    shares its queries, so 100 open tails cost one query per wake-up.

    Commit-safe position: each poll re-reads ``lookback`` seconds before the newest time
    seen and drops the ids it already delivered; rows that commit late (a writer's COPY
    that took a while, two writers whose commits interleave) are still found as long as
    their records are younger than the look-back."""

    def __init__(self, reader: Reader, key: str, filters: dict[str, Any], interval: float, lookback: float):
        self.reader = reader
        self.key = key
        self.filters = filters
        self.interval = interval
        self.lookback = lookback
        self.subs: list[Subscription] = []
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopped = False
        self.polls = 0
        self.seen: collections.OrderedDict[str, float] = collections.OrderedDict()
        self.watermark = time.time()
        self.thread: Optional[threading.Thread] = None
        self.primed = False
        self.floor: Optional[float] = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"logsluice-tail-{self.key[:24]}", daemon=True)
        self.thread.start()

    def run_here(self) -> None:
        """Starts the polling thread in this process if it has none: a forked child's copy
        of a poller (see :meth:`after_fork`) polls again once one of its subscriptions is
        read there."""
        if self.thread is not None or self.stopped:
            return
        with self.reader._pollers_lock:
            if self.thread is None and not self.stopped:
                self.start()
                self.reader._start_waker()

    def after_fork(self) -> None:
        """In a forked child, where the polling thread does not exist: fresh locks and no
        thread until a subscription is read (:meth:`run_here`). It goes on from where the
        parent's was at the fork (its watermark and the ids it delivered), and is no longer
        the one new subscriptions with the same filters join (``Reader._after_fork``)."""
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.thread = None
        for sub in self.subs:
            sub._after_fork()

    def subscribe(self, max_buffer: int) -> Subscription:
        sub = Subscription(self, max_buffer)
        with self.lock:
            self.subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self.lock:
            if sub in self.subs:
                self.subs.remove(sub)
            if not self.subs:
                self.stopped = True
                if self.reader._pollers.get(self.key) is self:
                    self.reader._pollers.pop(self.key, None)
        self.wake.set()

    def poll_once(self) -> list[dict[str, Any]]:
        if self.reader.kind == "blob":
            return self._poll_blobs()
        lookback = self.lookback
        since = self.watermark - lookback
        if self.reader.kind == "postgres":
            # Read below the oldest running writer: its rows (older than its start, give or
            # take the batch delay) become visible when it commits, however long it takes.
            # The floor seen at the previous poll is kept for one more poll, so a writer
            # that commits between two polls is still covered.
            age = self.reader._core.oldest_write_age()
            floor = None if age is None else time.time() - age - 2.0
            for f in (floor, self.floor):
                if f is not None:
                    since = min(since, f)
            self.floor = floor
        lookback = self.watermark - since
        req = {**self.filters, "since": since, "order": "asc", "limit": 1000}
        new: list[dict[str, Any]] = []
        while True:
            page = json.loads(self.reader._core.query(json.dumps(req)))
            self.polls += 1
            records = page["records"]
            for r in records:
                rid = _delivery_key(r.get("id"))
                if rid in self.seen:
                    continue
                ts = _parse_ts(r.get("ts"))
                self.seen[rid] = ts
                new.append(r)
                if ts > self.watermark:
                    self.watermark = min(ts, time.time())
            if len(records) < 1000:
                break
            last = records[-1]
            req["_after"] = {"ts": _ts_micros(last["ts"], 0), "id": last["id"]}
        horizon = self.watermark - lookback - 1.0
        while self.seen:
            rid, ts = next(iter(self.seen.items()))
            if ts >= horizon:
                break
            self.seen.popitem(last=False)
        return new

    blob_names: list[str] = []
    blob_primed = False

    def _poll_blobs(self) -> list[dict[str, Any]]:
        """New records only ever arrive in new blobs: list the partitions of the last few
        minutes (from the start, on the first poll) and read the blobs not read before
        (their names are remembered)."""
        now = time.time()
        margin = max(self.lookback, 300.0)
        primed = self.blob_primed
        list_from = (now if primed else min(self.start_at, now)) - margin
        min_ts = 0.0 if primed else self.start_at - 0.001
        request, seen = json.dumps(self.filters), json.dumps(self.blob_names)
        data = json.loads(self.reader._core.poll_new(request, list_from, min_ts, seen))
        self.polls += 1
        self.blob_names = data["seen"]
        self.blob_primed = True
        new: list[dict[str, Any]] = []
        for r in data["records"]:
            rid = r.get("id")
            if rid in self.seen:  # a blob cut short by the deadline is read again
                continue
            ts = _parse_ts(r.get("ts"))
            self.seen[rid] = ts
            if primed or ts >= self.start_at:
                new.append(r)
        horizon = now - margin - 3600.0
        while self.seen:
            rid, ts = next(iter(self.seen.items()))
            if ts >= horizon:
                break
            self.seen.popitem(last=False)
        return new

    def _run(self) -> None:
        while not self.stopped:
            try:
                new = self.poll_once()
            except Exception:  # the store is down: keep polling; tails resume when it returns
                new = []
            if not self.primed:
                self.primed = True
                new = [r for r in new if _parse_ts(r.get("ts")) >= self.start_at]
            if new:
                with self.lock:
                    subs = list(self.subs)
                for s in subs:
                    s._push(new)
            self.wake.wait(self.interval)
            self.wake.clear()

    start_at: float = 0.0


def _existing_directory(path: str) -> str:
    """The absolute path of a directory to read; a ValueError when there is none, so a typo
    does not look like "no logs"."""
    directory = os.path.abspath(path)
    if not os.path.isdir(directory):
        state = "is not a directory" if os.path.exists(directory) else "no such directory"
        raise ValueError(
            f"Reader: {path!r}: {state} (a source is a PostgreSQL DSN, a directory, "
            "an Azure Storage connection string or a container URL)"
        )
    return directory


def _parse_ts(text: Any) -> float:
    if not isinstance(text, str):
        return 0.0
    try:
        return _dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


# What each kind of source takes besides itself; anything else given does not apply.
_SCAN_OPTIONS = ("max_bytes", "max_files", "max_seconds")
_POSTGRES_OPTIONS = ("statement_timeout", "connect_timeout", "listen")
_DSN_OPTIONS = ("schema", "table", *_POSTGRES_OPTIONS)
_FILES_OPTIONS = (*_SCAN_OPTIONS, "slack_seconds")


class Reader:
    """Reads what the pipeline wrote.

    ``source``: a PostgreSQL DSN (``postgresql://...``), a directory (LocalFiles), an Azure
    Storage connection string (``DefaultEndpointsProtocol=...;AccountKey=...`` or
    ``UseDevelopmentStorage=true``, with ``container``, default ``"logs"``), a container URL
    (``https://ACCOUNT.blob.core.windows.net/CONTAINER?<SAS>``; without a SAS token give
    ``credential=`` or the container must allow public reads), or a
    :class:`~logsluice.LocalFiles`, :class:`~logsluice.Postgres` or
    :class:`~logsluice.AzureBlob` destination.

    Blob sources read a time range only (the last hour unless ``since`` is given), listing
    just the partitions (hours by default) inside it; ``prefix`` and ``name_template`` must
    match the writer's.

    Budgets: ``statement_timeout`` (seconds, PostgreSQL, at most 25), ``max_bytes``
    (decompressed), ``max_files`` (files or blobs one call may read) and ``max_seconds``
    (file and blob scans, at most 25). When a budget runs out, the page comes back with what
    was found, ``partial=True`` and a cursor to continue.

    ``listen`` (PostgreSQL): tails also LISTEN, on one extra connection while any tail is
    open, for the NOTIFY hint the writer sends after each commit, and poll at once.

    A directory that does not exist, a budget that cannot work (zero, negative, not a number)
    or an option that does not apply to the kind of source (``table=`` for a directory,
    ``credential=`` with a connection string) raises ``ValueError``. Options left out (None)
    take their defaults: ``schema="public"``, ``table="logs"``, 10 s timeouts, ``max_seconds``
    20, ``slack_seconds`` 300, ``container="logs"``, ``listen=True``, budgets of 2 GiB and
    10 000 files.
    """

    def __init__(
        self,
        source: Any = None,
        *,
        schema: Optional[str] = None,
        table: Optional[str] = None,
        statement_timeout: Optional[float] = None,
        connect_timeout: Optional[float] = None,
        max_bytes: Optional[int] = None,
        max_files: Optional[int] = None,
        max_seconds: Optional[float] = None,
        slack_seconds: Optional[float] = None,
        container: Optional[str] = None,
        prefix: Optional[str] = None,
        credential: Optional[str] = None,
        name_template: Optional[str] = None,
        listen: Optional[bool] = None,
    ) -> None:
        given = {
            name: value
            for name, value in (
                ("schema", schema),
                ("table", table),
                ("statement_timeout", statement_timeout),
                ("connect_timeout", connect_timeout),
                ("listen", listen),
                ("container", container),
                ("prefix", prefix),
                ("credential", credential),
                ("name_template", name_template),
                ("max_bytes", max_bytes),
                ("max_files", max_files),
                ("max_seconds", max_seconds),
                ("slack_seconds", slack_seconds),
            )
            if value is not None
        }
        for name in ("schema", "table", "container", "prefix", "credential", "name_template"):
            if name in given and not isinstance(given[name], str):
                raise ValueError(f"Reader: {name} must be a string, got {type(given[name]).__name__}")
        if source is None:
            source = "./logs"
        spec: dict[str, Any]
        scan, postgres = _SCAN_OPTIONS, _POSTGRES_OPTIONS
        applies: tuple[str, ...]
        type_name = type(source).__name__
        if type_name == "Postgres" and hasattr(source, "_dsn"):
            spec = {"type": "postgres", "dsn": source._dsn, "schema": source.schema, "table": source.table}
            self.description = f"postgres {source.dsn} {source.schema}.{source.table}"
            what, applies = "a Postgres destination (it names its own schema and table)", postgres
        elif isinstance(source, LocalFiles):
            spec = {"type": "files", "directory": _existing_directory(source.directory)}
            self.description = f"files {source.directory}"
            what, applies = "a directory (LocalFiles) source", _FILES_OPTIONS
        elif type_name == "AzureBlob" and hasattr(source, "_target"):
            target = source._target()
            spec = {"type": "blob", **{k: target[k] for k in _BLOB_KEYS if target.get(k) is not None}}
            self.description = f"blob {source.location}"
            what = "an AzureBlob destination (it names its own container, prefix, template and credential)"
            applies = scan
        elif isinstance(source, (str, os.PathLike)):
            text = os.fspath(source)
            if not isinstance(text, str):
                raise ValueError("Reader: a source path must be text, not bytes")
            if text.startswith(("postgresql://", "postgres://")):
                from .postgres import redact_dsn

                spec = {
                    "type": "postgres",
                    "dsn": text,
                    "schema": schema if schema is not None else "public",
                    "table": table if table is not None else "logs",
                }
                self.description = f"postgres {redact_dsn(text)} {spec['schema']}.{spec['table']}"
                what, applies = "a PostgreSQL source", _DSN_OPTIONS
            elif _CONNECTION_STRING.match(text):
                from .azure_blob import _where_from_connection_string

                box = given.get("container", "logs")
                spec = {"type": "blob", "connection_string": text, "container": box}
                self.description = f"blob {_where_from_connection_string(text)} container={spec['container']}"
                what = "an Azure Storage connection string (its account key or SAS is the credential)"
                applies = ("container", "prefix", "name_template", *scan)
            elif text.startswith(("https://", "http://")):
                from .azure_blob import _without_query

                spec = {"type": "blob", "container_url": text}
                if credential is not None:
                    spec["credential"] = credential
                self.description = f"blob {_without_query(text)}"
                what = "a container URL (the container is the URL's)"
                applies = ("credential", "prefix", "name_template", *scan)
            else:
                if not text.strip():
                    raise ValueError("Reader: the source is empty: give a DSN, a directory or a container")
                directory = _existing_directory(text)
                spec = {"type": "files", "directory": directory}
                self.description = f"files {directory}"
                what, applies = "a directory (LocalFiles) source", _FILES_OPTIONS
        else:
            raise ValueError(f"Reader: source must be a DSN, a directory or a destination, got {type_name}")
        wrong = [name for name in given if name not in applies]
        if wrong:
            raise _NotApplicable("Reader", wrong, what)
        if spec["type"] == "postgres":
            for name, default in (("statement_timeout", 10.0), ("connect_timeout", 10.0)):
                value = given.get(name, default)
                spec[name] = _number("Reader", name, value, least=0.0, most=25.0, above=True)
        else:
            for key in ("prefix", "name_template"):
                if key in given:
                    spec[key] = given[key]
            spec["max_seconds"] = _number(
                "Reader", "max_seconds", given.get("max_seconds", 20.0), least=0.0, most=25.0, above=True
            )
            for name in ("max_bytes", "max_files"):
                if name in given:
                    spec[name] = _number("Reader", name, given[name], least=1, most=2**63 - 1, whole=True)
            if spec["type"] == "files":
                spec["slack_seconds"] = _number(
                    "Reader", "slack_seconds", given.get("slack_seconds", 300.0), least=0.0
                )
        self.kind: str = spec["type"]
        self._core = _core.ReaderCore(json.dumps(spec))
        self._pollers: dict[str, _Poller] = {}
        self._pollers_lock = threading.Lock()
        self._listen = bool(listen) if listen is not None else True
        self._waker: Optional[_Waker] = None
        weakref.finalize(self, _stop_pollers, self._pollers)
        _READERS.add(self)

    def _after_fork(self) -> None:
        """In a forked child (gunicorn ``--preload``, multiprocessing): the tails the parent
        had open were copied without their threads, and a lock one of them held stays held.
        The child starts clean: new locks, no NOTIFY waker, and the parent's pollers set
        apart under keys of their own, so a ``tail``/``subscribe`` in the child starts its
        own poller; a subscription copied from the parent polls again (in the child) once it
        is read there. The parent's tails are not touched."""
        self._pollers_lock = threading.Lock()
        self._waker = None
        inherited = list(self._pollers.values())
        self._pollers.clear()
        for poller in inherited:
            poller.after_fork()
            poller.key = f"{poller.key}|forked|{id(poller)}"
            self._pollers[poller.key] = poller

    @classmethod
    def from_env(cls, **options: Any) -> Reader:
        """The source ``Pipeline.from_env()`` writes to: ``LOGSLUICE_POSTGRES_DSN`` (with
        ``LOGSLUICE_POSTGRES_SCHEMA``/``_TABLE``), else ``LOGSLUICE_DIR``, else the Azure Blob
        container of ``AZURE_STORAGE_CONNECTION_STRING``, ``LOGSLUICE_AZURE_CONTAINER_URL`` or
        ``LOGSLUICE_AZURE_ACCOUNT_URL`` (with ``LOGSLUICE_AZURE_CONTAINER``/``_PREFIX``), else
        ``./logs``. Options that do not apply to the source the environment picks are left
        out (a ``statement_timeout`` for production's PostgreSQL, a directory in development)."""
        return cls._from_env(options, keep_all=False)

    @classmethod
    def _from_env(cls, options: dict[str, Any], keep_all: bool) -> Reader:
        """:meth:`from_env`; ``keep_all``: every option goes to the source picked, which
        refuses those that do not apply (the CLI: ``--table`` must not be ignored)."""
        env = os.environ

        def only(names: tuple[str, ...]) -> dict[str, Any]:
            return {k: v for k, v in options.items() if keep_all or k in names}

        if env.get("LOGSLUICE_POSTGRES_DSN"):
            chosen = only(_DSN_OPTIONS)
            chosen.setdefault("schema", env.get("LOGSLUICE_POSTGRES_SCHEMA") or "public")
            chosen.setdefault("table", env.get("LOGSLUICE_POSTGRES_TABLE") or "logs")
            return cls(env["LOGSLUICE_POSTGRES_DSN"], **chosen)
        if not (env.get("LOGSLUICE_DIR") or "").strip():
            from .azure_blob import _azure_blob_from_env

            blob = _azure_blob_from_env()
            if blob is not None:
                return cls(blob, **only(_SCAN_OPTIONS))
        return cls(env.get("LOGSLUICE_DIR") or "./logs", **only(_FILES_OPTIONS))

    def __repr__(self) -> str:
        return f"Reader({self.description})"

    # -- queries ---------------------------------------------------------------------

    def query(
        self,
        *,
        since: TimeLike = None,
        until: TimeLike = None,
        level: Union[str, list[str], None] = None,
        min_level: Union[str, int, None] = None,
        kind: Optional[str] = None,
        logger: Optional[str] = None,
        process: Optional[int] = None,
        request_id: Optional[str] = None,
        trace_id: Optional[str] = None,
        method: Optional[str] = None,
        route: Optional[str] = None,
        path: Optional[str] = None,
        status: Union[int, str, None] = None,
        min_duration_ms: Optional[float] = None,
        text: Optional[str] = None,
        fields: Optional[Mapping[str, Any]] = None,
        exclude: Optional[Mapping[str, Any]] = None,
        order: str = "desc",
        limit: int = 100,
        cursor: Optional[str] = None,
    ) -> Page:
        """One page of records matching every filter given, newest first by default.

        ``since``/``until``: datetime, ISO 8601, or an age like ``"15m"``, ``"2h"``, ``"7d"``.
        ``status``: a code, a class (``"5xx"``) or a range (``"500-504"``). ``path``: a
        prefix. ``text``: case-insensitive substring of the message. ``fields``: dotted
        paths to a value (equality) or to one condition ``{"ne"|"exists"|"in"|"gt"|"gte"|
        "lt"|"lte"|"between": ...}``. ``exclude``: records to leave out, a mapping of
        ``level``, ``kind``, ``logger``, ``method``, ``route``, ``status``, ``request_id``,
        ``path`` (prefix) or ``text`` (substring) to one value or a list, e.g.
        ``{"route": ["/health", "/metrics"], "status": "4xx"}``; a record without the field is
        kept. ``limit``: at most 1000. ``cursor``: ``page.next``
        of the previous page of the same query. Bad input raises ``ValueError``.
        """
        req = _request(
            {
                "since": since,
                "until": until,
                "level": level,
                "min_level": min_level,
                "kind": kind,
                "logger": logger,
                "process": process,
                "request_id": request_id,
                "trace_id": trace_id,
                "method": method,
                "route": route,
                "path": path,
                "status": status,
                "min_duration_ms": min_duration_ms,
                "text": text,
                "fields": dict(fields) if fields is not None else None,
                "exclude": _exclude(exclude),
                "order": order,
                "limit": limit,
                "cursor": cursor,
            }
        )
        return self._page(req)

    def _page(self, req: dict[str, Any]) -> Page:
        data = json.loads(self._core.query(_dumps(req)))
        return Page(data["records"], data["next"], data["partial"])

    async def _apage(self, req: dict[str, Any]) -> Page:
        text = _dumps(req)
        if self.kind == "postgres":
            answer = await self._core.aquery(text)
        else:
            answer = await self._run(functools.partial(self._core.query, text))
        data = json.loads(answer)
        return Page(data["records"], data["next"], data["partial"])

    def get(self, record_id: Union[str, int]) -> Optional[dict[str, Any]]:
        """One record by its ``id``, or None."""
        text = self._core.get(str(record_id))
        return None if text is None else json.loads(text)

    # The methods made of several reads are written once, as generators of steps
    # (("page", request) or ("get", id)) that receive each answer: the sync methods answer
    # with blocking calls, the async twins by awaiting.

    def _answer(self, step: tuple[str, Any]) -> Any:
        what, arg = step
        return self._page(arg) if what == "page" else self.get(arg)

    async def _aanswer(self, step: tuple[str, Any]) -> Any:
        what, arg = step
        if what == "page":
            return await self._apage(arg)
        return await self.aget(arg)

    def _drive(self, steps: _Steps) -> Any:
        try:
            step = next(steps)
            while True:
                step = steps.send(self._answer(step))
        except StopIteration as done:
            return done.value

    async def _adrive(self, steps: _Steps) -> Any:
        try:
            step = next(steps)
            while True:
                step = steps.send(await self._aanswer(step))
        except StopIteration as done:
            return done.value

    def request(
        self,
        request_id: str,
        *,
        grace: TimeLike = "5m",
        search: TimeLike = "7d",
        limit: int = 1000,
        **filters: Any,
    ) -> RequestView:
        """The access record of ``request_id``, then every app record with that request id
        (background tasks included, up to ``grace`` after the request started) and the
        records sharing its trace id. Time-ordered ids (UUIDv7, what the middleware makes)
        go straight to their time window; other ids are searched newest first within
        ``search``. ``request_id="latest"`` picks the newest access record within ``search``
        (or ``since``) that matches ``filters`` (e.g. ``status="5xx"``; filters go with
        "latest" only); when none matches, the view's ``access`` is None and it has no
        records."""
        _check_names("request", filters, _LATEST_FILTERS)
        return self._drive(self._request_steps(request_id, grace, search, limit, filters))

    def _request_steps(
        self,
        request_id: str,
        grace: TimeLike,
        search: TimeLike,
        limit: int,
        filters: Mapping[str, Any],
    ) -> _Steps:
        if not isinstance(request_id, str) or not request_id.strip():
            raise ValueError("request_id must be a non-empty string")
        request_id = request_id.strip()
        given = sorted(k for k, v in filters.items() if v is not None)
        if given and request_id != LATEST:
            raise ValueError(f"filters ({', '.join(given)}) do not apply to a request id, only to 'latest'")
        grace_s = _seconds(grace, "grace")
        if request_id == LATEST:
            newest = yield from self._latest_steps(filters, search)
            if newest is None:
                return RequestView(LATEST, None, [], [])
            request_id = newest
        t = _uuid7_time(request_id)
        if t is not None:
            since, until = _iso(t - 60), _iso(t + grace_s)
        else:
            found = yield ("page", {"request_id": request_id, "since": _time(search), "limit": 1})
            if not found.records:
                return RequestView(request_id, None, [], [])
            newest = _parse_ts(found.records[0]["ts"])
            since, until = _iso(newest - grace_s - 3600), _iso(newest + grace_s)
        records = yield from self._all({"request_id": request_id, "since": since, "until": until}, limit)
        access = next((r for r in records if r.get("kind") == "http"), None)
        app = [r for r in records if r is not access]
        trace: list[dict[str, Any]] = []
        trace_id = access.get("trace_id") if access else None
        if trace_id:
            same_trace = yield from self._all({"trace_id": trace_id, "since": since, "until": until}, limit)
            trace = [r for r in same_trace if r.get("request_id") != request_id]
        return RequestView(request_id, access, app, trace)

    def latest_request(self, **filters: Any) -> Optional[str]:
        """The request id of the newest access record matching ``filters`` (e.g. status="5xx"),
        within the last 7 days unless ``since`` says otherwise; what ``request("latest")``
        shows."""
        _check_names("latest_request", filters, _LATEST_FILTERS)
        return self._drive(self._latest_steps(filters, "7d"))

    def _latest_steps(self, filters: Mapping[str, Any], search: TimeLike) -> _Steps:
        if filters.get("kind") not in (None, "http"):
            raise ValueError("'latest' picks an access record: kind can only be 'http'")
        page = yield ("page", _request({"since": search, **filters, "kind": "http", "limit": 1}))
        newest = page.records[0].get("request_id") if page.records else None
        return newest if isinstance(newest, str) and newest else None

    def _all(self, req: dict[str, Any], limit: int) -> _Steps:
        out: list[dict[str, Any]] = []
        req = {**req, "order": "asc", "limit": min(limit, 1000)}
        while len(out) < limit:
            page = yield ("page", dict(req))
            out.extend(page.records)
            if not page.next:
                break
            req["cursor"] = page.next
        return out[:limit]

    def context(
        self,
        record_id: Union[str, int],
        *,
        before: int = 50,
        after: int = 50,
        same: Optional[str] = None,
    ) -> dict[str, Any]:
        """What happened around one record: ``{"record", "before", "after"}``, neighbours in
        time order regardless of level or kind. ``same="process"|"logger"|"request"``
        narrows the neighbours to the record's process, logger or request."""
        return self._drive(self._context_steps(record_id, before, after, same))

    def _context_steps(
        self, record_id: Union[str, int], before: int, after: int, same: Optional[str]
    ) -> _Steps:
        for what, n in (("before", before), ("after", after)):
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 1000:
                raise ValueError(f"{what} must be a whole number 0..1000, got {n!r}")
        if same not in (None, "process", "logger", "request"):
            raise ValueError(f"same must be None, 'process', 'logger' or 'request', got {same!r}")
        record = yield ("get", record_id)
        if record is None:
            raise ValueError(f"no record with id {str(record_id)[:200]!r}")
        narrow: dict[str, Any] = {}
        if same == "process":
            narrow["process"] = record.get("process")
        elif same == "logger":
            narrow["logger"] = record.get("logger")
        elif same == "request":
            narrow["request_id"] = record.get("request_id")
            if narrow["request_id"] is None:
                raise ValueError("the record has no request id")
        # Exact microseconds from the text (float seconds can be off by one).
        pos = {"ts": _ts_micros(record["ts"], 0), "id": str(record["id"])}
        older: list[dict[str, Any]] = []
        newer: list[dict[str, Any]] = []
        if before:
            page = yield ("page", {**narrow, "order": "desc", "limit": before, "_after": pos})
            older = page.records[::-1]
        if after:
            page = yield ("page", {**narrow, "order": "asc", "limit": after, "_after": pos})
            newer = page.records
        return {"record": record, "before": older, "after": newer}

    def summary(
        self,
        *,
        since: TimeLike = "24h",
        by: str = "route",
        bucket: Optional[str] = None,
        slowest: int = 5,
        **filters: Any,
    ) -> dict[str, Any]:
        """Records grouped ``by`` route (with method), status, level, kind, logger or
        method, optionally per time ``bucket`` ("1m", "1h"): ``{"groups": [{"key", "bucket",
        "count", "status": {"2xx": ...}, "errors", "error_rate", "p50_ms", "p95_ms",
        "p99_ms", "avg_ms", "max_ms", "slowest": [...]}], "approximate", "partial"}``.
        By route, status or method only http records count. PostgreSQL percentiles are
        exact; file scans keep a bounded sample (``approximate`` says when it was cut)."""
        text = _summary_request("summary", since, by, bucket, slowest, filters)
        return json.loads(self._core.summary(text))

    def stats(self) -> dict[str, Any]:
        """Work done so far by a blob source: ``list_calls``, ``blobs_downloaded`` and
        ``bytes_downloaded`` (as stored, compressed); ``{}`` for other sources."""
        return json.loads(self._core.stats())

    def explain(self, **filters: Any) -> str:
        """PostgreSQL: ``EXPLAIN (ANALYZE, BUFFERS)`` of the page query for ``filters``."""
        _check_names("explain", filters, _QUERY_ARGS | {"_after"})
        return self._core.explain(json.dumps(_request(filters)))

    # -- live tail -------------------------------------------------------------------

    def subscribe(
        self,
        *,
        since: TimeLike = None,
        poll_interval: float = 0.5,
        lookback: float = 10.0,
        max_buffer: int = 10_000,
        **filters: Any,
    ) -> Subscription:
        """A live follower of new records (written after this call, or from ``since``).
        Subscribers with the same filters share one polling thread; over PostgreSQL it also
        polls as soon as a writer's NOTIFY hint arrives (see ``Reader(listen=...)``).

        ``poll_interval``: seconds between polls (0.01 to 86400); ``lookback``: seconds each
        poll reads again for rows that commit late (0 to 86400); ``max_buffer``: records kept
        for a subscriber that does not keep up (at least 1), beyond which a :class:`Gap`
        counts them. Anything else is a ``ValueError``, raised here."""
        return self._drive(
            self._subscribe_steps("subscribe", since, poll_interval, lookback, max_buffer, filters)
        )

    def _subscribe_steps(
        self,
        where: str,
        since: TimeLike,
        poll_interval: float,
        lookback: float,
        max_buffer: int,
        filters: dict[str, Any],
    ) -> _Steps:
        poll_interval, lookback, max_buffer = _follow_options(
            where, poll_interval, lookback, max_buffer, filters
        )
        clean = _request(filters)
        clean.pop("since", None)
        clean.pop("until", None)
        # Validate now, in the caller's thread, rather than in the poller.
        yield ("page", {**clean, "limit": 1, "since": "1s"})
        start = time.time() if since is None else None
        if since is not None:
            first = yield ("page", {**clean, "since": _time(since), "order": "asc", "limit": 1})
            start = _parse_ts(first.records[0]["ts"]) if first.records else time.time()
        key = json.dumps([clean, poll_interval, lookback], sort_keys=True)
        if since is not None:
            key += f"|{start}|{id(object())}"  # a replay is its own poller
        with self._pollers_lock:
            poller = self._pollers.get(key)
            if poller is None or poller.stopped:
                poller = _Poller(self, key, clean, poll_interval, lookback)
                assert start is not None
                poller.watermark = start if since is None else start + lookback
                poller.start_at = start
                poller.primed = False
                self._pollers[key] = poller
                sub = poller.subscribe(max_buffer)
                poller.start()
                self._start_waker()
                return sub
            return poller.subscribe(max_buffer)

    def _start_waker(self) -> None:
        """Called with ``_pollers_lock`` held."""
        if self.kind == "postgres" and self._listen and (self._waker is None or self._waker.done):
            self._waker = _Waker(self._core, self._pollers, self._pollers_lock)
            self._waker.start()

    def tail(
        self,
        *,
        since: TimeLike = None,
        poll_interval: float = 0.5,
        lookback: float = 10.0,
        max_buffer: int = 10_000,
        **filters: Any,
    ) -> Iterator[Any]:
        """Yields records as they land (and :class:`Gap` markers if the consumer fell far
        behind). Same filters as :meth:`query` (plus ``since`` to start earlier) and the
        options of :meth:`subscribe`, checked at once (the tail starts on the first ``next``)."""
        _follow_options("tail", poll_interval, lookback, max_buffer, filters)
        return self._tail(since, poll_interval, lookback, max_buffer, filters)

    def _tail(
        self, since: TimeLike, poll_interval: float, lookback: float, max_buffer: int, filters: dict[str, Any]
    ) -> Iterator[Any]:
        sub = self._drive(self._subscribe_steps("tail", since, poll_interval, lookback, max_buffer, filters))
        try:
            while True:
                yield from sub.get(timeout=1.0)
        finally:
            sub.close()

    def atail(
        self,
        *,
        since: TimeLike = None,
        poll_interval: float = 0.5,
        lookback: float = 10.0,
        max_buffer: int = 10_000,
        **filters: Any,
    ) -> AsyncIterator[Any]:
        """:meth:`tail` for asyncio: waits without blocking the event loop."""
        _follow_options("atail", poll_interval, lookback, max_buffer, filters)
        return self._atail(since, poll_interval, lookback, max_buffer, filters)

    async def _atail(
        self, since: TimeLike, poll_interval: float, lookback: float, max_buffer: int, filters: dict[str, Any]
    ) -> AsyncIterator[Any]:
        steps = self._subscribe_steps("atail", since, poll_interval, lookback, max_buffer, filters)
        sub = await self._adrive(steps)
        try:
            while True:
                for item in await sub.aget(timeout=1.0):
                    yield item
        finally:
            sub.close()

    def subscribers(self) -> int:
        """Live subscriptions in this process for this reader."""
        return sum(len(p.subs) for p in list(self._pollers.values()))

    def close(self) -> None:
        """Ends every live subscription of this reader."""
        _stop_pollers(self._pollers)

    # -- async twins -----------------------------------------------------------------

    @staticmethod
    async def _run(fn: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn)

    async def aquery(self, **kwargs: Any) -> Page:
        """:meth:`query`, awaitable."""
        _check_names("aquery", kwargs, _QUERY_ARGS)
        if kwargs.get("fields") is not None:
            kwargs["fields"] = dict(kwargs["fields"])
        return await self._apage(_request({"order": "desc", "limit": 100, **kwargs}))

    async def arequest(
        self,
        request_id: str,
        *,
        grace: TimeLike = "5m",
        search: TimeLike = "7d",
        limit: int = 1000,
        **filters: Any,
    ) -> RequestView:
        """:meth:`request`, awaitable (``"latest"`` too)."""
        _check_names("arequest", filters, _LATEST_FILTERS)
        return await self._adrive(self._request_steps(request_id, grace, search, limit, filters))

    async def acontext(
        self, record_id: Union[str, int], *, before: int = 50, after: int = 50, same: Optional[str] = None
    ) -> dict[str, Any]:
        """:meth:`context`, awaitable."""
        return await self._adrive(self._context_steps(record_id, before, after, same))

    async def asummary(
        self,
        *,
        since: TimeLike = "24h",
        by: str = "route",
        bucket: Optional[str] = None,
        slowest: int = 5,
        **filters: Any,
    ) -> dict[str, Any]:
        """:meth:`summary`, awaitable."""
        text = _summary_request("asummary", since, by, bucket, slowest, filters)
        if self.kind == "postgres":
            return json.loads(await self._core.asummary(text))
        return json.loads(await self._run(functools.partial(self._core.summary, text)))

    async def aget(self, record_id: Union[str, int]) -> Optional[dict[str, Any]]:
        """:meth:`get`, awaitable."""
        if self.kind == "postgres":
            text = await self._core.aget(str(record_id))
        else:
            text = await self._run(functools.partial(self._core.get, str(record_id)))
        return None if text is None else json.loads(text)


_Steps = Generator[tuple[str, Any], Any, Any]
_QUERY_ARGS = frozenset(inspect.signature(Reader.query).parameters) - {"self"}
# request("latest", ...) and latest_request(): the filters (the request id is what they find).
_LATEST_FILTERS = frozenset(FILTER_NAMES) - {"request_id"}
# The request id that stands for the newest access record.
LATEST = "latest"


def _dumps(req: dict[str, Any]) -> str:
    try:
        return json.dumps(req)
    except (TypeError, ValueError) as e:
        raise ValueError(f"filters must be JSON values: {e}") from None


def _summary_request(
    where: str, since: TimeLike, by: str, bucket: Optional[str], slowest: int, filters: dict[str, Any]
) -> str:
    _check_names(where, filters)
    req = _request({"since": since, **filters})
    req.update({"by": by, "bucket": bucket, "slowest": slowest})
    return _dumps(req)


class _Waker:
    """Over PostgreSQL: one thread per reader waits (GIL released) for the writers' NOTIFY
    hints, which the core LISTENs for on a connection of its own, and wakes every poller of
    the reader. Wake-ups are spaced by at least 0.1 s; polling on the interval goes on
    regardless, so a lost hint only delays a record to the next poll."""

    def __init__(self, core: Any, pollers: dict[str, _Poller], lock: threading.Lock) -> None:
        self.core, self.pollers, self.lock = core, pollers, lock
        self.done = False
        self.thread = threading.Thread(target=self._run, name="logsluice-tail-listen", daemon=True)

    def start(self) -> None:
        self.core.listen()
        self.thread.start()

    def _run(self) -> None:
        seen = 0
        while True:
            with self.lock:
                if not self.pollers:
                    # Under the lock: a new subscriber either sees done or keeps this thread.
                    self.done = True
                    self.core.unlisten()
                    return
            try:
                count = self.core.wait_wakeup(seen, 1.0)
            except Exception:  # the reader is being torn down
                time.sleep(1.0)
                continue
            if count != seen:
                seen = count
                for p in list(self.pollers.values()):
                    p.wake.set()
                time.sleep(0.1)


# Every Reader of this process, for the fork hook (weakly: the hook keeps none alive).
_READERS: weakref.WeakSet[Reader] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for reader in list(_READERS):
        reader._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _stop_pollers(pollers: dict[str, _Poller]) -> None:
    for p in list(pollers.values()):
        for s in list(p.subs):
            s.close()
        p.stopped = True
        p.wake.set()
    pollers.clear()


def _seconds(value: TimeLike, what: str) -> float:
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
        v = value.strip().lower()
        try:
            if v and v[-1] in units:
                return float(v[:-1]) * units[v[-1]]
            return float(v)
        except ValueError:
            pass
    raise ValueError(f"{what} must be a duration like '5m' or seconds, got {value!r}")


def _ts_micros(text: str, fallback: int) -> int:
    """Exact microseconds of an encoder timestamp ``YYYY-MM-DDTHH:MM:SS.ffffffZ``."""
    try:
        whole = _dt.datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=_dt.timezone.utc)
        frac = text[20:26] if len(text) >= 27 and text[19] == "." else "0"
        return int(whole.timestamp()) * 1_000_000 + int(frac.ljust(6, "0"))
    except ValueError:
        return fallback
