"""Records per second, HTTP requests per 10k records and stored bytes into Azurite.

Baselines, all through the Python SDK (azure-storage-blob), measured in the same run:
  (a) one blob per record                         (the naive design)
  (b) one JSON-array blob per 100 records          (the seed's recommended design)
  (c) gzip NDJSON blobs of 10k records             (the best a Python app does by hand)
  (d) one append blob, one append_block per 1000 records
  logsluice: Loguru -> pipeline.attach(logger) -> logsluice.AzureBlob at its default settings
  logsluice core: the same (message, fields) pairs turned into records and handed to the core
    (benches/azure_blob_core.rs), at the same defaults: the SDK baselines' footing, no logger

Each configuration writes the same records (~300 bytes of JSON each) into its own, already
created container. Time runs from the first record handed over to the last byte stored
(flush() for logsluice). Requests are counted by a loopback proxy in a second, untimed pass,
so the proxy's own cost never enters the timings; stored bytes are the blobs' sizes.

Run: .venv/bin/python benches/bench_azure_blob.py [--records 20000] [--runs 5] [--naive-records N]
     [--count-naive-records 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import logging
import multiprocessing
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import _cargo_bench as cargo_bench  # noqa: E402
import logsluice  # noqa: E402
from azure.storage.blob import BlobServiceClient, ContainerClient  # noqa: E402
from harness import AzuriteServer  # noqa: E402
from harness._net import free_port  # noqa: E402
from loguru import logger  # noqa: E402

# ---------------------------------------------------------------- counting proxy


def _proxy_main(listen: int, upstream: int, counter, ready) -> None:
    """Forwards 127.0.0.1:listen to 127.0.0.1:upstream, counting HTTP responses."""
    marker = b"HTTP/1.1 "

    async def pump(reader, writer, count: bool) -> None:
        tail = b""
        try:
            while data := await reader.read(1 << 16):
                if count:
                    window = tail + data
                    n = window.count(marker)
                    if n:
                        with counter.get_lock():
                            counter.value += n
                    # Keep a marker split across reads countable, never count one twice.
                    tail = window[-(len(marker) - 1) :]
                    if tail.endswith(marker[: len(tail)]) and marker in window[-len(marker) :]:
                        tail = b""
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def handle(client_reader, client_writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(pump(client_reader, up_writer, False), pump(up_reader, client_writer, True))

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", listen)
        ready.set()
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


class CountingProxy:
    def __init__(self, upstream: int):
        ctx = multiprocessing.get_context("spawn")
        self.port = free_port()
        self.counter = ctx.Value("q", 0)
        ready = ctx.Event()
        self.proc = ctx.Process(
            target=_proxy_main, args=(self.port, upstream, self.counter, ready), daemon=True
        )
        self.proc.start()
        if not ready.wait(30):
            raise RuntimeError("proxy did not start")

    @property
    def count(self) -> int:
        return self.counter.value

    def close(self) -> None:
        self.proc.terminate()
        self.proc.join(10)


# ---------------------------------------------------------------- the records


ENTRIES = ("loguru", "logging")


def make_records(n: int) -> list[tuple[str, dict]]:
    """(message, fields) pairs; as JSON with ts/level/logger, ~300 bytes each."""
    out = []
    for i in range(n):
        fields = {
            "order_id": 100_000 + i,
            "customer": f"cust-{i % 997:04d}",
            "amount_cents": (i * 7919) % 100_000,
            "request_id": uuid.UUID(int=i * 2654435761).hex,
            "path": f"/api/v1/orders/{100_000 + i}/items",
        }
        message = f"order {100_000 + i} processed for customer cust-{i % 997:04d} in {i % 250} ms"
        out.append((message, fields))
    return out


def as_json(message: str, fields: dict) -> dict:
    """The record a hand-written Python app would store."""
    return {
        "ts": datetime.now(timezone.utc).isoformat(),
        "level": "INFO",
        "logger": "app.orders",
        "message": message,
        "fields": fields,
    }


# ---------------------------------------------------------------- configurations


def naive(cc: ContainerClient, records) -> None:
    for i, (m, f) in enumerate(records):
        cc.upload_blob(f"naive/{i:08d}.json", json.dumps(as_json(m, f)))


def arrays_of_100(cc: ContainerClient, records) -> None:
    for start in range(0, len(records), 100):
        chunk = [as_json(m, f) for m, f in records[start : start + 100]]
        cc.upload_blob(f"arrays/{start:08d}.json", json.dumps(chunk))


def gzip_ndjson_10k(cc: ContainerClient, records) -> None:
    for start in range(0, len(records), 10_000):
        lines = "\n".join(json.dumps(as_json(m, f)) for m, f in records[start : start + 10_000])
        cc.upload_blob(f"gz/{start:08d}.ndjson.gz", gzip.compress((lines + "\n").encode()))


def append_blob_1000(cc: ContainerClient, records) -> None:
    blob = cc.get_blob_client("append/log.ndjson")
    blob.create_append_blob()
    for start in range(0, len(records), 1000):
        lines = "".join(json.dumps(as_json(m, f)) + "\n" for m, f in records[start : start + 1000])
        blob.append_block(lines.encode())


ATTACH_OPTIONS = dict(
    format="{message}", diagnose=False, backtrace=False, enqueue=False, colorize=False, catch=True
)


def loguru_calls(records) -> float:
    started = time.perf_counter()
    for message, fields in records:
        logger.bind(**fields).info(message)
    return time.perf_counter() - started


def logging_calls(log: logging.Logger, records) -> float:
    started = time.perf_counter()
    for message, fields in records:
        log.info(message, extra=fields)
    return time.perf_counter() - started


class _Nothing(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        pass


def bench_logger() -> logging.Logger:
    log = logging.getLogger(f"bench.{uuid.uuid4().hex[:8]}")
    log.propagate = False
    log.setLevel(logging.INFO)
    return log


def logsluice_run(connection_string: str, container: str, records, via: str) -> tuple[float, float]:
    """Returns (seconds from the first call to flush() done, seconds of the calls alone)."""
    pipeline = logsluice.Pipeline(logsluice.AzureBlob(connection_string, container=container))
    log = bench_logger()
    if via == "loguru":
        hid = pipeline.attach(logger, level="INFO")
    else:
        log.addHandler(pipeline.logging_handler())
    try:
        started = time.perf_counter()
        calls = loguru_calls(records) if via == "loguru" else logging_calls(log, records)
        pipeline.flush(timeout=300)
        total = time.perf_counter() - started
        stats = pipeline.stats()["azure_blob"]
        assert stats["written"] == len(records), stats
    finally:
        if via == "loguru":
            logger.remove(hid)
        pipeline.close()
    return total, calls


def core_run(connection_string: str, container: str, n: int) -> float:
    """Seconds the core took, by its own clock (process start and connecting excluded)."""
    settings = {"CONNECTION_STRING": connection_string, "CONTAINER": container, "RECORDS": str(n)}
    fields = cargo_bench.run("azure_blob_core", settings)
    assert int(fields["written"]) == n, f"core: {fields['written']} written, expected {n}"
    return float(fields["seconds"])


def floor(records, via: str) -> float:
    """The log calls alone, into a sink that does nothing: what any destination costs at least."""
    if via == "loguru":
        hid = logger.add(lambda m: None, **ATTACH_OPTIONS)
        try:
            return loguru_calls(records)
        finally:
            logger.remove(hid)
    log = bench_logger()
    log.addHandler(_Nothing())
    return logging_calls(log, records)


# ---------------------------------------------------------------- measuring


def stored(cc: ContainerClient) -> tuple[int, int]:
    blobs = list(cc.list_blobs())
    return len(blobs), sum(b.size for b in blobs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--naive-records", type=int, default=None, help="records for (a) (default: --records)"
    )
    parser.add_argument(
        "--count-naive-records",
        type=int,
        default=2000,
        help="records for (a) in the counting pass: one request per record by construction",
    )
    args = parser.parse_args()
    n = args.records
    n_naive = args.naive_records or n
    records = make_records(n)
    size = statistics.mean(len(json.dumps(as_json(m, f))) for m, f in records[:1000])
    logger.remove()
    cargo_bench.build("azure_blob_core")

    with AzuriteServer() as azurite:
        service = BlobServiceClient.from_connection_string(azurite.connection_string)

        def fresh(tag: str, via: str | None = None) -> tuple[ContainerClient, str]:
            name = f"{tag}-{uuid.uuid4().hex[:12]}"
            service.create_container(name)
            cs = azurite.connection_string
            if via:
                cs = cs.replace(azurite.blob_endpoint, via)
            return BlobServiceClient.from_connection_string(cs).get_container_client(name), cs

        sdk: dict[str, Callable] = {
            "b": arrays_of_100,
            "c": gzip_ndjson_10k,
            "d": append_blob_1000,
        }

        def run_sdk(key: str, recs, via=None) -> tuple[float, ContainerClient]:
            cc, _ = fresh(key, via)
            started = time.perf_counter()
            (naive if key == "a" else sdk[key])(cc, recs)
            return time.perf_counter() - started, cc

        def run_ours(entry: str, via=None) -> tuple[float, float, ContainerClient]:
            cc, cs = fresh("ls", via)
            total, calls = logsluice_run(cs, cc.container_name, records, entry)
            return total, calls, cc

        def run_core(n_records: int) -> float:
            cc, cs = fresh("core")
            seconds = core_run(cs, cc.container_name, n_records)
            blobs = cc.list_blobs(include=["metadata"])
            records_stored = sum(int(b.metadata["record_count"]) for b in blobs)
            assert records_stored == n_records + 1, f"core: {records_stored} records in blobs"
            return seconds

        # Warm-up: imports, connection pools, the extension, Azurite's JIT.
        for key in sdk:
            run_sdk(key, records[:2000])
        for entry in ENTRIES:
            run_ours(entry)
            floor(records[:2000], entry)
        run_core(2000)

        # Timed pass: rounds of every configuration in turn, so load from other processes on
        # this shared machine hits them all alike; (a) once (it is slow).
        keys = [*sdk, *(f"ls-{e}" for e in ENTRIES), *(f"floor-{e}" for e in ENTRIES), "core"]
        seconds: dict[str, list[float]] = {k: [] for k in keys}
        after_last_call: dict[str, list[float]] = {e: [] for e in ENTRIES}
        for _ in range(args.runs):
            for key in sdk:
                seconds[key].append(run_sdk(key, records)[0])
            for entry in ENTRIES:
                total, calls, _ = run_ours(entry)
                seconds[f"ls-{entry}"].append(total)
                after_last_call[entry].append(total - calls)
                seconds[f"floor-{entry}"].append(floor(records, entry))
            seconds["core"].append(run_core(n))
        naive_seconds, _ = run_sdk("a", records[:n_naive])
        rate = {k: n / statistics.median(v) for k, v in seconds.items()}
        rate["a"] = n_naive / naive_seconds
        after_calls = {e: statistics.median(v) for e, v in after_last_call.items()}
        print("timed pass, records/s:", {k: round(v) for k, v in rate.items()}, flush=True)

        # Counting pass through the proxy (untimed); stored bytes from the containers.
        proxy = CountingProxy(azurite.port)
        via = f"http://127.0.0.1:{proxy.port}/devstoreaccount1"
        requests: dict[str, float] = {}
        stored_bytes: dict[str, int] = {}
        blob_count: dict[str, int] = {}
        try:
            for key in ("a", "b", "c", "d", "ls-loguru"):
                before = proxy.count
                if key == "ls-loguru":
                    _, _, cc = run_ours("loguru", via)
                    count = n
                else:
                    recs = records[: args.count_naive_records] if key == "a" else records
                    _, cc = run_sdk(key, recs, via)
                    count = len(recs)
                requests[key] = (proxy.count - before) * 10_000 / count
                blob_count[key], total_bytes = stored(cc)
                stored_bytes[key] = total_bytes * n // count
        finally:
            proxy.close()

    names = {
        "a": "(a) blob per record",
        "b": "(b) JSON array / 100",
        "c": "(c) gzip NDJSON / 10k",
        "d": "(d) append blob / 1000",
        "ls-loguru": "logsluice via Loguru",
    }
    print(
        f"{n:,} records of ~{size:.0f} bytes of JSON into Azurite; median of {args.runs} runs "
        f"((a): one run of {n_naive:,} records; its requests counted on {args.count_naive_records:,})"
    )
    print(f"{'':28}{'records/s':>12}{'requests/10k':>14}{'stored bytes':>14}{'blobs':>8}")
    for key, label in names.items():
        print(
            f"  {label:<26}{rate[key]:>12,.0f}{requests[key]:>14.1f}"
            f"{stored_bytes[key]:>14,}{blob_count[key]:>8}"
        )
    print(f"  {'logsluice via logging':<26}{rate['ls-logging']:>12,.0f}   (same blobs and requests)")
    print(f"  {'logsluice core':<26}{rate['core']:>12,.0f}   (same blobs and requests; no logger)")
    for entry, call in (("loguru", "logger.bind(**f).info(m)"), ("logging", "log.info(m, extra=f)")):
        print(
            f"  floor: {call} into a no-op sink: {rate[f'floor-{entry}']:,.0f}/s; logsluice's "
            f"work after the last call (flush(): encode, gzip, upload): "
            f"{after_calls[entry] * 1e3:.0f} ms = {n / after_calls[entry]:,.0f} records/s"
        )
    for entry in ENTRIES:
        ours = rate[f"ls-{entry}"]
        print(
            f"  logsluice via {entry:<7} / (c) = {ours / rate['c']:.2f}x (target >= 2x), "
            f"/ (b) = {ours / rate['b']:.2f}x (target >= 5x), "
            f"/ its own no-op floor = {ours / rate[f'floor-{entry}']:.2f}x"
        )
    print(
        f"  logsluice core / (c) = {rate['core'] / rate['c']:.2f}x (target >= 2x), "
        f"/ (b) = {rate['core'] / rate['b']:.2f}x (target >= 5x)"
    )
    print(f"  logsluice requests per 10k records = {requests['ls-loguru']:.2f}   (target <= 2)")
    print(
        f"  (b) stored bytes / logsluice = {stored_bytes['b'] / stored_bytes['ls-loguru']:.1f}x   "
        f"(target >= 5x)"
    )


if __name__ == "__main__":
    main()
