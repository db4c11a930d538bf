//! HTTP access records: from what the ASGI middleware observed (bytes and small scalars)
//! to a redacted, sanitised `Record` of kind `http`. Pure Rust, no Python: the binding in
//! `py/http.rs` reads the arguments and calls [`build_record`] with the GIL released.

pub mod body;
pub mod proxies;
pub mod redact;
pub mod xml;

use std::borrow::Cow;
use std::fmt::Write as _;

use serde_json::{Map, Value};

use crate::record::{truncate_in_place, HttpFields, Kind, Record};
use redact::{Redactor, REDACTED};

/// What the middleware saw happen, as bit flags.
pub mod flags {
    /// The last body message was sent.
    pub const COMPLETE: u32 = 1;
    /// The app raised (before or after the response started).
    pub const ERROR: u32 = 2;
    /// The client went away (`http.disconnect`, or `send` failed).
    pub const DISCONNECTED: u32 = 4;
    /// Sampled out at the start and kept by a tail rule: bodies were not copied.
    pub const SAMPLED_OUT: u32 = 8;
    pub const REQUEST_BODY_TIMEOUT: u32 = 16;
    pub const RESPONSE_BODY_TIMEOUT: u32 = 32;
    /// The body went as a file (`http.response.pathsend`): its size is the response's
    /// `Content-Length`, read when the record is built (no file system call on the event
    /// loop's thread).
    pub const PATHSEND: u32 = 64;
}

pub type Headers = Vec<(Vec<u8>, Vec<u8>)>;

/// Status stored for a client that disconnected before the response was complete.
pub const CLIENT_CLOSED: u16 = 499;
const MAX_HEADERS: usize = 100;
const MAX_PATH_BYTES: usize = 8192;

#[derive(Debug, Default)]
pub struct Exchange {
    pub ts_us: i64,
    pub method: String,
    pub scheme: String,
    pub http_version: String,
    /// The full path, `root_path` included once.
    pub path: String,
    pub query: Vec<u8>,
    pub route: Option<String>,
    /// 0 when no response started.
    pub status: u16,
    pub client: Option<String>,
    pub request_headers: Headers,
    pub response_headers: Headers,
    /// `None`: not captured (sampled out); bytes may be fewer than the size (cap, time).
    pub request_body: Option<Vec<u8>>,
    pub request_size: u64,
    pub response_body: Option<Vec<u8>>,
    pub response_size: u64,
    pub flags: u32,
    pub duration_ms: f64,
    pub ttfb_ms: Option<f64>,
    pub request_id: String,
    pub exception: Option<String>,
    pub sample_rate: f64,
}

impl Exchange {
    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    /// 499 when the client left before the response completed, 500 when none started.
    pub fn final_status(&self) -> u16 {
        final_status(self.status, self.flags)
    }

    /// 2xx/3xx INFO, 4xx WARNING, 5xx and exceptions ERROR.
    pub fn level(&self) -> (&'static str, u16) {
        level(
            self.status,
            self.flags | self.exception.as_ref().map_or(0, |_| flags::ERROR),
        )
    }
}

/// [`Exchange::final_status`] from the status sent and the exchange's flags.
pub fn final_status(status: u16, f: u32) -> u16 {
    if f & flags::COMPLETE == 0 && f & flags::DISCONNECTED != 0 {
        CLIENT_CLOSED
    } else if status == 0 {
        500
    } else {
        status
    }
}

/// [`Exchange::level`] from the status sent and the exchange's flags.
pub fn level(status: u16, f: u32) -> (&'static str, u16) {
    let status = final_status(status, f);
    if f & flags::ERROR != 0 || status >= 500 {
        ("ERROR", 40)
    } else if status >= 400 {
        ("WARNING", 30)
    } else {
        ("INFO", 20)
    }
}

fn header<'a>(headers: &'a Headers, name: &str) -> Option<Cow<'a, str>> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, v)| crate::record::lossy(v))
}

/// Keeps `[a-z0-9-]` of a token (an encoding name), at most 32 characters.
pub fn clean_token(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(32)
        .collect()
}

fn header_map(r: &Redactor, headers: &Headers) -> Value {
    let mut map = Map::new();
    for (k, v) in headers.iter().take(MAX_HEADERS) {
        let name = crate::record::lossy(k).to_ascii_lowercase();
        let name = match redact::escape_controls(&name) {
            Cow::Borrowed(_) => name,
            Cow::Owned(escaped) => escaped,
        };
        let value = if r.headers.matches(&name) {
            REDACTED.to_owned()
        } else {
            let mut v = r.scrub(&crate::record::lossy(v)).into_owned();
            truncate_in_place(&mut v, r.max_header_bytes);
            v
        };
        // Repeated headers keep every value, in order.
        match map.get_mut(&name) {
            Some(Value::String(prev)) => {
                prev.push_str(", ");
                prev.push_str(&value);
            }
            _ => {
                map.insert(name, Value::String(value));
            }
        }
    }
    Value::Object(map)
}

/// The client address: the socket peer, or, when the peer is a trusted proxy, the
/// right-most forwarded hop (`Forwarded`, else `X-Forwarded-For`) that is not itself one.
fn client_addr(r: &Redactor, peer: Option<&str>, headers: &Headers) -> Option<String> {
    let peer = peer?;
    if r.trusted_proxies.is_empty() {
        // What the server says the peer is (a unix socket's path, a test client's name):
        // stored as the forwarded case is, escaped and capped.
        let mut addr = redact::escape_controls(peer).into_owned();
        truncate_in_place(&mut addr, 64);
        return Some(addr);
    }
    // Entries that do not parse trust nothing (configuration checks refuse them earlier).
    let trusted: Vec<proxies::Trusted> = r
        .trusted_proxies
        .iter()
        .filter_map(|t| proxies::parse_trusted(t).ok())
        .collect();
    let values = |name: &str| -> Vec<Cow<'_, str>> {
        headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| crate::record::lossy(v))
            .collect()
    };
    let forwarded = values("forwarded");
    let xff = values("x-forwarded-for");
    let forwarded: Vec<&str> = forwarded.iter().map(|v| v.as_ref()).collect();
    let xff: Vec<&str> = xff.iter().map(|v| v.as_ref()).collect();
    let mut addr = proxies::client_addr(&trusted, peer, &forwarded, &xff);
    addr = redact::escape_controls(&addr).into_owned();
    truncate_in_place(&mut addr, 64);
    Some(addr)
}

/// The ids of a valid W3C `traceparent` (`version-traceid-spanid-flags`, ids non-zero
/// lower-case hex), held inline: reading them from a request's header allocates nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceIds {
    trace: [u8; 32],
    span: [u8; 16],
}

impl TraceIds {
    pub fn parse(value: &[u8]) -> Option<Self> {
        let mut parts = value.trim_ascii().split(|&c| c == b'-');
        let (version, trace, span, trace_flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let more = parts.next().is_some();
        let hex = |s: &[u8], n: usize| {
            s.len() == n
                && s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
                && s.iter().any(|&c| c != b'0')
        };
        let version_ok = version.len() == 2
            && version.iter().all(u8::is_ascii_hexdigit)
            && version != b"ff"
            && (version != b"00" || !more);
        let flags_ok = trace_flags.len() == 2 && trace_flags.iter().all(u8::is_ascii_hexdigit);
        if !(version_ok && flags_ok && hex(trace, 32) && hex(span, 16)) {
            return None;
        }
        Some(TraceIds {
            trace: trace.try_into().ok()?,
            span: span.try_into().ok()?,
        })
    }

    pub fn trace_id(&self) -> &str {
        // Checked as ASCII hex by `parse`.
        std::str::from_utf8(&self.trace).unwrap_or_default()
    }

    pub fn span_id(&self) -> &str {
        std::str::from_utf8(&self.span).unwrap_or_default()
    }
}

/// [`TraceIds`] of a `traceparent` value, as owned strings.
pub fn parse_traceparent(value: &str) -> Option<(String, String)> {
    TraceIds::parse(value.as_bytes()).map(|t| (t.trace_id().to_owned(), t.span_id().to_owned()))
}

/// An inbound request id is kept when it is 1 to 128 characters of `[A-Za-z0-9._:-]`.
pub fn valid_request_id(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'))
}

/// This process's id, read again only after a fork (`getpid` is a system call).
fn pid() -> u32 {
    thread_local! {
        static CACHED: std::cell::Cell<(u64, u32)> = const { std::cell::Cell::new((u64::MAX, 0)) };
    }
    let generation = crate::pipeline::fork_generation();
    CACHED.with(|c| match c.get() {
        (g, pid) if g == generation => pid,
        _ => {
            let pid = std::process::id();
            c.set((generation, pid));
            pid
        }
    })
}

/// A new request id: a UUIDv7 (time-ordered, so ids sort like the requests).
pub fn new_request_id() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default();
    new_request_id_at(ms)
}

/// [`new_request_id`] for a request that started `unix_ms` (the caller read the clock).
pub fn new_request_id_at(unix_ms: u64) -> String {
    let id = request_id_bytes_at(unix_ms);
    // Only ASCII hex digits and dashes were written.
    std::str::from_utf8(&id).unwrap_or_default().to_owned()
}

/// [`new_request_id_at`] as its 36 ASCII bytes, without allocating.
pub fn request_id_bytes_at(unix_ms: u64) -> [u8; 36] {
    let ms = unix_ms & 0xFFFF_FFFF_FFFF;
    // The pid is mixed in: a forked worker starts with its parent's generator state.
    let random = fastrand::u64(..);
    let rand_b = random ^ u64::from(pid()).rotate_left(29);
    let rand_a = (random >> 52) & 0x0FFF;
    let hi = (ms << 16) | 0x7000 | rand_a;
    let lo = (rand_b & 0x3FFF_FFFF_FFFF_FFFF) | 0x8000_0000_0000_0000;
    let (hi, lo) = (hex16(hi), hex16(lo));
    let mut out = [b'-'; 36];
    out[..8].copy_from_slice(&hi[..8]);
    out[9..13].copy_from_slice(&hi[8..12]);
    out[14..18].copy_from_slice(&hi[12..]);
    out[19..23].copy_from_slice(&lo[..4]);
    out[24..].copy_from_slice(&lo[4..]);
    out
}

/// `x` as 16 lowercase hex digits, most significant first, computed eight digits at a
/// time in a register (every request without an inbound id formats one UUID).
fn hex16(x: u64) -> [u8; 16] {
    fn hex8(x: u32) -> [u8; 8] {
        // One nibble per byte, the top nibble in the top byte.
        let mut v = u64::from(x);
        v = (v | (v << 16)) & 0x0000_FFFF_0000_FFFF;
        v = (v | (v << 8)) & 0x00FF_00FF_00FF_00FF;
        v = (v | (v << 4)) & 0x0F0F_0F0F_0F0F_0F0F;
        // Bytes 10..15 get the distance from '9' + 1 to 'a' added.
        let letters = ((v + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
        (v + 0x3030_3030_3030_3030 + letters * 39).to_be_bytes()
    }
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&hex8((x >> 32) as u32));
    out[8..].copy_from_slice(&hex8(x as u32));
    out
}

/// What a response sent as a file declared for it (nothing for other responses).
fn file_size(ex: &Exchange) -> u64 {
    if !ex.has(flags::PATHSEND) {
        return 0;
    }
    header(&ex.response_headers, "content-length")
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

fn content_headers(headers: &Headers) -> (String, String) {
    (
        header(headers, "content-type")
            .map(Cow::into_owned)
            .unwrap_or_default(),
        header(headers, "content-encoding")
            .map(Cow::into_owned)
            .unwrap_or_default(),
    )
}

/// Turns one exchange into a finished record. Never fails: anything odd is sanitised.
pub fn build_record(r: &Redactor, ex: Exchange, max_message_bytes: usize) -> Record {
    let status = ex.final_status();
    let (level, level_no) = ex.level();
    let file_size = file_size(&ex);
    let complete = ex.has(flags::COMPLETE);
    // Tokens in paths (`/reset/<jwt>`) are scrubbed like any captured text.
    let mut path = r.scrub(&ex.path).into_owned();
    truncate_in_place(&mut path, MAX_PATH_BYTES);
    let mut message = String::with_capacity(path.len() + 32);
    let _ = write!(
        message,
        "{} {} {} {:.1}ms",
        redact::escape_controls(&ex.method),
        path,
        status,
        ex.duration_ms
    );
    let mut rec = Record::new(ex.ts_us, level, level_no, Kind::Http, message);
    rec.logger = "logsluice.http".into();
    rec.process = std::process::id();
    rec.exception = ex.exception.clone();
    rec.request_id = Some(ex.request_id.clone());
    let mut fields = Map::new();

    let query = (!ex.query.is_empty()).then(|| {
        let mut q = r.redact_urlencoded(&crate::record::lossy(&ex.query), &r.query);
        truncate_in_place(&mut q, MAX_PATH_BYTES);
        q
    });
    let user_agent = header(&ex.request_headers, "user-agent").map(|ua| {
        let mut ua = r.scrub(&ua).into_owned();
        truncate_in_place(&mut ua, r.max_user_agent_bytes);
        ua
    });
    let (trace_id, span_id) = header(&ex.request_headers, "traceparent")
        .and_then(|t| parse_traceparent(&t))
        .unzip();

    let auth_failure = matches!(status, 401 | 403) && !r.capture_auth_failure_bodies;
    let no_response_body = ex.method.eq_ignore_ascii_case("HEAD") || matches!(status, 204 | 304);
    if ex.has(flags::SAMPLED_OUT) {
        fields.insert("bodies".into(), Value::from("not captured: sampled out"));
    } else if auth_failure {
        fields.insert(
            "bodies".into(),
            Value::from("not captured: authentication failure"),
        );
    }
    let mut store_body = |which: &str, body: &Option<Vec<u8>>, size: u64, headers: &Headers| {
        let captured = body.as_deref()?;
        if auth_failure {
            return None;
        }
        let (ct, ce) = content_headers(headers);
        let stored = body::store(r, &ct, &ce, captured, size);
        if (captured.len() as u64) < size {
            fields.insert(format!("{which}_body_truncated"), Value::Bool(true));
        }
        if let Some(note) = stored.note {
            fields.insert(format!("{which}_body_format"), Value::from(note));
        }
        stored.text
    };
    let request_body = store_body(
        "request",
        &ex.request_body,
        ex.request_size,
        &ex.request_headers,
    );
    let response_body = if no_response_body {
        None
    } else {
        store_body(
            "response",
            &ex.response_body,
            ex.response_size,
            &ex.response_headers,
        )
    };
    if ex.has(flags::REQUEST_BODY_TIMEOUT) {
        fields.insert("request_body_timed_out".into(), Value::Bool(true));
    }
    if ex.has(flags::RESPONSE_BODY_TIMEOUT) {
        fields.insert("response_body_timed_out".into(), Value::Bool(true));
    }
    if ex.has(flags::DISCONNECTED) {
        fields.insert("disconnected".into(), Value::Bool(true));
    }
    if ex.status == 0 && ex.exception.is_none() && !ex.has(flags::DISCONNECTED) {
        fields.insert("no_response".into(), Value::Bool(true));
    }
    rec.set_fields(&fields);
    let error = ex.has(flags::ERROR) || ex.exception.is_some() || !complete;
    rec.http = Some(Box::new(HttpFields {
        method: redact::escape_controls(&ex.method).into_owned(),
        scheme: redact::escape_controls(&ex.scheme).into_owned(),
        http_version: redact::escape_controls(&ex.http_version).into_owned(),
        path,
        query,
        route: ex.route.map(|r| redact::escape_controls(&r).into_owned()),
        status,
        duration_ms: ex.duration_ms,
        ttfb_ms: ex.ttfb_ms,
        client_addr: client_addr(r, ex.client.as_deref(), &ex.request_headers),
        user_agent,
        trace_id,
        span_id,
        request_headers: header_map(r, &ex.request_headers),
        response_headers: header_map(r, &ex.response_headers),
        request_body,
        response_body,
        request_size: Some(ex.request_size),
        response_size: (ex.status != 0).then_some(ex.response_size + file_size),
        sample_rate: ex.sample_rate,
        error,
    }));
    rec.finish(max_message_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Headers {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    fn exchange() -> Exchange {
        Exchange {
            ts_us: 1,
            method: "POST".into(),
            scheme: "http".into(),
            http_version: "1.1".into(),
            path: "/items/1".into(),
            query: b"q=1&token=abc".to_vec(),
            route: Some("/items/{item_id}".into()),
            status: 201,
            client: Some("127.0.0.1".into()),
            request_headers: h(&[
                ("content-type", "application/json"),
                ("authorization", "Bearer abcdefgh12345"),
                ("Cookie", "a=b"),
                ("x-api-key", "k"),
                ("user-agent", "curl/8"),
                ("accept", "a"),
                ("accept", "b"),
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
            ]),
            response_headers: h(&[("content-type", "application/json"), ("set-cookie", "s=1")]),
            request_body: Some(br#"{"password":"p","name":"n"}"#.to_vec()),
            request_size: 27,
            response_body: Some(br#"{"id":1}"#.to_vec()),
            response_size: 8,
            flags: flags::COMPLETE,
            duration_ms: 1.5,
            ttfb_ms: Some(1.0),
            request_id: "rid".into(),
            exception: None,
            sample_rate: 1.0,
        }
    }

    #[test]
    fn a_complete_exchange_becomes_a_redacted_record() {
        let rec = build_record(&Redactor::default(), exchange(), 1 << 16);
        let http = rec.http.as_deref().unwrap();
        assert_eq!(rec.kind, Kind::Http);
        assert_eq!((rec.level.as_str(), rec.level_no), ("INFO", 20));
        assert_eq!(rec.request_id.as_deref(), Some("rid"));
        assert_eq!(http.status, 201);
        assert_eq!(http.query.as_deref(), Some("q=1&token=[REDACTED]"));
        assert_eq!(http.request_headers["authorization"], REDACTED);
        assert_eq!(http.request_headers["cookie"], REDACTED);
        assert_eq!(http.request_headers["x-api-key"], REDACTED);
        assert_eq!(http.request_headers["accept"], "a, b");
        assert_eq!(http.response_headers["set-cookie"], REDACTED);
        assert_eq!(
            http.request_body.as_deref(),
            Some(r#"{"password":"[REDACTED]","name":"n"}"#)
        );
        assert_eq!(http.response_body.as_deref(), Some(r#"{"id":1}"#));
        assert_eq!(
            http.trace_id.as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(http.span_id.as_deref(), Some("00f067aa0ba902b7"));
        assert_eq!(http.user_agent.as_deref(), Some("curl/8"));
        assert!(!http.error);
        assert_eq!(rec.message, "POST /items/1 201 1.5ms");
    }

    #[test]
    fn statuses_levels_and_flags() {
        let r = Redactor::default();
        let mut ex = exchange();
        ex.status = 0;
        ex.flags = 0;
        ex.exception = Some("Traceback...".into());
        let rec = build_record(&r, ex, 1 << 16);
        assert_eq!(rec.http.as_ref().unwrap().status, 500);
        assert_eq!(rec.level_no, 40);
        assert!(rec.http.as_ref().unwrap().error);

        let mut ex = exchange();
        ex.status = 200;
        ex.flags = flags::DISCONNECTED;
        let rec = build_record(&r, ex, 1 << 16);
        assert_eq!(rec.http.as_ref().unwrap().status, 499);
        assert_eq!(rec.level_no, 30);
        assert_eq!(rec.fields()["disconnected"], true);

        let mut ex = exchange();
        ex.status = 0;
        ex.flags = 0;
        let rec = build_record(&r, ex, 1 << 16);
        assert_eq!(rec.http.as_ref().unwrap().status, 500);
        assert_eq!(rec.fields()["no_response"], true);

        let mut ex = exchange();
        ex.status = 401;
        let rec = build_record(&r, ex, 1 << 16);
        assert_eq!(rec.level_no, 30);
        assert_eq!(rec.http.as_ref().unwrap().request_body, None);
        assert_eq!(rec.http.as_ref().unwrap().response_body, None);

        let mut ex = exchange();
        ex.method = "HEAD".into();
        let rec = build_record(&r, ex, 1 << 16);
        assert_eq!(rec.http.as_ref().unwrap().response_body, None);
    }

    #[test]
    fn trusted_proxies_only() {
        let mut r = Redactor::default();
        let headers = h(&[("x-forwarded-for", "1.2.3.4, 10.0.0.2")]);
        assert_eq!(
            client_addr(&r, Some("10.0.0.1"), &headers).as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(
            client_addr(&r, Some("peer\u{1b}[31m"), &Vec::new()).as_deref(),
            Some("peer\\u001b[31m")
        );
        r.trusted_proxies = vec!["10.0.0.1".into(), "10.0.0.2".into()];
        assert_eq!(
            client_addr(&r, Some("10.0.0.1"), &headers).as_deref(),
            Some("1.2.3.4")
        );
        r.trusted_proxies = vec!["10.0.0.0/8".into(), "::1/128".into()];
        let headers = h(&[
            ("x-forwarded-for", "9.9.9.9"),
            ("Forwarded", "for=5.6.7.8;proto=https"),
            ("forwarded", "for=\"[2001:db8::7]:443\", for=10.1.1.1"),
        ]);
        assert_eq!(
            client_addr(&r, Some("::1"), &headers).as_deref(),
            Some("2001:db8::7")
        );
    }

    #[test]
    fn traceparent_and_request_ids() {
        assert!(
            parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none()
        );
        assert!(
            parse_traceparent("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01").is_none()
        );
        assert!(parse_traceparent("garbage").is_none());
        let t = TraceIds::parse(b" 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 ")
            .expect("valid traceparent");
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.span_id(), "00f067aa0ba902b7");
        // Later versions may append fields; version 00 may not; ff is forbidden.
        let future = b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra";
        assert_eq!(TraceIds::parse(future), Some(t));
        for bad in [
            &b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"[..],
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            b"",
            b"\xff\xfe",
        ] {
            assert!(TraceIds::parse(bad).is_none(), "{bad:?}");
        }
        assert!(valid_request_id(b"abc-123_X.y:z"));
        assert!(!valid_request_id(b"a b"));
        assert!(!valid_request_id(b"<script>"));
        assert!(!valid_request_id(&[b'a'; 129]));
        let id = new_request_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "7");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"));
        assert_eq!([8, 13, 18, 23].map(|i| &id[i..i + 1]), ["-", "-", "-", "-"]);
        assert_ne!(id, new_request_id());
        // The time is the first 48 bits, in hex.
        let at = new_request_id_at(0x0123_4567_89ab);
        assert_eq!(&at[..13], "01234567-89ab");
    }

    #[test]
    fn hex_digits_match_the_formatter() {
        let mut rng = fastrand::Rng::with_seed(7);
        let samples = [
            0,
            9,
            10,
            15,
            0xf0,
            u64::MAX,
            0x0123_4567_89ab_cdef,
            0xa5a5_5a5a_0f0f_f0f0,
        ];
        for x in samples.into_iter().chain((0..10_000).map(|_| rng.u64(..))) {
            assert_eq!(hex16(x), *format!("{x:016x}").as_bytes(), "{x:#x}");
        }
    }
}
