//! Writing what one destination holds at close into a spill file of its own.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;

use super::{SpillDir, PARTIAL, READY};
use crate::encode::write_ndjson;
use crate::flock::HeldFile;
use crate::metrics::DropReason;
use crate::record::Record;

pub struct SpillWriter {
    dir: Arc<SpillDir>,
    key: String,
    open: Option<(PathBuf, BufWriter<HeldFile>)>,
    records: u64,
    /// Records dropped because the directory was at its bound.
    full: u64,
    /// Once the directory is full or failed, the rest is dropped without trying again.
    refused: Option<DropReason>,
    error: Option<String>,
    line: Vec<u8>,
}

/// How a close's spill ended.
pub struct Spilled {
    /// The file now waiting for the next start, and its records.
    pub file: Option<(PathBuf, u64)>,
    /// Records counted spilled that could not be saved after all (the file failed).
    pub lost: u64,
    pub error: Option<String>,
    /// Records dropped because the directory was at `spill_max_bytes`.
    pub full: u64,
    /// Every record handed to the writer is in the file.
    pub complete: bool,
}

impl SpillWriter {
    pub fn new(dir: Arc<SpillDir>, key: String) -> SpillWriter {
        SpillWriter {
            dir,
            key,
            open: None,
            records: 0,
            full: 0,
            refused: None,
            error: None,
            line: Vec::new(),
        }
    }

    /// Writes a batch the store could not take: returns how many were spilled and what
    /// was dropped instead (the directory at its bound, or failing).
    pub fn spill(&mut self, batch: &[Arc<Record>]) -> (u64, Vec<(DropReason, u64)>) {
        let mut spilled = 0;
        for (i, r) in batch.iter().enumerate() {
            if self.refused.is_none() {
                self.line.clear();
                write_ndjson(&mut self.line, r);
                if !self.dir.reserve(self.line.len() as u64) {
                    self.refused = Some(DropReason::SpillFull);
                } else if let Err(e) = self.write_line() {
                    self.fail(e);
                } else {
                    spilled += 1;
                    self.records += 1;
                    continue;
                }
            }
            let reason = self.refused.expect("set above");
            if reason == DropReason::SpillFull {
                self.full += (batch.len() - i) as u64;
            }
            return (spilled, vec![(reason, (batch.len() - i) as u64)]);
        }
        (spilled, vec![])
    }

    fn write_line(&mut self) -> std::io::Result<()> {
        if self.open.is_none() {
            let stem = self.dir.new_stem(&self.key);
            let path = self.dir.path.join(format!("{stem}{PARTIAL}"));
            let file = File::options().write(true).create_new(true).open(&path)?;
            let meta = file.metadata()?;
            let file = HeldFile::new(file, &meta);
            // Marks it as being written: a start sweeping unfinished files leaves it alone.
            let _ = file.try_lock();
            self.open = Some((path, BufWriter::with_capacity(1 << 20, file)));
        }
        let (_, out) = self.open.as_mut().expect("opened above");
        out.write_all(&self.line)
    }

    /// A failing directory (disk full, gone): what this writer saved is given up with the
    /// file, and the rest is dropped as it would be without a spill directory.
    fn fail(&mut self, e: std::io::Error) {
        self.error = Some(e.to_string());
        self.refused = Some(DropReason::Closed);
        if let Some((path, _)) = self.open.take() {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Makes the file durable and visible to the next start.
    pub fn finish(mut self) -> Spilled {
        let lost_if_failed = self.records;
        let (full, complete) = (self.full, self.refused.is_none());
        let Some((path, out)) = self.open.take() else {
            let lost = if self.error.is_some() {
                lost_if_failed
            } else {
                0
            };
            return Spilled {
                file: None,
                lost,
                error: self.error,
                full,
                complete,
            };
        };
        let ready = path.with_extension(&READY[1..]);
        let done = out
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&path, &ready));
        match done {
            Ok(()) => {
                self.dir.sync();
                Spilled {
                    file: Some((ready, self.records)),
                    lost: 0,
                    error: None,
                    full,
                    complete,
                }
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Spilled {
                    file: None,
                    lost: lost_if_failed,
                    error: Some(e.to_string()),
                    full,
                    complete: false,
                }
            }
        }
    }
}
