//! Redaction of HTTP exchanges, fail-closed: sensitive header names, query and form keys,
//! JSON keys at any depth (also in truncated or broken JSON), and values that look like
//! card numbers, JWTs or bearer tokens anywhere in captured text.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::LazyLock;

use aho_corasick::{AhoCorasick, AhoCorasickKind};
use memchr::memmem::Finder;

pub const REDACTED: &str = "[REDACTED]";
const CARD: &str = "[REDACTED:card]";
const JWT: &str = "[REDACTED:jwt]";

/// Header names redacted by default (normalised: lower-case, letters and digits only).
pub const DEFAULT_HEADERS: &[&str] = &[
    "authorization",
    "cookie",
    "apikey",
    "token",
    "secret",
    "password",
    "passwd",
    "credential",
    "session",
    "signature",
    "csrf",
    "xsrf",
];

/// Query, form and JSON keys redacted by default.
pub const DEFAULT_KEYS: &[&str] = &[
    "password",
    "passwd",
    "pwd",
    "passphrase",
    "secret",
    "token",
    "apikey",
    "accesskey",
    "privatekey",
    "authorization",
    "credential",
    "session",
    "cookie",
    "signature",
    "sig",
    "otp",
    "pin",
    "ssn",
    "cvv",
    "cvc",
    "cardnumber",
    "creditcard",
];

/// Lower-cases and keeps only letters and digits, so `X-API-Key`, `api_key` and `apiKey`
/// are one name.
pub fn normalise(key: &str) -> String {
    key.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

/// A list of sensitive names. A rule of four characters or more matches any name that
/// contains it (after normalising); shorter rules (`pin`, `sig`) match whole names only.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    /// Whole-name rules (three characters or fewer).
    exact: Vec<String>,
    /// Substring rules, all searched for at once.
    within: Option<AhoCorasick>,
}

impl Rules {
    pub fn new<S: AsRef<str>>(rules: impl IntoIterator<Item = S>) -> Self {
        let mut v: Vec<String> = rules
            .into_iter()
            .map(|r| normalise(r.as_ref()))
            .filter(|r| !r.is_empty())
            .collect();
        v.sort();
        v.dedup();
        let (exact, within): (Vec<String>, Vec<String>) = v.into_iter().partition(|r| r.len() <= 3);
        // Keys are short: a prefilter would cost more to start than the DFA takes to run.
        let within = (!within.is_empty()).then(|| {
            AhoCorasick::builder()
                .kind(Some(AhoCorasickKind::DFA))
                .prefilter(false)
                .build(&within)
                .expect("a few short literal rules always build")
        });
        Rules { exact, within }
    }

    pub fn matches(&self, key: &str) -> bool {
        if self.exact.is_empty() && self.within.is_none() {
            return false;
        }
        // Short ASCII keys (nearly all) are normalised on the stack.
        let mut stack = [0u8; 96];
        let mut len = 0;
        if key.len() <= stack.len() && key.is_ascii() {
            for c in key.bytes().filter(u8::is_ascii_alphanumeric) {
                stack[len] = c.to_ascii_lowercase();
                len += 1;
            }
            // Only ASCII letters and digits were written.
            let n = std::str::from_utf8(&stack[..len]).unwrap_or_default();
            return self.matches_normalised(n);
        }
        self.matches_normalised(&normalise(key))
    }

    fn matches_normalised(&self, n: &str) -> bool {
        self.exact.iter().any(|r| r == n) || self.within.as_ref().is_some_and(|w| w.is_match(n))
    }
}

#[derive(Clone, Debug)]
pub struct Redactor {
    pub headers: Rules,
    pub query: Rules,
    pub body_keys: Rules,
    /// Card numbers, JWTs and bearer tokens scrubbed in any captured text.
    pub scrub_values: bool,
    /// Bodies of 401/403 exchanges are dropped unless this is set.
    pub capture_auth_failure_bodies: bool,
    pub max_body_bytes: usize,
    pub max_user_agent_bytes: usize,
    pub max_header_bytes: usize,
    /// Peers whose `X-Forwarded-For` is believed (exact addresses, or `*`).
    pub trusted_proxies: Vec<String>,
}

impl Default for Redactor {
    fn default() -> Self {
        Redactor {
            headers: Rules::new(DEFAULT_HEADERS),
            query: Rules::new(DEFAULT_KEYS),
            body_keys: Rules::new(DEFAULT_KEYS),
            scrub_values: true,
            capture_auth_failure_bodies: false,
            max_body_bytes: 64 << 10,
            max_user_agent_bytes: 512,
            max_header_bytes: 4096,
            trusted_proxies: Vec::new(),
        }
    }
}

impl Redactor {
    /// Card numbers, JWTs and bearer tokens replaced, control characters escaped.
    pub fn scrub<'a>(&self, text: &'a str) -> Cow<'a, str> {
        // Cheap scans (vectorised or memchr-based) say which scanners could match at all.
        let b = text.as_bytes();
        // Branch-free folds, so the compiler vectorises them.
        let controls = b.iter().fold(0u8, |acc, &c| {
            acc | u8::from(c < 0x20 && c != b'\t' && c != b'\n' && c != b'\r') | u8::from(c == 0x7f)
        }) != 0;
        let text = self.scrub_secrets(text);
        if !controls {
            return text;
        }
        match text {
            Cow::Borrowed(b) => escape_controls(b),
            Cow::Owned(o) => Cow::Owned(escape_controls(&o).into_owned()),
        }
    }

    /// Card numbers, JWTs and bearer tokens replaced (when `scrub_values` is set); control
    /// characters left as they are.
    #[inline]
    fn scrub_secrets<'a>(&self, text: &'a str) -> Cow<'a, str> {
        if self.scrub_values {
            let b = text.as_bytes();
            // Counted in u8 lanes per chunk (wide lanes would not vectorise well).
            let digits: usize = b
                .chunks(255)
                .map(|chunk| {
                    usize::from(
                        chunk
                            .iter()
                            .fold(0u8, |n, &c| n + u8::from(c.wrapping_sub(b'0') < 10)),
                    )
                })
                .sum();
            let credentials = b.len() >= 10 && has_auth_scheme(b);
            let passes: [Option<Scanner>; 3] = [
                has_jwt_start(b).then_some(scrub_jwt as fn(&str) -> Option<String>),
                credentials.then_some(scrub_credentials as Scanner),
                (digits >= 13).then_some(scrub_cards as Scanner),
            ];
            chain(text, &passes)
        } else {
            Cow::Borrowed(text)
        }
    }

    /// `a=1&password=x` -> `a=1&password=[REDACTED]`; values scrubbed too. What was
    /// percent-encoded stays encoded (`%00`), a raw control character is escaped (`\u0000`),
    /// so the two never read the same; a value that had a secret replaced is encoded afresh,
    /// its raw control characters as their escape (`%5Cu0000`).
    pub fn redact_urlencoded(&self, text: &str, rules: &Rules) -> String {
        let mut out = String::with_capacity(text.len());
        for (i, pair) in text.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            let (key, value) = match pair.find('=') {
                Some(p) => (&pair[..p], Some(&pair[p + 1..])),
                None => (pair, None),
            };
            let decoded_key = percent_decode(key);
            if rules.matches(&decoded_key) {
                out.push_str(key);
                out.push('=');
                out.push_str(REDACTED);
                continue;
            }
            match value {
                None => out.push_str(pair),
                Some(v) => {
                    // Raw control characters escaped before decoding: once decoded, a raw
                    // NUL and a `%00` would be the same character.
                    let escaped = escape_controls(v);
                    let decoded = percent_decode(&escaped);
                    match self.scrub_secrets(&decoded) {
                        // Nothing secret: kept as it came (the last scrub escapes raw controls).
                        Cow::Borrowed(_) => out.push_str(pair),
                        Cow::Owned(s) => {
                            out.push_str(key);
                            out.push('=');
                            percent_encode_into(&s, &mut out);
                        }
                    }
                }
            }
        }
        self.scrub(&out).into_owned()
    }

    /// Redacts the values of sensitive keys at any depth. Works token by token, so it
    /// also handles truncated or slightly broken JSON (bare keys, missing ends, Python's
    /// single-quoted dict syntax): what it cannot parse it still scrubs, it never stores a
    /// secret raw.
    pub fn redact_json(&self, text: &str) -> String {
        self.redact_keys(text, "\"")
    }

    /// [`Self::redact_json`] for text that is not JSON (plain text, YAML, logs): the same
    /// `key: value` pairs redacted, the replacement left unquoted.
    pub fn redact_key_values(&self, text: &str) -> String {
        self.redact_keys(text, "")
    }

    fn redact_keys(&self, text: &str, quote: &str) -> String {
        let b = text.as_bytes();
        // Built only once something is replaced: most bodies have nothing to redact, and
        // are then copied once, by the scrub's result.
        let mut out = String::new();
        let mut i = 0;
        let mut copied = 0;
        while i < b.len() {
            let c = b[i];
            let quoted = c == b'"' || (c == b'\'' && opens_value(b, i));
            let (end, inner) = if quoted {
                let end = string_end(b, i);
                let inner_end = if end > i + 1 && b[end - 1] == c {
                    end - 1
                } else {
                    end
                };
                (end, i + 1..inner_end)
            } else if is_word(c) {
                let mut end = i;
                while end < b.len() && is_word(b[end]) {
                    end += 1;
                }
                (end, i..end)
            } else {
                i += 1;
                continue;
            };
            let colon = skip_ws(b, end);
            if colon < b.len() && b[colon] == b':' && c != b'-' && !c.is_ascii_digit() {
                // Unescaped only when it is a key: a long string value is never copied.
                let key = if quoted {
                    unescape_lossy(&text[inner])
                } else {
                    Cow::Borrowed(&text[inner])
                };
                if self.body_keys.matches(&key) {
                    let value_start = skip_ws(b, colon + 1);
                    let value_end = value_end(b, value_start);
                    splice(&mut out, text, copied..value_start, quote, REDACTED);
                    copied = value_end;
                    i = value_end;
                    continue;
                }
            } else if self.scrub_values && !quoted {
                // A bare number that is a card number: replaced by a string so valid JSON
                // stays valid.
                let word = &text[i..end];
                if word.len() >= 13 && word.bytes().all(|d| d.is_ascii_digit()) && luhn(word) {
                    splice(&mut out, text, copied..i, quote, CARD);
                    copied = end;
                }
            }
            i = end.max(i + 1);
        }
        if copied == 0 {
            return self.scrub(text).into_owned();
        }
        out.push_str(&text[copied..]);
        if let Cow::Owned(scrubbed) = self.scrub(&out) {
            return scrubbed;
        }
        out
    }
}

/// Appends the unchanged `text[kept]` and `marker` in `quote`s to `out`, which is sized for
/// the whole text when the first replacement starts it.
fn splice(out: &mut String, text: &str, kept: std::ops::Range<usize>, quote: &str, marker: &str) {
    if out.capacity() == 0 {
        out.reserve(text.len());
    }
    out.push_str(&text[kept]);
    out.push_str(quote);
    out.push_str(marker);
    out.push_str(quote);
}

/// A value scanner: the text with its matches replaced, or `None` when nothing matched.
type Scanner = fn(&str) -> Option<String>;

fn chain<'a>(text: &'a str, passes: &[Option<Scanner>]) -> Cow<'a, str> {
    let mut cur: Cow<'a, str> = Cow::Borrowed(text);
    for pass in passes.iter().flatten() {
        if let Some(s) = pass(&cur) {
            cur = Cow::Owned(s);
        }
    }
    cur
}

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'$' | b'-' | b'.' | b'+')
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// A single quote where a JSON string could start (after `{ [ , :` or at the start):
/// Python's dict syntax. An apostrophe inside prose (`don't`) is not one.
fn opens_value(b: &[u8], i: usize) -> bool {
    let before = b[..i].iter().rev().find(|c| !c.is_ascii_whitespace());
    matches!(before, None | Some(b'{' | b'[' | b',' | b':'))
}

/// Index just past the closing quote of the string starting at `start` (or the end); the
/// quote is the one at `start`, `"` or `'`.
fn string_end(b: &[u8], start: usize) -> usize {
    let quote = b[start];
    let mut i = start + 1;
    while i < b.len() {
        match memchr::memchr2(quote, b'\\', &b[i..]) {
            Some(p) if b[i + p] == quote => return i + p + 1,
            Some(p) => i += p + 2,
            None => break,
        }
    }
    b.len()
}

/// End of the JSON value starting at `i`: a string, a whole object or array (or the end
/// of a truncated one), or a bare token up to the next separator.
fn value_end(b: &[u8], i: usize) -> usize {
    if i >= b.len() {
        return i;
    }
    match b[i] {
        b'"' => string_end(b, i),
        b'\'' if opens_value(b, i) => string_end(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = string_end(b, j);
                        continue;
                    }
                    b'\'' if opens_value(b, j) => {
                        j = string_end(b, j);
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return j + 1;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            b.len()
        }
        _ => {
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']' | b'\n' | b'\r') {
                j += 1;
            }
            // Keep trailing spaces before the separator outside the replacement.
            while j > i && b[j - 1].is_ascii_whitespace() {
                j -= 1;
            }
            j
        }
    }
}

/// Good enough to compare a key: `\uXXXX` and simple escapes decoded.
fn unescape_lossy(s: &str) -> Cow<'_, str> {
    if !s.contains('\\') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('u') => {
                let hex: String = chars.by_ref().take(4).collect();
                if let Some(ch) = u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                    out.push(ch);
                }
            }
            Some(other) => out.push(other),
            None => {}
        }
    }
    Cow::Owned(out)
}

pub fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains(['%', '+']) {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex_val(b[i + 1]), hex_val(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    Cow::Owned(crate::record::lossy(&out).into_owned())
}

fn hex_val(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

fn percent_encode_into(s: &str, out: &mut String) {
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'~' | b'[' | b']' | b':')
        {
            out.push(c as char);
        } else if c == b' ' {
            out.push('+');
        } else {
            let _ = write!(out, "%{c:02X}");
        }
    }
}

/// C0 controls (but tab, CR, LF) and DEL as `\u00XX`, so stored text is safe to print.
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    let bad = |c: char| (c < ' ' && !matches!(c, '\t' | '\n' | '\r')) || c == '\x7f';
    let bad_byte = |c: u8| (c < 0x20 && !matches!(c, b'\t' | b'\n' | b'\r')) || c == 0x7f;
    if !s.bytes().any(bad_byte) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if bad(c) {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

pub fn luhn(digits: &str) -> bool {
    let mut sum = 0u32;
    let mut n = 0;
    for (i, d) in digits
        .bytes()
        .rev()
        .filter(u8::is_ascii_digit)
        .map(|d| u32::from(d - b'0'))
        .enumerate()
    {
        n += 1;
        sum += if i % 2 == 1 {
            let x = d * 2;
            if x > 9 {
                x - 9
            } else {
                x
            }
        } else {
            d
        };
    }
    n > 0 && sum.is_multiple_of(10)
}

/// 13 to 19 digits, optionally grouped by single spaces or dashes, passing the Luhn check.
fn scrub_cards(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii_digit() || (i > 0 && b[i - 1].is_ascii_alphanumeric()) {
            i += 1;
            continue;
        }
        let start = i;
        let mut digits = 0;
        let mut end = i;
        let mut j = i;
        while j < b.len() {
            if b[j].is_ascii_digit() {
                digits += 1;
                j += 1;
                end = j;
            } else if matches!(b[j], b' ' | b'-') && j + 1 < b.len() && b[j + 1].is_ascii_digit() {
                j += 1;
            } else {
                break;
            }
        }
        let boundary = end >= b.len() || !b[end].is_ascii_alphanumeric();
        if (13..=19).contains(&digits) && boundary && luhn(&text[start..end]) {
            let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
            o.push_str(&text[copied..start]);
            o.push_str(CARD);
            copied = end;
        }
        i = end.max(i + 1);
    }
    out.map(|mut o| {
        o.push_str(&text[copied..]);
        o
    })
}

fn is_b64url(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'-'
}

/// Whether `eyJ` (the base64 of `{"`, how every JWT starts) occurs: a vectorised search
/// built once, not the standard library's byte-wise one.
fn has_jwt_start(b: &[u8]) -> bool {
    static JWT_START: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"eyJ"));
    JWT_START.find(b).is_some()
}

/// `eyJ...` header, `.`, payload, `.`, optional signature.
fn scrub_jwt(text: &str) -> Option<String> {
    if !has_jwt_start(text.as_bytes()) {
        return None;
    }
    let b = text.as_bytes();
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut from = 0;
    while let Some(p) = text[from..].find("eyJ").map(|p| p + from) {
        from = p + 3;
        if p > 0 && is_b64url(b[p - 1]) {
            continue;
        }
        let run = |mut k: usize| {
            let s = k;
            while k < b.len() && is_b64url(b[k]) {
                k += 1;
            }
            (k, k - s)
        };
        let (e1, n1) = run(p);
        if n1 < 10 || e1 >= b.len() || b[e1] != b'.' {
            continue;
        }
        let (e2, n2) = run(e1 + 1);
        if n2 < 10 || e2 >= b.len() || b[e2] != b'.' {
            continue;
        }
        let (e3, _) = run(e2 + 1);
        let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
        o.push_str(&text[copied..p]);
        o.push_str(JWT);
        copied = e3;
        from = e3;
    }
    out.map(|mut o| {
        o.push_str(&text[copied..]);
        o
    })
}

/// The authentication schemes whose credentials are scrubbed in captured text.
const SCHEMES: [&[u8]; 2] = [b"bearer", b"basic"];

/// Whether `bearer` or `basic` occurs in any letter case (the words are rare in text, so
/// this quick test spares the scanner).
fn has_auth_scheme(b: &[u8]) -> bool {
    memchr::memchr2_iter(b'b', b'B', b).any(|i| {
        SCHEMES
            .iter()
            .any(|w| b.len() >= i + w.len() && b[i..i + w.len()].eq_ignore_ascii_case(w))
    })
}

/// `user:password` in base64, as `Basic` sends it (padding optional).
fn is_basic_credential(token: &str) -> bool {
    use base64::engine::{general_purpose, DecodePaddingMode, Engine as _, GeneralPurpose};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        general_purpose::NO_PAD.with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let credential = |d: &[u8]| d.contains(&b':') && !d.iter().any(|&c| c < 0x20 || c == 0x7f);
    // Most tokens fit on the stack: no allocation for the words that follow "basic" in prose.
    let mut buf = [0u8; 384];
    match LENIENT.decode_slice(token, &mut buf) {
        Ok(n) => credential(&buf[..n]),
        Err(base64::DecodeSliceError::OutputSliceTooSmall) => {
            LENIENT.decode(token).is_ok_and(|d| credential(&d))
        }
        Err(_) => false,
    }
}

/// `Bearer <token>` (token of 8+ characters) and `Basic <base64 of user:password>`, the
/// scheme in any letter case: keeps the word, loses the credentials.
fn scrub_credentials(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut i = 0;
    while let Some(p) = memchr::memchr2(b'b', b'B', &b[i.min(b.len())..]) {
        i += p;
        let Some(word) = SCHEMES.iter().find(|w| {
            b.len() > i + w.len()
                && b[i..i + w.len()].eq_ignore_ascii_case(w)
                && (i == 0 || !b[i - 1].is_ascii_alphanumeric())
        }) else {
            i += 1;
            continue;
        };
        let mut j = i + word.len();
        let spaces = j;
        while j < b.len() && (b[j] == b' ' || b[j] == b'+') {
            j += 1;
        }
        if j == spaces {
            i = j;
            continue;
        }
        let t = j;
        let basic = word.len() == 5;
        while j < b.len()
            && (b[j].is_ascii_alphanumeric()
                || matches!(b[j], b'+' | b'/' | b'=')
                || (!basic && matches!(b[j], b'.' | b'_' | b'~' | b'-')))
        {
            j += 1;
        }
        let token = &text[t..j];
        let secret = if basic {
            // Eight characters or more: six bytes like `ab:cde`, not the word after "basic".
            token.len() >= 8 && is_basic_credential(token)
        } else {
            token.len() >= 8
        };
        if secret {
            let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
            o.push_str(&text[copied..t]);
            o.push_str(REDACTED);
            copied = j;
        }
        i = j.max(i + 1);
    }
    out.map(|mut o| {
        o.push_str(&text[copied..]);
        o
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r() -> Redactor {
        Redactor::default()
    }

    #[test]
    fn rules_normalise_and_short_rules_match_whole_names() {
        let rules = Rules::new(["api_key", "pin"]);
        assert!(rules.matches("X-API-Key"));
        assert!(rules.matches("apiKey"));
        assert!(rules.matches("PIN"));
        assert!(!rules.matches("shipping"));
        assert!(!rules.matches("name"));
        let h = Rules::new(DEFAULT_HEADERS);
        for name in [
            "authorization",
            "Proxy-Authorization",
            "cookie",
            "set-cookie",
            "x-api-key",
            "X_Api_Key",
            "x-auth-token",
        ] {
            assert!(h.matches(name), "{name}");
        }
        assert!(!h.matches("content-type"));
        assert!(!h.matches("user-agent"));
    }

    #[test]
    fn cards_are_scrubbed_only_when_luhn_valid() {
        let s = r();
        assert_eq!(
            s.scrub("card 4111 1111 1111 1111 ok"),
            "card [REDACTED:card] ok"
        );
        assert_eq!(s.scrub("4111-1111-1111-1111"), "[REDACTED:card]");
        assert_eq!(s.scrub("n=5500005555555559."), "n=[REDACTED:card].");
        // Not Luhn-valid, too short, or part of a longer token: kept.
        assert_eq!(s.scrub("4111111111111112"), "4111111111111112");
        assert_eq!(s.scrub("order 12345"), "order 12345");
        assert_eq!(s.scrub("id4111111111111111"), "id4111111111111111");
    }

    #[test]
    fn jwts_and_bearer_tokens_are_scrubbed() {
        let s = r();
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
        assert_eq!(s.scrub(&format!("t={jwt}&x=1")), "t=[REDACTED:jwt]&x=1");
        assert_eq!(
            s.scrub("Authorization: Bearer abcdefgh12345678 done"),
            "Authorization: Bearer [REDACTED] done"
        );
        assert_eq!(s.scrub("a bearer of news"), "a bearer of news");
        assert_eq!(
            s.scrub("auth=BeArEr abcdefgh12345678"),
            "auth=BeArEr [REDACTED]"
        );
        assert_eq!(
            s.scrub("curl -H 'authorization: bEARER abc.def-ghi_jkl'"),
            "curl -H 'authorization: bEARER [REDACTED]'"
        );
    }

    #[test]
    fn basic_credentials_are_scrubbed_and_plain_words_kept() {
        let s = r();
        // base64("ada:hunter2") with and without padding.
        assert_eq!(
            s.scrub("Authorization: Basic YWRhOmh1bnRlcjI= sent"),
            "Authorization: Basic [REDACTED] sent"
        );
        assert_eq!(s.scrub("BASIC YWRhOmh1bnRlcjI"), "BASIC [REDACTED]");
        assert_eq!(
            s.scrub("basic information about the basic plan"),
            "basic information about the basic plan"
        );
        // Valid base64 without a colon is not a credential.
        assert_eq!(s.scrub("basic aGVsbG8gd29ybGQ="), "basic aGVsbG8gd29ybGQ=");
    }

    #[test]
    fn controls_are_escaped() {
        assert_eq!(r().scrub("a\x1b[31mb\0c\td"), "a\\u001b[31mb\\u0000c\td");
    }

    #[test]
    fn json_keys_redacted_at_any_depth_and_any_type() {
        let s = r();
        let out = s.redact_json(
            r#"{"user":"ada","password":"hunter2","nested":{"api_key":123,"list":[{"Secret":{"a":1}}]},"token":null,"ok":true}"#,
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["user"], "ada");
        assert_eq!(v["password"], REDACTED);
        assert_eq!(v["nested"]["api_key"], REDACTED);
        assert_eq!(v["nested"]["list"][0]["Secret"], REDACTED);
        assert_eq!(v["token"], REDACTED);
        assert_eq!(v["ok"], true);
        assert!(!out.contains("hunter2"));
    }

    #[test]
    fn truncated_and_broken_json_is_still_redacted() {
        let s = r();
        let out = s.redact_json(r#"{"a": 1, "password": "hunter2", "b": {"token": "abc"#);
        assert!(!out.contains("hunter2") && !out.contains("abc"), "{out}");
        let out = s.redact_json(r#"{"password": "hun"#);
        assert!(!out.contains("hun\""), "{out}");
        assert!(!out.contains("hun"), "{out}");
        let out = s.redact_json("{password: hunter2, x: 1}");
        assert!(!out.contains("hunter2"), "{out}");
        assert!(out.contains("x: 1"));
    }

    #[test]
    fn json_card_numbers_stay_valid_json() {
        let out = r().redact_json(r#"{"n": 4111111111111111, "s": "4111 1111 1111 1111"}"#);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["n"], CARD);
        assert_eq!(v["s"], CARD);
    }

    #[test]
    fn urlencoded_encoded_and_raw_controls_stay_apart() {
        let s = r();
        let rules = Rules::new(DEFAULT_KEYS);
        assert_eq!(
            s.redact_urlencoded("a=%00&b=\0&c=%5Cu0000&d=%1B\x1b", &rules),
            "a=%00&b=\\u0000&c=%5Cu0000&d=%1B\\u001b"
        );
        // A value with a secret is encoded afresh: the two still differ.
        assert_eq!(
            s.redact_urlencoded("n=4111+1111+1111+1111%00\0", &rules),
            "n=[REDACTED:card]%00%5Cu0000"
        );
        // Keys too.
        assert_eq!(s.redact_urlencoded("%00=1&\0=2", &rules), "%00=1&\\u0000=2");
    }

    #[test]
    fn urlencoded_keys_and_values() {
        let s = r();
        let rules = Rules::new(DEFAULT_KEYS);
        assert_eq!(
            s.redact_urlencoded("a=1&Pass%77ord=x&api-key=y&b", &rules),
            "a=1&Pass%77ord=[REDACTED]&api-key=[REDACTED]&b"
        );
        assert_eq!(
            s.redact_urlencoded("c=4111+1111+1111+1111&d=2", &rules),
            "c=[REDACTED:card]&d=2"
        );
        assert_eq!(
            s.redact_urlencoded("pin=1234&spin=1", &rules),
            "pin=[REDACTED]&spin=1"
        );
    }
}
