//! Redaction of XML bodies: elements and attributes whose names match the body-key rules
//! (the same normalised-substring rules as JSON keys) lose their content or value.
//! Fail-closed: from the first point the tokenizer cannot read on (broken or truncated
//! markup), nothing more of the body is stored.

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use super::redact::{Rules, REDACTED};

/// Attributes that name the element they sit on (`<param name="password" value="x"/>`,
/// `<entry key="token">x</entry>`): when their value is sensitive, so is the element.
const NAMING_ATTRIBUTES: &[&[u8]] = &[b"name", b"key", b"id"];

/// What stands in for the rest of a body the tokenizer could not read.
pub fn unreadable_marker(skipped: usize) -> String {
    format!("[REDACTED: unreadable XML, {skipped} bytes not stored]")
}

fn local(name: &[u8]) -> &[u8] {
    match memchr::memrchr(b':', name) {
        Some(p) => &name[p + 1..],
        None => name,
    }
}

fn sensitive_name(rules: &Rules, name: &[u8]) -> bool {
    let name = crate::record::lossy(name);
    rules.matches(&name) || rules.matches(&crate::record::lossy(local(name.as_bytes())))
}

/// Whether the element's own name, or the value of a naming attribute, is sensitive.
fn sensitive_element(rules: &Rules, e: &BytesStart<'_>) -> bool {
    if sensitive_name(rules, e.name().as_ref()) {
        return true;
    }
    e.attributes().with_checks(false).flatten().any(|a| {
        NAMING_ATTRIBUTES.contains(&local(a.key.as_ref()))
            && rules.matches(&crate::record::lossy(&a.value))
    })
}

/// The tag with sensitive attribute values replaced; `None` when nothing changes (the
/// original bytes are kept) or when the attributes cannot be read (`Err`).
fn rewrite_tag(
    rules: &Rules,
    e: &BytesStart<'_>,
    element_sensitive: bool,
    empty: bool,
) -> Result<Option<String>, ()> {
    let mut changed = false;
    let mut out = String::with_capacity(e.len() + 16);
    out.push('<');
    out.push_str(&crate::record::lossy(e.name().as_ref()));
    for a in e.attributes().with_checks(false) {
        let a = a.map_err(|_| ())?;
        let key = crate::record::lossy(a.key.as_ref());
        let hide = sensitive_name(rules, a.key.as_ref())
            || (element_sensitive && local(a.key.as_ref()) == b"value");
        out.push(' ');
        out.push_str(&key);
        out.push_str("=\"");
        if hide {
            changed = true;
            out.push_str(REDACTED);
        } else {
            out.push_str(&crate::record::lossy(&a.value).replace('"', "&quot;"));
        }
        out.push('"');
    }
    out.push_str(if empty { "/>" } else { ">" });
    Ok(changed.then_some(out))
}

/// Redacts one XML document (or the captured start of one). The result still has to go
/// through `Redactor::scrub` for values that look like cards, JWTs or tokens.
pub fn redact(rules: &Rules, text: &str) -> String {
    let mut reader = Reader::from_str(text);
    let mut out = String::with_capacity(text.len());
    // Depth inside an element whose content is being replaced (0: not inside one).
    let mut hidden_depth = 0usize;
    loop {
        let start = reader.buffer_position() as usize;
        let event = reader.read_event();
        let end = (reader.buffer_position() as usize).min(text.len());
        let raw = text.get(start..end);
        let (event, raw) = match (event, raw) {
            (Ok(Event::Eof), _) => break,
            (Ok(ev), Some(raw)) => (ev, raw),
            _ => {
                out.push_str(&unreadable_marker(text.len().saturating_sub(start)));
                break;
            }
        };
        match event {
            Event::Start(_) if hidden_depth > 0 => hidden_depth += 1,
            Event::End(_) if hidden_depth > 1 => hidden_depth -= 1,
            Event::End(_) if hidden_depth == 1 => {
                hidden_depth = 0;
                out.push_str(REDACTED);
                out.push_str(raw);
            }
            _ if hidden_depth > 0 => {}
            Event::Start(e) | Event::Empty(e) => {
                let empty = raw.ends_with("/>");
                let element_sensitive = sensitive_element(rules, &e);
                match rewrite_tag(rules, &e, element_sensitive, empty) {
                    Ok(Some(tag)) => out.push_str(&tag),
                    Ok(None) => out.push_str(raw),
                    Err(()) => {
                        out.push_str(&unreadable_marker(text.len().saturating_sub(start)));
                        break;
                    }
                }
                if element_sensitive && !empty {
                    hidden_depth = 1;
                }
            }
            _ => out.push_str(raw),
        }
    }
    if hidden_depth > 0 {
        // The body ended inside a sensitive element: its content is not stored.
        out.push_str(REDACTED);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::redact::DEFAULT_KEYS;

    fn redact_default(text: &str) -> String {
        redact(&Rules::new(DEFAULT_KEYS), text)
    }

    #[test]
    fn elements_and_attributes_by_normalised_name() {
        let out = redact_default(
            r#"<?xml version="1.0"?><login user="ada" api-key="k1"><Password>hunter2</Password><auth:access_token><v>t0k</v></auth:access_token><note>hi &amp; bye</note><pin>1234</pin><spin>ok</spin></login>"#,
        );
        assert_eq!(
            out,
            r#"<?xml version="1.0"?><login user="ada" api-key="[REDACTED]"><Password>[REDACTED]</Password><auth:access_token>[REDACTED]</auth:access_token><note>hi &amp; bye</note><pin>[REDACTED]</pin><spin>ok</spin></login>"#
        );
    }

    #[test]
    fn cdata_comments_and_naming_attributes() {
        let out = redact_default(
            r#"<a><secret><![CDATA[s3cr3t]]></secret><!-- c --><param name="password" value="hunter2"/><entry key="token">t0k</entry><entry key="colour">red</entry></a>"#,
        );
        assert!(
            !out.contains("s3cr3t") && !out.contains("hunter2") && !out.contains("t0k"),
            "{out}"
        );
        assert!(
            out.contains(r#"<param name="password" value="[REDACTED]"/>"#),
            "{out}"
        );
        assert!(out.contains(r#"<entry key="colour">red</entry>"#), "{out}");
        assert!(out.contains("<!-- c -->"), "{out}");
    }

    #[test]
    fn truncated_or_broken_xml_is_not_stored_raw() {
        let out = redact_default("<a><password>hunter2");
        assert!(!out.contains("hunter2"), "{out}");
        let out = redact_default(r#"<a><user pass="hunter2"#);
        assert!(!out.contains("hunter2"), "{out}");
        assert!(
            out.starts_with("<a>") && out.contains("unreadable XML"),
            "{out}"
        );
        let out = redact_default("<a><b>x</c><password>hunter2</password></a>");
        assert!(!out.contains("hunter2"), "{out}");
        assert!(out.contains("unreadable XML"), "{out}");
    }

    #[test]
    fn entities_are_not_expanded() {
        let out =
            redact_default(r#"<!DOCTYPE a [<!ENTITY e "x">]><a><token>&e;</token><b>&e;</b></a>"#);
        assert!(
            out.ends_with("<a><token>[REDACTED]</token><b>&e;</b></a>"),
            "{out}"
        );
    }
}
