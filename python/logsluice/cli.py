"""The `logsluice` command line."""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from typing import Any, Optional

from . import __version__
from ._pipeline import Pipeline


def _print_stats(stats: dict[str, dict[str, Any]]) -> None:
    for name, s in stats.items():
        dropped = ", ".join(f"{k}={v}" for k, v in s["dropped"].items() if v) or "none"
        lat = s["flush_latency_ms"]
        print(
            f"  {name}: accepted={s['accepted']} written={s['written']} dropped={dropped} "
            f"in_flight={s['in_flight']} batches={s['batches']} retries={s['retries']} breaker={s['breaker']}"
        )
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


def demo(args: argparse.Namespace) -> int:
    if getattr(args, "serve", False):
        from ._demo_serve import serve

        return serve(args)
    from loguru import logger

    if args.dir:
        os.environ["LOGSLUICE_DIR"] = args.dir
    pipeline = Pipeline.from_env()
    logger.remove()
    pipeline.attach(logger, level="INFO")
    per_thread = max(1, args.records // args.threads)
    total = per_thread * args.threads
    print(f"logsluice {__version__} demo: {total} records from {args.threads} threads")
    print(f"destinations: {', '.join(repr(d) for d in pipeline.destinations)}")

    threads = [threading.Thread(target=_burst, args=(logger, t, per_thread)) for t in range(args.threads)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    produced = time.perf_counter() - started
    pipeline.flush(timeout=60)
    delivered = time.perf_counter() - started

    per_call = produced * 1e6 / per_thread
    print(
        f"\ncaller side: {total / produced:,.0f} records/s "
        f"({per_call:.1f} µs per call per thread, Loguru included)"
    )
    print(f"end to end:  {total / delivered:,.0f} records/s (first call until flush() returned)")
    print("\nstats():")
    stats = pipeline.stats()
    _print_stats(stats)
    pipeline.close()
    for d in pipeline.destinations:
        directory = getattr(d, "directory", None)
        if directory:
            files = sorted(f for f in os.listdir(directory) if f.endswith((".ndjson", ".ndjson.gz")))
            print(f"\nfiles in {directory} ({len(files)}):")
            for f in files[-5:]:
                print(f"  {f}  {os.path.getsize(os.path.join(directory, f)):,} bytes")
            if files:
                with open(os.path.join(directory, files[-1]), encoding="utf-8") as fh:
                    last = fh.readlines()[-1]
                print("\nlast record:")
                print("  " + json.dumps(json.loads(last), ensure_ascii=False)[:400])
    lost = sum(s["accepted"] - s["written"] for s in stats.values())
    return 0 if lost == 0 else 1


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="logsluice", description="Ship logs to PostgreSQL, Azure Blob and files."
    )
    parser.add_argument("--version", action="version", version=f"logsluice {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="write a burst of realistic records through the pipeline and report")
    p.add_argument("--records", type=int, default=200_000, help="how many records (default 200000)")
    p.add_argument("--threads", type=int, default=4, help="producer threads (default 4)")
    p.add_argument("--dir", help="LocalFiles directory (default: $LOGSLUICE_DIR or ./logs)")
    p.add_argument("--serve", action="store_true", help="keep the demo app running with the viewer at /logs")
    p.add_argument("--port", type=int, default=8000, help="port for --serve (default 8000)")
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    if getattr(args, "records", 1) < 1 or getattr(args, "threads", 1) < 1:
        parser.error("--records and --threads must be positive")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
