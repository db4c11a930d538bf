"""`AzureBlob`: batches as gzip NDJSON block blobs in Azure Blob Storage (or Azurite)."""

from __future__ import annotations

import os
import re
from typing import Any, Optional
from urllib.parse import urlsplit, urlunsplit

from .destinations import ENV_BUILDERS, Destination, check_flag, env_level

DEFAULT_NAME_TEMPLATE = "{prefix}{kind}/{yyyy}/{mm}/{dd}/{HH}/{host}-{pid}-{start}-{seq}{ext}"
ENTRA_CREDENTIALS = ("default", "environment", "workload_identity", "managed_identity", "azure_cli")
_CONTAINER = re.compile(r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
_TOKENS = ("prefix", "kind", "yyyy", "mm", "dd", "HH", "MM", "host", "pid", "start", "seq", "ext")


def _without_query(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _where_from_connection_string(cs: str) -> str:
    """The blob endpoint a connection string points at, without its key or SAS token."""
    fields = {}
    for part in cs.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip()
    if fields.get("usedevelopmentstorage", "").lower() == "true":
        return "UseDevelopmentStorage=true"
    if "blobendpoint" in fields:
        return _without_query(fields["blobendpoint"])
    if "accountname" in fields:
        protocol = fields.get("defaultendpointsprotocol", "https")
        suffix = fields.get("endpointsuffix", "core.windows.net")
        return f"{protocol}://{fields['accountname']}.blob.{suffix}"
    return "<connection string>"


class AzureBlob(Destination):
    """Azure Blob Storage: each batch becomes one block blob of NDJSON per kind and hour,
    gzip-compressed by default, named
    ``{prefix}{kind}/{yyyy}/{mm}/{dd}/{HH}/{host}-{pid}-{start}-{seq}.ndjson.gz``, with the
    record count and first/last timestamp in the blob's metadata.

    Say where with exactly one of:

    - ``connection_string`` (account key or SAS; ``UseDevelopmentStorage=true`` for Azurite),
    - ``account_url`` with ``credential``: ``"default"`` (Entra ID: environment, workload
      identity, managed identity, Azure CLI), one of those by name, a SAS token or an account key,
    - ``container_url`` with a SAS token in its query.

    Keys and SAS tokens never appear in a repr, an error, ``stats()`` or a log line.
    """

    type = "azure_blob"
    default_name = "azure_blob"
    # Fewer, larger blobs: cheaper (per-request pricing) and faster to query in place.
    defaults = {
        "batch_max_records": 50_000,
        "batch_max_bytes": 16 * 1024 * 1024,
        "batch_max_delay": 10.0,
        "retry_initial": 0.5,
        "retry_max": 30.0,
        "attempt_timeout": 60.0,
    }

    def __init__(
        self,
        connection_string: Optional[str] = None,
        *,
        account_url: Optional[str] = None,
        credential: Optional[str] = None,
        container_url: Optional[str] = None,
        container: Optional[str] = None,
        prefix: str = "",
        compression: Optional[str] = "gzip",
        compression_level: int = 4,
        name_template: str = DEFAULT_NAME_TEMPLATE,
        create_container: bool = True,
        block_size: int = 4 * 1024 * 1024,
        max_concurrency: int = 4,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        given = [
            n
            for n, v in (
                ("connection_string", connection_string),
                ("account_url", account_url),
                ("container_url", container_url),
            )
            if v is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "AzureBlob: give exactly one of connection_string, account_url (with credential) "
                f"or container_url{'; got ' + ', '.join(given) if given else ''}"
            )
        for key, value in (
            ("connection_string", connection_string),
            ("account_url", account_url),
            ("container_url", container_url),
            ("credential", credential),
        ):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(
                    f"AzureBlob: {key} must be a non-empty string"
                    + (
                        " (credential objects are not supported; use credential='default' for Entra ID)"
                        if key == "credential"
                        else ""
                    )
                )
        if account_url is not None and credential is None and "sig=" not in account_url:
            raise ValueError(
                "AzureBlob: account_url needs credential= "
                "('default' for Entra ID, a SAS token or an account key)"
            )
        if connection_string is not None and credential is not None:
            raise ValueError(
                "AzureBlob: credential is for account_url or container_url, not a connection string"
            )
        if container_url is not None:
            if container is not None:
                raise ValueError("AzureBlob: container_url already names the container; drop container=")
            if not isinstance(container_url, str) or not container_url.startswith(("https://", "http://")):
                # Never echoed: a connection string passed here by mistake holds the account key.
                raise ValueError(
                    "AzureBlob: container_url must be an https:// URL of the container (with a SAS or "
                    "a credential=); a connection string goes in connection_string="
                )
            container = urlsplit(container_url).path.rstrip("/").rsplit("/", 1)[-1]
        container = "logs" if container is None else container
        if not isinstance(container, str) or not _CONTAINER.match(container):
            raise ValueError(
                f"AzureBlob: container {container!r} is not a valid name "
                "(3-63 lowercase letters, digits and single hyphens)"
            )
        if (
            not isinstance(prefix, str)
            or prefix.startswith("/")
            or "\\" in prefix
            or ".." in prefix.split("/")
        ):
            raise ValueError(f"AzureBlob: prefix must be a relative blob path like 'app/', got {prefix!r}")
        if compression not in (None, "gzip", "none"):
            raise ValueError(f"AzureBlob: compression must be 'gzip' or None, got {compression!r}")
        if isinstance(compression_level, bool) or compression_level not in range(10):
            raise ValueError(f"AzureBlob: compression_level must be 0..9, got {compression_level!r}")
        if not isinstance(name_template, str):
            raise ValueError("AzureBlob: name_template must be a string")
        unknown = sorted(set(re.findall(r"\{([^{}]*)\}", name_template)) - set(_TOKENS))
        if unknown:
            raise ValueError(
                f"AzureBlob: name_template has unknown token(s) {unknown}; known: {', '.join(_TOKENS)}"
            )
        missing = [t for t in ("host", "pid", "start", "seq") if "{" + t + "}" not in name_template]
        if missing:
            raise ValueError(
                "AzureBlob: name_template must contain {host}, {pid}, {start} and {seq} so names never "
                f"collide; missing: {', '.join(missing)}"
            )
        if prefix and "{prefix}" not in name_template:
            raise ValueError(
                f"AzureBlob: prefix={prefix!r} is set but name_template has no {{prefix}}: the prefix "
                "would be left out of every name"
            )
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(
                f"AzureBlob: block_size must be a positive whole number of bytes, got {block_size!r}"
            )
        self.block_size = block_size
        if (
            isinstance(max_concurrency, bool)
            or not isinstance(max_concurrency, int)
            or not 1 <= max_concurrency <= 64
        ):
            raise ValueError(f"AzureBlob: max_concurrency must be 1..64, got {max_concurrency!r}")
        self._connection_string = connection_string
        self._credential = credential
        self._container_url = container_url
        self.account_url = _without_query(account_url) if account_url is not None else None
        self._account_url = account_url
        self.container = container
        self.prefix = prefix
        self.compression = compression if compression == "gzip" else None
        self.compression_level = compression_level
        self.name_template = name_template
        self.create_container = check_flag("AzureBlob: create_container", create_container)
        self.max_concurrency = max_concurrency

    @property
    def location(self) -> str:
        """Where blobs go, safe to show: no key, no SAS token."""
        if self._container_url is not None:
            return _without_query(self._container_url)
        if self._account_url is not None:
            return f"{self.account_url.rstrip('/')}/{self.container}"
        return f"{_where_from_connection_string(self._connection_string or '')} container={self.container}"

    @property
    def auth(self) -> str:
        """How requests are authorised: 'shared_key', 'sas' or an Entra ID credential name."""
        if self._connection_string is not None:
            cs = self._connection_string.lower()
            return "shared_key" if ("accountkey=" in cs or "usedevelopmentstorage=true" in cs) else "sas"
        if self._credential is None or "sig=" in self._credential:
            return "sas"
        return self._credential if self._credential in ENTRA_CREDENTIALS else "shared_key"

    def _target(self) -> dict[str, Any]:
        return {
            "connection_string": self._connection_string,
            "account_url": self._account_url,
            "credential": self._credential,
            "container_url": self._container_url,
            "container": self.container,
            "prefix": self.prefix,
            "compression": self.compression or "none",
            "compression_level": self.compression_level,
            "name_template": self.name_template,
            "create_container": self.create_container,
            "block_size": self.block_size,
            "max_concurrency": self.max_concurrency,
        }

    def __repr__(self) -> str:
        return (
            f"AzureBlob({self.location!r}, auth={self.auth!r}, name={self.name!r}, "
            f"min_level={self.min_level}, compression={self.compression!r})"
        )


def _azure_blob_from_env() -> Optional[Destination]:
    """``AZURE_STORAGE_CONNECTION_STRING``, else ``LOGSLUICE_AZURE_CONTAINER_URL`` (SAS), else
    ``LOGSLUICE_AZURE_ACCOUNT_URL`` with ``LOGSLUICE_AZURE_CREDENTIAL`` (default ``"default"``);
    ``LOGSLUICE_AZURE_CONTAINER``, ``LOGSLUICE_AZURE_PREFIX`` and ``LOGSLUICE_AZURE_MIN_LEVEL``
    refine it."""
    env = {k: v for k, v in os.environ.items() if v.strip()}
    common: dict[str, Any] = {
        "prefix": env.get("LOGSLUICE_AZURE_PREFIX", ""),
        "min_level": env_level("LOGSLUICE_AZURE_MIN_LEVEL"),
    }
    container = env.get("LOGSLUICE_AZURE_CONTAINER")
    if "AZURE_STORAGE_CONNECTION_STRING" in env:
        return AzureBlob(env["AZURE_STORAGE_CONNECTION_STRING"], container=container, **common)
    if "LOGSLUICE_AZURE_CONTAINER_URL" in env:
        return AzureBlob(container_url=env["LOGSLUICE_AZURE_CONTAINER_URL"], **common)
    if "LOGSLUICE_AZURE_ACCOUNT_URL" in env:
        return AzureBlob(
            account_url=env["LOGSLUICE_AZURE_ACCOUNT_URL"],
            credential=env.get("LOGSLUICE_AZURE_CREDENTIAL", "default"),
            container=container,
            **common,
        )
    return None


ENV_BUILDERS.append(_azure_blob_from_env)

__all__ = ["AzureBlob", "DEFAULT_NAME_TEMPLATE"]
