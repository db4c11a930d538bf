//! Rows per second through the logsluice core into PostgreSQL: records are built before the
//! clock starts, then submitted to a real `Core` (queue, batcher, breaker, COPY writer) and
//! flushed. Run by benches/bench_postgres.py, which owns the server and checks the counts:
//!
//!     LOGSLUICE_BENCH_DSN=postgresql://... LOGSLUICE_BENCH_TABLE=t \
//!     LOGSLUICE_BENCH_ROWS=200000 LOGSLUICE_BENCH_BATCH=10000 cargo bench --bench postgres_copy
//!
//! Prints one line: `rows=N seconds=S rows_per_sec=R written=W`.

#[path = "support/timed_core.rs"]
mod timed_core;

use logsluice::config::{Common, DestinationSpec, OnFull, PostgresConfig, Target};
use logsluice::record::{Kind, Record};
use serde_json::{json, Map, Value};

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The same rows benches/bench_postgres.py builds for the baselines.
fn record(i: u64, t0_us: i64) -> Record {
    let mut r = Record::new(
        t0_us + i as i64,
        "INFO",
        20,
        Kind::App,
        format!("request handled {i}"),
    );
    r.logger = "app.bench".into();
    r.module = "bench".into();
    r.function = "handler".into();
    r.line = 42;
    r.process = 1234;
    r.thread = 5678;
    r.request_id = Some(format!("req-{}", i % 1000));
    let mut fields = Map::new();
    fields.insert("user_id".into(), Value::from(i));
    fields.insert("path".into(), json!("/api/items"));
    fields.insert("ok".into(), json!(true));
    r.set_fields(&fields);
    r.finish(64 << 10)
}

fn main() {
    let dsn = env("LOGSLUICE_BENCH_DSN").expect("set LOGSLUICE_BENCH_DSN");
    let table = env("LOGSLUICE_BENCH_TABLE").unwrap_or_else(|| "bench_core".into());
    let rows: u64 = env("LOGSLUICE_BENCH_ROWS").map_or(200_000, |v| v.parse().unwrap());
    let batch: usize = env("LOGSLUICE_BENCH_BATCH").map_or(10_000, |v| v.parse().unwrap());
    let t0_us = env("LOGSLUICE_BENCH_T0_US").map_or_else(
        || chrono::Utc::now().timestamp_micros(),
        |v| v.parse().unwrap(),
    );

    let spec = DestinationSpec {
        common: Common {
            name: "postgres".into(),
            on_full: OnFull::Block,
            block_timeout: 60.0,
            batch_max_records: batch,
            batch_max_bytes: 64 << 20,
            batch_max_delay: 0.05,
            ..Default::default()
        },
        target: Target::Postgres(PostgresConfig {
            dsn,
            table,
            ..Default::default()
        }),
    };
    // Connect and check the schema before the clock starts.
    let core = timed_core::started(spec, record(rows, t0_us));
    let records: Vec<Record> = (0..rows).map(|i| record(i, t0_us)).collect();
    timed_core::timed(core, "rows", rows, records.into_iter());
}
