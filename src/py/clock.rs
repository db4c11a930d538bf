//! Loguru's record time as microseconds since the epoch, without calling `.timestamp()`.
//!
//! `datetime.timestamp()` on an aware datetime builds a timedelta and a float and cost a
//! fifth of the whole sink call. The stable ABI exposes no datetime accessors, so this reads
//! the fields from CPython's `PyDateTime_DateTime` layout — unchanged since Python 3.6 —
//! but only after checking at start-up, on a datetime built for the purpose, that the layout
//! reads back exactly; otherwise (another interpreter, a future change) it is never used.
//! Only fixed-offset `datetime.timezone` zones (what Loguru stamps) take the fast path; any
//! other datetime falls back to `.timestamp()`.

use chrono::NaiveDate;
use parking_lot::Mutex;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyType;

/// Byte offsets in `PyDateTime_DateTime` on 64-bit builds: PyObject header (16), hashcode
/// (8), hastzinfo (1), data[10], fold (1), padding, tzinfo pointer.
const HASTZINFO: usize = 24;
const DATA: usize = 25;
const TZINFO: usize = 40;

pub struct Clock {
    datetime_type: Py<PyType>,
    timezone_type: Py<PyType>,
    /// Fixed-offset zones seen so far, held so their addresses stay theirs.
    offsets: Mutex<Vec<(Py<PyAny>, i64)>>,
    layout_ok: bool,
}

struct Raw {
    micros_naive: i64,
    tzinfo: *mut pyo3::ffi::PyObject,
}

impl Clock {
    pub fn new(py: Python<'_>) -> PyResult<Clock> {
        let dt = py.import("datetime")?;
        let datetime_type = dt.getattr("datetime")?.cast_into::<PyType>()?.unbind();
        let timezone_type = dt.getattr("timezone")?.cast_into::<PyType>()?.unbind();
        let mut clock = Clock {
            datetime_type,
            timezone_type,
            offsets: Mutex::new(Vec::new()),
            layout_ok: false,
        };
        clock.layout_ok = cfg!(target_pointer_width = "64") && clock.self_test(py).unwrap_or(false);
        Ok(clock)
    }

    fn self_test(&self, py: Python<'_>) -> PyResult<bool> {
        let dt = py.import("datetime")?;
        let tz = dt
            .getattr("timezone")?
            .call1((dt.getattr("timedelta")?.call1((0, 7200))?,))?;
        let sample = self
            .datetime_type
            .bind(py)
            .call1((2001, 2, 3, 4, 5, 6, 789_012, &tz))?;
        let Some(raw) = self.raw(&sample) else {
            return Ok(false);
        };
        let expected = micros_of(2001, 2, 3, 4, 5, 6, 789_012);
        Ok(raw.micros_naive == expected && raw.tzinfo == tz.as_ptr())
    }

    fn raw(&self, obj: &Bound<'_, PyAny>) -> Option<Raw> {
        if !obj
            .is_instance(self.datetime_type.bind(obj.py()).as_any())
            .unwrap_or(false)
        {
            return None;
        }
        // SAFETY: `obj` is a live datetime (checked above); the offsets were verified by
        // `self_test` on this interpreter before any call reaches here with layout_ok.
        unsafe {
            let base = obj.as_ptr().cast::<u8>();
            if *base.add(HASTZINFO) == 0 {
                return None; // naive: its meaning depends on the local zone
            }
            let d = std::slice::from_raw_parts(base.add(DATA), 10);
            let year = (i32::from(d[0]) << 8) | i32::from(d[1]);
            let micros = (u32::from(d[7]) << 16) | (u32::from(d[8]) << 8) | u32::from(d[9]);
            let naive = micros_of(
                year,
                d[2].into(),
                d[3].into(),
                d[4].into(),
                d[5].into(),
                d[6].into(),
                micros,
            );
            let tzinfo = *base.add(TZINFO).cast::<*mut pyo3::ffi::PyObject>();
            Some(Raw {
                micros_naive: naive,
                tzinfo,
            })
        }
    }

    /// The UTC offset of a fixed-offset zone in microseconds, cached per zone object.
    fn offset(&self, py: Python<'_>, tzinfo: *mut pyo3::ffi::PyObject) -> Option<i64> {
        let mut cache = self.offsets.lock();
        if let Some((_, off)) = cache.iter().find(|(tz, _)| tz.as_ptr() == tzinfo) {
            return Some(*off);
        }
        // SAFETY: the datetime that holds this pointer is alive for the whole call.
        let tz = unsafe { Bound::from_borrowed_ptr(py, tzinfo) };
        if !tz.get_type().is(self.timezone_type.bind(py)) {
            return None;
        }
        let delta = tz
            .call_method1(intern!(py, "utcoffset"), (py.None(),))
            .ok()?;
        let days: i64 = delta.getattr(intern!(py, "days")).ok()?.extract().ok()?;
        let seconds: i64 = delta.getattr(intern!(py, "seconds")).ok()?.extract().ok()?;
        let micros: i64 = delta
            .getattr(intern!(py, "microseconds"))
            .ok()?
            .extract()
            .ok()?;
        let off = (days * 86_400 + seconds) * 1_000_000 + micros;
        if cache.len() < 16 {
            cache.push((tz.unbind(), off));
        }
        Some(off)
    }

    pub fn fast(&self) -> bool {
        self.layout_ok
    }

    /// Microseconds since the epoch of an aware datetime, or `None` to take the slow path.
    pub fn micros(&self, obj: &Bound<'_, PyAny>) -> Option<i64> {
        if !self.layout_ok {
            return None;
        }
        let raw = self.raw(obj)?;
        let off = self.offset(obj.py(), raw.tzinfo)?;
        Some(raw.micros_naive - off)
    }
}

fn micros_of(
    year: i32,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    micros: u32,
) -> i64 {
    NaiveDate::from_ymd_opt(year, month, day)
        .and_then(|d| d.and_hms_micro_opt(hour, minute, second, micros))
        .map_or(0, |t| t.and_utc().timestamp_micros())
}
