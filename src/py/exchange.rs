//! One HTTP request in flight, held natively: the ASGI middleware's `receive` and `send`
//! wrappers call [`HttpExchange::received`] and [`HttpExchange::sending`] with each
//! message, bodies are kept (one message: the server's `bytes`) or copied (several) as
//! they pass, and the finished exchange is packed onto the pipeline's HTTP lane without
//! building any Python object on the way.
//!
//! Keeping this bookkeeping out of Python is what makes the middleware cheap: a Python
//! object with thirty attributes costs more per request than everything done here.
//! Nothing here raises into the app: internal failures are counted on the sink.

use std::time::{Duration, Instant};

use pyo3::exceptions::PyOSError;
use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple, PyType};
use pyo3::Borrowed;

use super::convert::{reset_request_id, reset_trace, set_request_id, set_trace, utf8};
use super::http::{bytes_pair, Body, HttpSink};
use crate::http::{flags, TraceIds};

/// The `route` of requests no route matched; `middleware.UNMATCHED_ROUTE` in Python.
pub const UNMATCHED_ROUTE: &str = "<unmatched>";

/// Statuses whose response has no body to copy.
const NO_RESPONSE_BODY: [u16; 2] = [204, 304];
/// Authentication failures: their response bodies are copied only with
/// `capture_auth_failure_bodies`.
const AUTH_FAILURE: [u16; 2] = [401, 403];

/// A body as it passes: the first `cap` bytes, the full size, and when it began.
#[derive(Default)]
struct BodyCopy {
    /// A body that came in one message is kept as the server's `bytes` object (immutable):
    /// no copy until the hand-off packs it.
    whole: Option<Py<PyBytes>>,
    /// A body that came in pieces: what fit under the cap.
    bytes: Vec<u8>,
    size: u64,
    left: usize,
    first: Option<Instant>,
    capture: bool,
}

impl BodyCopy {
    fn new(cap: usize) -> Self {
        BodyCopy {
            left: cap,
            ..BodyCopy::default()
        }
    }

    /// Counts a chunk and copies what fits; returns false when the time limit ended
    /// capture (later chunks are still counted).
    fn take(&mut self, chunk: &Bound<'_, PyBytes>, more: bool, timeout: Duration) -> bool {
        let data = chunk.as_bytes();
        self.size += data.len() as u64;
        if !self.capture {
            return true;
        }
        if self.first.is_none() && !more && self.whole.is_none() && data.len() <= self.left {
            // The whole body in one message: no time limit to watch, nothing to copy.
            self.left -= data.len();
            self.whole = Some(chunk.clone().unbind());
            return true;
        }
        if let Some(whole) = self.whole.take() {
            // More after a message that said it was the last: keep both.
            self.bytes
                .extend_from_slice(whole.bind(chunk.py()).as_bytes());
        }
        let now = Instant::now();
        match self.first {
            None => self.first = Some(now),
            Some(first) if now.duration_since(first) > timeout => {
                self.capture = false;
                return false;
            }
            Some(_) => {}
        }
        if self.left == 0 {
            return true;
        }
        let n = data.len().min(self.left);
        self.bytes.extend_from_slice(&data[..n]);
        self.left -= n;
        true
    }

    /// What the hand-off packs (a kept `bytes` object is handed over, not copied).
    fn parts(&mut self) -> Body<'_> {
        match self.whole.take() {
            // `take` moves a kept body into `bytes` when more follows: never both.
            Some(whole) => Body::Shared(whole),
            None if self.capture || !self.bytes.is_empty() => Body::Copied(&self.bytes),
            None => Body::Absent,
        }
    }
}

#[pyclass(module = "logsluice._core", name = "HttpExchange")]
pub struct HttpExchange {
    sink: Py<HttpSink>,
    /// The Python middleware: asked for routes and sample rates when those need its
    /// patterns, and for rate-limit tokens.
    mw: Py<PyAny>,
    scope: Py<PyDict>,
    /// The request id (also set in the request's context by the middleware).
    rid: Py<PyString>,
    /// `scope["method"]` and `scope["headers"]` as the request came in (read once: the
    /// record and the HEAD check need them).
    method: Option<Py<PyAny>>,
    headers: Option<Py<PyAny>>,
    /// Resets the request id context variable when the app call ends.
    token: Option<Py<PyAny>>,
    /// Resets the trace context variable, when the request came with a `traceparent`.
    trace_token: Option<Py<PyAny>>,
    /// `scope["app"]`, `scope["root_path"]` and `scope["path"]` on entry: routers rewrite
    /// them on the shared scope, the entry values are the request's.
    app: Py<PyAny>,
    root_path: Py<PyAny>,
    entry_path: Py<PyAny>,
    start_us: i64,
    /// Monotonic clock readings (ns): the request's start and its response's start.
    t0: u64,
    t_start: Option<u64>,
    decided: bool,
    sampled_in: bool,
    excluded: bool,
    trailers: bool,
    /// The record is finished (handed off or dropped).
    done: bool,
    /// The message just passed to `sending` completes the response.
    last: bool,
    rate: f64,
    route: Option<Py<PyAny>>,
    request: BodyCopy,
    response: BodyCopy,
    status: u16,
    response_headers: Option<Py<PyAny>>,
    flags: u32,
}

/// `clock`'s time in microseconds (`CLOCK_REALTIME`: since the epoch) or nanoseconds
/// (`CLOCK_MONOTONIC`, what `Instant` reads), as a plain integer: a request reads three
/// clocks and takes two differences, without `SystemTime`'s and `Instant`'s checked
/// arithmetic.
fn clock(id: libc::clockid_t) -> libc::timespec {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; both clocks exist on every Linux.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts
}

// `time_t` and `c_long` are `i64` here, narrower on 32-bit targets.
#[allow(clippy::unnecessary_cast)]
fn now_us() -> i64 {
    let ts = clock(libc::CLOCK_REALTIME);
    ts.tv_sec as i64 * 1_000_000 + ts.tv_nsec as i64 / 1_000
}

fn mono_ns() -> u64 {
    let ts = clock(libc::CLOCK_MONOTONIC);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn ms_between(from_ns: u64, to_ns: u64) -> f64 {
    to_ns.saturating_sub(from_ns) as f64 / 1e6
}

fn get<'py>(d: &Bound<'py, PyDict>, key: &Bound<'py, PyString>) -> Option<Bound<'py, PyAny>> {
    d.get_item(key).ok().flatten()
}

/// The values of `keys` in `d` (`None` where absent), read in one pass over the dict: an
/// ASGI message has two to four keys, and looking each wanted key up costs more than
/// walking them all. Keys are matched by identity first (servers and frameworks write
/// them as literals, interned like `intern!`'s), else by value.
fn fields<'py, const N: usize>(
    d: &Bound<'py, PyDict>,
    keys: [&Bound<'py, PyString>; N],
) -> [Option<Bound<'py, PyAny>>; N] {
    let py = d.py();
    let mut out = [const { None }; N];
    let (mut pos, mut k, mut v): (ffi::Py_ssize_t, *mut ffi::PyObject, *mut ffi::PyObject) =
        (0, std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: `d` is a live dict, not changed during the walk: nothing here runs Python code
    // (keys that are not exact `str` are looked up afterwards, by the dict). `PyDict_Next`
    // gives borrowed references, made owned at once.
    unsafe {
        let mut other_keys = false;
        while ffi::PyDict_Next(d.as_ptr(), &mut pos, &mut k, &mut v) != 0 {
            if let Some(i) = keys.iter().position(|key| key.as_ptr() == k) {
                out[i] = Some(Bound::from_borrowed_ptr(py, v));
            } else if ffi::PyUnicode_CheckExact(k) != 0 {
                let len = ffi::PyUnicode_GET_LENGTH(k);
                if let Some(i) = keys.iter().position(|key| {
                    ffi::PyUnicode_GET_LENGTH(key.as_ptr()) == len
                        && ffi::PyUnicode_Compare(key.as_ptr(), k) == 0
                }) {
                    out[i] = Some(Bound::from_borrowed_ptr(py, v));
                }
            } else {
                other_keys = true;
            }
        }
        if other_keys {
            for (slot, key) in out.iter_mut().zip(keys) {
                if slot.is_none() {
                    *slot = get(d, key);
                }
            }
        }
    }
    out
}

/// The message type, borrowed (ASGI types are plain `str`).
fn kind_of<'a>(kind: &'a Option<Bound<'_, PyAny>>) -> &'a str {
    kind.as_ref()
        .and_then(|k| k.cast::<PyString>().ok())
        .and_then(utf8)
        .unwrap_or("")
}

fn truthy(v: Option<Bound<'_, PyAny>>) -> bool {
    let Some(v) = v else {
        return false;
    };
    // SAFETY: the singletons' addresses, compared only.
    let (t, f) = unsafe { (ffi::Py_True(), ffi::Py_False()) };
    // ASGI flags are bools: told apart by identity before asking the object.
    match v.as_ptr() {
        p if p == t => true,
        p if p == f => false,
        _ => v.is_truthy().unwrap_or(false),
    }
}

/// `zlib.crc32(rid) / 2**32`: the same request id gives the same sampling decision in
/// every process.
fn sample_point(rid: &str) -> f64 {
    let mut crc = flate2::Crc::new();
    crc.update(rid.as_bytes());
    f64::from(crc.sum()) / 4_294_967_296.0
}

impl HttpExchange {
    pub fn begin(
        sink: &Bound<'_, HttpSink>,
        scope: &Bound<'_, PyDict>,
        mw: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let py = scope.py();
        let s = sink.get();
        let start_us = now_us();
        s.prepare();
        let headers = get(scope, intern!(py, "headers"));
        let (rid_obj, trace) = s.request_ids(py, headers.as_ref(), start_us);
        let none = || py.None();
        let cap = s.capture.max_body;
        let entry_path = scope
            .get_item(intern!(py, "path"))?
            .map_or_else(none, Bound::unbind);
        // Last of what can fail: a request id set here must be reset by `end`.
        let token = set_request_id(s.ctx(), rid_obj.as_any())?;
        let trace_token = enter_trace(s, py, trace);
        s.counters.seen();
        Ok(HttpExchange {
            token: Some(token.unbind()),
            trace_token,
            sink: sink.clone().unbind(),
            mw: mw.clone().unbind(),
            rid: rid_obj.unbind(),
            method: get(scope, intern!(py, "method")).map(Bound::unbind),
            headers: headers.map(Bound::unbind),
            app: get(scope, intern!(py, "app")).map_or_else(none, Bound::unbind),
            root_path: get(scope, intern!(py, "root_path")).map_or_else(
                || intern!(py, "").clone().into_any().unbind(),
                Bound::unbind,
            ),
            entry_path,
            scope: scope.clone().unbind(),
            start_us,
            t0: mono_ns(),
            t_start: None,
            decided: false,
            sampled_in: false,
            excluded: false,
            trailers: false,
            done: false,
            last: false,
            rate: 1.0,
            route: None,
            request: BodyCopy::new(cap),
            response: BodyCopy::new(cap),
            status: 0,
            response_headers: None,
            flags: 0,
        })
    }

    fn internal_error(&self, py: Python<'_>, e: &PyErr) {
        self.sink.get().counters.internal_error(py, e);
    }

    fn is_head(&self, py: Python<'_>) -> bool {
        self.method
            .as_ref()
            .is_some_and(|m| m.bind(py).cast::<PyString>().is_ok_and(|m| m == "HEAD"))
    }

    fn rid_text<'a>(&'a self, py: Python<'a>) -> &'a str {
        // Made by `begin` from ASCII: the UTF-8 form is the string's own buffer.
        utf8(self.rid.bind(py)).unwrap_or_default()
    }

    /// Route, sample rate and whether to copy bodies: decided once, as late as possible
    /// (first body read or response start), when routing has happened.
    fn decide(&mut self, py: Python<'_>) {
        self.decided = true;
        let sink = self.sink.get();
        let c = &sink.capture;
        if !c.keep_all {
            match self.ask_rate(py) {
                Ok((route, rate, excluded)) => {
                    self.route = Some(route);
                    self.rate = rate;
                    self.excluded = excluded;
                }
                // Keeping too much beats losing a request to our own bug.
                Err(e) => self.internal_error(py, &e),
            }
        }
        self.sampled_in = if self.excluded || self.rate <= 0.0 {
            false
        } else if self.rate >= 1.0 {
            true
        } else {
            sample_point(self.rid_text(py)) < self.rate
        };
        self.request.capture = self.sampled_in && c.capture_request;
        self.response.capture = self.sampled_in && c.capture_response && !self.is_head(py);
    }

    /// `mw._decide(scope, entry)` → `(route, rate, excluded)`.
    fn ask_rate(&self, py: Python<'_>) -> PyResult<(Py<PyAny>, f64, bool)> {
        self.mw
            .bind(py)
            .call_method1(
                intern!(py, "_decide"),
                (self.scope.bind(py), self.entry(py)?, self.full_path(py)),
            )?
            .extract()
    }

    /// What the Python route helpers need to match the request again.
    fn entry<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(
            py,
            [
                self.app.bind(py),
                self.root_path.bind(py),
                self.entry_path.bind(py),
            ],
        )
    }

    /// The path with `root_path` included once.
    fn full_path<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        let path = self.entry_path.bind(py);
        let root = self.root_path.bind(py);
        if let (Ok(p), Ok(r)) = (path.cast::<PyString>(), root.cast::<PyString>()) {
            // Most apps have no root path: the path's text is not needed then.
            if let Some(r_s) = utf8(r).filter(|r_s| !r_s.is_empty()) {
                if let Some(p_s) = utf8(p).filter(|p_s| !p_s.starts_with(r_s)) {
                    return PyString::new(py, &format!("{r_s}{p_s}")).into_any();
                }
            }
        }
        path.clone()
    }

    /// The route template: `scope["route"].path` when the request did not go through a
    /// mount (the common case), else the middleware's full lookup. Never raises.
    fn route_of(&self, py: Python<'_>) -> Py<PyAny> {
        let scope = self.scope.bind(py);
        if get(scope, intern!(py, "fastapi")).is_none() {
            let route = get(scope, intern!(py, "route"));
            if route.is_none() && get(scope, intern!(py, "endpoint")).is_none() {
                return intern!(py, "<unmatched>").clone().into_any().unbind();
            }
            if let Some(route) = route {
                let entry_root = self.root_path.bind(py);
                let same_root = get(scope, intern!(py, "root_path"))
                    .is_some_and(|r| r.is(entry_root) || r.eq(entry_root).unwrap_or(false));
                if same_root {
                    if let Ok(path) = route.getattr(intern!(py, "path")) {
                        if path.is_instance_of::<PyString>() {
                            return path.unbind();
                        }
                    }
                }
            }
        }
        let found = self.entry(py).and_then(|entry| {
            self.mw
                .bind(py)
                .call_method1(intern!(py, "_route_of"), (scope, entry))
        });
        match found {
            Ok(route) if route.is_instance_of::<PyString>() => route.unbind(),
            Ok(_) => PyString::new(py, UNMATCHED_ROUTE).into_any().unbind(),
            Err(e) => {
                self.internal_error(py, &e);
                PyString::new(py, UNMATCHED_ROUTE).into_any().unbind()
            }
        }
    }

    fn on_request(&mut self, py: Python<'_>, message: &Bound<'_, PyDict>) -> PyResult<()> {
        let [kind, body, more] = fields(
            message,
            [
                intern!(py, "type"),
                intern!(py, "body"),
                intern!(py, "more_body"),
            ],
        );
        let kind = kind_of(&kind);
        if kind == "http.request" {
            if !self.decided {
                self.decide(py);
            }
            if let Some(body) = body {
                let body = body.cast::<PyBytes>()?;
                if !body.as_bytes().is_empty() {
                    let more = truthy(more);
                    let timeout = self.sink.get().capture.request_timeout;
                    if !self.request.take(body, more, timeout) {
                        self.flags |= flags::REQUEST_BODY_TIMEOUT;
                    }
                }
            }
        } else if kind == "http.disconnect" {
            self.flags |= flags::DISCONNECTED;
        }
        Ok(())
    }

    /// The response start: status, headers, and the request id echoed on a copy of the
    /// message (what the app passed is never mutated).
    fn on_start<'py>(
        &mut self,
        py: Python<'py>,
        message: &Bound<'py, PyDict>,
        status: Option<Bound<'py, PyAny>>,
        headers: Option<Bound<'py, PyAny>>,
        trailers: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Option<Bound<'py, PyDict>>> {
        self.t_start = Some(mono_ns());
        self.status = status.and_then(|s| s.extract::<u16>().ok()).unwrap_or(0);
        let headers = headers.filter(|h| !h.is_none());
        self.trailers = truthy(trailers);
        if !self.decided {
            self.decide(py);
        }
        let sink = self.sink.get();
        if NO_RESPONSE_BODY.contains(&self.status)
            || (AUTH_FAILURE.contains(&self.status) && !sink.capture.auth_failure_bodies)
        {
            self.response.capture = false;
        }
        let Some(name) = sink.capture.echo_header.as_deref() else {
            self.response_headers = headers.map(Bound::unbind);
            return Ok(None);
        };
        let already = |item: &Bound<'py, PyAny>| match bytes_pair(item) {
            Some((k, _)) => k.eq_ignore_ascii_case(name),
            None => item
                .get_item(0)
                .ok()
                .and_then(|k| k.cast_into::<PyBytes>().ok())
                .is_some_and(|k| k.as_bytes().eq_ignore_ascii_case(name)),
        };
        let echo_name = match &sink.capture.echo_name {
            Some(n) => n.bind(py).clone(),
            None => PyBytes::new(py, name),
        };
        let echo = PyTuple::new(
            py,
            [echo_name, PyBytes::new(py, self.rid_text(py).as_bytes())],
        )?
        .into_any();
        // Servers' and frameworks' headers are lists: copied with room for the echo, in
        // one allocation.
        let copied = match headers.as_ref().map(|h| h.cast::<PyList>()) {
            None => Copied::Done(PyList::new(py, [echo.clone()])?),
            Some(Ok(list)) => with_echo(list, &echo, name)?,
            Some(Err(_)) => Copied::Other,
        };
        let list = match (copied, headers.as_ref()) {
            (Copied::Done(list), _) => list,
            (Copied::Present, _) => {
                self.response_headers = headers.map(Bound::unbind);
                return Ok(None);
            }
            // Another iterable, or a list holding something else than `(bytes, bytes)`.
            (Copied::Other, h) => {
                let mut pairs: Vec<Bound<'py, PyAny>> = Vec::with_capacity(16);
                if let Some(h) = h {
                    for item in h.try_iter()? {
                        let item = item?;
                        if already(&item) {
                            self.response_headers = headers.map(Bound::unbind);
                            return Ok(None);
                        }
                        pairs.push(item);
                    }
                }
                pairs.push(echo);
                PyList::new(py, pairs)?
            }
        };
        let copy = message.copy()?;
        copy.set_item(intern!(py, "headers"), &list)?;
        self.response_headers = Some(list.into_any().unbind());
        Ok(Some(copy))
    }

    fn on_send<'py>(
        &mut self,
        py: Python<'py>,
        message: &Bound<'py, PyDict>,
    ) -> PyResult<Option<Bound<'py, PyDict>>> {
        let [kind, body, more, status, headers, trailers, more_trailers, count] = fields(
            message,
            [
                intern!(py, "type"),
                intern!(py, "body"),
                intern!(py, "more_body"),
                intern!(py, "status"),
                intern!(py, "headers"),
                intern!(py, "trailers"),
                intern!(py, "more_trailers"),
                intern!(py, "count"),
            ],
        );
        let kind = kind_of(&kind);
        if kind == "http.response.body" {
            let more = truthy(more);
            if let Some(body) = body {
                let body = body.cast::<PyBytes>()?;
                if !body.as_bytes().is_empty() {
                    let timeout = self.sink.get().capture.response_timeout;
                    if !self.response.take(body, more, timeout) {
                        self.flags |= flags::RESPONSE_BODY_TIMEOUT;
                    }
                }
            }
            self.last = !more && !self.trailers;
        } else if kind == "http.response.start" {
            return self.on_start(py, message, status, headers, trailers);
        } else if kind == "http.response.trailers" {
            self.last = !truthy(more_trailers);
        } else if kind == "http.response.zerocopysend" {
            let count = count.and_then(|c| c.extract::<u64>().ok()).unwrap_or(0);
            self.response.size += count;
            self.last = !truthy(more) && !self.trailers;
        } else if kind == "http.response.pathsend" {
            self.flags |= flags::PATHSEND;
            self.last = !self.trailers;
        }
        Ok(None)
    }

    fn finish_inner(&mut self, py: Python<'_>, exc: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let duration_ms = ms_between(self.t0, mono_ns());
        let mut exc = exc.filter(|e| !e.is_none());
        if let Some(e) = exc {
            if self.client_left(py, e)? {
                self.flags |= flags::DISCONNECTED;
                exc = None;
            } else {
                self.flags |= flags::ERROR;
            }
        }
        if !self.decided {
            self.decide(py);
        }
        let sink = self.sink.get();
        if self.excluded {
            sink.counters.excluded();
            return Ok(());
        }
        let route = match self.route.take() {
            Some(r) if !r.bind(py).eq(UNMATCHED_ROUTE).unwrap_or(false) => r,
            _ => self.route_of(py),
        };
        let f = self.flags;
        let tail = f & flags::COMPLETE == 0
            || f & (flags::ERROR | flags::DISCONNECTED) != 0
            || self.status >= 500
            || duration_ms >= sink.capture.slow_ms;
        let rate = if tail {
            1.0
        } else if self.sampled_in {
            self.rate
        } else {
            sink.counters.sampled_out();
            return Ok(());
        };
        if sink.capture.limited {
            let allowed = self
                .mw
                .bind(py)
                .call_method1(intern!(py, "_allow"), (route.bind(py), tail))?
                .is_truthy()?;
            if !allowed {
                sink.counters.rate_limited();
                return Ok(());
            }
        }
        if !self.sampled_in {
            self.flags |= flags::SAMPLED_OUT;
        }
        let scalars = super::http::Scalars {
            status: self.status,
            flags: self.flags,
            ts_us: self.start_us,
            request_size: self.request.size,
            response_size: self.response.size,
            duration_ms,
            ttfb_ms: self.t_start.map(|t| ms_between(self.t0, t)),
            sample_rate: rate,
        };
        let scope = self.scope.bind(py);
        let path = self.full_path(py);
        sink.hand_off(
            py,
            scalars,
            super::http::Parts {
                scope,
                method: self.method.as_ref().map(|m| m.bind(py)),
                request_headers: self.headers.as_ref().map(|h| h.bind(py)),
                path: &path,
                route: route.bind(py),
                request_id: self.rid.bind(py).as_any(),
                response_headers: self.response_headers.as_ref().map(|h| h.bind(py)),
                request_body: self.request.parts(),
                response_body: self.response.parts(),
                exception: exc,
            },
        );
        sink.counters.kept();
        Ok(())
    }
}

impl HttpExchange {
    /// A cancelled request, or a send or body read that failed because the client left
    /// (Starlette's `ClientDisconnect` mid-upload): a disconnect (499), not an app error.
    fn client_left(&self, py: Python<'_>, e: &Bound<'_, PyAny>) -> PyResult<bool> {
        Ok(e.is_instance(cancelled_error(py)?)?
            || (self.flags & flags::DISCONNECTED != 0
                && (e.is_instance_of::<PyOSError>() || is_client_disconnect(e))))
    }

    /// The app raised after its response was finished (in a background task, most often):
    /// the access record is handed off already, so the exception is stored as an ERROR
    /// app record of the request, written while its id is still in the context. The
    /// server logs it too, but after the request's context ended: without the id.
    fn raised_late(&self, py: Python<'_>, e: &Bound<'_, PyAny>) {
        match self.client_left(py, e) {
            Ok(true) => {}
            Ok(false) => {
                let sink = self.sink.get();
                let path = self.full_path(py);
                let method = self.method.as_ref().map(|m| m.bind(py).clone());
                sink.late_exception(py, e, method.as_ref(), &path);
            }
            Err(err) => self.internal_error(py, &err),
        }
    }

    /// The last message went out: the record is finished now, not when the app returns
    /// (background tasks run after that, inside the app call).
    fn complete(&mut self, py: Python<'_>) {
        if !self.done {
            // A client that left first (the disconnect came in before the last message,
            // e.g. a BaseHTTPMiddleware's closing empty body) never got the response.
            if self.flags & flags::DISCONNECTED == 0 {
                self.flags |= flags::COMPLETE;
            }
            self.finish(py, None);
        }
    }

    /// Finishes the record once (later calls do nothing): decides whether to keep it and
    /// hands it to the core. Never raises.
    fn finish(&mut self, py: Python<'_>, exception: Option<&Bound<'_, PyAny>>) {
        if self.done {
            return;
        }
        self.done = true;
        if let Err(e) = self.finish_inner(py, exception) {
            self.internal_error(py, &e);
        }
    }
}

/// What [`with_echo`] made of a response's header list.
enum Copied<'py> {
    /// The copy, with the echo last.
    Done(Bound<'py, PyList>),
    /// A header of that name is there already: nothing to add.
    Present,
    /// An item is not a `(bytes, bytes)` tuple: left to the general path.
    Other,
}

/// A copy of a header list of `(bytes, bytes)` tuples with `echo` appended, checked and
/// copied in one pass through the C API (no Python code runs meanwhile).
fn with_echo<'py>(
    list: &Bound<'py, PyList>,
    echo: &Bound<'py, PyAny>,
    name: &[u8],
) -> PyResult<Copied<'py>> {
    let py = list.py();
    let l = list.as_ptr();
    // SAFETY: `l` is a live list. The copy is allocated first (a collection it may start
    // can run finalizers, which could change the list): the length is read again after
    // it, and from then on nothing runs Python code until the copy is filled. Items are
    // read within that length; each one stored in the copy gets its own reference. A copy
    // dropped half filled is safe (a list's unset items are NULL, skipped on dealloc).
    unsafe {
        let n = ffi::PyList_GET_SIZE(l);
        let copy = ffi::PyList_New(n + 1);
        if copy.is_null() {
            return Err(PyErr::fetch(py));
        }
        let copy = Bound::from_owned_ptr(py, copy).cast_into_unchecked::<PyList>();
        if ffi::PyList_GET_SIZE(l) != n {
            return Ok(Copied::Other);
        }
        for i in 0..n {
            let item = Borrowed::from_ptr(py, ffi::PyList_GET_ITEM(l, i));
            match bytes_pair(&item) {
                Some((k, _)) if k.eq_ignore_ascii_case(name) => return Ok(Copied::Present),
                Some(_) => ffi::PyList_SET_ITEM(copy.as_ptr(), i, item.to_owned().into_ptr()),
                None => return Ok(Copied::Other),
            }
        }
        ffi::PyList_SET_ITEM(copy.as_ptr(), n, echo.clone().into_ptr());
        Ok(Copied::Done(copy))
    }
}

/// Puts the request's trace ids in the context for the app's records. A failure is
/// counted, never raised: the request id is set already and the app must run.
fn enter_trace(sink: &HttpSink, py: Python<'_>, trace: Option<TraceIds>) -> Option<Py<PyAny>> {
    match set_trace(sink.ctx(), py, &trace?) {
        Ok(token) => Some(token.unbind()),
        Err(e) => {
            sink.counters.internal_error(py, &e);
            None
        }
    }
}

/// Starlette's `ClientDisconnect`, known by name: the middleware does not need Starlette.
fn is_client_disconnect(e: &Bound<'_, PyAny>) -> bool {
    e.get_type()
        .name()
        .is_ok_and(|n| n.to_str().is_ok_and(|n| n == "ClientDisconnect"))
}

fn cancelled_error(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    static CANCELLED: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    CANCELLED.import(py, "asyncio", "CancelledError")
}

#[pymethods]
impl HttpExchange {
    /// Notes one message the app received (a body chunk, a disconnect). Never raises.
    fn received(&mut self, py: Python<'_>, message: &Bound<'_, PyAny>) {
        if let Ok(m) = message.cast::<PyDict>() {
            if let Err(e) = self.on_request(py, m) {
                self.internal_error(py, &e);
            }
        }
    }

    /// Notes one message the app sends and returns the message to pass on: the same
    /// object, or for the response start a copy carrying the request id header. Sets
    /// `last` when this message completes the response. Never raises.
    fn sending<'py>(&mut self, py: Python<'py>, message: Bound<'py, PyAny>) -> Bound<'py, PyAny> {
        self.last = false;
        let Ok(m) = message.cast::<PyDict>() else {
            return message;
        };
        match self.on_send(py, m) {
            Ok(Some(copy)) => copy.into_any(),
            Ok(None) => message,
            Err(e) => {
                self.internal_error(py, &e);
                message
            }
        }
    }

    /// `send` failed with an OSError: the client went away.
    fn disconnected(&mut self) {
        self.flags |= flags::DISCONNECTED;
    }

    /// The message passed to `sending` went out; when it was the last one, the record is
    /// finished now, not when the app returns (background tasks run after that).
    fn sent(&mut self, py: Python<'_>) {
        if self.last {
            self.complete(py);
        }
    }

    /// The app call returned: finishes the record if nothing did yet and resets the request
    /// id context variable. Never raises. (No arguments: the call every request makes is
    /// the cheapest kind.)
    fn end(&mut self, py: Python<'_>) {
        self.finish(py, None);
        self.leave(py);
    }

    /// The app call raised `exception`: [`HttpExchange::end`] with it. Never raises.
    fn raised(&mut self, py: Python<'_>, exception: &Bound<'_, PyAny>) {
        if self.done && !exception.is_none() {
            self.raised_late(py, exception);
        } else {
            self.finish(py, Some(exception));
        }
        self.leave(py);
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!("<logsluice http exchange {}>", self.rid_text(py))
    }
}

impl HttpExchange {
    /// Resets the context variables `begin` set.
    fn leave(&mut self, py: Python<'_>) {
        if let Some(token) = self.trace_token.take() {
            if let Err(e) = reset_trace(self.sink.get().ctx(), token.bind(py)) {
                self.internal_error(py, &e);
            }
        }
        if let Some(token) = self.token.take() {
            if let Err(e) = reset_request_id(self.sink.get().ctx(), token.bind(py)) {
                self.internal_error(py, &e);
            }
        }
    }
}
