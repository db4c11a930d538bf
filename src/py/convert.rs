//! Reading Loguru messages, stdlib `LogRecord`s and arbitrary Python values into the
//! core's `Record`, sanitising on the way. Every function here degrades instead of failing:
//! log data is never rejected.

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Number, Value};

use crate::record::{strip_nul, truncate_in_place, Kind, Record};

/// Python objects the conversion needs, looked up once.
pub struct Ctx {
    pub format_exception: Py<PyAny>,
    pub request_id_var: Py<PyAny>,
    pub max_message_bytes: usize,
    pub max_field_bytes: usize,
}

const MAX_DEPTH: usize = 16;
const MAX_ITEMS: usize = 1000;

/// A Python `str` as Rust text: lone surrogates replaced, NULs removed.
pub fn text(obj: &Bound<'_, PyAny>) -> String {
    let mut s = match obj.cast::<PyString>() {
        Ok(s) => match s.to_cow() {
            Ok(c) => c.into_owned(),
            Err(_) => s.to_string_lossy().into_owned(),
        },
        Err(_) => match obj.str() {
            Ok(s) => s.to_string_lossy().into_owned(),
            Err(_) => format!("<unprintable {}>", type_name(obj)),
        },
    };
    strip_nul(&mut s);
    s
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "object".into())
}

fn capped(mut s: String, max: usize) -> String {
    truncate_in_place(&mut s, max);
    s
}

/// `repr()` for values JSON cannot hold, capped; a failing `__repr__` is itself recorded.
fn repr_of(obj: &Bound<'_, PyAny>, max: usize) -> Value {
    let s = match obj.repr() {
        Ok(r) => text(r.as_any()),
        Err(_) => format!("<unrepresentable {}>", type_name(obj)),
    };
    Value::String(capped(s, max))
}

pub fn to_json(obj: &Bound<'_, PyAny>, max: usize, depth: usize) -> Value {
    if obj.is_none() {
        return Value::Null;
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Value::String(capped(text(s.as_any()), max));
    }
    if let Ok(b) = obj.cast::<PyBool>() {
        return Value::Bool(b.is_true());
    }
    if obj.cast::<PyInt>().is_ok() {
        if let Ok(i) = obj.extract::<i64>() {
            return Value::from(i);
        }
        if let Ok(u) = obj.extract::<u64>() {
            return Value::from(u);
        }
        return Value::String(text(obj));
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        return Number::from_f64(f.value())
            .map_or_else(|| Value::String(f.value().to_string()), Value::Number);
    }
    if depth >= MAX_DEPTH {
        return repr_of(obj, max);
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        let mut map = Map::new();
        for (k, v) in d.iter().take(MAX_ITEMS) {
            map.insert(capped(text(&k), 256), to_json(&v, max, depth + 1));
        }
        return Value::Object(map);
    }
    if let Ok(l) = obj.cast::<PyList>() {
        return Value::Array(
            l.iter()
                .take(MAX_ITEMS)
                .map(|v| to_json(&v, max, depth + 1))
                .collect(),
        );
    }
    if let Ok(t) = obj.cast::<PyTuple>() {
        return Value::Array(
            t.iter()
                .take(MAX_ITEMS)
                .map(|v| to_json(&v, max, depth + 1))
                .collect(),
        );
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        let bytes = b.as_bytes();
        return Value::String(capped(
            crate::record::clean_bytes(&bytes[..bytes.len().min(max + 4)]),
            max,
        ));
    }
    repr_of(obj, max)
}

fn get<'py>(d: &Bound<'py, PyDict>, key: &Bound<'py, PyString>) -> Option<Bound<'py, PyAny>> {
    d.get_item(key).ok().flatten()
}

fn get_text(d: &Bound<'_, PyDict>, key: &Bound<'_, PyString>) -> String {
    get(d, key)
        .filter(|v| !v.is_none())
        .map(|v| text(&v))
        .unwrap_or_default()
}

fn int_attr<T: for<'a, 'py> FromPyObject<'a, 'py> + Default>(
    obj: &Bound<'_, PyAny>,
    attr: &Bound<'_, PyString>,
) -> T {
    obj.getattr(attr)
        .ok()
        .and_then(|v| v.extract::<T>().ok())
        .unwrap_or_default()
}

/// Formats `(type, value, traceback)` as the standard multi-line traceback.
pub fn format_exception(
    ctx: &Ctx,
    py: Python<'_>,
    ty: &Bound<'_, PyAny>,
    value: &Bound<'_, PyAny>,
    tb: &Bound<'_, PyAny>,
) -> Option<String> {
    if value.is_none() && ty.is_none() {
        return None;
    }
    let lines = ctx.format_exception.bind(py).call1((ty, value, tb)).ok()?;
    let mut out = String::new();
    for line in lines.try_iter().ok()? {
        out.push_str(&line.map(|l| text(&l)).unwrap_or_default());
    }
    Some(out.trim_end().to_owned())
}

fn context_request_id(ctx: &Ctx, py: Python<'_>) -> Option<String> {
    let v = ctx
        .request_id_var
        .bind(py)
        .call_method0(intern!(py, "get"))
        .ok()?;
    (!v.is_none()).then(|| capped(text(&v), 256))
}

/// Moves `request_id` out of the extra fields into its column, else takes the context's.
fn take_request_id(ctx: &Ctx, py: Python<'_>, fields: &mut Map<String, Value>) -> Option<String> {
    match fields.remove("request_id") {
        Some(Value::String(s)) => Some(capped(s, 256)),
        Some(Value::Null) | None => context_request_id(ctx, py),
        Some(other) => Some(capped(other.to_string(), 256)),
    }
}

fn micros(seconds: f64) -> i64 {
    (seconds * 1e6).round() as i64
}

/// The level of a Loguru message, read before anything else so filtered records cost little.
pub fn loguru_level(record: &Bound<'_, PyDict>) -> (String, u16) {
    let py = record.py();
    match get(record, intern!(py, "level")) {
        Some(level) => {
            let name = level
                .getattr(intern!(py, "name"))
                .map(|n| text(&n))
                .unwrap_or_default();
            (name, int_attr::<u16>(&level, intern!(py, "no")))
        }
        None => (String::new(), 0),
    }
}

/// Builds a record from Loguru's record dict (`message.record`).
pub fn from_loguru(ctx: &Ctx, record: &Bound<'_, PyDict>, level: (String, u16)) -> Record {
    let py = record.py();
    let ts = get(record, intern!(py, "time"))
        .and_then(|t| t.call_method0(intern!(py, "timestamp")).ok())
        .and_then(|t| t.extract::<f64>().ok())
        .map_or_else(now_micros, micros);
    let mut r = Record::new(
        ts,
        &level.0,
        level.1,
        Kind::App,
        get_text(record, intern!(py, "message")),
    );
    r.logger = get_text(record, intern!(py, "name"));
    r.module = get_text(record, intern!(py, "module"));
    r.function = get_text(record, intern!(py, "function"));
    r.line = get(record, intern!(py, "line"))
        .and_then(|v| v.extract().ok())
        .unwrap_or_default();
    if let Some(p) = get(record, intern!(py, "process")) {
        r.process = int_attr(&p, intern!(py, "id"));
    }
    if let Some(t) = get(record, intern!(py, "thread")) {
        r.thread = int_attr(&t, intern!(py, "id"));
    }
    if let Some(exc) = get(record, intern!(py, "exception")).filter(|e| !e.is_none()) {
        let part = |i: usize| exc.get_item(i).unwrap_or_else(|_| py.None().into_bound(py));
        r.exception = format_exception(ctx, py, &part(0), &part(1), &part(2));
    }
    if let Some(extra) = get(record, intern!(py, "extra")) {
        if let Ok(d) = extra.cast::<PyDict>() {
            if !d.is_empty() {
                if let Value::Object(map) = to_json(d.as_any(), ctx.max_field_bytes, 0) {
                    r.fields = map;
                }
            }
        }
    }
    r.request_id = take_request_id(ctx, py, &mut r.fields);
    r.finish(ctx.max_message_bytes)
}

/// `LogRecord` attributes that are not user extras.
const LOGRECORD_ATTRS: &[&str] = &[
    "name",
    "msg",
    "args",
    "levelname",
    "levelno",
    "pathname",
    "filename",
    "module",
    "exc_info",
    "exc_text",
    "stack_info",
    "lineno",
    "funcName",
    "created",
    "msecs",
    "relativeCreated",
    "thread",
    "threadName",
    "processName",
    "process",
    "taskName",
    "message",
    "asctime",
];

fn attr_of<'py>(obj: &Bound<'py, PyAny>, name: &Bound<'py, PyString>) -> Option<Bound<'py, PyAny>> {
    obj.getattr(name).ok().filter(|v| !v.is_none())
}

/// Builds a record from a stdlib `logging.LogRecord`.
pub fn from_logging(ctx: &Ctx, rec: &Bound<'_, PyAny>) -> Record {
    let py = rec.py();
    let message = match rec.call_method0(intern!(py, "getMessage")) {
        Ok(m) => text(&m),
        // A format string that does not match its args is still a log line worth keeping.
        Err(e) => format!(
            "{} (logsluice: message formatting failed: {e})",
            attr_of(rec, intern!(py, "msg"))
                .map(|v| text(&v))
                .unwrap_or_default()
        ),
    };
    let level_no = attr_of(rec, intern!(py, "levelno"))
        .and_then(|v| v.extract().ok())
        .unwrap_or(0);
    let ts = attr_of(rec, intern!(py, "created"))
        .and_then(|v| v.extract::<f64>().ok())
        .map_or_else(now_micros, micros);
    let mut r = Record::new(
        ts,
        &attr_of(rec, intern!(py, "levelname"))
            .map(|v| text(&v))
            .unwrap_or_default(),
        level_no,
        Kind::App,
        message,
    );
    r.logger = attr_of(rec, intern!(py, "name"))
        .map(|v| text(&v))
        .unwrap_or_default();
    r.module = attr_of(rec, intern!(py, "module"))
        .map(|v| text(&v))
        .unwrap_or_default();
    r.function = attr_of(rec, intern!(py, "funcName"))
        .map(|v| text(&v))
        .unwrap_or_default();
    r.line = attr_of(rec, intern!(py, "lineno"))
        .and_then(|v| v.extract().ok())
        .unwrap_or_default();
    r.process = attr_of(rec, intern!(py, "process"))
        .and_then(|v| v.extract().ok())
        .unwrap_or_default();
    r.thread = attr_of(rec, intern!(py, "thread"))
        .and_then(|v| v.extract().ok())
        .unwrap_or_default();
    if let Some(info) =
        attr_of(rec, intern!(py, "exc_info")).and_then(|v| v.cast_into::<PyTuple>().ok())
    {
        if info.len() == 3 {
            let part = |i: usize| {
                info.get_item(i)
                    .unwrap_or_else(|_| py.None().into_bound(py))
            };
            r.exception = format_exception(ctx, py, &part(0), &part(1), &part(2));
        }
    }
    if r.exception.is_none() {
        r.exception = attr_of(rec, intern!(py, "exc_text")).map(|v| text(&v));
    }
    if let Some(stack) = attr_of(rec, intern!(py, "stack_info")) {
        let stack = text(&stack);
        r.exception = Some(match r.exception.take() {
            Some(e) => format!("{e}\n{stack}"),
            None => stack,
        });
    }
    if let Ok(dict) = rec
        .getattr(intern!(py, "__dict__"))
        .and_then(|d| d.cast_into::<PyDict>().map_err(Into::into))
    {
        for (k, v) in dict.iter() {
            let key = text(&k);
            if !LOGRECORD_ATTRS.contains(&key.as_str()) {
                r.fields
                    .insert(capped(key, 256), to_json(&v, ctx.max_field_bytes, 0));
            }
        }
    }
    r.request_id = take_request_id(ctx, py, &mut r.fields);
    r.finish(ctx.max_message_bytes)
}

pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
}
