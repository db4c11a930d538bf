//! The binary `COPY ... FROM STDIN (FORMAT binary)` encoding of records: a header, then per
//! row a field count and per field a length (-1 for NULL) followed by the value in network
//! byte order, then a trailer. Only the handful of types the `logs` table uses.

use serde_json::Value;

use crate::record::Record;

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01 UTC).
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// The columns logsluice writes, in COPY order, with their SQL types (`id` is filled by
/// its default). The schema module creates exactly these; `row` encodes exactly these.
pub const COLUMNS: &[(&str, &str)] = &[
    ("ts", "timestamptz"),
    ("level", "text"),
    ("level_no", "smallint"),
    ("kind", "text"),
    ("logger", "text"),
    ("message", "text"),
    ("module", "text"),
    ("function", "text"),
    ("line", "integer"),
    ("process", "integer"),
    ("thread", "bigint"),
    ("exception", "text"),
    ("request_id", "text"),
    ("fields", "jsonb"),
    ("method", "text"),
    ("scheme", "text"),
    ("http_version", "text"),
    ("path", "text"),
    ("query", "text"),
    ("route", "text"),
    ("status", "smallint"),
    ("duration_ms", "double precision"),
    ("ttfb_ms", "double precision"),
    ("client_addr", "text"),
    ("user_agent", "text"),
    ("trace_id", "text"),
    ("span_id", "text"),
    ("request_headers", "jsonb"),
    ("response_headers", "jsonb"),
    ("request_body", "text"),
    ("response_body", "text"),
    ("request_size", "bigint"),
    ("response_size", "bigint"),
    ("sample_rate", "double precision"),
    ("error", "boolean"),
];

/// The columns every record fills (`ts` .. `fields`); the rest are http-only, but for
/// `trace_id` and `span_id`, which app records fill when they carry a trace.
pub const APP_COLUMNS: usize = 14;

/// `trace_id`, followed by `span_id`.
const TRACE_COLUMN: usize = 25;

/// Whether `r` needs more than the first [`APP_COLUMNS`].
pub fn needs_all_columns(r: &Record) -> bool {
    r.http.is_some() || r.trace_id.is_some() || r.span_id.is_some()
}

pub fn header(out: &mut Vec<u8>) {
    out.extend_from_slice(SIGNATURE);
    out.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
    out.extend_from_slice(&0i32.to_be_bytes()); // header extension length
}

pub fn trailer(out: &mut Vec<u8>) {
    out.extend_from_slice(&(-1i16).to_be_bytes());
}

fn null(out: &mut Vec<u8>) {
    out.extend_from_slice(&(-1i32).to_be_bytes());
}

fn bytes(out: &mut Vec<u8>, v: &[u8]) {
    // A field over 1 GiB cannot exist (records are capped far below); saturate anyway.
    out.extend_from_slice(&i32::try_from(v.len()).unwrap_or(i32::MAX).to_be_bytes());
    out.extend_from_slice(v);
}

fn text(out: &mut Vec<u8>, v: &str) {
    bytes(out, v.as_bytes());
}

fn opt_text(out: &mut Vec<u8>, v: Option<&str>) {
    match v {
        Some(v) => text(out, v),
        None => null(out),
    }
}

fn i16v(out: &mut Vec<u8>, v: i16) {
    out.extend_from_slice(&2i32.to_be_bytes());
    out.extend_from_slice(&v.to_be_bytes());
}

fn i32v(out: &mut Vec<u8>, v: i32) {
    out.extend_from_slice(&4i32.to_be_bytes());
    out.extend_from_slice(&v.to_be_bytes());
}

fn i64v(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&8i32.to_be_bytes());
    out.extend_from_slice(&v.to_be_bytes());
}

fn f64v(out: &mut Vec<u8>, v: f64) {
    out.extend_from_slice(&8i32.to_be_bytes());
    out.extend_from_slice(&v.to_bits().to_be_bytes());
}

fn opt_f64(out: &mut Vec<u8>, v: Option<f64>) {
    match v {
        Some(v) => f64v(out, v),
        None => null(out),
    }
}

fn opt_i64(out: &mut Vec<u8>, v: Option<u64>) {
    match v {
        Some(v) => i64v(out, i64::try_from(v).unwrap_or(i64::MAX)),
        None => null(out),
    }
}

/// `jsonb` in binary: a version byte (1) followed by the JSON text.
fn jsonb(out: &mut Vec<u8>, v: &Value) {
    let len_at = out.len();
    out.extend_from_slice(&0i32.to_be_bytes());
    out.push(1);
    crate::json_text::write_value(out, v);
    let len = (out.len() - len_at - 4) as i32;
    out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

/// jsonb from JSON text the record already holds (version byte 1, then the text).
fn jsonb_text(out: &mut Vec<u8>, json: &str) {
    out.extend_from_slice(&((json.len() + 1) as i32).to_be_bytes());
    out.push(1);
    out.extend_from_slice(json.as_bytes());
}

fn opt_jsonb(out: &mut Vec<u8>, v: &Value) {
    if v.is_null() {
        null(out)
    } else {
        jsonb(out, v)
    }
}

/// Appends one tuple for `r`, in the order of [`COLUMNS`].
///
/// With `all_columns` false only the first [`APP_COLUMNS`] go in (a batch without http
/// records): the server then fills the http columns with NULL without parsing 21 fields.
pub fn row(out: &mut Vec<u8>, r: &Record, all_columns: bool) {
    let count = if all_columns {
        COLUMNS.len()
    } else {
        APP_COLUMNS
    };
    out.extend_from_slice(&(count as i16).to_be_bytes());
    i64v(out, r.ts_us.saturating_sub(PG_EPOCH_OFFSET_US));
    text(out, &r.level);
    i16v(out, i16::try_from(r.level_no).unwrap_or(i16::MAX));
    text(out, r.kind.as_str());
    text(out, &r.logger);
    text(out, &r.message);
    text(out, &r.module);
    text(out, &r.function);
    i32v(out, i32::try_from(r.line).unwrap_or(i32::MAX));
    i32v(out, i32::try_from(r.process).unwrap_or(i32::MAX));
    // Thread idents are unsigned 64-bit; the column keeps their bit pattern.
    i64v(out, r.thread as i64);
    opt_text(out, r.exception.as_deref());
    opt_text(out, r.request_id.as_deref());
    jsonb_text(out, &r.fields_json);
    if !all_columns {
        return;
    }
    match r.http.as_deref() {
        Some(h) => {
            text(out, &h.method);
            text(out, &h.scheme);
            text(out, &h.http_version);
            text(out, &h.path);
            opt_text(out, h.query.as_deref());
            opt_text(out, h.route.as_deref());
            i16v(out, i16::try_from(h.status).unwrap_or(i16::MAX));
            f64v(out, h.duration_ms);
            opt_f64(out, h.ttfb_ms);
            opt_text(out, h.client_addr.as_deref());
            opt_text(out, h.user_agent.as_deref());
            opt_text(out, h.trace_id.as_deref());
            opt_text(out, h.span_id.as_deref());
            opt_jsonb(out, &h.request_headers);
            opt_jsonb(out, &h.response_headers);
            opt_text(out, h.request_body.as_deref());
            opt_text(out, h.response_body.as_deref());
            opt_i64(out, h.request_size);
            opt_i64(out, h.response_size);
            f64v(out, h.sample_rate);
            out.extend_from_slice(&1i32.to_be_bytes());
            out.push(h.error as u8);
        }
        None => {
            for _ in APP_COLUMNS..TRACE_COLUMN {
                null(out);
            }
            opt_text(out, r.trace_id.as_deref());
            opt_text(out, r.span_id.as_deref());
            for _ in TRACE_COLUMN + 2..COLUMNS.len() {
                null(out);
            }
        }
    }
}

/// Encodes a whole COPY stream for `records`.
pub fn encode<'a, I: IntoIterator<Item = &'a Record>>(records: I, out: &mut Vec<u8>) {
    header(out);
    for (i, r) in records.into_iter().enumerate() {
        if i % 256 == 255 {
            crate::pipeline::let_application_run();
        }
        row(out, r, true);
    }
    trailer(out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{HttpFields, Kind};

    /// A minimal reader of the format, to check the encoder field by field.
    fn parse(mut data: &[u8]) -> Vec<Vec<Option<Vec<u8>>>> {
        assert_eq!(&data[..11], SIGNATURE);
        assert_eq!(&data[11..19], &[0u8; 8]);
        data = &data[19..];
        let mut rows = Vec::new();
        loop {
            let n = i16::from_be_bytes([data[0], data[1]]);
            data = &data[2..];
            if n == -1 {
                assert!(data.is_empty(), "bytes after the trailer");
                return rows;
            }
            let mut fields = Vec::new();
            for _ in 0..n {
                let len = i32::from_be_bytes(data[..4].try_into().unwrap());
                data = &data[4..];
                if len < 0 {
                    fields.push(None);
                } else {
                    fields.push(Some(data[..len as usize].to_vec()));
                    data = &data[len as usize..];
                }
            }
            rows.push(fields);
        }
    }

    fn col(name: &str) -> usize {
        COLUMNS.iter().position(|(n, _)| *n == name).unwrap()
    }

    #[test]
    fn app_record_round_trips_field_by_field() {
        // 2023-11-14T22:13:20.123456Z
        let mut r = Record::new(
            1_700_000_000_123_456,
            "WARNING",
            30,
            Kind::App,
            "héllo".into(),
        );
        r.line = 42;
        r.thread = u64::MAX;
        r.request_id = Some("req-1".into());
        r.set_fields(
            &serde_json::json!({"user": "ada"})
                .as_object()
                .unwrap()
                .clone(),
        );
        let r = r.finish(1024);
        let mut out = Vec::new();
        encode([&r, &r], &mut out);
        let rows = parse(&out);
        assert_eq!(rows.len(), 2);
        let row = &rows[0];
        assert_eq!(row.len(), COLUMNS.len());
        let ts = i64::from_be_bytes(row[col("ts")].clone().unwrap().try_into().unwrap());
        assert_eq!(ts, 1_700_000_000_123_456 - PG_EPOCH_OFFSET_US);
        assert_eq!(ts, 753_315_200_123_456);
        assert_eq!(row[col("message")].as_deref(), Some("héllo".as_bytes()));
        assert_eq!(
            row[col("level_no")].as_deref(),
            Some(&30i16.to_be_bytes()[..])
        );
        assert_eq!(row[col("line")].as_deref(), Some(&42i32.to_be_bytes()[..]));
        assert_eq!(
            row[col("thread")].as_deref(),
            Some(&(-1i64).to_be_bytes()[..])
        );
        assert_eq!(row[col("kind")].as_deref(), Some(&b"app"[..]));
        assert_eq!(row[col("exception")], None);
        let fields = row[col("fields")].clone().unwrap();
        assert_eq!(fields[0], 1, "jsonb version byte");
        assert_eq!(&fields[1..], br#"{"user":"ada"}"#);
        assert!(row[col("method")..].iter().all(Option::is_none));
    }

    #[test]
    fn http_record_fills_http_columns() {
        let mut r = Record::new(0, "INFO", 20, Kind::Http, "GET /x 200".into());
        r.http = Some(Box::new(HttpFields {
            method: "GET".into(),
            path: "/x".into(),
            status: 200,
            duration_ms: 1.5,
            request_headers: serde_json::json!({"accept": "*/*"}),
            response_size: Some(10),
            error: true,
            ..Default::default()
        }));
        let mut out = Vec::new();
        encode([&r.finish(100)], &mut out);
        let row = &parse(&out)[0];
        assert_eq!(
            row[col("status")].as_deref(),
            Some(&200i16.to_be_bytes()[..])
        );
        assert_eq!(
            row[col("duration_ms")].as_deref(),
            Some(&1.5f64.to_bits().to_be_bytes()[..])
        );
        assert_eq!(row[col("ttfb_ms")], None);
        assert_eq!(row[col("response_headers")], None, "JSON null is SQL NULL");
        assert_eq!(
            &row[col("request_headers")].clone().unwrap()[1..],
            br#"{"accept":"*/*"}"#
        );
        assert_eq!(
            row[col("response_size")].as_deref(),
            Some(&10i64.to_be_bytes()[..])
        );
        assert_eq!(row[col("error")].as_deref(), Some(&[1u8][..]));
        assert_eq!(
            row[col("ts")].as_deref(),
            Some(&(-PG_EPOCH_OFFSET_US).to_be_bytes()[..])
        );
    }

    #[test]
    fn traced_app_record_fills_only_the_trace_columns() {
        let mut r = Record::new(0, "INFO", 20, Kind::App, "m".into());
        r.trace_id = Some("4bf92f3577b34da6a3ce929d0e0e4736".into());
        r.span_id = Some("00f067aa0ba902b7".into());
        let r = r.finish(100);
        assert!(needs_all_columns(&r));
        assert!(!needs_all_columns(
            &Record::new(0, "INFO", 20, Kind::App, "m".into()).finish(100)
        ));
        let mut out = Vec::new();
        encode([&r], &mut out);
        let row = &parse(&out)[0];
        assert_eq!(row.len(), COLUMNS.len());
        assert_eq!(
            row[col("trace_id")].as_deref(),
            Some(&b"4bf92f3577b34da6a3ce929d0e0e4736"[..])
        );
        assert_eq!(
            row[col("span_id")].as_deref(),
            Some(&b"00f067aa0ba902b7"[..])
        );
        let others =
            (col("method")..COLUMNS.len()).filter(|&i| i != col("trace_id") && i != col("span_id"));
        assert!(others.into_iter().all(|i| row[i].is_none()));
    }

    #[test]
    fn app_only_rows_stop_after_fields() {
        let r = Record::new(0, "INFO", 20, Kind::App, "m".into()).finish(100);
        let mut out = Vec::new();
        header(&mut out);
        row(&mut out, &r, false);
        trailer(&mut out);
        let rows = parse(&out);
        assert_eq!(rows[0].len(), APP_COLUMNS);
        assert_eq!(rows[0][col("fields")].as_deref(), Some(&b"\x01{}"[..]));
    }

    #[test]
    fn column_order_matches_the_encoder() {
        // `row` hard-codes where the http part starts.
        assert_eq!(col("method"), 14);
        assert_eq!(COLUMNS[APP_COLUMNS - 1].0, "fields");
        assert_eq!(COLUMNS[TRACE_COLUMN].0, "trace_id");
        assert_eq!(COLUMNS[TRACE_COLUMN + 1].0, "span_id");
        assert_eq!(COLUMNS.last().unwrap().0, "error");
    }
}
