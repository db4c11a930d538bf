"""A throwaway PostgreSQL 15 cluster on 127.0.0.1, for tests only (fsync off)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from harness._net import ManagedServer, free_port, tail

PG_USER = "logsluice-pg"  # initdb/postgres refuse to run as root
SUPERUSER = "postgres"
APP_USER, APP_PASSWORD, APP_DB = "app", "secret", "app"

_HBA = """\
# Unix socket: trusted superuser for the harness itself.
local all all trust
# TCP: passwords required, so tests can check what a wrong password does.
host all all 127.0.0.1/32 scram-sha-256
"""


def _bindir() -> Path:
    env = os.environ.get("LOGSLUICE_PG_BINDIR")
    if env:
        return Path(env)
    default = Path("/usr/lib/postgresql/15/bin")
    if (default / "initdb").exists():
        return default
    found = shutil.which("initdb")
    if not found:
        raise RuntimeError("PostgreSQL 15 not found: apt-get install postgresql-15")
    return Path(found).resolve().parent


def _ensure_pg_user() -> None:
    try:
        pwd.getpwnam(PG_USER)
        return
    except KeyError:
        pass
    cmd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
    r = subprocess.run([*cmd, PG_USER], check=False, capture_output=True, text=True)
    if r.returncode not in (0, 9):  # 9: created meanwhile by a parallel run
        raise RuntimeError(f"useradd {PG_USER} failed: {r.stderr}")


class PostgresServer(ManagedServer):
    def __init__(self, port: int | None = None):
        self.bindir = _bindir()
        self.port = port or free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            _ensure_pg_user()
        # As root, /tmp rather than $TMPDIR: the server user must reach every parent.
        parent = "/tmp" if self.as_root else None
        self.dir = Path(tempfile.mkdtemp(prefix="logsluice-pg-", dir=parent))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        if self.as_root:
            shutil.chown(self.dir, PG_USER, PG_USER)
        self.running = False
        self.dsn = self.dsn_with()
        try:
            self._initdb()
            self.start()
            self._create_app_role()
        except BaseException:
            self.close()
            raise

    def dsn_with(self, user: str = APP_USER, password: str = APP_PASSWORD, db: str = APP_DB) -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{db}"

    def _pg_ctl(self, *argv: str) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", *argv)

    def _run(self, *argv: str) -> None:
        cmd = [str(self.bindir / argv[0]), *argv[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", PG_USER, "--", *cmd]
        # cwd: the server user may not be allowed into the caller's directory.
        r = subprocess.run(cmd, check=False, cwd=self.dir, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(
                f"{' '.join(argv)} failed ({r.returncode}):\n{r.stdout}{r.stderr}\n"
                f"--- {self.log}:\n{tail(self.log)}"
            )

    def _initdb(self) -> None:
        args = ["--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"]
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, *args)
        (self.data / "pg_hba.conf").write_text(_HBA)
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(
                "\n# logsluice test harness\n"
                "listen_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.dir}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            )

    def _create_app_role(self) -> None:
        self.psql(f"CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'", dbname="postgres")
        self.psql(f"CREATE DATABASE {APP_DB} OWNER {APP_USER}", dbname="postgres")

    def start(self) -> None:
        """Start (again) on the same port and data dir."""
        if not self.running:
            self._pg_ctl("start", "-l", str(self.log))
            self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; mode "immediate" is a crash-like stop (no checkpoint)."""
        if self.running:
            self._pg_ctl("stop", "-m", mode)
            self.running = False

    def ensure_running(self) -> None:
        self.start()

    def psql(self, sql: str, params=None, dbname: str = APP_DB) -> list[tuple]:
        """Run SQL as superuser over the unix socket; rows if it returns any, else []."""
        with psycopg.connect(
            host=str(self.dir),
            port=self.port,
            user=SUPERUSER,
            dbname=dbname,
            autocommit=True,
        ) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []
