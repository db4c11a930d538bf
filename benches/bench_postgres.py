"""Rows per second into the logsluice `logs` table (its real definition, indexes included),
side by side in one run against a local PostgreSQL 15, every figure checked by count(*):

  (a) one INSERT per row                        (b) multi-row INSERT, 100 rows per statement
  (c) INSERT ... SELECT FROM jsonb_populate_recordset, 1000 rows (Vector's postgres sink)
  (d) psycopg3 binary cursor.copy(), 1000 rows per COPY (the best a Python app does by hand)
  (e) server-side COPY ... FROM a file, binary (the limit)
  core: the logsluice core, records pre-built (benches/postgres_copy.rs), per batch size
  loguru: end to end from loguru calls, against Loguru's own per-call cost (a no-op sink)

Run: .venv/bin/python benches/bench_postgres.py [--quick]
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import time
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import _cargo_bench as cargo_bench  # noqa: E402
import logsluice  # noqa: E402
from harness import PostgresServer  # noqa: E402
from loguru import logger  # noqa: E402

QUICK = "--quick" in sys.argv
SCALE = 0.25 if QUICK else 1.0
COLS = [
    "ts",
    "level",
    "level_no",
    "kind",
    "logger",
    "message",
    "module",
    "function",
    "line",
    "process",
    "thread",
    "request_id",
    "fields",
]
TYPES = ["timestamptz", "text", "int2"] + ["text"] * 5 + ["int4", "int4", "int8", "text", "jsonb"]
COL_LIST = ", ".join(COLS)


def rows(n: int, t0: dt.datetime) -> list[tuple]:
    """The rows benches/postgres_copy.rs builds, identical field by field."""
    return [
        (
            t0 + dt.timedelta(microseconds=i),
            "INFO",
            20,
            "app",
            "app.bench",
            f"request handled {i}",
            "bench",
            "handler",
            42,
            1234,
            5678,
            f"req-{i % 1000}",
            {"user_id": i, "path": "/api/items", "ok": True},
        )
        for i in range(n)
    ]


def make_table(pg: PostgresServer, name: str) -> None:
    """A table created by logsluice itself (partitions, indexes), then emptied."""
    pipeline = logsluice.Pipeline(logsluice.Postgres(pg.dsn, table=name))
    std = logging.getLogger(f"bench.setup.{name}")
    std.propagate = False
    std.addHandler(pipeline.logging_handler())
    std.warning("setup")
    pipeline.flush(60)
    pipeline.close()
    pg.psql(f"truncate {name}")


ROUNDS = 1 if QUICK else 3


def timed(pg: PostgresServer, table: str, n: int, fn) -> float:
    """One run into the emptied table, checked by count(*)."""
    pg.psql(f"truncate {table}")
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    got = pg.psql(f"select count(*) from {table}")[0][0]
    assert got == n, f"{table}: {got} rows, expected {n}"
    return n / seconds


def one_insert_per_row(conn, table, data):
    sql = f"insert into {table} ({COL_LIST}) values ({', '.join(['%s'] * len(COLS))})"
    for r in data:
        conn.execute(sql, (*r[:-1], Jsonb(r[-1])))


def multi_row_insert(conn, table, data, per=100):
    one = "(" + ", ".join(["%s"] * len(COLS)) + ")"
    for i in range(0, len(data), per):
        chunk = data[i : i + per]
        sql = f"insert into {table} ({COL_LIST}) values " + ", ".join([one] * len(chunk))
        conn.execute(sql, [v for r in chunk for v in (*r[:-1], Jsonb(r[-1]))])


def populate_recordset(conn, table, data, per=1000):
    source = f"jsonb_populate_recordset(null::{table}, %s)"
    sql = f"insert into {table} ({COL_LIST}) select {COL_LIST} from {source}"
    for i in range(0, len(data), per):
        docs = [dict(zip(COLS, (r[0].isoformat(), *r[1:]), strict=False)) for r in data[i : i + per]]
        conn.execute(sql, (Jsonb(docs),))


def psycopg_copy(conn, table, data, per=1000):
    for i in range(0, len(data), per):
        with conn.cursor() as cur:
            with cur.copy(f"copy {table} ({COL_LIST}) from stdin (format binary)") as copy:
                copy.set_types(TYPES)
                for r in data[i : i + per]:
                    copy.write_row((*r[:-1], Jsonb(r[-1])))


def core_rate(pg: PostgresServer, table: str, n: int, batch: int, t0_us: int) -> float:
    pg.psql(f"truncate {table}")
    settings = {"DSN": pg.dsn, "TABLE": table, "ROWS": str(n), "BATCH": str(batch), "T0_US": str(t0_us)}
    fields = cargo_bench.run("postgres_copy", settings)
    got = pg.psql(f"select count(*) from {table}")[0][0]
    assert got == n + 1 == int(fields["written"]) + 1, f"core: {got} rows, expected {n + 1}"
    return float(fields["rows_per_sec"])


def loguru_rates(pg: PostgresServer, n: int) -> tuple[float, float, float]:
    logger.remove()
    opts = dict(format="{message}", diagnose=False, backtrace=False, enqueue=False, colorize=False)

    class Null:
        def write(self, message):
            pass

    hid = logger.add(Null(), level="INFO", catch=True, **opts)
    start = time.perf_counter()
    for i in range(n):
        logger.info("request handled {}", i)
    noop = n / (time.perf_counter() - start)
    logger.remove(hid)

    table = "bench_loguru"
    pipeline = logsluice.Pipeline(logsluice.Postgres(pg.dsn, table=table, queue_max_records=n + 10))
    pipeline.attach(logger)
    logger.info("warm-up")
    pipeline.flush(60)
    start = time.perf_counter()
    for i in range(n):
        logger.info("request handled {}", i)
    calls_done = time.perf_counter()
    pipeline.flush(600)
    end = time.perf_counter()
    pipeline.close()
    logger.remove()
    got = pg.psql(f"select count(*) from {table}")[0][0]
    assert got == n + 1, f"loguru: {got} rows, expected {n + 1}"
    return noop, n / (calls_done - start), n / (end - start)


def main() -> None:
    cargo_bench.build("postgres_copy")
    n = int(200_000 * SCALE)
    with PostgresServer() as pg:
        t0 = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        t0_us = int(t0.timestamp() * 1e6)
        data = rows(n, t0)
        conn = psycopg.connect(pg.dsn, autocommit=True)
        path = pg.dir / "rows.bin"

        def server_file():
            pg.psql(f"copy bench_e ({COL_LIST}) from '{path}' (format binary)")

        methods = {
            "a": (
                "one INSERT per row",
                int(10_000 * SCALE),
                lambda c: one_insert_per_row(conn, "bench_a", data[:c]),
            ),
            "b": (
                "multi-row INSERT x100",
                int(100_000 * SCALE),
                lambda c: multi_row_insert(conn, "bench_b", data[:c]),
            ),
            "c": (
                "jsonb_populate_recordset x1000",
                int(100_000 * SCALE),
                lambda c: populate_recordset(conn, "bench_c", data[:c]),
            ),
            "d": ("psycopg binary copy() x1000", n, lambda c: psycopg_copy(conn, "bench_d", data[:c])),
            "e": ("server-side COPY FROM file, binary", n, lambda c: server_file()),
        }
        for key in methods:
            make_table(pg, f"bench_{key}")
        for batch in (1_000, 5_000, 10_000, 20_000):
            make_table(pg, f"bench_core_{batch}")
        # The file (e) reads: the same rows, written by the server in binary COPY format.
        psycopg_copy(conn, "bench_d", data)
        pg.psql(f"copy (select {COL_LIST} from bench_d) to '{path}' (format binary)")

        # Rounds interleave every method, so load from elsewhere on the machine hits them
        # alike; each figure is the best of its rounds.
        rate: dict[str, float] = {}
        core: dict[int, float] = {}
        for _ in range(ROUNDS):
            for key, (_, count, fn) in methods.items():
                r = timed(pg, f"bench_{key}", count, lambda fn=fn, count=count: fn(count))
                rate[key] = max(rate.get(key, 0.0), r)
            for batch in (1_000, 5_000, 10_000, 20_000):
                r = core_rate(pg, f"bench_core_{batch}", n, batch, t0_us)
                core[batch] = max(core.get(batch, 0.0), r)
        conn.close()
        for key, (label, count, _) in methods.items():
            print(f"({key}) {label:<34} {rate[key]:>10,.0f} rows/s  ({count} rows)")
        for batch, r in core.items():
            print(f"core, batch_max_records={batch:<6} {r:>19,.0f} rows/s  ({n} rows)")
        best = core[10_000]

        noop, caller, e2e = loguru_rates(pg, int(200_000 * SCALE))
        print(f"loguru calls, no-op sink                {noop:>10,.0f} calls/s")
        print(f"loguru calls, logsluice sink (caller)   {caller:>10,.0f} calls/s")
        print(f"loguru -> logsluice -> PostgreSQL       {e2e:>10,.0f} rows/s  (until flushed, counted)")

        print(f"\nratios (best of {ROUNDS} interleaved rounds; core at the default batch of 10000):")
        print(f"  core / (b) multi-row INSERT   = {best / rate['b']:5.2f}x   (target >= 3x)")
        print(f"  core / (d) psycopg copy       = {best / rate['d']:5.2f}x   (target >= 1.3x)")
        print(f"  core / (e) server-side COPY   = {best / rate['e']:5.2f}x   (target >= 0.6x)")
        print(f"  loguru end-to-end / caller    = {e2e / caller:5.2f}x   (target >= 0.9x)")
        print(f"  loguru end-to-end / no-op     = {e2e / noop:5.2f}x   (Loguru's own per-call cost)")


if __name__ == "__main__":
    main()
