//! What the benches that drive a real `Core` into a server share: one destination started
//! with a warm-up record (connected before the clock starts, as a running app would be), the
//! timed hand-off and flush, and the line benches/*.py parse.

use std::sync::Arc;
use std::time::{Duration, Instant};

use logsluice::config::{DestinationSpec, PipelineOptions};
use logsluice::pipeline::{Core, Reporter};
use logsluice::record::Record;

pub fn started(spec: DestinationSpec, warm_up: Record) -> Arc<Core> {
    let reporter: Reporter = Arc::new(|_, m: &str| eprintln!("{m}"));
    let core = Core::start(vec![spec], PipelineOptions::default(), reporter);
    core.submit(warm_up);
    core.flush(Duration::from_secs(60)).expect("warm-up flush");
    core
}

/// Hands `records` over, waiting for room when the queue is full, flushes, and prints
/// `{unit}={n} seconds=S {unit}_per_sec=R written=W` (the warm-up record not counted).
pub fn timed(core: Arc<Core>, unit: &str, n: u64, records: impl Iterator<Item = Record>) {
    let started = Instant::now();
    for r in records {
        let blocked = core.submit(r);
        if !blocked.is_empty() {
            Core::wait_for_room(blocked);
        }
    }
    core.flush(Duration::from_secs(600)).expect("flush");
    let seconds = started.elapsed().as_secs_f64();
    let stats = core.stats();
    let c = &stats[0].1.counters;
    if let Some(e) = &c.last_error {
        eprintln!("last_error: {e}");
    }
    println!(
        "{unit}={n} seconds={seconds:.3} {unit}_per_sec={:.0} written={}",
        n as f64 / seconds,
        c.written - 1
    );
    core.close(Duration::from_secs(10)).expect("close");
}
