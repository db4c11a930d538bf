"""The `logsluice` command line."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Optional

from . import __version__


def demo(args: argparse.Namespace) -> int:
    if getattr(args, "serve", False):
        from ._demo_serve import serve

        return serve(args)
    from ._demo import run

    code = run(args)
    _print_read_commands(args)
    return code


def _print_read_commands(args: argparse.Namespace) -> None:
    """What to type next to see what the demo wrote (same source as Pipeline.from_env())."""
    from .reader import Reader

    try:
        reader = Reader.from_env()
        newest_error = reader.query(min_level="ERROR", limit=1).records
        newest_http = reader.query(kind="http", limit=1).records
    except (ValueError, RuntimeError):
        return
    source = f" --source {args.dir}" if args.dir else ""
    cmd = _command_name()
    print("\nread it back:")
    print(f"  {cmd} query{source} --since 1h --min-level error")
    print(f"  {cmd} query{source} --since 1h --json | head -3")
    print(f"  {cmd} summary{source} --since 1h --by level")
    print(f"  {cmd} tail{source}")
    if newest_error:
        print(f"  {cmd} context{source} {newest_error[0]['id']}")
    if newest_http:
        print(f"  {cmd} request{source} {newest_http[0]['request_id']}")
    else:
        print(f"  {cmd} request{source} latest --status 5xx")


def _command_name() -> str:
    """How to run this CLI from here: `logsluice` when it is on PATH, else the script next
    to this interpreter (a virtualenv nobody activated), as a path relative to here."""
    import shutil

    if shutil.which("logsluice"):
        return "logsluice"
    script = os.path.join(os.path.dirname(sys.executable), "logsluice")
    if not os.path.exists(script):
        return "logsluice"
    relative = os.path.relpath(script)
    return relative if relative.startswith(".") else os.path.join(".", relative)


# -- reading ---------------------------------------------------------------------------

# C0 and C1 controls (ESC, BEL, CSI ...) except tab; newlines are shown as "⏎" in text output.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def json_line(value: Any) -> str:
    """JSON for the terminal: non-ASCII text kept readable, but DEL and the C1 controls (U+007F to
    U+009F, CSI among them) escaped like C0 ones, which JSON always escapes."""
    return re.sub(r"[\x7f-\x9f]", lambda m: f"\\u{ord(m.group()):04x}", json.dumps(value, ensure_ascii=False))


_COLOURS = {
    "TRACE": "2",
    "DEBUG": "36",
    "INFO": "0",
    "SUCCESS": "32",
    "WARNING": "33",
    "ERROR": "31",
    "CRITICAL": "1;31",
}
_TEXT_FILTERS = (
    "since",
    "until",
    "kind",
    "logger",
    "request_id",
    "trace_id",
    "method",
    "route",
    "path",
    "text",
)


class _BadInput(Exception):
    pass


def clean(text: Any) -> str:
    """Log content made safe for a terminal: control characters (escape sequences
    included) replaced, newlines shown as ⏎."""
    s = "" if text is None else str(text)
    return _CONTROL.sub("\ufffd", s.replace("\r\n", "\n").replace("\n", " ⏎ "))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _not_applicable(e: Any) -> str:
    """The Reader's refusal of options, in the CLI's words: ``--table does not apply to a
    directory (LocalFiles) source``."""
    verb = "does" if len(e.names) == 1 else "do"
    return f"{', '.join(_flag(n) for n in e.names)} {verb} not apply to {e.what}"


def _reader(args: argparse.Namespace) -> Any:
    from .reader import Reader, _NotApplicable

    # Every source option given goes to the Reader, which refuses a directory that does not
    # exist (a typo must not look like "no logs") and options that do not apply to the
    # source (--table for a directory must not be ignored).
    options = {
        name: getattr(args, name)
        for name in ("table", "schema", "container")
        if getattr(args, name, None) is not None
    }
    if args.source:
        return Reader(args.source, **options)
    try:
        return Reader._from_env(options, keep_all=True)
    except _NotApplicable as e:
        raise _BadInput(f"{_not_applicable(e)} (the source the environment picks without --source)") from None


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _TEXT_FILTERS:
        value = getattr(args, name, None)
        if value is not None:
            out[name] = value
    if getattr(args, "level", None):
        out["level"] = [x.strip() for x in args.level.split(",") if x.strip()]
    if getattr(args, "min_level", None):
        out["min_level"] = args.min_level
    if getattr(args, "status", None):
        out["status"] = args.status
    if getattr(args, "min_duration_ms", None) is not None:
        out["min_duration_ms"] = args.min_duration_ms
    if getattr(args, "field", None):
        out["fields"] = dict(_parse_field(f) for f in args.field)
    if getattr(args, "exclude", None):
        out["exclude"] = _parse_excludes(args.exclude)
    return out


def _parse_excludes(items: list[str]) -> dict[str, list[str]]:
    """``--exclude route=/health --exclude status=4xx`` -> ``{"route": [...], "status": [...]}``."""
    from .reader import EXCLUDE_NAMES

    out: dict[str, list[str]] = {}
    for text in items:
        name, sep, value = text.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in EXCLUDE_NAMES:
            raise _BadInput(f"--exclude {text!r}: use NAME=VALUE with NAME one of {', '.join(EXCLUDE_NAMES)}")
        out.setdefault(name, []).append(value)
    return out


_FIELD = re.compile(r"^([A-Za-z0-9_.-]+)\s*(!=|>=|<=|=|>|<|\?|!\?|~)\s*(.*)$")


def _field_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _parse_field(text: str) -> tuple[str, Any]:
    """``user.id=42``, ``user.id!=42``, ``n>3``, ``n>=3``, ``n<3``, ``n<=3``, ``key?``
    (exists), ``key!?`` (missing), ``key~a,b`` (in)."""
    m = _FIELD.match(text.strip())
    if not m:
        raise _BadInput(f"--field {text!r}: use path=value, path!=value, path>N, path<N, path? or path~a,b")
    path, op, value = m.groups()
    if op == "=":
        return path, _field_value(value)
    if op == "?":
        return path, {"exists": True}
    if op == "!?":
        return path, {"exists": False}
    if op == "~":
        return path, {"in": [_field_value(v) for v in value.split(",")]}
    names = {"!=": "ne", ">": "gt", ">=": "gte", "<": "lt", "<=": "lte"}
    return path, {names[op]: _field_value(value)}


class _Out:
    def __init__(self, args: argparse.Namespace) -> None:
        self.json = args.json
        self.colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR") and not args.json

    def record(self, r: Any) -> None:
        from .reader import Gap

        if isinstance(r, Gap):
            if self.json:
                print(json.dumps({"gap": r.to_dict()}), flush=True)
            else:
                print(f"-- {r.count} records skipped ({r.since} .. {r.until}) --", flush=True)
            return
        if self.json:
            print(json_line(r), flush=True)
            return
        level = clean(r.get("level"))
        if r.get("kind") == "http":
            duration = r.get("duration_ms") or 0.0
            body = f"{clean(r.get('method'))} {clean(r.get('path'))} {r.get('status')} {duration:.1f}ms"
        else:
            body = clean(r.get("message"))
        rid = f" [{clean(r.get('request_id'))}]" if r.get("request_id") else ""
        line = f"{clean(r.get('ts'))} {level:<8} {clean(r.get('logger'))}{rid}: {body}"
        if r.get("exception"):
            line += f"  ⏎ {clean(r['exception'])[:2000]}"
        if self.colour:
            line = f"\x1b[{_COLOURS.get(level, '0')}m{line}\x1b[0m"
        print(line, flush=True)


def cmd_query(args: argparse.Namespace) -> int:
    reader = _reader(args)
    out = _Out(args)
    page = reader.query(**_filters(args), order=args.order, limit=args.limit, cursor=args.cursor)
    for r in page.records:
        out.record(r)
    if page.next and not args.json:
        more = "partial page (budget ran out)" if page.partial else "more"
        print(f"-- {more}: --cursor {page.next}", file=sys.stderr)
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    reader = _reader(args)
    out = _Out(args)
    filters = _filters(args)
    try:
        for r in reader.tail(poll_interval=args.interval, **filters):
            out.record(r)
    except KeyboardInterrupt:
        pass
    finally:
        reader.close()
    return 0


def cmd_request(args: argparse.Namespace) -> int:
    from .reader import LATEST

    reader = _reader(args)
    out = _Out(args)
    # "latest" (with filters) is the Reader's: it picks the newest matching access record.
    view = reader.request(args.rid, **_filters(args))
    rid = view.request_id
    if view.access is None and not view.records:
        raise _BadInput("no request matches" if rid == LATEST else f"no records for request {clean(rid)}")
    if not args.json:
        if view.access is not None:
            state = ""
        elif view.in_progress:
            state = "in progress (no access record yet)"
        else:
            state = "(no access record: sampled out, excluded or rate limited)"
        print(f"request {clean(rid)} {state}".rstrip())
    for r in ([view.access] if view.access else []) + view.records:
        out.record(r)
    if view.trace:
        if not args.json:
            print(f"-- same trace ({len(view.trace)} records) --")
        for r in view.trace:
            out.record(r)
    return 0


def cmd_context(args: argparse.Namespace) -> int:
    reader = _reader(args)
    out = _Out(args)
    ctx = reader.context(args.record_id, before=args.before, after=args.after, same=args.same)
    for r in ctx["before"]:
        out.record(r)
    if not args.json:
        print("-" * 20 + " this record " + "-" * 20)
    out.record(ctx["record"])
    if not args.json:
        print("-" * 53)
    for r in ctx["after"]:
        out.record(r)
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    reader = _reader(args)
    filters = _filters(args)
    filters.setdefault("since", "24h")
    s = reader.summary(by=args.by, bucket=args.bucket, **filters)
    if args.json:
        print(json_line(s))
        return 0

    def ms(v: Any) -> str:
        return "-" if v is None else f"{v:.1f}"

    head = ["count", "2xx", "4xx", "5xx", "err%", "p50", "p95", "p99"]
    widths = [8, 6, 6, 6, 6, 8, 8, 8]
    print(f"{'group':<40} " + " ".join(f"{h:>{w}}" for h, w in zip(head, widths, strict=False)))
    for g in s["groups"]:
        name = " ".join(clean(v) for v in g["key"].values() if v is not None) or "(none)"
        if g["bucket"]:
            name = f"{g['bucket'][:16]} {name}"
        st = g["status"]
        print(
            f"{name[:40]:<40} {g['count']:>8} {st['2xx']:>6} {st['4xx']:>6} {st['5xx']:>6} "
            f"{100 * g['error_rate']:>5.1f}% {ms(g['p50_ms']):>8} {ms(g['p95_ms']):>8} {ms(g['p99_ms']):>8}"
        )
    if s.get("approximate"):
        print("(percentiles approximate: sampled)")
    if s.get("partial"):
        print("(partial: the scan budget ran out)")
    return 0


def _add_source(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--source",
        help="a PostgreSQL DSN, a directory, an Azure Storage connection string or a container URL "
        "(default: $LOGSLUICE_POSTGRES_DSN, $LOGSLUICE_DIR, the Azure variables, ./logs)",
    )
    p.add_argument("--table", help="PostgreSQL table (default logs)")
    p.add_argument("--schema", help="PostgreSQL schema (default public)")
    p.add_argument("--container", help="Azure Blob container, with a connection string (default logs)")
    p.add_argument("--json", action="store_true", help="one JSON object per line (NDJSON)")


def _add_filters(p: argparse.ArgumentParser, time: bool = True) -> None:
    if time:
        p.add_argument("--since", help="ISO 8601 or an age: 15m, 2h, 7d")
        p.add_argument("--until", help="ISO 8601 or an age")
    p.add_argument("--level", help="exact level(s), comma-separated")
    p.add_argument("--min-level", dest="min_level", help="this level or above")
    p.add_argument("--kind", help="app or http")
    p.add_argument("--logger")
    p.add_argument("--request-id", dest="request_id")
    p.add_argument("--trace-id", dest="trace_id")
    p.add_argument("--method")
    p.add_argument("--route", help="route template, e.g. '/items/{item_id}'")
    p.add_argument("--path", help="path prefix")
    p.add_argument("--status", help="404, 5xx or 500-504")
    p.add_argument("--min-duration-ms", dest="min_duration_ms", type=float)
    p.add_argument("--text", help="case-insensitive substring of the message")
    p.add_argument("--field", action="append", help="user.id=42, n>3, key?, key~a,b (repeatable)")
    p.add_argument(
        "--exclude",
        action="append",
        metavar="NAME=VALUE",
        help="leave out records with this value: route=/health, status=4xx, level=DEBUG, path=/static, "
        "text=ping, also kind, logger, method, request_id (repeatable)",
    )


def _interval(text: str) -> float:
    """``tail --interval``: the Reader's own check of a poll interval (0 would spin)."""
    from .reader import check_poll_interval

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    try:
        return check_poll_interval(value, "the poll interval")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: Optional[list[str]] = None) -> int:
    parser = _Parser(
        prog="logsluice", description="Ship logs to PostgreSQL, Azure Blob and files, and read them back."
    )
    parser.add_argument("--version", action="version", version=f"logsluice {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
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

    p = sub.add_parser("query", help="list records, newest first")
    _add_source(p)
    _add_filters(p)
    p.add_argument("--order", default="desc", help="desc (default) or asc")
    p.add_argument("--limit", type=int, default=100, help="at most 1000 (default 100)")
    p.add_argument("--cursor", help="continue from a previous page")
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("tail", help="follow new records as they land")
    _add_source(p)
    _add_filters(p, time=False)
    p.add_argument("--since", help="start this far back (default: now)")
    # Refused with a message of its own: a tail has no end.
    p.add_argument("--until", help=argparse.SUPPRESS)
    p.add_argument(
        "--interval", type=_interval, default=0.5, help="poll interval in seconds, 0.01 or more (default 0.5)"
    )
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser("request", help="everything about one request")
    p.add_argument(
        "rid", metavar="request_id", help="a request id, or 'latest' (with filters, e.g. --status 5xx)"
    )
    _add_source(p)
    _add_filters(p)
    p.set_defaults(func=cmd_request)

    p = sub.add_parser("context", help="what happened around one record")
    p.add_argument("record_id")
    _add_source(p)
    p.add_argument("--before", type=int, default=20)
    p.add_argument("--after", type=int, default=20)
    p.add_argument("--same", choices=["process", "logger", "request"])
    p.set_defaults(func=cmd_context)

    p = sub.add_parser("summary", help="counts, errors and latency per route (or status, level, ...)")
    _add_source(p)
    _add_filters(p)
    p.add_argument("--by", default="route", help="route, status, level, kind, logger or method")
    p.add_argument("--bucket", help="per time bucket: 1m, 1h")
    p.set_defaults(func=cmd_summary)

    args = parser.parse_args(argv)
    if getattr(args, "records", 1) < 1 or getattr(args, "threads", 1) < 1:
        parser.error("--records and --threads must be positive")
    try:
        return int(args.func(args))
    except (ValueError, _BadInput) as e:
        from .reader import _NotApplicable

        message = _not_applicable(e) if isinstance(e, _NotApplicable) else " ".join(str(e).split())
        print(f"logsluice {args.command}: error: {message}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"logsluice {args.command}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
