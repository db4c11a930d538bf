"""(e) Write-to-SSE-client latency of the viewer's live tail, under an open-loop write schedule.

Records are logged through the real pipeline at fixed times (the schedule never waits for
the system: open loop), each carrying the time of its logging call; SSE clients connected
to ``/api/stream`` of a viewer (real uvicorn) note when each record arrives. The figure is
logging call -> client, so it includes the batcher's delay (``batch_max_delay``, 50 ms here)
and the COPY/commit: an upper bound of commit -> client. Target: p95 under 1 s.

Side by side in one run: PostgreSQL (local 15, the test harness) and LocalFiles; 20 clients at
100 records/s, then 100 clients at 20 records/s.

Run: .venv/bin/python benches/bench_viewer_sse.py [--quick]
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402
import logsluice  # noqa: E402
from harness import PostgresServer  # noqa: E402
from loguru import logger  # noqa: E402
from viewer_support import ServerThread  # noqa: E402

QUICK = "--quick" in sys.argv
SECONDS = 5 if QUICK else 15
TARGET_P95_MS = 1000.0


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def run(store: str, destination, reader, clients: int, rate: float) -> dict:
    pipeline = logsluice.Pipeline(destination)
    logger.remove()
    pipeline.attach(logger, level="INFO")
    logger.info("warm up")  # creates the table / first file
    pipeline.flush(timeout=60)
    view = logsluice.viewer(reader, allow_anonymous=True, max_subscribers=1000)
    latencies: list[float] = []
    received = [0] * clients
    total = int(SECONDS * rate)
    with ServerThread(view) as server:

        async def client(i: int, c: httpx.AsyncClient) -> None:
            async with c.stream("GET", "/api/stream", params={"text": "lat "}) as r:
                data = ""
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        data = line[5:].strip()
                    elif line == "" and data:
                        record = json.loads(data)
                        data = ""
                        if "fields" in record:
                            latencies.append((time.time() - record["fields"]["sent"]) * 1000)
                            received[i] += 1
                            if received[i] >= total:
                                return

        def write() -> None:
            start = time.monotonic()
            for n in range(total):
                due = start + n / rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                logger.bind(sent=time.time()).info("lat {}", n)

        async def main() -> None:
            limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
            async with httpx.AsyncClient(base_url=server.base, timeout=120, limits=limits) as c:
                tasks = [asyncio.ensure_future(client(i, c)) for i in range(clients)]
                while view.subscribers < clients:
                    await asyncio.sleep(0.05)
                writer = threading.Thread(target=write)
                writer.start()
                try:
                    await asyncio.wait_for(asyncio.gather(*tasks), SECONDS + 60)
                finally:
                    writer.join()

        asyncio.run(main())
        view.close()
    pipeline.close()
    return {
        "store": store,
        "clients": clients,
        "rate": rate,
        "events": len(latencies),
        "expected": total * clients,
        "p50": statistics.median(latencies),
        "p95": pct(latencies, 0.95),
        "p99": pct(latencies, 0.99),
        "max": max(latencies),
    }


def main() -> None:
    results = []
    with PostgresServer() as pg:
        for clients, rate in ((20, 100.0), (100, 20.0)):
            table = f"sse_bench_{clients}"
            dest = logsluice.Postgres(pg.dsn, table=table, batch_max_delay=0.05)
            results.append(run("postgres", dest, logsluice.Reader(pg.dsn, table=table), clients, rate))
            with tempfile.TemporaryDirectory() as d:
                dest = logsluice.LocalFiles(d, batch_max_delay=0.05)
                results.append(run("files", dest, logsluice.Reader(d), clients, rate))
    print(f"\n(e) logging call -> SSE client, open-loop schedule, {SECONDS} s per run")
    print(
        f"{'store':<9}{'clients':>8}{'rec/s':>7}{'events':>16}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
        f"{'max ms':>9}{'p95/target':>12}"
    )
    for r in results:
        events = f"{r['events']}/{r['expected']}"
        print(
            f"{r['store']:<9}{r['clients']:>8}{r['rate']:>7.0f}{events:>16}{r['p50']:>9.0f}{r['p95']:>9.0f}"
            f"{r['p99']:>9.0f}{r['max']:>9.0f}{r['p95'] / TARGET_P95_MS:>12.2f}"
        )


if __name__ == "__main__":
    main()
