//! Records per second through the logsluice core into Azure Blob Storage, with the records
//! handed over the way the Python SDK baselines get theirs: as (message, fields) pairs, turned
//! into records inside the timed loop, then queued, batched, encoded, gzipped and uploaded by a
//! real `Core` at the AzureBlob destination's default settings. Run by
//! benches/bench_azure_blob.py, which owns Azurite, creates the container and checks the blobs:
//!
//!     LOGSLUICE_BENCH_CONNECTION_STRING=... LOGSLUICE_BENCH_CONTAINER=c \
//!     LOGSLUICE_BENCH_RECORDS=20000 cargo bench --bench azure_blob_core
//!
//! Prints one line: `records=N seconds=S records_per_sec=R written=W`.

#[path = "support/timed_core.rs"]
mod timed_core;

use logsluice::config::{AzureBlobConfig, Common, DestinationSpec, OnFull, Target};
use logsluice::record::{Kind, Record};
use serde_json::{json, Map, Value};

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The (message, fields) pairs benches/bench_azure_blob.py's make_records builds.
fn pair(i: u64) -> (String, Map<String, Value>) {
    let order = 100_000 + i;
    let customer = format!("cust-{:04}", i % 997);
    let mut fields = Map::new();
    fields.insert("order_id".into(), Value::from(order));
    fields.insert("customer".into(), json!(customer));
    fields.insert("amount_cents".into(), Value::from((i * 7919) % 100_000));
    fields.insert(
        "request_id".into(),
        json!(format!("{:032x}", u128::from(i) * 2_654_435_761)),
    );
    fields.insert(
        "path".into(),
        json!(format!("/api/v1/orders/{order}/items")),
    );
    let message = format!(
        "order {order} processed for customer {customer} in {} ms",
        i % 250
    );
    (message, fields)
}

fn record(message: String, fields: &Map<String, Value>) -> Record {
    let mut r = Record::new(
        chrono::Utc::now().timestamp_micros(),
        "INFO",
        20,
        Kind::App,
        message,
    );
    r.logger = "app.orders".into();
    r.module = "orders".into();
    r.function = "process".into();
    r.line = 42;
    r.process = std::process::id();
    r.set_fields(fields);
    r.finish(64 << 10)
}

fn main() {
    let connection_string =
        env("LOGSLUICE_BENCH_CONNECTION_STRING").expect("set LOGSLUICE_BENCH_CONNECTION_STRING");
    let container = env("LOGSLUICE_BENCH_CONTAINER").expect("set LOGSLUICE_BENCH_CONTAINER");
    let n: u64 = env("LOGSLUICE_BENCH_RECORDS").map_or(20_000, |v| v.parse().unwrap());

    // The defaults python/logsluice/azure_blob.py gives this destination.
    let spec = DestinationSpec {
        common: Common {
            name: "azure_blob".into(),
            on_full: OnFull::Block,
            block_timeout: 60.0,
            batch_max_records: 50_000,
            batch_max_bytes: 16 << 20,
            batch_max_delay: 10.0,
            retry_initial: 0.5,
            retry_max: 30.0,
            attempt_timeout: 60.0,
            ..Default::default()
        },
        target: Target::AzureBlob(AzureBlobConfig {
            connection_string: Some(connection_string),
            container,
            ..Default::default()
        }),
    };
    // Connect and find the container before the clock starts.
    let (message, fields) = pair(n);
    let core = timed_core::started(spec, record(message, &fields));
    let pairs: Vec<_> = (0..n).map(pair).collect();
    let records = pairs.into_iter().map(|(m, f)| record(m, &f));
    timed_core::timed(core, "records", n, records);
}
