"""AzureBlob against a real Azurite: names, contents, metadata, auth modes, outages."""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import logsluice
import pytest
from azure.storage.blob import (
    BlobServiceClient,
    ContainerSasPermissions,
    generate_container_sas,
)
from harness.azurite import ACCOUNT, KEY
from support import close_with_a_write_in_io, stdlib_logger, unique_container, wait_for

NAME = re.compile(
    r"^(?P<prefix>.*?)(?P<kind>app|http)/(?P<y>\d{4})/(?P<m>\d{2})/(?P<d>\d{2})/(?P<H>\d{2})/"
    r"(?P<host>[A-Za-z0-9._-]+)-(?P<pid>\d+)-(?P<start>\d{8}T\d{12}Z[0-9a-f]{4})-(?P<seq>\d{6,})"
    r"(?P<ext>\.ndjson(\.gz)?)$"
)


def fast(**extra):
    """Options that keep tests quick: small batches, short waits."""
    return {"batch_max_delay": 0.2, "retry_initial": 0.01, "retry_max": 0.05, **extra}


def app_logger(pipeline: logsluice.Pipeline, name: str) -> logging.Logger:
    return stdlib_logger(pipeline, f"test.{name}.{uuid.uuid4().hex[:6]}")


def container_client(azurite, container):
    return BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client(container)


def read_blobs(azurite, container):
    """[(name, metadata, content_settings, records)] in name order, read back raw and decoded."""
    cc = container_client(azurite, container)
    out = []
    for b in sorted(cc.list_blobs(include=["metadata"]), key=lambda b: b.name):
        raw = cc.download_blob(b.name, decompress=False).readall()
        text = gzip.decompress(raw) if b.name.endswith(".gz") else raw
        records = [json.loads(line) for line in text.decode().splitlines()]
        out.append((b.name, b.metadata, b.content_settings, records))
    return out


def test_close_cuts_off_an_upload_to_a_server_that_never_answers():
    # The socket listens but is never served: the request is sent and no answer comes.
    # The upload would wait for attempt_timeout; close must not, and must count the batch.
    with socket.create_server(("127.0.0.1", 0), backlog=64) as silent:
        port = silent.getsockname()[1]
        cs = (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
            f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};"
        )
        dest = logsluice.AzureBlob(cs, container=unique_container(), **fast(attempt_timeout=60))
        pipeline = logsluice.Pipeline(dest)
        log = app_logger(pipeline, "silent")
        for i in range(5):
            log.warning("never answered %d", i)
        elapsed, stats = close_with_a_write_in_io(pipeline, "azure_blob")
    assert elapsed < 3.0, f"close took {elapsed:.1f} s"
    assert stats["written"] == 0 and stats["dropped"]["closed"] == 5, stats
    assert stats["dropped_total"] == 5 and stats["in_flight"] == 0, stats


def test_blobs_hold_exactly_the_records_in_order_with_metadata(azurite):
    container = unique_container()
    dest = logsluice.AzureBlob(
        azurite.connection_string, container=container, prefix="svc/", **fast(batch_max_records=150)
    )
    pipeline = logsluice.Pipeline(dest)
    log = app_logger(pipeline, "order")
    producers, per = 3, 400

    def produce(p):
        for i in range(per):
            log.info("producer %d message %d", p, i, extra={"producer": p, "i": i})

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pipeline.flush(timeout=30)
    stats = pipeline.stats()["azure_blob"]
    pipeline.close()

    blobs = read_blobs(azurite, container)  # the container was created on first upload
    assert len(blobs) >= producers * per // 150
    seen = {p: [] for p in range(producers)}
    seqs = []
    for name, meta, settings, records in blobs:
        m = NAME.match(name)
        assert m, name
        assert m["prefix"] == "svc/" and m["kind"] == "app" and m["ext"] == ".ndjson.gz"
        assert int(m["pid"]) == os.getpid()
        stamp = datetime.strptime(f"{m['y']}{m['m']}{m['d']}{m['H']}", "%Y%m%d%H").replace(
            tzinfo=timezone.utc
        )
        seqs.append(int(m["seq"]))
        assert settings.content_type == "application/x-ndjson"
        assert settings.content_encoding == "gzip"
        assert meta["record_count"] == str(len(records))
        assert meta["kind"] == "app"
        ts = [r["ts"] for r in records]
        assert meta["first_ts"] == min(ts) and meta["last_ts"] == max(ts)
        for r in records:
            when = datetime.strptime(r["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
            assert stamp <= when < stamp + timedelta(hours=1)
            assert r["kind"] == "app" and r["level"] == "INFO"
            seen[r["fields"]["producer"]].append(r["fields"]["i"])
            assert r["message"] == f"producer {r['fields']['producer']} message {r['fields']['i']}"
    assert sorted(seqs) == list(range(1, len(blobs) + 1))
    # Every record exactly once, and each producer's records in the order they were logged.
    blobs_by_seq = sorted(blobs, key=lambda b: int(NAME.match(b[0])["seq"]))
    ordered = [r for _, _, _, records in blobs_by_seq for r in records]
    for p in range(producers):
        assert [r["fields"]["i"] for r in ordered if r["fields"]["producer"] == p] == list(range(per))
    assert stats["accepted"] == stats["written"] == producers * per
    assert stats["dropped_total"] == 0 and stats["last_error"] is None


def test_a_batch_larger_than_one_block_is_uploaded_in_blocks(azurite):
    container = unique_container()
    block = 64 * 1024
    dest = logsluice.AzureBlob(
        azurite.connection_string,
        container=container,
        compression=None,
        block_size=block,
        max_concurrency=3,
        **fast(batch_max_delay=30.0),
    )
    pipeline = logsluice.Pipeline(dest)
    log = app_logger(pipeline, "blocks")
    n = 2000
    for i in range(n):
        log.warning("record %05d %s", i, "x" * 250)
    pipeline.flush(timeout=30)
    pipeline.close()

    blobs = read_blobs(azurite, container)
    assert len(blobs) == 1
    name, meta, settings, records = blobs[0]
    assert name.endswith(".ndjson") and settings.content_encoding is None
    assert [r["message"][:12] for r in records] == [f"record {i:05d}" for i in range(n)]
    assert meta["record_count"] == str(n)
    committed, _ = container_client(azurite, container).get_blob_client(name).get_block_list("committed")
    size = sum(b.size for b in committed)
    assert len(committed) == -(-size // block) > 1
    assert all(b.size <= block for b in committed)


def test_wrong_key_gives_a_clear_permanent_error_and_the_app_goes_on(azurite, caplog):
    wrong_key = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXlXcm9uZ0tleQ=="
    cs = azurite.connection_string.replace(KEY, wrong_key)
    assert wrong_key in cs
    dest = logsluice.AzureBlob(cs, container=unique_container(), **fast(max_retries=5))
    assert wrong_key not in repr(dest)
    pipeline = logsluice.Pipeline(dest)
    log = app_logger(pipeline, "wrongkey")
    with caplog.at_level(logging.DEBUG, logger="logsluice"):
        for i in range(20):
            log.error("will not arrive %d", i)  # never raises into the app
        pipeline.flush(timeout=30)
    stats = pipeline.stats()["azure_blob"]
    pipeline.close()
    assert stats["dropped"]["failed"] == 20 and stats["written"] == 0
    assert stats["retries"] == 0  # permanent: no spinning
    err = stats["last_error"]
    assert "HTTP 403" in err and "account key" in err, err
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "HTTP 403" in logged
    for text in (err, logged, str(stats), repr(pipeline)):
        assert wrong_key not in text and KEY not in text


def test_missing_container_without_create_is_permanent(azurite):
    container = unique_container()
    pipeline = logsluice.Pipeline(
        logsluice.AzureBlob(azurite.connection_string, container=container, create_container=False, **fast())
    )
    app_logger(pipeline, "nocontainer").warning("lost")
    pipeline.flush(timeout=30)
    stats = pipeline.stats()["azure_blob"]
    pipeline.close()
    assert stats["dropped"]["failed"] == 1 and stats["retries"] == 0
    assert "ContainerNotFound" in stats["last_error"] and "create_container=False" in stats["last_error"]
    assert not container_client(azurite, container).exists()


def test_an_outage_holds_records_through_the_breaker_and_nothing_is_stored_twice(azurite):
    container = unique_container()
    dest = logsluice.AzureBlob(
        azurite.connection_string,
        container=container,
        **fast(max_retries=1, breaker_threshold=2, breaker_cooldown=1.0, attempt_timeout=5.0),
    )
    pipeline = logsluice.Pipeline(dest)
    log = app_logger(pipeline, "outage")
    counter = iter(range(10**6))

    def send(n):
        for _ in range(n):
            log.info("m%d", next(counter))

    send(10)
    pipeline.flush(timeout=30)
    assert pipeline.stats()["azure_blob"]["written"] == 10
    azurite.stop()
    try:
        send(15)
        wait_for(lambda: pipeline.stats()["azure_blob"]["breaker"] == "open", what="the breaker to open")
        send(5)  # while open: held behind the others, not attempted
        with pytest.raises(TimeoutError, match="azure_blob: 20 records"):
            pipeline.flush(timeout=0.5)
        s = pipeline.stats()["azure_blob"]
        assert s["dropped_total"] == 0 and s["in_flight"] == 20
        assert "127.0.0.1" in s["last_error"]
    finally:
        azurite.start()
    # After the cooldown the held batch is the probe; it succeeds and the breaker closes.
    # (A probe that meets Azurite still starting only reopens it for another cooldown.)
    pipeline.flush(timeout=60)
    send(20)
    pipeline.close()
    s = pipeline.stats()["azure_blob"]
    assert s["breaker"] == "closed"
    assert s["accepted"] == s["written"] == 50 and s["dropped_total"] == 0 and s["in_flight"] == 0
    messages = [r["message"] for _, _, _, records in read_blobs(azurite, container) for r in records]
    assert sorted(messages) == sorted(f"m{i}" for i in range(50))


class FaultyProxy:
    """A loopback TCP proxy in front of Azurite that spoils the first request: ``"slow"``
    forwards it but holds the response back (the upload lands, the client times out);
    ``"busy"`` answers it with 503 and ``Retry-After`` without forwarding it."""

    def __init__(self, upstream: int, fault: str):
        self.upstream, self.fault, self.faults_left = upstream, fault, 1
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    @staticmethod
    def _pump(src, dst, delay=0.0):
        try:
            while data := src.recv(65536):
                if delay:
                    time.sleep(delay)
                    delay = 0.0
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _handle(self, client):
        with self.lock:
            fire = self.faults_left > 0
            self.faults_left -= fire
        if fire and self.fault == "busy":
            head = b""
            while b"\r\n\r\n" not in head:
                head += client.recv(65536)
            head, body = head.split(b"\r\n\r\n", 1)
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
            while len(body) < length:
                body += client.recv(65536)
            client.sendall(
                b"HTTP/1.1 503 The server is busy.\r\nx-ms-error-code: ServerBusy\r\n"
                b"Retry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream))
        threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
        self._pump(upstream, client, delay=3.0 if fire and self.fault == "slow" else 0.0)

    def close(self):
        self.server.close()


@pytest.mark.parametrize("fault", ["slow", "busy"])
def test_a_retried_upload_is_stored_once(azurite, fault):
    # "slow": the first upload lands but its response comes too late; the retry overwrites
    # the same blob name. "busy": a 503 with Retry-After is retried.
    container = unique_container()
    container_client(azurite, container).create_container()
    proxy = FaultyProxy(azurite.port, fault)
    try:
        cs = azurite.connection_string.replace(
            azurite.blob_endpoint, f"http://127.0.0.1:{proxy.port}/{ACCOUNT}"
        )
        pipeline = logsluice.Pipeline(
            logsluice.AzureBlob(cs, container=container, **fast(attempt_timeout=1.0, max_retries=3))
        )
        log = app_logger(pipeline, fault)
        for i in range(50):
            log.info("once %d", i)
        pipeline.flush(timeout=30)
        stats = pipeline.stats()["azure_blob"]
        pipeline.close()
    finally:
        proxy.close()
    assert stats["written"] == 50 and stats["retries"] >= 1, stats
    expected = "timed out" if fault == "slow" else "HTTP 503 ServerBusy"
    assert expected in stats["last_error"], stats["last_error"]
    blobs = read_blobs(azurite, container)
    assert len(blobs) == 1
    assert [r["message"] for r in blobs[0][3]] == [f"once {i}" for i in range(50)]


def test_two_processes_writing_at_once_never_collide(azurite, tmp_path):
    container = unique_container()
    container_client(azurite, container).create_container()
    script = textwrap.dedent(
        """
        import logging, sys
        import logsluice
        cs, container, tag, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
        p = logsluice.Pipeline(logsluice.AzureBlob(cs, container=container, batch_max_records=25,
                                                   batch_max_delay=0.05))
        log = logging.getLogger("w"); log.propagate = False; log.addHandler(p.logging_handler())
        for i in range(n):
            log.warning("%s %d", tag, i)
        p.close(timeout=60)
        s = p.stats()["azure_blob"]
        assert s["written"] == n, s
        """
    )
    path = tmp_path / "writer.py"
    path.write_text(script)
    n = 500
    procs = [
        subprocess.Popen([sys.executable, str(path), azurite.connection_string, container, tag, str(n)])
        for tag in ("a", "b")
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]

    blobs = read_blobs(azurite, container)
    names = [b[0] for b in blobs]
    pids = {NAME.match(name)["pid"] for name in names}
    assert len(pids) == 2 and len(names) >= 2 * n // 25
    for tag in ("a", "b"):
        got = [
            r["message"] for _, _, _, records in blobs for r in records if r["message"].startswith(tag + " ")
        ]
        assert sorted(got, key=lambda m: int(m.split()[1])) == [f"{tag} {i}" for i in range(n)]


def test_sas_container_url_and_sas_credential(azurite):
    container = unique_container()
    container_client(azurite, container).create_container()
    sas = generate_container_sas(
        ACCOUNT,
        container,
        account_key=KEY,
        permission=ContainerSasPermissions(read=True, write=True, create=True, list=True),
        expiry=datetime.now(timezone.utc) + timedelta(hours=1),
    )
    signature = re.search(r"sig=([^&]+)", sas).group(1)
    url = f"{azurite.blob_endpoint}/{container}?{sas}"
    by_url = logsluice.AzureBlob(container_url=url, name="by_url", **fast())
    by_credential = logsluice.AzureBlob(
        account_url=azurite.blob_endpoint, credential=sas, container=container, name="by_cred", **fast()
    )
    for d in (by_url, by_credential):
        assert signature not in repr(d) and d.auth == "sas"
    pipeline = logsluice.Pipeline(by_url, by_credential)
    app_logger(pipeline, "sas").warning("via sas")
    pipeline.flush(timeout=30)
    stats = pipeline.stats()
    pipeline.close()
    assert stats["by_url"]["written"] == stats["by_cred"]["written"] == 1, stats
    blobs = read_blobs(azurite, container)
    assert [r["message"] for *_, records in blobs for r in records] == ["via sas", "via sas"]


def test_sas_without_create_permission_fails_clearly_without_the_signature(azurite):
    container = unique_container()
    sas = generate_container_sas(
        ACCOUNT,
        container,
        account_key=KEY,
        permission=ContainerSasPermissions(read=True),
        expiry=datetime.now(timezone.utc) + timedelta(hours=1),
    )
    signature = re.search(r"sig=([^&]+)", sas).group(1)
    pipeline = logsluice.Pipeline(
        logsluice.AzureBlob(container_url=f"{azurite.blob_endpoint}/{container}?{sas}", **fast())
    )
    app_logger(pipeline, "sasro").warning("denied")
    pipeline.flush(timeout=30)
    stats = pipeline.stats()["azure_blob"]
    pipeline.close()
    assert stats["dropped"]["failed"] == 1 and stats["retries"] == 0
    assert "HTTP 403" in stats["last_error"] or "HTTP 404" in stats["last_error"]
    assert signature not in stats["last_error"] and "sig=" not in stats["last_error"]


def test_account_key_as_credential(azurite):
    container = unique_container()
    dest = logsluice.AzureBlob(
        account_url=azurite.blob_endpoint, credential=KEY, container=container, **fast()
    )
    assert dest.auth == "shared_key" and KEY not in repr(dest)
    pipeline = logsluice.Pipeline(dest)
    app_logger(pipeline, "key").warning("via key")
    pipeline.flush(timeout=30)
    pipeline.close()
    assert [r["message"] for *_, records in read_blobs(azurite, container) for r in records] == ["via key"]


def test_from_env_uses_connection_string_container_prefix_and_level(azurite, monkeypatch):
    container = unique_container()
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    monkeypatch.setenv("LOGSLUICE_AZURE_CONTAINER", container)
    monkeypatch.setenv("LOGSLUICE_AZURE_PREFIX", "envapp/")
    monkeypatch.setenv("LOGSLUICE_AZURE_MIN_LEVEL", "warning")
    monkeypatch.delenv("LOGSLUICE_DIR", raising=False)
    pipeline = logsluice.Pipeline.from_env()
    (dest,) = [d for d in pipeline.destinations if isinstance(d, logsluice.AzureBlob)]
    assert (dest.container, dest.prefix, dest.min_level) == (container, "envapp/", 30)
    assert KEY not in repr(pipeline)
    log = app_logger(pipeline, "env")
    log.info("below the level")
    log.error("kept")
    pipeline.flush(timeout=30)
    pipeline.close()
    blobs = read_blobs(azurite, container)
    assert [b[0].startswith("envapp/app/") for b in blobs] == [True]
    assert [r["message"] for r in blobs[0][3]] == ["kept"]


def test_development_storage_connection_string_reaches_the_default_port_only():
    # UseDevelopmentStorage=true means 127.0.0.1:10000; it is understood (no error) even
    # when nothing listens there: the upload fails as a transient connection error.
    dest = logsluice.AzureBlob("UseDevelopmentStorage=true", **fast(max_retries=0))
    assert dest.auth == "shared_key"
    logsluice.Pipeline(dest).close()


def test_entra_id_default_credential_is_wired_but_not_reachable_here():
    # Entra ID needs a real tenant; here only construction is checked (no I/O happens).
    dest = logsluice.AzureBlob(account_url="https://acct.blob.core.windows.net", credential="default")
    assert dest.auth == "default" and dest.location == "https://acct.blob.core.windows.net/logs"
    logsluice.Pipeline(dest).close()
    for mode in ("managed_identity", "workload_identity", "azure_cli", "environment"):
        assert (
            logsluice.AzureBlob(account_url="https://acct.blob.core.windows.net", credential=mode).auth
            == mode
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one"),
        ({"connection_string": "x", "account_url": "https://a.blob.core.windows.net"}, "exactly one"),
        ({"account_url": "https://a.blob.core.windows.net"}, "credential="),
        ({"connection_string": "UseDevelopmentStorage=true", "container": "Bad_Name"}, "not a valid name"),
        ({"connection_string": "UseDevelopmentStorage=true", "compression": "zstd"}, "compression"),
        ({"connection_string": "UseDevelopmentStorage=true", "name_template": "{kind}/{seq}"}, "{host}"),
        ({"connection_string": "UseDevelopmentStorage=true", "name_template": "{nope}{host}"}, "unknown"),
        ({"connection_string": "UseDevelopmentStorage=true", "prefix": "/abs"}, "prefix"),
        ({"connection_string": "UseDevelopmentStorage=true", "block_size": 0}, "block_size"),
        (
            {
                "connection_string": "UseDevelopmentStorage=true",
                "prefix": "svc/",
                "name_template": "{kind}/{yyyy}/{host}-{pid}-{start}-{seq}{ext}",
            },
            "has no {prefix}",
        ),
        # A connection string in the wrong place: refused without echoing its key.
        (
            {"container_url": "DefaultEndpointsProtocol=http;AccountName=a;AccountKey=c2VjcmV0/a2V5=="},
            "https://",
        ),
    ],
)
def test_bad_options_raise_value_errors(kwargs, message):
    args = dict(kwargs)
    cs = args.pop("connection_string", None)
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        logsluice.AzureBlob(cs, **args)
    assert "a2V5" not in str(raised.value)


@pytest.mark.parametrize(
    "template, message",
    [
        ("{prefix}{kind}/{yyyy}/{host}-{pid}-{start}-{seq}.json", "must end with {ext}"),
        ("{prefix}{yyyy}/{mm}/{host}-{pid}-{start}-{seq}-{kind}{ext}", "{kind} must come before"),
        ("{prefix}{kind}/{HH}/{host}-{pid}-{start}-{seq}{ext}", "{HH} needs {dd}"),
    ],
)
def test_names_the_reader_could_not_list_once_are_refused(template, message):
    # Written, such names were missed by the Reader (no .ndjson ending) or read twice.
    dest = logsluice.AzureBlob("UseDevelopmentStorage=true", name_template=template)
    with pytest.raises(ValueError, match=re.escape(message)):
        logsluice.Pipeline(dest)


def test_malformed_connection_strings_fail_at_pipeline_without_echoing_secrets():
    secret = "c2VjcmV0LXNlY3JldC1zZWNyZXQ="
    for cs in (f"AccountName=a;AccountKey={secret};garbage", "AccountName=a;AccountKey=not-base64!!"):
        dest = logsluice.AzureBlob(cs)
        assert secret not in repr(dest)
        with pytest.raises(ValueError) as info:
            logsluice.Pipeline(dest)
        assert secret not in str(info.value) and "not-base64" not in str(info.value)


def test_http_and_app_records_of_one_batch_go_to_one_blob_per_kind(azurite):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    container = unique_container()
    pipeline = logsluice.Pipeline(
        logsluice.AzureBlob(azurite.connection_string, container=container, **fast(batch_max_delay=60.0))
    )
    log = app_logger(pipeline, "kinds")
    app = FastAPI()

    @app.get("/orders/{n}")
    def order(n: int):
        log.info("order %d", n)
        return {"n": n}

    app.add_middleware(logsluice.LoggingMiddleware, pipeline=pipeline)
    with TestClient(app) as client:
        for n in range(5):
            assert client.get(f"/orders/{n}", headers={"X-Request-ID": f"req-{n}"}).status_code == 200
    pipeline.flush(timeout=30)
    stats = pipeline.stats()["azure_blob"]
    pipeline.close()

    assert stats["batches"] == 1 and stats["written"] == 10, stats
    blobs = {
        NAME.match(name)["kind"]: (meta, records) for name, meta, _, records in read_blobs(azurite, container)
    }
    assert sorted(blobs) == ["app", "http"]
    http_meta, http = blobs["http"]
    assert http_meta["kind"] == "http" and http_meta["record_count"] == "5"
    assert [(r["path"], r["status"], r["request_id"]) for r in http] == [
        (f"/orders/{n}", 200, f"req-{n}") for n in range(5)
    ]
    _, app_records = blobs["app"]
    assert [(r["message"], r["request_id"]) for r in app_records] == [
        (f"order {n}", f"req-{n}") for n in range(5)
    ]
