"""logsluice.Reader against records written through the real pipeline into a real
PostgreSQL and LocalFiles (rotated, gzipped) at the same time: every filter gives the same
answer from both stores and from an independent reading of the NDJSON files."""

from __future__ import annotations

import datetime as dt
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid

import logsluice
import psycopg
import pytest
from loguru import logger
from support import pages, shop_traffic, wait_for

N_REQUESTS = 120


def read_ndjson(directory) -> list[dict]:
    """The oracle: every record in the directory, read without logsluice."""
    out = []
    for path in sorted(glob.glob(os.path.join(directory, "*.ndjson*"))):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as fh:
            out.extend(json.loads(line) for line in fh if line.strip())
    return out


class World:
    pass


@pytest.fixture(scope="module")
def world(postgres, tmp_path_factory):
    """One app, one pipeline, two stores: HTTP records from the middleware (FastAPI routes,
    5xx, background tasks) and app records from Loguru with extra fields."""
    w = World()
    w.dir = str(tmp_path_factory.mktemp("reader-logs"))
    w.table = f"r_{uuid.uuid4().hex[:10]}"
    w.dsn = postgres.dsn
    pipeline = logsluice.Pipeline(
        logsluice.Postgres(postgres.dsn, table=w.table, batch_max_delay=0.2),
        logsluice.LocalFiles(w.dir, max_file_bytes=40_000, compress=True, batch_max_records=200),
    )
    w.request_ids = shop_traffic(pipeline, logger, N_REQUESTS)
    pipeline.flush(timeout=30)
    pipeline.close()
    logger.remove()
    w.all = read_ndjson(w.dir)
    assert len(w.all) == sum(1 for _ in w.all)
    w.pg = logsluice.Reader(postgres.dsn, table=w.table)
    w.files = logsluice.Reader(w.dir)
    yield w
    w.pg.close()
    w.files.close()


def key(r):
    return (r["ts"], r["kind"], r["message"], r.get("request_id"), r.get("status"))


def everything(reader, **filters):
    return [r for page in pages(reader, limit=1000, **filters) for r in page.records]


def status_in(lo, hi):
    return lambda r: r.get("status") is not None and lo <= r["status"] <= hi


def field(r, path):
    cur = r.get("fields", {})
    for p in path.split("."):
        if not isinstance(cur, dict) or p not in cur:
            return None
        cur = cur[p]
    return cur


CASES = [
    ({}, lambda r: True),
    ({"level": "ERROR"}, lambda r: r["level"] == "ERROR"),
    ({"level": ["DEBUG", "critical"]}, lambda r: r["level"] in ("DEBUG", "CRITICAL")),
    ({"min_level": "WARNING"}, lambda r: r["level_no"] >= 30),
    ({"min_level": 40}, lambda r: r["level_no"] >= 40),
    ({"kind": "http"}, lambda r: r["kind"] == "http"),
    ({"kind": "app"}, lambda r: r["kind"] == "app"),
    ({"logger": "tests.test_reader"}, lambda r: r["logger"] == "tests.test_reader"),
    ({"method": "post"}, lambda r: r.get("method") == "POST"),
    ({"route": "/items/{item_id}"}, lambda r: r.get("route") == "/items/{item_id}"),
    ({"path": "/fail/"}, lambda r: (r.get("path") or "").startswith("/fail/")),
    ({"status": "5xx"}, status_in(500, 599)),
    ({"status": 200}, status_in(200, 200)),
    ({"status": "200-499"}, status_in(200, 499)),
    ({"min_duration_ms": 0.0}, lambda r: r.get("duration_ms") is not None),
    ({"text": "payment failed"}, lambda r: "payment failed" in r["message"].lower()),
    ({"text": "100% _under_"}, lambda r: "100% _under_" in r["message"].lower()),
    (
        {"text": "<B>ODD</B> 'QUOTES' AND \"MORE\""},
        lambda r: "<b>odd</b> 'quotes' and \"more\"" in r["message"],
    ),  # noqa: E501
    ({"fields": {"user.id": 3}}, lambda r: field(r, "user.id") == 3),
    ({"fields": {"user.name": "u2"}}, lambda r: field(r, "user.name") == "u2"),
    ({"fields": {"nested.deep.x": {"gte": 2}}}, lambda r: (field(r, "nested.deep.x") or -1) >= 2),
    ({"fields": {"n": {"between": [10, 20]}}}, lambda r: 10 <= (field(r, "n") or -1) <= 20),
    ({"fields": {"n": {"lt": 5}}}, lambda r: field(r, "n") is not None and field(r, "n") < 5),
    ({"fields": {"n": {"gt": 295}}}, lambda r: field(r, "n") is not None and field(r, "n") > 295),
    ({"fields": {"cart": {"in": [0, 2]}}}, lambda r: field(r, "cart") in (0, 2)),
    ({"fields": {"cart": {"ne": 1}}, "kind": "app"}, lambda r: r["kind"] == "app" and field(r, "cart") != 1),
    ({"fields": {"task": {"exists": True}}}, lambda r: field(r, "task") is not None),
    ({"fields": {"tags": ["c"]}}, lambda r: field(r, "tags") == ["c"]),
    (
        {"kind": "app", "min_level": "ERROR", "text": "plain"},
        lambda r: r["kind"] == "app" and r["level_no"] >= 40 and "plain" in r["message"],
    ),
]

# Exclusions: a record without the field (an app record has no route) is kept.
CASES += [
    ({"exclude": {"route": "/items/{item_id}"}}, lambda r: r.get("route") != "/items/{item_id}"),
    (
        {"kind": "http", "exclude": {"status": ["5xx", 404]}},
        lambda r: r["kind"] == "http" and r["status"] < 500,
    ),
    ({"exclude": {"status": "200-299"}}, lambda r: not status_in(200, 299)(r)),
    ({"exclude": {"level": ["DEBUG", "info"]}}, lambda r: r["level"] not in ("DEBUG", "INFO")),
    ({"exclude": {"kind": "app"}}, lambda r: r["kind"] != "app"),
    ({"exclude": {"logger": "tests.test_reader"}}, lambda r: r["logger"] != "tests.test_reader"),
    ({"exclude": {"method": "post"}}, lambda r: r.get("method") != "POST"),
    (
        {"exclude": {"path": ["/fail/", "/orders"]}},
        lambda r: not (r.get("path") or "").startswith(("/fail/", "/orders")),
    ),
    (
        {"exclude": {"text": ["PLAIN RECORD", "100% _under_"]}},
        lambda r: "plain record" not in r["message"].lower(),
    ),
    (
        {"route": "/items/{item_id}", "exclude": {"status": "2xx", "level": "ERROR"}},
        lambda r: (
            r.get("route") == "/items/{item_id}" and not status_in(200, 299)(r) and r["level"] != "ERROR"
        ),
    ),
]


@pytest.mark.parametrize("filters,pred", CASES, ids=[json.dumps(c[0]) for c in CASES])
def test_every_filter_same_answer_from_postgres_files_and_the_oracle(world, filters, pred):
    want = sorted(key(r) for r in world.all if pred(r))
    got_files = everything(world.files, **filters)
    got_pg = everything(world.pg, **filters)
    assert sorted(key(r) for r in got_files) == want
    assert sorted(key(r) for r in got_pg) == want
    # Newest first, ids unique, same shape from both stores.
    assert [r["ts"] for r in got_pg] == sorted((r["ts"] for r in got_pg), reverse=True)
    assert len({r["id"] for r in got_files}) == len(got_files)
    if got_pg:
        assert set(got_pg[0]) == set(next(r for r in got_files if r["ts"] == got_pg[0]["ts"]))


def test_exclude_request_ids_and_cursor_identity(world):
    gone = [world.request_ids[3], world.request_ids[7]]
    want = sorted(key(r) for r in world.all if r.get("request_id") not in gone)
    for reader in (world.pg, world.files):
        assert sorted(key(r) for r in everything(reader, exclude={"request_id": gone})) == want
        # Same exclusions in another order: the same query, so its cursor is accepted...
        page = reader.query(limit=5, exclude={"request_id": gone})
        again = reader.query(limit=5, cursor=page.next, exclude={"request_id": gone[::-1]})
        assert {r["id"] for r in again.records}.isdisjoint(r["id"] for r in page.records)
        # ...while a cursor of the query without them is refused.
        with pytest.raises(ValueError, match="cursor"):
            reader.query(limit=5, cursor=page.next)
        for attempt in INJECTIONS[:-1]:
            attempt = attempt.replace("{t}", world.table)
            exclude = {name: attempt for name in ("logger", "route", "path", "text", "request_id")}
            assert len(everything(reader, exclude=exclude)) == len(world.all)


def test_filters_request_trace_and_time_bounds(world):
    rid = world.request_ids[3]
    for reader in (world.pg, world.files):
        recs = everything(reader, request_id=rid)
        assert {r["kind"] for r in recs} == {"http", "app"}
        middle = sorted(world.all, key=lambda r: r["ts"])[len(world.all) // 2]["ts"]
        before = everything(reader, until=middle)
        after = everything(reader, since=middle)
        assert len(before) + len(after) == len(world.all) + 1  # `middle` is in both
        assert everything(reader, since="1h") and not everything(reader, until="2000-01-01")
        asc = reader.query(order="asc", limit=5).records
        assert [r["ts"] for r in asc] == sorted(r["ts"] for r in world.all)[:5]


def test_keyset_pages_are_disjoint_and_complete(world):
    for reader in (world.pg, world.files):
        seen, count = [], 0
        for page in pages(reader, limit=37):
            seen.extend(r["id"] for r in page.records)
            count += 1
        assert len(seen) == len(set(seen)) == len(world.all)
        assert count == -(-len(world.all) // 37) or count == -(-len(world.all) // 37) + 1


def test_a_request_without_access_record_is_in_progress_only_while_recent():
    from logsluice.reader import RequestView

    def at(seconds_ago):
        when = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=seconds_ago)
        return {"ts": when.isoformat().replace("+00:00", "Z"), "message": "m"}

    assert RequestView("r", None, [at(2)], []).in_progress
    # Long over and never recorded: sampled out, excluded or rate limited.
    assert not RequestView("r", None, [at(3600)], []).in_progress
    assert not RequestView("r", {"status": 200}, [at(2)], []).in_progress


def test_request_view_with_background_task(world):
    rid = world.request_ids[10]  # /items/10 schedules a background task
    for reader in (world.pg, world.files):
        view = reader.request(rid)
        assert view.access is not None and view.access["status"] == 200
        assert view.access["route"] == "/items/{item_id}"
        messages = [r["message"] for r in view.records]
        assert messages == ["Loaded item 10", "background task for item 10"]
        assert not view.in_progress
        failed = reader.request(world.request_ids[7])
        assert failed.access["status"] == 500
        assert any("Payment FAILED" in r["message"] for r in failed.records)
        assert reader.request("no-such-request").access is None
    assert world.pg.latest_request(status="5xx") == world.files.latest_request(status="5xx")


def test_context_neighbours_regardless_of_level(world):
    ordered = sorted((r for r in world.all), key=lambda r: r["ts"])
    target = next(r for r in ordered if r["message"].startswith("plain record 150 "))
    i = ordered.index(target)
    for reader in (world.pg, world.files):
        rec = reader.query(text="plain record 150 ").records[0]
        ctx = reader.context(rec["id"], before=3, after=4)
        assert ctx["record"]["message"] == target["message"]
        assert [r["message"] for r in ctx["before"]] == [r["message"] for r in ordered[i - 3 : i]]
        assert [r["message"] for r in ctx["after"]] == [r["message"] for r in ordered[i + 1 : i + 5]]
        levels = {r["level"] for r in ctx["before"] + ctx["after"]}
        assert len(levels) > 1  # not narrowed by level
        same = reader.context(rec["id"], before=2, after=2, same="logger")
        assert all(r["logger"] == rec["logger"] for r in same["before"] + same["after"])
        with pytest.raises(ValueError):
            reader.context("999999999999" if reader is world.pg else "nope.ndjson:1")


def test_summary_by_route_matches_counts(world):
    http = [r for r in world.all if r["kind"] == "http"]
    for reader in (world.pg, world.files):
        s = reader.summary(since="1h", by="route")
        groups = {(g["key"]["route"], g["key"]["method"]): g for g in s["groups"]}
        for (route, method), g in groups.items():
            mine = [r for r in http if r.get("route") == route and r["method"] == method]
            assert g["count"] == len(mine)
            assert g["status"]["5xx"] == sum(1 for r in mine if r["status"] >= 500)
            assert g["errors"] == g["status"]["5xx"]
            durations = sorted(r["duration_ms"] for r in mine)
            assert g["max_ms"] == pytest.approx(durations[-1])
            assert durations[0] <= g["p50_ms"] <= g["p95_ms"] <= g["p99_ms"] <= durations[-1]
            assert g["slowest"][0]["duration_ms"] == pytest.approx(durations[-1])
        assert sum(g["count"] for g in groups.values()) == len(http)
        by_level = reader.summary(since="1h", by="level")
        counts = {g["key"]["level"]: g["count"] for g in by_level["groups"]}
        assert counts["ERROR"] == sum(1 for r in world.all if r["level"] == "ERROR")
        buckets = reader.summary(since="1h", by="level", bucket="1m")
        assert sum(g["count"] for g in buckets["groups"]) == len(world.all)
    a = world.pg.summary(by="route")["groups"]
    b = world.files.summary(by="route")["groups"]
    assert {json.dumps(g["key"]): g["p50_ms"] for g in a} == pytest.approx(
        {json.dumps(g["key"]): g["p50_ms"] for g in b}
    )


BAD = [
    {"level": "LOUD"},
    {"min_level": "verbose"},
    {"since": "yesterday"},
    {"since": "5 fortnights"},
    {"status": "6xx"},
    {"status": 700},
    {"status": "abc"},
    {"kind": "sql"},
    {"method": "GET; DROP TABLE logs"},
    {"order": "sideways"},
    {"limit": 0},
    {"cursor": "not-a-cursor"},
    {"fields": {"a'); DROP TABLE logs; --": 1}},
    {"fields": {"n": {"gt": "x"}}},
    {"since": "2026-01-02", "until": "2026-01-01"},
    {"exclude": {"status": "6xx"}},
    {"exclude": {"colour": "red"}},
    {"exclude": {"level": "LOUD"}},
    {"exclude": "route=/x"},
]


@pytest.mark.parametrize("bad", BAD, ids=[json.dumps(b) for b in BAD])
def test_bad_input_is_a_value_error(world, bad):
    for reader in (world.pg, world.files):
        with pytest.raises(ValueError):
            reader.query(**bad)


INJECTIONS = [
    "'; DROP TABLE {t}; --",
    '" OR 1=1 --',
    "%' OR '1'='1",
    "x\\'; SELECT pg_sleep(5); --",
    "$1",
    "\x00",
]


def test_sql_injection_attempts_match_nothing_and_harm_nothing(world, postgres):
    for attempt in INJECTIONS:
        attempt = attempt.replace("{t}", world.table)
        for name in ("logger", "request_id", "trace_id", "route", "path", "text"):
            for reader in (world.pg, world.files):
                try:
                    page = reader.query(**{name: attempt})
                except ValueError:
                    continue  # NUL is refused outright
                assert page.records == [], (name, attempt)
        with pytest.raises(ValueError):
            world.pg.query(fields={attempt: 1})
        if "\x00" in attempt:
            with pytest.raises(ValueError):
                world.pg.query(fields={"user.name": attempt})
        else:
            assert world.pg.query(fields={"user.name": attempt}).records == []
    assert postgres.psql(f"select count(*) from {world.table}")[0][0] == len(world.all)


def test_tampered_or_foreign_cursor_is_refused(world):
    for reader in (world.pg, world.files):
        page = reader.query(limit=5, kind="app")
        body, sig = page.next.split(".")
        tampered = body[:-2] + ("AA" if body[-2:] != "AA" else "BB") + "." + sig
        with pytest.raises(ValueError, match="cursor"):
            reader.query(limit=5, kind="app", cursor=tampered)
        with pytest.raises(ValueError, match="other filters"):
            reader.query(limit=5, kind="http", cursor=page.next)
        assert reader.query(limit=5, kind="app", cursor=page.next).records


def test_partial_page_under_a_tiny_budget(world):
    small = logsluice.Reader(world.dir, max_files=1)
    files = glob.glob(os.path.join(world.dir, "*.ndjson*"))
    assert len(files) > 2
    page = small.query(limit=1000)
    assert page.partial and page.next
    full = {r["id"]: r for r in everything(world.files)}
    assert all(full[r["id"]] == r for r in page.records)
    tiny = logsluice.Reader(world.dir, max_bytes=1)
    assert tiny.query(limit=10).partial
    assert tiny.summary(by="level")["partial"]


def test_paging_10k_records_while_new_ones_arrive(postgres, tmp_logs):
    table = f"k_{uuid.uuid4().hex[:10]}"
    pipeline = logsluice.Pipeline(
        logsluice.Postgres(postgres.dsn, table=table, batch_max_delay=0.1),
        logsluice.LocalFiles(tmp_logs, max_file_bytes=500_000, batch_max_delay=0.1),
    )
    logger.remove()
    pipeline.attach(logger, level="INFO")
    for i in range(10_000):
        logger.info("first wave {}", i)
    pipeline.flush(timeout=60)
    stop = threading.Event()

    def writer():
        j = 0
        while not stop.is_set():
            logger.info("second wave {}", j)
            j += 1
            if j % 100 == 0:
                time.sleep(0.01)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for reader in (logsluice.Reader(postgres.dsn, table=table), logsluice.Reader(str(tmp_logs))):
            seen = [r for page in pages(reader, limit=250) for r in page.records]
            ids = [r["id"] for r in seen]
            assert len(ids) == len(set(ids))
            first = {r["message"] for r in seen if r["message"].startswith("first wave")}
            assert len(first) == 10_000
    finally:
        stop.set()
        t.join()
        pipeline.close()
        logger.remove()


def _insert(conn, table, message, ts):
    conn.execute(
        f"insert into {table} (ts, level, level_no, kind, logger, message, fields) "
        "values (%s, 'INFO', 20, 'app', 'writer', %s, '{}')",
        (ts, message),
    )


def test_tail_sees_interleaved_commits(postgres):
    table = f"i_{uuid.uuid4().hex[:10]}"
    p = logsluice.Pipeline(logsluice.Postgres(postgres.dsn, table=table))
    logger.remove()
    p.attach(logger)
    logger.info("creates the table")
    p.flush(timeout=30)
    p.close()
    logger.remove()
    reader = logsluice.Reader(postgres.dsn, table=table)
    # A look-back far shorter than writer A's transaction: only reading below the oldest
    # running writer finds its row.
    sub = reader.subscribe(poll_interval=0.1, lookback=0.5)
    sub2 = reader.subscribe(poll_interval=0.1, lookback=0.5)
    got = []

    def collect(n):
        def check():
            got.extend(r["message"] for r in sub.get(timeout=0.2))
            return len(got) >= n

        return check

    try:
        a = psycopg.connect(postgres.dsn)
        b = psycopg.connect(postgres.dsn, autocommit=True)
        now = dt.datetime.now(dt.timezone.utc)
        # A takes its id and time first but commits last.
        _insert(a, table, "slow writer", now)
        time.sleep(0.5)
        _insert(b, table, "fast writer", now + dt.timedelta(seconds=1.5))
        wait_for(collect(1), what="fast writer")
        assert got == ["fast writer"]
        time.sleep(2.0)  # many polls pass while A is still open
        a.commit()
        wait_for(collect(2), what="slow writer")
        assert got == ["fast writer", "slow writer"]
        # One poller served both subscribers.
        assert reader.subscribers() == 2 and len(reader._pollers) == 1
        assert [r["message"] for r in sub2.get(timeout=1)] == ["fast writer", "slow writer"]
        a.close()
        b.close()
    finally:
        sub.close()
        sub2.close()


def test_an_id_from_before_compressed_rotation_still_finds_the_record_and_its_context(tmp_logs):
    pipeline = logsluice.Pipeline(
        logsluice.LocalFiles(tmp_logs, max_file_bytes=2_000, compress=True, batch_max_delay=0.01)
    )
    logger.remove()
    pipeline.attach(logger)
    for i in range(3):
        logger.info("m{}", i)
    pipeline.flush()
    reader = logsluice.Reader(str(tmp_logs))
    old = reader.query(text="m1").records[0]["id"]
    assert old.endswith(".ndjson:" + old.rsplit(":", 1)[1])
    for i in range(3, 30):
        logger.info("m{}", i)
        pipeline.flush()
    pipeline.close()
    logger.remove()
    found = reader.get(old)
    assert found["message"] == "m1" and found["id"] == old.replace(".ndjson:", ".ndjson.gz:")
    ctx = reader.context(old, before=1, after=2)
    assert [r["message"] for r in ctx["before"]] == ["m0"]
    assert [r["message"] for r in ctx["after"]] == ["m2", "m3"]


@pytest.mark.parametrize("compress", [False, True])
def test_tail_follows_local_files_across_rotation(tmp_logs, compress):
    # Compressed rotation renames each finished file (.ndjson -> .ndjson.gz): records read
    # again under the new name within the lookback must not be delivered twice.
    reader = logsluice.Reader(str(tmp_logs))
    dest = logsluice.LocalFiles(tmp_logs, max_file_bytes=3_000, batch_max_delay=0.05, compress=compress)
    pipeline = logsluice.Pipeline(dest)
    logger.remove()
    pipeline.attach(logger)
    logger.info("before the tail")
    pipeline.flush()
    got = []
    with reader.subscribe(poll_interval=0.1) as sub:
        for i in range(60):
            logger.info("tailed {}", i)
            if i % 10 == 0:
                pipeline.flush()
                time.sleep(0.2)
        pipeline.flush()

        def check():
            got.extend(r["message"] for r in sub.get(timeout=0.2))
            return len(got) >= 60

        wait_for(check, what="60 tailed records")
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # later polls re-read the lookback
            got.extend(r["message"] for r in sub.get(timeout=0.2))
    pipeline.close()
    logger.remove()
    assert got == [f"tailed {i}" for i in range(60)]
    assert len(glob.glob(os.path.join(tmp_logs, "*.ndjson*"))) > 3


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "logsluice.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
        timeout=120,
    )


def test_cli_query_request_context_summary(world):
    r = run_cli("query", "--source", world.dir, "--status", "5xx", "--json", "--limit", "1000")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(lines) == sum(1 for x in world.all if (x.get("status") or 0) >= 500)
    r = run_cli(
        "query",
        "--source",
        world.dsn + "?x=1",
        "--table",
        world.table,
        "--min-level",
        "error",
        "--json",
        "--limit",
        "1000",
    )
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == sum(1 for x in world.all if x["level_no"] >= 40)
    r = run_cli("query", "--source", world.dir, "--text", "odd", "--limit", "3")
    assert r.returncode == 0 and len(r.stdout.splitlines()) >= 3
    assert "\x1b" not in r.stdout  # not a terminal: plain
    rid = world.request_ids[10]
    r = run_cli("request", rid, "--source", world.dir)
    assert r.returncode == 0 and "background task for item 10" in r.stdout and "/items/10" in r.stdout
    r = run_cli("request", "latest", "--status", "5xx", "--source", world.dir, "--json")
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[0])["status"] == 500
    some = world.files.query(text="plain record 42 ").records[0]
    r = run_cli("context", some["id"], "--source", world.dir, "--before", "2", "--after", "2", "--json")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 5
    r = run_cli("summary", "--source", world.dir, "--since", "24h", "--by", "route")
    assert r.returncode == 0 and "/items/{item_id}" in r.stdout
    for source in ([world.dir], [world.dsn, "--table", world.table]):
        r = run_cli(
            "query",
            "--source",
            *source,
            "--kind",
            "http",
            "--exclude",
            "route=/items/{item_id}",
            "--exclude",
            "status=5xx",
            "--json",
            "--limit",
            "1000",
        )
        assert r.returncode == 0, r.stderr
        got = sorted(key(json.loads(line)) for line in r.stdout.splitlines())
        assert got == sorted(
            key(x)
            for x in world.all
            if x["kind"] == "http" and x["route"] != "/items/{item_id}" and x["status"] < 500
        )
        assert got  # the POST /orders records


@pytest.mark.parametrize(
    "args",
    [
        ["query", "--status", "6xx"],
        ["query", "--since", "soon"],
        ["query", "--min-level", "LOUD"],
        ["query", "--field", "a'b=1"],
        ["query", "--cursor", "x.y"],
        ["query", "--exclude", "colour=red"],
        ["query", "--exclude", "status=6xx"],
        ["query", "--exclude", "route"],
        ["summary", "--by", "nothing"],
        ["context", "nope.ndjson:0"],
    ],
)
def test_cli_bad_input_exits_2_with_one_line(world, args):
    r = run_cli(*args, "--source", world.dir)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_cli_says_when_the_source_directory_does_not_exist(tmp_path):
    r = run_cli("query", "--source", str(tmp_path / "logz"))
    assert r.returncode == 2 and "no such directory" in r.stderr and r.stdout == ""


def test_cli_strips_terminal_escapes(tmp_logs):
    pipeline = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs))
    logger.remove()
    pipeline.attach(logger)
    logger.info("evil \x1b[2J\x1b]0;pwned\x07 title \x9b31m done")
    pipeline.close()
    logger.remove()
    r = run_cli("query", "--source", str(tmp_logs))
    assert r.returncode == 0 and "evil" in r.stdout
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout and "\x9b" not in r.stdout
    r = run_cli("query", "--source", str(tmp_logs), "--json")
    assert json.loads(r.stdout)["message"].startswith("evil \x1b[2J")  # JSON keeps the data, escaped
    assert "\x1b" not in r.stdout and "\x9b" not in r.stdout and "\\u009b31m" in r.stdout


def test_reader_from_env_and_secrets(world, monkeypatch):
    monkeypatch.setenv("LOGSLUICE_POSTGRES_DSN", world.dsn)
    monkeypatch.setenv("LOGSLUICE_POSTGRES_TABLE", world.table)
    reader = logsluice.Reader.from_env()
    assert "secret" not in repr(reader) and reader.query(limit=1).records
    monkeypatch.delenv("LOGSLUICE_POSTGRES_DSN")
    monkeypatch.setenv("LOGSLUICE_DIR", world.dir)
    assert logsluice.Reader.from_env().query(limit=1).records
    # What production's PostgreSQL needs is left out for development's directory.
    assert logsluice.Reader.from_env(statement_timeout=5, max_files=10).query(limit=1).records
    with pytest.raises(ValueError, match="statement_timeout does not apply"):
        logsluice.Reader(world.dir, statement_timeout=5)
    down = logsluice.Reader(re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:9", world.dsn), connect_timeout=1)
    with pytest.raises(RuntimeError) as e:
        down.query()
    assert "secret" not in str(e.value)


def test_async_twins(world):
    import asyncio

    async def main():
        page = await world.files.aquery(kind="http", limit=3)
        view = await world.pg.arequest(world.request_ids[10])
        summary = await world.pg.asummary(by="status")
        ctx = await world.files.acontext(page.records[0]["id"], before=1, after=1)
        return page, view, summary, ctx

    page, view, summary, ctx = asyncio.run(main())
    assert len(page.records) == 3 and view.access and summary["groups"] and ctx["record"]


def test_tail_survives_a_postgresql_restart(postgres):
    table = f"s_{uuid.uuid4().hex[:10]}"
    p = logsluice.Pipeline(logsluice.Postgres(postgres.dsn, table=table, batch_max_delay=0.05))
    logger.remove()
    p.attach(logger)
    logger.info("first")
    p.flush(timeout=30)
    reader = logsluice.Reader(postgres.dsn, table=table, connect_timeout=2)
    got = []

    def until(n):
        def check():
            got.extend(r["message"] for r in sub.get(timeout=0.2))
            return len(got) >= n

        return check

    with reader.subscribe(poll_interval=0.1) as sub:
        logger.info("before restart")
        p.flush(timeout=30)
        wait_for(until(1), what="record before the restart")
        postgres.stop()
        time.sleep(0.5)  # a few polls fail meanwhile
        postgres.start()
        logger.info("after restart")
        p.flush(timeout=60)
        wait_for(until(2), what="record after the restart")
    p.close()
    logger.remove()
    assert got == ["before restart", "after restart"]


def test_demo_ends_with_read_commands_that_work(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOGSLUICE_", "AZURE_STORAGE"))}
    out = run_cli("demo", "--records", "1000", "--requests", "5", "--dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    commands = [line.strip() for line in out.stdout.split("read it back:")[1].splitlines() if line.strip()]
    # `logsluice` when it is on PATH, else the virtualenv's script as a path from here.
    assert all(os.path.basename(c.split()[0]) == "logsluice" for c in commands)
    assert any(c.split()[1] == "request" for c in commands)
    for command in commands:
        argv = command.split()[1:]
        if argv[0] == "tail" or "|" in argv:
            continue
        r = subprocess.run(
            [sys.executable, "-m", "logsluice.cli", *argv],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=120,
        )
        assert r.returncode == 0 and r.stdout.strip(), (command, r.stderr)


def test_time_bounds_prune_day_partitions(postgres):
    """Each keyset comparison comes with a bare time bound: EXPLAIN shows old days pruned."""
    table = f"p_{uuid.uuid4().hex[:10]}"
    pipeline = logsluice.Pipeline(logsluice.Postgres(postgres.dsn, table=table))
    logger.remove()
    pipeline.attach(logger)
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3)
    logger.patch(lambda r: r.update(time=old)).info("three days ago")
    logger.info("today")
    pipeline.flush(timeout=30)
    pipeline.close()
    logger.remove()
    reader = logsluice.Reader(postgres.dsn, table=table)
    old_day = f"{table}_app_{old:%Y%m%d}"
    today = f"{table}_app_{dt.datetime.now(dt.timezone.utc):%Y%m%d}"
    recent = reader.explain(since="1h")
    assert today in recent and old_day not in recent
    page = reader.query(limit=1)
    assert page.records[0]["message"] == "today"
    assert [r["message"] for r in reader.query(limit=1, cursor=page.next).records] == ["three days ago"]
    last = page.records[0]
    ts_us = int(dt.datetime.fromisoformat(last["ts"].replace("Z", "+00:00")).timestamp()) * 1_000_000
    before_today = reader.explain(_after={"ts": ts_us - 86_400_000_000, "id": "0"})
    assert old_day in before_today and today not in before_today


def test_cli_tail_follows_new_records(tmp_logs):
    pipeline = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs, batch_max_delay=0.05))
    logger.remove()
    pipeline.attach(logger)
    logger.info("old news")
    pipeline.flush()
    argv = ["tail", "--source", str(tmp_logs), "--json", "--interval", "0.1"]
    cmd = [sys.executable, "-m", "logsluice.cli", *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop = threading.Event()

    def write():
        # Until the tail has shown something: it follows from whenever it started.
        i = 0
        while not stop.is_set():
            logger.info("fresh {}", i)
            pipeline.flush()
            i += 1
            stop.wait(0.1)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        lines = [json.loads(proc.stdout.readline()) for _ in range(5)]
    finally:
        stop.set()
        writer.join()
        proc.terminate()
        proc.wait(timeout=30)
        pipeline.close()
        logger.remove()
    numbers = [int(r["message"].split()[1]) for r in lines]
    assert all(r["message"].startswith("fresh ") for r in lines)
    assert numbers == list(range(numbers[0], numbers[0] + 5))


def test_request_latest_is_the_newest_access_record(world):
    """``request(request_id="latest")`` does what its docstring says, in the library: the CLI's
    ``request latest`` and the viewer's ``/api/requests/latest`` are this call."""
    import asyncio

    http = [r for r in world.all if r["kind"] == "http"]
    newest_ts = max(r["ts"] for r in http)
    newest_5xx_ts = max(r["ts"] for r in http if r["status"] >= 500)
    for reader in (world.pg, world.files):
        view = reader.request(request_id="latest")
        assert view.access is not None and view.access["ts"] == newest_ts
        assert view.request_id == view.access["request_id"] != "latest"
        assert view.records and all(r["request_id"] == view.request_id for r in view.records)
        failed = reader.request("latest", status="5xx")
        assert failed.access["status"] >= 500 and failed.access["ts"] == newest_5xx_ts
        assert failed.request_id == reader.latest_request(status="5xx")
        assert any("Payment FAILED" in r["message"] for r in failed.records)
        nothing = reader.request("latest", path="/no/such/path")
        assert nothing.access is None and nothing.records == [] and nothing.request_id == "latest"
        with pytest.raises(ValueError, match="latest"):
            reader.request(world.request_ids[3], status="5xx")  # filters go with "latest" only
        assert asyncio.run(reader.arequest("latest", status="5xx")).request_id == failed.request_id
    r = run_cli("request", "latest", "--path", "/no/such/path", "--source", world.dir)
    assert r.returncode == 2 and "error: no request matches" in r.stderr


FOLLOW_OPTIONS = [
    ("poll_interval", 0),
    ("poll_interval", -1),
    ("poll_interval", float("nan")),
    ("poll_interval", "x"),
    ("lookback", "x"),
    ("lookback", -1),
    ("lookback", float("inf")),
    ("max_buffer", 0),
    ("max_buffer", -5),
    ("max_buffer", 1.5),
]


@pytest.mark.parametrize("option,value", FOLLOW_OPTIONS, ids=[f"{o}={v!r}" for o, v in FOLLOW_OPTIONS])
def test_tail_options_that_cannot_work_are_value_errors_at_call_time(tmp_logs, option, value):
    # poll_interval=0 spun a thread at full CPU, lookback="x" or -1 never delivered (the poller
    # swallowed the error), max_buffer=0 delivered only Gap markers: none of them may start.
    reader = logsluice.Reader(str(tmp_logs))
    for start in (reader.subscribe, reader.tail, reader.atail):
        with pytest.raises(ValueError, match=option):
            start(**{option: value})
    assert reader.subscribers() == 0 and reader._pollers == {}
    assert not [t for t in threading.enumerate() if t.name.startswith("logsluice-tail-") and t.is_alive()]


def test_tail_options_at_their_limits_deliver(tmp_logs):
    pipeline = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs, batch_max_delay=0.02))
    logger.remove()
    pipeline.attach(logger)
    reader = logsluice.Reader(str(tmp_logs))
    got = []
    try:
        with reader.subscribe(poll_interval=0.01, lookback=0, max_buffer=1) as sub:
            logger.info("one")
            pipeline.flush()

            def check():
                got.extend(sub.get(timeout=0.2))
                return bool(got)

            wait_for(check, what="the record")
    finally:
        pipeline.close()
        logger.remove()
    assert [r["message"] for r in got] == ["one"]


@pytest.mark.parametrize("interval", ["0", "-1", "nan", "soon"])
def test_cli_tail_interval_that_cannot_work_exits_2(tmp_logs, interval):
    r = subprocess.run(
        [sys.executable, "-m", "logsluice.cli", "tail", "--source", str(tmp_logs), "--interval", interval],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,  # a tail that started would run until killed
    )
    assert r.returncode == 2 and r.stdout == ""
    assert "error:" in r.stderr and "--interval" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_a_tail_refuses_until_instead_of_dropping_it(tmp_logs):
    """A tail has no end: ``until`` given to tail/atail/subscribe is a ValueError naming it,
    raised at the call, and no poller starts."""
    reader = logsluice.Reader(str(tmp_logs))
    for call in (
        lambda: reader.tail(until="5m"),
        lambda: reader.atail(until="2026-01-01"),
        lambda: reader.subscribe(until="5m", kind="http"),
    ):
        with pytest.raises(ValueError, match=r"until does not apply to a live tail"):
            call()
    assert reader.subscribers() == 0 and reader._pollers == {}
    from fastapi.testclient import TestClient

    r = TestClient(logsluice.viewer(reader, allow_anonymous=True)).get("/api/stream", params={"until": "5m"})
    assert r.status_code == 400 and "until does not apply to a live tail" in r.json()["error"]
    assert reader.subscribers() == 0
    with reader.subscribe(until=None) as sub:  # left out, as every option given as None
        assert reader.subscribers() == 1 and sub.get(timeout=0) == []


def test_cli_options_that_do_not_apply_exit_2_naming_them(world):
    """--table/--schema/--container go to the Reader, which refuses them for a source they do not
    apply to (they used to be ignored), with or without --source; tail refuses --until."""
    bare = {"LOGSLUICE_POSTGRES_DSN": "", "AZURE_STORAGE_CONNECTION_STRING": ""}
    cases = [
        (["query", "--source", world.dir, "--table", world.table], {}, "--table does not apply to a dir"),
        (["summary", "--source", world.dir, "--schema", "public"], {}, "--schema does not apply to a dir"),
        (
            ["query", "--source", world.dsn, "--table", world.table, "--container", "logs"],
            {},
            "--container does not apply to a PostgreSQL source",
        ),
        (
            ["query", "--table", world.table],
            {**bare, "LOGSLUICE_DIR": world.dir},
            "--table does not apply to a directory (LocalFiles) source (the source the environment picks",
        ),
        (["tail", "--source", world.dir, "--until", "5m"], {}, "--until does not apply to a live tail"),
    ]
    for args, env, said in cases:
        r = run_cli(*args, env=env)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert said in r.stderr and r.stdout == "", (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    # The environment's PostgreSQL takes --table (its LOGSLUICE_POSTGRES_TABLE is the default).
    env = {**bare, "LOGSLUICE_POSTGRES_DSN": world.dsn, "LOGSLUICE_POSTGRES_TABLE": "no_such_table"}
    r = run_cli("query", "--table", world.table, "--kind", "http", "--json", "--limit", "1000", env=env)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == sum(1 for x in world.all if x["kind"] == "http")


def test_an_unknown_filter_name_is_a_type_error_everywhere(tmp_logs):
    """docs/reader.md: "an unknown filter name is a TypeError", as query() raises by itself."""
    import asyncio

    reader = logsluice.Reader(str(tmp_logs))
    calls = {
        "query": lambda: reader.query(bogus=1),
        "summary": lambda: reader.summary(bogus=1),
        "subscribe": lambda: reader.subscribe(bogus=1),
        "tail": lambda: reader.tail(bogus=1),
        "latest_request": lambda: reader.latest_request(bogus=1),
        "request": lambda: reader.request("latest", bogus=1),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match="bogus") as e:
            call()
        assert f"{name}()" in str(e.value)

    async def main():
        for call in (
            lambda: reader.aquery(bogus=1),
            lambda: reader.asummary(bogus=1),
            lambda: reader.arequest("latest", bogus=1),
        ):
            with pytest.raises(TypeError, match="bogus"):
                await call()
        with pytest.raises(TypeError, match="bogus"):
            reader.atail(bogus=1)

    asyncio.run(main())
    assert reader.subscribers() == 0 and reader._pollers == {}


def test_reader_refuses_a_directory_that_does_not_exist(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no such directory"):
        logsluice.Reader(str(tmp_path / "logz"))
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(ValueError, match="not a directory"):
        logsluice.Reader(tmp_path / "a-file")
    # The CLI has it from the Reader, also for a source it did not name itself.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOGSLUICE_", "AZURE_STORAGE"))}
    env["LOGSLUICE_DIR"] = str(tmp_path / "logz")
    r = subprocess.run(
        [sys.executable, "-m", "logsluice.cli", "query"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert r.returncode == 2 and "error:" in r.stderr and "no such directory" in r.stderr and r.stdout == ""


DSN = "postgresql://app@127.0.0.1:1/db"  # never connected to: a Reader opens its pool on first use
CS = "UseDevelopmentStorage=true"
URL = "https://account.blob.core.windows.net/logs"
BAD_OPTIONS = [
    (None, {"max_seconds": 0}, "max_seconds"),
    (None, {"max_seconds": -1}, "max_seconds"),
    (None, {"max_seconds": float("nan")}, "max_seconds"),
    (None, {"max_seconds": 60}, "max_seconds"),  # the core caps scans at 25 s
    (None, {"max_files": 0}, "max_files"),
    (None, {"max_files": "x"}, "max_files"),
    (None, {"slack_seconds": -1}, "slack_seconds"),
    (None, {"slack_seconds": float("nan")}, "slack_seconds"),
    (None, {"max_bytes": -1}, "max_bytes"),
    (None, {"max_bytes": "x"}, "max_bytes"),
    (None, {"max_bytes": 0}, "max_bytes"),
    (CS, {"max_seconds": 0}, "max_seconds"),
    (CS, {"max_bytes": -1}, "max_bytes"),
    (None, {"table": "logs"}, "table does not apply"),
    (None, {"schema": "public", "statement_timeout": 5}, "schema, statement_timeout do not apply"),
    (None, {"container": "logs"}, "container does not apply"),
    (None, {"listen": False}, "listen does not apply"),
    (DSN, {"max_files": 3}, "max_files does not apply"),
    (DSN, {"slack_seconds": 60}, "slack_seconds does not apply"),
    (DSN, {"container": "logs"}, "container does not apply"),
    (CS, {"credential": "default"}, "credential does not apply"),
    (CS, {"table": "logs"}, "table does not apply"),
    (CS, {"slack_seconds": 60}, "slack_seconds does not apply"),
    (URL, {"container": "other"}, "container does not apply"),
    (URL, {"statement_timeout": 5}, "statement_timeout does not apply"),
]


@pytest.mark.parametrize(
    "source,options,match", BAD_OPTIONS, ids=[f"{s or 'dir'}-{o}" for s, o, _ in BAD_OPTIONS]
)
def test_reader_options_that_cannot_work_are_value_errors_naming_them(tmp_logs, source, options, match):
    with pytest.raises(ValueError, match=match) as e:
        logsluice.Reader(str(tmp_logs) if source is None else source, **options)
    assert str(e.value).startswith("Reader: ")


def test_reader_options_that_apply_are_taken(tmp_logs):
    budgets = {"max_seconds": 25, "max_files": 1, "max_bytes": 1}
    assert logsluice.Reader(str(tmp_logs), slack_seconds=0, **budgets).kind == "files"
    assert logsluice.Reader(DSN, schema="s", table="t", statement_timeout=1, listen=False).kind == "postgres"
    assert logsluice.Reader(CS, container="logs", prefix="p/", **budgets).kind == "blob"
    assert logsluice.Reader(URL, credential="default", prefix="p/", **budgets).kind == "blob"
    dest = logsluice.LocalFiles(tmp_logs)
    with pytest.raises(ValueError, match="table does not apply"):
        logsluice.Reader(dest, table="logs")
    pg = logsluice.Postgres(DSN, table="mine")
    with pytest.raises(ValueError, match="table does not apply to a Postgres destination"):
        logsluice.Reader(pg, table="other")
    blob = logsluice.AzureBlob(CS, container="logs")
    assert logsluice.Reader(blob, max_seconds=1).kind == "blob"
    with pytest.raises(ValueError, match="prefix does not apply to an AzureBlob destination"):
        logsluice.Reader(blob, prefix="other/")
