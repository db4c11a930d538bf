//! The ASGI middleware's hand-off: `Core.write_http(...)` reads the exchange (bytes and
//! small scalars, plus the ASGI scope) with the GIL held, then redacts, builds and queues
//! the record with the GIL released. `Redactor` holds the redaction settings of one
//! middleware, parsed once.

use std::sync::Arc;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use serde::Deserialize;

use super::convert;
use super::PyCore;
use crate::http::redact::{Redactor, Rules, DEFAULT_HEADERS, DEFAULT_KEYS};
use crate::http::{self, Exchange, Headers};
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
    let max_message_bytes = pycore.options.max_message_bytes;
    let blocked = py.detach(|| core.submit(http::build_record(&redactor, ex, max_message_bytes)));
    if !blocked.is_empty() {
        py.detach(|| Core::wait_for_room(blocked));
    }
    Ok(())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyRedactor>()?;
    m.add_function(wrap_pyfunction!(redaction_defaults, m)?)?;
    m.add_function(wrap_pyfunction!(request_id, m)?)?;
    Ok(())
}
