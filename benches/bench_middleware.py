"""Per-request cost of HTTP logging middlewares, in process (the ASGI app driven directly,
no server, no sockets): POST /items/{item_id} with 1 KB of JSON in and out.

Side by side, in one run, interleaved in rounds so drift hits every variant alike:
  none      no middleware
  naive     a BaseHTTPMiddleware logger: awaits request.body() and the whole response
  floor     a minimal pure-ASGI middleware that copies bodies up to 64 KB and calls a no-op
            (the floor for any body-capturing middleware written in Python)
  logsluice LoggingMiddleware, records handed to a running pipeline (LocalFiles)

Targets (issue 5): logsluice's overhead <= 2x the floor's; >= 20x smaller than naive's.

    .venv/bin/python benches/bench_middleware.py [--requests 1500] [--rounds 16] [--processes 9]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import logsluice
from fastapi import FastAPI, Request
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import Response

PAYLOAD = {"name": "widget", "tags": ["a", "b", "c"], "description": "x" * 960}
BODY = json.dumps(PAYLOAD).encode()
assert 1000 <= len(BODY) <= 1100, len(BODY)


def noop(*args: Any) -> None:
    pass


class NaiveLogger(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: Any) -> Response:
        body = await request.body()
        response = await call_next(request)
        chunks = [chunk async for chunk in response.body_iterator]
        noop(
            {
                "method": request.method,
                "path": request.url.path,
                "status": response.status_code,
                "request_body": body.decode(errors="replace"),
                "response_body": b"".join(chunks).decode(errors="replace"),
                "headers": dict(request.headers),
            }
        )
        return Response(
            content=b"".join(chunks),
            status_code=response.status_code,
            headers=dict(response.headers),
            media_type=response.media_type,
        )


class FloorMiddleware:
    """Copies request and response bodies up to 64 KB, then calls a no-op."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        req: list[bytes] = []
        resp: list[bytes] = []
        left = [65536, 65536]

        async def receive_copy() -> dict:
            message = await receive()
            body = message.get("body", b"")
            if body and left[0] > 0:
                req.append(body[: left[0]])
                left[0] -= len(body)
            return message

        async def send_copy(message: dict) -> None:
            if message["type"] == "http.response.body":
                body = message.get("body", b"")
                if body and left[1] > 0:
                    resp.append(body[: left[1]])
                    left[1] -= len(body)
            await send(message)

        await self.app(scope, receive_copy, send_copy)
        noop(scope, req, resp)


async def raw_app(scope: dict, receive: Any, send: Any) -> None:
    """The same exchange without a framework: isolates the middlewares' own cost."""
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def items_app() -> FastAPI:
    app = FastAPI()

    @app.post("/items/{item_id}")
    async def items(item_id: int, request: Request) -> Response:
        data = await request.json()
        data["id"] = item_id
        return Response(json.dumps(data).encode(), media_type="application/json")

    return app


def add_variant(app: Any, variant: str, pipeline: Any) -> None:
    if variant == "naive":
        app.add_middleware(NaiveLogger)
    elif variant == "floor":
        app.add_middleware(FloorMiddleware)
    elif variant == "logsluice":
        app.add_middleware(logsluice.LoggingMiddleware, pipeline=pipeline)


def make_app(variant: str, pipeline: Any = None, framework: str = "fastapi") -> Any:
    if framework == "raw":
        if variant == "naive":
            return NaiveLogger(raw_app)
        if variant == "floor":
            return FloorMiddleware(raw_app)
        if variant == "logsluice":
            return logsluice.LoggingMiddleware(raw_app, pipeline=pipeline)
        return raw_app
    app = items_app()
    add_variant(app, variant, pipeline)
    return app


def make_apps(variants: list[str], pipeline: Any, framework: str) -> dict[str, Any]:
    """One ASGI callable per variant. For FastAPI they share one app, its router, route and
    endpoint objects, and differ only in the middleware stack `add_middleware` builds:
    separate apps per variant made the no-middleware baseline itself move by microseconds
    from one process to the next (where each app's objects landed in memory), more than
    the floor's whole overhead."""
    if framework == "raw":
        return {v: make_app(v, pipeline, framework) for v in variants}
    app = items_app()
    stacks = {}
    for v in variants:
        app.user_middleware.clear()
        app.middleware_stack = None
        add_variant(app, v, pipeline)
        stacks[v] = app.build_middleware_stack()
    app.user_middleware.clear()

    def entry(stack: Any) -> Any:
        async def call(scope: dict, receive: Any, send: Any) -> None:
            # What Starlette.__call__ does before its stack.
            scope["app"] = app
            await stack(scope, receive, send)

        return call

    return {v: entry(stacks[v]) for v in variants}


async def drive(app: Any, n: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this thread) for `n` sequential requests."""
    headers = [
        (b"host", b"bench"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(BODY)).encode()),
        (b"user-agent", b"bench/1.0"),
    ]
    status = 0

    async def receive() -> dict:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    start = time.perf_counter()
    cpu = time.thread_time()
    for i in range(n):
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": f"/items/{i}",
            "raw_path": f"/items/{i}".encode(),
            "root_path": "",
            "query_string": b"",
            "headers": headers,
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8000),
        }
        await app(scope, receive, send)
    elapsed = time.perf_counter() - start, time.thread_time() - cpu
    assert status == 200, status
    return elapsed


def measure(app_kind: str, rounds: int, requests: int) -> dict:
    """One process's figures: per variant the median time per request ({"wall": {variant: us},
    "cpu": {...}}) and the median of its overhead paired by round ({"wall_over": ..., "cpu_over":
    ...}: each round's time minus the same round's no-middleware time, so drift between
    rounds cancels); the variants run in a rotated order, so none always follows the same one."""
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = logsluice.Pipeline(logsluice.LocalFiles(tmp))
        variants = ["none", "naive", "floor", "logsluice"]
        apps = make_apps(variants, pipeline, app_kind)
        loop = asyncio.new_event_loop()
        for v in variants:  # warm-up: imports, route compilation, the core's threads
            loop.run_until_complete(drive(apps[v], 300))
        times: dict[str, dict[str, list[float]]] = {k: {v: [] for v in variants} for k in ("wall", "cpu")}
        for r in range(rounds):
            turn = r % len(variants)
            for v in variants[turn:] + variants[:turn]:
                seconds, cpu_seconds = loop.run_until_complete(drive(apps[v], requests))
                times["wall"][v].append(seconds / requests * 1e6)
                times["cpu"][v].append(cpu_seconds / requests * 1e6)
        loop.close()
        pipeline.flush(timeout=60)
        stats = pipeline.stats()
        pipeline.close()
    out: dict = {"written": stats["local_files"]["written"], "dropped": stats["local_files"]["dropped_total"]}
    out["http"] = stats["http"]
    for k, per in times.items():
        out[k] = {v: statistics.median(per[v]) for v in variants}
        out[f"{k}_over"] = {
            v: statistics.median(t - n for t, n in zip(per[v], per["none"], strict=True)) for v in variants
        }
    return out


def ratios(over: dict[str, float]) -> tuple[float, float]:
    """(logsluice overhead / floor overhead, naive overhead / logsluice overhead)."""
    return over["logsluice"] / over["floor"], over["naive"] / over["logsluice"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1500, help="requests per variant per round")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument(
        "--processes",
        type=int,
        default=9,
        help="fresh processes, each measuring every variant; the figures are medians across them "
        "(where a process's objects land in memory moves its timings by microseconds)",
    )
    parser.add_argument(
        "--app",
        choices=("fastapi", "raw"),
        default="fastapi",
        help="fastapi (the issue's setup) or raw: a bare ASGI echo app, the middlewares' cost alone",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.app, args.rounds, args.requests)))
        return

    runs = []
    for _ in range(args.processes):
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--app", args.app]
            + ["--rounds", str(args.rounds), "--requests", str(args.requests)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))

    variants = ["none", "naive", "floor", "logsluice"]
    print(
        f"[{args.app}] POST /items/{{id}}, {len(BODY)} B JSON in and out; {args.processes} processes, "
        f"each {args.rounds} interleaved rounds x {args.requests} requests (variants in rotated order)"
    )
    print("wall: requests/s of the event loop; cpu: CPU time of the event loop's thread per request")
    print("(the pipeline's own threads, which redact, encode and write, run beside it)")
    print("per variant: the median across processes; +us: the median of the overheads paired by round")
    print(f"{'variant':<10} {'requests/s':>11} {'wall us':>8} {'+wall us':>9} {'cpu us':>8} {'+cpu us':>8}")
    w, c, wo, co = (
        {v: statistics.median(r[key][v] for r in runs) for v in variants}
        for key in ("wall", "cpu", "wall_over", "cpu_over")
    )
    for v in variants:
        print(f"{v:<10} {1e6 / w[v]:>11.0f} {w[v]:>8.1f} {wo[v]:>9.2f} {c[v]:>8.1f} {co[v]:>8.2f}")
    for label in ("wall", "cpu"):
        per = [ratios(r[f"{label}_over"]) for r in runs]
        floor_x = statistics.median(p[0] for p in per)
        naive_x = statistics.median(p[1] for p in per)
        print(
            f"{label}: logsluice overhead / floor overhead = {floor_x:.2f}x (target <= 2x); "
            f"naive overhead / logsluice overhead = {naive_x:.1f}x (target >= 20x); "
            f"medians of the processes' ratios, each: {', '.join(f'{p[0]:.2f}' for p in per)}"
        )
    written = sum(r["written"] for r in runs)
    dropped = sum(r["dropped"] for r in runs)
    print(f"records written by the pipelines: {written} (dropped {dropped}); middleware: {runs[-1]['http']}")


if __name__ == "__main__":
    main()
