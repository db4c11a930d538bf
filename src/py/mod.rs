//! The Python-facing objects: `Core` (one per `logsluice.Pipeline`) and the Loguru sink.
//! They hold the GIL only to read fields; waiting happens with the GIL released.

mod asyncio_bridge;
mod clock;
mod convert;
mod exchange;
mod http;
mod read;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyTimeoutError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::config::{parse_specs, DestinationSpec, PipelineOptions};
use crate::metrics::DropReason;
use crate::per_process::PerProcess;
use crate::pipeline::{reporting, Core, Reporter};
use crate::record::{Kind, Record};
use convert::Ctx;

/// Set at interpreter exit: from then on the core reports to stderr, never into Python.
static PYTHON_EXITING: AtomicBool = AtomicBool::new(false);

#[pyfunction]
fn _mark_interpreter_exit() {
    PYTHON_EXITING.store(true, Ordering::SeqCst);
}

/// The DSN with its password masked: the one implementation, for Python's messages too.
#[pyfunction]
fn redact_dsn(dsn: &str) -> String {
    crate::destinations::postgres::redact_dsn(dsn)
}

fn reporter(report: Py<PyAny>) -> Reporter {
    Arc::new(move |level: u16, message: &str| {
        if PYTHON_EXITING.load(Ordering::SeqCst) {
            eprintln!("{message}");
            return;
        }
        Python::attach(|py| {
            if let Err(e) = report.bind(py).call1((level, message)) {
                eprintln!("{message} (reporting failed: {e})");
            }
        });
    })
}

fn pending_text(pending: &[(String, u64)]) -> String {
    pending
        .iter()
        .map(|(name, n)| format!("{name}: {n} records"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[pyclass(frozen, module = "logsluice._core", name = "Core")]
pub struct PyCore {
    specs: Vec<DestinationSpec>,
    options: PipelineOptions,
    slot: PerProcess<Core>,
    closed: AtomicBool,
    reporter: Reporter,
    ctx: Ctx,
    /// HTTP exchanges on their way to redaction (see `py/http.rs`).
    http_lane: http::Lane,
}

impl PyCore {
    /// The core of this process, started on first use and started afresh in a forked
    /// child (whose copy of the parent's threads does not exist).
    fn core(&self) -> Arc<Core> {
        self.core_ref().clone()
    }

    /// [`PyCore::core`], borrowed: no reference count changed on the hot paths.
    fn core_ref(&self) -> &Arc<Core> {
        self.slot.get_or_init_ref(|| {
            let core = Core::start(
                self.specs.clone(),
                self.options.clone(),
                self.reporter.clone(),
            );
            if self.closed.load(Ordering::SeqCst) {
                let _ = core.close(Duration::ZERO);
            }
            core
        })
    }

    fn submit(&self, py: Python<'_>, core: &Core, record: Record) {
        let blocked = core.submit(record);
        if !blocked.is_empty() {
            py.detach(|| Core::wait_for_room(blocked));
        }
    }

    fn submit_loguru(&self, py: Python<'_>, message: &Bound<'_, PyAny>) {
        if reporting() {
            return;
        }
        let core = self.core();
        let record = match message
            .getattr(intern!(py, "record"))
            .and_then(|r| r.cast_into::<PyDict>().map_err(Into::into))
        {
            Ok(dict) => {
                let level = convert::loguru_level(&dict);
                if !core.wants(level.1, Kind::App) {
                    return;
                }
                convert::from_loguru(&self.ctx, &dict, level)
            }
            // Not a Loguru message (someone called write() by hand): keep the text.
            Err(_) => Record::new(
                convert::now_micros(),
                "INFO",
                20,
                Kind::App,
                convert::text(message),
            )
            .finish(self.options.max_message_bytes),
        };
        self.submit(py, &core, record);
    }

    fn submit_logging(&self, py: Python<'_>, record: &Bound<'_, PyAny>) {
        if reporting() {
            return;
        }
        let core = self.core();
        let level_no = convert::level_number(record.getattr(intern!(py, "levelno")).ok());
        if !core.wants(level_no, Kind::App) {
            return;
        }
        let rec = convert::from_logging(&self.ctx, record);
        self.submit(py, &core, rec);
    }

    /// Runs one of the write methods. A bug of ours on an odd record (a panic) must not
    /// reach the app's logging call as `PanicException` (a BaseException: neither Loguru's
    /// `catch` nor logging's error handling stops it), nor lose the record unseen: a notice
    /// saying what happened is stored in its place.
    fn guarded(&self, py: Python<'_>, write: impl FnOnce()) {
        let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(write)) else {
            return;
        };
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let notice = Record::new(
            convert::now_micros(),
            "WARNING",
            30,
            Kind::App,
            format!("logsluice could not read a log record ({why}); this notice takes its place"),
        )
        .finish(self.options.max_message_bytes);
        let core = self.core();
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.submit(py, &core, notice)
        }));
    }
}

#[pymethods]
impl PyCore {
    #[new]
    fn new(
        py: Python<'_>,
        specs_json: &str,
        options_json: &str,
        report: Py<PyAny>,
        request_id_var: Py<PyAny>,
        trace_var: Py<PyAny>,
    ) -> PyResult<Self> {
        let context_var = py.import("contextvars")?.getattr("ContextVar")?;
        if !request_id_var.bind(py).is_instance(&context_var)? {
            return Err(PyValueError::new_err("request_id_var must be a ContextVar"));
        }
        if !trace_var.bind(py).is_instance(&context_var)? {
            return Err(PyValueError::new_err("trace_var must be a ContextVar"));
        }
        let specs = parse_specs(specs_json).map_err(PyValueError::new_err)?;
        let options: PipelineOptions = serde_json::from_str(options_json)
            .map_err(|e| PyValueError::new_err(format!("invalid pipeline options: {e}")))?;
        // Records waiting in the spill directory are delivered without waiting for the
        // first new record: the core starts now.
        let replay_now = match options.spill_dir.as_deref() {
            Some(dir) => {
                py.detach(|| crate::spill::check_dir(dir))
                    .map_err(PyValueError::new_err)?;
                let keys: Vec<String> = specs.iter().filter_map(crate::spill::key).collect();
                crate::spill::SpillDir::new(dir, options.spill_max_bytes).has_waiting(&keys)
            }
            None => false,
        };
        let format_exception = py
            .import("traceback")?
            .getattr("format_exception")?
            .unbind();
        let ctx = Ctx {
            clock: clock::Clock::new(py)?,
            format_exception,
            request_id_var,
            trace_var,
            max_message_bytes: options.max_message_bytes,
            max_field_bytes: options.max_field_bytes,
        };
        let core = PyCore {
            specs,
            options,
            slot: PerProcess::default(),
            closed: AtomicBool::new(false),
            reporter: reporter(report),
            ctx,
            http_lane: http::Lane::default(),
        };
        if replay_now {
            // Claiming and reading the files is disk I/O: without the GIL.
            py.detach(|| core.core_ref().replay_first());
        }
        Ok(core)
    }

    /// Hands one Loguru message to the core. Never raises.
    fn write_loguru(&self, py: Python<'_>, message: &Bound<'_, PyAny>) {
        self.guarded(py, || self.submit_loguru(py, message));
    }

    /// Hands one `logging.LogRecord` to the core. Never raises.
    fn write_logging(&self, py: Python<'_>, record: &Bound<'_, PyAny>) {
        self.guarded(py, || self.submit_logging(py, record));
    }

    /// `(waiting, dropped)`: HTTP exchanges not yet redacted, and those a full lane dropped.
    fn http_lane_stats(&self) -> (u64, u64) {
        self.http_lane.stats()
    }

    /// Counters per destination (see the README for every field).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        let Some(core) = self.slot.current() else {
            for spec in &self.specs {
                out.set_item(&spec.common.name, empty_stats(py)?)?;
            }
            return Ok(out);
        };
        for (name, s) in py.detach(|| core.stats()) {
            let d = PyDict::new(py);
            let c = &s.counters;
            d.set_item("accepted", c.accepted)?;
            d.set_item("written", c.written)?;
            let dropped = PyDict::new(py);
            for reason in DropReason::ALL {
                dropped.set_item(reason.as_str(), c.dropped[reason as usize])?;
            }
            d.set_item("dropped", dropped)?;
            d.set_item("dropped_total", c.dropped_total())?;
            d.set_item("in_flight", s.in_flight)?;
            d.set_item("spilled", c.spilled)?;
            d.set_item("replayed", c.replayed)?;
            d.set_item("spill_bad_lines", c.spill_bad_lines)?;
            d.set_item("retries", c.retries)?;
            d.set_item("batches", c.batches)?;
            d.set_item("queue_records", s.queue_records)?;
            d.set_item("queue_bytes", s.queue_bytes)?;
            d.set_item("breaker", s.breaker)?;
            d.set_item("last_error", c.last_error.as_deref())?;
            let lat = PyDict::new(py);
            for (k, v) in c.latency_percentiles() {
                lat.set_item(k, v)?;
            }
            d.set_item("flush_latency_ms", lat)?;
            out.set_item(name, d)?;
        }
        Ok(out)
    }

    #[pyo3(signature = (timeout=5.0))]
    fn flush(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        let timeout = self.http_lane.drain(py, timeout);
        let Some(core) = self.slot.current() else {
            return Ok(());
        };
        let timeout = crate::config::seconds(timeout);
        py.detach(|| core.flush(timeout)).map_err(|pending| {
            PyTimeoutError::new_err(format!(
                "flush timed out; still pending: {}",
                pending_text(&pending)
            ))
        })
    }

    /// Flushes and stops. Returns the records that could not be written in time (they are
    /// spilled with a spill directory, else counted as dropped with reason "closed").
    #[pyo3(signature = (timeout=10.0))]
    fn close(&self, py: Python<'_>, timeout: f64) -> Option<String> {
        let timeout = self.http_lane.drain(py, timeout);
        self.closed.store(true, Ordering::SeqCst);
        // The lane's thread ends once it has handed what it holds to the core; exchanges
        // that come later meet the closed core on their caller's thread.
        let lane_thread = self.http_lane.close();
        let timeout = crate::config::seconds(timeout);
        let deadline = Instant::now() + timeout;
        let pending = self
            .slot
            .current()
            .and_then(|core| py.detach(|| core.close(timeout)).err());
        if let Some(thread) = lane_thread {
            // Its jobs now meet a closed queue, which never waits: it ends promptly. As
            // for the writers, one still busy at the deadline is left behind.
            let grace = deadline.max(Instant::now() + Duration::from_millis(500));
            py.detach(|| http::join_until(thread, grace));
        }
        pending.map(|p| pending_text(&p))
    }

    /// Whether Loguru times are read without calling `.timestamp()` (see `clock.rs`).
    #[getter]
    fn _fast_clock(&self) -> bool {
        self.ctx.clock.fast()
    }

    #[getter]
    fn closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    fn loguru_sink(slf: Py<Self>) -> LoguruSink {
        LoguruSink { core: slf }
    }
}

fn empty_stats(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    for key in [
        "accepted",
        "written",
        "dropped_total",
        "in_flight",
        "spilled",
        "replayed",
        "spill_bad_lines",
        "retries",
        "batches",
        "queue_records",
        "queue_bytes",
    ] {
        d.set_item(key, 0)?;
    }
    let dropped = PyDict::new(py);
    for reason in DropReason::ALL {
        dropped.set_item(reason.as_str(), 0)?;
    }
    d.set_item("dropped", dropped)?;
    d.set_item("breaker", "closed")?;
    d.set_item("last_error", py.None())?;
    d.set_item("flush_latency_ms", PyDict::new(py))?;
    Ok(d)
}

/// What `logger.add()` receives. Loguru treats an object with `write` as a stream and calls
/// `flush` after every message if there is one, so there is none: `write` only enqueues.
#[pyclass(frozen, module = "logsluice._core")]
pub struct LoguruSink {
    core: Py<PyCore>,
}

#[pymethods]
impl LoguruSink {
    fn write(&self, py: Python<'_>, message: &Bound<'_, PyAny>) {
        self.core.get().submit_loguru(py, message);
    }

    /// Loguru calls this when the handler is removed; the pipeline outlives its handlers.
    fn stop(&self) {}

    fn __repr__(&self) -> &'static str {
        "<logsluice loguru sink>"
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    convert::check_str_layout(m.py());
    m.add_class::<PyCore>()?;
    m.add_class::<LoguruSink>()?;
    m.add_function(wrap_pyfunction!(_mark_interpreter_exit, m)?)?;
    m.add_function(wrap_pyfunction!(redact_dsn, m)?)?;
    http::register(m)?;
    read::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
