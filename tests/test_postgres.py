"""The PostgreSQL destination against a real PostgreSQL 15 (tests/harness/postgres.py)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import multiprocessing
import os
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import logsluice
import psycopg
import pytest
from harness.postgres import APP_DB, SUPERUSER
from logfiles import read_records
from logsluice.postgres import parse_duration
from support import close_with_a_write_in_io, wait_for

SECRET = "s3cret-Hunter2"


@pytest.fixture
def table():
    """A fresh table name per test: the PostgreSQL server is shared by the session."""
    return f"t_{uuid.uuid4().hex[:12]}"


def log_at(pipeline, when, message):
    """A stdlib record stamped `when` (its `created`), as a late or replayed record would be."""
    record = logging.LogRecord("test.pg.at", logging.INFO, __file__, 1, message, None, None)
    record.created = when.timestamp()
    pipeline.logging_handler().handle(record)


def relnames(postgres, prefix):
    rows = postgres.psql("select relname::text from pg_class where relname like %s", (prefix + "%",))
    return {r[0] for r in rows}


def count(postgres, table, where="true", distinct=False):
    what = "distinct message" if distinct else "*"
    return postgres.psql(f"select count({what}) from {table} where {where}")[0][0]


def accounted(stats):
    s = stats
    return s["accepted"] == s["written"] + s["dropped_total"] + s["spilled"] + s["in_flight"]


def test_rows_land_with_the_right_columns_and_types(postgres, table, loguru):
    pipeline = logsluice.Pipeline(logsluice.Postgres(postgres.dsn, table=table))
    pipeline.attach(loguru, level="DEBUG")
    loguru.bind(user="ada", n=3, request_id="req-1").warning("hello {}", "world")
    try:
        _ = 1 / 0
    except ZeroDivisionError:
        loguru.exception("it broke")
    std = logging.getLogger("test.pg.std")
    std.propagate = False
    std.addHandler(pipeline.logging_handler())
    std.error("from %s", "stdlib", extra={"order": 7})
    pipeline.flush(30)
    pipeline.close()

    rows = postgres.psql(
        f"select level, level_no, kind, logger, message, module, function, line, process, thread,"
        f" exception, request_id, fields, method, status from {table} order by id"
    )
    assert len(rows) == 3
    level, level_no, kind, _, message, module, function, line, process, thread, exc, rid, fields, m, st = (
        rows[0]
    )
    assert (level, level_no, kind, message, rid) == ("WARNING", 30, "app", "hello world", "req-1")
    assert fields == {"user": "ada", "n": 3}
    assert (module, function) == ("test_postgres", "test_rows_land_with_the_right_columns_and_types")
    assert line > 0 and process > 0 and thread != 0 and exc is None and m is None and st is None
    assert "ZeroDivisionError" in rows[1][10] and rows[1][0] == "ERROR"
    assert rows[2][:5] == ("ERROR", 40, "app", "test.pg.std", "from stdlib")
    assert rows[2][12] == {"order": 7}
    types = dict(
        postgres.psql(
            "select attname::text, format_type(atttypid, atttypmod) from pg_attribute"
            " where attrelid = %s::regclass and attnum > 0 and not attisdropped",
            (table,),
        )
    )
    assert types["id"] == "bigint" and types["ts"] == "timestamp with time zone"
    assert types["level_no"] == "smallint" and types["fields"] == "jsonb"
    assert types["request_headers"] == "jsonb" and types["duration_ms"] == "double precision"
    assert {"method", "path", "route", "status", "client_addr", "user_agent", "request_body"} <= set(types)
    # The timestamp is the record's own, to the microsecond.
    ts = postgres.psql(f"select ts from {table} order by id limit 1")[0][0]
    assert abs(ts - dt.datetime.now(dt.timezone.utc)) < dt.timedelta(minutes=5)
    # Partitioned by kind, then by UTC day; indexes for the common questions.
    parts = relnames(postgres, table)
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d")
    assert {f"{table}_app", f"{table}_http", f"{table}_app_{today}", f"{table}_http_{today}"} <= parts
    want = {"_ts_id", "_request_id", "_trace_id", "_route_ts", "_errors_ts", "_id_brin"}
    assert {f"{table}{suffix}" for suffix in want} <= parts


def test_200k_records_from_threads_arrive_exactly(postgres, table, loguru):
    pipeline = logsluice.Pipeline(
        logsluice.Postgres(
            postgres.dsn, table=table, queue_max_records=400_000, on_full="block", block_timeout=30
        )
    )
    pipeline.attach(loguru)
    threads, per_thread = 4, 50_000

    def work(t):
        bound = loguru.bind(t=t)
        for i in range(per_thread):
            bound.info("record {}", i)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    pipeline.flush(120)
    stats = pipeline.stats()["postgres"]
    pipeline.close()
    total = threads * per_thread
    assert (stats["accepted"], stats["written"], stats["dropped_total"]) == (total, total, 0)
    assert count(postgres, table) == total
    rows = postgres.psql(
        f"select count(distinct (fields->>'t', message)), count(*) filter (where message <> 'record '"
        f" || split_part(message, ' ', 2)), min(fields->>'t'), max(fields->>'t') from {table}"
    )
    assert rows == [(total, 0, "0", str(threads - 1))]


class Unprintable:
    def __repr__(self):
        raise RuntimeError("no repr")


def test_every_nasty_input_reaches_the_table(postgres, table, loguru):
    pipeline = logsluice.Pipeline(logsluice.Postgres(postgres.dsn, table=table), max_message_bytes=1000)
    pipeline.attach(loguru)
    nasty = [
        ("nul", "a\x00b", {"k\x00ey": "v\x00al"}),
        ("surrogate", "bad \udcff surrogate", {"s": "\ud800"}),
        ("emoji", "😀 ünïcödé ✓ \u202e rtl", {"e": "😀"}),
        ("huge", "x" * 5000, {}),
        ("bytes", "bytes", {"b": b"\xff\xfe\x00binary"}),
        ("object", "object", {"o": Unprintable(), "set": {1, 2}}),
        ("numbers", "numbers", {"big": 2**80, "nan": float("nan"), "inf": float("-inf")}),
        ("deep", "deep", {"d": functools_deep(40)}),
        ("quotes", "'; drop table logs; -- \"\\", {"sql": "'\"\\"}),
        ("control", "\r\n\t\x1b[31mred\x07", {"c": "\x01\x02"}),
        ("empty", "", {}),
    ]
    for tag, message, extra in nasty:
        loguru.bind(tag=tag, **extra).opt(raw=False).info("{}", message)
    pipeline.flush(30)
    stats = pipeline.stats()["postgres"]
    pipeline.close()
    assert stats["written"] == len(nasty) and stats["dropped_total"] == 0
    rows = {r[0]: (r[1], r[2]) for r in postgres.psql(f"select fields->>'tag', message, fields from {table}")}
    assert set(rows) == {t for t, _, _ in nasty}
    assert rows["nul"][0] == "ab" and rows["nul"][1]["key"] == "val"
    assert "\ufffd" in rows["surrogate"][0]
    assert rows["emoji"][0] == "😀 ünïcödé ✓ \u202e rtl"
    assert rows["huge"][0].startswith("x" * 1000) and "truncated, 5000 bytes" in rows["huge"][0]
    assert rows["quotes"][0] == "'; drop table logs; -- \"\\"
    assert rows["control"][0] == "\r\n\t\x1b[31mred\x07"
    assert rows["numbers"][1]["big"] == str(2**80)
    assert rows["object"][1]["o"].startswith("<unrepresentable") and rows["object"][1]["set"] == "{1, 2}"
    assert count(postgres, table) == len(nasty)


def functools_deep(n):
    d = {}
    for _ in range(n):
        d = {"d": d}
    return d


def test_poisoned_batch_writes_all_its_good_rows(postgres, table, loguru, tmp_path):
    dead = tmp_path / "dead"
    pipeline = logsluice.Pipeline(
        logsluice.Postgres(postgres.dsn, table=table, dead_letter_dir=dead, batch_max_delay=60)
    )
    pipeline.attach(loguru)
    loguru.info("create the table first")
    pipeline.flush(30)
    # A constraint the data can violate: PostgreSQL refuses those rows (SQLSTATE 23514).
    postgres.psql(f"alter table {table} add constraint no_poison check (message not like '%POISON%')")
    bad = set(range(7, 2000, 61))  # 33 offenders: line hints first, then halving
    for i in range(2000):
        loguru.info("POISON {}" if i in bad else "good {}", i)
    pipeline.flush(60)
    stats = pipeline.stats()["postgres"]
    pipeline.close()
    assert stats["dropped"]["invalid"] == len(bad)
    assert stats["written"] == 1 + 2000 - len(bad) and stats["dropped_total"] == len(bad)
    assert count(postgres, table, "message like 'good %'") == 2000 - len(bad)
    assert count(postgres, table, "message like 'POISON%'") == 0
    lines = [json.loads(line) for f in dead.iterdir() for line in f.read_text().splitlines()]
    assert sorted(int(r["message"].split()[1]) for r in lines) == sorted(bad)
    assert all("no_poison" in r["logsluice_error"] and "23514" in r["logsluice_error"] for r in lines)


def test_an_outage_past_the_breaker_loses_nothing(postgres, table, loguru):
    destination = logsluice.Postgres(
        postgres.dsn,
        table=table,
        batch_max_delay=0.05,
        max_retries=1,
        retry_initial=0.05,
        retry_max=0.1,
        breaker_threshold=3,
        breaker_cooldown=1.0,
        connect_timeout=2,
    )
    pipeline = logsluice.Pipeline(destination)
    pipeline.attach(loguru)
    loguru.info("before")
    pipeline.flush(30)
    postgres.stop()
    try:
        # The app keeps logging; every call returns (no exception, nothing waits on the DB).
        for i in range(60):
            loguru.info("during {}", i)
        wait_for(lambda: pipeline.stats()["postgres"]["breaker"] == "open", what="the breaker to open")
        with pytest.raises(TimeoutError, match="postgres: 60 records"):
            pipeline.flush(0.5)
        stats = pipeline.stats()["postgres"]
        assert stats["dropped_total"] == 0 and stats["in_flight"] == 60
        assert stats["last_error"] and SECRET not in stats["last_error"]
    finally:
        postgres.start()
    # The probe after the cooldown writes the held batch, then everything queued behind it.
    pipeline.flush(60)
    loguru.info("after")
    pipeline.close()
    stats = pipeline.stats()["postgres"]
    assert accounted(stats) and stats["in_flight"] == 0
    assert stats["written"] == 62 and stats["dropped_total"] == 0 and stats["breaker"] == "closed"
    rows = [r[0] for r in postgres.psql(f"select message from {table} order by id")]
    assert rows == ["before", *(f"during {i}" for i in range(60)), "after"]


def test_server_restart_is_survived_without_loss(postgres, table, loguru):
    pipeline = logsluice.Pipeline(logsluice.Postgres(postgres.dsn, table=table, batch_max_delay=0.05))
    pipeline.attach(loguru)
    loguru.info("one")
    pipeline.flush(30)
    postgres.stop(mode="immediate")
    postgres.start()
    # The old connection is dead; the first attempt fails, the retry reconnects.
    loguru.info("two")
    pipeline.flush(60)
    stats = pipeline.stats()["postgres"]
    pipeline.close()
    assert stats["written"] == 2 and stats["dropped_total"] == 0
    assert sorted(r[0] for r in postgres.psql(f"select message from {table}")) == ["one", "two"]


def test_wrong_password_clear_error_no_secret_no_spin(postgres, table, loguru, caplog):
    dsn = postgres.dsn_with(password=SECRET)
    destination = logsluice.Postgres(dsn, table=table, batch_max_delay=0.05)
    assert SECRET not in repr(destination) and SECRET not in destination.dsn
    pipeline = logsluice.Pipeline(destination)
    assert SECRET not in repr(pipeline)
    pipeline.attach(loguru)
    with caplog.at_level(logging.INFO, logger="logsluice"):
        for i in range(3):
            loguru.info("lost {}", i)
            pipeline.flush(30)
    stats = pipeline.stats()["postgres"]
    pipeline.close()
    assert "password authentication failed" in stats["last_error"]
    assert "28P01" in stats["last_error"] and "app:***@127.0.0.1" in stats["last_error"]
    assert SECRET not in str(stats)
    assert stats["retries"] == 0, "a permanent error must not be retried"
    assert stats["dropped"]["failed"] == 3 and accounted(stats)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "password authentication failed" in logged and SECRET not in logged


def test_missing_database_is_permanent(postgres, table, loguru):
    pipeline = logsluice.Pipeline(logsluice.Postgres(postgres.dsn_with(db="nope"), table=table))
    pipeline.attach(loguru)
    loguru.info("x")
    pipeline.flush(30)
    stats = pipeline.stats()["postgres"]
    pipeline.close()
    assert 'database "nope" does not exist' in stats["last_error"] and stats["retries"] == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"table": 'logs"; drop table x; --'},
        {"table": "lo'gs"},
        {"table": "logs;"},
        {"table": "1logs"},
        {"table": "x" * 49},
        {"schema": "pub lic"},
        {"schema": 'a"b'},
    ],
)
def test_bad_identifiers_are_refused_at_construction(kwargs):
    with pytest.raises(ValueError, match="letters, digits and underscores|at most"):
        logsluice.Postgres("postgresql://app:pw@127.0.0.1:5432/app", **kwargs)


def test_a_mostly_bad_batch_keeps_its_good_rows_when_isolation_runs_out_of_time(
    postgres, table, loguru, tmp_path
):
    # Isolation takes round trips per bad row: when they outlast its time (4 attempts),
    # the good rows found are committed and the rest counted invalid, never all lost.
    dead = tmp_path / "dead"
    destination = logsluice.Postgres(
        postgres.dsn, table=table, dead_letter_dir=dead, batch_max_delay=60, attempt_timeout=0.5
    )
    pipeline = logsluice.Pipeline(destination)
    pipeline.attach(loguru)
    loguru.info("create the table first")
    pipeline.flush(30)
    postgres.psql(f"alter table {table} add constraint no_poison check (message not like '%POISON%')")
    for i in range(4000):
        loguru.info("POISON {}" if i % 2 else "good {}", i)
    pipeline.flush(120)
    stats = pipeline.stats()["postgres"]
    pipeline.close()
    good = count(postgres, table, "message like 'good %'")
    assert 0 < good <= 2000 and count(postgres, table, "message like 'POISON%'") == 0
    assert stats["dropped"]["failed"] == 0 and stats["retries"] == 0
    assert stats["written"] == 1 + good and stats["dropped"]["invalid"] == 4000 - good and accounted(stats)
    assert count(postgres, table, "message like 'good %'", distinct=True) == good  # none twice
    lines = [json.loads(line) for f in dead.iterdir() for line in f.read_text().splitlines()]
    assert len(lines) == 4000 - good
    # The time limit is what ended it (not a finished isolation that happened to be quick).
    assert any(r["logsluice_error"] == "not isolated within the time limit" for r in lines)


def test_a_copy_outliving_its_attempt_is_not_committed_beside_the_retry(postgres, table, loguru):
    destination = logsluice.Postgres(
        postgres.dsn, table=table, attempt_timeout=1.0, retry_initial=0.1, retry_max=0.2, max_retries=5
    )
    pipeline = logsluice.Pipeline(destination)
    pipeline.attach(loguru)
    loguru.info("warm-up")
    pipeline.flush(30)
    # A transaction holding the lock until the block ends.
    with psycopg.connect(host=str(postgres.dir), port=postgres.port, user=SUPERUSER, dbname=APP_DB) as conn:
        # Today's partition: the COPY starts, takes the rows, then waits routing them.
        today = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d")
        conn.execute(f"LOCK TABLE {table}_app_{today} IN ACCESS EXCLUSIVE MODE")
        loguru.info("only once")
        time.sleep(3)  # attempts time out while their COPY waits for the lock
    pipeline.flush(30)
    pipeline.close()
    assert sorted(r[0] for r in postgres.psql(f"select message from {table}")) == ["only once", "warm-up"]


def test_construction_validates_and_masks():
    with pytest.raises(ValueError) as e:
        logsluice.Postgres(f"mysql://app:{SECRET}@h/db")
    assert SECRET not in str(e.value)
    with pytest.raises(ValueError, match="partition"):
        logsluice.Postgres("postgresql://h/db", partition="month")
    with pytest.raises(ValueError, match="retention"):
        logsluice.Postgres("postgresql://h/db", retention={"jobs": "1d"})
    with pytest.raises(ValueError, match="retention"):
        logsluice.Postgres("postgresql://h/db", retention="soon")
    assert parse_duration("7d") == 7 * 86400 and parse_duration("12h") == 43200
    assert parse_duration(dt.timedelta(hours=1)) == 3600 and parse_duration(2) == 2 * 86400
    d = logsluice.Postgres(f"postgresql://app:{SECRET}@h/db?password={SECRET}")
    assert SECRET not in repr(d) and SECRET not in d.dsn
    assert d._spec()["target"]["dsn"].count(SECRET) == 2
    # Passwords holding URL delimiters unencoded are masked too.
    for odd in ("pa/ss", "pa?ss", "pa#ss", "12345/abc"):
        dsn = f"postgresql://app:{odd}@db:5432/app"
        try:
            shown = repr(logsluice.Postgres(dsn))
        except ValueError as e:
            shown = str(e)
        assert odd not in shown and odd.split("/")[-1] not in shown.split("@")[0], shown
        with pytest.raises(Exception) as raised:
            logsluice.Reader(dsn).query()
        assert odd not in str(raised.value)
    with pytest.raises(ValueError, match="finite"):
        logsluice.Postgres("postgresql://h/db", retention=float("inf"))


def worker_creates_and_writes(dsn, table, barrier, n):
    import logsluice as ls
    from loguru import logger as lg

    lg.remove()
    pipeline = ls.Pipeline(ls.Postgres(dsn, table=table))
    pipeline.attach(lg)
    barrier.wait()
    for i in range(n):
        lg.info("p {}", i)
    pipeline.flush(60)
    stats = pipeline.stats()["postgres"]
    pipeline.close()
    raise SystemExit(0 if stats["written"] == n and stats["dropped_total"] == 0 else 1)


def test_eight_processes_create_the_schema_at_once(postgres, table):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(8)
    args = (postgres.dsn, table, barrier, 500)
    procs = [ctx.Process(target=worker_creates_and_writes, args=args) for _ in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 8
    assert count(postgres, table) == 8 * 500


def test_retention_drops_old_partitions_and_keeps_today(postgres, table, loguru):
    now = dt.datetime.now(dt.timezone.utc)
    days_ago = {d: (now - dt.timedelta(days=d)) for d in (0, 3, 10)}

    # Create the table (and today's partitions), then plant an old http partition by hand.
    setup = logsluice.Pipeline(logsluice.Postgres(postgres.dsn, table=table))
    setup.attach(loguru)
    loguru.info("setup")
    setup.flush(30)
    setup.close()
    loguru.remove()
    old_http = (now - dt.timedelta(days=3)).date()
    name = f"{table}_http_{old_http:%Y%m%d}"
    postgres.psql(
        f"create table {name} partition of {table}_http for values from ('{old_http}') to"
        f" ('{old_http + dt.timedelta(days=1)}')"
    )
    pipeline = logsluice.Pipeline(
        logsluice.Postgres(postgres.dsn, table=table, retention={"app": "7d", "http": "1d"})
    )
    pipeline.attach(loguru)
    for d, when in days_ago.items():
        log_at(pipeline, when, f"app {d} days ago")
    pipeline.flush(30)
    stats = pipeline.stats()["postgres"]
    pipeline.close()
    assert stats["written"] == 3
    parts = relnames(postgres, table)
    day = lambda d: f"{(now - dt.timedelta(days=d)).date():%Y%m%d}"  # noqa: E731
    assert f"{table}_app_{day(0)}" in parts and f"{table}_http_{day(0)}" in parts
    assert f"{table}_app_{day(3)}" in parts, "within the 7 days of app"
    assert f"{table}_app_{day(10)}" not in parts, "older than 7 days: dropped"
    assert name not in parts, "http keeps only 1 day"
    messages = {r[0] for r in postgres.psql(f"select message from {table}")}
    assert messages == {"setup", "app 0 days ago", "app 3 days ago"}


def test_create_table_false_says_what_is_missing(postgres, table, loguru):
    postgres.psql(f"create table {table} (id bigserial, ts timestamptz, message text)")
    postgres.psql(f"grant all on {table} to app")
    pipeline = logsluice.Pipeline(logsluice.Postgres(postgres.dsn, table=table, create_table=False))
    pipeline.attach(loguru)
    loguru.info("x")
    pipeline.flush(30)
    stats = pipeline.stats()["postgres"]
    pipeline.close()
    err = stats["last_error"]
    assert f"public.{table} (create_table=False) is missing columns:" in err
    assert "level text" in err and "level_no smallint" in err and "fields jsonb" in err
    assert "message text" not in err and "ts timestamptz" not in err
    assert stats["retries"] == 0 and count(postgres, table) == 0


def test_create_table_false_missing_table(postgres, table, loguru):
    pipeline = logsluice.Pipeline(logsluice.Postgres(postgres.dsn, table=table, create_table=False))
    pipeline.attach(loguru)
    loguru.info("x")
    pipeline.flush(30)
    err = pipeline.stats()["postgres"]["last_error"]
    pipeline.close()
    assert f"table public.{table} does not exist and create_table=False" in err


def test_an_older_table_is_migrated_forward_never_dropped(postgres, table, loguru):
    postgres.psql(
        f"create table {table} (id bigserial, ts timestamptz not null, level text, level_no smallint,"
        f" kind text, message text); alter table {table} owner to app"
    )
    postgres.psql(
        f"insert into {table} (ts, level, level_no, kind, message) values (now(), 'INFO', 20, 'app', 'old')"
    )
    pipeline = logsluice.Pipeline(logsluice.Postgres(postgres.dsn, table=table))
    pipeline.attach(loguru)
    loguru.bind(k=1).warning("new")
    pipeline.flush(30)
    stats = pipeline.stats()["postgres"]
    pipeline.close()
    assert stats["written"] == 1
    rows = postgres.psql(f"select message, fields, request_headers from {table} order by id")
    assert rows == [("old", None, None), ("new", {"k": 1}, None)]


def test_plain_table_without_partitions(postgres, table, loguru):
    destination = logsluice.Postgres(postgres.dsn, table=table, partition=None, retention="1d")
    pipeline = logsluice.Pipeline(destination)
    pipeline.attach(loguru)
    log_at(pipeline, dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=2), "old")
    pipeline.flush(30)
    loguru.info("new")
    pipeline.flush(30)
    pipeline.close()
    assert postgres.psql(f"select relkind::text from pg_class where relname = '{table}'") == [("r",)]
    # Retention ran right after the first write (it deletes in chunks on a plain table).
    assert {r[0] for r in postgres.psql(f"select message from {table}")} == {"new"}


def test_a_table_numbered_by_int4_is_read_and_a_retention_beyond_the_calendar_keeps_all(
    postgres, table, loguru
):
    # The owner's table: ids as `integer` (serial). A retention of a billion days is "forever",
    # not an overflow that kills the writer.
    pipeline = logsluice.Pipeline(
        logsluice.Postgres(postgres.dsn, table=table, partition=None, retention="1000000000d")
    )
    pipeline.attach(loguru)
    loguru.info("first")
    pipeline.flush(30)
    postgres.psql(f"alter table {table} alter column id type integer")
    loguru.info("second")
    pipeline.flush(30)
    stats = pipeline.stats()["postgres"]
    pipeline.close()
    assert stats["written"] == 2 and accounted(stats)
    records = logsluice.Reader(postgres.dsn, table=table).query(order="asc").records
    assert [r["message"] for r in records] == ["first", "second"]


def test_reader_errors_give_the_server_message_and_sqlstate(postgres, table):
    with pytest.raises(RuntimeError) as raised:
        logsluice.Reader(postgres.dsn, table=table).query()  # never created
    message = str(raised.value)
    assert "does not exist" in message and "SQLSTATE 42P01" in message and " at line " not in message


def test_routing_everything_to_files_warnings_to_postgres(postgres, table, loguru, tmp_logs):
    pipeline = logsluice.Pipeline(
        logsluice.LocalFiles(tmp_logs),
        logsluice.Postgres(postgres.dsn, table=table, min_level="WARNING"),
    )
    pipeline.attach(loguru, level="DEBUG")
    loguru.debug("d")
    loguru.info("i")
    loguru.warning("w")
    loguru.error("e")
    pipeline.flush(30)
    stats = pipeline.stats()
    pipeline.close()
    assert stats["local_files"]["written"] == 4 and stats["postgres"]["written"] == 2
    assert sorted(r[0] for r in postgres.psql(f"select message from {table}")) == ["e", "w"]


def test_from_env(monkeypatch, postgres):
    monkeypatch.setenv("LOGSLUICE_POSTGRES_DSN", postgres.dsn_with(password=SECRET))
    monkeypatch.setenv("LOGSLUICE_POSTGRES_TABLE", "env_logs")
    monkeypatch.setenv("LOGSLUICE_POSTGRES_MIN_LEVEL", "warning")
    monkeypatch.setenv("LOGSLUICE_POSTGRES_RETENTION", "app=7d,http=1d")
    monkeypatch.delenv("LOGSLUICE_DIR", raising=False)
    pipeline = logsluice.Pipeline.from_env()
    (d,) = [d for d in pipeline.destinations if isinstance(d, logsluice.Postgres)]
    assert (d.table, d.min_level, d.retention) == ("env_logs", 30, {"app": 7 * 86400.0, "http": 86400.0})
    assert SECRET not in repr(pipeline)
    pipeline.close()


def run_rust_real_server_test(name: str, postgres, table: str, **env: str) -> None:
    """Runs one of the PostgreSQL writer's real-server Rust tests (src/destinations/postgres/
    mod.rs) against this server and table; `env` says which (each runs only when named)."""
    env = {**os.environ, "LOGSLUICE_TEST_PG_DSN": postgres.dsn, "LOGSLUICE_TEST_PG_TABLE": table, **env}
    test = f"destinations::postgres::tests::{name}"
    cmd = ["cargo", "test", "--release", "--lib", "--quiet", test, "--", "--exact"]
    run = subprocess.run(
        cmd, check=False, cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    # A filter that names no test passes with nothing run.
    assert "1 passed" in run.stdout, run.stdout


def test_http_records_fill_the_http_columns(postgres, table):
    # http records come from the ASGI middleware; the Rust side writes two through the real
    # writer (src/destinations/postgres/mod.rs, real_server_http_records), read back here.
    run_rust_real_server_test("real_server_http_records", postgres, table)
    rows = postgres.psql(
        f"select kind, level_no, request_id, method, scheme, http_version, path, query, route, status,"
        f" duration_ms, ttfb_ms, client_addr, user_agent, trace_id, span_id, request_headers,"
        f" response_headers, request_body, response_body, request_size, response_size, sample_rate,"
        f" error from {table} order by id"
    )
    assert rows[0] == (
        "http", 20, "req-http-1", "GET", "https", "1.1", "/items/7", "q=1", "/items/{id}", 200, 12.5, 3.25,
        "127.0.0.1:5555", "curl/8", "t1", "s1", {"accept": "*/*"}, {"content-type": "application/json"},
        '{"a": 1}', "ok", 8, 2, 0.5, False,
    )  # fmt: skip
    assert rows[1][:4] == ("http", 40, None, "POST") and rows[1][9] == 500 and rows[1][-1] is True
    assert rows[1][11] is None and rows[1][16] is None and rows[1][18] is None
    assert count(postgres, f"{table}_http") == 2 and count(postgres, f"{table}_app") == 0


def test_own_schema_and_mixed_case_table(postgres, loguru):
    name = f"Audit_{uuid.uuid4().hex[:6]}"
    pipeline = logsluice.Pipeline(logsluice.Postgres(postgres.dsn, schema="audit", table=name))
    pipeline.attach(loguru)
    loguru.info("in its own schema")
    pipeline.flush(30)
    pipeline.close()
    assert postgres.psql(f'select message from audit."{name}"') == [("in its own schema",)]


def test_statement_timeout_cuts_a_stuck_copy(postgres, table, loguru):
    destination = logsluice.Postgres(
        postgres.dsn,
        table=table,
        statement_timeout=0.5,
        max_retries=0,
        batch_max_delay=0.05,
        breaker_cooldown=0.5,
    )
    pipeline = logsluice.Pipeline(destination)
    pipeline.attach(loguru)
    loguru.info("first")
    pipeline.flush(30)
    postgres.psql(
        "create function slow() returns trigger language plpgsql as $$"
        " begin perform pg_sleep(3); return new; end $$"
    )
    postgres.psql(f"create trigger slow before insert on {table} for each row execute function slow()")
    loguru.info("stuck")
    wait_for(lambda: "57014" in (pipeline.stats()["postgres"]["last_error"] or ""), what="the timeout")
    stats = pipeline.stats()["postgres"]
    assert "statement timeout" in stats["last_error"]
    assert stats["dropped_total"] == 0 and stats["in_flight"] == 1, "held, not dropped"
    postgres.psql(f"drop trigger slow on {table}; drop function slow()")
    loguru.info("after")
    pipeline.flush(30)
    stats = pipeline.stats()["postgres"]
    pipeline.close()
    assert stats["written"] == 3 and stats["dropped_total"] == 0 and accounted(stats)
    assert sorted(r[0] for r in postgres.psql(f"select message from {table}")) == ["after", "first", "stuck"]


def test_maintenance_runs_on_its_schedule_while_idle(postgres, table, loguru):
    destination = logsluice.Postgres(
        postgres.dsn, table=table, retention={"http": "1d"}, maintenance_interval=0.2
    )
    pipeline = logsluice.Pipeline(destination)
    pipeline.attach(loguru)
    loguru.info("one")
    pipeline.flush(30)
    old = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=5)).date()
    name = f"{table}_http_{old:%Y%m%d}"
    postgres.psql(
        f"create table {name} partition of {table}_http for values from ('{old}') to"
        f" ('{old + dt.timedelta(days=1)}')"
    )
    # No record is logged: the idle writer's scheduled maintenance drops the partition.
    wait_for(lambda: name not in relnames(postgres, table), what="retention while idle")
    stats = pipeline.stats()["postgres"]
    pipeline.close()
    assert stats["written"] == 1 and stats["batches"] == 1


def test_too_many_connections_is_retried_then_recovers(postgres, table, loguru):
    destination = logsluice.Postgres(
        postgres.dsn, table=table, max_retries=2, retry_initial=0.01, retry_max=0.05, breaker_cooldown=0.5
    )
    pipeline = logsluice.Pipeline(destination)
    pipeline.attach(loguru)
    postgres.psql("alter role app connection limit 0")
    try:
        loguru.info("refused at first")
        wait_for(lambda: pipeline.stats()["postgres"]["retries"] >= 2, what="retries")
        stats = pipeline.stats()["postgres"]
    finally:
        postgres.psql("alter role app connection limit -1")
    assert "53300" in stats["last_error"] and "too many connections" in stats["last_error"]
    assert stats["dropped_total"] == 0, "transient: retried and held, not dropped"
    loguru.info("accepted")
    pipeline.flush(30)
    stats = pipeline.stats()["postgres"]
    pipeline.close()
    assert stats["written"] == 2 and accounted(stats)
    assert sorted(r[0] for r in postgres.psql(f"select message from {table}")) == [
        "accepted",
        "refused at first",
    ]


def backends(postgres, application_name, where="true"):
    return postgres.psql(
        f"select count(*) from pg_stat_activity where application_name = %s and {where}",
        (application_name,),
    )[0][0]


def test_close_cuts_off_a_connect_to_a_server_that_never_answers(table, loguru):
    # The socket listens but is never served: connections complete in its backlog and the
    # startup handshake hangs, as with a host that swallows packets. Connecting would wait
    # for connect_timeout; close must not, and must count the batch it held.
    with socket.create_server(("127.0.0.1", 0), backlog=64) as silent:
        port = silent.getsockname()[1]
        destination = logsluice.Postgres(
            f"postgresql://app:secret@127.0.0.1:{port}/app",
            table=table,
            batch_max_delay=0.05,
            connect_timeout=60,
            attempt_timeout=60,
        )
        pipeline = logsluice.Pipeline(destination)
        pipeline.attach(loguru)
        for i in range(5):
            loguru.info("never answered {}", i)
        elapsed, stats = close_with_a_write_in_io(pipeline, "postgres")
    assert elapsed < 3.0, f"close took {elapsed:.1f} s"
    assert stats["written"] == 0 and stats["dropped"]["closed"] == 5, stats
    assert stats["dropped_total"] == 5 and stats["in_flight"] == 0 and accounted(stats), stats


def test_a_commit_in_doubt_is_settled_by_its_own_server_only(postgres, table):
    # After a failover, a transaction id of the old server may read "committed" on the new
    # one. The Rust side (real_server_in_doubt_settled_by_its_own_server_only) leaves a
    # batch in doubt on "another server" (sent again) and one on this server (settled by the
    # server as committed: not sent).
    run_rust_real_server_test(
        "real_server_in_doubt_settled_by_its_own_server_only", postgres, table, LOGSLUICE_TEST_PG_DOUBT="1"
    )
    assert [r[0] for r in postgres.psql(f"select message from {table} order by id")] == [
        "first",
        "sent again",
    ]


@pytest.mark.parametrize("max_retries", [3, 0])
def test_a_commit_outliving_its_attempt_is_stored_once(postgres, table, loguru, max_retries):
    # The server runs a deferred trigger at COMMIT that sleeps past the attempt's time limit
    # (the first commit only). The attempt gives up with its COMMIT sent; the server would
    # still commit it after the sleep, beside the retry's copy. The writer ends that commit's
    # server process and asks for its outcome (rolled back) before sending the batch again.
    app = f"ls_{table}"
    destination = logsluice.Postgres(
        postgres.dsn,
        table=table,
        partition=None,
        application_name=app,
        attempt_timeout=1.0,
        max_retries=max_retries,
        retry_initial=0.1,
        retry_max=0.2,
    )
    pipeline = logsluice.Pipeline(destination)
    pipeline.attach(loguru)
    loguru.info("warm-up")
    pipeline.flush(30)
    postgres.psql(
        f"create sequence {table}_commits; grant usage on sequence {table}_commits to app;"
        f" create function {table}_slow() returns trigger language plpgsql as $$"
        f" begin if nextval('{table}_commits') = 1 then perform pg_sleep(3); end if; return null; end $$;"
        f" create constraint trigger slow_commit after insert on {table} deferrable initially deferred"
        f" for each row execute function {table}_slow()"
    )
    loguru.info("only once")
    pipeline.flush(30)
    stats = pipeline.stats()["postgres"]
    pipeline.close()
    # Whatever the server still runs for this writer has ended (committed or not).
    wait_for(lambda: backends(postgres, app) == 0, what="the writer's server processes to end")
    stored = count(postgres, table, "message = 'only once'")
    assert accounted(stats) and stats["in_flight"] == 0
    # With no retry left in the round, the writer still ends the commit and learns it was
    # rolled back; the batch is held and the next round stores it.
    assert stored == 1, f"the batch was stored {stored} times"
    assert stats["written"] == 2 and stats["dropped_total"] == 0 and stats["retries"] >= 1
    assert postgres.psql(f"select last_value >= 1 from {table}_commits")[0][0]


@pytest.mark.parametrize("max_retries", [3, 0])
def test_a_commit_waiting_for_a_standby_that_never_answers_is_stored_once(
    postgres, table, loguru, max_retries
):
    # synchronous_commit waits for a standby that does not exist: each COMMIT is durable
    # on the server but never acknowledged. The writer must not send the batch again; it
    # ends the waiting server process (the transaction stays committed) and counts the
    # batch written.
    app = f"ls_{table}"
    options = dict(partition=None, application_name=app, notify=False)
    warm = logsluice.Pipeline(logsluice.Postgres(postgres.dsn, table=table, **options))
    warm.attach(loguru)
    loguru.info("warm-up")
    warm.close(30)
    loguru.remove()
    destination = logsluice.Postgres(
        postgres.dsn,
        table=table,
        attempt_timeout=1.0,
        max_retries=max_retries,
        retry_initial=0.1,
        retry_max=0.2,
        **options,
    )
    pipeline = logsluice.Pipeline(destination)
    pipeline.attach(loguru)
    postgres.psql("alter system set synchronous_standby_names = 'ghost'")
    postgres.psql("alter system set synchronous_commit = 'on'")
    try:
        postgres.psql("select pg_reload_conf()")
        wait_for(lambda: postgres.psql("show synchronous_standby_names") == [("ghost",)], what="reload")
        loguru.info("only once")
        pipeline.flush(30)
        stats = pipeline.stats()["postgres"]
        # No server process of the writer is left waiting for the standby.
        wait_for(
            lambda: backends(postgres, app, "wait_event = 'SyncRep'") == 0,
            what="no commit left waiting for the standby",
        )
    finally:
        postgres.psql("alter system reset synchronous_standby_names")
        postgres.psql("alter system reset synchronous_commit")
        postgres.psql("select pg_reload_conf()")
    pipeline.close()
    wait_for(lambda: backends(postgres, app) == 0, what="the writer's server processes to end")
    stored = count(postgres, table, "message = 'only once'")
    assert stored == 1, f"the batch was stored {stored} times"
    assert stats["written"] == 1 and stats["dropped_total"] == 0 and accounted(stats), stats


def test_records_on_the_first_and_last_day_get_their_partitions(postgres, table, loguru, tmp_path):
    # The last day's partition ends at 10000-01-01, which chrono writes as +10000-01-01 and
    # PostgreSQL then read as a time zone: the whole batch failed, good records included.
    dead = tmp_path / "dead"
    pipeline = logsluice.Pipeline(logsluice.Postgres(postgres.dsn, table=table, dead_letter_dir=dead))
    pipeline.attach(loguru)
    last = dt.datetime.max.replace(tzinfo=dt.timezone.utc)
    first = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    loguru.info("good 1")
    loguru.patch(lambda r: r.update(time=last)).info("last day")
    loguru.patch(lambda r: r.update(time=first)).info("first day")
    loguru.info("good 2")
    pipeline.flush(30)
    stats = pipeline.stats()["postgres"]
    pipeline.close()
    assert stats["written"] == 4 and stats["dropped_total"] == 0, stats
    assert count(postgres, table) == 4
    assert postgres.psql(f"select ts from {table} where message = 'last day'") == [(last,)]
    assert postgres.psql(f"select ts from {table} where message = 'first day'") == [(first,)]
    assert {f"{table}_app_99991231", f"{table}_app_00010101"} <= relnames(postgres, table)
    assert not dead.exists() or not any(dead.iterdir())


def test_a_batch_spanning_more_days_than_one_transaction_locks_is_written_in_pieces(postgres, table, caplog):
    # A replay of old events with their own times: one record per day for 1,500 days. Making
    # (or writing into) that many partitions in one transaction fills the server's lock table
    # (out of shared memory, 53200): the store is up, the batch is too much for one write.
    # It used to be held for good, everything behind it dropped as queue_full.
    pipeline = logsluice.Pipeline(logsluice.Postgres(postgres.dsn, table=table, max_retries=0))
    handler = pipeline.logging_handler()
    start = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    with caplog.at_level(logging.WARNING, logger="logsluice"):
        for i in range(1500):
            record = logging.LogRecord("replay", logging.INFO, __file__, 1, f"replayed {i}", None, None)
            record.created = (start + dt.timedelta(days=i)).timestamp()
            handler.handle(record)
        handler.handle(logging.LogRecord("app", logging.INFO, __file__, 1, "live", None, None))
        pipeline.flush(300)
    stats = pipeline.stats()["postgres"]
    pipeline.close()
    assert stats["written"] == 1501 and stats["dropped_total"] == 0, stats
    assert count(postgres, table) == 1501
    assert any("too much for one write" in r.getMessage() for r in caplog.records)


def test_days_covered_by_a_partition_made_by_hand_are_written_into_it(postgres, table, loguru):
    # An operator partitions a span by hand (a month, say) under the kind's table: logsluice's
    # own day partition for a day in it would overlap (SQLSTATE 42P17). Its rows go into the
    # hand-made partition instead of costing their batch.
    pipeline = logsluice.Pipeline(logsluice.Postgres(postgres.dsn, table=table, premake_days=0))
    pipeline.attach(loguru)
    loguru.info("today")
    pipeline.flush(30)
    start = dt.date.today() + dt.timedelta(days=20)
    postgres.psql(
        f"create table {table}_app_by_hand partition of {table}_app"
        f" for values from ('{start}') to ('{start + dt.timedelta(days=30)}');"
        f" grant all on {table}_app_by_hand to app"
    )
    when = dt.datetime.combine(start + dt.timedelta(days=3), dt.time(12), tzinfo=dt.timezone.utc)
    loguru.patch(lambda r: r.update(time=when)).info("in the hand-made span")
    loguru.info("today again")
    pipeline.flush(30)
    stats = pipeline.stats()["postgres"]
    pipeline.close()
    assert stats["written"] == 3 and stats["dropped_total"] == 0, stats
    assert postgres.psql(f"select message from {table}_app_by_hand") == [("in the hand-made span",)]
    assert count(postgres, table) == 3


def test_days_no_partition_can_be_made_for_cost_only_their_records(postgres, table, tmp_path):
    # Records from outside Python (whose times are kept within years 1 to 9999) written by
    # the real writer (src/destinations/postgres/mod.rs, real_server_days_without_a_partition):
    # two good ones, one in the year 10000 and one in 29720 BC.
    dead = tmp_path / "dead"
    run_rust_real_server_test(
        "real_server_days_without_a_partition", postgres, table, LOGSLUICE_TEST_PG_DEAD=str(dead)
    )
    assert sorted(r[0] for r in postgres.psql(f"select message from {table}")) == ["good 1", "good 2"]
    lines = [json.loads(line) for f in dead.iterdir() for line in f.read_text().splitlines()]
    assert sorted(r["message"] for r in lines) == ["29720 BC", "year 10000"]
    assert all("outside the years 1 to 9999" in r["logsluice_error"] for r in lines)


def test_times_outside_years_1_to_9999_are_stored_alike_everywhere(postgres, table, loguru, tmp_logs):
    # A time that is not finite or not within years 1 to 9999 becomes the time of
    # conversion; the original is kept in fields. Before, files stored 1970-01-01T00:00:00
    # .775807Z or 5-digit years while PostgreSQL refused the batch.
    pipeline = logsluice.Pipeline(
        logsluice.LocalFiles(tmp_logs), logsluice.Postgres(postgres.dsn, table=table)
    )
    pipeline.attach(loguru)
    handler = pipeline.logging_handler()
    before = dt.datetime.now(dt.timezone.utc)
    created = {"inf": float("inf"), "nan": float("nan"), "1e15": 1e15, "1e30": 10**30, "-1e12": -1e12}
    for name, value in created.items():
        record = logging.LogRecord("test.pg.time", logging.INFO, __file__, 1, name, None, None)
        record.created = value
        record.original_time = "mine"  # a user extra of that name keeps its value
        handler.handle(record)
    late = dt.datetime(9999, 12, 31, 23, 0, tzinfo=dt.timezone(-dt.timedelta(hours=14)))
    loguru.patch(lambda r: r.update(time=late)).info("loguru")
    pipeline.flush(30)
    after = dt.datetime.now(dt.timezone.utc)
    stats = pipeline.stats()
    pipeline.close()
    expected = {
        "inf": "inf",
        "nan": "nan",
        "1e15": "1000000000000000.0",
        "1e30": str(10**30),
        "-1e12": "-1000000000000.0",
        "loguru": "9999-12-31T23:00:00-14:00",
    }
    for name in ("local_files", "postgres"):
        assert stats[name]["written"] == 6 and stats[name]["dropped_total"] == 0, stats[name]
    files = {r["message"]: r for r in read_records(tmp_logs)}
    rows = {m: (ts, f) for m, ts, f in postgres.psql(f"select message, ts, fields from {table}")}
    for message, original in expected.items():
        in_file = files[message]
        ts = dt.datetime.fromisoformat(in_file["ts"].replace("Z", "+00:00"))
        assert before <= ts <= after and len(in_file["ts"]) == 27, in_file["ts"]
        if message == "loguru":
            assert in_file["fields"] == {"original_time": original}
        else:
            assert in_file["fields"] == {"original_time": "mine", "original_time#2": original}
        assert rows[message][0] == ts and rows[message][1] == in_file["fields"]
