"""logsluice.Reader over Azure Blob (real Azurite): records written through the real pipeline
into Azurite, LocalFiles and PostgreSQL at the same time give the same answers for every
filter; only the hour partitions of a range are listed; budgets, cursors, tail, CLI."""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import logsluice
import pytest
from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas
from fastapi.testclient import TestClient
from harness.azurite import ACCOUNT, KEY
from loguru import logger
from support import pages, shop_traffic, unique_container, wait_for
from test_reader import BAD, CASES, everything, key, read_ndjson, run_cli

N_REQUESTS = 80


def blob_names(azurite, container) -> list[str]:
    cc = BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client(container)
    return sorted(b.name for b in cc.list_blobs())


class World:
    pass


@pytest.fixture(scope="module")
def world(azurite, postgres, tmp_path_factory):
    """One app, one pipeline, three stores: http records from the middleware (routes, 5xx,
    background tasks) and app records from Loguru with extra fields."""
    w = World()
    w.dir = str(tmp_path_factory.mktemp("blob-reader-logs"))
    w.container = unique_container("r")
    w.table = f"b_{uuid.uuid4().hex[:10]}"
    w.cs = azurite.connection_string
    pipeline = logsluice.Pipeline(
        logsluice.AzureBlob(w.cs, container=w.container, batch_max_records=150, batch_max_delay=0.2),
        logsluice.LocalFiles(w.dir, max_file_bytes=40_000, compress=True, batch_max_records=200),
        logsluice.Postgres(postgres.dsn, table=w.table, batch_max_delay=0.2),
    )
    w.request_ids = shop_traffic(pipeline, logger, N_REQUESTS)
    pipeline.flush(timeout=60)
    pipeline.close()
    logger.remove()
    w.all = read_ndjson(w.dir)
    w.blobs = blob_names(azurite, w.container)
    w.blob = logsluice.Reader(w.cs, container=w.container)
    w.files = logsluice.Reader(w.dir)
    w.pg = logsluice.Reader(postgres.dsn, table=w.table)
    yield w
    for r in (w.blob, w.files, w.pg):
        r.close()


@pytest.mark.parametrize("filters,pred", CASES, ids=[json.dumps(c[0]) for c in CASES])
def test_every_filter_same_answer_from_blob_files_postgres_and_the_oracle(world, filters, pred):
    want = sorted(key(r) for r in world.all if pred(r))
    got_blob = everything(world.blob, **filters)
    assert sorted(key(r) for r in got_blob) == want
    assert sorted(key(r) for r in everything(world.files, **filters)) == want
    assert sorted(key(r) for r in everything(world.pg, **filters)) == want
    assert [r["ts"] for r in got_blob] == sorted((r["ts"] for r in got_blob), reverse=True)
    assert len({r["id"] for r in got_blob}) == len(got_blob)
    if got_blob:
        files_rec = next(r for r in everything(world.files, **filters) if key(r) == key(got_blob[0]))
        assert set(got_blob[0]) == set(files_rec)  # same page shape


def test_blobs_were_written_per_kind_and_read_back_whole(world):
    assert len(world.blobs) >= 4
    assert {n.split("/")[0] for n in world.blobs} == {"app", "http"}
    assert len(everything(world.blob)) == len(world.all)
    asc = world.blob.query(order="asc", limit=5).records
    assert [r["ts"] for r in asc] == sorted(r["ts"] for r in world.all)[:5]


def test_keyset_pages_are_disjoint_and_complete(world):
    seen = []
    for page in pages(world.blob, limit=37):
        assert not page.partial
        seen.extend(r["id"] for r in page.records)
    assert len(seen) == len(set(seen)) == len(world.all)


def test_request_context_and_summary_match_files(world):
    rid = world.request_ids[10]
    view = world.blob.request(rid)
    assert view.access["status"] == 200 and view.access["route"] == "/items/{item_id}"
    assert [r["message"] for r in view.records] == ["Loaded item 10", "background task for item 10"]
    failed = world.blob.request(world.request_ids[7])  # not time-ordered: searched newest first
    assert failed.access["status"] == 500
    assert any("Payment FAILED" in r["message"] for r in failed.records)
    assert world.blob.request("no-such-request").access is None
    assert world.blob.latest_request(status="5xx") == world.files.latest_request(status="5xx")

    rec = world.blob.query(text="plain record 150 ").records[0]
    assert world.blob.get(rec["id"]) == rec
    ctx = world.blob.context(rec["id"], before=3, after=4)
    frec = world.files.query(text="plain record 150 ").records[0]
    fctx = world.files.context(frec["id"], before=3, after=4)
    for part in ("before", "after"):
        assert [r["message"] for r in ctx[part]] == [r["message"] for r in fctx[part]]
    assert world.blob.get(rec["id"].rsplit(":", 1)[0] + ":1") is None
    assert world.blob.get("no/such/blob.ndjson.gz:0") is None
    with pytest.raises(ValueError):
        world.blob.context("nope.ndjson.gz:7")

    for by in ("route", "level", "status"):
        a = world.blob.summary(since="1h", by=by)
        b = world.files.summary(since="1h", by=by)
        assert not a["partial"] and a["approximate"] == b["approximate"]

        def groups(s):
            # Ties in count come in the order records were met, and sums of floats in that
            # order differ in the last bits: blobs download concurrently.
            def value(v):
                return round(v, 6) if isinstance(v, float) else v

            strip = ({k: value(v) for k, v in g.items() if k != "slowest"} for g in s["groups"])
            return sorted(strip, key=lambda g: json.dumps([g["key"], g["bucket"]]))

        assert groups(a) == groups(b)


@pytest.mark.parametrize("bad", BAD, ids=[json.dumps(b) for b in BAD])
def test_bad_filters_are_value_errors(world, bad):
    with pytest.raises(ValueError):
        world.blob.query(**bad)


def test_bad_sources_and_cursors_are_value_errors(world, azurite):
    for source, options in [
        ("AccountName=devstoreaccount1", {}),  # no key
        ("AccountName=a;AccountKey=not base64!!", {}),
        (azurite.connection_string, {"container": "Bad_Name"}),
        (azurite.connection_string, {"prefix": "/abs"}),
        (azurite.connection_string, {"name_template": "{kind}/{seq}"}),
        (f"{azurite.blob_endpoint}/Not_A_Container", {}),
    ]:
        with pytest.raises(ValueError):
            logsluice.Reader(source, **options)
    with pytest.raises(ValueError, match="narrower"):
        world.blob.query(since="400d")
    page = world.blob.query(limit=5, kind="app")
    with pytest.raises(ValueError, match="other filters"):
        world.blob.query(limit=5, kind="http", cursor=page.next)
    body, sig = page.next.split(".")
    with pytest.raises(ValueError, match="cursor"):
        world.blob.query(
            limit=5, kind="app", cursor=body[:-2] + ("AA" if body[-2:] != "AA" else "BB") + "." + sig
        )
    # A cursor signed for files is refused by the blob source.
    fpage = world.files.query(limit=5, kind="app")
    with pytest.raises(ValueError, match="cursor"):
        world.blob.query(limit=5, kind="app", cursor=fpage.next)


def test_partial_pages_under_tiny_budgets_continue_to_the_same_answer(world):
    small = logsluice.Reader(world.cs, container=world.container, max_files=1)
    page = small.query(limit=1000)
    assert page.partial and page.next
    assert small.stats()["blobs_downloaded"] < len(world.blobs)
    # Readers of the same container share cursors, whatever their budgets.
    ids, cursor = [r["id"] for r in page.records], page.next
    while cursor:
        more = world.blob.query(limit=1000, cursor=cursor)
        ids.extend(r["id"] for r in more.records)
        cursor = more.next
    assert sorted(ids) == sorted(r["id"] for r in everything(world.blob))
    full = {r["id"]: r for r in everything(world.blob)}
    assert all(full[r["id"]] == r for r in page.records)
    got, cursor, pages = list(page.records), page.next, 1
    while cursor:
        page = small.query(limit=1000, cursor=cursor)
        got.extend(page.records)
        cursor = page.next
        pages += 1
    assert pages >= 2
    assert sorted(r["id"] for r in got) == sorted(full)
    tiny = logsluice.Reader(world.cs, container=world.container, max_bytes=1)
    assert tiny.query(limit=1000).partial
    assert tiny.summary(by="level")["partial"]


def test_sources_container_url_sas_destination_and_env(world, azurite, monkeypatch):
    sas = generate_container_sas(
        ACCOUNT,
        world.container,
        account_key=KEY,
        permission=ContainerSasPermissions(read=True, list=True),
        expiry=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1),
    )
    url = f"{azurite.blob_endpoint}/{world.container}?{sas}"
    by_url = logsluice.Reader(url)
    assert "sig=" not in repr(by_url) and KEY not in repr(world.blob)
    assert len(everything(by_url, kind="http")) == sum(1 for r in world.all if r["kind"] == "http")
    # Without a token, a private container is refused by the service: a clear error, not a hang.
    with pytest.raises(RuntimeError, match="403|401|uthoriz"):
        logsluice.Reader(f"{azurite.blob_endpoint}/{world.container}").query()
    dev = f"UseDevelopmentStorage=true;DevelopmentStorageProxyUri=http://127.0.0.1:{azurite.port}"
    assert len(everything(logsluice.Reader(dev, container=world.container))) == len(world.all)
    dest = logsluice.AzureBlob(world.cs, container=world.container)
    assert len(everything(logsluice.Reader(dest), level="ERROR")) == sum(
        1 for r in world.all if r["level"] == "ERROR"
    )
    for var in ("LOGSLUICE_POSTGRES_DSN", "LOGSLUICE_DIR", "LOGSLUICE_AZURE_CONTAINER_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", world.cs)
    monkeypatch.setenv("LOGSLUICE_AZURE_CONTAINER", world.container)
    from_env = logsluice.Reader.from_env()
    assert from_env.kind == "blob"
    assert len(everything(from_env)) == len(world.all)


def test_public_container_reads_without_a_token(azurite):
    container = unique_container("r")
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    service.create_container(container, public_access="container")
    _write_at(azurite, container, [dt.datetime.now(dt.timezone.utc)], "public")
    reader = logsluice.Reader(f"{azurite.blob_endpoint}/{container}")
    assert [r["message"] for r in reader.query().records] == ["public 0"]


def test_cli_query_with_a_connection_string(world):
    r = run_cli("query", "--source", world.cs, "--container", world.container, "--json", "--limit", "1000")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert sorted(key(x) for x in lines) == sorted(key(x) for x in world.all)
    r = run_cli("query", "--source", world.cs, "--container", world.container, "--status", "5xx")
    assert r.returncode == 0 and "/fail/" in r.stdout
    r = run_cli("summary", "--source", world.cs, "--container", world.container, "--by", "route")
    assert r.returncode == 0 and "/items/{item_id}" in r.stdout
    r = run_cli("query", "--source", world.cs, "--container", world.container, "--status", "6xx")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert KEY not in r.stderr + r.stdout


def test_cli_table_and_schema_do_not_apply_to_a_blob_source(world):
    for flag in ("--table", "--schema"):
        r = run_cli("query", "--source", world.cs, "--container", world.container, flag, "x")
        assert r.returncode == 2 and r.stdout == "", r.stderr
        assert f"{flag} does not apply to an Azure Storage connection string" in r.stderr
        assert KEY not in r.stderr


def test_a_listing_answered_404_resource_not_found_is_an_error_not_an_empty_container():
    """Azure answers an anonymous listing of a private container with 404 ResourceNotFound
    (Azurite answers 403): a stand-in service gives that answer, which must not read as
    "no logs"."""

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<?xml version='1.0'?><Error><Code>ResourceNotFound</Code></Error>"
            self.send_response(404, "The specified resource does not exist.")
            self.send_header("x-ms-error-code", "ResourceNotFound")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        reader = logsluice.Reader(f"http://127.0.0.1:{server.server_port}/{ACCOUNT}/private")
        said = "container 'private' does not exist or is not readable with these credentials"
        for method, kwargs in (("query", {"since": "1h"}), ("summary", {"since": "1h", "by": "level"})):
            with pytest.raises(ValueError, match=said):
                getattr(reader, method)(**kwargs)
    finally:
        server.shutdown()
        server.server_close()


def test_a_container_that_does_not_exist_is_named_not_read_as_empty(world, azurite):
    """The service answers 404 ContainerNotFound: every way of reading says so (a typo in the
    container must not look like "no logs"), while an empty container reads as empty."""
    missing = unique_container("r")
    sas = generate_container_sas(
        ACCOUNT,
        missing,
        account_key=KEY,
        permission=ContainerSasPermissions(read=True, list=True),
        expiry=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1),
    )
    said = f"container '{missing}' does not exist"
    some_id = world.blob.query(limit=1).records[0]["id"]
    for reader in (
        logsluice.Reader(world.cs, container=missing),
        logsluice.Reader(f"{azurite.blob_endpoint}/{missing}?{sas}"),
    ):
        for method, kwargs in (
            ("query", {"since": "1h"}),
            ("summary", {"since": "1h", "by": "level"}),
            ("get", {"record_id": some_id}),
            ("subscribe", {}),
        ):
            with pytest.raises(ValueError, match=said):
                getattr(reader, method)(**kwargs)
        assert reader.subscribers() == 0
        r = TestClient(logsluice.viewer(reader, allow_anonymous=True)).get("/api/records")
        assert r.status_code == 400 and said in r.json()["error"]
    for command in ("query", "summary", "tail"):
        r = run_cli(command, "--source", world.cs, "--container", missing)
        assert r.returncode == 2, (command, r.stdout, r.stderr)
        assert said in r.stderr and r.stdout == "" and "Traceback" not in r.stderr
        assert KEY not in r.stderr
    empty = unique_container("r")
    BlobServiceClient.from_connection_string(world.cs).create_container(empty)
    assert logsluice.Reader(world.cs, container=empty).query(since="1h").records == []
    r = run_cli("query", "--source", world.cs, "--container", empty)
    assert r.returncode == 0 and r.stdout == "", r.stderr


def _write_at(azurite, container, times, tag):
    """One record per time (Loguru's record time patched), through the real pipeline."""
    pipeline = logsluice.Pipeline(
        logsluice.AzureBlob(azurite.connection_string, container=container, batch_max_delay=0.1)
    )
    logger.remove()
    pipeline.attach(logger)
    for i, at in enumerate(times):
        logger.patch(lambda r, at=at: r.update(time=at)).info("{} {}", tag, i)
        pipeline.flush(timeout=30)  # one blob per record
    pipeline.close()
    logger.remove()


def test_a_range_lists_only_its_hour_prefixes_and_skips_blobs_outside_it(azurite):
    container = unique_container("r")
    hour = dt.timedelta(hours=1)
    base = dt.datetime.now(dt.timezone.utc).replace(minute=0, second=0, microsecond=0) - 6 * hour
    times = [base + 10 * dt.timedelta(minutes=1), base + 2 * hour + dt.timedelta(minutes=10)]
    times += [base + 2 * hour + dt.timedelta(minutes=40), base + 4 * hour + dt.timedelta(minutes=10)]
    _write_at(azurite, container, times, "hourly")
    names = blob_names(azurite, container)
    assert len(names) == 4
    assert len({n.rsplit("/", 1)[0] for n in names}) == 3  # three hour partitions
    reader = logsluice.Reader(azurite.connection_string, container=container)

    def run(**filters):
        before = reader.stats()
        records = everything(reader, **filters)
        after = reader.stats()
        return [r["message"] for r in records], {k: after[k] - before[k] for k in after}

    # One hour, one kind: one list call, both blobs of that hour downloaded.
    msgs, work = run(kind="app", since=base + 2 * hour, until=base + 3 * hour - dt.timedelta(microseconds=1))
    assert sorted(msgs) == ["hourly 1", "hourly 2"]
    assert work["list_calls"] == 1 and work["blobs_downloaded"] == 2
    # Both kinds: one list call per kind.
    msgs, work = run(since=base + 2 * hour, until=base + 3 * hour - dt.timedelta(microseconds=1))
    assert work["list_calls"] == 2 and len(msgs) == 2
    # Three hours, the middle one empty: three list calls, the blob of the last hour only.
    msgs, work = run(kind="app", since=base + 3 * hour, until=base + 5 * hour + dt.timedelta(minutes=5))
    assert msgs == ["hourly 3"]
    assert work["list_calls"] == 3 and work["blobs_downloaded"] == 1
    # A range inside an hour after a blob's last record: listed, never downloaded.
    msgs, work = run(
        kind="app",
        since=base + 2 * hour + dt.timedelta(minutes=20),
        until=base + 2 * hour + dt.timedelta(minutes=30),
    )
    assert msgs == [] and work["list_calls"] == 1 and work["blobs_downloaded"] == 0
    # Default range: the last hour only, which holds nothing here.
    msgs, work = run(kind="app")
    assert msgs == [] and work["list_calls"] <= 2 and work["blobs_downloaded"] == 0
    assert len(everything(reader, since="7h")) == 4


def test_paging_a_few_thousand_records_without_duplicates_or_gaps(azurite, tmp_logs):
    container = unique_container("r")
    pipeline = logsluice.Pipeline(
        logsluice.AzureBlob(
            azurite.connection_string, container=container, batch_max_records=400, batch_max_delay=0.1
        ),
        logsluice.LocalFiles(tmp_logs, batch_max_delay=0.1),
    )
    logger.remove()
    pipeline.attach(logger)
    for i in range(3000):
        logger.info("wave {}", i)
    pipeline.flush(timeout=60)
    reader = logsluice.Reader(azurite.connection_string, container=container)
    stop = threading.Event()

    def writer():  # records that land while someone pages do not shift the pages
        j = 0
        while not stop.is_set() and j < 2000:
            logger.info("late {}", j)
            j += 1
            if j % 200 == 0:
                pipeline.flush(timeout=30)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for order in ("desc", "asc"):
            seen = [r for page in pages(reader, limit=250, order=order, since="1h") for r in page.records]
            ids = [r["id"] for r in seen]
            assert len(ids) == len(set(ids))
            waves = sorted(int(r["message"].split()[1]) for r in seen if r["message"].startswith("wave"))
            assert waves == list(range(3000))
            ts = [r["ts"] for r in seen]
            assert ts == sorted(ts, reverse=order == "desc")
    finally:
        stop.set()
        t.join()
        pipeline.close()
        logger.remove()
    assert len(blob_names(azurite, container)) >= 8


def test_tail_sees_new_batches(azurite):
    container = unique_container("r")
    pipeline = logsluice.Pipeline(
        logsluice.AzureBlob(azurite.connection_string, container=container, batch_max_delay=0.1)
    )
    logger.remove()
    pipeline.attach(logger)
    logger.info("before the tail")
    pipeline.flush(timeout=30)
    reader = logsluice.Reader(azurite.connection_string, container=container)
    got = []
    with reader.subscribe(poll_interval=0.1, kind="app") as sub:
        sub.get(timeout=0.5)  # the first poll has run: what follows is new
        for batch in range(3):
            for i in range(20):
                logger.info("tailed {}", batch * 20 + i)
            pipeline.flush(timeout=30)

        def check():
            got.extend(r["message"] for r in sub.get(timeout=0.2))
            return len(got) >= 60

        wait_for(check, what="60 tailed records")
        stats = reader.stats()
        sub.get(timeout=0.5)
        # Polls keep listing, but every blob is read once: the 3 new ones, and the one
        # from before the tail at most twice (subscribe's own check, the first poll).
        assert reader.stats()["blobs_downloaded"] == stats["blobs_downloaded"] <= 5
    pipeline.close()
    logger.remove()
    assert got == [f"tailed {i}" for i in range(60)]


def test_viewer_on_a_blob_reader(world):
    view = logsluice.viewer(world.blob, allow_anonymous=True)
    client = TestClient(view)
    r = client.get("/api/records", params={"status": "5xx", "limit": 500})
    assert r.status_code == 200, r.text
    body = r.json()
    assert {x["request_id"] for x in body["records"]} == {
        x["request_id"] for x in world.all if (x.get("status") or 0) >= 500
    }
    rid = body["records"][0]["request_id"]
    r = client.get(f"/api/requests/{rid}")
    assert r.status_code == 200 and r.json()["access"]["status"] == 500
    # Blob record ids hold slashes: the page sends them encoded, the server sees them decoded.
    record_id = body["records"][0]["id"]
    assert "/" in record_id
    r = client.get(f"/api/records/{quote(record_id, safe='')}/context", params={"before": 1, "after": 1})
    assert r.status_code == 200, r.text
    assert r.json()["record"]["id"] == record_id
    assert client.get("/api/records", params={"status": "6xx"}).status_code == 400


def test_viewer_sse_stream_over_a_blob_reader(azurite):
    from viewer_support import ServerThread, client, host_app, sse_events

    container = unique_container("r")
    pipeline = logsluice.Pipeline(
        logsluice.AzureBlob(azurite.connection_string, container=container, batch_max_delay=0.05)
    )
    handler = pipeline.attach(logger, level="DEBUG")
    reader = logsluice.Reader(azurite.connection_string, container=container)
    app, view = host_app(pipeline, reader)
    try:
        with ServerThread(app) as server, client(server.base) as c:
            # Before the writer's first batch creates the container, a stream is refused.
            r = c.get("/logs/api/stream", params={"kind": "app"})
            assert r.status_code == 400 and f"container '{container}' does not exist" in r.json()["error"]
            logger.info("the first batch creates the container")
            pipeline.flush(timeout=30)
            with c.stream("GET", "/logs/api/stream", params={"kind": "app"}) as r:
                assert r.status_code == 200
                wait_for(
                    lambda: c.get("/logs/api/status").json()["streams"]["subscribers"] == 1,
                    what="a subscriber",
                )
                sent = [f"streamed-{i}" for i in range(5)]
                for text in sent:
                    logger.info(text)
                pipeline.flush(timeout=30)
                got = []
                for ev in sse_events(r.iter_lines()):
                    if ev.get("event") == "record" and ev["data"]["message"].startswith("streamed-"):
                        got.append(ev["data"]["message"])
                    if len(got) == len(sent):
                        break
        assert got == sent
    finally:
        view.close()
        logger.remove(handler)
        pipeline.close()


def test_an_endpoint_that_never_answers_ends_the_call_near_max_seconds():
    # Takes connections, never answers: the SDK's own timeouts are off, so the call's
    # deadline must end it (a stalled viewer request or tail poller otherwise hangs).
    import socket

    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    port = server.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}/{ACCOUNT}"
    cs = f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={endpoint};"
    reader = logsluice.Reader(cs, container="logs", max_seconds=1.0)
    outcome: list[BaseException] = []

    def query() -> None:
        try:
            reader.query(since="1h")
        except Exception as e:  # noqa: BLE001 - the test looks at it
            outcome.append(e)

    worker = threading.Thread(target=query, daemon=True)
    worker.start()
    worker.join(timeout=30)
    server.close()
    for conn in held:
        conn.close()
    assert not worker.is_alive(), "the query still waits on an endpoint that never answers"
    assert outcome and "no answer within max_seconds" in str(outcome[0])
    assert KEY not in str(outcome[0])
