"""`logsluice demo`: the product end to end on this machine.

1. A burst of realistic application records from several threads through the Loguru sink.
2. The demo FastAPI app (middleware + Loguru sink) under a real uvicorn on 127.0.0.1, driven
   with real traffic: errors, a streaming endpoint, a large upload.
3. What was kept, sampled and written, and where (LocalFiles by default; PostgreSQL and Azure
   Blob too when the environment configures them, see `Pipeline.from_env`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import socket
import threading
import time
from typing import Any

from ._pipeline import Pipeline


def _print_stats(stats: dict[str, dict[str, Any]]) -> None:
    for name, s in stats.items():
        if "accepted" not in s:
            continue
        dropped = ", ".join(f"{k}={v}" for k, v in s["dropped"].items() if v) or "none"
        print(
            f"  {name}: accepted={s['accepted']} written={s['written']} dropped={dropped} "
            f"in_flight={s['in_flight']} batches={s['batches']} retries={s['retries']} breaker={s['breaker']}"
        )
        lat = s["flush_latency_ms"]
        if lat:
            print(f"    batch write latency: p50={lat['p50']} ms  p95={lat['p95']} ms  p99={lat['p99']} ms")
        if s["last_error"]:
            print(f"    last error: {s['last_error']}")


def _burst(logger: Any, thread_no: int, count: int) -> None:
    """Realistic application logging: bound context, formatting, the odd warning and error."""
    rnd = random.Random(thread_no)
    log = logger.bind(worker=thread_no, service="checkout")
    for i in range(count):
        user = f"user-{rnd.randrange(5000)}"
        roll = rnd.random()
        if roll < 0.90:
            log.bind(user=user, cart_items=rnd.randrange(1, 9)).info("cart updated for {}", user)
        elif roll < 0.98:
            log.bind(user=user, latency_ms=round(rnd.uniform(300, 2000), 1)).warning("payment provider slow")
        else:
            try:
                raise ConnectionError(f"card processor refused order {i}")
            except ConnectionError:
                log.bind(user=user, order=i).exception("order failed")


def _app_burst(pipeline: Pipeline, logger: Any, records: int, threads: int) -> None:
    per_thread = max(1, records // threads)
    total = per_thread * threads
    print(f"\n1) {total:,} application records from {threads} threads through the Loguru sink")
    workers = [threading.Thread(target=_burst, args=(logger, t, per_thread)) for t in range(threads)]
    started = time.perf_counter()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    produced = time.perf_counter() - started
    pipeline.flush(timeout=60)
    delivered = time.perf_counter() - started
    print(
        f"   caller side: {total / produced:,.0f} records/s; end to end (until flush() returned): "
        f"{total / delivered:,.0f} records/s"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_traffic(pipeline: Pipeline, requests: int) -> None:
    import uvicorn

    from ._demo_app import create_app, drive_traffic

    app = create_app(pipeline)
    port = _free_port()
    # uvicorn's own log (the /boom traceback among it) goes into the pipeline, not the terminal.
    server_log = logging.getLogger("uvicorn.error")
    server_log.handlers[:] = [pipeline.logging_handler(level="INFO")]
    server_log.propagate = False
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    print(f"\n2) the demo FastAPI app under uvicorn at http://127.0.0.1:{port}: {requests} rounds of traffic")
    started = time.perf_counter()
    seen = drive_traffic(f"http://127.0.0.1:{port}", requests=requests)
    elapsed = time.perf_counter() - started
    print(f"   {sum(seen.values()):,} requests in {elapsed:.1f} s; responses by route and status:")
    for key, n in seen.items():
        print(f"     {key:<28} {n}")
    http = pipeline.stats().get("http", {})
    if http:
        print("   middleware: " + ", ".join(f"{k}={v}" for k, v in http.items()))
    server.should_exit = True  # the app's lifespan (pipeline.lifespan) then closes the pipeline
    thread.join(timeout=30)


def run(args: argparse.Namespace) -> int:
    from loguru import logger

    if args.dir:
        os.environ["LOGSLUICE_DIR"] = args.dir
    pipeline = Pipeline.from_env()
    logger.remove()
    pipeline.attach(logger, level="INFO")
    print("logsluice demo")
    print(f"destinations: {', '.join(repr(d) for d in pipeline.destinations)}")

    _app_burst(pipeline, logger, args.records, args.threads)
    _http_traffic(pipeline, args.requests)
    pipeline.close()

    print("\n3) stats():")
    stats = pipeline.stats()
    _print_stats(stats)
    for d in pipeline.destinations:
        directory = getattr(d, "directory", None)
        if not directory:
            continue
        files = sorted(f for f in os.listdir(directory) if f.endswith((".ndjson", ".ndjson.gz")))
        print(f"\nfiles in {directory} ({len(files)}; newest last):")
        for f in files[-5:]:
            print(f"  {f}  {os.path.getsize(os.path.join(directory, f)):,} bytes")
        if files and files[-1].endswith(".ndjson"):
            with open(os.path.join(directory, files[-1]), encoding="utf-8") as fh:
                lines = fh.readlines()
            http = [json.loads(line) for line in lines if '"kind":"http"' in line]
            if http:
                print("\nan access record (bodies and secrets already redacted):")
                print("  " + json.dumps(http[-1], ensure_ascii=False)[:700])
    lost = sum(s["accepted"] - s["written"] for s in stats.values() if "accepted" in s)
    return 0 if lost == 0 else 1
