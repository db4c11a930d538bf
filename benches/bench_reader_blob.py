"""Reading Azure Blob (Azurite) side by side with LocalFiles holding the same records.

N app records (default 100 000, --quick 30 000) spread over the last 24 h go through one
Pipeline into AzureBlob and LocalFiles at once (Loguru's time patched per record, ~2 %
errors). Each case is run against both readers; the blob reader's work counters (list
calls, blobs downloaded) show that a range lists only its hour partitions and skips the
blobs outside it.

  (a) page 1, newest 100 (default range: the last hour)   (b) last 100 errors of the last 6 h
  (c) page 1 and page 50 of a 24 h listing by keyset      (d) text search over 24 h (full scan)
  (e) summary of 24 h by level                             (f) one hour in the middle of the day

Run: .venv/bin/python benches/bench_reader_blob.py [--quick]
"""

from __future__ import annotations

import datetime as dt
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import logsluice  # noqa: E402
from azure.storage.blob import BlobServiceClient  # noqa: E402
from harness import AzuriteServer  # noqa: E402
from loguru import logger  # noqa: E402

QUICK = "--quick" in sys.argv
N = 30_000 if QUICK else 100_000
REPEAT = 5


def load(azurite, container: str, directory: str) -> None:
    pipeline = logsluice.Pipeline(
        logsluice.AzureBlob(azurite.connection_string, container=container, batch_max_records=5_000),
        logsluice.LocalFiles(directory, max_file_bytes=20_000_000, batch_max_records=5_000),
    )
    logger.remove()
    pipeline.attach(logger, level="DEBUG")
    now = dt.datetime.now(dt.timezone.utc)
    start = now - dt.timedelta(hours=24)
    step = dt.timedelta(hours=24) / N
    for i in range(N):
        at = start + i * step
        log = logger.patch(lambda r, at=at: r.update(time=at))
        if i % 50 == 0:
            log.bind(order=i).error("payment failed for order {}", i)
        else:
            log.bind(user={"id": i % 100}).info("loaded item {} for the catalogue page", i)
    pipeline.flush(timeout=120)
    pipeline.close()
    logger.remove()


def timed(fn):
    times = []
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), out


def work(reader, fn):
    before = reader.stats()
    fn()
    after = reader.stats()
    return {k: after[k] - before[k] for k in after}


def page_n(reader, n, **filters):
    cursor = None
    for _ in range(n):
        page = reader.query(limit=100, cursor=cursor, **filters)
        cursor = page.next
    return page


def main() -> None:
    with AzuriteServer() as azurite, tempfile.TemporaryDirectory() as directory:
        container = f"bench-{uuid.uuid4().hex[:12]}"
        t0 = time.perf_counter()
        load(azurite, container, directory)
        blob = logsluice.Reader(azurite.connection_string, container=container)
        # Patched times are older than the files' names: widen the files' slack to a day
        # and more, or the files reader would skip them (a documented limit of files).
        files = logsluice.Reader(directory, slack_seconds=2 * 86400)
        total = blob.query(since="25h", limit=1).records
        assert total
        service = BlobServiceClient.from_connection_string(azurite.connection_string)
        n_blobs = len(list(service.get_container_client(container).list_blobs()))
        print(
            f"loaded {N:,} records in {time.perf_counter() - t0:.1f} s into {n_blobs} blobs; "
            f"median of {REPEAT} runs"
        )
        mid = dt.datetime.now(dt.timezone.utc).replace(minute=0, second=0, microsecond=0) - dt.timedelta(
            hours=12
        )
        cases = [
            ("(a) page 1, newest 100 (last hour)", lambda r: r.query(limit=100)),
            ("(b) last 100 errors, last 6 h", lambda r: r.query(since="6h", min_level="ERROR", limit=100)),
            ("(c) page 1 of 24 h", lambda r: r.query(since="25h", limit=100)),
            ("(c) page 50 of 24 h (keyset)", lambda r: page_n(r, 50, since="25h")),
            ("(d) text search over 24 h", lambda r: r.query(since="25h", text="order 4950", limit=100)),
            ("(e) summary 24 h by level", lambda r: r.summary(since="25h", by="level")),
            (
                "(f) one hour mid-day",
                lambda r: r.query(since=mid, until=mid + dt.timedelta(minutes=59, seconds=59), limit=1000),
            ),
        ]
        print(f"{'case':38} {'blob ms':>9} {'files ms':>9}  {'blob/files':>10}  blob work per call")
        for name, fn in cases:
            b_ms, b_out = timed(lambda fn=fn: fn(blob))
            f_ms, f_out = timed(lambda fn=fn: fn(files))
            if hasattr(b_out, "records"):
                same = [r["message"] for r in b_out.records] == [r["message"] for r in f_out.records]
            else:
                same = [g["count"] for g in b_out["groups"]] == [g["count"] for g in f_out["groups"]]
            w = work(blob, lambda fn=fn: fn(blob))
            print(
                f"{name:38} {b_ms:9.1f} {f_ms:9.1f}  {b_ms / f_ms:9.2f}x  "
                f"{w['list_calls']} lists, {w['blobs_downloaded']}/{n_blobs} blobs"
                + ("" if same else "  (ANSWERS DIFFER)")
            )
        tail_latency(azurite, container)


def tail_latency(azurite, container: str, samples: int = 20) -> None:
    pipeline = logsluice.Pipeline(
        logsluice.AzureBlob(azurite.connection_string, container=container, batch_max_delay=0.05)
    )
    logger.remove()
    pipeline.attach(logger)
    reader = logsluice.Reader(azurite.connection_string, container=container)
    waits = []
    with reader.subscribe(kind="app") as sub:
        sub.get(timeout=1.0)
        for i in range(samples):
            time.sleep(random.random() * 0.5)  # not in step with the poller
            logger.info("tail probe {}", i)
            pipeline.flush(timeout=30)
            t0 = time.perf_counter()
            got = []
            while not any(r.get("message") == f"tail probe {i}" for r in got):
                got.extend(x for x in sub.get(timeout=2.0) if isinstance(x, dict))
            waits.append((time.perf_counter() - t0) * 1000)
    pipeline.close()
    logger.remove()
    waits.sort()
    p95 = waits[int(len(waits) * 0.95) - 1]
    p50 = statistics.median(waits)
    print(f"(g) batch-written-to-tail latency, poll 0.5 s: p50 {p50:.0f} ms, p95 {p95:.0f} ms")


if __name__ == "__main__":
    main()
