"""p99 latency under uvicorn, driven by `wrk` on loopback: POST /items/{id} with 1 KB of JSON
in and out, without middleware, with the floor middleware (bodies copied, a no-op call: what
any body-capturing middleware in Python costs, see bench_middleware.py) and with
LoggingMiddleware, alternating runs in one session.

Target (issue 5): logsluice's p99 within 10% of no middleware. wrk keeps uvicorn's one thread
saturated, so p99 here follows throughput: the floor's line shows how much of the gap any
body-capturing middleware pays. Beside it, the CPU time each of uvicorn's threads spent per
request during the measured run (from /proc/<pid>/task/*/schedstat): the event loop's thread,
and the pipeline's threads (logsluice-http redacts and builds records, logsluice-local encodes
and writes them).

    .venv/bin/python benches/bench_middleware_wrk.py [--seconds 10] [--rounds 5] [--connections 16]
        [--variants none,floor,logsluice]   (also: logsluice_noecho, without the request id echo)
"""

from __future__ import annotations

import argparse
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

HERE = os.path.dirname(os.path.abspath(__file__))
BODY = json.dumps({"name": "widget", "tags": ["a", "b", "c"], "description": "x" * 960})
LUA = f"""
wrk.method = "POST"
wrk.body = {json.dumps(BODY)}
wrk.headers["Content-Type"] = "application/json"
"""
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


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


def run(variant: str, seconds: int, connections: int, logs: str) -> tuple[float, float, dict[str, float]]:
    """(p99 ms, requests/s, CPU µs per request by thread) of one wrk run against a fresh
    uvicorn process."""
    port = free_port()
    env = {**os.environ, "LOGSLUICE_DIR": logs}
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", f"_wrk_app:app_{variant}", "--app-dir", HERE, "--port", str(port)]
        + ["--host", "127.0.0.1", "--log-level", "warning", "--no-access-log"],
        env=env,
    )
    try:
        wait_for(port)
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
            f.write(LUA)
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
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    requests = re.search(r"^\s+(\d+) requests in", out, re.M)
    if not p99 or not rps or not requests or "Non-2xx" in out:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    n = int(requests.group(1))
    cpu = {name: (ns - before.get(name, 0)) / n / 1e3 for name, ns in after.items()}
    return float(p99.group(1)) * UNITS[p99.group(2)], float(rps.group(1)), cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--variants", default="none,floor,logsluice")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if variants[0] != "none" or len(variants) < 2:
        sys.exit("--variants starts with none (the baseline) and names at least one more")
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed (apt-get install wrk)")
    results: dict[str, list[tuple[float, float, dict[str, float]]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as logs:
        for _ in range(args.rounds):
            for variant in results:
                results[variant].append(run(variant, args.seconds, args.connections, logs))
    print(
        f"uvicorn + wrk, 1 thread, {args.connections} connections, "
        f"{args.rounds} x {args.seconds}s per variant"
    )
    print(f"{'variant':<17} {'p99 ms (median)':>16} {'requests/s (median)':>20}  runs (p99 ms)")
    p99 = {}
    for variant, runs in results.items():
        p99[variant] = statistics.median(r[0] for r in runs)
        rps = statistics.median(r[1] for r in runs)
        print(f"{variant:<17} {p99[variant]:>16.2f} {rps:>20.0f}  {[round(r[0], 2) for r in runs]}")
    for variant in variants[1:]:
        # Each round's runs ran back to back: their ratios show how far the machine's noise
        # moves the figure.
        rounds = [v[0] / n[0] for v, n in zip(results[variant], results["none"], strict=True)]
        rps = statistics.median(r[1] for r in results[variant]) / statistics.median(
            r[1] for r in results["none"]
        )
        target = " (target <= 1.10)" if variant == "logsluice" else ""
        print(
            f"p99 {variant} / none = {p99[variant] / p99['none']:.2f}{target}; "
            f"requests/s {rps:.2f} of none; per round {[round(r, 2) for r in rounds]}"
        )

    threads = ("event loop", "logsluice-http", "logsluice-local")
    print("CPU µs per request by thread (median of the rounds):")
    print(f"{'variant':<17}" + "".join(f"{t:>17}" for t in threads))
    for variant, runs in results.items():
        cells = [statistics.median(r[2].get(t, 0.0) for r in runs) for t in threads]
        print(f"{variant:<17}" + "".join(f"{c:>17.1f}" for c in cells))


if __name__ == "__main__":
    main()
