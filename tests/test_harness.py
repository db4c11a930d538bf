"""The harness itself: if these fail, every integration test's failure is suspect."""

import psycopg
import pytest
from azure.storage.blob import BlobServiceClient


def test_postgres_accepts_app_role_and_rejects_wrong_password(postgres):
    with psycopg.connect(postgres.dsn) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert postgres.psql("select current_user") == [("postgres",)]

    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(postgres.dsn_with(password="wrong"), connect_timeout=5).close()


def test_azurite_round_trips_a_blob(azurite):
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    container = service.create_container("harness")
    container.upload_blob("hello.txt", b"hello \x00 world")
    assert container.download_blob("hello.txt").readall() == b"hello \x00 world"
