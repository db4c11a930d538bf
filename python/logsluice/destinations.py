"""Destination configurations. Each is plain data validated at construction; the core
builds the writers from it, in its own threads, on first use."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Optional, Union

LEVELS = {"TRACE": 5, "DEBUG": 10, "INFO": 20, "SUCCESS": 25, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}
_ALIASES = {"WARN": "WARNING", "FATAL": "CRITICAL"}
KINDS = ("app", "http")
# Levels are stored as 16-bit numbers (higher ones as this).
MAX_LEVEL = 65535

# Options every destination takes, with their defaults (documented in the README).
COMMON_DEFAULTS: dict[str, Any] = {
    "queue_max_records": 100_000,
    "queue_max_bytes": 64 * 1024 * 1024,
    "on_full": "drop",
    "block_timeout": 0.1,
    "batch_max_records": 10_000,
    "batch_max_bytes": 4 * 1024 * 1024,
    "batch_max_delay": 1.0,
    "max_retries": 3,
    "retry_initial": 0.1,
    "retry_max": 10.0,
    "attempt_timeout": 30.0,
    "breaker_threshold": 5,
    "breaker_cooldown": 10.0,
}
_INTS = {
    "queue_max_records",
    "queue_max_bytes",
    "batch_max_records",
    "batch_max_bytes",
    "max_retries",
    "breaker_threshold",
}
_MAX_PREFIX_BYTES = 180
_MAY_BE_ZERO = {"block_timeout", "breaker_cooldown", "max_retries"}
# What the core's fields hold (counts are 32- or 64-bit).
_INT_LIMITS = {"max_retries": 2**32 - 1, "breaker_threshold": 2**32 - 1}
_INT_LIMIT = 2**63 - 1


def level_number(level: Union[str, int], what: str = "min_level") -> int:
    """Resolves a level name (any case) or number, or raises a ValueError that says what to fix."""
    if isinstance(level, bool):
        raise ValueError(f"{what} must be a level name or number, got {level!r}")
    if isinstance(level, int):
        if not 0 <= level <= MAX_LEVEL:
            raise ValueError(f"{what} must be a level from 0 to {MAX_LEVEL}, got {level}")
        return level
    if isinstance(level, str) and level.strip().isdigit():
        # Environment variables hold numbers as text.
        return level_number(int(level.strip()), what)
    if isinstance(level, str):
        name = level.strip().upper()
        name = _ALIASES.get(name, name)
        if name in LEVELS:
            return LEVELS[name]
    names = ", ".join(LEVELS)
    raise ValueError(f"{what}={level!r} is not a level; use one of {names} or a number")


def _check_number(name: str, value: Any) -> Union[int, float]:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if name in _INTS and not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if value < 0 or (value == 0 and name not in _MAY_BE_ZERO):
        raise ValueError(
            f"{name} must be {'zero or more' if name in _MAY_BE_ZERO else 'positive'}, got {value!r}"
        )
    limit = _INT_LIMITS.get(name, _INT_LIMIT)
    if name in _INTS and value > limit:
        raise ValueError(f"{name} must be at most {limit}, got {value!r}")
    return value


def check_flag(what: str, value: Any) -> bool:
    """A yes/no option: only True or False (a string such as "false" is a mistake, not
    a true value)."""
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be True or False, got {value!r}")
    return value


def env_flag(variable: str) -> Optional[bool]:
    """A yes/no environment variable (``1/true/yes/on``, ``0/false/no/off``), None when unset."""
    text = os.environ.get(variable, "").strip().lower()
    if not text:
        return None
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{variable} must be one of 1, true, yes, on, 0, false, no, off; got {text!r}")


def env_level(variable: str) -> int:
    """A level environment variable (a name or a number), 0 when unset."""
    text = os.environ.get(variable, "").strip()
    return level_number(text, variable) if text else 0


def writable_directory(what: str, directory: Any) -> str:
    """The absolute path of ``directory``, created if missing; a ValueError when it cannot
    be created or written."""
    if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
        raise ValueError(f"{what} must be a directory path, got {directory!r}")
    path = os.path.abspath(os.fspath(directory))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{what}: cannot create directory {path!r}: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: directory {path!r} is not writable by this process")
    return path


# Functions that build a destination from environment variables (or return None); each
# destination module appends its own. `Pipeline.from_env()` calls them in order.
ENV_BUILDERS: list[Callable[[], Optional[Destination]]] = []


class Destination:
    """Common options: routing (``min_level``, ``kinds``, ``name``), the bounded queue,
    batching, retries and the circuit breaker."""

    type: ClassVar[str]
    default_name: ClassVar[str]
    # Per-destination defaults that differ from COMMON_DEFAULTS (chosen for the store).
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        *,
        name: Optional[str] = None,
        min_level: Union[str, int] = 0,
        kinds: Iterable[str] = KINDS,
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - set(COMMON_DEFAULTS))
        if unknown:
            known = ", ".join(sorted(COMMON_DEFAULTS))
            raise ValueError(f"{type(self).__name__}: unknown option(s) {', '.join(unknown)}; known: {known}")
        self.name = self.default_name if name is None else name
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if self.name == "http":
            raise ValueError(
                "name='http' is reserved (Pipeline.stats() reports the middleware's counters under it); "
                "choose another name="
            )
        self.min_level = level_number(min_level)
        given = kinds
        kinds = [kinds] if isinstance(kinds, str) else list(kinds) if isinstance(kinds, Iterable) else []
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            kinds = given
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
        self.kinds = kinds
        common = {**COMMON_DEFAULTS, **self.defaults, **options}
        for key, value in common.items():
            if key != "on_full":
                common[key] = _check_number(key, value)
        if common["on_full"] not in ("drop", "block"):
            raise ValueError(f"on_full must be 'drop' or 'block', got {common['on_full']!r}")
        self.options = common

    def _target(self) -> dict[str, Any]:
        raise NotImplementedError

    def _spec(self) -> dict[str, Any]:
        common = {"name": self.name, "min_level": self.min_level, "kinds": self.kinds, **self.options}
        return {"common": common, "target": {"type": self.type, **self._target()}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, min_level={self.min_level}, kinds={self.kinds!r})"


class LocalFiles(Destination):
    """NDJSON files in ``directory`` (created if missing), one record per line.

    Files rotate by size (``max_file_bytes``) and by time (``rotate="hourly"``, ``"daily"``,
    a number of seconds, or ``None``); rotated files can be gzipped (``compress=True``) and
    only the newest ``keep`` kept. Names sort by creation time:
    ``{prefix}-{UTC timestamp}-{pid}-{seq}.ndjson``.
    """

    type = "local_files"
    default_name = "local_files"
    defaults = {"batch_max_delay": 0.5}

    def __init__(
        self,
        directory: Union[str, os.PathLike[str]] = "./logs",
        *,
        prefix: str = "logsluice",
        max_file_bytes: int = 100 * 1024 * 1024,
        rotate: Union[str, int, None] = "hourly",
        compress: bool = False,
        keep: Optional[int] = None,
        fsync: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.directory = writable_directory("LocalFiles: directory", directory)
        if not isinstance(prefix, str) or not prefix or any(c in prefix for c in "/\\\0"):
            raise ValueError(f"LocalFiles: prefix must be a plain file name part, got {prefix!r}")
        size = len(prefix.encode("utf-8", "surrogateescape"))
        if size > _MAX_PREFIX_BYTES:
            # File names stop at 255 bytes; the timestamp, pid, sequence and suffix take the rest.
            raise ValueError(f"LocalFiles: prefix must be at most {_MAX_PREFIX_BYTES} bytes, got {size}")
        self.prefix = prefix
        if isinstance(max_file_bytes, float):
            raise ValueError(f"LocalFiles: max_file_bytes must be a whole number, got {max_file_bytes!r}")
        self.max_file_bytes = int(_check_number("max_file_bytes", max_file_bytes))
        rotations = {"hourly": 3600, "daily": 86400, None: 0}
        if isinstance(rotate, int) and not isinstance(rotate, bool) and rotate > 0:
            self.rotate_seconds = rotate
        elif rotate in rotations:
            self.rotate_seconds = rotations[rotate]
        else:
            raise ValueError(f"LocalFiles: rotate must be 'hourly', 'daily', None or seconds, got {rotate!r}")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"LocalFiles: keep must be a positive whole number or None, got {keep!r}")
        self.keep = keep or 0
        self.compress = check_flag("LocalFiles: compress", compress)
        self.fsync = check_flag("LocalFiles: fsync", fsync)

    def _target(self) -> dict[str, Any]:
        return {
            "directory": self.directory,
            "prefix": self.prefix,
            "max_file_bytes": self.max_file_bytes,
            "rotate_seconds": self.rotate_seconds,
            "compress": self.compress,
            "keep": self.keep,
            "fsync": self.fsync,
        }

    def __repr__(self) -> str:
        return f"LocalFiles({self.directory!r}, name={self.name!r}, min_level={self.min_level})"


class _Controlled(Destination):
    """Fails, stalls or succeeds on demand (a control file holds ``ok``, ``fail``,
    ``fail_permanent`` or ``stall``). For testing the breaker, retries and back-pressure
    through the real core."""

    type = "controlled"
    default_name = "controlled"

    def __init__(self, control_file: str, output_file: str, **options: Any) -> None:
        super().__init__(**options)
        self.control_file = os.fspath(control_file)
        self.output_file = os.fspath(output_file)

    def _target(self) -> dict[str, Any]:
        return {"control_file": self.control_file, "output_file": self.output_file}


def _local_files_from_env() -> Optional[Destination]:
    directory = os.environ.get("LOGSLUICE_DIR")
    if not directory:
        return None
    return LocalFiles(directory, min_level=env_level("LOGSLUICE_DIR_MIN_LEVEL"))


ENV_BUILDERS.append(_local_files_from_env)
