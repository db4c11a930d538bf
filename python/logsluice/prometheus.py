"""A ``prometheus_client`` collector for a pipeline's ``stats()`` (``pip install logsluice[prometheus]``).

    from prometheus_client import REGISTRY
    from logsluice.prometheus import Collector
    REGISTRY.register(Collector(pipeline))   # the app's existing /metrics now shows them

Every counter of ``stats()`` per destination (label ``destination``): records accepted,
written, dropped by reason, retries, batches; gauges for what is in flight and queued, the
breaker state and the batch write latency quantiles; the middleware's request counters.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# Monotonic counters in a destination's stats(); other numbers are exported as gauges.
_COUNTERS = {
    "accepted": "records accepted by the destination's queue",
    "written": "records written to the destination",
    "retries": "batch write retries",
    "batches": "batches written",
    "spilled": "records written to the spill directory at close, for the next start",
    "replayed": "records read back from the spill directory and queued",
    "spill_bad_lines": "spill file lines skipped as unreadable",
}
_SKIP = {"dropped_total", "dropped", "breaker", "last_error", "flush_latency_ms"}
_BREAKER_STATES = ("closed", "open", "half_open")


class Collector:
    """Reads ``pipeline.stats()`` at every scrape; costs one call into the core, no I/O."""

    def __init__(self, pipeline: Any, namespace: str = "logsluice") -> None:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise ImportError(
                "logsluice.prometheus needs prometheus_client: pip install 'logsluice[prometheus]'"
            ) from None
        self.pipeline = pipeline
        self.ns = namespace

    def describe(self) -> list[Any]:
        # No fixed description: the destinations decide which metrics exist.
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        ns = self.ns
        stats = self.pipeline.stats()
        counters = {
            key: CounterMetricFamily(
                f"{ns}_records_{key}" if key in ("accepted", "written") else f"{ns}_{key}",
                help_text,
                labels=["destination"],
            )
            for key, help_text in _COUNTERS.items()
        }
        dropped = CounterMetricFamily(
            f"{ns}_records_dropped", "records dropped, by reason", labels=["destination", "reason"]
        )
        breaker = GaugeMetricFamily(
            f"{ns}_breaker_state",
            "circuit breaker state (1 for the current one)",
            labels=["destination", "state"],
        )
        latency = GaugeMetricFamily(
            f"{ns}_batch_write_latency_ms",
            "batch write latency quantiles",
            labels=["destination", "quantile"],
        )
        gauges: dict[str, Any] = {}
        http_metrics: list[Any] = []
        for dest, s in stats.items():
            if dest == "http":
                for key, value in s.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        kind = GaugeMetricFamily if key == "handoff_waiting" else CounterMetricFamily
                        m = kind(f"{ns}_http_{key}", f"ASGI middleware: {key.replace('_', ' ')}")
                        m.add_metric([], value)
                        http_metrics.append(m)
                continue
            for key, value in s.items():
                if key in counters and isinstance(value, (int, float)):
                    counters[key].add_metric([dest], value)
                elif key not in _SKIP and isinstance(value, (int, float)) and not isinstance(value, bool):
                    if key not in gauges:
                        gauges[key] = GaugeMetricFamily(
                            f"{ns}_{key}", key.replace("_", " "), labels=["destination"]
                        )
                    gauges[key].add_metric([dest], value)
            for reason, value in (s.get("dropped") or {}).items():
                dropped.add_metric([dest, reason], value)
            state = str(s.get("breaker") or "closed")
            for known in sorted(set(_BREAKER_STATES) | {state}):
                breaker.add_metric([dest, known], 1.0 if known == state else 0.0)
            for quantile, value in (s.get("flush_latency_ms") or {}).items():
                if isinstance(value, (int, float)):
                    latency.add_metric([dest, quantile], value)
        yield from counters.values()
        yield dropped
        yield breaker
        yield latency
        yield from gauges.values()
        yield from http_metrics


def register(pipeline: Any, registry: Any = None) -> Collector:
    """Registers a :class:`Collector` for ``pipeline`` (with the default registry unless given)."""
    if registry is None:
        from prometheus_client import REGISTRY as registry
    collector = Collector(pipeline)
    registry.register(collector)
    return collector


__all__ = ["Collector", "register"]
