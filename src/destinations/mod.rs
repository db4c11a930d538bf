//! Destinations: each one writes a batch and knows nothing of Python, queues or breakers.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::Target;
use crate::record::Record;

pub mod azure_blob;
pub mod controlled;
pub mod local_files;
pub mod postgres;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Worth retrying: the service may come back (I/O hiccup, restart, throttling).
    Transient,
    /// Retrying cannot help (bad credentials, missing permission): fail fast, no spinning.
    Permanent,
    /// The store answered but could not take the batch as it is (too many partitions for
    /// one transaction, a COPY past the statement timeout, a file past its size limit):
    /// retried like a transient error, then written in smaller pieces.
    Oversized,
}

#[derive(Clone, Debug)]
pub struct WriteError {
    pub kind: ErrorKind,
    /// Shown in `stats()` and the "logsluice" logger: must never contain a secret.
    pub message: String,
    /// A server's request to wait (e.g. `Retry-After`).
    pub retry_after: Option<Duration>,
}

impl WriteError {
    pub fn transient(message: impl Into<String>) -> Self {
        WriteError {
            kind: ErrorKind::Transient,
            message: message.into(),
            retry_after: None,
        }
    }
    pub fn oversized(message: impl Into<String>) -> Self {
        WriteError {
            kind: ErrorKind::Oversized,
            message: message.into(),
            retry_after: None,
        }
    }
    pub fn permanent(message: impl Into<String>) -> Self {
        WriteError {
            kind: ErrorKind::Permanent,
            message: message.into(),
            retry_after: None,
        }
    }
}

/// What became of a batch that was (at least partly) written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Records refused as data errors and left out; the rest of the batch was written.
    pub invalid: u64,
}

pub trait Writer: Send {
    /// Writes the whole batch or nothing (so a retry never duplicates), except records
    /// reported in `Outcome::invalid`. `timeout` bounds one attempt.
    fn write_batch(
        &mut self,
        batch: &[Arc<Record>],
        timeout: Duration,
    ) -> Result<Outcome, WriteError>;

    /// Called when the pipeline gives up on `batch` (a permanent error, or closing), before
    /// it is counted as not written. A writer whose attempts left the batch's fate open (a COMMIT
    /// sent but never answered) asks once more within `timeout` and returns `Some` if the
    /// batch was stored after all; either way it forgets the batch. A zero `timeout`: no time
    /// to ask (shutting down).
    fn given_up(&mut self, _batch: &[Arc<Record>], _timeout: Duration) -> Option<Outcome> {
        None
    }

    /// Called when the queue has been idle for a while: time-based rotation, maintenance.
    fn idle(&mut self) {}

    /// Messages for the "logsluice" logger gathered since the last call (level, text):
    /// what a writer noticed outside a batch's result, such as failed maintenance.
    fn notices(&mut self) -> Vec<(u16, String)> {
        Vec::new()
    }

    /// Flushes and releases resources at shutdown.
    fn close(&mut self) -> Result<(), WriteError> {
        Ok(())
    }
}

/// Fired by the pipeline's `close` when its deadline passes with records unwritten. A
/// writer's network I/O in progress (a connect to a host that never answers, a COMMIT or an
/// upload never acknowledged) ends at once instead of at its own time limit, so the batch
/// it held is counted (`closed`) before `close` returns.
pub struct Abort {
    /// The watch's value, read without its lock: writers ask between every step.
    fired: AtomicBool,
    /// Wakes the I/O waiting in `fired()`.
    tx: watch::Sender<bool>,
}

impl Default for Abort {
    fn default() -> Self {
        Abort {
            fired: AtomicBool::new(false),
            tx: watch::Sender::new(false),
        }
    }
}

impl Abort {
    pub fn fire(&self) {
        self.fired.store(true, Ordering::SeqCst);
        self.tx.send_replace(true);
    }

    pub fn is_fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// Completes once fired (at once if fired already).
    pub async fn fired(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|fired| *fired).await;
    }

    /// Runs `work` unless the abort fires first: `None` then (`work` is dropped mid-way).
    pub async fn unless_fired<T>(&self, work: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            () = self.fired() => None,
            out = work => Some(out),
        }
    }
}

/// The error of an attempt cut off by [`Abort`].
pub fn aborted() -> WriteError {
    WriteError::transient("cut off: the pipeline is closing")
}

pub fn open(target: &Target, abort: &Arc<Abort>) -> Result<Box<dyn Writer>, WriteError> {
    Ok(match target {
        Target::LocalFiles(cfg) => Box::new(local_files::LocalFiles::open(cfg.clone())?),
        Target::Controlled(cfg) => Box::new(controlled::Controlled::new(cfg.clone())),
        Target::Postgres(cfg) => {
            Box::new(postgres::Postgres::open(cfg.clone())?.abortable_by(abort.clone()))
        }
        Target::AzureBlob(cfg) => {
            Box::new(azure_blob::AzureBlob::open(cfg.clone())?.abortable_by(abort.clone()))
        }
    })
}
