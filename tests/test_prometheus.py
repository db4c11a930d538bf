"""The Prometheus collector exposes every counter of stats() per destination."""

from __future__ import annotations

import logsluice
import pytest
from loguru import logger

prometheus_client = pytest.importorskip("prometheus_client")
from logsluice.prometheus import Collector, register  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


def samples(registry) -> dict[tuple[str, tuple], float]:
    text = prometheus_client.generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_collector_reports_stats_per_destination(tmp_logs, tmp_path):
    pipeline = logsluice.Pipeline(
        logsluice.LocalFiles(tmp_logs),
        logsluice.LocalFiles(tmp_path / "errors", name="errors", min_level="ERROR"),
    )
    handler = pipeline.attach(logger, level="INFO")
    try:
        for i in range(10):
            logger.info("record {}", i)
        logger.error("one error")
        pipeline.flush(timeout=30)
        registry = prometheus_client.CollectorRegistry()
        register(pipeline, registry)
        got = samples(registry)
        stats = pipeline.stats()
        for dest in ("local_files", "errors"):
            label = (("destination", dest),)
            assert got[("logsluice_records_written_total", label)] == stats[dest]["written"]
            assert got[("logsluice_records_accepted_total", label)] == stats[dest]["accepted"]
            assert got[("logsluice_batches_total", label)] == stats[dest]["batches"]
            assert got[("logsluice_in_flight", label)] == 0
            assert got[("logsluice_breaker_state", (("destination", dest), ("state", "closed")))] == 1
            assert got[("logsluice_breaker_state", (("destination", dest), ("state", "open")))] == 0
            for reason in stats[dest]["dropped"]:
                key = ("logsluice_records_dropped_total", (("destination", dest), ("reason", reason)))
                assert got[key] == 0
        assert got[("logsluice_records_written_total", (("destination", "local_files"),))] == 11
        assert got[("logsluice_records_written_total", (("destination", "errors"),))] == 1
        # Scrapes read fresh numbers.
        logger.info("one more")
        pipeline.flush(timeout=30)
        assert samples(registry)[("logsluice_records_written_total", (("destination", "local_files"),))] == 12
        assert isinstance(Collector(pipeline).describe(), list)
    finally:
        logger.remove(handler)
        pipeline.close()
