"""The PostgreSQL destination: binary COPY into a table logsluice creates and maintains."""

from __future__ import annotations

import datetime as _dt
import math
import os
import re
from collections.abc import Mapping
from typing import Any, Optional, Union
from urllib.parse import urlsplit

from . import _core
from .destinations import (
    ENV_BUILDERS,
    KINDS,
    Destination,
    check_flag,
    env_flag,
    env_level,
    writable_directory,
)

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*\Z", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "": 86400}
MAX_TABLE_LEN = 48

Duration = Union[str, int, float, _dt.timedelta]


def redact_dsn(dsn: str) -> str:
    """The DSN with its password (user info or ``password=`` parameter) replaced by ``***``."""
    return _core.redact_dsn(dsn) if isinstance(dsn, str) else "<unparseable DSN>"


def parse_duration(value: Duration, what: str = "retention") -> float:
    """Seconds from ``"7d"``, ``"12h"``, ``"30m"``, ``"2w"``, ``"90s"``, a ``timedelta`` or a
    number of days."""
    if isinstance(value, _dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value) * 86400
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        raise ValueError(
            f"{what} must be like '7d', '12h', '30m', a timedelta or a number of days; got {value!r}"
        )
    if not seconds > 0 or not math.isfinite(seconds):
        raise ValueError(f"{what} must be positive and finite (None keeps everything), got {value!r}")
    return seconds


def _check_identifier(what: str, name: Any, max_len: int) -> str:
    if not isinstance(name, str) or not _IDENT.match(name):
        raise ValueError(
            f"Postgres: {what} must be letters, digits and underscores, starting with a letter or "
            f"underscore (it is used as a quoted SQL identifier); got {name!r}"
        )
    if len(name) > max_len:
        raise ValueError(f"Postgres: {what} must be at most {max_len} characters, got {len(name)}")
    return name


class Postgres(Destination):
    """PostgreSQL via binary ``COPY``: ``Postgres("postgresql://app:secret@db:5432/app")``.

    logsluice creates ``schema.table`` (``create_table=True``), partitioned by kind and UTC day
    (``partition="day"``; ``None`` for a plain table), with indexes for time, request id,
    level and route, and migrates an older table forward by adding columns. ``retention``
    keeps data for a duration (``"7d"``) or per kind (``{"app": "7d", "http": "1d"}``) by
    dropping whole day partitions. Records PostgreSQL refuses (bad data) are dropped one by
    one, counted as ``dropped.invalid``, and written to ``dead_letter_dir`` when given.
    ``notify``: after a batch commits, ``NOTIFY logsluice_<schema>_<table>`` (at most four a
    second per process) so tails wake up at once instead of at their next poll.
    """

    type = "postgres"
    default_name = "postgres"
    defaults = {
        "batch_max_records": 10_000,
        "batch_max_bytes": 8 * 1024 * 1024,
        "batch_max_delay": 1.0,
        "attempt_timeout": 30.0,
    }

    def __init__(
        self,
        dsn: str,
        *,
        table: str = "logs",
        schema: str = "public",
        partition: Optional[str] = "day",
        retention: Union[None, Duration, Mapping[str, Duration]] = None,
        create_table: bool = True,
        dead_letter_dir: Union[str, os.PathLike[str], None] = None,
        premake_days: int = 2,
        maintenance_interval: float = 3600.0,
        connect_timeout: float = 10.0,
        statement_timeout: float = 30.0,
        application_name: str = "logsluice",
        notify: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if not isinstance(dsn, str) or not dsn.startswith(("postgresql://", "postgres://")):
            shown = redact_dsn(dsn) if isinstance(dsn, str) else type(dsn).__name__
            raise ValueError(
                f"Postgres: dsn must be a postgresql://user:password@host:port/db URL, got {shown!r}"
            )
        parts = urlsplit(dsn)
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ValueError(f"Postgres: dsn has an invalid port: {redact_dsn(dsn)!r}") from None
        self._dsn = dsn
        self.dsn = redact_dsn(dsn)
        self.table = _check_identifier("table", table, MAX_TABLE_LEN)
        self.schema = _check_identifier("schema", schema, 63)
        if partition not in ("day", None):
            raise ValueError(f"Postgres: partition must be 'day' or None, got {partition!r}")
        self.partition = partition
        if retention is None:
            self.retention: dict[str, float] = {}
        elif isinstance(retention, Mapping):
            bad = [k for k in retention if k not in KINDS]
            if bad:
                raise ValueError(f"Postgres: retention keys must be among {KINDS}, got {bad!r}")
            self.retention = {k: parse_duration(v, f"retention[{k!r}]") for k, v in retention.items()}
        else:
            seconds = parse_duration(retention)
            self.retention = {k: seconds for k in KINDS}
        self.create_table = check_flag("Postgres: create_table", create_table)
        self.dead_letter_dir = (
            None
            if dead_letter_dir is None
            else writable_directory("Postgres: dead_letter_dir", dead_letter_dir)
        )
        if isinstance(premake_days, bool) or not isinstance(premake_days, int) or not 0 <= premake_days <= 60:
            raise ValueError(f"Postgres: premake_days must be a whole number 0..60, got {premake_days!r}")
        self.premake_days = premake_days
        for key, value in (
            ("maintenance_interval", maintenance_interval),
            ("connect_timeout", connect_timeout),
            ("statement_timeout", statement_timeout),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"Postgres: {key} must be a positive number of seconds, got {value!r}")
        # inf means never; the core saturates long durations (JSON has no infinity).
        self.maintenance_interval = min(float(maintenance_interval), 1e9)
        self.connect_timeout = min(float(connect_timeout), 1e9)
        self.statement_timeout = min(float(statement_timeout), 1e9)
        if not isinstance(application_name, str):
            raise ValueError(f"Postgres: application_name must be a string, got {application_name!r}")
        self.application_name = application_name
        if not isinstance(notify, bool):
            raise ValueError(f"Postgres: notify must be True or False, got {notify!r}")
        self.notify = notify

    def _target(self) -> dict[str, Any]:
        return {
            "dsn": self._dsn,
            "schema": self.schema,
            "table": self.table,
            "partition": self.partition,
            "create_table": self.create_table,
            "retention": self.retention,
            "premake_days": self.premake_days,
            "maintenance_interval": self.maintenance_interval,
            "connect_timeout": self.connect_timeout,
            "statement_timeout": self.statement_timeout,
            "dead_letter_dir": self.dead_letter_dir,
            "application_name": self.application_name,
            "notify": self.notify,
        }

    def __repr__(self) -> str:
        return (
            f"Postgres({self.dsn!r}, table={self.schema}.{self.table}, name={self.name!r}, "
            f"min_level={self.min_level}, kinds={self.kinds!r})"
        )


def _parse_retention_env(text: str) -> Union[str, dict[str, str]]:
    """``"7d"`` or ``"app=7d,http=1d"``."""
    if "=" not in text:
        return text.strip()
    out = {}
    for part in text.split(","):
        if part.strip():
            key, _, value = part.partition("=")
            out[key.strip()] = value.strip()
    return out


def _postgres_from_env() -> Optional[Destination]:
    env = os.environ
    dsn = env.get("LOGSLUICE_POSTGRES_DSN")
    if not dsn:
        return None
    kwargs: dict[str, Any] = {}
    if env.get("LOGSLUICE_POSTGRES_TABLE"):
        kwargs["table"] = env["LOGSLUICE_POSTGRES_TABLE"]
    if env.get("LOGSLUICE_POSTGRES_SCHEMA"):
        kwargs["schema"] = env["LOGSLUICE_POSTGRES_SCHEMA"]
    kwargs["min_level"] = env_level("LOGSLUICE_POSTGRES_MIN_LEVEL")
    if env.get("LOGSLUICE_POSTGRES_KINDS"):
        kwargs["kinds"] = [k.strip() for k in env["LOGSLUICE_POSTGRES_KINDS"].split(",") if k.strip()]
    if env.get("LOGSLUICE_POSTGRES_RETENTION"):
        kwargs["retention"] = _parse_retention_env(env["LOGSLUICE_POSTGRES_RETENTION"])
    if env.get("LOGSLUICE_POSTGRES_PARTITION"):
        value = env["LOGSLUICE_POSTGRES_PARTITION"].strip().lower()
        kwargs["partition"] = None if value in ("none", "") else value
    create = env_flag("LOGSLUICE_POSTGRES_CREATE_TABLE")
    if create is not None:
        kwargs["create_table"] = create
    if env.get("LOGSLUICE_POSTGRES_DEAD_LETTER_DIR"):
        kwargs["dead_letter_dir"] = env["LOGSLUICE_POSTGRES_DEAD_LETTER_DIR"]
    return Postgres(dsn, **kwargs)


ENV_BUILDERS.append(_postgres_from_env)

__all__ = ["Postgres"]
