"""The middleware benchmark counted in instructions instead of seconds: what each variant
adds per request on the event loop's thread, as callgrind counts it.

Timings on a shared 2-core machine move with whatever else runs; instruction counts do not
(the same binary and inputs give the same count whatever the load; string hashing is pinned
with PYTHONHASHSEED=0 so that dictionaries probe alike). They are not seconds
(cache misses and branch mispredictions cost nothing here), so they complement
bench_middleware.py rather than replace it. Same app, same variants, same request.

Each variant runs twice under ``valgrind --tool=callgrind --separate-threads=yes``, with
``--small`` and ``--large`` requests after the same warm-up; the difference of the main
thread's totals divided by the difference of requests is the per-request cost, start-up and
imports cancelling out. The pipeline's own threads (redaction, encoding, writing) are left
out: they run beside the event loop.

    .venv/bin/python benches/bench_middleware_instructions.py [--small 300] [--large 1500]
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile

VARIANTS = ("none", "naive", "floor", "logsluice")

DRIVER = """
import asyncio, sys, tempfile
sys.path.insert(0, {benches!r})
import bench_middleware as b
import logsluice
variant, n, framework = sys.argv[1], int(sys.argv[2]), sys.argv[3]
pipeline = logsluice.Pipeline(logsluice.LocalFiles(tempfile.mkdtemp()))
app = b.make_app(variant, pipeline, framework)
loop = asyncio.new_event_loop()
loop.run_until_complete(b.drive(app, 200))
loop.run_until_complete(b.drive(app, n))
pipeline.close()
"""


def main_thread_instructions(variant: str, n: int, framework: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        driver = DRIVER.format(benches=os.path.dirname(os.path.abspath(__file__)))
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--separate-threads=yes",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-c",
                driver,
                variant,
                str(n),
                framework,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # String hashing pinned: dictionaries probe alike from run to run.
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        # Thread 1 is the interpreter's main thread: the event loop's.
        (main,) = [f for f in glob.glob(out + "*") if f.endswith("-01")]
        with open(main) as f:
            for line in f:
                if line.startswith("summary:") or line.startswith("totals:"):
                    return int(line.split()[1])
    raise RuntimeError("callgrind wrote no total")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", type=int, default=300)
    parser.add_argument("--large", type=int, default=1500)
    parser.add_argument("--app", choices=("fastapi", "raw"), default="fastapi")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is needed (apt-get install valgrind)")

    per_request = {}
    for variant in VARIANTS:
        small = main_thread_instructions(variant, args.small, args.app)
        large = main_thread_instructions(variant, args.large, args.app)
        per_request[variant] = (large - small) / (args.large - args.small)
    base = per_request["none"]
    print(f"[{args.app}] instructions per request on the event loop's thread (callgrind)")
    print(f"{'variant':<10} {'instr':>10} {'+instr':>10}")
    for variant in VARIANTS:
        print(f"{variant:<10} {per_request[variant]:>10.0f} {per_request[variant] - base:>10.0f}")
    floor = per_request["floor"] - base
    ours = per_request["logsluice"] - base
    naive = per_request["naive"] - base
    print(
        f"logsluice overhead / floor overhead = {ours / floor:.2f}x (target <= 2x); "
        f"naive overhead / logsluice overhead = {naive / ours:.1f}x (target >= 20x)"
    )


if __name__ == "__main__":
    main()
