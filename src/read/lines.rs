//! One NDJSON line against a filter: the per-record work every scanner shares (LocalFiles
//! and Azure Blob read the same encoder output). Cheap checks on the raw bytes come first
//! (the time at the start of the line, the text needle), the JSON is parsed only when they
//! pass.

use memchr::memmem;
use serde_json::{Map, Value};

use super::files::parse_ts;
use super::filter::Filter;
use super::ts_of;

/// The `ts` at the start of an encoder-written line, without parsing the JSON.
pub fn line_ts(line: &[u8]) -> Option<i64> {
    let rest = line.strip_prefix(b"{\"ts\":\"")?;
    let s = std::str::from_utf8(rest.get(..27)?).ok()?;
    parse_ts(s)
}

/// A lower-case needle that can be looked for in the raw line: JSON escapes only quotes,
/// backslashes and control characters, so an ASCII needle without them appears verbatim
/// (up to ASCII case) in the line iff it may appear in some string of the record.
pub fn raw_needle(text: &str) -> Option<Vec<u8>> {
    (text.is_ascii() && !text.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20))
        .then(|| text.as_bytes().to_vec())
}

/// A scanner's record id, `{file or blob name}:{byte offset}`: the name and offset when
/// the id has that shape and names an NDJSON file (each store adds its own name rules).
pub fn parse_record_id(id: &str) -> Option<(&str, u64)> {
    let (name, offset) = id.rsplit_once(':')?;
    let offset = offset.parse::<u64>().ok()?;
    let ok = !name.is_empty()
        && !name.contains(['\\', '\0'])
        && (name.ends_with(".ndjson") || name.ends_with(".ndjson.gz"));
    ok.then_some((name, offset))
}

pub struct LineMatcher<'f> {
    filter: &'f Filter,
    lo: i64,
    hi: i64,
    finder: Option<memmem::Finder<'static>>,
    lower: Vec<u8>,
}

impl<'f> LineMatcher<'f> {
    /// Matches records of `filter` with `lo <= ts <= hi`.
    pub fn new(filter: &'f Filter, (lo, hi): (i64, i64)) -> Self {
        let finder = filter
            .text
            .as_deref()
            .and_then(raw_needle)
            .map(|n| memmem::Finder::new(&n).into_owned());
        LineMatcher {
            filter,
            lo,
            hi,
            finder,
            lower: Vec::new(),
        }
    }

    /// The record on one complete line, with its time, when it is in range and passes
    /// every condition; None otherwise (bad JSON included: it is skipped, not an error).
    pub fn check(&mut self, line: &[u8]) -> Option<(i64, Map<String, Value>)> {
        if let Some(ts) = line_ts(line) {
            if ts < self.lo || ts > self.hi {
                return None;
            }
        }
        if let Some(finder) = &self.finder {
            self.lower.clear();
            self.lower.extend(line.iter().map(u8::to_ascii_lowercase));
            finder.find(&self.lower)?;
        }
        let rec = serde_json::from_slice::<Map<String, Value>>(line).ok()?;
        let ts = ts_of(&rec);
        if ts < self.lo || ts > self.hi || !self.filter.matches(&rec) {
            return None;
        }
        Some((ts, rec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn range_text_and_filter() {
        let f = Filter::parse(json!({"text": "BOOM", "kind": "app"}).as_object().unwrap()).unwrap();
        let lo = 1_700_000_000_000_000;
        let mut m = LineMatcher::new(&f, (lo, lo + 10));
        let line = |ts: &str, msg: &str, kind: &str| {
            format!("{{\"ts\":\"{ts}\",\"kind\":\"{kind}\",\"message\":\"{msg}\"}}\n")
        };
        let inside = "2023-11-14T22:13:20.000005Z";
        assert_eq!(
            m.check(line(inside, "a Boom", "app").as_bytes()).unwrap().0,
            lo + 5
        );
        assert!(m.check(line(inside, "quiet", "app").as_bytes()).is_none());
        assert!(m.check(line(inside, "boom", "http").as_bytes()).is_none());
        assert!(m
            .check(line("2023-11-14T22:13:21.000000Z", "boom", "app").as_bytes())
            .is_none());
        assert!(m.check(b"{not json boom\n").is_none());
        assert!(raw_needle("boom").is_some());
        assert!(raw_needle("a\"b").is_none());
        assert!(raw_needle("h\u{e9}llo").is_none());
    }
}
