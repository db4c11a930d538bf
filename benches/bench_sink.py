"""Caller-side cost of one log call, end-to-end rate, and memory under a stalled destination.

Baselines measured in the same run (ratios are what count; this machine is shared and slow):
  noop      Loguru with a no-op function sink, added with the same options as attach(): the floor
  file      Loguru's file sink, enqueue=False
  enqueue   Loguru's file sink, enqueue=True
  stdlib    logging QueueHandler + QueueListener (FileHandler behind it)
  logsluice pipeline.attach(logger) into LocalFiles

Run: .venv/bin/python benches/bench_sink.py [--calls 20000] [--runs 5] [--memory-records 2000000]
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import logsluice
from loguru import logger

ATTACH_OPTIONS = dict(
    format="{message}", diagnose=False, backtrace=False, enqueue=False, colorize=False, catch=True
)


def loguru_calls(n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        logger.bind(user="ada", n=i).info("signed in from {}", "10.0.0.1")
    return time.perf_counter() - started


def stdlib_calls(log: logging.Logger, n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        log.info("signed in from %s", "10.0.0.1", extra={"user": "ada", "n": i})
    return time.perf_counter() - started


def caller_side(calls: int, runs: int, tmp: str) -> dict[str, float]:
    """Rounds of every configuration in turn, so load from other processes on this shared
    machine hits them all alike; the median of the rounds per configuration."""
    logger.remove()
    log = logging.getLogger("bench.stdlib")
    log.propagate = False
    log.setLevel(logging.INFO)
    pipeline = logsluice.Pipeline(logsluice.LocalFiles(os.path.join(tmp, "caller")))

    def noop() -> float:
        hid = logger.add(lambda m: None, **ATTACH_OPTIONS)
        try:
            return loguru_calls(calls)
        finally:
            logger.remove(hid)

    def file_sink(enqueue: bool) -> float:
        hid = logger.add(os.path.join(tmp, f"file-{enqueue}.log"), format="{message}", enqueue=enqueue)
        try:
            return loguru_calls(calls)
        finally:
            logger.remove(hid)  # with enqueue=True this waits for its queue to drain

    def stdlib() -> float:
        q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        handler = logging.handlers.QueueHandler(q)
        listener = logging.handlers.QueueListener(q, logging.FileHandler(os.path.join(tmp, "stdlib.log")))
        listener.start()
        log.addHandler(handler)
        try:
            return stdlib_calls(log, calls)
        finally:
            log.removeHandler(handler)
            listener.stop()

    def ours() -> float:
        hid = pipeline.attach(logger)
        try:
            return loguru_calls(calls)
        finally:
            logger.remove(hid)
            pipeline.flush(timeout=60)  # its background work must not bleed into the next timing

    configs: dict[str, Callable[[], float]] = {
        "noop": noop,
        "file": lambda: file_sink(False),
        "enqueue": lambda: file_sink(True),
        "stdlib": stdlib,
        "logsluice": ours,
    }
    for run in configs.values():  # warm up every path once
        run()
    samples: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(runs):
        for name, run in configs.items():
            samples[name].append(run() / calls * 1e6)
    pipeline.close()
    return {name: statistics.median(v) for name, v in samples.items()}


def end_to_end(calls: int, tmp: str) -> dict[str, float]:
    directory = os.path.join(tmp, "e2e")
    pipeline = logsluice.Pipeline(logsluice.LocalFiles(directory))
    hid = pipeline.attach(logger)
    loguru_calls(1000)
    pipeline.flush()
    started = time.perf_counter()
    caller = loguru_calls(calls)
    pipeline.flush(timeout=120)
    total = time.perf_counter() - started
    logger.remove(hid)
    pipeline.close()
    lines = sum(sum(1 for _ in open(os.path.join(directory, f))) for f in os.listdir(directory))
    assert lines == calls + 1000, f"expected {calls + 1000} lines on disk, found {lines}"
    return {"caller_per_s": calls / caller, "end_to_end_per_s": calls / total}


MEMORY_CHILD = r"""
import json, os, sys, tempfile
from loguru import logger
import logsluice
from logsluice.destinations import _Controlled

def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

n, bound = int(sys.argv[1]), int(sys.argv[2])
tmp = tempfile.mkdtemp()
control = os.path.join(tmp, "control")
open(control, "w").write("stall")
dest = _Controlled(control, os.path.join(tmp, "out"), queue_max_records=100_000_000,
                   queue_max_bytes=bound, attempt_timeout=3600)
pipeline = logsluice.Pipeline(dest)
logger.remove()
pipeline.attach(logger)
for i in range(1000):
    logger.bind(user="ada", n=i).info("signed in from {}", "10.0.0.1")
base = rss_mb()
peak = base
for i in range(n):
    logger.bind(user="ada", n=i).info("signed in from {}", "10.0.0.1")
    if i % 100_000 == 0:
        peak = max(peak, rss_mb())
peak = max(peak, rss_mb())
s = pipeline.stats()["controlled"]
print(json.dumps({"base_mb": base, "peak_mb": peak, "queue_bytes": s["queue_bytes"],
                  "queued": s["queue_records"], "dropped_queue_full": s["dropped"]["queue_full"]}))
os._exit(0)
"""


def memory(records: int, bound: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(records), str(bound)],
        check=True,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--memory-records", type=int, default=2_000_000)
    parser.add_argument("--queue-bytes", type=int, default=64 * 1024 * 1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        us = caller_side(args.calls, args.runs, tmp)
        e2e = end_to_end(args.calls * 5, tmp)
    print(
        f"caller-side cost per logger.bind(...).info(...) call, "
        f"median of {args.runs} runs x {args.calls} calls:"
    )
    for name, value in us.items():
        print(f"  {name:<10} {value:7.2f} µs")
    print(f"  logsluice / no-op floor        = {us['logsluice'] / us['noop']:.3f}x   (target <= 1.15x)")
    print(f"  enqueue=True / logsluice       = {us['enqueue'] / us['logsluice']:.2f}x   (target >= 4x)")
    print(f"  logsluice / stdlib QueueHandler = {us['logsluice'] / us['stdlib']:.2f}x")
    ratio = e2e["end_to_end_per_s"] / e2e["caller_per_s"]
    print(
        f"end to end ({args.calls * 5} records verified on disk): caller {e2e['caller_per_s']:,.0f}/s, "
        f"first call to flush() {e2e['end_to_end_per_s']:,.0f}/s = {ratio:.3f}x caller-side (target >= 0.9x)"
    )
    if args.memory_records:
        m = memory(args.memory_records, args.queue_bytes)
        growth = m["peak_mb"] - m["base_mb"]
        limit = args.queue_bytes / 2**20 + 20
        print(
            f"memory: {args.memory_records:,} records into a stalled destination, queue bound "
            f"{args.queue_bytes / 2**20:.0f} MiB: RSS growth {growth:.1f} MiB (limit {limit:.0f} MiB), "
            f"queued {m['queued']:,} records / {m['queue_bytes'] / 2**20:.1f} MiB, "
            f"dropped queue_full {m['dropped_queue_full']:,}"
        )


if __name__ == "__main__":
    main()
