//! The content policy: what of a captured body is stored. Text, JSON and form bodies as
//! (redacted) text; binary bodies as size and hash; multipart as part metadata, never file
//! bytes; compressed bodies decoded within the cap or stored as a marked summary.

use std::fmt::Write as _;
use std::io::Read;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::redact::{Redactor, REDACTED};
use crate::record::truncate_in_place;

/// What the policy made of one body.
#[derive(Debug, Default, PartialEq)]
pub struct Stored {
    pub text: Option<String>,
    /// A note for the record's `fields` (e.g. `"gzip decoded"`, `"binary"`).
    pub note: Option<&'static str>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Json,
    Form,
    Xml,
    Multipart,
    Text,
    Binary,
    Unknown,
}

fn classify(content_type: &str) -> Kind {
    let ct = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if ct.is_empty() {
        return Kind::Unknown;
    }
    if ct == "application/json" || ct.ends_with("+json") || ct.ends_with("/x-ndjson") {
        Kind::Json
    } else if ct == "application/x-www-form-urlencoded" {
        Kind::Form
    } else if ct.starts_with("multipart/") {
        Kind::Multipart
    } else if ct.ends_with("+xml") || ct.ends_with("/xml") {
        Kind::Xml
    } else if ct.starts_with("text/")
        || ct == "application/javascript"
        || ct == "application/graphql"
        || ct == "application/yaml"
    {
        Kind::Text
    } else {
        Kind::Binary
    }
}

fn looks_textual(b: &[u8]) -> bool {
    // A cut in the middle of a multi-byte character at the cap is still text.
    let valid = match std::str::from_utf8(b) {
        Ok(_) => true,
        Err(e) => e.error_len().is_none() && e.valid_up_to() + 4 > b.len(),
    };
    valid
        && !b
            .iter()
            .any(|&c| c < 0x20 && !matches!(c, b'\t' | b'\n' | b'\r'))
}

pub fn sha256_hex(b: &[u8]) -> String {
    let digest = Sha256::digest(b);
    let mut s = String::with_capacity(64);
    for byte in digest {
        let _ = write!(s, "{byte:02x}");
    }
    s
}

fn binary_summary(b: &[u8], full_size: u64) -> String {
    if b.len() as u64 >= full_size {
        format!("[binary body: {full_size} bytes, sha256 {}]", sha256_hex(b))
    } else {
        format!(
            "[binary body: {full_size} bytes, sha256 of the first {} bytes {}]",
            b.len(),
            sha256_hex(b)
        )
    }
}

/// Decodes one content coding (gzip, deflate, br, zstd) up to `cap` bytes of output;
/// `None` when it cannot.
fn decode_one(encoding: &str, b: &[u8], cap: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let limit = cap as u64 + 1;
    let read = |r: &mut dyn Read, out: &mut Vec<u8>| -> bool {
        // A truncated stream yields what it has, then an error: keep what came.
        let _ = r.take(limit).read_to_end(out);
        !out.is_empty()
    };
    let ok = match encoding {
        "gzip" | "x-gzip" => read(&mut flate2::read::GzDecoder::new(b), &mut out),
        "deflate" => {
            read(&mut flate2::read::ZlibDecoder::new(b), &mut out) || {
                out.clear();
                read(&mut flate2::read::DeflateDecoder::new(b), &mut out)
            }
        }
        "br" => read(&mut brotli::Decompressor::new(b, 4096), &mut out),
        "zstd" => match ruzstd::decoding::StreamingDecoder::new(b) {
            Ok(mut d) => read(&mut d, &mut out),
            Err(_) => false,
        },
        _ => false,
    };
    ok.then_some(out)
}

/// Undoes every coding of `Content-Encoding` (applied in the order listed, so undone in
/// reverse), each within the cap; `None` when one of them cannot be decoded.
fn decode(encoding: &str, b: &[u8], cap: usize) -> Option<Vec<u8>> {
    let codings: Vec<&str> = encoding
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty() && *c != "identity")
        .collect();
    if codings.is_empty() || codings.len() > 3 {
        return None;
    }
    let mut cur = decode_one(codings[codings.len() - 1], b, cap)?;
    for coding in codings.iter().rev().skip(1) {
        cur = decode_one(coding, &cur, cap)?;
    }
    Some(cur)
}

/// Applies the policy to one captured body. `full_size` is what went through (the
/// captured bytes may be fewer: cap or time limit).
pub fn store(
    r: &Redactor,
    content_type: &str,
    content_encoding: &str,
    captured: &[u8],
    full_size: u64,
) -> Stored {
    if captured.is_empty() && full_size == 0 {
        return Stored::default();
    }
    let cut = (captured.len() as u64) < full_size;
    let encoding = content_encoding.trim().to_ascii_lowercase();
    let mut note = None;
    let decoded;
    let body: &[u8] = if encoding.is_empty() || encoding == "identity" {
        captured
    } else {
        match decode(&encoding, captured, r.max_body_bytes) {
            Some(d) => {
                note = Some("decoded");
                decoded = d;
                &decoded
            }
            None => {
                return Stored {
                    text: Some(format!(
                        "[{} body: {full_size} bytes, not decoded]",
                        super::clean_token(&encoding)
                    )),
                    note: Some("encoded"),
                }
            }
        }
    };
    let over_cap = body.len() > r.max_body_bytes;
    let body = &body[..body.len().min(r.max_body_bytes)];
    let kind = match classify(content_type) {
        // Untyped text: XML by its declaration; JSON and forms are sniffed by `redact_text`.
        Kind::Unknown if looks_textual(body) => {
            if body.trim_ascii_start().starts_with(b"<?xml") {
                Kind::Xml
            } else {
                Kind::Text
            }
        }
        Kind::Unknown => Kind::Binary,
        k => k,
    };
    let truncated = cut || over_cap;
    let mut text = match kind {
        Kind::Binary => {
            return Stored {
                text: Some(binary_summary(body, full_size)),
                note: Some("binary"),
            }
        }
        Kind::Multipart => {
            return Stored {
                text: Some(multipart_summary(r, content_type, body, truncated)),
                note: Some("multipart"),
            }
        }
        Kind::Json => r.redact_json(&crate::record::lossy(body)),
        Kind::Form => r.redact_urlencoded(&crate::record::lossy(body), &r.body_keys),
        Kind::Xml => r
            .scrub(&super::xml::redact(
                &r.body_keys,
                &crate::record::lossy(body),
            ))
            .into_owned(),
        Kind::Text => redact_text(r, &crate::record::lossy(body)),
        Kind::Unknown => unreachable!(),
    };
    crate::record::strip_nul(&mut text);
    if truncated {
        // The marker says the body was cut and gives the full size.
        let _ = write!(text, "…[truncated, {full_size} bytes]");
    } else if text.len() > r.max_body_bytes + 1024 {
        truncate_in_place(&mut text, r.max_body_bytes);
    }
    Stored {
        text: Some(text),
        note,
    }
}

/// A body declared as plain text (or undeclared) is often JSON or a form all the same
/// (`sendBeacon`, CORS-simple `fetch`, clients that forget the header), and the app may
/// parse it as such: its sensitive keys are redacted whatever the declared type. The
/// key-by-key JSON pass also catches `key: value` lines of YAML and prose.
fn redact_text(r: &Redactor, text: &str) -> String {
    let start = text.trim_start();
    if start.starts_with('{') || start.starts_with('[') {
        r.redact_json(text)
    } else if looks_like_form(text) {
        r.redact_urlencoded(text, &r.body_keys)
    } else {
        r.redact_key_values(text)
    }
}

/// `a=1&b=2`: one line of `key=value` pairs.
fn looks_like_form(text: &str) -> bool {
    let text = text.trim_end();
    text.contains('=')
        && !text.bytes().any(|c| c.is_ascii_whitespace())
        && text
            .split('&')
            .all(|pair| pair.split_once('=').is_some_and(|(k, _)| !k.is_empty()))
}

fn boundary_of(content_type: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_owned())
    })
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || from >= hay.len() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

fn disposition_param(header: &str, name: &str) -> Option<String> {
    header.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().trim_matches('"').to_owned())
    })
}

/// A JSON summary of a multipart body: name, file name, content type and size of each
/// part; small non-file fields keep their (redacted) value; file bytes never.
fn multipart_summary(r: &Redactor, content_type: &str, body: &[u8], truncated: bool) -> String {
    let Some(boundary) = boundary_of(content_type) else {
        return format!("[multipart body: {} bytes, no boundary]", body.len());
    };
    let delim = format!("--{boundary}").into_bytes();
    let mut parts = Vec::new();
    let mut pos = match find(body, &delim, 0) {
        Some(p) => p + delim.len(),
        None => body.len(),
    };
    while pos < body.len() && parts.len() < 100 {
        if body[pos..].starts_with(b"--") {
            break;
        }
        let head_start = pos
            + if body[pos..].starts_with(b"\r\n") {
                2
            } else {
                0
            };
        let Some(head_end) = find(body, b"\r\n\r\n", head_start) else {
            break;
        };
        let head = crate::record::lossy(&body[head_start..head_end]);
        let content_start = head_end + 4;
        let next = find(body, &[b"\r\n".as_slice(), &delim].concat(), content_start);
        let content_end = next.unwrap_or(body.len());
        let mut name = None;
        let mut filename = None;
        let mut ctype = None;
        for line in head.split("\r\n") {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            if k.trim().eq_ignore_ascii_case("content-disposition") {
                name = disposition_param(v, "name");
                // RFC 6266/5987: `filename*=UTF-8''r%C3%A9sum%C3%A9.pdf` names a file too.
                filename = disposition_param(v, "filename").or_else(|| {
                    disposition_param(v, "filename*").map(|f| {
                        let encoded = f.splitn(3, '\'').nth(2).unwrap_or(&f);
                        super::redact::percent_decode(encoded).into_owned()
                    })
                });
            } else if k.trim().eq_ignore_ascii_case("content-type") {
                ctype = Some(v.trim().to_owned());
            }
        }
        let content = &body[content_start..content_end];
        let mut part = json!({
            "name": name.as_deref().map(|n| r.scrub(n).into_owned()),
            "size": content.len(),
        });
        if let Some(f) = &filename {
            part["filename"] = Value::from(r.scrub(f).into_owned());
        }
        if let Some(c) = &ctype {
            part["content_type"] = Value::from(r.scrub(c).into_owned());
        }
        if next.is_none() {
            part["truncated"] = Value::Bool(true);
        }
        if filename.is_none() && content.len() <= 1024 && looks_textual(content) {
            let value = if name.as_deref().is_some_and(|n| r.body_keys.matches(n)) {
                REDACTED.to_owned()
            } else {
                r.scrub(&crate::record::lossy(content)).into_owned()
            };
            part["value"] = Value::from(value);
        }
        parts.push(part);
        match next {
            Some(n) => pos = n + 2 + delim.len(),
            None => break,
        }
    }
    json!({"multipart": parts, "truncated": truncated}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn r() -> Redactor {
        Redactor {
            max_body_bytes: 64,
            ..Redactor::default()
        }
    }

    #[test]
    fn json_is_redacted_and_truncation_marked() {
        let body = br#"{"password":"x","a":"0123456789012345678901234567890123456789012345678901234567890"}"#;
        let s = store(&r(), "application/json", "", &body[..64], body.len() as u64);
        let text = s.text.unwrap();
        assert!(text.contains("[REDACTED]"));
        assert!(text.ends_with(&format!("…[truncated, {} bytes]", body.len())));
    }

    #[test]
    fn binary_is_size_and_hash() {
        let body = [0u8, 1, 2, 255, 254];
        let s = store(&r(), "application/octet-stream", "", &body, 5);
        assert_eq!(
            s.text.unwrap(),
            format!("[binary body: 5 bytes, sha256 {}]", sha256_hex(&body))
        );
        let s = store(&r(), "", "", &body, 5);
        assert_eq!(s.note, Some("binary"));
    }

    #[test]
    fn unknown_type_text_is_sniffed() {
        let s = store(&r(), "", "", br#"{"token": "abc"}"#, 16);
        assert_eq!(s.text.unwrap(), r#"{"token": "[REDACTED]"}"#);
    }

    #[test]
    fn sensitive_keys_are_redacted_whatever_the_declared_type() {
        let big = Redactor {
            max_body_bytes: 4096,
            ..Redactor::default()
        };
        let text =
            |ct: &str, body: &[u8]| store(&big, ct, "", body, body.len() as u64).text.unwrap();
        let cases: [(&str, &[u8], &str); 6] = [
            // What sendBeacon and CORS-simple fetch send, and the app parses as JSON.
            (
                "text/plain;charset=UTF-8",
                br#"{"user":"ada","password":"hunter2"}"#,
                r#"{"user":"ada","password":"[REDACTED]"}"#,
            ),
            (
                "text/json",
                br#"{"token": 1}"#,
                r#"{"token": "[REDACTED]"}"#,
            ),
            (
                "",
                b"user=ada&password=hunter2",
                "user=ada&password=[REDACTED]",
            ),
            (
                "text/plain",
                b"user=ada&passwd=hunter2\n",
                "user=ada&passwd=[REDACTED]",
            ),
            // A Python dict's repr sent as JSON: not JSON, still redacted.
            (
                "application/json",
                b"{'user': 'ada', 'password': 'hunter2'}",
                r#"{'user': 'ada', 'password': "[REDACTED]"}"#,
            ),
            (
                "text/plain",
                b"don't log it: password: hunter2\nuser: ada",
                "don't log it: password: [REDACTED]\nuser: ada",
            ),
        ];
        for (ct, body, want) in cases {
            assert_eq!(text(ct, body), want, "{ct}");
        }
    }

    #[test]
    fn a_part_named_with_filename_star_is_a_file() {
        let body = b"--b\r\nContent-Disposition: form-data; name=\"upload\"; filename*=UTF-8''r%C3%A9sum%C3%A9.txt\r\nContent-Type: text/plain\r\n\r\nprivate notes\r\n--b--\r\n";
        let big = Redactor {
            max_body_bytes: 4096,
            ..Redactor::default()
        };
        let s = store(
            &big,
            "multipart/form-data; boundary=b",
            "",
            body,
            body.len() as u64,
        );
        let v: Value = serde_json::from_str(&s.text.unwrap()).unwrap();
        let part = &v["multipart"][0];
        assert_eq!(part["filename"], "résumé.txt");
        assert_eq!(part["size"], 13);
        assert!(part.get("value").is_none(), "{part}");
    }

    #[test]
    fn gzip_is_decoded_within_cap_or_summarised() {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(br#"{"password":"hunter2","ok":1}"#).unwrap();
        let gz = enc.finish().unwrap();
        let s = store(&r(), "application/json", "gzip", &gz, gz.len() as u64);
        assert_eq!(s.text.unwrap(), r#"{"password":"[REDACTED]","ok":1}"#);
        assert_eq!(s.note, Some("decoded"));
        let s = store(&r(), "application/json", "br", b"\x01\x02", 2);
        assert_eq!(s.text.unwrap(), "[br body: 2 bytes, not decoded]");
    }

    fn brotli_bytes(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
            w.write_all(data).unwrap();
        }
        out
    }

    #[test]
    fn brotli_and_zstd_are_decoded_within_cap() {
        let json = br#"{"password":"hunter2","ok":1}"#;
        let br = brotli_bytes(json);
        let s = store(&r(), "application/json", "br", &br, br.len() as u64);
        assert_eq!(s.text.unwrap(), r#"{"password":"[REDACTED]","ok":1}"#);
        assert_eq!(s.note, Some("decoded"));
        let zst = ruzstd::encoding::compress_to_vec(
            &json[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        let s = store(&r(), "application/json", "ZSTD", &zst, zst.len() as u64);
        assert_eq!(s.text.unwrap(), r#"{"password":"[REDACTED]","ok":1}"#);
        // Larger than the cap once decoded: cut at the cap and marked.
        let big = vec![b'a'; 1000];
        for (enc, bytes) in [
            ("br", brotli_bytes(&big)),
            (
                "zstd",
                ruzstd::encoding::compress_to_vec(
                    &big[..],
                    ruzstd::encoding::CompressionLevel::Fastest,
                ),
            ),
        ] {
            let s = store(&r(), "text/plain", enc, &bytes, bytes.len() as u64);
            let text = s.text.unwrap();
            assert!(text.starts_with(&"a".repeat(64)), "{enc}: {text}");
            assert!(!text.starts_with(&"a".repeat(65)), "{enc}: {text}");
            assert!(text.contains("truncated"), "{enc}: {text}");
        }
        // Not a zstd frame: a marked summary, never raw bytes.
        let s = store(&r(), "application/json", "zstd", b"\x01\x02\x03\x04", 4);
        assert_eq!(s.text.unwrap(), "[zstd body: 4 bytes, not decoded]");
        // Stacked codings are undone in reverse order.
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&brotli_bytes(b"hello")).unwrap();
        let both = enc.finish().unwrap();
        let s = store(&r(), "text/plain", "br, gzip", &both, both.len() as u64);
        assert_eq!(s.text.unwrap(), "hello");
    }

    #[test]
    fn xml_bodies_are_redacted_and_broken_xml_not_stored_raw() {
        let body = br#"<login><user>ada</user><password>hunter2</password></login>"#;
        let s = store(
            &r(),
            "application/soap+xml; charset=utf-8",
            "",
            body,
            body.len() as u64,
        );
        assert_eq!(
            s.text.unwrap(),
            "<login><user>ada</user><password>[REDACTED]</password></login>"
        );
        let body = br#"<?xml version="1.0"?><a token="t0k"/>"#;
        let s = store(&r(), "", "", body, body.len() as u64);
        assert_eq!(
            s.text.unwrap(),
            r#"<?xml version="1.0"?><a token="[REDACTED]"/>"#
        );
        let cut = br#"<a><b>1</b><c secret="hunter2"#;
        let s = store(&r(), "text/xml", "", cut, 200);
        let text = s.text.unwrap();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.ends_with("…[truncated, 200 bytes]"), "{text}");
    }

    #[test]
    fn multipart_keeps_metadata_not_file_bytes() {
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nhello\r\n--XyZ\r\nContent-Disposition: form-data; name=\"password\"\r\n\r\nhunter2\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\nPNGDATA-SECRET\r\n--XyZ--\r\n";
        let r = Redactor::default();
        let s = store(
            &r,
            "multipart/form-data; boundary=XyZ",
            "",
            body,
            body.len() as u64,
        );
        let text = s.text.unwrap();
        assert!(
            !text.contains("PNGDATA") && !text.contains("hunter2"),
            "{text}"
        );
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["multipart"][0]["value"], "hello");
        assert_eq!(v["multipart"][1]["value"], REDACTED);
        assert_eq!(v["multipart"][2]["filename"], "a.png");
        assert_eq!(v["multipart"][2]["size"], 14);
        assert_eq!(v["multipart"][2]["content_type"], "image/png");
    }

    #[test]
    fn form_is_redacted() {
        let s = store(
            &r(),
            "application/x-www-form-urlencoded",
            "",
            b"user=ada&password=x",
            19,
        );
        assert_eq!(s.text.unwrap(), "user=ada&password=[REDACTED]");
    }
}
