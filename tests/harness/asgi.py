"""A synthetic ASGI driver: the app is called directly with a scripted client, so tests
control chunking (down to 1-byte chunks), disconnects, trailers and extension messages,
which TestClient cannot (it sends a body in one chunk)."""

from __future__ import annotations

import asyncio
import glob
import gzip
import json
import os
from typing import Any, Optional


class Client:
    """Plays the server's side of one request. `chunks` are fed to `receive()` one per call;
    after them, `receive()` returns `http.disconnect` once `disconnect` is set (or the
    response is complete), else waits."""

    def __init__(self, chunks: list[bytes], disconnect: bool = False) -> None:
        self.chunks = list(chunks)
        self.disconnect = disconnect
        self.sent: list[dict] = []
        self.receive_calls = 0
        self.done = asyncio.Event()

    async def receive(self) -> dict:
        self.receive_calls += 1
        if self.chunks:
            body = self.chunks.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(self.chunks)}
        if not self.disconnect:
            await self.done.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.done.set()

    @property
    def status(self) -> Optional[int]:
        for m in self.sent:
            if m["type"] == "http.response.start":
                return m["status"]
        return None

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")

    def header(self, name: bytes) -> Optional[bytes]:
        for m in self.sent:
            if m["type"] == "http.response.start":
                for k, v in m.get("headers", []):
                    if k.lower() == name:
                        return v
        return None


def scope(
    path: str = "/",
    method: str = "GET",
    headers: Optional[list[tuple[bytes, bytes]]] = None,
    query: bytes = b"",
    root_path: str = "",
    **extra: Any,
) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": root_path,
        "query_string": query,
        "headers": headers or [(b"host", b"test")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        **extra,
    }


def call(app: Any, s: dict, chunks: Optional[list[bytes]] = None, disconnect: bool = False) -> Client:
    """Runs one request to completion (exceptions from the app propagate)."""
    client = Client(chunks if chunks is not None else [b""], disconnect=disconnect)
    asyncio.run(app(s, client.receive, client.send))
    return client


def read_records(directory: Any) -> list[dict]:
    out = []
    for name in sorted(glob.glob(os.path.join(os.fspath(directory), "*.ndjson*"))):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(name, "rt", encoding="utf-8") as f:
            out.extend(json.loads(line) for line in f if line.strip())
    return out


def http_records(pipeline: Any, directory: Any) -> list[dict]:
    pipeline.flush(timeout=30)
    return [r for r in read_records(directory) if r["kind"] == "http"]
