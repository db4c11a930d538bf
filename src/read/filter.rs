//! The one filter set of the read side, parsed and validated once. Every store answers
//! the same [`Filter`]: PostgreSQL through bound parameters (see `pg.rs`), files and blobs
//! through [`Filter::matches`] on the decoded record.

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use serde_json::{Map, Value};

use super::exclude::Exclude;
use crate::record::level_no;

pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

/// Bad input from a user: shown as a `ValueError`, a CLI exit code 2 or an HTTP 400.
#[derive(Debug, Clone, PartialEq)]
pub struct BadInput(pub String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn bad<T>(msg: impl Into<String>) -> Result<T, BadInput> {
    Err(BadInput(msg.into()))
}

#[derive(Clone, Debug, PartialEq)]
pub enum FieldOp {
    Eq(Value),
    Ne(Value),
    Exists(bool),
    In(Vec<Value>),
    Gt(f64),
    Gte(f64),
    Lt(f64),
    Lte(f64),
    Between(f64, f64),
}

#[derive(Clone, Debug, PartialEq)]
pub struct FieldCond {
    /// Dotted path split into keys, each `[A-Za-z0-9_-]+`.
    pub path: Vec<String>,
    pub op: FieldOp,
}

/// A validated query. Times are microseconds since the epoch, UTC.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filter {
    pub since_us: Option<i64>,
    pub until_us: Option<i64>,
    pub levels: Vec<String>,
    pub min_level: Option<u16>,
    pub kind: Option<String>,
    pub logger: Option<String>,
    pub process: Option<u32>,
    pub request_id: Option<String>,
    pub trace_id: Option<String>,
    pub method: Option<String>,
    pub route: Option<String>,
    pub path: Option<String>,
    /// Inclusive status range.
    pub status: Option<(u16, u16)>,
    pub min_duration_ms: Option<f64>,
    /// Lower-cased.
    pub text: Option<String>,
    pub fields: Vec<FieldCond>,
    /// Values that drop a record (see `exclude.rs`).
    pub exclude: Exclude,
    pub desc: bool,
    pub limit: usize,
}

fn now_us() -> i64 {
    Utc::now().timestamp_micros()
}

/// `15m`, `2h`, `7d`, `30s`, `1w` (also `90` = seconds) as microseconds.
pub fn parse_relative(text: &str) -> Option<i64> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().ok()?;
    let secs = match unit.trim().to_ascii_lowercase().as_str() {
        "s" | "sec" | "secs" => 1.0,
        "m" | "min" | "mins" => 60.0,
        "h" | "hour" | "hours" => 3600.0,
        "d" | "day" | "days" => 86400.0,
        "w" | "week" | "weeks" => 7.0 * 86400.0,
        _ => return None,
    };
    let us = n * secs * 1e6;
    (0.0..3.2e17).contains(&us).then_some(us as i64)
}

/// An instant: a number (seconds since the epoch), ISO 8601 (naive means UTC) or a
/// relative age like `15m` (that long before now).
pub fn parse_time(what: &str, v: &Value) -> Result<i64, BadInput> {
    match v {
        Value::Number(n) => {
            let secs = n.as_f64().unwrap_or(f64::NAN);
            if !(secs.is_finite() && secs.abs() < 1e13) {
                return bad(format!("{what}: {n} is not a time"));
            }
            Ok((secs * 1e6) as i64)
        }
        Value::String(s) => {
            let s = s.trim();
            if s.eq_ignore_ascii_case("now") {
                return Ok(now_us());
            }
            if let Some(age) = parse_relative(s) {
                return Ok(now_us() - age);
            }
            if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
                return Ok(dt.timestamp_micros());
            }
            for fmt in [
                "%Y-%m-%dT%H:%M:%S%.f",
                "%Y-%m-%d %H:%M:%S%.f",
                "%Y-%m-%dT%H:%M",
                "%Y-%m-%d %H:%M",
            ] {
                if let Ok(dt) = NaiveDateTime::parse_from_str(s, fmt) {
                    return Ok(dt.and_utc().timestamp_micros());
                }
            }
            if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
                return Ok(d
                    .and_hms_opt(0, 0, 0)
                    .unwrap_or_default()
                    .and_utc()
                    .timestamp_micros());
            }
            bad(format!(
                "{what}={s:?} is not a time; use ISO 8601 (2026-11-23T10:00:00Z) or an age like 15m, 2h, 7d"
            ))
        }
        _ => bad(format!("{what} must be a time, got {v}")),
    }
}

/// `500`, `"5xx"`, `"500-504"`, `"500..504"` as an inclusive range.
pub fn parse_status(v: &Value) -> Result<(u16, u16), BadInput> {
    let msg = || {
        BadInput(format!(
            "status={v} is not a status; use a code (404), a class (5xx) or a range (500-504)"
        ))
    };
    let code = |s: &str| -> Option<u16> {
        let n: u16 = s.trim().parse().ok()?;
        (100..=599).contains(&n).then_some(n)
    };
    match v {
        Value::Number(n) => {
            let c = n
                .as_u64()
                .and_then(|c| u16::try_from(c).ok())
                .filter(|c| (100..=599).contains(c));
            c.map(|c| (c, c)).ok_or_else(msg)
        }
        Value::String(s) => {
            let s = s.trim().to_ascii_lowercase();
            if s.len() == 3 && s.ends_with("xx") {
                let d = s.as_bytes()[0];
                if (b'1'..=b'5').contains(&d) {
                    let base = u16::from(d - b'0') * 100;
                    return Ok((base, base + 99));
                }
                return Err(msg());
            }
            if let Some((a, b)) = s.split_once("..").or_else(|| s.split_once('-')) {
                let (a, b) = (code(a).ok_or_else(msg)?, code(b).ok_or_else(msg)?);
                return if a <= b { Ok((a, b)) } else { Err(msg()) };
            }
            code(&s).map(|c| (c, c)).ok_or_else(msg)
        }
        _ => Err(msg()),
    }
}

fn string(what: &str, v: &Value, max: usize) -> Result<Option<String>, BadInput> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) if s.len() <= max && !s.contains('\0') => Ok(Some(s.clone())),
        Value::String(_) => bad(format!(
            "{what} must be at most {max} characters without NUL"
        )),
        Value::Number(n) => Ok(Some(n.to_string())),
        _ => bad(format!("{what} must be a string, got {v}")),
    }
}

fn number(what: &str, v: &Value) -> Result<f64, BadInput> {
    v.as_f64()
        .filter(|f| f.is_finite())
        .ok_or_else(|| BadInput(format!("{what} must be a number, got {v}")))
}

const OPS: &[&str] = &[
    "eq", "ne", "exists", "in", "gt", "gte", "lt", "lte", "between",
];

fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(has_nul),
        Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

fn parse_field(key: &str, v: &Value) -> Result<FieldCond, BadInput> {
    if has_nul(v) {
        return bad(format!("fields[{key:?}]: values must not contain NUL"));
    }
    let path: Vec<String> = key.split('.').map(str::to_owned).collect();
    let ok_part = |p: &String| {
        !p.is_empty()
            && p.len() <= 64
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    if path.len() > 8 || !path.iter().all(ok_part) {
        return bad(format!(
            "fields: {key:?} is not a dotted path of letters, digits, '_' and '-' (like user.id)"
        ));
    }
    let op = match v {
        Value::Object(m)
            if m.len() == 1 && OPS.contains(&m.keys().next().map_or("", |k| k.as_str())) =>
        {
            let (name, arg) = m.iter().next().expect("one entry");
            let num = |a: &Value| number(&format!("fields[{key:?}].{name}"), a);
            match name.as_str() {
                "eq" => FieldOp::Eq(arg.clone()),
                "ne" => FieldOp::Ne(arg.clone()),
                "exists" => match arg {
                    Value::Bool(b) => FieldOp::Exists(*b),
                    _ => return bad(format!("fields[{key:?}].exists must be true or false")),
                },
                "in" => match arg {
                    Value::Array(a) if !a.is_empty() && a.len() <= 100 => FieldOp::In(a.clone()),
                    _ => {
                        return bad(format!(
                            "fields[{key:?}].in must be a list of 1 to 100 values"
                        ))
                    }
                },
                "gt" => FieldOp::Gt(num(arg)?),
                "gte" => FieldOp::Gte(num(arg)?),
                "lt" => FieldOp::Lt(num(arg)?),
                "lte" => FieldOp::Lte(num(arg)?),
                _ => match arg.as_array().map(Vec::as_slice) {
                    Some([a, b]) => FieldOp::Between(num(a)?, num(b)?),
                    _ => return bad(format!("fields[{key:?}].between must be [low, high]")),
                },
            }
        }
        other => FieldOp::Eq(other.clone()),
    };
    Ok(FieldCond { path, op })
}

fn strings(what: &str, v: &Value) -> Result<Vec<String>, BadInput> {
    match v {
        Value::Null => Ok(vec![]),
        Value::Array(a) => a
            .iter()
            .map(|x| string(what, x, 64).map(Option::unwrap_or_default))
            .collect(),
        other => Ok(string(what, other, 64)?.into_iter().collect()),
    }
}

impl Filter {
    /// Parses the filter object (names as in the Python API). Unknown names are refused,
    /// so a typo never silently widens a query.
    pub fn parse(input: &Map<String, Value>) -> Result<Filter, BadInput> {
        let mut f = Filter {
            desc: true,
            limit: DEFAULT_LIMIT,
            ..Default::default()
        };
        for (key, v) in input {
            if v.is_null() {
                continue;
            }
            match key.as_str() {
                "since" => f.since_us = Some(parse_time("since", v)?),
                "until" => f.until_us = Some(parse_time("until", v)?),
                "level" => {
                    for name in strings("level", v)? {
                        if level_no(&name).is_none() {
                            return bad(format!(
                                "level={name:?} is not a level; use TRACE, DEBUG, INFO, SUCCESS, WARNING, ERROR or CRITICAL"
                            ));
                        }
                        let mut up = name.trim().to_ascii_uppercase();
                        if up == "WARN" {
                            up = "WARNING".into();
                        } else if up == "FATAL" {
                            up = "CRITICAL".into();
                        }
                        f.levels.push(up);
                    }
                }
                "min_level" => {
                    f.min_level = Some(match v {
                        Value::Number(n) => n
                            .as_u64()
                            .and_then(|n| u16::try_from(n).ok())
                            .ok_or_else(|| BadInput(format!("min_level={n} is not a level number")))?,
                        Value::String(s) => s.trim().parse::<u16>().ok().or_else(|| level_no(s)).ok_or_else(|| {
                            BadInput(format!(
                                "min_level={s:?} is not a level; use TRACE, DEBUG, INFO, SUCCESS, WARNING, ERROR, CRITICAL or a number"
                            ))
                        })?,
                        _ => return bad(format!("min_level must be a level name or number, got {v}")),
                    })
                }
                "kind" => {
                    let k = string("kind", v, 8)?.unwrap_or_default().to_ascii_lowercase();
                    if k != "app" && k != "http" {
                        return bad(format!("kind={k:?} is not a kind; use app or http"));
                    }
                    f.kind = Some(k);
                }
                "logger" => f.logger = string("logger", v, 256)?,
                "process" => {
                    f.process = Some(
                        v.as_u64()
                            .and_then(|n| u32::try_from(n).ok())
                            .ok_or_else(|| BadInput(format!("process must be a process id, got {v}")))?,
                    )
                }
                "request_id" => f.request_id = string("request_id", v, 128)?,
                "trace_id" => f.trace_id = string("trace_id", v, 64)?,
                "method" => {
                    let m = string("method", v, 16)?.unwrap_or_default().to_ascii_uppercase();
                    if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                        return bad(format!("method={m:?} is not an HTTP method"));
                    }
                    f.method = Some(m);
                }
                "route" => f.route = string("route", v, 512)?,
                "path" => f.path = string("path", v, 2048)?,
                "status" => f.status = Some(parse_status(v)?),
                "min_duration_ms" => {
                    let d = number("min_duration_ms", v)?;
                    if d < 0.0 {
                        return bad("min_duration_ms must not be negative");
                    }
                    f.min_duration_ms = Some(d);
                }
                "text" => {
                    f.text = string("text", v, 1024)?
                        .filter(|t| !t.is_empty())
                        .map(|t| t.to_lowercase())
                }
                "fields" => match v {
                    Value::Object(m) => {
                        if m.len() > 16 {
                            return bad("fields: at most 16 conditions");
                        }
                        for (k, cond) in m {
                            f.fields.push(parse_field(k, cond)?);
                        }
                    }
                    _ => return bad("fields must be a mapping of dotted paths to values or conditions"),
                },
                "exclude" => f.exclude = Exclude::parse(v)?,
                "order" => match v.as_str().map(|s| s.trim().to_ascii_lowercase()).as_deref() {
                    Some("desc") => f.desc = true,
                    Some("asc") => f.desc = false,
                    _ => return bad(format!("order must be 'desc' or 'asc', got {v}")),
                },
                "limit" => {
                    let n = v
                        .as_i64()
                        .ok_or_else(|| BadInput(format!("limit must be a whole number, got {v}")))?;
                    if n < 1 {
                        return bad(format!("limit must be at least 1, got {n}"));
                    }
                    f.limit = (n as usize).min(MAX_LIMIT);
                }
                other => {
                    return bad(format!(
                        "unknown filter {other:?}; known: since, until, level, min_level, kind, logger, process, request_id, \
                         trace_id, method, route, path, status, min_duration_ms, text, fields, exclude, order, limit"
                    ))
                }
            }
        }
        if let (Some(a), Some(b)) = (f.since_us, f.until_us) {
            if a > b {
                return bad("since is after until");
            }
        }
        Ok(f)
    }

    /// A stable digest of what selects records (not limit): a cursor is only valid for the
    /// query that made it.
    pub fn fingerprint(&self) -> String {
        let mut copy = self.clone();
        copy.limit = 0;
        // Relative times move with the clock: the cursor's position bounds the range anyway,
        // so only whether a bound exists is part of the identity, plus absolute bounds
        // rounded to the minute (an "1h" query is the same query a minute later).
        copy.since_us = copy.since_us.map(|_| 0);
        copy.until_us = copy.until_us.map(|_| 0);
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(format!("{copy:?}").as_bytes());
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Whether a decoded record (NDJSON field names) passes every condition.
    pub fn matches(&self, r: &Map<String, Value>) -> bool {
        let s = |k: &str| r.get(k).and_then(Value::as_str);
        if let Some(min) = self.min_level {
            if r.get("level_no").and_then(Value::as_u64).unwrap_or(0) < u64::from(min) {
                return false;
            }
        }
        if !self.levels.is_empty()
            && !s("level").is_some_and(|l| self.levels.iter().any(|x| x == l))
        {
            return false;
        }
        let eq =
            |k: &str, want: &Option<String>| want.as_ref().is_none_or(|w| s(k) == Some(w.as_str()));
        if !(eq("kind", &self.kind)
            && eq("logger", &self.logger)
            && eq("request_id", &self.request_id)
            && eq("trace_id", &self.trace_id)
            && eq("method", &self.method)
            && eq("route", &self.route))
        {
            return false;
        }
        if let Some(p) = self.process {
            if r.get("process").and_then(Value::as_u64) != Some(u64::from(p)) {
                return false;
            }
        }
        if let Some(p) = &self.path {
            if !s("path").is_some_and(|x| x.starts_with(p.as_str())) {
                return false;
            }
        }
        if let Some((lo, hi)) = self.status {
            let st = r.get("status").and_then(Value::as_u64);
            if !st.is_some_and(|st| st >= u64::from(lo) && st <= u64::from(hi)) {
                return false;
            }
        }
        if let Some(min) = self.min_duration_ms {
            if !r
                .get("duration_ms")
                .and_then(Value::as_f64)
                .is_some_and(|d| d >= min)
            {
                return false;
            }
        }
        if let Some(t) = &self.text {
            if !s("message").is_some_and(|m| m.to_lowercase().contains(t.as_str())) {
                return false;
            }
        }
        if !self.fields.is_empty() {
            let fields = r.get("fields");
            for c in &self.fields {
                let mut cur = fields;
                for key in &c.path {
                    cur = cur.and_then(|v| v.get(key));
                }
                if !field_ok(&c.op, cur) {
                    return false;
                }
            }
        }
        !self.exclude.drops(r)
    }
}

/// JSON equality with numbers compared as numbers (42 equals 42.0, as in jsonb).
pub fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn field_ok(op: &FieldOp, v: Option<&Value>) -> bool {
    let num = v.and_then(Value::as_f64);
    match op {
        FieldOp::Eq(want) => v.is_some_and(|v| json_eq(v, want)),
        FieldOp::Ne(want) => !v.is_some_and(|v| json_eq(v, want)),
        FieldOp::Exists(e) => v.is_some_and(|v| !v.is_null()) == *e,
        FieldOp::In(list) => v.is_some_and(|v| list.iter().any(|w| json_eq(v, w))),
        FieldOp::Gt(x) => num.is_some_and(|n| n > *x),
        FieldOp::Gte(x) => num.is_some_and(|n| n >= *x),
        FieldOp::Lt(x) => num.is_some_and(|n| n < *x),
        FieldOp::Lte(x) => num.is_some_and(|n| n <= *x),
        FieldOp::Between(a, b) => num.is_some_and(|n| n >= *a && n <= *b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Filter, BadInput> {
        Filter::parse(v.as_object().unwrap())
    }

    #[test]
    fn statuses() {
        assert_eq!(parse_status(&json!("5xx")).unwrap(), (500, 599));
        assert_eq!(parse_status(&json!(404)).unwrap(), (404, 404));
        assert_eq!(parse_status(&json!("500-504")).unwrap(), (500, 504));
        for b in [
            json!("6xx"),
            json!(700),
            json!("5x"),
            json!("abc"),
            json!("504-500"),
            json!(true),
        ] {
            assert!(parse_status(&b).is_err(), "{b}");
        }
    }

    #[test]
    fn times_and_bad_input() {
        assert_eq!(parse_relative("15m"), Some(900_000_000));
        assert_eq!(parse_relative("2h"), Some(7_200_000_000));
        assert!(parse_relative("7x").is_none());
        assert_eq!(
            parse_time("since", &json!("2023-11-14T22:13:20Z")).unwrap(),
            1_700_000_000_000_000
        );
        assert!(parse(json!({"since": "yesterday-ish"})).is_err());
        assert!(parse(json!({"level": "LOUD"})).is_err());
        assert!(parse(json!({"bogus": 1})).is_err());
        assert!(parse(json!({"limit": 0})).is_err());
        assert_eq!(parse(json!({"limit": 5000})).unwrap().limit, MAX_LIMIT);
        assert!(parse(json!({"fields": {"a'; drop table x": 1}})).is_err());
        assert!(parse(json!({"method": "GET; x"})).is_err());
    }

    #[test]
    fn matching() {
        let f = parse(json!({"min_level": "warning", "text": "BOOM", "fields": {"user.id": 42, "n": {"gt": 3}}})).unwrap();
        let r = json!({"level_no": 40, "message": "it went boom", "fields": {"user": {"id": 42.0}, "n": 4}});
        assert!(f.matches(r.as_object().unwrap()));
        let r2 = json!({"level_no": 40, "message": "it went boom", "fields": {"user": {"id": 41}, "n": 4}});
        assert!(!f.matches(r2.as_object().unwrap()));
        let g = parse(json!({"status": "5xx", "path": "/items"})).unwrap();
        assert!(g.matches(
            json!({"status": 503, "path": "/items/3"})
                .as_object()
                .unwrap()
        ));
        assert!(!g.matches(
            json!({"status": 200, "path": "/items/3"})
                .as_object()
                .unwrap()
        ));
        assert!(!g.matches(json!({"message": "app"}).as_object().unwrap()));
        assert_ne!(f.fingerprint(), g.fingerprint());
    }

    #[test]
    fn exclusions_match_and_are_part_of_the_fingerprint() {
        let f =
            parse(json!({"kind": "http", "exclude": {"route": ["/health", "/metrics"]}})).unwrap();
        let rec = |route: &str| json!({"kind": "http", "route": route});
        assert!(!f.matches(rec("/health").as_object().unwrap()));
        assert!(!f.matches(rec("/metrics").as_object().unwrap()));
        assert!(f.matches(rec("/items/{item_id}").as_object().unwrap()));
        let plain = parse(json!({"kind": "http"})).unwrap();
        let reordered =
            parse(json!({"kind": "http", "exclude": {"route": ["/metrics", "/health"]}})).unwrap();
        assert_ne!(f.fingerprint(), plain.fingerprint());
        assert_eq!(f.fingerprint(), reordered.fingerprint());
        assert!(parse(json!({"exclude": {"fields": 1}})).is_err());
        assert!(parse(json!({"exclude": {"status": "6xx"}})).is_err());
    }
}
