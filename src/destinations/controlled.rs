//! A destination that fails, stalls or succeeds on demand, steered by a control file.
//! It exists so tests of the breaker, retries and queue-full accounting run through the
//! real core and the real Python API, not a mock of either.

use std::fs;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Outcome, WriteError, Writer};
use crate::config::ControlledConfig;
use crate::encode::encode_batch;
use crate::record::Record;

pub struct Controlled {
    cfg: ControlledConfig,
}

impl Controlled {
    pub fn new(cfg: ControlledConfig) -> Self {
        Controlled { cfg }
    }

    /// `ok` (default), `fail`, `fail_permanent` or `stall` (hold the batch until told otherwise).
    fn mode(&self) -> String {
        fs::read_to_string(&self.cfg.control_file)
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "ok".into())
    }

    fn log_attempt(&self, n: usize, outcome: &str) {
        let path = format!("{}.attempts", self.cfg.output_file);
        if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{n} {outcome}");
        }
    }
}

impl Writer for Controlled {
    fn write_batch(
        &mut self,
        batch: &[Arc<Record>],
        timeout: Duration,
    ) -> Result<Outcome, WriteError> {
        let started = Instant::now();
        loop {
            match self.mode().as_str() {
                "stall" if started.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                "stall" => {
                    self.log_attempt(batch.len(), "timeout");
                    return Err(WriteError::transient("attempt timed out"));
                }
                "fail" => {
                    self.log_attempt(batch.len(), "fail");
                    return Err(WriteError::transient("controlled transient failure"));
                }
                "fail_permanent" => {
                    self.log_attempt(batch.len(), "fail_permanent");
                    return Err(WriteError::permanent("controlled permanent failure"));
                }
                _ => break,
            }
        }
        let mut buf = Vec::new();
        encode_batch(batch.iter().map(|r| &**r), &mut buf);
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.cfg.output_file)
            .map_err(|e| WriteError::transient(format!("cannot open output: {e}")))?;
        f.write_all(&buf)
            .map_err(|e| WriteError::transient(format!("cannot write output: {e}")))?;
        self.log_attempt(batch.len(), "ok");
        Ok(Outcome::default())
    }
}
