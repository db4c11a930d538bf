//! The one shape every part of the core speaks: built once from Python, shared by all
//! destinations through an `Arc`, never mutated after the queue.

use std::borrow::Cow;

use serde_json::{Map, Value};

/// Loguru's and the stdlib's numbering; custom levels keep their own number.
pub const LEVELS: &[(&str, u16)] = &[
    ("TRACE", 5),
    ("DEBUG", 10),
    ("INFO", 20),
    ("SUCCESS", 25),
    ("WARNING", 30),
    ("ERROR", 40),
    ("CRITICAL", 50),
];

/// Resolves a level name (any case; `WARN` and `FATAL` as aliases) to its number.
pub fn level_no(name: &str) -> Option<u16> {
    let upper = name.trim().to_ascii_uppercase();
    let upper = match upper.as_str() {
        "WARN" => "WARNING",
        "FATAL" => "CRITICAL",
        other => other,
    };
    LEVELS.iter().find(|(n, _)| *n == upper).map(|(_, no)| *no)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    App,
    Http,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::App => "app",
            Kind::Http => "http",
        }
    }
}

/// Fields only `http` records carry (filled by the ASGI middleware).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HttpFields {
    pub method: String,
    pub scheme: String,
    pub http_version: String,
    pub path: String,
    pub query: Option<String>,
    pub route: Option<String>,
    pub status: u16,
    pub duration_ms: f64,
    pub ttfb_ms: Option<f64>,
    pub client_addr: Option<String>,
    pub user_agent: Option<String>,
    pub trace_id: Option<String>,
    pub span_id: Option<String>,
    pub request_headers: Value,
    pub response_headers: Value,
    pub request_body: Option<String>,
    pub response_body: Option<String>,
    pub request_size: Option<u64>,
    pub response_size: Option<u64>,
    pub sample_rate: f64,
    pub error: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// Microseconds since the Unix epoch, UTC.
    pub ts_us: i64,
    pub level: String,
    pub level_no: u16,
    pub kind: Kind,
    pub logger: String,
    pub message: String,
    pub module: String,
    pub function: String,
    pub line: u32,
    pub process: u32,
    pub thread: u64,
    pub exception: Option<String>,
    pub request_id: Option<String>,
    /// W3C trace ids of app records (from the middleware's context or explicit extras);
    /// http records keep theirs in [`HttpFields`].
    pub trace_id: Option<String>,
    pub span_id: Option<String>,
    /// Extra fields as one JSON object, serialised once at conversion: compact in the queue
    /// and copied as-is into NDJSON and jsonb. Always a valid JSON object (`{}` when empty).
    pub fields_json: Box<str>,
    pub http: Option<Box<HttpFields>>,
    /// Approximate heap size, computed once: the queue's byte bound counts this.
    pub size: usize,
}

impl Record {
    /// A record with everything but the essentials empty; callers fill the rest and then
    /// call [`Record::finish`].
    pub fn new(ts_us: i64, level: &str, level_no: u16, kind: Kind, message: String) -> Self {
        Record {
            ts_us,
            level: level.to_owned(),
            level_no,
            kind,
            logger: String::new(),
            message,
            module: String::new(),
            function: String::new(),
            line: 0,
            process: 0,
            thread: 0,
            exception: None,
            request_id: None,
            trace_id: None,
            span_id: None,
            fields_json: "{}".into(),
            http: None,
            size: 0,
        }
    }

    /// Replaces the extra fields (used by tests and by callers holding a JSON map).
    pub fn set_fields(&mut self, fields: &Map<String, Value>) {
        let mut out = Vec::with_capacity(64);
        crate::json_text::write_map(&mut out, fields);
        // Only whole strings and ASCII punctuation were written.
        self.fields_json = String::from_utf8(out)
            .unwrap_or_else(|_| "{}".into())
            .into_boxed_str();
    }

    /// The extra fields parsed back into a map.
    pub fn fields(&self) -> Map<String, Value> {
        serde_json::from_str(&self.fields_json).unwrap_or_default()
    }

    /// Applies the size cap to the free-text parts and computes `size`. Every constructor
    /// ends here, so every destination stores the same, already-sanitised record.
    pub fn finish(mut self, max_message_bytes: usize) -> Self {
        truncate_in_place(&mut self.message, max_message_bytes);
        if let Some(exc) = self.exception.as_mut() {
            truncate_in_place(exc, max_message_bytes);
        }
        // What the record really holds on the heap: the struct behind its Arc, plus each
        // string rounded up to the allocator's 16-byte size classes. Keeping this honest is
        // what keeps the queue's byte bound a bound on memory.
        let heap = |len: usize| if len == 0 { 0 } else { (len + 15) & !15 };
        let mut size = std::mem::size_of::<Record>()
            + 16
            + heap(self.level.len())
            + heap(self.logger.len())
            + heap(self.message.len())
            + heap(self.module.len())
            + heap(self.function.len())
            + heap(self.exception.as_ref().map_or(0, String::len))
            + heap(self.request_id.as_ref().map_or(0, String::len))
            + heap(self.trace_id.as_ref().map_or(0, String::len))
            + heap(self.span_id.as_ref().map_or(0, String::len))
            + heap(self.fields_json.len());
        if let Some(http) = self.http.as_ref() {
            size += std::mem::size_of::<HttpFields>()
                + http.path.len()
                + http.query.as_ref().map_or(0, String::len)
                + http.route.as_ref().map_or(0, String::len)
                + http.user_agent.as_ref().map_or(0, String::len)
                + json_size(&http.request_headers)
                + json_size(&http.response_headers)
                + http.request_body.as_ref().map_or(0, String::len)
                + http.response_body.as_ref().map_or(0, String::len);
        }
        self.size = size;
        self
    }
}

fn json_size(v: &Value) -> usize {
    match v {
        Value::Null | Value::Bool(_) | Value::Number(_) => 16,
        Value::String(s) => 24 + s.len(),
        Value::Array(a) => 24 + a.iter().map(json_size).sum::<usize>(),
        Value::Object(o) => {
            48 + o
                .iter()
                .map(|(k, v)| 24 + k.len() + json_size(v))
                .sum::<usize>()
        }
    }
}

/// Removes NUL characters, which PostgreSQL rejects in `text` and `jsonb`.
pub fn strip_nul(s: &mut String) {
    if memchr::memchr(0, s.as_bytes()).is_some() {
        s.retain(|c| c != '\0');
    }
}

/// Bytes as text: borrowed when they are valid UTF-8 (checked word at a time), invalid
/// sequences replaced otherwise. `String::from_utf8_lossy` checks byte by byte even when the
/// text is plain ASCII; this was a fifth of the middleware's redaction thread.
pub fn lossy(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// Decodes bytes as UTF-8, replacing invalid sequences, and strips NULs.
pub fn clean_bytes(bytes: &[u8]) -> String {
    let mut s = lossy(bytes).into_owned();
    strip_nul(&mut s);
    s
}

/// Cuts `s` to at most `max` bytes on a character boundary and appends a visible marker
/// with the original size, so a reader knows the text was cut and by how much.
pub fn truncate_in_place(s: &mut String, max: usize) {
    let original = s.len();
    truncate_from(s, max, original);
}

/// [`truncate_in_place`] for text decoded from only the start of a larger value: the
/// marker gives the value's size, `original`, not the decoded part's.
pub fn truncate_from(s: &mut String, max: usize, original: usize) {
    if s.len() <= max {
        return;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
    s.push_str(&format!("…[truncated, {original} bytes]"));
}

/// Cuts `s` to at most `max` bytes (on character boundaries) by leaving out its middle, with a marker saying how much:
/// a traceback keeps its start and its end (the exception's type and message).
pub fn cut_middle(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let original = s.len();
    let marker = |n: usize| format!("\n…[{n} bytes left out of {original}]…\n");
    let keep = max.saturating_sub(marker(original).len());
    if keep == 0 {
        truncate_in_place(s, max);
        return;
    }
    let mut head = keep / 2;
    while !s.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = original - (keep - keep / 2);
    while !s.is_char_boundary(tail) {
        tail += 1;
    }
    *s = format!("{}{}{}", &s[..head], marker(tail - head), &s[tail..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lossy_borrows_valid_text_and_replaces_invalid_sequences() {
        assert!(matches!(
            lossy(b"plain ascii text"),
            Cow::Borrowed("plain ascii text")
        ));
        assert!(matches!(lossy("é日".as_bytes()), Cow::Borrowed("é日")));
        assert_eq!(lossy(b"a\xffb\xc3"), "a\u{fffd}b\u{fffd}");
    }

    #[test]
    fn a_middle_cut_keeps_both_ends_and_says_how_much() {
        let mut s = format!("start {} ünïcödé end", "é".repeat(1000));
        let original = s.len();
        cut_middle(&mut s, 100);
        assert!(s.len() <= 100, "{s}");
        assert!(
            s.starts_with("start ") && s.ends_with(" ünïcödé end"),
            "{s}"
        );
        let marker = s.split('…').nth(1).unwrap_or_default();
        let left_out: usize = marker
            .strip_prefix('[')
            .and_then(|m| m.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_default();
        assert!(
            marker.ends_with(&format!("bytes left out of {original}]")),
            "{s}"
        );
        assert_eq!(
            original - left_out,
            s.len() - format!("\n…[{left_out} bytes left out of {original}]…\n").len()
        );
        // Short enough: untouched; too short for the marker: cut at the head, marked.
        let mut short = "abc".to_string();
        cut_middle(&mut short, 3);
        assert_eq!(short, "abc");
        let mut tiny = "x".repeat(500);
        cut_middle(&mut tiny, 10);
        assert!(tiny.starts_with("xxxxxxxxxx…[truncated, 500 bytes]"));
    }

    #[test]
    fn truncation_keeps_char_boundary_and_says_so() {
        let mut s = "héllo wörld".repeat(10);
        let original = s.len();
        truncate_in_place(&mut s, 10);
        assert!(s.starts_with("héllo w"));
        assert!(s.ends_with(&format!("…[truncated, {original} bytes]")));
        let mut emoji = "😀😀😀".to_string();
        truncate_in_place(&mut emoji, 5);
        assert!(emoji.starts_with("😀…[truncated"));
    }

    #[test]
    fn nul_and_invalid_utf8_are_cleaned() {
        assert_eq!(clean_bytes(b"a\0b\xffc"), "ab\u{fffd}c");
    }

    #[test]
    fn level_names_resolve() {
        assert_eq!(level_no("warn"), Some(30));
        assert_eq!(level_no("Error"), Some(40));
        assert_eq!(level_no("nope"), None);
    }

    #[test]
    fn finish_counts_size() {
        let r = Record::new(0, "INFO", 20, Kind::App, "x".repeat(1000)).finish(64);
        assert!(r.message.len() < 120);
        assert!(r.size > r.message.len());
    }
}
