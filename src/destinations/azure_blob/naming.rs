//! Blob names: a template with time-partition tokens, collision-free across hosts,
//! processes and restarts through `{host}`, `{pid}`, `{start}` and `{seq}`.

use chrono::{DateTime, Datelike, Timelike, Utc};

use crate::record::Kind;

pub const DEFAULT_TEMPLATE: &str =
    "{prefix}{kind}/{yyyy}/{mm}/{dd}/{HH}/{host}-{pid}-{start}-{seq}{ext}";

/// Tokens that together make a name unique; a template must contain all of them.
const REQUIRED: [&str; 4] = ["host", "pid", "start", "seq"];

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Lit(String),
    Prefix,
    Kind,
    Year,
    Month,
    Day,
    Hour,
    Minute,
    Host,
    Pid,
    Start,
    Seq,
    Ext,
}

/// The finest time token of a template: a blob holds records of one such period only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Granularity {
    None,
    Year,
    Month,
    Day,
    Hour,
    Minute,
}

#[derive(Clone, Debug)]
pub struct Template {
    pieces: Vec<Piece>,
    pub granularity: Granularity,
    pub by_kind: bool,
}

/// What stays the same for every blob one writer names.
#[derive(Clone, Debug)]
pub struct Identity {
    pub prefix: String,
    pub host: String,
    pub pid: u32,
    pub start: String,
    pub ext: &'static str,
}

impl Template {
    pub fn parse(s: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut rest = s;
        while let Some(open) = rest.find(['{', '}']) {
            if rest.as_bytes()[open] == b'}' {
                return Err(format!("name_template: unmatched '}}' in {s:?}"));
            }
            lit.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("name_template: unclosed '{{' in {s:?}"))?;
            let token = &after[..close];
            let piece = match token {
                "prefix" => Piece::Prefix,
                "kind" => Piece::Kind,
                "yyyy" => Piece::Year,
                "mm" => Piece::Month,
                "dd" => Piece::Day,
                "HH" => Piece::Hour,
                "MM" => Piece::Minute,
                "host" => Piece::Host,
                "pid" => Piece::Pid,
                "start" => Piece::Start,
                "seq" => Piece::Seq,
                "ext" => Piece::Ext,
                other => {
                    return Err(format!(
                        "name_template: unknown token {{{other}}}; known: {{prefix}} {{kind}} \
                         {{yyyy}} {{mm}} {{dd}} {{HH}} {{MM}} {{host}} {{pid}} {{start}} {{seq}} {{ext}}"
                    ))
                }
            };
            if !lit.is_empty() {
                pieces.push(Piece::Lit(std::mem::take(&mut lit)));
            }
            pieces.push(piece);
            rest = &after[close + 1..];
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            pieces.push(Piece::Lit(lit));
        }
        for token in REQUIRED {
            if !s.contains(&format!("{{{token}}}")) {
                return Err(format!(
                    "name_template must contain {{host}}, {{pid}}, {{start}} and {{seq}} so names \
                     never collide; {{{token}}} is missing"
                ));
            }
        }
        if s.starts_with('/') {
            return Err("name_template must not start with '/'".into());
        }
        check_readable(&pieces)?;
        let has = |p: Piece| pieces.contains(&p);
        let granularity = if has(Piece::Minute) {
            Granularity::Minute
        } else if has(Piece::Hour) {
            Granularity::Hour
        } else if has(Piece::Day) {
            Granularity::Day
        } else if has(Piece::Month) {
            Granularity::Month
        } else if has(Piece::Year) {
            Granularity::Year
        } else {
            Granularity::None
        };
        let by_kind = has(Piece::Kind);
        Ok(Template {
            pieces,
            granularity,
            by_kind,
        })
    }

    /// Records with the same bucket (and kind, if the template names it) share a blob.
    pub fn bucket(&self, ts_us: i64) -> i64 {
        const MIN: i64 = 60_000_000;
        match self.granularity {
            Granularity::None => 0,
            Granularity::Minute => ts_us.div_euclid(MIN),
            Granularity::Hour => ts_us.div_euclid(60 * MIN),
            Granularity::Day => ts_us.div_euclid(24 * 60 * MIN),
            Granularity::Month | Granularity::Year => {
                let dt = to_datetime(ts_us);
                let month = if self.granularity == Granularity::Month {
                    dt.month0() as i64
                } else {
                    0
                };
                dt.year() as i64 * 12 + month
            }
        }
    }

    pub fn render(&self, id: &Identity, kind: Kind, ts_us: i64, seq: u64) -> String {
        use std::fmt::Write;
        let dt = to_datetime(ts_us);
        let mut out = String::with_capacity(96);
        for p in &self.pieces {
            let _ = match p {
                Piece::Lit(s) => write!(out, "{s}"),
                Piece::Prefix => write!(out, "{}", id.prefix),
                Piece::Kind => write!(out, "{}", kind.as_str()),
                Piece::Year => write!(out, "{:04}", dt.year()),
                Piece::Month => write!(out, "{:02}", dt.month()),
                Piece::Day => write!(out, "{:02}", dt.day()),
                Piece::Hour => write!(out, "{:02}", dt.hour()),
                Piece::Minute => write!(out, "{:02}", dt.minute()),
                Piece::Host => write!(out, "{}", id.host),
                Piece::Pid => write!(out, "{}", id.pid),
                Piece::Start => write!(out, "{}", id.start),
                Piece::Seq => write!(out, "{seq:06}"),
                Piece::Ext => write!(out, "{}", id.ext),
            };
        }
        out
    }
}

impl Template {
    /// The start and end (exclusive, microseconds) of the time partition holding `ts_us`.
    pub fn bucket_range(&self, ts_us: i64) -> (i64, i64) {
        const MIN: i64 = 60_000_000;
        let step = |w: i64| {
            let s = ts_us.div_euclid(w) * w;
            (s, s + w)
        };
        let month_start = |y: i32, m: u32| {
            chrono::NaiveDate::from_ymd_opt(y, m, 1)
                .and_then(|d| d.and_hms_opt(0, 0, 0))
                .map_or(i64::MAX, |d| d.and_utc().timestamp_micros())
        };
        match self.granularity {
            Granularity::None => (i64::MIN, i64::MAX),
            Granularity::Minute => step(MIN),
            Granularity::Hour => step(60 * MIN),
            Granularity::Day => step(24 * 60 * MIN),
            Granularity::Month => {
                let dt = to_datetime(ts_us);
                let (y, m) = (dt.year(), dt.month());
                let next = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                (month_start(y, m), month_start(next.0, next.1))
            }
            Granularity::Year => {
                let y = to_datetime(ts_us).year();
                (month_start(y, 1), month_start(y + 1, 1))
            }
        }
    }

    /// The name prefix shared by every blob of `kind` in the partition of `ts_us`: the
    /// template rendered up to its first per-writer token. `exact` says whether every time
    /// token of the partition is in it (then the prefix lists that partition only).
    pub fn list_prefix(&self, prefix: &str, kind: Kind, ts_us: i64) -> (String, bool) {
        use std::fmt::Write;
        let dt = to_datetime(ts_us);
        let mut out = String::with_capacity(64);
        let mut finest = Granularity::None;
        for p in &self.pieces {
            let _ = match p {
                Piece::Lit(s) => write!(out, "{s}"),
                Piece::Prefix => write!(out, "{prefix}"),
                Piece::Kind => write!(out, "{}", kind.as_str()),
                Piece::Year => {
                    finest = finest.max(Granularity::Year);
                    write!(out, "{:04}", dt.year())
                }
                Piece::Month => {
                    finest = finest.max(Granularity::Month);
                    write!(out, "{:02}", dt.month())
                }
                Piece::Day => {
                    finest = finest.max(Granularity::Day);
                    write!(out, "{:02}", dt.day())
                }
                Piece::Hour => {
                    finest = finest.max(Granularity::Hour);
                    write!(out, "{:02}", dt.hour())
                }
                Piece::Minute => {
                    finest = finest.max(Granularity::Minute);
                    write!(out, "{:02}", dt.minute())
                }
                Piece::Host | Piece::Pid | Piece::Start | Piece::Seq | Piece::Ext => break,
            };
        }
        (out, finest == self.granularity)
    }
}

fn to_datetime(ts_us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(ts_us).unwrap_or_default()
}

/// The host name, reduced to characters safe in a blob name.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let raw = if rc == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    sanitize_host(&raw)
}

pub fn sanitize_host(raw: &str) -> String {
    let s: String = raw
        .chars()
        .take(63)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if s.is_empty() {
        "host".into()
    } else {
        s
    }
}

/// When this writer started, to the microsecond, plus 16 random bits: a restarted process
/// that got the same pid still gets new names.
pub fn start_id(now: DateTime<Utc>) -> String {
    format!(
        "{}{:04x}",
        now.format("%Y%m%dT%H%M%S%6fZ"),
        fastrand::u16(..)
    )
}

/// What the Reader needs of a name: it finds blobs by their `.ndjson[.gz]` ending, lists
/// each kind by the name up to the first per-writer token, and each time bucket by the
/// time tokens from the year down. A name it could not list once and only once is refused
/// here, not written and then missed or read twice.
fn check_readable(pieces: &[Piece]) -> Result<(), String> {
    if pieces.last() != Some(&Piece::Ext) {
        return Err(
            "name_template must end with {ext} (.ndjson or .ndjson.gz): the Reader \
                    finds blobs by that ending"
                .into(),
        );
    }
    let writer = pieces
        .iter()
        .position(|p| matches!(p, Piece::Host | Piece::Pid | Piece::Start | Piece::Seq));
    let kind = pieces.iter().position(|p| *p == Piece::Kind);
    if let (Some(kind), Some(writer)) = (kind, writer) {
        if kind > writer {
            return Err(
                "name_template: {kind} must come before {host}, {pid}, {start} and \
                        {seq} (the Reader lists each kind by the name before them)"
                    .into(),
            );
        }
    }
    const TIME: [(Piece, &str); 5] = [
        (Piece::Year, "{yyyy}"),
        (Piece::Month, "{mm}"),
        (Piece::Day, "{dd}"),
        (Piece::Hour, "{HH}"),
        (Piece::Minute, "{MM}"),
    ];
    for pair in TIME.windows(2) {
        let ((coarse, coarse_name), (fine, fine_name)) = (&pair[0], &pair[1]);
        if pieces.contains(fine) && !pieces.contains(coarse) {
            return Err(format!(
                "name_template: {fine_name} needs {coarse_name}: a time token needs every \
                 coarser one ({{yyyy}} {{mm}} {{dd}} {{HH}} {{MM}}), or one name would stand \
                 for many periods"
            ));
        }
    }
    Ok(())
}

/// Checks a prefix: blob names must not start with '/' and should not contain '\' or '..'.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix.starts_with('/') || prefix.contains('\\') || prefix.split('/').any(|p| p == "..") {
        return Err(format!(
            "prefix {prefix:?} must not start with '/' or contain '\\' or '..'"
        ));
    }
    if prefix.len() > 512 {
        return Err("prefix is longer than 512 characters".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        Identity {
            prefix: "svc/".into(),
            host: "web-1".into(),
            pid: 42,
            start: "20261123T170000000000Z00ff".into(),
            ext: ".ndjson.gz",
        }
    }

    #[test]
    fn default_template_partitions_by_kind_and_hour() {
        let t = Template::parse(DEFAULT_TEMPLATE).unwrap();
        assert_eq!(t.granularity, Granularity::Hour);
        assert!(t.by_kind);
        let ts = 1_795_453_200_000_000 + 59 * 60_000_000; // 2026-11-23 17:59 UTC
        assert_eq!(
            t.render(&id(), Kind::Http, ts, 7),
            "svc/http/2026/11/23/17/web-1-42-20261123T170000000000Z00ff-000007.ndjson.gz"
        );
        assert_eq!(t.bucket(ts), t.bucket(1_795_453_200_000_000));
        assert_ne!(t.bucket(ts), t.bucket(ts + 60_000_000));
    }

    #[test]
    fn listing_prefixes_and_partitions() {
        let t = Template::parse(DEFAULT_TEMPLATE).unwrap();
        let ts = 1_795_453_200_000_000 + 59 * 60_000_000; // 2026-11-23 17:59 UTC
        assert_eq!(
            t.list_prefix("svc/", Kind::Http, ts),
            ("svc/http/2026/11/23/17/".to_owned(), true)
        );
        assert_eq!(
            t.bucket_range(ts),
            (1_795_453_200_000_000, 1_795_453_200_000_000 + 3_600_000_000)
        );
        let late = Template::parse("{yyyy}/{host}/{mm}-{pid}{start}{seq}{ext}").unwrap();
        assert_eq!(
            late.list_prefix("", Kind::App, ts),
            ("2026/".to_owned(), false)
        );
        let m = Template::parse("{yyyy}-{mm}/{host}{pid}{start}{seq}{ext}").unwrap();
        let (a, b) = m.bucket_range(ts);
        assert_eq!(b - a, 30 * 86_400_000_000);
    }

    #[test]
    fn custom_templates() {
        let t = Template::parse("{yyyy}-{mm}/{host}_{pid}_{start}_{seq}{ext}").unwrap();
        assert_eq!(t.granularity, Granularity::Month);
        assert!(!t.by_kind);
        let jan = 1_767_225_600_000_000; // 2026-01-01
        assert_eq!(t.bucket(jan), t.bucket(jan + 30 * 86_400_000_000));
        assert_ne!(t.bucket(jan), t.bucket(jan + 31 * 86_400_000_000));
        assert_eq!(
            t.render(&id(), Kind::App, jan, 1),
            "2026-01/web-1_42_20261123T170000000000Z00ff_000001.ndjson.gz"
        );
        let m = Template::parse("{yyyy}{mm}{dd}{HH}{MM}/{host}{pid}{start}{seq}{ext}").unwrap();
        assert_eq!(m.granularity, Granularity::Minute);
    }

    #[test]
    fn bad_templates_say_why() {
        assert!(Template::parse("{kind}/{seq}")
            .unwrap_err()
            .contains("{host}"));
        assert!(Template::parse("{bogus}{host}{pid}{start}{seq}")
            .unwrap_err()
            .contains("unknown token"));
        assert!(Template::parse("{host}{pid}{start}{seq").is_err());
        assert!(Template::parse("}{host}{pid}{start}{seq}").is_err());
        assert!(Template::parse("/{host}{pid}{start}{seq}").is_err());
        // Names the Reader could not list once and only once.
        for (bad, why) in [
            ("{host}{pid}{start}{seq}.json", "{ext}"),
            ("{host}{pid}{start}{seq}", "{ext}"),
            (
                "{yyyy}/{host}-{pid}-{start}-{seq}-{kind}{ext}",
                "{kind} must come before",
            ),
            (
                "{kind}/{HH}/{host}{pid}{start}{seq}{ext}",
                "{HH} needs {dd}",
            ),
            (
                "{yyyy}/{dd}/{host}{pid}{start}{seq}{ext}",
                "{dd} needs {mm}",
            ),
        ] {
            let err = Template::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn hosts_and_prefixes() {
        assert_eq!(sanitize_host("a b/c:d.e_f"), "a-b-c-d.e_f");
        assert_eq!(sanitize_host(""), "host");
        assert!(!host_name().is_empty());
        assert!(check_prefix("a/b/").is_ok());
        assert!(check_prefix("/a").is_err());
        assert!(check_prefix("a/../b").is_err());
        let s = start_id(Utc::now());
        assert_eq!(s.len(), "20261123T170000000000Z".len() + 4);
    }
}
