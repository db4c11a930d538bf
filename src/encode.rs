//! NDJSON encoding of records: the on-disk and in-blob format, one object per line with
//! the same field names everywhere.

use std::io::Write;

use chrono::{DateTime, Datelike, Timelike};
use serde_json::Value;

use crate::record::Record;

/// Formats microseconds since the epoch as RFC 3339 UTC with microseconds.
pub fn format_ts(ts_us: i64, out: &mut Vec<u8>) {
    TsCache::default().write(ts_us, out);
}

/// Remembers the formatted date and time of the last second seen: records of one batch
/// mostly share it, so only the microseconds are formatted per record.
#[derive(Default)]
pub struct TsCache {
    second: Option<i64>,
    prefix: Vec<u8>,
}

impl TsCache {
    pub fn write(&mut self, ts_us: i64, out: &mut Vec<u8>) {
        let second = ts_us.div_euclid(1_000_000);
        let micros = ts_us.rem_euclid(1_000_000) as u32;
        if self.second != Some(second) {
            self.prefix.clear();
            let dt = DateTime::from_timestamp(second, 0).unwrap_or_default();
            let _ = write!(
                self.prefix,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.",
                dt.year(),
                dt.month(),
                dt.day(),
                dt.hour(),
                dt.minute(),
                dt.second()
            );
            self.second = Some(second);
        }
        out.extend_from_slice(&self.prefix);
        let mut digits = [b'0'; 6];
        let mut m = micros;
        for d in digits.iter_mut().rev() {
            *d = b'0' + (m % 10) as u8;
            m /= 10;
        }
        out.extend_from_slice(&digits);
        out.push(b'Z');
    }
}

pub fn ts_string(ts_us: i64) -> String {
    let mut v = Vec::with_capacity(27);
    format_ts(ts_us, &mut v);
    String::from_utf8(v).unwrap_or_default()
}

struct Obj<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Obj<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Obj { out, first: true }
    }
    fn key(&mut self, k: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(k.as_bytes());
        self.out.extend_from_slice(b"\":");
    }
    fn str(&mut self, k: &str, v: &str) {
        self.key(k);
        crate::json_text::write_str(self.out, v);
    }
    fn opt_str(&mut self, k: &str, v: Option<&str>) {
        match v {
            Some(v) => self.str(k, v),
            None => self.raw(k, b"null"),
        }
    }
    fn raw(&mut self, k: &str, v: &[u8]) {
        self.key(k);
        self.out.extend_from_slice(v);
    }
    fn num<N: itoa::Integer>(&mut self, k: &str, v: N) {
        self.key(k);
        self.out
            .extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
    }
    fn float(&mut self, k: &str, v: f64) {
        self.key(k);
        if v.is_finite() {
            let _ = write!(self.out, "{v}");
        } else {
            self.out.extend_from_slice(b"null");
        }
    }
    fn json(&mut self, k: &str, v: &Value) {
        self.key(k);
        crate::json_text::write_value(self.out, v);
    }
    fn end(self) {
        self.out.push(b'}');
    }
}

/// Appends one record as a JSON object followed by `\n`.
pub fn write_ndjson(out: &mut Vec<u8>, r: &Record) {
    write_ndjson_cached(out, r, &mut TsCache::default());
}

fn write_ndjson_cached(out: &mut Vec<u8>, r: &Record, ts: &mut TsCache) {
    let mut o = Obj::new(out);
    o.key("ts");
    o.out.push(b'"');
    ts.write(r.ts_us, o.out);
    o.out.push(b'"');
    o.str("level", &r.level);
    o.num("level_no", r.level_no);
    o.str("kind", r.kind.as_str());
    o.str("logger", &r.logger);
    o.str("message", &r.message);
    o.str("module", &r.module);
    o.str("function", &r.function);
    o.num("line", r.line);
    o.num("process", r.process);
    o.num("thread", r.thread);
    o.opt_str("exception", r.exception.as_deref());
    o.opt_str("request_id", r.request_id.as_deref());
    // App records name their trace only when they have one (http records always do, below).
    if let Some(t) = r.trace_id.as_deref() {
        o.str("trace_id", t);
    }
    if let Some(s) = r.span_id.as_deref() {
        o.str("span_id", s);
    }
    o.raw("fields", r.fields_json.as_bytes());
    if let Some(h) = r.http.as_deref() {
        o.str("method", &h.method);
        o.str("scheme", &h.scheme);
        o.str("http_version", &h.http_version);
        o.str("path", &h.path);
        o.opt_str("query", h.query.as_deref());
        o.opt_str("route", h.route.as_deref());
        o.num("status", h.status);
        o.float("duration_ms", h.duration_ms);
        match h.ttfb_ms {
            Some(t) => o.float("ttfb_ms", t),
            None => o.raw("ttfb_ms", b"null"),
        }
        o.opt_str("client_addr", h.client_addr.as_deref());
        o.opt_str("user_agent", h.user_agent.as_deref());
        o.opt_str("trace_id", h.trace_id.as_deref());
        o.opt_str("span_id", h.span_id.as_deref());
        o.json("request_headers", &h.request_headers);
        o.opt_str("request_body", h.request_body.as_deref());
        match h.request_size {
            Some(n) => o.num("request_size", n),
            None => o.raw("request_size", b"null"),
        }
        o.json("response_headers", &h.response_headers);
        o.opt_str("response_body", h.response_body.as_deref());
        match h.response_size {
            Some(n) => o.num("response_size", n),
            None => o.raw("response_size", b"null"),
        }
        o.float("sample_rate", h.sample_rate);
        o.raw("error", if h.error { b"true" } else { b"false" });
    }
    o.end();
    out.push(b'\n');
}

/// Encodes a whole batch into one buffer.
pub fn encode_batch<'a, I: IntoIterator<Item = &'a Record>>(records: I, out: &mut Vec<u8>) {
    let mut ts = TsCache::default();
    for (i, r) in records.into_iter().enumerate() {
        if i % YIELD_EVERY == YIELD_EVERY - 1 {
            crate::pipeline::let_application_run();
        }
        write_ndjson_cached(out, r, &mut ts);
    }
}

/// Records encoded between two chances for the application's threads to run.
const YIELD_EVERY: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Kind, Record};

    #[test]
    fn ndjson_line_is_valid_json_with_all_fields() {
        let mut r = Record::new(
            1_700_000_000_123_456,
            "INFO",
            20,
            Kind::App,
            "hi \"there\"\n".into(),
        );
        r.set_fields(
            &serde_json::json!({"user": "ada"})
                .as_object()
                .unwrap()
                .clone(),
        );
        let r = r.finish(1024);
        let mut out = Vec::new();
        write_ndjson(&mut out, &r);
        assert_eq!(*out.last().unwrap(), b'\n');
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["ts"], "2023-11-14T22:13:20.123456Z");
        assert_eq!(v["message"], "hi \"there\"\n");
        assert_eq!(v["fields"]["user"], "ada");
        assert_eq!(v["exception"], Value::Null);
        assert_eq!(v["kind"], "app");
        assert!(v.get("trace_id").is_none() && v.get("span_id").is_none());
        let mut traced = r.clone();
        traced.trace_id = Some("4bf92f3577b34da6a3ce929d0e0e4736".into());
        traced.span_id = Some("00f067aa0ba902b7".into());
        out.clear();
        write_ndjson(&mut out, &traced);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v["span_id"], "00f067aa0ba902b7");
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let mut cache = TsCache::default();
        for ts in [0, 999_999, 1_000_000, -1, 1_700_000_000_000_001] {
            a.clear();
            b.clear();
            cache.write(ts, &mut a);
            let dt = DateTime::from_timestamp_micros(ts).unwrap();
            b.extend_from_slice(dt.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string().as_bytes());
            assert_eq!(a, b, "{ts}");
        }
    }
}
