"""Types of the native module (Rust, PyO3)."""

from contextvars import ContextVar
from logging import LogRecord
from typing import Any, Callable, Optional

__version__: str

class LoguruSink:
    def write(self, message: Any) -> None: ...
    def stop(self) -> None: ...

class Core:
    def __init__(
        self,
        specs_json: str,
        options_json: str,
        report: Callable[[int, str], object],
        request_id_var: ContextVar[Optional[str]],
    ) -> None: ...
    def write_loguru(self, message: Any) -> None: ...
    def write_logging(self, record: LogRecord) -> None: ...
    def http_lane_stats(self) -> tuple[int, int]: ...
    def stats(self) -> dict[str, dict[str, Any]]: ...
    def flush(self, timeout: float = 5.0) -> None: ...
    def close(self, timeout: float = 10.0) -> Optional[str]: ...
    @property
    def closed(self) -> bool: ...
    def loguru_sink(self) -> LoguruSink: ...

class HttpSink:
    """One LoggingMiddleware's hand-off into a pipeline, with its redaction settings."""

    def __init__(self, core: Core, config_json: str) -> None: ...
    def write(
        self,
        scope: dict[str, Any],
        path: str,
        route: Optional[str],
        status: int,
        response_headers: Any,
        request_chunks: Optional[list[bytes]],
        request_size: int,
        response_chunks: Optional[list[bytes]],
        response_size: int,
        flags: int,
        start: float,
        duration_ms: float,
        ttfb_ms: Optional[float],
        request_id: str,
        exception: Optional[BaseException],
        sample_rate: float,
    ) -> None: ...
    def scrub(self, text: str) -> str: ...

def redaction_defaults() -> dict[str, list[str]]: ...
def request_id(inbound: Optional[bytes] = None) -> str: ...
def _mark_interpreter_exit() -> None: ...
