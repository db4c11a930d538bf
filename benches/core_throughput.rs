//! The core alone: pre-built records through `Core::submit` into LocalFiles, timed from
//! the first submit until `flush` returns and the lines are on disk.
//! Run: `cargo bench --bench core_throughput` (prints one JSON line).

use std::sync::Arc;
use std::time::{Duration, Instant};

use logsluice::config::{
    Common, DestinationSpec, LocalFilesConfig, OnFull, PipelineOptions, Target,
};
use logsluice::pipeline::Core;
use logsluice::record::{Kind, Record};
use serde_json::{Map, Value};

fn record(i: i64) -> Record {
    let mut r = Record::new(
        1_700_000_000_000_000 + i,
        "INFO",
        20,
        Kind::App,
        format!("cart updated for user-{}", i % 5000),
    );
    r.logger = "shop.checkout".into();
    r.module = "checkout".into();
    r.function = "update_cart".into();
    r.line = 42;
    r.process = 4242;
    r.thread = 140_000_000_000 + (i % 4) as u64;
    let mut f = Map::new();
    f.insert("user".into(), Value::from(format!("user-{}", i % 5000)));
    f.insert("cart_items".into(), Value::from(i % 9));
    r.set_fields(&f);
    r.finish(64 << 10)
}

fn main() {
    let n: i64 = std::env::var("BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = logsluice::scratch::ScratchDir::new().expect("temp dir");
    let spec = DestinationSpec {
        // Back-pressure instead of drops, so the figure is the sustained write rate.
        common: Common {
            name: "local_files".into(),
            on_full: OnFull::Block,
            block_timeout: 60.0,
            ..Default::default()
        },
        target: Target::LocalFiles(LocalFilesConfig {
            directory: dir.path().to_string_lossy().into(),
            ..Default::default()
        }),
    };
    let records: Vec<Record> = (0..n).map(record).collect();
    if std::env::var("BENCH_PARTS").is_ok() {
        let arcs: Vec<Arc<Record>> = (0..n).map(|i| Arc::new(record(i))).collect();
        let t = Instant::now();
        let mut buf = Vec::with_capacity(8 << 20);
        for chunk in arcs.chunks(10_000) {
            buf.clear();
            logsluice::encode::encode_batch(chunk.iter().map(|r| &**r), &mut buf);
        }
        eprintln!(
            "encode: {:.0} ns/record",
            t.elapsed().as_nanos() as f64 / n as f64
        );
        let t = Instant::now();
        drop(arcs);
        eprintln!(
            "drop: {:.0} ns/record",
            t.elapsed().as_nanos() as f64 / n as f64
        );
    }
    let core = Core::start(vec![spec], PipelineOptions::default(), Arc::new(|_, _| {}));
    let started = Instant::now();
    for r in records {
        Core::wait_for_room(core.submit(r));
    }
    let submitted = started.elapsed();
    core.flush(Duration::from_secs(600)).expect("flush");
    let total = started.elapsed();
    let stats = &core.stats()[0].1;
    core.close(Duration::from_secs(60)).expect("close");
    let mut lines = 0usize;
    for entry in std::fs::read_dir(dir.path()).expect("read dir") {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("read file");
        lines += bytes.iter().filter(|b| **b == b'\n').count();
    }
    assert_eq!(lines as i64, n, "every record on disk");
    println!(
        "{{\"records\": {n}, \"written\": {}, \"dropped\": {}, \"submit_per_s\": {:.0}, \"end_to_end_per_s\": {:.0}}}",
        stats.counters.written,
        stats.counters.dropped_total(),
        n as f64 / submitted.as_secs_f64(),
        n as f64 / total.as_secs_f64()
    );
}
