//! The ASGI middleware's hand-off: `HttpSink.write(...)` copies the exchange (bytes and
//! small scalars, plus the ASGI scope) out of Python and puts it on this pipeline's HTTP
//! lane; the lane's thread redacts it, builds the record and routes it to the
//! destinations' queues, without the GIL and off the event loop. One `HttpSink` per
//! middleware holds its redaction settings, parsed once.
//!
//! The lane is bounded (jobs and bytes); a full lane drops the exchange and counts it
//! (`Core.http_lane_stats()`). Raw exchanges never leave the process: only the redacted
//! record reaches a destination queue. `flush` and `close` drain the lane first.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use parking_lot::{Condvar, Mutex};

use pyo3::exceptions::PyValueError;
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

/// One middleware's hand-off into one pipeline's core, with its redaction settings
/// parsed once.
#[pyclass(frozen, module = "logsluice._core", name = "HttpSink")]
pub struct HttpSink {
    core: Py<PyCore>,
    inner: Arc<Redactor>,
}

#[pymethods]
impl HttpSink {
    #[new]
    fn new(core: Py<PyCore>, config_json: &str) -> PyResult<Self> {
        let c: RedactorConfig = serde_json::from_str(config_json)
            .map_err(|e| PyValueError::new_err(format!("invalid redaction settings: {e}")))?;
        Ok(HttpSink {
            core,
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

    /// Hands one finished exchange to the core (see `write` below). Raises only on
    /// arguments of the wrong type.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (scope, path, route, status, response_headers, request_chunks,
        request_size, response_chunks, response_size, flags, start, duration_ms, ttfb_ms,
        request_id, exception, sample_rate))]
    fn write<'py>(
        &self,
        py: Python<'py>,
        scope: &Bound<'py, PyDict>,
        path: &Bound<'py, PyAny>,
        route: &Bound<'py, PyAny>,
        status: u16,
        response_headers: &Bound<'py, PyAny>,
        request_chunks: &Bound<'py, PyAny>,
        request_size: u64,
        response_chunks: &Bound<'py, PyAny>,
        response_size: u64,
        flags: u32,
        start: f64,
        duration_ms: f64,
        ttfb_ms: Option<f64>,
        request_id: &Bound<'py, PyAny>,
        exception: &Bound<'py, PyAny>,
        sample_rate: f64,
    ) {
        let args = Args {
            scope,
            path,
            route,
            response_headers,
            request_chunks,
            response_chunks,
            request_id,
            exception,
        };
        let ex = Exchange {
            status,
            flags,
            ts_us: (start * 1e6).round() as i64,
            request_size,
            response_size,
            duration_ms,
            ttfb_ms,
            sample_rate,
            ..Exchange::default()
        };
        write(self, py, args, ex);
    }

    fn __repr__(&self) -> &'static str {
        "<logsluice http sink>"
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

/// The exchange as the event loop copied it: every string, header and body in one buffer
/// (length-prefixed), so the event loop's thread makes one allocation per request and the
/// lane's thread does the rest (allocating and freeing on one thread is also what keeps
/// malloc cheap).
#[derive(Default)]
struct Packed {
    buf: Vec<u8>,
}

const NONE: u32 = u32::MAX;

impl Packed {
    fn put(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(&(b.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(b);
    }

    fn none(&mut self) {
        self.buf.extend_from_slice(&NONE.to_le_bytes());
    }

    /// A `str` as UTF-8 (lone surrogates replaced), `bytes` as they are, else `str()`.
    fn put_obj(&mut self, obj: &Bound<'_, PyAny>) {
        if let Ok(b) = obj.cast::<PyBytes>() {
            self.put(b.as_bytes());
        } else if let Some(utf8) = obj
            .cast::<PyString>()
            .ok()
            .and_then(|s| s.encode_utf8().ok())
        {
            self.put(utf8.as_bytes());
        } else {
            self.put(convert::text(obj).as_bytes());
        }
    }

    fn put_opt(&mut self, obj: Option<Bound<'_, PyAny>>) {
        match obj.filter(|o| !o.is_none()) {
            Some(o) => self.put_obj(&o),
            None => self.none(),
        }
    }

    /// At most 200 `(name, value)` pairs.
    fn put_headers(&mut self, obj: Option<Bound<'_, PyAny>>) {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_le_bytes());
        let Some(iter) = obj.filter(|o| !o.is_none()).and_then(|o| o.try_iter().ok()) else {
            return;
        };
        let mut n = 0u32;
        for item in iter.flatten().take(200) {
            // Servers send `(name, value)` tuples: read them without the generic protocol.
            if let Ok(t) = item.cast::<PyTuple>() {
                if t.len() == 2 {
                    if let (Ok(k), Ok(v)) = (t.get_borrowed_item(0), t.get_borrowed_item(1)) {
                        self.put_obj(&k);
                        self.put_obj(&v);
                        n += 1;
                    }
                    continue;
                }
            }
            if let (Ok(k), Ok(v)) = (item.get_item(0), item.get_item(1)) {
                self.put_obj(&k);
                self.put_obj(&v);
                n += 1;
            }
        }
        self.buf[at..at + 4].copy_from_slice(&n.to_le_bytes());
    }

    /// `None` stays `None` (not captured); a list of byte chunks is joined.
    fn put_body(&mut self, obj: &Bound<'_, PyAny>) {
        if obj.is_none() {
            return self.none();
        }
        if let Ok(b) = obj.cast::<PyBytes>() {
            return self.put(b.as_bytes());
        }
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_le_bytes());
        if let Ok(iter) = obj.try_iter() {
            for chunk in iter.flatten() {
                if let Ok(b) = chunk.cast::<PyBytes>() {
                    self.buf.extend_from_slice(b.as_bytes());
                }
            }
        }
        let n = (self.buf.len() - at - 4) as u32;
        self.buf[at..at + 4].copy_from_slice(&n.to_le_bytes());
    }
}

struct Unpack<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Unpack<'a> {
    fn opt(&mut self) -> Option<&'a [u8]> {
        let len = u32::from_le_bytes(self.buf.get(self.pos..self.pos + 4)?.try_into().ok()?);
        self.pos += 4;
        if len == NONE {
            return None;
        }
        let out = self.buf.get(self.pos..self.pos + len as usize)?;
        self.pos += len as usize;
        Some(out)
    }

    fn bytes(&mut self) -> &'a [u8] {
        self.opt().unwrap_or_default()
    }

    fn text(&mut self) -> String {
        crate::record::clean_bytes(self.bytes())
    }

    fn headers(&mut self) -> Headers {
        let Some(n) = self
            .buf
            .get(self.pos..self.pos + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
        else {
            return Vec::new();
        };
        self.pos += 4;
        (0..n)
            .map(|_| (self.bytes().to_vec(), self.bytes().to_vec()))
            .collect()
    }
}

struct Args<'a, 'py> {
    scope: &'a Bound<'py, PyDict>,
    path: &'a Bound<'py, PyAny>,
    route: &'a Bound<'py, PyAny>,
    response_headers: &'a Bound<'py, PyAny>,
    request_chunks: &'a Bound<'py, PyAny>,
    response_chunks: &'a Bound<'py, PyAny>,
    request_id: &'a Bound<'py, PyAny>,
    exception: &'a Bound<'py, PyAny>,
}

fn body_len(o: &Bound<'_, PyAny>) -> usize {
    if let Ok(list) = o.cast::<PyList>() {
        return list
            .iter()
            .map(|c| c.cast::<PyBytes>().map_or(0, |b| b.as_bytes().len()))
            .sum();
    }
    o.cast::<PyBytes>().map_or(0, |b| b.as_bytes().len())
}

fn write<'py>(sink: &HttpSink, py: Python<'py>, a: Args<'_, 'py>, mut ex: Exchange) {
    if reporting() {
        return;
    }
    let pycore = sink.core.get();
    if !a.exception.is_none() {
        let exc = a.exception;
        ex.exception = Some(
            convert::format_exception(
                &pycore.ctx,
                py,
                exc.get_type().as_any(),
                exc,
                &exc.getattr(intern!(py, "__traceback__"))
                    .unwrap_or_else(|_| py.None().into_bound(py)),
            )
            .unwrap_or_else(|| convert::text(exc)),
        );
    }
    let core = pycore.core();
    if !core.wants(ex.level().1, Kind::Http) {
        return;
    }
    let mut p = Packed {
        buf: pycore
            .http_lane
            .buffer(1024 + body_len(a.request_chunks) + body_len(a.response_chunks)),
    };
    let get = |key: &Bound<'py, PyString>| a.scope.get_item(key).ok().flatten();
    p.put_opt(get(intern!(py, "method")));
    p.put_opt(get(intern!(py, "scheme")));
    p.put_opt(get(intern!(py, "http_version")));
    p.put_obj(a.path);
    p.put_opt(get(intern!(py, "query_string")));
    p.put_opt(Some(a.route.clone()));
    p.put_opt(
        get(intern!(py, "client"))
            .filter(|c| !c.is_none())
            .and_then(|c| c.get_item(0).ok()),
    );
    p.put_obj(a.request_id);
    p.put_headers(get(intern!(py, "headers")));
    p.put_headers(Some(a.response_headers.clone()));
    p.put_body(a.request_chunks);
    p.put_body(a.response_chunks);
    pycore.http_lane.push(Job {
        core,
        redactor: sink.inner.clone(),
        ex,
        packed: p,
        max_message_bytes: pycore.options.max_message_bytes,
    });
}

struct Job {
    core: Arc<Core>,
    redactor: Arc<Redactor>,
    /// The scalars; strings, headers and bodies are in `packed`.
    ex: Exchange,
    packed: Packed,
    max_message_bytes: usize,
}

impl Job {
    fn bytes(&self) -> usize {
        256 + self.packed.buf.capacity()
    }

    /// Builds and routes the record; returns the packing buffer for reuse.
    fn run(self) -> Vec<u8> {
        let mut ex = self.ex;
        let mut u = Unpack {
            buf: &self.packed.buf,
            pos: 0,
        };
        ex.method = u
            .opt()
            .map_or_else(|| "GET".into(), crate::record::clean_bytes);
        ex.scheme = u
            .opt()
            .map_or_else(|| "http".into(), crate::record::clean_bytes);
        ex.http_version = u
            .opt()
            .map_or_else(|| "1.1".into(), crate::record::clean_bytes);
        ex.path = u.text();
        ex.query = u.bytes().to_vec();
        ex.route = u.opt().map(crate::record::clean_bytes);
        ex.client = u.opt().map(crate::record::clean_bytes);
        ex.request_id = u.text();
        ex.request_headers = u.headers();
        ex.response_headers = u.headers();
        ex.request_body = u.opt().map(<[u8]>::to_vec);
        ex.response_body = u.opt().map(<[u8]>::to_vec);
        let record = http::build_record(&self.redactor, ex, self.max_message_bytes);
        let blocked = self.core.submit(record);
        if !blocked.is_empty() {
            Core::wait_for_room(blocked);
        }
        self.packed.buf
    }
}

/// Jobs waiting at most this long before the lane's thread looks (it is not woken per
/// job: a wake-up is a system call on the event loop's thread).
const LANE_POLL: Duration = Duration::from_millis(20);
/// Woken early when this many jobs wait.
const LANE_WAKE_AT: usize = 256;
const LANE_MAX_JOBS: usize = 20_000;
const LANE_MAX_BYTES: usize = 64 << 20;
/// Buffers kept for reuse, and the largest one kept.
const POOL_BUFFERS: usize = 64;
const POOL_BUFFER_MAX: usize = 192 << 10;

#[derive(Default)]
struct LaneQueue {
    jobs: Vec<Job>,
    /// The worker's emptied job list, handed back so pushing does not reallocate.
    spare: Vec<Job>,
    /// Packing buffers handed back by the worker: the event loop's thread reuses them
    /// instead of calling malloc for every request.
    free: Vec<Vec<u8>>,
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

    /// An empty buffer with room for at least `min` bytes, reused when possible.
    fn buffer(&self, min: usize) -> Vec<u8> {
        let reused = self.inner().queue.lock().free.pop();
        match reused {
            Some(mut buf) => {
                buf.reserve(min);
                buf
            }
            None => Vec::with_capacity(min.max(4096)),
        }
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
            let mut jobs = {
                let mut q = self.queue.lock();
                while q.jobs.is_empty() {
                    self.work.wait_for(&mut q, LANE_POLL);
                }
                q.bytes = 0;
                let spare = std::mem::take(&mut q.spare);
                std::mem::replace(&mut q.jobs, spare)
            };
            let n = jobs.len() as u64;
            let mut buffers = Vec::with_capacity(jobs.len().min(POOL_BUFFERS));
            for job in jobs.drain(..) {
                let mut buf = job.run();
                if buffers.len() < POOL_BUFFERS && buf.capacity() <= POOL_BUFFER_MAX {
                    buf.clear();
                    buffers.push(buf);
                }
            }
            let mut q = self.queue.lock();
            q.done += n;
            if q.spare.capacity() < jobs.capacity() {
                q.spare = jobs;
            }
            let room = POOL_BUFFERS.saturating_sub(q.free.len());
            q.free.extend(buffers.into_iter().take(room));
            drop(q);
            self.finished.notify_all();
        }
    }
}

/// The request id of a request: the `name` header of `headers` (ASGI `(name, value)`
/// pairs) when it is a safe inbound id, else a new UUIDv7. `name=None`: always new.
#[pyfunction]
#[pyo3(signature = (headers, name=None))]
fn request_id_for(headers: &Bound<'_, PyAny>, name: Option<&[u8]>) -> String {
    if let (Some(name), Ok(list)) = (name, headers.cast::<PyList>()) {
        for item in list.iter() {
            let Ok(t) = item.cast::<PyTuple>() else {
                continue;
            };
            let Ok(k) = t.get_borrowed_item(0) else {
                continue;
            };
            if k.cast::<PyBytes>().is_ok_and(|k| k.as_bytes() == name) {
                let value = t.get_borrowed_item(1).ok();
                return request_id(value.as_deref());
            }
        }
    }
    http::new_request_id()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<HttpSink>()?;
    m.add_function(wrap_pyfunction!(redaction_defaults, m)?)?;
    m.add_function(wrap_pyfunction!(request_id, m)?)?;
    m.add_function(wrap_pyfunction!(request_id_for, m)?)?;
    Ok(())
}
