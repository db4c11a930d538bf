"""The `logsluice` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from . import __version__


def demo(args: argparse.Namespace) -> int:
    if getattr(args, "serve", False):
        from ._demo_serve import serve

        return serve(args)
    from ._demo import run

    return run(args)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="logsluice", description="Ship logs to PostgreSQL, Azure Blob and files."
    )
    parser.add_argument("--version", action="version", version=f"logsluice {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "demo", help="log a burst and serve real HTTP traffic through the pipeline, then report"
    )
    p.add_argument(
        "--records", type=int, default=100_000, help="application records in the burst (default 100000)"
    )
    p.add_argument("--requests", type=int, default=200, help="rounds of HTTP traffic (default 200)")
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
