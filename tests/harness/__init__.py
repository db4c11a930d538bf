"""Real services for the tests: a throwaway PostgreSQL 15 cluster and Azurite (blob only).

Both bind to 127.0.0.1 only, on a free port, with their data in a temp dir that `close()`
removes; `stop()`/`start()` keep the port and data so tests can simulate an outage.
"""

from harness.azurite import AzuriteServer
from harness.postgres import PostgresServer

__all__ = ["AzuriteServer", "PostgresServer"]
