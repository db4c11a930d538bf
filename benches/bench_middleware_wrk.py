"""p99 latency under uvicorn, driven by `wrk` on loopback: POST /items/{id} with 1 KB of JSON
in and out, without middleware, with the floor middleware (bodies copied, a no-op call: what
any body-capturing middleware in Python costs, see bench_middleware.py) and with
LoggingMiddleware, alternating runs in one session.

Both of uvicorn's flavours, one after the other (`--servers plain,standard`): plain is what
`pip install uvicorn` runs (h11 parses HTTP, the asyncio event loop); standard is what
`uvicorn[standard]` and `fastapi[standard]` install (httptools, uvloop), whose own cost per
request is about 40% lower, so a middleware's is a larger share of it.

Target (issue 5): logsluice's p99 within 10% of no middleware. wrk keeps uvicorn's one thread
saturated, so p99 here follows throughput: the floor's line shows how much of the gap any
body-capturing middleware pays. Beside it, the CPU time each of uvicorn's threads spent per
request during the measured run (from /proc/<pid>/task/*/schedstat): the event loop's thread,
and the pipeline's threads (logsluice-http redacts and builds records, logsluice-local encodes
and writes them).

Then the same variants at a fixed arrival rate, a share of none's throughput measured above
(`--paced 0.6`; 0 skips it): the latency a client sees while the server has room, where the
middleware's CPU shows as service time instead of as lost throughput. apt's wrk has no fixed-rate
mode (wrk2's -R), so a Lua `delay()` hands each request the next slot of one schedule shared by
the connections; a connection behind schedule sends at once (no catch-up burst). wrk still times
each request from its own send, so a stall that holds requests back is not charged to them
(coordinated omission): the saturation figures above stay the target's measure.

    .venv/bin/python benches/bench_middleware_wrk.py [--seconds 10] [--rounds 5] [--connections 16]
        [--variants none,floor,logsluice] [--paced 0.6] [--servers plain,standard]
        (variants also: logsluice_noecho, without the request id echo)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
BODY = json.dumps({"name": "widget", "tags": ["a", "b", "c"], "description": "x" * 960})
LUA = f"""
wrk.method = "POST"
wrk.body = {json.dumps(BODY)}
wrk.headers["Content-Type"] = "application/json"
"""
# One schedule for all connections of wrk's thread (they share its Lua state): every request
# takes the next slot, `interval_ms` after the one before. wrk waits whole milliseconds.
PACE = """
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } pace_timespec;
int clock_gettime(int clock, pace_timespec *ts);
]]
local ts = ffi.new("pace_timespec")
local interval_ms = %r
local next_ms = nil
function delay()
  ffi.C.clock_gettime(1, ts)
  local now = tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
  if next_ms == nil or next_ms < now then next_ms = now end
  local wait = next_ms - now
  next_ms = next_ms + interval_ms
  return wait
end
"""
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
# uvicorn's own options for each flavour, named explicitly (its default, "auto", picks
# whichever is installed).
SERVERS = {
    "plain": ["--http", "h11", "--loop", "asyncio"],
    "standard": ["--http", "httptools", "--loop", "uvloop"],
}


@dataclass
class Run:
    p50: float  # ms
    p99: float  # ms
    rps: float
    cpu: dict[str, float]  # µs per request, by thread


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("uvicorn did not start")


def thread_cpu_ns(pid: int) -> dict[str, int]:
    """CPU time so far of each thread of `pid`, by name; the main thread as "event loop"."""
    out: dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = "event loop" if tid == str(pid) else f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
        except OSError:
            continue  # the thread ended meanwhile
        out[name] = out.get(name, 0) + ns
    return out


def latency_ms(out: str, label: str) -> float:
    found = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    if not found:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    return float(found.group(1)) * UNITS[found.group(2)]


def run(server_flavour: str, variant: str, args: argparse.Namespace, logs: str, rate: Optional[float]) -> Run:
    """One wrk run against a fresh uvicorn process: as fast as it answers, or at `rate`
    requests/s."""
    seconds, connections = args.seconds, args.connections
    port = free_port()
    env = {**os.environ, "LOGSLUICE_DIR": logs}
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", f"_wrk_app:app_{variant}", "--app-dir", HERE, "--port", str(port)]
        + ["--host", "127.0.0.1", "--log-level", "warning", "--no-access-log"]
        + SERVERS[server_flavour],
        env=env,
    )
    try:
        wait_for(port)
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
            f.write(LUA + (PACE % (1000.0 / rate) if rate else ""))
        url = f"http://127.0.0.1:{port}/items/7"
        # Warm-up, then the measured run.
        subprocess.run(
            ["wrk", "-t1", f"-c{connections}", "-d2s", "-s", f.name, url], capture_output=True, check=True
        )
        before = thread_cpu_ns(server.pid)
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", f.name, url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        after = thread_cpu_ns(server.pid)
        os.unlink(f.name)
    finally:
        server.terminate()
        server.wait(30)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    requests = re.search(r"^\s+(\d+) requests in", out, re.M)
    if not rps or not requests or "Non-2xx" in out:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    n = int(requests.group(1))
    cpu = {name: (ns - before.get(name, 0)) / n / 1e3 for name, ns in after.items()}
    return Run(latency_ms(out, "50%"), latency_ms(out, "99%"), float(rps.group(1)), cpu)


def rounds_of(
    server_flavour: str,
    variants: list[str],
    args: argparse.Namespace,
    logs: str,
    rate: Optional[float] = None,
) -> dict[str, list[Run]]:
    results: dict[str, list[Run]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            results[variant].append(run(server_flavour, variant, args, logs, rate))
    return results


def median(runs: list[Run], field: str) -> float:
    return statistics.median(getattr(r, field) for r in runs)


def report(results: dict[str, list[Run]], target: str) -> None:
    """The latency table and each variant's p99 against none's, per round too (each round's
    runs ran back to back: their ratios show how far the machine's noise moves the figure)."""
    print(f"{'variant':<17} {'p50 ms':>8} {'p99 ms':>8} {'requests/s':>11}  runs (p99 ms)")
    for variant, runs in results.items():
        print(
            f"{variant:<17} {median(runs, 'p50'):>8.2f} {median(runs, 'p99'):>8.2f} "
            f"{median(runs, 'rps'):>11.0f}  {[round(r.p99, 2) for r in runs]}"
        )
    none = results["none"]
    for variant, runs in list(results.items())[1:]:
        rounds = [v.p99 / n.p99 for v, n in zip(runs, none, strict=True)]
        note = target if variant == "logsluice" else ""
        print(
            f"p99 {variant} / none = {median(runs, 'p99') / median(none, 'p99'):.2f}{note}; "
            f"p50 {median(runs, 'p50') / median(none, 'p50'):.2f}; "
            f"requests/s {median(runs, 'rps') / median(none, 'rps'):.2f} of none; "
            f"per round {[round(r, 2) for r in rounds]}"
        )


def measure(server_flavour: str, variants: list[str], args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as logs:
        saturated = rounds_of(server_flavour, variants, args, logs)
        rate = args.paced * median(saturated["none"], "rps")
        paced = rounds_of(server_flavour, variants, args, logs, rate) if rate else None

    print(f"\n== uvicorn {server_flavour} ({' '.join(SERVERS[server_flavour])})")
    print("As fast as uvicorn answers:")
    report(saturated, " (target <= 1.10)")
    threads = ("event loop", "logsluice-http", "logsluice-local")
    print("CPU µs per request by thread:")
    print(f"{'variant':<17}" + "".join(f"{t:>17}" for t in threads))
    for variant, runs in saturated.items():
        cells = [statistics.median(r.cpu.get(t, 0.0) for r in runs) for t in threads]
        print(f"{variant:<17}" + "".join(f"{c:>17.1f}" for c in cells))
    if paced:
        print(f"At a fixed {rate:.0f} requests/s ({args.paced:.0%} of none's throughput above):")
        report(paced, "")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--variants", default="none,floor,logsluice")
    parser.add_argument("--paced", type=float, default=0.6)
    parser.add_argument("--servers", default="plain,standard")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if variants[0] != "none" or len(variants) < 2:
        sys.exit("--variants starts with none (the baseline) and names at least one more")
    if not 0.0 <= args.paced < 1.0:
        sys.exit("--paced is a share of none's throughput, from 0 (skip) to below 1")
    servers = args.servers.split(",")
    if not servers or any(s not in SERVERS for s in servers):
        sys.exit(f"--servers takes a list of {', '.join(SERVERS)}")
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed (apt-get install wrk)")
    if "standard" in servers and not all(importlib.util.find_spec(m) for m in ("httptools", "uvloop")):
        sys.exit("uvicorn's standard flavour needs httptools and uvloop (pip install 'uvicorn[standard]')")
    print(
        f"uvicorn + wrk, 1 thread, {args.connections} connections, "
        f"{args.rounds} x {args.seconds}s per variant; medians of the rounds"
    )
    for server_flavour in servers:
        measure(server_flavour, variants, args)


if __name__ == "__main__":
    main()
