"""Shared fixtures: real PostgreSQL and Azurite (started on first use, once per session)."""

import pytest
from harness import AzuriteServer, PostgresServer
from loguru import logger


@pytest.fixture(scope="session")
def postgres():
    """PostgresServer: .dsn (app/secret), .port, .psql(sql), .stop(), .start()."""
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def azurite():
    """AzuriteServer: .connection_string, .blob_endpoint, .port, .stop(), .start()."""
    with AzuriteServer() as server:
        yield server


@pytest.fixture(autouse=True)
def _restart_stopped_services(request):
    # A test that stop()s a shared server and then fails must not break later tests.
    names = [n for n in ("postgres", "azurite") if n in request.fixturenames]
    servers = [request.getfixturevalue(n) for n in names]
    yield
    for server in servers:
        server.ensure_running()


@pytest.fixture
def tmp_logs(tmp_path):
    """A fresh, empty directory for a LocalFiles destination."""
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture
def loguru():
    """Loguru's logger with no handler but the ones a test attaches."""
    logger.remove()
    yield logger
    logger.remove()
