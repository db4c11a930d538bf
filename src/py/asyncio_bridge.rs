//! Awaiting Rust futures from asyncio without a thread per call.
//!
//! pyo3-async-runtimes (the maintained successor of pyo3-asyncio) supports PyO3 up to 0.29
//! only, and this crate is on 0.30; what the read side needs of it is small: run a future on
//! the core's tokio runtime and complete an `asyncio.Future` from there with
//! `loop.call_soon_threadsafe`. A cancelled asyncio future aborts the tokio task (dropping
//! its query) and is never set.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::read::ReadError;

/// What the future resolves to: JSON text (or None), or the read error.
pub type Outcome = Result<Option<String>, ReadError>;

/// Counts the spawned futures still alive (finished, aborted or not yet), for tests.
#[derive(Clone, Default)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
    fn enter(&self) -> InFlightGuard {
        self.0.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self.0.clone())
    }
}

struct InFlightGuard(Arc<AtomicUsize>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Scheduled on the event loop: sets the future's result unless it is already done
/// (cancelled while the answer was on its way).
#[pyclass(frozen, module = "logsluice._core")]
struct Complete {
    fut: Py<PyAny>,
    outcome: Mutex<Option<Outcome>>,
}

#[pymethods]
impl Complete {
    fn __call__(&self, py: Python<'_>) -> PyResult<()> {
        let fut = self.fut.bind(py);
        if fut.call_method0("done")?.is_truthy()? {
            return Ok(());
        }
        match self.outcome.lock().take() {
            Some(Ok(text)) => fut.call_method1("set_result", (text,))?,
            Some(Err(ReadError::Bad(b))) => fut.call_method1(
                "set_exception",
                (PyValueError::new_err(b.0).into_value(py),),
            )?,
            Some(Err(ReadError::Failed(m))) => fut.call_method1(
                "set_exception",
                (PyRuntimeError::new_err(m).into_value(py),),
            )?,
            None => return Ok(()),
        };
        Ok(())
    }
}

/// The asyncio future's done-callback: a cancellation aborts the tokio task.
#[pyclass(frozen, module = "logsluice._core")]
struct AbortOnCancel {
    task: tokio::task::AbortHandle,
}

#[pymethods]
impl AbortOnCancel {
    fn __call__(&self, fut: &Bound<'_, PyAny>) -> PyResult<()> {
        if fut.call_method0("cancelled")?.is_truthy()? {
            self.task.abort();
        }
        Ok(())
    }
}

/// Runs `work` on `rt` and returns an `asyncio.Future` of the running loop for its outcome.
pub fn spawn<'py, F>(
    py: Python<'py>,
    rt: &tokio::runtime::Runtime,
    in_flight: &InFlight,
    work: F,
) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = Outcome> + Send + 'static,
{
    let event_loop = py.import("asyncio")?.call_method0("get_running_loop")?;
    let fut = event_loop.call_method0("create_future")?;
    let fut_ref = fut.clone().unbind();
    let loop_ref = event_loop.unbind();
    let guard = in_flight.enter();
    let task = rt.spawn(async move {
        let outcome = work.await;
        drop(guard);
        // None: the interpreter is shutting down; nobody waits any more.
        let _ = Python::try_attach(|py| {
            let done = Complete {
                fut: fut_ref,
                outcome: Mutex::new(Some(outcome)),
            };
            // An error here means the loop was closed meanwhile: nothing to complete.
            let _ = loop_ref
                .bind(py)
                .call_method1("call_soon_threadsafe", (done,));
        });
    });
    fut.call_method1(
        "add_done_callback",
        (AbortOnCancel {
            task: task.abort_handle(),
        },),
    )?;
    Ok(fut)
}
