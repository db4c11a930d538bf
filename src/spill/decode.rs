//! A spill file's line back into the record the encoder wrote it from.

use serde_json::{Map, Value};

use crate::read::files::parse_ts;
use crate::record::{HttpFields, Kind, Record};

/// The record of one NDJSON line, or `None` for a line that is not one (cut short by a
/// crash, edited, garbage): the caller skips and counts it.
pub fn decode_line(line: &[u8]) -> Option<Record> {
    let Value::Object(mut m) = serde_json::from_slice::<Value>(line).ok()? else {
        return None;
    };
    let ts_us = parse_ts(m.get("ts")?.as_str()?)?;
    let level = m.get("level")?.as_str()?.to_owned();
    let level_no = u16::try_from(m.get("level_no")?.as_u64()?).ok()?;
    let kind = match m.get("kind")?.as_str()? {
        "app" => Kind::App,
        "http" => Kind::Http,
        _ => return None,
    };
    let message = take_str(&mut m, "message")?;
    let mut r = Record::new(ts_us, &level, level_no, kind, message);
    r.logger = take_str(&mut m, "logger").unwrap_or_default();
    r.module = take_str(&mut m, "module").unwrap_or_default();
    r.function = take_str(&mut m, "function").unwrap_or_default();
    r.line = num(&m, "line")
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(0);
    r.process = num(&m, "process")
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(0);
    r.thread = num(&m, "thread").unwrap_or(0);
    r.exception = take_str(&mut m, "exception");
    r.request_id = take_str(&mut m, "request_id");
    match m.get("fields") {
        Some(Value::Object(f)) => r.set_fields(f),
        Some(Value::Null) | None => {}
        Some(_) => return None,
    }
    if kind == Kind::App {
        r.trace_id = take_str(&mut m, "trace_id");
        r.span_id = take_str(&mut m, "span_id");
    } else {
        r.http = Some(Box::new(http_fields(&mut m)));
    }
    // Already capped when first logged: a second cap would append a second marker.
    Some(r.finish(usize::MAX))
}

fn http_fields(m: &mut Map<String, Value>) -> HttpFields {
    let float = |m: &Map<String, Value>, k: &str| m.get(k).and_then(Value::as_f64);
    HttpFields {
        method: take_str(m, "method").unwrap_or_default(),
        scheme: take_str(m, "scheme").unwrap_or_default(),
        http_version: take_str(m, "http_version").unwrap_or_default(),
        path: take_str(m, "path").unwrap_or_default(),
        query: take_str(m, "query"),
        route: take_str(m, "route"),
        status: num(m, "status")
            .and_then(|n| u16::try_from(n).ok())
            .unwrap_or(0),
        duration_ms: float(m, "duration_ms").unwrap_or(0.0),
        ttfb_ms: float(m, "ttfb_ms"),
        client_addr: take_str(m, "client_addr"),
        user_agent: take_str(m, "user_agent"),
        trace_id: take_str(m, "trace_id"),
        span_id: take_str(m, "span_id"),
        request_headers: m.remove("request_headers").unwrap_or(Value::Null),
        response_headers: m.remove("response_headers").unwrap_or(Value::Null),
        request_body: take_str(m, "request_body"),
        response_body: take_str(m, "response_body"),
        request_size: num(m, "request_size"),
        response_size: num(m, "response_size"),
        sample_rate: float(m, "sample_rate").unwrap_or(1.0),
        error: m.get("error").and_then(Value::as_bool).unwrap_or(false),
    }
}

fn take_str(m: &mut Map<String, Value>, k: &str) -> Option<String> {
    match m.remove(k)? {
        Value::String(s) => Some(s),
        _ => None,
    }
}

fn num(m: &Map<String, Value>, k: &str) -> Option<u64> {
    m.get(k).and_then(Value::as_u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::write_ndjson;

    #[test]
    fn records_survive_the_round_trip() {
        let mut app = Record::new(1_700_000_000_123_456, "WARNING", 30, Kind::App, "hé".into());
        app.logger = "a.b".into();
        app.line = 7;
        app.thread = u64::MAX;
        app.exception = Some("Traceback…".into());
        app.trace_id = Some("4bf92f3577b34da6a3ce929d0e0e4736".into());
        app.set_fields(serde_json::json!({"n": 1}).as_object().unwrap());
        let mut http = Record::new(-5, "INFO", 20, Kind::Http, "GET /".into());
        http.http = Some(Box::new(HttpFields {
            method: "GET".into(),
            path: "/x".into(),
            status: 503,
            duration_ms: 1.5,
            ttfb_ms: Some(0.25),
            trace_id: Some("t".into()),
            request_headers: serde_json::json!({"a": "b"}),
            response_size: Some(9),
            sample_rate: 0.5,
            error: true,
            ..Default::default()
        }));
        for r in [app.finish(1000), http.finish(1000)] {
            let mut line = Vec::new();
            write_ndjson(&mut line, &r);
            assert_eq!(decode_line(&line).as_ref(), Some(&r));
        }
    }

    #[test]
    fn bad_lines_are_refused() {
        for bad in [
            &b"{\"ts\":\"2023-11-14T22:13:20.123456Z\",\"level\":\"INFO\""[..],
            b"garbage",
            b"[1,2]",
            b"{\"ts\":\"nope\",\"level\":\"INFO\",\"level_no\":20,\"kind\":\"app\",\"message\":\"m\"}",
        ] {
            assert!(decode_line(bad).is_none());
        }
    }
}
