"""Records lost to a PostgreSQL outage, with every option at its default, beside the naive
handler (one INSERT per record on the logging thread, errors swallowed) in the same run.

The app logs at a steady rate through one stdlib logger that has both handlers. The server
is stopped for a while mid-run and started again; afterwards each side's rows are counted.
logsluice holds what it cannot write (within the queue's bounds) and writes it once the
server is back; the figures are how many records each side lost and how long after the
restart logsluice was delivering again (the breaker's next probe).

    .venv/bin/python benches/bench_outage.py [--rate 500] [--before 3] [--outage 3] [--after 15]
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import logsluice  # noqa: E402
from harness import PostgresServer  # noqa: E402


class NaiveHandler(logging.Handler):
    """What teams write first: one INSERT per record, a failure swallowed (and the record
    with it), a reconnect attempted on the next record."""

    def __init__(self, dsn: str) -> None:
        super().__init__()
        self.dsn = dsn
        self.conn: psycopg.Connection | None = None
        self.lost = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self.conn is None or self.conn.closed:
                self.conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=2)
            self.conn.execute("insert into naive (message) values (%s)", (record.getMessage(),))
        except Exception:
            self.lost += 1
            if self.conn is not None:
                self.conn.close()
            self.conn = None


class Recovery(logging.Handler):
    """Notes when the logsluice destination reports it is delivering again."""

    def __init__(self) -> None:
        super().__init__()
        self.at: float | None = None
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if "delivering again" in record.getMessage() and self.at is None:
            self.at = time.monotonic()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=500.0, help="records per second")
    ap.add_argument("--before", type=float, default=3.0)
    ap.add_argument("--outage", type=float, default=3.0)
    ap.add_argument("--after", type=float, default=15.0)
    args = ap.parse_args()

    with PostgresServer() as pg:
        pg.psql(
            "create table naive (id bigserial primary key, message text);"
            " grant all on naive, naive_id_seq to app"
        )
        pipeline = logsluice.Pipeline(logsluice.Postgres(pg.dsn, table="outage"))
        app = logging.getLogger("bench.outage")
        app.propagate = False
        app.setLevel(logging.INFO)
        app.addHandler(pipeline.logging_handler())
        naive = NaiveHandler(pg.dsn)
        app.addHandler(naive)
        recovery = Recovery()
        logging.getLogger("logsluice").addHandler(recovery)
        logging.getLogger("logsluice").setLevel(logging.INFO)

        total = args.before + args.outage + args.after
        events: dict[str, float] = {}

        def operator() -> None:
            time.sleep(args.before)
            pg.stop()
            events["stopped"] = time.monotonic()
            time.sleep(args.outage)
            pg.start()
            events["started"] = time.monotonic()

        ops = threading.Thread(target=operator)
        start = time.monotonic()
        ops.start()
        sent = 0
        while time.monotonic() - start < total:
            app.info("record %d", sent)
            sent += 1
            next_at = start + sent / args.rate
            time.sleep(max(0.0, next_at - time.monotonic()))
        ops.join()
        pipeline.flush(120)
        stats = pipeline.stats()["postgres"]
        pipeline.close()

        stored = pg.psql("select count(*), count(distinct message) from outage")[0]
        naive_stored = pg.psql("select count(*) from naive")[0][0]
        down = events["started"] - events["stopped"]
        again = (recovery.at - events["started"]) if recovery.at else float("nan")
        for message in recovery.messages:
            print(f"  reported: {message}")
        print(f"PostgreSQL down {down:.1f} s while the app logged {sent} records at {args.rate:.0f}/s")
        print(
            f"  logsluice (defaults): stored {stored[0]} ({stored[1]} distinct), lost {sent - stored[0]}"
            f" = {100 * (sent - stored[0]) / sent:.2f}%; dropped {stats['dropped']};"
            f" delivering again {again:.1f} s after the restart"
        )
        print(
            f"  naive INSERT per record: stored {naive_stored}, lost {sent - naive_stored}"
            f" = {100 * (sent - naive_stored) / sent:.2f}%"
        )


if __name__ == "__main__":
    main()
