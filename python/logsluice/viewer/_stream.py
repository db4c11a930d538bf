"""Live streams for the viewer: one session per subscriber, fed by ``reader.atail``.

A session outlives its connection for ``resume_window`` seconds, so a client that reconnects
with ``Last-Event-ID`` (EventSource does it by itself) gets exactly the events after the one it
saw: the session keeps the events it sent in a bounded buffer and goes on collecting while the
client is away. A session that is gone (expired, or the reconnection reached another worker)
resumes from the position written in the event id: the last record's time and the ids seen at
that time, so nothing before it is repeated.

A client that reads slower than records arrive fills its buffer; then new records are counted
instead of kept, and the client gets one explicit ``gap`` event (count and time range, with the
query that pages through them) before the stream goes on: no silent loss.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import datetime as _dt
import functools
import json
import logging
import os
import secrets
import time
import weakref
from collections.abc import Callable
from typing import Any, Optional

_log = logging.getLogger("logsluice.viewer")

# Per process, across viewers: what the cap counts.
_attached = 0


def attached_streams() -> int:
    return _attached


def _jsonable(value: Any) -> Any:
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def dumps(obj: Any) -> str:
    # ensure_ascii: U+2028/U+2029 and every other non-ASCII character travel escaped.
    return json.dumps(obj, ensure_ascii=True, default=_jsonable, separators=(",", ":"))


def record_ts(record: Any) -> str:
    ts = record.get("ts") if isinstance(record, dict) else None
    if isinstance(ts, _dt.datetime):
        if ts.tzinfo is not None:
            ts = ts.astimezone(_dt.timezone.utc).replace(tzinfo=None)
        return ts.isoformat(timespec="microseconds") + "Z"
    return str(ts) if ts is not None else ""


def record_id(record: Any) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return "" if rid is None else str(rid)


def encode_event_id(session: str, seq: int, ts: str, ids: list[str]) -> str:
    raw = dumps({"s": session, "n": seq, "t": ts, "i": ids[-20:]}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_event_id(text: str) -> dict[str, Any]:
    """The position an event id names; ValueError for anything that is not one."""
    try:
        if len(text) > 4096:
            raise ValueError
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        pos = json.loads(raw)
        ok = (
            isinstance(pos, dict)
            and isinstance(pos.get("s"), str)
            and isinstance(pos.get("n"), int)
            and isinstance(pos.get("t"), str)
            and isinstance(pos.get("i"), list)
            and all(isinstance(i, str) for i in pos["i"])
        )
        if not ok:
            raise ValueError
        return pos
    except (ValueError, TypeError):
        raise ValueError("Last-Event-ID is not an event id of this stream") from None


class Event:
    __slots__ = ("seq", "kind", "data", "event_id")

    def __init__(self, seq: int, kind: str, data: Any, event_id: str) -> None:
        self.seq = seq
        self.kind = kind
        self.data = data
        self.event_id = event_id


class Session:
    """One subscriber's tail: a producer task filling ``events`` and at most one attached writer."""

    def __init__(
        self, hub: Hub, filters: dict[str, Any], resume: Optional[dict[str, Any]], tail: Any
    ) -> None:
        self.hub = hub
        self.id = secrets.token_urlsafe(12)
        self.filters = filters
        self.seq = resume["n"] if resume else 0
        self.sent = self.seq  # highest seq handed to a client
        self.last_ts = resume["t"] if resume else ""
        self.last_ids: list[str] = list(resume["i"]) if resume else []
        self.events: collections.deque[Event] = collections.deque()
        self.gap: Optional[dict[str, Any]] = None
        self.wake = asyncio.Event()
        self.attached = False
        self.detached_at = time.monotonic()
        self.error: Optional[str] = None
        self.ended = False
        self.producer = asyncio.ensure_future(self._produce(resume, tail))

    # -- producer --------------------------------------------------------------------------

    async def _produce(self, resume: Optional[dict[str, Any]], tail: Any) -> None:
        skip_before, skip_ids = "", set()
        if resume and resume["t"]:
            skip_before, skip_ids = resume["t"], set(resume["i"])
        try:
            async for record in tail:
                if not isinstance(record, dict):
                    # The reader's own gap marker (its buffer for this tail overflowed).
                    count = getattr(record, "count", None)
                    if isinstance(count, int) and count > 0:
                        self._lost(
                            count, str(getattr(record, "since", "")), str(getattr(record, "until", ""))
                        )
                    continue
                ts, rid = record_ts(record), record_id(record)
                if skip_before:
                    if ts < skip_before or (ts == skip_before and rid in skip_ids):
                        continue
                    skip_before = ""
                self._offer(record, ts, rid)
        except asyncio.CancelledError:
            raise
        except ValueError as e:
            self.error = str(e)
        except Exception as e:  # noqa: BLE001 - reported to the client as an event, never a traceback
            _log.warning("logsluice viewer: tail failed: %s", type(e).__name__)
            self.error = "the log store is unavailable"
        self.ended = True
        self.wake.set()

    def _offer(self, record: Any, ts: str, rid: str) -> None:
        # Events a client has confirmed (by asking for later ones) leave first.
        while self.events and len(self.events) >= self.hub.buffer and self.events[0].seq <= self.sent:
            self.events.popleft()
        if self.gap is not None or len(self.events) >= self.hub.buffer:
            self._lost(1, ts, ts)
            return
        self._push("record", record, ts, rid)

    def _lost(self, count: int, first: str, last: str) -> None:
        if self.gap is None:
            self.gap = {"count": 0, "from": first, "until": last}
        self.gap["count"] += count
        self.gap["until"] = last or self.gap["until"]
        self.hub.gaps += count
        self.wake.set()

    def _push(self, kind: str, data: Any, ts: str = "", rid: str = "") -> None:
        self.seq += 1
        if ts:
            if ts != self.last_ts:
                self.last_ts, self.last_ids = ts, []
            if rid:
                self.last_ids.append(rid)
                del self.last_ids[:-20]
        self.events.append(
            Event(self.seq, kind, data, encode_event_id(self.id, self.seq, self.last_ts, self.last_ids))
        )
        self.wake.set()

    # -- writer side -------------------------------------------------------------------------

    def take(self, after: int) -> list[Event]:
        """Events after ``after``; flushes a pending gap once everything before it went out."""
        out = [e for e in self.events if e.seq > after]
        if not out and self.gap is not None:
            gap, self.gap = self.gap, None
            query = {**{k: v for k, v in self.filters.items() if k not in ("since", "until")}}
            query.update({"since": gap["from"], "until": gap["until"], "order": "asc"})
            gap["query"] = query
            # The gap's position is its last record: a resume continues after it.
            self._push("gap", gap, gap["until"], "")
            out = [e for e in self.events if e.seq > after]
        return out

    def oldest(self) -> int:
        return self.events[0].seq if self.events else self.seq + 1

    def close(self) -> None:
        self.producer.cancel()


class Hub:
    """All live sessions of one viewer."""

    def __init__(
        self,
        reader: Any,
        *,
        buffer: int,
        max_subscribers: int,
        heartbeat: float,
        max_stream_seconds: float,
        resume_window: float,
    ) -> None:
        self.reader = reader
        self.buffer = buffer
        self.max_subscribers = max_subscribers
        self.heartbeat = heartbeat
        self.max_stream_seconds = max_stream_seconds
        self.resume_window = resume_window
        self.sessions: dict[str, Session] = {}
        self.stopping: Optional[asyncio.Event] = None
        self.closed = False
        self.gaps = 0
        self.streams_served = 0
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        # (loop, stop event, sessions) of event loops served before the current one.
        self._earlier: list[_Served] = []
        _hubs.add(self)

    def _after_fork(self) -> None:
        """In a forked child: the parent's sessions run on the parent's event loop, which
        does not run here, and the stop event is bound to that loop. The child starts with
        no session and binds the loop it serves on; the parent's sessions are kept aside,
        never used nor dropped (dropping would destroy tasks still pending)."""
        _left_by_fork.append((self._loop, self.sessions, self.stopping, self._earlier))
        self._earlier = []
        self.sessions = {}
        self._loop = None
        self.stopping = None

    def _stop_event(self) -> asyncio.Event:
        if self.stopping is None:
            self.stopping = asyncio.Event()
        return self.stopping

    def bind_loop(self) -> None:
        running = asyncio.get_running_loop()
        if self._loop is running:
            return
        if self._loop is not None:
            # Another event loop serves now (a second asyncio.run, the next test client):
            # the stop event was bound to the earlier one. Its streams keep their own and
            # still hear shutdown() while that loop runs.
            self._earlier = [e for e in self._earlier if not e[0].is_closed()]
            self._earlier.append((self._loop, self.stopping, self.sessions))
            self.sessions = {}
            self.stopping = None
        self._loop = running
        self._stop_event()

    def stats(self) -> dict[str, Any]:
        return {
            "subscribers": sum(1 for s in self.sessions.values() if s.attached),
            "sessions": len(self.sessions),
            "process_subscribers": _attached,
            "max_subscribers": self.max_subscribers,
            "gaps": self.gaps,
            "streams_served": self.streams_served,
        }

    def _expire(self) -> None:
        now = time.monotonic()
        for sid, s in list(self.sessions.items()):
            if not s.attached and now - s.detached_at > self.resume_window:
                s.close()
                del self.sessions[sid]

    def reserve(self) -> bool:
        """Takes a subscriber slot (False when the process is at its cap); :meth:`run` or
        :meth:`release` gives it back."""
        global _attached
        if _attached >= self.max_subscribers:
            return False
        _attached += 1
        return True

    def release(self) -> None:
        global _attached
        _attached -= 1

    async def open(self, filters: dict[str, Any], last_event_id: Optional[str]) -> tuple[Session, int]:
        """The session to stream and the seq the client already has. ValueError for bad input."""
        self._expire()
        if last_event_id:
            pos = decode_event_id(last_event_id)
            s = self.sessions.get(pos["s"])
            if s is not None and not s.attached and s.filters == filters and pos["n"] >= s.oldest() - 1:
                return s, pos["n"]
            return await self._add(filters, pos), pos["n"]
        return await self._add(filters, None), 0

    async def _add(self, filters: dict[str, Any], resume: Optional[dict[str, Any]]) -> Session:
        wanted = dict(filters)
        if resume and resume["t"]:
            wanted["since"] = resume["t"]
        # The tail starts here, not in the session's task, so bad filters are a 400.
        subscribe = getattr(self.reader, "subscribe", None)
        if callable(subscribe):
            loop = asyncio.get_running_loop()
            sub = await loop.run_in_executor(None, functools.partial(subscribe, **wanted))
            tail: Any = _drain(sub)
        else:
            tail = self.reader.atail(**wanted)
        s = Session(self, filters, resume, tail)
        self.sessions[s.id] = s
        return s

    async def run(self, session: Session, after: int, emit: Callable[[Optional[Event], str], Any]) -> None:
        """Feeds one attached client until it leaves, the stream's lifetime ends or the viewer
        shuts down. ``emit(event, kind)``: kind "event", "heartbeat", "reconnect", "shutdown"."""
        stopping = self._stop_event()
        session.attached = True
        self.streams_served += 1
        deadline = time.monotonic() + self.max_stream_seconds
        try:
            while True:
                if stopping.is_set():
                    await emit(None, "shutdown")
                    return
                for e in session.take(after):
                    await emit(e, "event")
                    after = max(after, e.seq)
                    session.sent = max(session.sent, after)
                if session.ended and after >= session.seq and session.gap is None:
                    if session.error:
                        await emit(Event(after, "error", {"error": session.error}, ""), "error")
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    await emit(None, "reconnect")
                    return
                session.wake.clear()
                waiters = [asyncio.ensure_future(session.wake.wait()), asyncio.ensure_future(stopping.wait())]
                done, pending = await asyncio.wait(
                    waiters, timeout=min(self.heartbeat, left), return_when=asyncio.FIRST_COMPLETED
                )
                for w in pending:
                    w.cancel()
                if not done:
                    await emit(None, "heartbeat")
        finally:
            self.release()
            session.attached = False
            session.detached_at = time.monotonic()
            if stopping.is_set() or session.ended:
                session.close()
                self.sessions.pop(session.id, None)
            else:
                # Nobody may come back: the detached session's tail stops after the window.
                asyncio.get_running_loop().call_later(self.resume_window + 0.5, self._expire)

    def shutdown(self) -> None:
        """Ends every stream with a ``shutdown`` event (thread-safe, idempotent)."""
        self.closed = True
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for loop, stopping, sessions in [(self._loop, self.stopping, self.sessions), *self._earlier]:
            if loop is None or loop.is_closed() or stopping is None:
                continue
            here = functools.partial(_shutdown_here, stopping, sessions)
            if running is loop:
                here()
            else:
                try:
                    loop.call_soon_threadsafe(here)
                except RuntimeError:
                    pass


_Served = tuple[asyncio.AbstractEventLoop, Optional[asyncio.Event], dict[str, "Session"]]


def _shutdown_here(stopping: asyncio.Event, sessions: dict[str, Session]) -> None:
    stopping.set()
    for s in list(sessions.values()):
        if not s.attached:
            s.close()
            sessions.pop(s.id, None)


# Hubs of this process, for the fork hook (weakly: the hook keeps none alive), and what a
# forked child keeps of its parent's streams.
_hubs: weakref.WeakSet[Hub] = weakref.WeakSet()
_left_by_fork: list[Any] = []


def _after_fork_in_child() -> None:
    """A forked child serves none of its parent's streams: none counts against its cap."""
    global _attached
    _attached = 0
    for hub in list(_hubs):
        hub._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


async def _drain(sub: Any) -> Any:
    """A reader ``Subscription`` as an async iterator; closing it ends the subscription."""
    try:
        while True:
            items = await sub.aget(timeout=1.0)
            if not items and getattr(sub, "closed", False):
                return
            for item in items:
                yield item
    finally:
        sub.close()
