//! JSON text written straight into a byte buffer: strings escaped eight bytes at a time, and
//! `serde_json` values written with that escaping. The output is byte for byte what
//! `serde_json::to_writer` writes (the tests compare them).
//!
//! Why not serde_json's own writer: it looks every byte of a string up in a table, one at a
//! time, and the bodies of HTTP exchanges (a JSON body is a string full of quotes) are most
//! of the bytes a pipeline writes. In the middleware benchmark its escaping was two thirds
//! of the LocalFiles writer's thread (about 24,000 instructions per request of 1 KB in and
//! out); eight bytes at a time it is a few thousand.

use serde_json::{Map, Value};

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Whether any of the eight bytes of `w` is a control character (below 0x20), `"` or `\`:
/// the bytes JSON requires escaped. Exact for every byte (no false positives): the
/// "less than" test is made on bytes whose high bit was cleared, and high-bit bytes (parts
/// of non-ASCII characters) are masked out of all three tests.
#[inline]
fn needs_escape(w: u64) -> bool {
    let ascii = !w & HIGHS;
    let low7 = w & !HIGHS;
    // A byte below 0x20: (b + 0x60) keeps its high bit clear only when b < 0x20.
    let control = !(low7 + ONES * 0x60) & HIGHS;
    let quote = has_zero(w ^ (ONES * b'"' as u64));
    let backslash = has_zero(w ^ (ONES * b'\\' as u64));
    (control | quote | backslash) & ascii != 0
}

/// High bit set in each byte lane of `v` that is zero, exactly (no carries between lanes).
#[inline]
fn has_zero(v: u64) -> u64 {
    let low7 = v & !HIGHS;
    !((low7 + !HIGHS) | v) & HIGHS
}

/// The escape serde_json writes for a byte that needs one.
fn escape_byte(out: &mut Vec<u8>, b: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    match b {
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        b'\n' => out.extend_from_slice(b"\\n"),
        b'\r' => out.extend_from_slice(b"\\r"),
        b'\t' => out.extend_from_slice(b"\\t"),
        0x08 => out.extend_from_slice(b"\\b"),
        0x0c => out.extend_from_slice(b"\\f"),
        _ => out.extend_from_slice(&[
            b'\\',
            b'u',
            b'0',
            b'0',
            HEX[usize::from(b >> 4)],
            HEX[usize::from(b & 0xf)],
        ]),
    }
}

fn is_escaped(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Appends `s` as a quoted JSON string.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    out.reserve(b.len() + 2);
    out.push(b'"');
    let mut run = 0;
    let mut i = 0;
    while i < b.len() {
        if let Some(chunk) = b.get(i..i + 8) {
            let w = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
            if !needs_escape(w) {
                i += 8;
                continue;
            }
        }
        // A word with something to escape (or the last few bytes): byte by byte to its end.
        let end = (i + 8).min(b.len());
        while i < end {
            if is_escaped(b[i]) {
                out.extend_from_slice(&b[run..i]);
                escape_byte(out, b[i]);
                run = i + 1;
            }
            i += 1;
        }
    }
    out.extend_from_slice(&b[run..]);
    out.push(b'"');
}

/// Appends `v` as compact JSON, as `serde_json::to_writer` would.
pub fn write_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        // Numbers are rare in records and serde_json formats them exactly; writing into a
        // Vec cannot fail.
        Value::Number(_) => {
            let _ = serde_json::to_writer(&mut *out, v);
        }
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => write_map(out, map),
    }
}

/// Appends `map` as a compact JSON object.
pub fn write_map(out: &mut Vec<u8>, map: &Map<String, Value>) {
    out.push(b'{');
    for (i, (k, item)) in map.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, k);
        out.push(b':');
        write_value(out, item);
    }
    out.push(b'}');
}

/// `s` as a quoted JSON string.
pub fn quoted(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len() + 2);
    write_str(&mut out, s);
    // Only whole characters of `s` and ASCII escapes were written.
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serde(v: &Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        // Every ASCII byte and some non-ASCII characters, at every offset within a word.
        let mut samples: Vec<String> = (0u8..128).map(|b| (b as char).to_string()).collect();
        samples.extend(["é", "日本語", "😀", "\u{7f}", "\u{2028}", ""].map(String::from));
        for s in samples.clone() {
            for pad in 0..17 {
                for tail in [0, 3, 9] {
                    let text = format!("{}{s}{}", "a".repeat(pad), "é".repeat(tail));
                    let v = Value::String(text.clone());
                    let mut ours = Vec::new();
                    write_str(&mut ours, &text);
                    assert_eq!(ours, serde(&v), "{text:?}");
                }
            }
        }
        // Words mixing high bytes with escapes: a high byte must not hide or fake one.
        for a in ["\u{80}", "\u{ff}", "ÿ", "\u{1}", "\"", "\\", "x"] {
            for b in ["\u{a0}", "\u{1f}", "\"", "\\", "ÿ", "y"] {
                let text = format!("{a}{b}{a}{a}{b}{b}{a}{b}{a}");
                let mut ours = Vec::new();
                write_str(&mut ours, &text);
                assert_eq!(ours, serde(&Value::String(text.clone())), "{text:?}");
            }
        }
    }

    #[test]
    fn values_are_written_as_serde_json_writes_them() {
        let v = serde_json::json!({
            "b": [1, -2, 3.5, 1e300, null, true, false, "x\"y\n"],
            "a": {"nested": {"k\u{1}": "v\\", "": []}},
            "n": u64::MAX,
            "h": {"content-type": "application/json", "x": "é\t"},
        });
        let mut ours = Vec::new();
        write_value(&mut ours, &v);
        assert_eq!(ours, serde(&v));
        assert_eq!(quoted("a\"b"), serde_json::to_string("a\"b").unwrap());
    }
}
