//! The ASGI middleware's hand-off: when an exchange finishes, [`HttpSink::hand_off`] packs
//! it (scalars, strings, headers, bodies) into the current batch of this pipeline's HTTP
//! lane; the lane's thread redacts it, builds the record and routes it to the
//! destinations' queues, without the GIL and off the event loop. One `HttpSink` per
//! middleware holds its redaction settings, parsed once.
//!
//! The lane is bounded (jobs and bytes); a full lane drops the exchange and counts it
//! (`Core.http_lane_stats()`). Raw exchanges never leave the process: only the redacted
//! record reaches a destination queue. `flush` and `close` drain the lane first; `close` then
//! ends its thread (an exchange that comes later is worked through by its caller, to be
//! counted dropped by the closed core).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use pyo3::exceptions::PyValueError;
use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use pyo3::Borrowed;
use serde::Deserialize;

use super::convert;
use super::exchange::HttpExchange;
use super::PyCore;
use crate::config::PipelineOptions;
use crate::http::redact::{self, Redactor, Rules, DEFAULT_HEADERS, DEFAULT_KEYS};
use crate::http::{self, Exchange, Headers, TraceIds};
use crate::per_process::PerProcess;
use crate::pipeline::{reporting, Core};
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
    capture: CaptureConfig,
}

/// What the middleware copies and keeps, read by every [`HttpExchange`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    pub max_body: usize,
    pub capture_request: bool,
    pub capture_response: bool,
    #[serde(deserialize_with = "seconds")]
    pub request_timeout: Duration,
    #[serde(deserialize_with = "seconds")]
    pub response_timeout: Duration,
    pub slow_ms: f64,
    /// The inbound request id header, lower-case; `None`: always a new id.
    pub request_id_header: Option<String>,
    /// Echo the id in this response header (the same name).
    pub echo: bool,
    /// No sampling rules: every request is kept and no route is needed to decide.
    pub keep_all: bool,
    /// Rate limits are set: the middleware's token buckets are asked.
    pub limited: bool,
    /// Response bodies of 401 and 403 are copied too (`capture_auth_failure_bodies`).
    #[serde(skip)]
    pub auth_failure_bodies: bool,
    #[serde(skip)]
    pub echo_header: Option<Vec<u8>>,
    /// The same name as a Python `bytes`, made once.
    #[serde(skip)]
    pub echo_name: Option<Py<PyBytes>>,
}

fn seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = f64::deserialize(d)?;
    Duration::try_from_secs_f64(s).map_err(serde::de::Error::custom)
}

/// The middleware's request counters (read by `stats()`).
#[derive(Default)]
pub struct Counters {
    seen: AtomicU64,
    kept: AtomicU64,
    sampled_out: AtomicU64,
    excluded: AtomicU64,
    rate_limited: AtomicU64,
    internal_errors: AtomicU64,
    last_internal_error: Mutex<Option<String>>,
}

/// Counts one. Every caller holds the GIL (the exchange's methods), so a plain load and
/// store is enough: a locked add would stall the event loop's thread on every request
/// until its earlier stores reached memory.
fn bump(counter: &AtomicU64) {
    counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

impl Counters {
    pub fn seen(&self) {
        bump(&self.seen);
    }
    pub fn kept(&self) {
        bump(&self.kept);
    }
    pub fn sampled_out(&self) {
        bump(&self.sampled_out);
    }
    pub fn excluded(&self) {
        bump(&self.excluded);
    }
    pub fn rate_limited(&self) {
        bump(&self.rate_limited);
    }
    /// Counts a failure of the middleware's own, remembering the exception's type name.
    pub fn internal_error(&self, py: Python<'_>, e: &PyErr) {
        self.internal_error_named(e.get_type(py).name().map(|n| n.to_string()).ok());
    }

    fn internal_error_named(&self, type_name: Option<String>) {
        self.internal_errors.fetch_add(1, Ordering::Relaxed);
        *self.last_internal_error.lock() = type_name;
    }
}

/// One middleware's hand-off into one pipeline's core, with its redaction settings
/// parsed once.
#[pyclass(frozen, module = "logsluice._core", name = "HttpSink")]
pub struct HttpSink {
    core: Py<PyCore>,
    inner: Arc<Redactor>,
    pub capture: CaptureConfig,
    pub counters: Counters,
}

#[pymethods]
impl HttpSink {
    #[new]
    fn new(py: Python<'_>, core: Py<PyCore>, config_json: &str) -> PyResult<Self> {
        let mut c: RedactorConfig = serde_json::from_str(config_json)
            .map_err(|e| PyValueError::new_err(format!("invalid middleware settings: {e}")))?;
        crate::http::proxies::parse_trusted_list(&c.trusted_proxies)
            .map_err(|e| PyValueError::new_err(format!("trusted_proxies: {e}")))?;
        if let Some(h) = &mut c.capture.request_id_header {
            h.make_ascii_lowercase();
        }
        c.capture.echo_header = c
            .capture
            .request_id_header
            .as_ref()
            .filter(|_| c.capture.echo)
            .map(|h| h.as_bytes().to_vec());
        c.capture.auth_failure_bodies = c.capture_auth_failure_bodies;
        c.capture.echo_name = c
            .capture
            .echo_header
            .as_deref()
            .map(|h| PyBytes::new(py, h).unbind());
        Ok(HttpSink {
            core,
            capture: c.capture,
            counters: Counters::default(),
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

    /// Starts one request: its id, its clock, its body buffers.
    fn begin(
        slf: &Bound<'_, Self>,
        scope: &Bound<'_, PyDict>,
        middleware: &Bound<'_, PyAny>,
    ) -> PyResult<HttpExchange> {
        HttpExchange::begin(slf, scope, middleware)
    }

    /// Counts a failure the Python half of the middleware caught (its exception's type
    /// name), beside the exchange's own.
    fn internal_error(&self, type_name: String) {
        self.counters.internal_error_named(Some(type_name));
    }

    /// `{"seen": n, "kept": n, ...}` and the type name of the last internal error.
    fn counters(&self) -> (Vec<(&'static str, u64)>, Option<String>) {
        let c = &self.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        (
            vec![
                ("seen", n(&c.seen)),
                ("kept", n(&c.kept)),
                ("sampled_out", n(&c.sampled_out)),
                ("excluded", n(&c.excluded)),
                ("rate_limited", n(&c.rate_limited)),
                ("internal_errors", n(&c.internal_errors)),
            ],
            c.last_internal_error.lock().clone(),
        )
    }

    fn __repr__(&self) -> &'static str {
        "<logsluice http sink>"
    }
}

impl HttpSink {
    pub fn ctx(&self) -> &convert::Ctx {
        &self.core.get().ctx
    }

    /// See [`Lane::prepare`].
    pub fn prepare(&self) {
        self.core.get().http_lane.prepare();
    }

    /// The inbound request id header's value when it is a safe id, else a new UUIDv7; and
    /// the W3C trace ids when the request carries a valid `traceparent`.
    pub fn request_ids<'py>(
        &self,
        py: Python<'py>,
        headers: Option<&Bound<'py, PyAny>>,
        unix_us: i64,
    ) -> (Bound<'py, PyString>, Option<TraceIds>) {
        let name = self.capture.request_id_header.as_deref().map(str::as_bytes);
        let (id, trace) = headers.map(|h| inbound(h, name)).unwrap_or_default();
        let id = id.unwrap_or_else(|| {
            let new = http::request_id_bytes_at((unix_us / 1000) as u64);
            // Hex digits and dashes only.
            convert::ascii_str(py, &new)
        });
        (id, trace)
    }

    /// Stores an exception the app raised after its response was finished as an ERROR
    /// app record of the current request (see `HttpExchange::raised_late`).
    pub fn late_exception(
        &self,
        py: Python<'_>,
        exc: &Bound<'_, PyAny>,
        method: Option<&Bound<'_, PyAny>>,
        path: &Bound<'_, PyAny>,
    ) {
        if reporting() {
            return;
        }
        let pycore = self.core.get();
        let core = pycore.core();
        if !core.wants(40, Kind::App) {
            return;
        }
        let traceback = exc
            .getattr(intern!(py, "__traceback__"))
            .unwrap_or_else(|_| py.None().into_bound(py));
        let exception =
            convert::format_exception(&pycore.ctx, py, exc.get_type().as_any(), exc, &traceback);
        let kind = exc
            .get_type()
            .name()
            .map(|n| convert::text(&n))
            .unwrap_or_default();
        // Control characters escaped (`\u0000`) as in the request's access record.
        let path = self.scrub(&convert::text_with_nul(path));
        let method = method.map(convert::text_with_nul).unwrap_or_default();
        let method = redact::escape_controls(&method).into_owned();
        let fields = serde_json::json!({ "method": method, "path": path }).to_string();
        let record = convert::own_record(
            &pycore.ctx,
            py,
            ("ERROR", 40),
            "logsluice.middleware",
            format!("{kind} raised after the response to {method} {path} was sent (in a background task?)"),
            exception,
            fields.into_boxed_str(),
        );
        pycore.submit(py, &core, record);
    }

    /// Copies the finished exchange out of Python and puts it on the lane.
    pub fn hand_off<'py>(&self, py: Python<'py>, scalars: Scalars, parts: Parts<'_, 'py>) {
        if reporting() {
            return;
        }
        let pycore = self.core.get();
        let core = pycore.core_ref();
        if !core.wants(scalars.level_no(), Kind::Http) {
            return;
        }
        let exception = parts.exception.map(|exc| {
            convert::format_exception(
                &pycore.ctx,
                py,
                exc.get_type().as_any(),
                exc,
                &exc.getattr(intern!(py, "__traceback__"))
                    .unwrap_or_else(|_| py.None().into_bound(py)),
            )
            .unwrap_or_else(|| convert::text(exc))
        });
        let scope = parts.scope;
        let get = |key: &Bound<'py, PyString>| -> Option<Bound<'py, PyAny>> {
            scope.get_item(key).ok().flatten()
        };
        SCRATCH.with_borrow_mut(|buf| {
            buf.clear();
            // The job's length, filled in when it joins a batch.
            buf.extend_from_slice(&0u32.to_le_bytes());
            buf.extend_from_slice(&(Arc::as_ptr(&self.inner) as usize).to_le_bytes());
            scalars.write(buf);
            let mut p = Packed { buf };
            p.put_text(exception.as_deref());
            p.put_opt(parts.method);
            p.put_opt(get(intern!(py, "scheme")).as_ref());
            p.put_opt(get(intern!(py, "http_version")).as_ref());
            p.put_obj(parts.path);
            p.put_opt(get(intern!(py, "query_string")).as_ref());
            p.put_opt(Some(parts.route));
            p.put_opt(
                get(intern!(py, "client"))
                    .filter(|c| !c.is_none())
                    .and_then(|c| match c.cast::<PyTuple>() {
                        // Servers give `(host, port)`.
                        Ok(t) => t.get_item(0).ok(),
                        Err(_) => c.get_item(0).ok(),
                    })
                    .as_ref(),
            );
            p.put_obj(parts.request_id);
            p.put_headers(parts.request_headers);
            p.put_headers(parts.response_headers);
            // The bodies (most of the bytes) go straight from the exchange to the lane:
            // copying them needs no Python, so it may happen under the lane's lock.
            let bodies = [parts.request_body, parts.response_body];
            pycore
                .http_lane
                .push(py, p.buf, bodies, &self.inner, core, &pycore.options);
        });
    }
}

/// What a finished exchange hands off besides its scalars.
pub struct Parts<'a, 'py> {
    pub scope: &'a Bound<'py, PyDict>,
    pub method: Option<&'a Bound<'py, PyAny>>,
    /// As they came in (an inner middleware may replace the scope's).
    pub request_headers: Option<&'a Bound<'py, PyAny>>,
    pub path: &'a Bound<'py, PyAny>,
    pub route: &'a Bound<'py, PyAny>,
    pub request_id: &'a Bound<'py, PyAny>,
    pub response_headers: Option<&'a Bound<'py, PyAny>>,
    pub request_body: Body<'a>,
    pub response_body: Body<'a>,
    pub exception: Option<&'a Bound<'py, PyAny>>,
}

/// A body as the exchange kept it.
pub enum Body<'a> {
    /// Not captured.
    Absent,
    /// Copied in pieces by the exchange: copied again onto the batch.
    Copied(&'a [u8]),
    /// The server's own `bytes` object (a body that came in one message): handed to the
    /// lane by reference. Copying it on the event loop's thread cost more than its
    /// instructions: the batch's cache lines had last been read by the lane's thread.
    Shared(Py<PyBytes>),
}

impl Body<'_> {
    fn len(&self, py: Python<'_>) -> usize {
        match self {
            Body::Absent => 0,
            Body::Copied(b) => b.len(),
            Body::Shared(b) => b.as_bytes(py).len(),
        }
    }
}

/// A `bytes` object the lane's thread reads without the GIL: immutable, and kept alive
/// by `_obj` until the event loop's thread lets go of it (with the GIL) after the batch.
struct SharedBytes {
    _obj: Py<PyBytes>,
    data: *const u8,
    len: usize,
}

// SAFETY: `data` points into `_obj`, an immutable `bytes` object that this value keeps
// alive; reading it needs no GIL. The object itself is only dropped where the GIL is held
// (see `LaneQueue::release`), or deferred by PyO3 when it is not.
unsafe impl Send for SharedBytes {}

impl SharedBytes {
    fn new(py: Python<'_>, obj: Py<PyBytes>) -> Self {
        let bytes = obj.bind(py).as_bytes();
        let (data, len) = (bytes.as_ptr(), bytes.len());
        SharedBytes {
            _obj: obj,
            data,
            len,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        // SAFETY: see the `Send` impl: the object outlives `self`, and `bytes` never change.
        unsafe { std::slice::from_raw_parts(self.data, self.len) }
    }
}

thread_local! {
    /// Where the event loop's thread packs one exchange before copying it onto the lane
    /// under the lock: packing reads Python objects (and may run their `__str__`), which
    /// must not happen while the lane is locked.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The scalars of a finished exchange; its strings, headers and bodies travel packed.
#[derive(Default, Clone, Copy)]
pub struct Scalars {
    pub ts_us: i64,
    pub status: u16,
    pub flags: u32,
    pub request_size: u64,
    pub response_size: u64,
    pub duration_ms: f64,
    pub ttfb_ms: Option<f64>,
    pub sample_rate: f64,
}

impl Scalars {
    fn level_no(&self) -> u16 {
        http::level(self.status, self.flags).1
    }

    const SIZE: usize = 8 + 2 + 4 + 8 + 8 + 8 + 1 + 8 + 8;

    /// Laid out in a fixed array first: one copy into the buffer.
    fn write(&self, buf: &mut Vec<u8>) {
        let mut b = [0u8; Self::SIZE];
        b[..8].copy_from_slice(&self.ts_us.to_le_bytes());
        b[8..10].copy_from_slice(&self.status.to_le_bytes());
        b[10..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..22].copy_from_slice(&self.request_size.to_le_bytes());
        b[22..30].copy_from_slice(&self.response_size.to_le_bytes());
        b[30..38].copy_from_slice(&self.duration_ms.to_le_bytes());
        b[38] = u8::from(self.ttfb_ms.is_some());
        b[39..47].copy_from_slice(&self.ttfb_ms.unwrap_or(0.0).to_le_bytes());
        b[47..55].copy_from_slice(&self.sample_rate.to_le_bytes());
        buf.extend_from_slice(&b);
    }

    fn read(b: &[u8]) -> Option<Self> {
        let b = b.get(..Self::SIZE)?;
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Some(Scalars {
            ts_us: u64_at(0) as i64,
            status: u16::from_le_bytes([b[8], b[9]]),
            flags: u32::from_le_bytes(b[10..14].try_into().expect("4 bytes")),
            request_size: u64_at(14),
            response_size: u64_at(22),
            duration_ms: f64::from_bits(u64_at(30)),
            ttfb_ms: (b[38] != 0).then(|| f64::from_bits(u64_at(39))),
            sample_rate: f64::from_bits(u64_at(47)),
        })
    }

    fn exchange(self, exception: Option<String>) -> Exchange {
        Exchange {
            ts_us: self.ts_us,
            status: self.status,
            flags: self.flags,
            request_size: self.request_size,
            response_size: self.response_size,
            duration_ms: self.duration_ms,
            ttfb_ms: self.ttfb_ms,
            sample_rate: self.sample_rate,
            exception,
            ..Exchange::default()
        }
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

/// The exchange as the event loop copied it: the scalars, then every string, header and
/// body length-prefixed, one after the other, so the event loop's thread allocates
/// nothing per request and the lane's thread does the rest.
struct Packed<'b> {
    buf: &'b mut Vec<u8>,
}

const NONE: u32 = u32::MAX;
/// A body held by reference: the index of its `SharedBytes` in the batch follows.
const SHARED: u32 = u32::MAX - 1;

impl Packed<'_> {
    /// Its length, then the bytes: one capacity check, two plain copies (a request packs
    /// about twenty of these).
    #[inline]
    fn put(&mut self, b: &[u8]) {
        let (at, n) = (self.buf.len(), b.len());
        self.buf.reserve(4 + n);
        // SAFETY: `reserve` made room for `4 + n` bytes past `at`; every one of them is
        // written before the length is raised over them.
        unsafe {
            let end = self.buf.as_mut_ptr().add(at);
            end.cast::<[u8; 4]>()
                .write_unaligned((n as u32).to_le_bytes());
            std::ptr::copy_nonoverlapping(b.as_ptr(), end.add(4), n);
            self.buf.set_len(at + 4 + n);
        }
    }

    fn none(&mut self) {
        self.buf.extend_from_slice(&NONE.to_le_bytes());
    }

    fn put_text(&mut self, text: Option<&str>) {
        self.put_opt_bytes(text.map(str::as_bytes));
    }

    fn put_opt_bytes(&mut self, b: Option<&[u8]>) {
        match b {
            Some(b) => self.put(b),
            None => self.none(),
        }
    }

    /// A `str` as UTF-8 (lone surrogates replaced), `bytes` as they are, else `str()`.
    fn put_obj(&mut self, obj: &Bound<'_, PyAny>) {
        if let Ok(b) = obj.cast::<PyBytes>() {
            self.put(b.as_bytes());
        } else if let Some(text) = obj.cast::<PyString>().ok().and_then(|s| convert::utf8(s)) {
            self.put(text.as_bytes());
        } else if let Some(utf8) = obj
            .cast::<PyString>()
            .ok()
            .and_then(|s| s.encode_utf8().ok())
        {
            // Lone surrogates: CPython has no cached UTF-8 for these.
            self.put(utf8.as_bytes());
        } else {
            self.put(convert::text(obj).as_bytes());
        }
    }

    fn put_opt(&mut self, obj: Option<&Bound<'_, PyAny>>) {
        match obj.filter(|o| !o.is_none()) {
            Some(o) => self.put_obj(o),
            None => self.none(),
        }
    }

    /// At most 200 `(name, value)` pairs.
    fn put_headers(&mut self, obj: Option<&Bound<'_, PyAny>>) {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_le_bytes());
        let Some(obj) = obj.filter(|o| !o.is_none()) else {
            return;
        };
        let mut n = 0u32;
        // Servers and frameworks pass lists of `(bytes, bytes)` tuples.
        if let Ok(list) = obj.cast::<PyList>() {
            let (py, list) = (obj.py(), list.as_ptr());
            for i in 0..MAX_HEADERS as ffi::Py_ssize_t {
                // SAFETY: `i` is checked against the list's length as it is now; the item
                // is borrowed while only Rust reads it (`bytes_pair` and `put` run no
                // Python code), and owned before anything that may run some.
                let item = unsafe {
                    if i >= ffi::PyList_GET_SIZE(list) {
                        break;
                    }
                    Borrowed::from_ptr(py, ffi::PyList_GET_ITEM(list, i))
                };
                n += u32::from(match bytes_pair(&item) {
                    Some((k, v)) => {
                        self.put(k);
                        self.put(v);
                        true
                    }
                    None => self.put_header_obj(&item.to_owned()),
                });
            }
        } else {
            n = self.put_headers_iter(obj);
        }
        self.buf[at..at + 4].copy_from_slice(&n.to_le_bytes());
    }

    /// Headers given as some other iterable.
    #[cold]
    fn put_headers_iter(&mut self, obj: &Bound<'_, PyAny>) -> u32 {
        let Ok(iter) = obj.try_iter() else {
            return 0;
        };
        let mut n = 0;
        for item in iter.flatten().take(MAX_HEADERS) {
            n += u32::from(self.put_header(&item));
        }
        n
    }

    /// One `(name, value)` pair; false when `item` is not one.
    fn put_header(&mut self, item: &Bound<'_, PyAny>) -> bool {
        match bytes_pair(item) {
            Some((k, v)) => {
                self.put(k);
                self.put(v);
                true
            }
            None => self.put_header_obj(item),
        }
    }

    /// A pair of something other than `bytes`: stored as their text.
    #[cold]
    fn put_header_obj(&mut self, item: &Bound<'_, PyAny>) -> bool {
        let (Ok(k), Ok(v)) = (item.get_item(0), item.get_item(1)) else {
            return false;
        };
        self.put_obj(&k);
        self.put_obj(&v);
        true
    }
}

/// The most headers kept of a request or a response.
const MAX_HEADERS: usize = 200;

/// A `(bytes, bytes)` tuple read through the C API: the shape every ASGI server uses for
/// headers, read here for every header of every request. A longer tuple gives its first two
/// items (what every reader of headers here has always taken from one).
pub fn bytes_pair<'a>(item: &'a Bound<'_, PyAny>) -> Option<(&'a [u8], &'a [u8])> {
    let t = item.as_ptr();
    // SAFETY: `t` is a live object. The tuple macros read it only after the type check; its
    // items are borrowed references living as long as the tuple, which outlives `'a`. A
    // bytes object's buffer lives as long as the object and never changes.
    unsafe {
        if ffi::PyTuple_Check(t) == 0 || ffi::PyTuple_GET_SIZE(t) < 2 {
            return None;
        }
        let part = |i: ffi::Py_ssize_t| -> Option<&'a [u8]> {
            let o = ffi::PyTuple_GET_ITEM(t, i);
            if ffi::PyBytes_Check(o) == 0 {
                return None;
            }
            let len = usize::try_from(ffi::Py_SIZE(o)).ok()?;
            Some(std::slice::from_raw_parts(
                ffi::PyBytes_AS_STRING(o).cast::<u8>(),
                len,
            ))
        };
        Some((part(0)?, part(1)?))
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

    /// A body: packed, or held by reference in `shared`.
    fn body<'s>(&mut self, shared: &'s [SharedBytes]) -> Option<&'s [u8]>
    where
        'a: 's,
    {
        let at = self.pos;
        let tag = u32::from_le_bytes(self.buf.get(at..at + 4)?.try_into().ok()?);
        if tag != SHARED {
            return self.opt();
        }
        let index = u32::from_le_bytes(self.buf.get(at + 4..at + 8)?.try_into().ok()?);
        self.pos += 8;
        shared.get(index as usize).map(SharedBytes::as_bytes)
    }

    fn bytes(&mut self) -> &'a [u8] {
        self.opt().unwrap_or_default()
    }

    fn text(&mut self) -> String {
        crate::record::clean_bytes(self.bytes())
    }

    /// Text whose control characters the record escapes (`\u0000`): NULs kept for that,
    /// not stripped.
    fn escaped_later(b: &[u8]) -> String {
        crate::record::lossy(b).into_owned()
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

/// The exchanges waiting for the lane's thread, back to back in one buffer: each is its
/// length, its redactor (by address), its scalars, then its packed strings and bodies.
/// Two batches take turns (one filled by the event loop, one worked through by the lane's
/// thread), so in a steady state nothing is allocated per request on either side.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    jobs: usize,
    /// The middlewares' redactors (a pipeline may serve several apps), kept alive for
    /// the jobs that name them.
    redactors: Vec<Arc<Redactor>>,
    core: Option<Arc<Core>>,
    max_message_bytes: usize,
    /// Bodies held by reference, named by index in `bytes`.
    shared: Vec<SharedBytes>,
    /// What the batch holds, its `bytes` and its shared bodies: what the lane's bound counts.
    weight: usize,
}

impl Batch {
    /// One job: its packed part (whose first four bytes get the job's length here), then
    /// its bodies. `size` is its weight.
    fn put(&mut self, py: Python<'_>, packed: &[u8], bodies: [Body<'_>; 2], size: usize) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(packed);
        let mut p = Packed {
            buf: &mut self.bytes,
        };
        for body in bodies {
            match body {
                Body::Absent => p.none(),
                Body::Copied(b) => p.put(b),
                Body::Shared(obj) => {
                    p.buf.extend_from_slice(&SHARED.to_le_bytes());
                    p.buf
                        .extend_from_slice(&(self.shared.len() as u32).to_le_bytes());
                    self.shared.push(SharedBytes::new(py, obj));
                }
            }
        }
        let len = (self.bytes.len() - start) as u32;
        self.bytes[start..start + 4].copy_from_slice(&len.to_le_bytes());
        self.jobs += 1;
        self.weight += size;
    }

    fn run(&mut self) {
        if let Some(core) = self.core.clone() {
            let mut pos = 0;
            let mut done = 0usize;
            while let Some(len) = self.bytes.get(pos..pos + 4) {
                done += 1;
                if done.is_multiple_of(LANE_YIELD_EVERY) {
                    crate::pipeline::let_application_run();
                }
                let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
                let Some(job) = self.bytes.get(pos..pos + len) else {
                    break;
                };
                pos += len.max(4);
                if let Some(record) = self.record(job) {
                    let blocked = core.submit(record);
                    if !blocked.is_empty() {
                        Core::wait_for_room(blocked);
                    }
                }
            }
        }
        self.bytes.clear();
        self.jobs = 0;
        self.weight = 0;
        self.redactors.clear();
        // A burst's buffer is not kept for ever.
        if self.bytes.capacity() > BATCH_KEEP_BYTES {
            self.bytes.shrink_to(BATCH_KEEP_BYTES);
        }
    }

    fn record(&self, job: &[u8]) -> Option<crate::record::Record> {
        const PTR: usize = std::mem::size_of::<usize>();
        let redactor = usize::from_le_bytes(job.get(4..4 + PTR)?.try_into().ok()?);
        let redactor = self
            .redactors
            .iter()
            .find(|r| Arc::as_ptr(r) as usize == redactor)?;
        let scalars = Scalars::read(job.get(4 + PTR..)?)?;
        let mut u = Unpack {
            buf: job,
            pos: 4 + PTR + Scalars::SIZE,
        };
        let mut ex = scalars.exchange(u.opt().map(crate::record::clean_bytes));
        // What `build_record` escapes keeps its NULs, to be stored as `\u0000`.
        ex.method = u.opt().map_or_else(|| "GET".into(), Unpack::escaped_later);
        ex.scheme = u.opt().map_or_else(|| "http".into(), Unpack::escaped_later);
        ex.http_version = u.opt().map_or_else(|| "1.1".into(), Unpack::escaped_later);
        ex.path = Unpack::escaped_later(u.bytes());
        ex.query = u.bytes().to_vec();
        ex.route = u.opt().map(Unpack::escaped_later);
        ex.client = u.opt().map(crate::record::clean_bytes);
        ex.request_id = u.text();
        ex.request_headers = u.headers();
        ex.response_headers = u.headers();
        ex.request_body = u.body(&self.shared).map(<[u8]>::to_vec);
        ex.response_body = u.body(&self.shared).map(<[u8]>::to_vec);
        Some(http::build_record(redactor, ex, self.max_message_bytes))
    }
}

/// Jobs waiting at most this long before the lane's thread looks (it is not woken per
/// job: a wake-up is a system call on the event loop's thread).
const LANE_POLL: Duration = Duration::from_millis(20);
/// Exchanges built between two chances for the application's threads to run.
const LANE_YIELD_EVERY: usize = 16;
/// Woken early when this many jobs wait.
const LANE_WAKE_AT: usize = 256;
/// The most a batch's byte buffer keeps between batches.
const BATCH_KEEP_BYTES: usize = 4 << 20;
/// Cache lines asked for when a request begins: an exchange's packed part (its bodies,
/// when they came in one message each, are held by reference).
const PREPARE_LINES: usize = 16;

#[derive(Default)]
struct LaneQueue {
    batch: Batch,
    /// The batch the lane's thread handed back, emptied, for the next swap.
    spare: Option<Batch>,
    /// Bodies of worked-through batches, dropped by the next hand-off (which holds the
    /// GIL: dropping them on the lane's thread would queue each decref in PyO3's pool).
    release: Vec<SharedBytes>,
    /// The batch the lane's thread is redacting: it counts against the bounds too.
    running_jobs: usize,
    running_bytes: usize,
    submitted: u64,
    done: u64,
    /// The pipeline was closed: the lane's thread ends once the batch is empty, and
    /// exchanges handed off from then on are worked through by the caller.
    closed: bool,
}

struct LaneInner {
    queue: Mutex<LaneQueue>,
    work: Condvar,
    finished: Condvar,
    /// The lane's thread, until `close` takes it to join it.
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// One per pipeline; its thread starts on the first exchange (again in a forked child) and
/// ends when the pipeline closes.
#[derive(Default)]
pub struct Lane {
    slot: PerProcess<LaneInner>,
    /// Where the next exchange will be written (a hint: read without the lock).
    next_at: AtomicUsize,
    dropped: AtomicU64,
    /// Set by [`Lane::close`]: a lane started after it (in a forked child) has no thread.
    closed: AtomicBool,
}

impl Lane {
    fn inner(&self) -> &Arc<LaneInner> {
        self.slot.get_or_init_ref(|| {
            let closed = self.closed.load(Ordering::SeqCst);
            let inner = Arc::new(LaneInner {
                queue: Mutex::new(LaneQueue {
                    closed,
                    ..Default::default()
                }),
                work: Condvar::new(),
                finished: Condvar::new(),
                thread: Mutex::new(None),
            });
            if !closed {
                let worker = inner.clone();
                let handle = std::thread::Builder::new()
                    .name("logsluice-http".into())
                    .spawn(move || worker.run())
                    .expect("spawning a thread");
                *inner.thread.lock() = Some(handle);
            }
            inner
        })
    }

    /// Asks for the cache lines the next exchange will be written to, when a request
    /// begins: the lane's thread read them last, and the copy at the hand-off would
    /// otherwise wait for each of them to come back (the event loop's thread stalled for
    /// about a microsecond per request on that copy).
    pub fn prepare(&self) {
        #[cfg(target_arch = "x86_64")]
        {
            let at = self.next_at.load(Ordering::Relaxed);
            if at != 0 {
                for line in 0..PREPARE_LINES {
                    // SAFETY: a prefetch never faults, whatever the address.
                    unsafe {
                        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_ET0 }>(
                            (at + line * 64) as *const i8,
                        );
                    }
                }
            }
        }
    }

    /// Copies one packed exchange onto the current batch, or drops it (counted) when the
    /// lane is full. `packed` starts with room for the job's length (filled in by
    /// [`Batch::put`]); the bodies follow it (copied, or held by reference).
    fn push(
        &self,
        py: Python<'_>,
        packed: &[u8],
        bodies: [Body<'_>; 2],
        redactor: &Arc<Redactor>,
        core: &Arc<Core>,
        options: &PipelineOptions,
    ) {
        // Held bodies count against the lane's bound as much as copied ones.
        let size = packed.len() + bodies.iter().map(|b| 4 + b.len(py)).sum::<usize>();
        let inner = self.inner();
        let mut q = inner.queue.lock();
        // Bodies of batches the lane's thread is done with, let go of here (with the GIL).
        let released = std::mem::take(&mut q.release);
        if q.closed {
            // The lane's thread is gone: the record is built here and meets the closed
            // core, which counts it dropped (`closed`) as it did when the thread took it.
            drop(q);
            drop(released);
            let mut late = Batch::default();
            late.redactors.push(redactor.clone());
            late.core = Some(core.clone());
            late.max_message_bytes = options.max_message_bytes;
            late.put(py, packed, bodies, size);
            late.run();
            return;
        }
        let (running_jobs, running_bytes) = (q.running_jobs, q.running_bytes);
        let b = &mut q.batch;
        if b.jobs + running_jobs >= options.handoff_max_requests
            || b.weight + running_bytes + size > options.handoff_max_bytes
        {
            drop(q);
            drop(released);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if !b.redactors.iter().any(|r| Arc::ptr_eq(r, redactor)) {
            b.redactors.push(redactor.clone());
        }
        if b.core.is_none() {
            b.core = Some(core.clone());
            b.max_message_bytes = options.max_message_bytes;
        }
        b.put(py, packed, bodies, size);
        self.next_at
            .store(b.bytes.as_ptr() as usize + b.bytes.len(), Ordering::Relaxed);
        let wake = b.jobs == LANE_WAKE_AT;
        q.submitted += 1;
        drop(q);
        drop(released);
        if wake {
            inner.work.notify_one();
        }
    }

    /// Waits (GIL released) until every job pushed before the call is on a destination
    /// queue, for at most `timeout` seconds; returns the seconds left.
    pub fn drain(&self, py: Python<'_>, timeout: f64) -> f64 {
        let Some(inner) = self.slot.current() else {
            return timeout;
        };
        let start = Instant::now();
        let limit = crate::config::seconds(timeout);
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

    /// Ends the lane's thread once it has worked through what it holds (call it after
    /// [`Lane::drain`]); exchanges handed off later are worked through by their caller.
    /// Returns the thread to join, if this process started one.
    pub fn close(&self) -> Option<JoinHandle<()>> {
        let _guard = self.slot.hold_start();
        self.closed.store(true, Ordering::SeqCst);
        let inner = self.slot.current()?;
        inner.queue.lock().closed = true;
        inner.work.notify_one();
        let thread = inner.thread.lock().take();
        thread
    }

    /// `(waiting, dropped)`.
    pub fn stats(&self) -> (u64, u64) {
        let waiting = self.slot.current().map_or(0, |i| {
            let q = i.queue.lock();
            q.submitted - q.done
        });
        (waiting, self.dropped.load(Ordering::Relaxed))
    }
}

impl LaneInner {
    fn run(self: Arc<Self>) {
        crate::pipeline::yield_to_application();
        loop {
            let mut batch = {
                let mut q = self.queue.lock();
                while q.batch.jobs == 0 {
                    if q.closed {
                        // Nothing left: let go of the closed core and the buffers.
                        q.batch = Batch::default();
                        q.spare = None;
                        return;
                    }
                    self.work.wait_for(&mut q, LANE_POLL);
                }
                let next = q.spare.take().unwrap_or_default();
                let batch = std::mem::replace(&mut q.batch, next);
                q.running_jobs = batch.jobs;
                q.running_bytes = batch.weight;
                // The core and the message limit stay with the batch being filled.
                q.batch.core = batch.core.clone();
                q.batch.max_message_bytes = batch.max_message_bytes;
                batch
            };
            let n = batch.jobs as u64;
            batch.run();
            let mut q = self.queue.lock();
            q.done += n;
            (q.running_jobs, q.running_bytes) = (0, 0);
            // Its shared bodies are let go of by the event loop's thread, with the GIL.
            q.release.append(&mut batch.shared);
            q.spare = Some(std::mem::take(&mut batch));
            drop(q);
            self.finished.notify_all();
        }
    }
}

/// Joins the lane's thread if it ends by `until`; past it, it is left behind.
pub fn join_until(handle: JoinHandle<()>, until: Instant) {
    while !handle.is_finished() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(2));
    }
    if handle.is_finished() {
        let _ = handle.join();
    }
}

fn is_traceparent(name: &[u8]) -> bool {
    name.len() == 11 && name.eq_ignore_ascii_case(b"traceparent")
}

/// The inbound request id, when the `name` header holds a safe one, and the trace ids of
/// the first `traceparent` header, when valid: one pass over the headers.
fn inbound<'py>(
    headers: &Bound<'py, PyAny>,
    name: Option<&[u8]>,
) -> (Option<Bound<'py, PyString>>, Option<TraceIds>) {
    let Ok(list) = headers.cast::<PyList>() else {
        return (None, None);
    };
    let py = headers.py();
    // A valid id is ASCII: the conversion cannot fail.
    let safe_id = |v: &[u8]| http::valid_request_id(v).then(|| convert::ascii_str(py, v));
    // `None` until the header is seen; then what it held (itself maybe `None`).
    let (mut id, mut trace) = (name.map_or(Some(None), |_| None), None);
    let mut note = |k: &[u8], v: &[u8]| {
        if id.is_none() && Some(k) == name {
            id = Some(safe_id(v));
        } else if trace.is_none() && is_traceparent(k) {
            trace = Some(TraceIds::parse(v));
        }
        id.is_some() && trace.is_some()
    };
    let list = list.as_ptr();
    let mut i = 0;
    // SAFETY: `i` is checked against the list's length as it is now; the item is borrowed
    // while only Rust reads it (`note` runs no Python code: it may make a `str`, which
    // starts no collection).
    while i < unsafe { ffi::PyList_GET_SIZE(list) } {
        let item = unsafe { Borrowed::from_ptr(py, ffi::PyList_GET_ITEM(list, i)) };
        if let Some((k, v)) = bytes_pair(&item) {
            if note(k, v) {
                break;
            }
        }
        i += 1;
    }
    (id.flatten(), trace.flatten())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<HttpSink>()?;
    m.add_class::<HttpExchange>()?;
    m.add_function(wrap_pyfunction!(redaction_defaults, m)?)?;
    Ok(())
}
