//! Reading Loguru messages, stdlib `LogRecord`s and arbitrary Python values into the
//! core's `Record`, sanitising on the way. Every function here degrades instead of failing:
//! log data is never rejected.

use std::borrow::Cow;

use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

use crate::http::TraceIds;
use crate::record::{cut_middle, strip_nul, truncate_in_place, Kind, Record};

/// Python objects the conversion needs, looked up once.
pub struct Ctx {
    pub clock: super::clock::Clock,
    pub format_exception: Py<PyAny>,
    pub request_id_var: Py<PyAny>,
    /// `logsluice._context.trace`: `(trace_id, span_id)` of the request being handled.
    pub trace_var: Py<PyAny>,
    pub max_message_bytes: usize,
    pub max_field_bytes: usize,
}

const MAX_DEPTH: usize = 16;
const MAX_ITEMS: usize = 1000;
/// A record's `fields` stop taking values past this many times `max_field_bytes`.
const FIELDS_PER_RECORD: usize = 16;

extern "C" {
    // Exported by every CPython 3.7+, outside the limited API: reads a ContextVar through
    // the interpreter's per-variable cache instead of a Python-level method call.
    fn PyContextVar_Get(
        var: *mut ffi::PyObject,
        default_value: *mut ffi::PyObject,
        value: *mut *mut ffi::PyObject,
    ) -> std::ffi::c_int;
    // Same: set and reset by the middleware once per request, without two Python calls.
    fn PyContextVar_Set(var: *mut ffi::PyObject, value: *mut ffi::PyObject) -> *mut ffi::PyObject;
    fn PyContextVar_Reset(var: *mut ffi::PyObject, token: *mut ffi::PyObject) -> std::ffi::c_int;
}

/// Whether compact ASCII strings may be read straight from their layout: set once by
/// [`check_str_layout`] when this interpreter's strings read back as expected.
static ASCII_LAYOUT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `state` bits of a `str` (CPython 3.10 to 3.14): `compact` and `ascii`.
const COMPACT_ASCII: u32 = (1 << 5) | (1 << 6);

/// A compact ASCII string's characters, which follow its header: what almost every `str`
/// the middleware reads is (methods, paths, ids, message types). `None` for any other
/// string, or when the layout was not confirmed.
#[inline]
fn compact_ascii<'a>(s: &'a Bound<'_, PyString>) -> Option<&'a str> {
    if !ASCII_LAYOUT.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    // SAFETY: `s` is a live str; the layout of its header was checked at start-up on
    // this interpreter. A compact ASCII string's `length` bytes follow the header and
    // live as long as the object, which outlives `'a`; ASCII is valid UTF-8.
    unsafe {
        let head = s.as_ptr().cast::<ffi::PyASCIIObject>();
        if (*head).state & COMPACT_ASCII != COMPACT_ASCII {
            return None;
        }
        let len = usize::try_from((*head).length).ok()?;
        Some(std::str::from_utf8_unchecked(std::slice::from_raw_parts(
            head.add(1).cast::<u8>(),
            len,
        )))
    }
}

/// Confirms, on strings made for the purpose, that compact ASCII strings read back through
/// [`compact_ascii`] exactly (and that others are told apart); only then is it used.
pub fn check_str_layout(py: Python<'_>) {
    ASCII_LAYOUT.store(true, std::sync::atomic::Ordering::Relaxed);
    let ascii = PyString::new(py, "logsluice-layout-check");
    let wide = PyString::new(py, "logsluice-\u{e9}");
    let ok = compact_ascii(&ascii) == Some("logsluice-layout-check")
        && compact_ascii(&wide).is_none()
        && compact_ascii(&PyString::new(py, "")) == Some("");
    ASCII_LAYOUT.store(ok, std::sync::atomic::Ordering::Relaxed);
}

/// The UTF-8 of a Python `str`, borrowed (the string's cached UTF-8 form, no copy); `None`
/// for strings holding lone surrogates.
pub fn utf8<'a>(s: &'a Bound<'_, PyString>) -> Option<&'a str> {
    if let Some(text) = compact_ascii(s) {
        return Some(text);
    }
    let mut size: ffi::Py_ssize_t = 0;
    // SAFETY: `s` is a live str; the returned buffer lives as long as the object, which
    // outlives the borrow `'a`. CPython guarantees valid UTF-8 on success.
    unsafe {
        let data = ffi::PyUnicode_AsUTF8AndSize(s.as_ptr(), &mut size);
        if data.is_null() {
            ffi::PyErr_Clear();
            return None;
        }
        Some(std::str::from_utf8_unchecked(std::slice::from_raw_parts(
            data.cast::<u8>(),
            size as usize,
        )))
    }
}

/// A `str` of ASCII bytes, written straight into a new compact string (no UTF-8 decoding):
/// the middleware makes one per request for its request id.
pub fn ascii_str<'py>(py: Python<'py>, ascii: &[u8]) -> Bound<'py, PyString> {
    if !ascii.is_ascii() {
        return PyString::new(py, &String::from_utf8_lossy(ascii));
    }
    // SAFETY: a new compact ASCII string of `len` characters has room for `len` bytes at
    // `PyUnicode_DATA`, written before anyone else sees the object; NULL means an exception
    // is set (no memory), handled by the slower path.
    unsafe {
        let s = ffi::PyUnicode_New(ascii.len() as ffi::Py_ssize_t, 127);
        if s.is_null() {
            ffi::PyErr_Clear();
            return PyString::new(py, std::str::from_utf8_unchecked(ascii));
        }
        std::ptr::copy_nonoverlapping(
            ascii.as_ptr(),
            ffi::PyUnicode_DATA(s).cast::<u8>(),
            ascii.len(),
        );
        Bound::from_owned_ptr(py, s).cast_into_unchecked()
    }
}

/// Lone surrogates (from `surrogateescape` file names, broken JSON) become one U+FFFD each.
fn without_surrogates(s: &Bound<'_, PyString>) -> String {
    let utf16 = s
        .call_method1(intern!(s.py(), "encode"), ("utf-16-le", "surrogatepass"))
        .ok()
        .and_then(|b| b.cast_into::<PyBytes>().ok());
    match utf16 {
        Some(b) => {
            let units: Vec<u16> = b
                .as_bytes()
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16_lossy(&units)
        }
        None => s.to_string_lossy().into_owned(),
    }
}

/// A `str` as Rust text, lone surrogates replaced, NULs kept.
fn str_text_with_nul<'a>(s: &'a Bound<'_, PyString>) -> Cow<'a, str> {
    match utf8(s) {
        Some(t) => Cow::Borrowed(t),
        None => Cow::Owned(without_surrogates(s)),
    }
}

fn str_text<'a>(s: &'a Bound<'_, PyString>) -> Cow<'a, str> {
    let text = str_text_with_nul(s);
    if text.contains('\0') {
        let mut owned = text.into_owned();
        strip_nul(&mut owned);
        Cow::Owned(owned)
    } else {
        text
    }
}

/// Any Python object as text (`str()` for non-strings), sanitised.
pub fn text(obj: &Bound<'_, PyAny>) -> String {
    text_by(obj, str_text)
}

/// [`text`] for text whose control characters are escaped afterwards (`\u0000`): its
/// NULs are kept for that, not removed.
pub fn text_with_nul(obj: &Bound<'_, PyAny>) -> String {
    text_by(obj, str_text_with_nul)
}

fn text_by(
    obj: &Bound<'_, PyAny>,
    of_str: for<'a> fn(&'a Bound<'_, PyString>) -> Cow<'a, str>,
) -> String {
    match obj.cast::<PyString>() {
        Ok(s) => of_str(s).into_owned(),
        Err(_) => match obj.str() {
            Ok(s) => of_str(&s).into_owned(),
            Err(_) => format!("<unprintable {}>", type_name(obj)),
        },
    }
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

fn push_json_str(out: &mut Vec<u8>, s: &str, max: usize) {
    if s.len() > max {
        crate::json_text::write_str(out, &capped(s.to_owned(), max));
    } else {
        crate::json_text::write_str(out, s);
    }
}

/// The JSON text built by the `push_*` functions (valid UTF-8 by construction).
fn into_json(buf: Vec<u8>) -> Box<str> {
    String::from_utf8(buf)
        .unwrap_or_else(|_| "{}".into())
        .into_boxed_str()
}

/// `repr()`, sanitised; a failing `__repr__` gives `<unrepresentable T>`.
fn repr_text(obj: &Bound<'_, PyAny>) -> String {
    match obj.repr() {
        Ok(r) => str_text(&r).into_owned(),
        Err(_) => format!("<unrepresentable {}>", type_name(obj)),
    }
}

/// `repr()` for values JSON cannot hold; a failing `__repr__` is itself recorded.
fn push_repr(out: &mut Vec<u8>, obj: &Bound<'_, PyAny>, max: usize) {
    push_json_str(out, &repr_text(obj), max);
}

/// One record's `fields` as they are written: the cap on each string, the size past which
/// containers take no more items, and the containers on the path to the current value (one
/// met again inside itself is a cycle). A shared or cyclic structure costs at most this.
pub struct Walk {
    max: usize,
    end: usize,
    path: Vec<usize>,
}

impl Walk {
    pub fn new(max_field_bytes: usize) -> Self {
        Walk {
            max: max_field_bytes,
            end: max_field_bytes.saturating_mul(FIELDS_PER_RECORD),
            path: Vec::new(),
        }
    }

    fn full(&self, out: &[u8]) -> bool {
        out.len() >= self.end
    }
}

/// Writes a Python value as JSON: containers recursively (bounded in depth, items and the
/// record's budget, cycles cut), everything JSON cannot hold as its capped `repr`.
pub fn push_json(out: &mut Vec<u8>, obj: &Bound<'_, PyAny>, walk: &mut Walk, depth: usize) {
    let max = walk.max;
    if obj.is_none() {
        out.extend_from_slice(b"null");
    } else if let Ok(s) = obj.cast::<PyString>() {
        push_json_str(out, &str_text(s), max);
    } else if let Ok(b) = obj.cast::<PyBool>() {
        out.extend_from_slice(if b.is_true() { b"true" } else { b"false" });
    } else if obj.cast::<PyInt>().is_ok() {
        if let Ok(i) = obj.extract::<i64>() {
            out.extend_from_slice(itoa::Buffer::new().format(i).as_bytes());
        } else if let Ok(u) = obj.extract::<u64>() {
            out.extend_from_slice(itoa::Buffer::new().format(u).as_bytes());
        } else {
            // Beyond 64 bits: JSON readers would lose precision, so keep the digits as text.
            push_json_str(out, &big_int_text(obj), max);
        }
    } else if let Ok(f) = obj.cast::<PyFloat>() {
        match serde_json::Number::from_f64(f.value()) {
            Some(n) => out.extend_from_slice(n.to_string().as_bytes()),
            None => push_json_str(out, &f.value().to_string(), max),
        }
    } else if let Ok(b) = obj.cast::<PyBytes>() {
        let bytes = b.as_bytes();
        // Only what can be kept is decoded; the marker gives the full size.
        let mut s = crate::record::clean_bytes(&bytes[..bytes.len().min(max + 4)]);
        let original = s.len().max(bytes.len());
        crate::record::truncate_from(&mut s, max, original);
        crate::json_text::write_str(out, &s);
    } else if depth >= MAX_DEPTH {
        push_repr(out, obj, max);
    } else if obj.cast::<PyDict>().is_ok()
        || obj.cast::<PyList>().is_ok()
        || obj.cast::<PyTuple>().is_ok()
    {
        let at = obj.as_ptr() as usize;
        if walk.path.contains(&at) {
            push_json_str(out, &format!("<cycle: {}>", type_name(obj)), max);
            return;
        }
        walk.path.push(at);
        if let Ok(d) = obj.cast::<PyDict>() {
            push_object(out, d, walk, depth, |_| false);
        } else if let Ok(l) = obj.cast::<PyList>() {
            push_array(out, l.iter(), l.len(), walk, depth);
        } else if let Ok(t) = obj.cast::<PyTuple>() {
            push_array(out, t.iter(), t.len(), walk, depth);
        }
        walk.path.pop();
    } else {
        push_repr(out, obj, max);
    }
}

/// An int too large for 64 bits, as decimal digits; past Python's digit limit for
/// `str()` (4300 by default), as hexadecimal, which has none.
fn big_int_text(obj: &Bound<'_, PyAny>) -> String {
    match obj.str() {
        Ok(s) => str_text(&s).into_owned(),
        Err(_) => obj
            .py()
            .import(intern!(obj.py(), "builtins"))
            .and_then(|b| b.getattr(intern!(obj.py(), "hex")))
            .and_then(|hex| hex.call1((obj,)))
            .map(|h| text(&h))
            .unwrap_or_else(|_| format!("<unprintable {}>", type_name(obj))),
    }
}

/// Says how many items a container had when not all of them were written.
fn truncated_items(len: usize) -> String {
    format!("…[truncated, {len} items]")
}

fn push_array<'py>(
    out: &mut Vec<u8>,
    items: impl Iterator<Item = Bound<'py, PyAny>>,
    len: usize,
    walk: &mut Walk,
    depth: usize,
) {
    out.push(b'[');
    for (i, v) in items.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        if i == MAX_ITEMS || walk.full(out) {
            push_json_str(out, &truncated_items(len), 256);
            break;
        }
        push_json(out, &v, walk, depth + 1);
    }
    out.push(b']');
}

/// Extras that have their own column instead of a place in `fields`.
const OWN_COLUMNS: &[&str] = &["request_id", "trace_id", "span_id"];

/// A dict's items, read with `PyDict_Next`. PyO3's iterator panics when the dict changes
/// size while it is read, and that happens here: a value's `__repr__`, or another thread
/// between two items, may add or remove keys of a dict the app is logging. `PyDict_Next`
/// bounds-checks against the dict's current table, so a changed dict gives its items as
/// they are now (some perhaps skipped or twice), never a panic in the app's logging call.
pub fn dict_items<'a, 'py>(
    d: &'a Bound<'py, PyDict>,
) -> impl Iterator<Item = (Bound<'py, PyAny>, Bound<'py, PyAny>)> + 'a {
    let mut pos: ffi::Py_ssize_t = 0;
    std::iter::from_fn(move || {
        let (mut k, mut v) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: the GIL is held (we have a `Bound`); both borrowed references become
        // strong ones before any Python code can run and change the dict.
        unsafe {
            if ffi::PyDict_Next(d.as_ptr(), &mut pos, &mut k, &mut v) == 0 {
                return None;
            }
            let py = d.py();
            Some((
                Bound::from_borrowed_ptr(py, k),
                Bound::from_borrowed_ptr(py, v),
            ))
        }
    })
}

/// Writes a dict as a JSON object, leaving out the keys `skip` names (those with a column
/// or a meaning of their own). Keys that had to change to be written (not a `str`, NULs,
/// lone surrogates, over 256 bytes) get a `#2`-style suffix when they meet another key:
/// every value stays readable, where JSON readers would keep only the last of two.
fn push_object(
    out: &mut Vec<u8>,
    d: &Bound<'_, PyDict>,
    walk: &mut Walk,
    depth: usize,
    skip: impl Fn(&str) -> bool,
) {
    out.push(b'{');
    let (mut written, mut taken) = (0usize, None::<std::collections::HashSet<String>>);
    for (k, v) in dict_items(d) {
        let key = match k.cast::<PyString>() {
            Ok(s) => str_text(s),
            Err(_) => Cow::Owned(text(&k)),
        };
        if skip(&key) {
            continue;
        }
        if written > 0 {
            out.push(b',');
        }
        if written == MAX_ITEMS || walk.full(out) {
            push_json_str(out, "…", 256);
            out.push(b':');
            push_json_str(out, &truncated_items(d.len()), 256);
            break;
        }
        written += 1;
        let changed = matches!(key, Cow::Owned(_)) || key.len() > 256;
        if changed {
            let taken = taken.get_or_insert_with(|| plain_keys(d));
            let key = unique_key(taken, capped(key.into_owned(), 256));
            push_json_str(out, &key, usize::MAX);
            taken.insert(key);
        } else {
            push_json_str(out, &key, 256);
        }
        out.push(b':');
        push_json(out, &v, walk, depth + 1);
    }
    out.push(b'}');
}

/// The keys of `d` written as they are (`str`, clean, up to 256 bytes).
fn plain_keys(d: &Bound<'_, PyDict>) -> std::collections::HashSet<String> {
    dict_items(d)
        .filter_map(|(k, _)| {
            let s = k.cast_into::<PyString>().ok()?;
            let t = utf8(&s)?;
            (t.len() <= 256 && !t.contains('\0')).then(|| t.to_owned())
        })
        .collect()
}

fn unique_key(taken: &std::collections::HashSet<String>, key: String) -> String {
    if !taken.contains(&key) {
        return key;
    }
    (2..)
        .map(|n| format!("{key}#{n}"))
        .find(|k| !taken.contains(k))
        .unwrap_or(key)
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

/// A level number as the core keeps it: Python allows any int (Loguru's custom levels,
/// `logging.log(70000, ...)`), the record holds 0..=65535, so larger levels count as the
/// highest, not as 0 (which would put them under every `min_level` and lose them).
pub fn level_number(v: Option<Bound<'_, PyAny>>) -> u16 {
    let Some(v) = v else { return 0 };
    match v.extract::<i64>() {
        Ok(n) => n.clamp(0, i64::from(u16::MAX)) as u16,
        // An int beyond 64 bits.
        Err(_) if v.cast::<PyInt>().is_ok() && v.gt(0).unwrap_or(false) => u16::MAX,
        Err(_) => 0,
    }
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

/// Formats `(type, value, traceback)` as the standard multi-line traceback; `None` when
/// there is no exception or it cannot be formatted.
pub fn format_exception(
    ctx: &Ctx,
    py: Python<'_>,
    ty: &Bound<'_, PyAny>,
    value: &Bound<'_, PyAny>,
    tb: &Bound<'_, PyAny>,
) -> Option<String> {
    try_format_exception(ctx, py, ty, value, tb).ok().flatten()
}

/// [`format_exception`], with the reason when Python cannot format what it was given.
///
/// A chain (`raise ... from ...`, or an exception raised while handling another) is written
/// out whole, as Python prints it, when it has at most [`MAX_CHAIN`] exceptions and fits the
/// record. Otherwise what a reader needs most is kept: the root cause first and the last
/// raised (the one logged) at the end, with the ones raised just before it as room allows,
/// and a marker saying how many were left out between them. The work is bounded either
/// way: at most [`MAX_CHAIN_WALK`] links followed, at most [`MAX_CHAIN`] exceptions formatted.
fn try_format_exception(
    ctx: &Ctx,
    py: Python<'_>,
    ty: &Bound<'_, PyAny>,
    value: &Bound<'_, PyAny>,
    tb: &Bound<'_, PyAny>,
) -> PyResult<Option<String>> {
    if value.is_none() && ty.is_none() {
        return Ok(None);
    }
    let chain = walk_chain(value);
    if chain.len == 1 || (chain.complete && chain.len <= MAX_CHAIN) {
        let whole = format_lines(ctx, py, ty, value, tb, true)?;
        if chain.len == 1 || whole.len() <= ctx.max_message_bytes {
            return Ok(Some(whole.trim_end().to_owned()));
        }
    }
    format_cut_chain(ctx, py, (ty, value, tb), chain).map(Some)
}

/// `traceback.format_exception(ty, value, tb, chain=chain)`, joined.
fn format_lines(
    ctx: &Ctx,
    py: Python<'_>,
    ty: &Bound<'_, PyAny>,
    value: &Bound<'_, PyAny>,
    tb: &Bound<'_, PyAny>,
    chain: bool,
) -> PyResult<String> {
    let format = ctx.format_exception.bind(py);
    let lines = if chain {
        format.call1((ty, value, tb))?
    } else {
        let kwargs = PyDict::new(py);
        kwargs.set_item(intern!(py, "chain"), false)?;
        format.call((ty, value, tb), Some(&kwargs))?
    };
    let mut out = String::new();
    for line in lines.try_iter()? {
        out.push_str(&line.map(|l| text(&l)).unwrap_or_default());
    }
    Ok(out)
}

/// The most exceptions of one chain a record's traceback shows.
const MAX_CHAIN: usize = 16;
/// Links followed at most looking for a chain's root cause.
const MAX_CHAIN_WALK: usize = 10_000;

/// How an exception came from the one raised before it, and what Python prints between them.
#[derive(Clone, Copy)]
enum Chained {
    /// `raise ... from earlier`: its `__cause__`.
    Cause,
    /// Raised while `earlier` was being handled: its `__context__`.
    Context,
}

impl Chained {
    fn connector(self) -> &'static str {
        match self {
            Chained::Cause => {
                "\nThe above exception was the direct cause of the following exception:\n\n"
            }
            Chained::Context => {
                "\nDuring handling of the above exception, another exception occurred:\n\n"
            }
        }
    }
}

/// One exception of a chain, and how it came from the one raised before it (`None`: the
/// root cause).
struct Link<'py> {
    exc: Bound<'py, PyAny>,
    from: Option<Chained>,
}

/// An exception's chain, walked from the last raised towards the root cause.
struct Chain<'py> {
    /// The last raised first, at most [`MAX_CHAIN`].
    latest: Vec<Link<'py>>,
    /// The last exception reached, when it is not in `latest`.
    deepest: Option<Link<'py>>,
    /// Exceptions walked through.
    len: usize,
    /// The walk reached the root cause (it stops after [`MAX_CHAIN_WALK`] links).
    complete: bool,
}

/// The exception `e` came from, as the traceback module follows a chain: its `__cause__`,
/// else its `__context__` unless `__suppress_context__` is set; one already met (a cycle)
/// ends the chain.
fn earlier<'py>(
    e: &Bound<'py, PyAny>,
    seen: &std::collections::HashSet<usize>,
) -> Option<(Bound<'py, PyAny>, Chained)> {
    let py = e.py();
    let unseen = |v: Bound<'py, PyAny>| {
        (!v.is_none() && !seen.contains(&(v.as_ptr() as usize))).then_some(v)
    };
    if let Some(cause) = e.getattr(intern!(py, "__cause__")).ok().and_then(unseen) {
        return Some((cause, Chained::Cause));
    }
    let suppressed = e
        .getattr(intern!(py, "__suppress_context__"))
        .and_then(|v| v.is_truthy())
        .unwrap_or(false);
    if suppressed {
        return None;
    }
    let context = e
        .getattr(intern!(py, "__context__"))
        .ok()
        .and_then(unseen)?;
    Some((context, Chained::Context))
}

fn walk_chain<'py>(value: &Bound<'py, PyAny>) -> Chain<'py> {
    let mut seen = std::collections::HashSet::new();
    let mut chain = Chain {
        latest: Vec::new(),
        deepest: None,
        len: 0,
        complete: true,
    };
    let mut current = value.clone();
    loop {
        seen.insert(current.as_ptr() as usize);
        chain.len += 1;
        let next = earlier(&current, &seen);
        let link = Link {
            exc: current,
            from: next.as_ref().map(|(_, how)| *how),
        };
        if chain.latest.len() < MAX_CHAIN {
            chain.latest.push(link);
        } else {
            chain.deepest = Some(link);
        }
        match next {
            None => return chain,
            Some(_) if chain.len == MAX_CHAIN_WALK => {
                chain.complete = false;
                return chain;
            }
            Some((e, _)) => current = e,
        }
    }
}

/// A chain too long or too large to be written out whole: the root cause (when the walk
/// reached it), a marker with the number left out, and the last raised exceptions, as many
/// as fit `max_message_bytes` (at least the very last). When the root cause and the last
/// raised alone do not fit, each is cut in its middle, the last raised served first.
fn format_cut_chain(
    ctx: &Ctx,
    py: Python<'_>,
    given: (&Bound<'_, PyAny>, &Bound<'_, PyAny>, &Bound<'_, PyAny>),
    chain: Chain<'_>,
) -> PyResult<String> {
    let Chain {
        mut latest,
        deepest,
        len,
        complete,
    } = chain;
    let root = if complete {
        deepest.or_else(|| latest.pop())
    } else {
        None
    };
    latest.truncate(MAX_CHAIN - usize::from(root.is_some()));
    let mut left_out = len - latest.len() - usize::from(root.is_some());
    let format = |link: &Link<'_>, last_raised: bool| -> PyResult<String> {
        let text = if last_raised {
            format_alone(ctx, py, given)?
        } else {
            let tb = link
                .exc
                .getattr(intern!(py, "__traceback__"))
                .unwrap_or_else(|_| py.None().into_bound(py));
            format_alone(ctx, py, (link.exc.get_type().as_any(), &link.exc, &tb))?
        };
        Ok(match link.from {
            Some(how) => format!("{}{text}", how.connector()),
            None => text,
        })
    };
    let mut root = root.map(|r| format(&r, false)).transpose()?;
    // Oldest first, as Python prints a chain; the last raised at the end.
    let mut shown = std::collections::VecDeque::with_capacity(latest.len());
    for (i, link) in latest.iter().enumerate().rev() {
        shown.push_back(format(link, i == 0)?);
    }
    let marker = |left_out: usize| match (left_out, complete) {
        (0, _) => String::new(),
        (n, true) => format!("\n…[{n} chained exceptions left out]\n"),
        (n, false) => format!(
            "…[more than {n} earlier chained exceptions left out, the root cause among them]\n"
        ),
    };
    let root_len = root.as_ref().map_or(0, String::len);
    let size = |shown: &std::collections::VecDeque<String>, left_out: usize| {
        root_len + marker(left_out).len() + shown.iter().map(String::len).sum::<usize>()
    };
    let budget = ctx.max_message_bytes;
    while shown.len() > 1 && size(&shown, left_out) > budget {
        shown.pop_front();
        left_out += 1;
    }
    if size(&shown, left_out) > budget {
        let avail = budget.saturating_sub(marker(left_out).len());
        let last = shown.back_mut().expect("the last raised is always shown");
        let root_max = root_len.min((avail / 4).max(avail.saturating_sub(last.len())));
        if let Some(r) = root.as_mut() {
            cut_middle(r, root_max);
        }
        cut_middle(last, avail.saturating_sub(root_max));
    }
    let mut out = root.unwrap_or_default();
    out.push_str(&marker(left_out));
    for s in shown {
        out.push_str(&s);
    }
    Ok(out.trim_end().to_owned())
}

/// One exception of a chain as `format_exception(..., chain=False)` prints it, without
/// that call's cost: it first builds a `TracebackException` for the whole chain below the
/// exception (every link's frames and source lines), 0.1 s for 3000 links, for each one
/// shown. Given a `_seen` set, CPython's `TracebackException` (3.10 on) builds only the
/// exception itself. An exception group (this way would leave out its members) and
/// anything unexpected take the plain call.
fn format_alone(
    ctx: &Ctx,
    py: Python<'_>,
    (ty, value, tb): (&Bound<'_, PyAny>, &Bound<'_, PyAny>, &Bound<'_, PyAny>),
) -> PyResult<String> {
    let alone = || -> PyResult<Option<String>> {
        let builtins = py.import(intern!(py, "builtins"))?;
        if let Ok(group) = builtins.getattr(intern!(py, "BaseExceptionGroup")) {
            if value.is_instance(&group)? {
                return Ok(None);
            }
        }
        let kwargs = PyDict::new(py);
        kwargs.set_item(intern!(py, "compact"), true)?;
        kwargs.set_item(intern!(py, "_seen"), pyo3::types::PySet::empty(py)?)?;
        let te = py
            .import(intern!(py, "traceback"))?
            .getattr(intern!(py, "TracebackException"))?
            .call((value.get_type(), value, tb), Some(&kwargs))?;
        // What the full build would have set; `format` reads them.
        for name in [
            intern!(py, "__cause__"),
            intern!(py, "__context__"),
            intern!(py, "exceptions"),
        ] {
            te.setattr(name, py.None())?;
        }
        let kwargs = PyDict::new(py);
        kwargs.set_item(intern!(py, "chain"), false)?;
        let lines = te.call_method(intern!(py, "format"), (), Some(&kwargs))?;
        let mut out = String::new();
        for line in lines.try_iter()? {
            out.push_str(&line.map(|l| text(&l)).unwrap_or_default());
        }
        Ok(Some(out))
    };
    match alone() {
        Ok(Some(out)) => Ok(out),
        _ => format_lines(ctx, py, ty, value, tb, false),
    }
}

/// The most of an unusable exception's `repr()` its note keeps.
const UNUSABLE_REPR_BYTES: usize = 1024;

/// A stdlib `exc_info` or Loguru's `exception`: a `(type, value, traceback)` tuple or an
/// exception, formatted (`Ok(None)`: the tuple holds no exception). What cannot be
/// formatted is `Err` with a note saying what was given and why it was unusable, to be
/// stored in its place: never raised into the app, never dropped silently.
fn exc_info_text(
    ctx: &Ctx,
    py: Python<'_>,
    info: &Bound<'_, PyAny>,
) -> Result<Option<String>, String> {
    let formatted = if let Ok(t) = info.cast::<PyTuple>() {
        if t.len() == 3 {
            let part = |i: usize| t.get_item(i).unwrap_or_else(|_| py.None().into_bound(py));
            try_format_exception(ctx, py, &part(0), &part(1), &part(2)).map_err(|e| e.to_string())
        } else {
            Err(format!(
                "a tuple of {} items, not (type, value, traceback)",
                t.len()
            ))
        }
    } else if info.is_instance_of::<pyo3::exceptions::PyBaseException>() {
        let tb = info
            .getattr(intern!(py, "__traceback__"))
            .unwrap_or_else(|_| py.None().into_bound(py));
        try_format_exception(ctx, py, info.get_type().as_any(), info, &tb)
            .map_err(|e| e.to_string())
    } else {
        Err("not an exception or a (type, value, traceback) tuple".to_owned())
    };
    formatted.map_err(|reason| {
        let given = capped(repr_text(info), UNUSABLE_REPR_BYTES);
        format!("logsluice: the exception could not be formatted ({reason}); given: {given}")
    })
}

/// Sets one of `Ctx`'s context variables (each checked to be a ContextVar when the Core was
/// built); returns the token that resets it.
fn set_var<'py>(var: &Py<PyAny>, value: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let py = value.py();
    // SAFETY: `var` is a ContextVar; the result is a new reference or NULL with an
    // exception set.
    unsafe {
        let token = PyContextVar_Set(var.as_ptr(), value.as_ptr());
        if token.is_null() {
            return Err(PyErr::fetch(py));
        }
        Ok(Bound::from_owned_ptr(py, token))
    }
}

/// Resets one of `Ctx`'s context variables with a token from [`set_var`] on the same variable.
fn reset_var(var: &Py<PyAny>, token: &Bound<'_, PyAny>) -> PyResult<()> {
    // SAFETY: as above; `token` came from PyContextVar_Set on `var`.
    unsafe {
        if PyContextVar_Reset(var.as_ptr(), token.as_ptr()) < 0 {
            return Err(PyErr::fetch(token.py()));
        }
    }
    Ok(())
}

/// Sets the request id context variable; returns the token that resets it.
pub fn set_request_id<'py>(ctx: &Ctx, value: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    set_var(&ctx.request_id_var, value)
}

/// Resets the request id context variable with a token from [`set_request_id`].
pub fn reset_request_id(ctx: &Ctx, token: &Bound<'_, PyAny>) -> PyResult<()> {
    reset_var(&ctx.request_id_var, token)
}

/// Sets the trace context variable to `(trace_id, span_id)`; returns the token that
/// resets it.
pub fn set_trace<'py>(ctx: &Ctx, py: Python<'py>, ids: &TraceIds) -> PyResult<Bound<'py, PyAny>> {
    let value = PyTuple::new(
        py,
        [
            PyString::new(py, ids.trace_id()),
            PyString::new(py, ids.span_id()),
        ],
    )?;
    set_var(&ctx.trace_var, value.as_any())
}

/// Resets the trace context variable with a token from [`set_trace`].
pub fn reset_trace(ctx: &Ctx, token: &Bound<'_, PyAny>) -> PyResult<()> {
    reset_var(&ctx.trace_var, token)
}

/// The current value of a `ContextVar` (None when unset).
fn context_value<'py>(py: Python<'py>, var: &Bound<'py, PyAny>) -> Option<Bound<'py, PyAny>> {
    let mut value: *mut ffi::PyObject = std::ptr::null_mut();
    // SAFETY: `var` is a ContextVar (Pipeline passes logsluice._context.request_id); on
    // success `value` is a new reference or NULL when unset without a default.
    unsafe {
        if PyContextVar_Get(var.as_ptr(), std::ptr::null_mut(), &mut value) < 0 {
            ffi::PyErr_Clear();
            return None;
        }
        if value.is_null() {
            return None;
        }
        Some(Bound::from_owned_ptr(py, value))
    }
}

/// The request id: an explicit `request_id` extra wins, else the middleware's context.
fn request_id(ctx: &Ctx, py: Python<'_>, explicit: Option<Bound<'_, PyAny>>) -> Option<String> {
    let v = match explicit.filter(|v| !v.is_none()) {
        Some(v) => v,
        None => context_value(py, ctx.request_id_var.bind(py))?,
    };
    (!v.is_none()).then(|| capped(text(&v), 256))
}

/// The trace and span ids: explicit `trace_id`/`span_id` extras win, together (an
/// explicit trace id is never paired with the middleware's span), else the middleware's
/// context.
fn trace_ids(
    ctx: &Ctx,
    py: Python<'_>,
    explicit: (Option<Bound<'_, PyAny>>, Option<Bound<'_, PyAny>>),
) -> (Option<String>, Option<String>) {
    let id = |v: Option<Bound<'_, PyAny>>| v.map(|v| capped(text(&v), 256));
    let explicit = (
        explicit.0.filter(|v| !v.is_none()),
        explicit.1.filter(|v| !v.is_none()),
    );
    if explicit.0.is_some() || explicit.1.is_some() {
        return (id(explicit.0), id(explicit.1));
    }
    let Some(pair) = context_value(py, ctx.trace_var.bind(py)) else {
        return (None, None);
    };
    match pair.cast::<PyTuple>() {
        Ok(t) if t.len() == 2 => {
            let part = |i| t.get_item(i).ok().filter(|v| !v.is_none());
            (id(part(0)), id(part(1)))
        }
        _ => (None, None),
    }
}

/// 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999999Z in microseconds since the epoch:
/// the times a record keeps (RFC 3339 has four-digit years; PostgreSQL, blob names and
/// every reader agree on them).
const FIRST_US: i64 = -62_135_596_800_000_000;
const LAST_US: i64 = 253_402_300_799_999_999;

/// A record time in microseconds, if it is one: finite and within years 1 to 9999 (UTC).
fn micros(seconds: f64) -> Option<i64> {
    let us = (seconds * 1e6).round();
    // Compared as floats: `as i64` saturates, and inf or 1e30 would become year 294247.
    (us >= FIRST_US as f64 && us <= LAST_US as f64).then_some(us as i64)
}

fn in_range(us: i64) -> Option<i64> {
    (FIRST_US..=LAST_US).contains(&us).then_some(us)
}

/// The key the record's unusable time is kept under in `fields`.
const ORIGINAL_TIME: &str = "original_time";

/// `fields` with `key: value` added, the key given a `#2`-style suffix if it is taken.
fn with_field(fields: &str, key: &str, value: &str) -> Box<str> {
    let taken: std::collections::HashSet<String> =
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(fields)
            .map(|m| m.into_iter().map(|(k, _)| k).collect())
            .unwrap_or_default();
    let key = unique_key(&taken, key.to_owned());
    let body = fields
        .trim()
        .strip_prefix('{')
        .and_then(|b| b.strip_suffix('}'))
        .unwrap_or_default()
        .trim();
    let mut out = String::with_capacity(body.len() + key.len() + value.len() + 8);
    out.push('{');
    if !body.is_empty() {
        out.push_str(body);
        out.push(',');
    }
    out.push_str(&crate::json_text::quoted(&key));
    out.push(':');
    out.push_str(&crate::json_text::quoted(value));
    out.push('}');
    out.into_boxed_str()
}

/// A record whose own time is unusable (not finite, or outside years 1 to 9999) is stamped
/// with the time of conversion, and the original is kept in `fields`, so every destination
/// stores one valid time for it.
fn keep_original_time(r: &mut Record, original: Option<String>) {
    if let Some(original) = original {
        r.fields_json = with_field(&r.fields_json, ORIGINAL_TIME, &original);
    }
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
            (name, level_number(level.getattr(intern!(py, "no")).ok()))
        }
        None => (String::new(), 0),
    }
}

/// Loguru's `exception`: the traceback, or the note saying why there is none.
fn exception_of(ctx: &Ctx, py: Python<'_>, exc: &Bound<'_, PyAny>) -> Option<String> {
    exc_info_text(ctx, py, exc).unwrap_or_else(Some)
}

/// Builds a record from Loguru's record dict (`message.record`).
pub fn from_loguru(ctx: &Ctx, record: &Bound<'_, PyDict>, level: (String, u16)) -> Record {
    let py = record.py();
    // Loguru's own time, not our clock: `logger.patch()` may have set it (replays, imports).
    let time = get(record, intern!(py, "time"));
    let mut original_time = None;
    let ts = time
        .as_ref()
        .and_then(|t| {
            let us = match ctx.clock.micros(t) {
                Some(us) => in_range(us),
                None => t
                    .call_method0(intern!(py, "timestamp"))
                    .ok()
                    .and_then(|t| t.extract::<f64>().ok())
                    .and_then(micros),
            };
            if us.is_none() {
                original_time = Some(time_text(t));
            }
            us
        })
        .unwrap_or_else(now_micros);
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
        r.exception = exception_of(ctx, py, &exc);
    }
    let (mut explicit_id, mut explicit_trace) = (None, (None, None));
    if let Some(extra) = get(record, intern!(py, "extra")) {
        if let Ok(d) = extra.cast::<PyDict>() {
            if !d.is_empty() {
                explicit_id = get(d, intern!(py, "request_id"));
                explicit_trace = (
                    get(d, intern!(py, "trace_id")),
                    get(d, intern!(py, "span_id")),
                );
                let mut json = Vec::with_capacity(64);
                let mut walk = Walk::new(ctx.max_field_bytes);
                push_object(&mut json, d, &mut walk, 0, |k| OWN_COLUMNS.contains(&k));
                r.fields_json = into_json(json);
            }
        }
    }
    keep_original_time(&mut r, original_time);
    r.request_id = request_id(ctx, py, explicit_id);
    (r.trace_id, r.span_id) = trace_ids(ctx, py, explicit_trace);
    r.finish(ctx.max_message_bytes)
}

/// A time as it was given: ISO 8601 for a datetime, else its `str()`.
fn time_text(t: &Bound<'_, PyAny>) -> String {
    let iso = t
        .call_method0(intern!(t.py(), "isoformat"))
        .ok()
        .map(|s| text(&s));
    capped(iso.unwrap_or_else(|| text(t)), 256)
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
    "request_id",
    "trace_id",
    "span_id",
];

fn attr_of<'py>(obj: &Bound<'py, PyAny>, name: &Bound<'py, PyString>) -> Option<Bound<'py, PyAny>> {
    obj.getattr(name).ok().filter(|v| !v.is_none())
}

fn attr_text<'py>(obj: &Bound<'py, PyAny>, name: &Bound<'py, PyString>) -> String {
    attr_of(obj, name).map(|v| text(&v)).unwrap_or_default()
}

/// Builds a record from a stdlib `logging.LogRecord`.
pub fn from_logging(ctx: &Ctx, rec: &Bound<'_, PyAny>) -> Record {
    let py = rec.py();
    let message = match rec.call_method0(intern!(py, "getMessage")) {
        Ok(m) => text(&m),
        // A format string that does not match its args is still a log line worth keeping,
        // with the args it was given (as the stdlib's own report of the failure shows them).
        Err(e) => {
            let args = rec
                .getattr(intern!(py, "args"))
                .map(|a| capped(repr_text(&a), ctx.max_message_bytes))
                .unwrap_or_else(|_| "<none>".into());
            format!(
                "{} (logsluice: message formatting failed: {e}; arguments: {args})",
                attr_text(rec, intern!(py, "msg"))
            )
        }
    };
    let level_no = level_number(attr_of(rec, intern!(py, "levelno")));
    let mut original_time = None;
    let ts = attr_of(rec, intern!(py, "created"))
        .and_then(|v| {
            let seconds = v.extract::<f64>().ok()?;
            let us = micros(seconds);
            if us.is_none() {
                original_time = Some(time_text(&v));
            }
            us
        })
        .unwrap_or_else(now_micros);
    let mut r = Record::new(
        ts,
        &attr_text(rec, intern!(py, "levelname")),
        level_no,
        Kind::App,
        message,
    );
    r.logger = attr_text(rec, intern!(py, "name"));
    r.module = attr_text(rec, intern!(py, "module"));
    r.function = attr_text(rec, intern!(py, "funcName"));
    r.line = attr_of(rec, intern!(py, "lineno"))
        .and_then(|v| v.extract().ok())
        .unwrap_or_default();
    r.process = attr_of(rec, intern!(py, "process"))
        .and_then(|v| v.extract().ok())
        .unwrap_or_default();
    r.thread = attr_of(rec, intern!(py, "thread"))
        .and_then(|v| v.extract().ok())
        .unwrap_or_default();
    // As the stdlib's formatter: a false `exc_info` (None, False, ()) means none.
    let (formatted, unusable) = match attr_of(rec, intern!(py, "exc_info"))
        .filter(|v| v.is_truthy().unwrap_or(true))
        .map(|info| exc_info_text(ctx, py, &info))
    {
        Some(Ok(formatted)) => (formatted, None),
        Some(Err(note)) => (None, Some(note)),
        None => (None, None),
    };
    // A traceback a formatter already made (`exc_text`) beats the note on an unusable one.
    r.exception = formatted
        .or_else(|| attr_of(rec, intern!(py, "exc_text")).map(|v| text(&v)))
        .or(unusable);
    if let Some(stack) = attr_of(rec, intern!(py, "stack_info")) {
        let stack = text(&stack);
        r.exception = Some(match r.exception.take() {
            Some(e) => format!("{e}\n{stack}"),
            None => stack,
        });
    }
    let (mut explicit_id, mut explicit_trace) = (None, (None, None));
    if let Ok(dict) = rec
        .getattr(intern!(py, "__dict__"))
        .and_then(|d| d.cast_into::<PyDict>().map_err(Into::into))
    {
        explicit_id = get(&dict, intern!(py, "request_id"));
        explicit_trace = (
            get(&dict, intern!(py, "trace_id")),
            get(&dict, intern!(py, "span_id")),
        );
        // `taskName` is a LogRecord attribute from Python 3.12 on; before, it is an extra.
        let task_name_attr = py.version_info() >= (3, 12);
        let attr = |k: &str| LOGRECORD_ATTRS.contains(&k) && (task_name_attr || k != "taskName");
        let mut json = Vec::with_capacity(64);
        push_object(
            &mut json,
            &dict,
            &mut Walk::new(ctx.max_field_bytes),
            0,
            attr,
        );
        r.fields_json = into_json(json);
    }
    keep_original_time(&mut r, original_time);
    r.request_id = request_id(ctx, py, explicit_id);
    (r.trace_id, r.span_id) = trace_ids(ctx, py, explicit_trace);
    r.finish(ctx.max_message_bytes)
}

/// A record logsluice itself writes for the app (a request's late exception): joined to
/// the current request through the context, as the app's own records are.
pub fn own_record(
    ctx: &Ctx,
    py: Python<'_>,
    level: (&str, u16),
    logger: &str,
    message: String,
    exception: Option<String>,
    fields_json: Box<str>,
) -> Record {
    let mut r = Record::new(now_micros(), level.0, level.1, Kind::App, message);
    r.logger = logger.to_owned();
    r.exception = exception;
    r.process = std::process::id();
    r.fields_json = fields_json;
    r.request_id = request_id(ctx, py, None);
    (r.trace_id, r.span_id) = trace_ids(ctx, py, (None, None));
    r.finish(ctx.max_message_bytes)
}

pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
}
