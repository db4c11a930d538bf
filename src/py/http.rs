//! The ASGI middleware's hand-off: `Core.write_http(...)` copies the exchange (bytes and
//! small scalars, plus the ASGI scope) out of Python and puts it on this pipeline's HTTP
//! lane; the lane's thread redacts it, builds the record and routes it to the
//! destinations' queues, without the GIL and off the event loop. `Redactor` holds the
//! redaction settings of one middleware, parsed once.
//!
//! The lane is bounded (jobs and bytes); a full lane drops the exchange and counts it
//! (`Core.http_lane_stats()`). Raw exchanges never leave the process: only the redacted
//! record reaches a destination queue. `flush` and `close` drain the lane first.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use parking_lot::{Condvar, Mutex};

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use serde::Deserialize;

use super::convert;
use super::PyCore;
use crate::http::redact::{Redactor, Rules, DEFAULT_HEADERS, DEFAULT_KEYS};
use crate::http::{self, Exchange, Headers};
use crate::pipeline::{fork_generation, reporting, Core};
use crate::record::Kind;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RedactorConfig {
    headers: Vec<String>,
    query: Vec<String>,
    body_keys: Vec<String>,
    scrub_values: bool,
    capture_auth_failure_bodies: bool,
    max_body_bytes: usize,
    max_user_agent_bytes: usize,
    trusted_proxies: Vec<String>,
}

#[pyclass(frozen, module = "logsluice._core", name = "Redactor")]
pub struct PyRedactor {
    inner: Arc<Redactor>,
}

#[pymethods]
impl PyRedactor {
    #[new]
    fn new(config_json: &str) -> PyResult<Self> {
        let c: RedactorConfig = serde_json::from_str(config_json)
            .map_err(|e| PyValueError::new_err(format!("invalid redaction settings: {e}")))?;
        Ok(PyRedactor {
            inner: Arc::new(Redactor {
                headers: Rules::new(&c.headers),
                query: Rules::new(&c.query),
                body_keys: Rules::new(&c.body_keys),
                scrub_values: c.scrub_values,
                capture_auth_failure_bodies: c.capture_auth_failure_bodies,
                max_body_bytes: c.max_body_bytes.max(1),
                max_user_agent_bytes: c.max_user_agent_bytes.max(16),
                max_header_bytes: 4096,
                trusted_proxies: c.trusted_proxies,
            }),
        })
    }

    /// Scrubs one text the way captured text is scrubbed (card numbers, JWTs, bearer
    /// tokens, control characters).
    fn scrub(&self, text: &str) -> String {
        self.inner.scrub(text).into_owned()
    }

    fn __repr__(&self) -> &'static str {
        "<logsluice redactor>"
    }
}

/// The built-in lists: `{"headers": [...], "keys": [...]}`.
#[pyfunction]
fn redaction_defaults(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("headers", PyList::new(py, DEFAULT_HEADERS)?)?;
    d.set_item("keys", PyList::new(py, DEFAULT_KEYS)?)?;
    Ok(d)
}

/// The request id for an inbound `X-Request-ID` value: kept when short and made of safe
/// characters, else a new UUIDv7.
#[pyfunction]
#[pyo3(signature = (inbound=None))]
fn request_id(inbound: Option<&Bound<'_, PyAny>>) -> String {
    if let Some(b) = inbound.and_then(|v| v.cast::<PyBytes>().ok()) {
        let b = b.as_bytes();
        if http::valid_request_id(b) {
            // Validated as ASCII above.
            return String::from_utf8_lossy(b).into_owned();
        }
    }
    http::new_request_id()
}

fn bytes_of(obj: &Bound<'_, PyAny>) -> Vec<u8> {
    match obj.cast::<PyBytes>() {
        Ok(b) => b.as_bytes().to_vec(),
        Err(_) => convert::text(obj).into_bytes(),
    }
}

fn headers_of(obj: &Bound<'_, PyAny>) -> Headers {
    let Ok(iter) = obj.try_iter() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in iter.flatten().take(200) {
        if let (Ok(k), Ok(v)) = (item.get_item(0), item.get_item(1)) {
            out.push((bytes_of(&k), bytes_of(&v)));
        }
    }
    out
}

/// `None` stays `None` (not captured); a list of byte chunks is joined.
fn body_of(obj: &Bound<'_, PyAny>) -> Option<Vec<u8>> {
    if obj.is_none() {
        return None;
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Some(b.as_bytes().to_vec());
    }
    let mut out = Vec::new();
    for chunk in obj.try_iter().ok()?.flatten() {
        if let Ok(b) = chunk.cast::<PyBytes>() {
            out.extend_from_slice(b.as_bytes());
        }
    }
    Some(out)
}

fn scope_text(scope: &Bound<'_, PyDict>, key: &Bound<'_, PyString>, default: &str) -> String {
    match scope.get_item(key) {
        Ok(Some(v)) if !v.is_none() => convert::text(&v),
        _ => default.to_owned(),
    }
}

/// Arguments, in order: redactor, scope, path, route, status, response_headers,
/// request_chunks, request_size, response_chunks, response_size, flags, start (epoch
/// seconds), duration_ms, ttfb_ms, request_id, exception, sample_rate.
pub(super) fn write_http(
    pycore: &PyCore,
    py: Python<'_>,
    args: &Bound<'_, PyTuple>,
) -> PyResult<()> {
    if reporting() {
        return Ok(());
    }
    if args.len() != 17 {
        return Err(PyTypeError::new_err("write_http takes 17 arguments"));
    }
    let arg = |i: usize| args.get_item(i);
    let redactor = arg(0)?
        .cast::<PyRedactor>()
        .map_err(|_| PyTypeError::new_err("write_http: first argument must be a Redactor"))?
        .get()
        .inner
        .clone();
    let scope = arg(1)?
        .cast_into::<PyDict>()
        .map_err(|_| PyTypeError::new_err("write_http: scope must be a dict"))?;
    let exc = arg(15)?;
    let exception = if exc.is_none() {
        None
    } else {
        Some(
            convert::format_exception(
                &pycore.ctx,
                py,
                exc.get_type().as_any(),
                &exc,
                &exc.getattr(intern!(py, "__traceback__"))
                    .unwrap_or_else(|_| py.None().into_bound(py)),
            )
            .unwrap_or_else(|| convert::text(&exc)),
        )
    };
    let mut ex = Exchange {
        status: arg(4)?.extract().unwrap_or(0),
        flags: arg(10)?.extract()?,
        exception,
        ..Exchange::default()
    };
    let core = pycore.core();
    if !core.wants(ex.level().1, Kind::Http) {
        return Ok(());
    }
    let start: f64 = arg(11)?.extract()?;
    ex.ts_us = (start * 1e6).round() as i64;
    ex.method = scope_text(&scope, intern!(py, "method"), "GET");
    ex.scheme = scope_text(&scope, intern!(py, "scheme"), "http");
    ex.http_version = scope_text(&scope, intern!(py, "http_version"), "1.1");
    ex.path = convert::text(&arg(2)?);
    ex.query = scope
        .get_item(intern!(py, "query_string"))?
        .map(|q| bytes_of(&q))
        .unwrap_or_default();
    let route = arg(3)?;
    ex.route = (!route.is_none()).then(|| convert::text(&route));
    ex.client = scope
        .get_item(intern!(py, "client"))?
        .filter(|c| !c.is_none())
        .and_then(|c| c.get_item(0).ok())
        .map(|h| convert::text(&h));
    if let Some(h) = scope.get_item(intern!(py, "headers"))? {
        ex.request_headers = headers_of(&h);
    }
    let response_headers = arg(5)?;
    if !response_headers.is_none() {
        ex.response_headers = headers_of(&response_headers);
    }
    ex.request_body = body_of(&arg(6)?);
    ex.request_size = arg(7)?.extract().unwrap_or(0);
    ex.response_body = body_of(&arg(8)?);
    ex.response_size = arg(9)?.extract().unwrap_or(0);
    ex.duration_ms = arg(12)?.extract().unwrap_or(0.0);
    ex.ttfb_ms = arg(13)?.extract().ok();
    ex.request_id = convert::text(&arg(14)?);
    ex.sample_rate = arg(16)?.extract().unwrap_or(1.0);
    pycore.http_lane.push(Job {
        core,
        redactor,
        ex,
        max_message_bytes: pycore.options.max_message_bytes,
    });
    Ok(())
}

struct Job {
    core: Arc<Core>,
    redactor: Arc<Redactor>,
    ex: Exchange,
    max_message_bytes: usize,
}

impl Job {
    fn bytes(&self) -> usize {
        256 + self.ex.request_body.as_ref().map_or(0, Vec::len)
            + self.ex.response_body.as_ref().map_or(0, Vec::len)
            + self
                .ex
                .request_headers
                .iter()
                .chain(&self.ex.response_headers)
                .map(|(k, v)| 32 + k.len() + v.len())
                .sum::<usize>()
    }

    fn run(self) {
        let record = http::build_record(&self.redactor, self.ex, self.max_message_bytes);
        let blocked = self.core.submit(record);
        if !blocked.is_empty() {
            Core::wait_for_room(blocked);
        }
    }
}

/// Jobs waiting at most this long before the lane's thread looks (it is not woken per
/// job: a wake-up is a system call on the event loop's thread).
const LANE_POLL: Duration = Duration::from_millis(20);
/// Woken early when this many jobs wait.
const LANE_WAKE_AT: usize = 256;
const LANE_MAX_JOBS: usize = 20_000;
const LANE_MAX_BYTES: usize = 64 << 20;

#[derive(Default)]
struct LaneQueue {
    jobs: Vec<Job>,
    bytes: usize,
    submitted: u64,
    done: u64,
}

struct LaneInner {
    generation: u64,
    queue: Mutex<LaneQueue>,
    work: Condvar,
    finished: Condvar,
}

/// One per pipeline; its thread starts on the first exchange (again in a forked child).
#[derive(Default)]
pub struct Lane {
    slot: ArcSwapOption<LaneInner>,
    starting: Mutex<()>,
    dropped: AtomicU64,
}

impl Lane {
    fn inner(&self) -> Arc<LaneInner> {
        let generation = fork_generation();
        if let Some(inner) = self.slot.load_full().filter(|i| i.generation == generation) {
            return inner;
        }
        let _guard = self.starting.lock();
        if let Some(inner) = self.slot.load_full() {
            if inner.generation == generation {
                return inner;
            }
            // The parent's lane, copied by fork: its thread is gone, its lock may be held.
            std::mem::forget(inner);
        }
        let inner = Arc::new(LaneInner {
            generation,
            queue: Mutex::new(LaneQueue::default()),
            work: Condvar::new(),
            finished: Condvar::new(),
        });
        let worker = inner.clone();
        std::thread::Builder::new()
            .name("logsluice-http".into())
            .spawn(move || worker.run())
            .expect("spawning a thread");
        if let Some(old) = self.slot.swap(Some(inner.clone())) {
            std::mem::forget(old);
        }
        inner
    }

    fn push(&self, job: Job) {
        let bytes = job.bytes();
        let inner = self.inner();
        let mut q = inner.queue.lock();
        if q.jobs.len() >= LANE_MAX_JOBS || q.bytes + bytes > LANE_MAX_BYTES {
            drop(q);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.jobs.push(job);
        q.bytes += bytes;
        q.submitted += 1;
        let wake = q.jobs.len() == LANE_WAKE_AT;
        drop(q);
        if wake {
            inner.work.notify_one();
        }
    }

    /// Waits (GIL released) until every job pushed before the call is on a destination
    /// queue, for at most `timeout` seconds; returns the seconds left.
    pub fn drain(&self, py: Python<'_>, timeout: f64) -> f64 {
        let Some(inner) = self
            .slot
            .load_full()
            .filter(|i| i.generation == fork_generation())
        else {
            return timeout;
        };
        let start = Instant::now();
        let limit = Duration::from_secs_f64(timeout.max(0.0));
        py.detach(|| {
            let deadline = start + limit;
            let mut q = inner.queue.lock();
            let target = q.submitted;
            inner.work.notify_one();
            while q.done < target {
                if inner.finished.wait_until(&mut q, deadline).timed_out() {
                    break;
                }
            }
        });
        (timeout - start.elapsed().as_secs_f64()).max(0.0)
    }

    /// `(waiting, dropped)`.
    pub fn stats(&self) -> (u64, u64) {
        let waiting = self
            .slot
            .load_full()
            .filter(|i| i.generation == fork_generation())
            .map_or(0, |i| {
                let q = i.queue.lock();
                q.submitted - q.done
            });
        (waiting, self.dropped.load(Ordering::Relaxed))
    }
}

impl LaneInner {
    fn run(self: Arc<Self>) {
        loop {
            let jobs = {
                let mut q = self.queue.lock();
                while q.jobs.is_empty() {
                    self.work.wait_for(&mut q, LANE_POLL);
                }
                q.bytes = 0;
                std::mem::take(&mut q.jobs)
            };
            let n = jobs.len() as u64;
            for job in jobs {
                job.run();
            }
            self.queue.lock().done += n;
            self.finished.notify_all();
        }
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyRedactor>()?;
    m.add_function(wrap_pyfunction!(redaction_defaults, m)?)?;
    m.add_function(wrap_pyfunction!(request_id, m)?)?;
    Ok(())
}
