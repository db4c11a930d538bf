//! Reading a LocalFiles directory: `*.ndjson` and rotated `*.ndjson.gz`, streamed line by
//! line (never a whole file in memory).
//!
//! A file's time range comes without opening it: records in it were created no later than
//! its modification time, and no earlier than the creation time in its name minus
//! `slack` (records wait in the queue and the batcher before their file is chosen).
//! Files outside the query's range are skipped; a page stops as soon as no remaining file
//! can hold a record that sorts before the ones already found, so page 500 costs what
//! page 1 costs.
//!
//! A record's id is `{file name}:{byte offset of its line}` (offset in the decompressed
//! stream): stable while the file exists, and also after gzip rotation (the offset is
//! the same; [`FilesStore::get`] looks for the `.gz` when the plain file is gone).

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::{Duration, Instant, UNIX_EPOCH};

use chrono::NaiveDateTime;
use flate2::read::MultiGzDecoder;
use memchr::memmem;
use serde_json::{Map, Value};

use super::cursor::Pos;
use super::filter::Filter;
use super::lines::{line_ts, parse_record_id, raw_needle, LineMatcher};
use super::summary::{Grouper, Spec};
use super::{Found, ReadError, Scan};

#[derive(Clone, Debug)]
pub struct FilesConfig {
    pub directory: PathBuf,
    /// Decompressed bytes one call may read.
    pub max_bytes: u64,
    /// Files one call may open.
    pub max_files: usize,
    /// Wall time one call may take.
    pub max_time: Duration,
    /// How much older than its file's name a record may be (microseconds).
    pub slack_us: i64,
}

impl FilesConfig {
    pub fn new(directory: PathBuf) -> Self {
        FilesConfig {
            directory,
            max_bytes: 2 << 30,
            max_files: 10_000,
            max_time: Duration::from_secs(20),
            slack_us: 300_000_000,
        }
    }
}

pub struct FilesStore {
    pub cfg: FilesConfig,
}

#[derive(Clone, Debug)]
pub struct FileInfo {
    pub path: PathBuf,
    pub name: String,
    /// Earliest possible record time (name time minus slack), microseconds.
    pub lo: i64,
    /// Latest possible record time (modification time), microseconds.
    pub hi: i64,
    pub gz: bool,
}

/// Parses the fixed `YYYY-MM-DDTHH:MM:SS.ffffffZ` the encoder writes (other RFC 3339
/// forms through chrono).
pub fn parse_ts(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() == 27 && b[4] == b'-' && b[10] == b'T' && b[19] == b'.' && b[26] == b'Z' {
        let n = |r: std::ops::Range<usize>| -> Option<i64> {
            let mut v = 0i64;
            for &c in &b[r] {
                if !c.is_ascii_digit() {
                    return None;
                }
                v = v * 10 + i64::from(c - b'0');
            }
            Some(v)
        };
        let (y, mo, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
        let (h, mi, se, us) = (n(11..13)?, n(14..16)?, n(17..19)?, n(20..26)?);
        // Days from the civil date (Howard Hinnant's algorithm).
        let y2 = if mo <= 2 { y - 1 } else { y };
        let era = y2.div_euclid(400);
        let yoe = y2 - era * 400;
        let mp = (mo + 9) % 12;
        let doy = (153 * mp + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        return Some(((days * 86400 + h * 3600 + mi * 60 + se) * 1_000_000) + us);
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|d| d.timestamp_micros())
}

/// The creation time in `{prefix}-{%Y%m%dT%H%M%S%.6fZ}-{pid}-{seq}.ndjson[.gz]`.
pub fn name_time(name: &str) -> Option<i64> {
    let stem = name
        .strip_suffix(".ndjson.gz")
        .or_else(|| name.strip_suffix(".ndjson"))?;
    let mut parts = stem.rsplitn(4, '-');
    let (_seq, _pid, stamp) = (parts.next()?, parts.next()?, parts.next()?);
    NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%S%.fZ")
        .ok()
        .map(|d| d.and_utc().timestamp_micros())
}

/// The offset of a line start at or before the first line with `ts >= at` (bisection on a
/// file appended in about time order); None when it cannot tell.
fn seek_time(path: &PathBuf, at: i64) -> Option<u64> {
    let mut f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    // The line starting at or after byte `pos`: (its offset, its ts).
    let mut probe = |pos: u64| -> Option<(u64, i64)> {
        f.seek(SeekFrom::Start(pos)).ok()?;
        let mut r = BufReader::with_capacity(16 << 10, &mut f);
        let mut skipped = 0u64;
        let mut buf = Vec::new();
        if pos > 0 {
            skipped = r.read_until(b'\n', &mut buf).ok()? as u64;
            buf.clear();
        }
        r.read_until(b'\n', &mut buf).ok()?;
        Some((pos + skipped, line_ts(&buf)?))
    };
    let (mut lo, mut hi) = (0u64, len);
    let mut best = 0u64;
    while hi - lo > 64 << 10 {
        let mid = lo + (hi - lo) / 2;
        match probe(mid) {
            Some((line_at, ts)) if ts < at => {
                best = line_at;
                lo = mid;
            }
            Some(_) => hi = mid,
            None => return Some(best),
        }
    }
    Some(best)
}

struct Budget {
    bytes: u64,
    files: usize,
    deadline: Instant,
    exhausted: bool,
}

impl Budget {
    fn new(cfg: &FilesConfig) -> Self {
        Budget {
            bytes: cfg.max_bytes,
            files: cfg.max_files,
            deadline: Instant::now() + cfg.max_time,
            exhausted: false,
        }
    }
    fn spend(&mut self, n: u64) -> bool {
        self.bytes = self.bytes.saturating_sub(n);
        if self.bytes == 0 {
            self.exhausted = true;
        }
        !self.exhausted
    }
}

fn open_reader(path: &PathBuf, gz: bool) -> io::Result<Box<dyn BufRead>> {
    let f = File::open(path)?;
    Ok(if gz {
        Box::new(BufReader::with_capacity(
            256 << 10,
            MultiGzDecoder::new(BufReader::with_capacity(256 << 10, f)),
        ))
    } else {
        Box::new(BufReader::with_capacity(256 << 10, f))
    })
}

/// A gzip being written or a truncated file: what was read stays valid.
fn cut_short(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidInput
    )
}

/// Where the complete lines of one file go: time range and filters checked, ids given.
struct Lines<'a, 'f> {
    name: &'a str,
    matcher: LineMatcher<'f>,
    out: &'a mut dyn FnMut(i64, Map<String, Value>),
}

impl Lines<'_, '_> {
    /// One line (newline included) starting at byte `at` of the (decompressed) file.
    fn take(&mut self, line: &[u8], at: u64) {
        if let Some((ts, mut rec)) = self.matcher.check(line) {
            rec.insert("id".into(), Value::String(format!("{}:{at}", self.name)));
            (self.out)(ts, rec);
        }
    }
}

/// The scan with a `text` filter: each buffered block of whole lines is lowered once and
/// searched for the needle, so only the lines holding it are cut out and decoded (the
/// needle is plain ASCII without JSON escapes: see `raw_needle`).
fn scan_hits(
    reader: &mut dyn BufRead,
    lines: &mut Lines<'_, '_>,
    finder: &memmem::Finder<'_>,
    mut offset: u64,
    budget: &mut Budget,
    name: &str,
) -> Result<bool, ReadError> {
    let mut lower = Vec::new();
    let mut long_line = Vec::new();
    let mut since_check: u64 = 0;
    loop {
        let block = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if cut_short(&e) => &[],
            Err(e) => return Err(failed(e, &format!("cannot read {name}"))),
        };
        let used = if block.is_empty() {
            budget.spend(since_check);
            return Ok(true);
        } else if let Some(last) = memchr::memrchr(b'\n', block) {
            let block = &block[..=last];
            lower.clear();
            lower.extend(block.iter().map(u8::to_ascii_lowercase));
            let mut from = 0;
            while let Some(hit) = finder.find(&lower[from..]).map(|h| from + h) {
                let start = memchr::memrchr(b'\n', &block[..hit]).map_or(0, |i| i + 1);
                let end = memchr::memchr(b'\n', &block[hit..]).map_or(block.len(), |i| hit + i + 1);
                lines.take(&block[start..end], offset + start as u64);
                from = end;
            }
            let used = block.len();
            reader.consume(used);
            used
        } else {
            // No whole line in the buffer: one longer than it, or the last one unfinished.
            long_line.clear();
            let n = match reader.read_until(b'\n', &mut long_line) {
                Ok(n) => n,
                Err(e) if cut_short(&e) => 0,
                Err(e) => return Err(failed(e, &format!("cannot read {name}"))),
            };
            if long_line.last() != Some(&b'\n') {
                // Still being written: left for the next read.
                budget.spend(since_check);
                return Ok(true);
            }
            lower.clear();
            lower.extend(long_line.iter().map(u8::to_ascii_lowercase));
            if finder.find(&lower).is_some() {
                lines.take(&long_line, offset);
            }
            n
        };
        offset += used as u64;
        since_check += used as u64;
        if since_check > 1 << 20 {
            if !budget.spend(since_check) || Instant::now() > budget.deadline {
                budget.exhausted = true;
                return Ok(false);
            }
            since_check = 0;
        }
    }
}

fn failed(e: io::Error, what: &str) -> ReadError {
    ReadError::Failed(format!("{what}: {e}"))
}

impl FilesStore {
    pub fn list(&self) -> Result<Vec<FileInfo>, ReadError> {
        let entries = match fs::read_dir(&self.cfg.directory) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => {
                return Err(failed(
                    e,
                    &format!("cannot list {}", self.cfg.directory.display()),
                ))
            }
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let gz = name.ends_with(".ndjson.gz");
            if !gz && !name.ends_with(".ndjson") {
                continue;
            }
            let Ok(meta) = e.metadata() else { continue };
            let hi = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(i64::MAX, |d| d.as_micros() as i64 + 1_000_000);
            let lo = name_time(&name).map_or(i64::MIN, |t| t.saturating_sub(self.cfg.slack_us));
            out.push(FileInfo {
                path: e.path(),
                name,
                lo,
                hi,
                gz,
            });
        }
        Ok(out)
    }

    /// Streams the matching records of one file to `out`; false when the budget ran out.
    fn scan_file(
        &self,
        f: &FileInfo,
        filter: &Filter,
        (lo, hi): (i64, i64),
        budget: &mut Budget,
        out: &mut dyn FnMut(i64, Map<String, Value>),
    ) -> Result<bool, ReadError> {
        if budget.exhausted || budget.files == 0 || Instant::now() > budget.deadline {
            budget.exhausted = true;
            return Ok(false);
        }
        budget.files -= 1;
        // A plain file is appended in time order (up to the queue's delay, covered by
        // `slack`): a recent range starts by bisection instead of reading from the top.
        let start = if !f.gz && lo > f.lo.saturating_add(self.cfg.slack_us) {
            seek_time(&f.path, lo.saturating_sub(self.cfg.slack_us)).unwrap_or(0)
        } else {
            0
        };
        let mut reader = match open_reader(&f.path, f.gz) {
            Ok(r) => r,
            // Rotated (renamed to .gz) or pruned since the listing: nothing to read here.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(failed(e, &format!("cannot open {}", f.name))),
        };
        if start > 0 {
            // Plain files only (checked above): skip to the line found by bisection.
            let mut skip = (&mut reader).take(start);
            if io::copy(&mut skip, &mut io::sink()).ok() != Some(start) {
                return Ok(true);
            }
        }
        let needle = filter.text.as_deref().and_then(raw_needle);
        if let Some(needle) = needle {
            let finder = memmem::Finder::new(needle.as_slice());
            let mut lines = Lines {
                name: &f.name,
                matcher: LineMatcher::new(filter, (lo, hi)),
                out,
            };
            return scan_hits(&mut reader, &mut lines, &finder, start, budget, &f.name);
        }
        let mut matcher = LineMatcher::new(filter, (lo, hi));
        let mut line = Vec::with_capacity(4096);
        let mut offset: u64 = start;
        let mut since_check: u64 = 0;
        loop {
            line.clear();
            let n = match reader.read_until(b'\n', &mut line) {
                Ok(n) => n,
                // A gzip being written or a truncated file: what was read stays valid.
                Err(e)
                    if e.kind() == io::ErrorKind::UnexpectedEof
                        || e.kind() == io::ErrorKind::InvalidInput =>
                {
                    0
                }
                Err(e) => return Err(failed(e, &format!("cannot read {}", f.name))),
            };
            if n == 0 {
                budget.spend(since_check);
                return Ok(true);
            }
            let at = offset;
            offset += n as u64;
            since_check += n as u64;
            if since_check > 1 << 20 {
                if !budget.spend(since_check) || Instant::now() > budget.deadline {
                    budget.exhausted = true;
                    return Ok(false);
                }
                since_check = 0;
            }
            // A line still being written has no newline yet: leave it for the next read.
            if line.last() != Some(&b'\n') {
                budget.spend(since_check);
                return Ok(true);
            }
            let Some((ts, mut rec)) = matcher.check(&line) else {
                continue;
            };
            rec.insert("id".into(), Value::String(format!("{}:{at}", f.name)));
            out(ts, rec);
        }
    }

    pub fn find(&self, scan: &Scan) -> Result<Found, ReadError> {
        let (lo, hi) = scan.range();
        let desc = scan.filter.desc;
        let limit = scan.filter.limit;
        let mut files: Vec<FileInfo> = self
            .list()?
            .into_iter()
            .filter(|f| f.hi >= lo && f.lo <= hi)
            .collect();
        if desc {
            files.sort_by(|a, b| b.hi.cmp(&a.hi).then_with(|| b.name.cmp(&a.name)));
        } else {
            files.sort_by(|a, b| a.lo.cmp(&b.lo).then_with(|| a.name.cmp(&b.name)));
        }
        let mut budget = Budget::new(&self.cfg);
        let mut found: Vec<(i64, Pos, Map<String, Value>)> = Vec::new();
        let sort = |v: &mut Vec<(i64, Pos, Map<String, Value>)>| {
            v.sort_by(|a, b| {
                let o = super::cursor::cmp_pos(a.0, &a.1.id, &b.1);
                if desc {
                    o.reverse()
                } else {
                    o
                }
            });
            v.truncate(limit);
        };
        let mut unscanned_bound: Option<i64> = None;
        for (i, f) in files.iter().enumerate() {
            // Enough found, and nothing in this file or the later ones can sort before it.
            if found.len() >= limit {
                sort(&mut found);
                let kth = found[limit - 1].0;
                if (desc && f.hi < kth) || (!desc && f.lo > kth) {
                    break;
                }
            }
            let complete =
                self.scan_file(f, &scan.filter, (lo, hi), &mut budget, &mut |ts, rec| {
                    let id = rec
                        .get("id")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned();
                    if scan.past_after(ts, &id) {
                        found.push((ts, Pos { ts, id }, rec));
                    }
                })?;
            if found.len() > limit * 4 {
                sort(&mut found);
            }
            if !complete {
                // What is left may hold records that sort among those found: only those
                // beyond every unread file's bound are certain.
                let rest = &files[i..];
                unscanned_bound = Some(if desc {
                    rest.iter().map(|f| f.hi).max().unwrap_or(i64::MIN)
                } else {
                    rest.iter().map(|f| f.lo).min().unwrap_or(i64::MAX)
                });
                break;
            }
        }
        sort(&mut found);
        Ok(Found::scanned(found, unscanned_bound, desc))
    }

    pub fn summary(&self, filter: &Filter, spec: &Spec) -> Result<Value, ReadError> {
        let scan = Scan::whole(filter);
        let (lo, hi) = scan.range();
        let mut budget = Budget::new(&self.cfg);
        let mut grouper = Grouper::default();
        for f in self.list()?.iter().filter(|f| f.hi >= lo && f.lo <= hi) {
            let complete = self.scan_file(f, filter, (lo, hi), &mut budget, &mut |ts, rec| {
                grouper.add(spec, ts, &rec)
            })?;
            if !complete {
                break;
            }
        }
        Ok(grouper.finish(budget.exhausted))
    }

    /// The record `{file name}:{offset}`, or None.
    pub fn get(&self, id: &str) -> Result<Option<Map<String, Value>>, ReadError> {
        // A bare file name in the directory: no path, no hidden file.
        let Some((name, offset)) =
            parse_record_id(id).filter(|(name, _)| !name.contains('/') && !name.starts_with('.'))
        else {
            return Ok(None);
        };
        let mut candidates = vec![(self.cfg.directory.join(name), name.ends_with(".gz"))];
        if !name.ends_with(".gz") {
            candidates.push((self.cfg.directory.join(format!("{name}.gz")), true));
        }
        for (path, gz) in candidates {
            let mut reader: Box<dyn BufRead> = match File::open(&path) {
                Ok(mut f) if !gz => {
                    if f.seek(SeekFrom::Start(offset)).is_err() {
                        return Ok(None);
                    }
                    Box::new(BufReader::new(f))
                }
                Ok(f) => {
                    let mut r = BufReader::new(MultiGzDecoder::new(BufReader::new(f)));
                    if io::copy(&mut (&mut r).take(offset), &mut io::sink()).ok() != Some(offset) {
                        return Ok(None);
                    }
                    Box::new(r)
                }
                Err(_) => continue,
            };
            let mut line = Vec::new();
            if reader.read_until(b'\n', &mut line).is_err() || line.last() != Some(&b'\n') {
                return Ok(None);
            }
            let Ok(mut rec) = serde_json::from_slice::<Map<String, Value>>(&line) else {
                return Ok(None);
            };
            // The id of where it is now (`.gz` after a compressed rotation), as queries
            // give it: neighbours are ordered by it (`context` of an old id).
            let found = path.file_name().and_then(|n| n.to_str()).unwrap_or(name);
            rec.insert("id".into(), Value::String(format!("{found}:{offset}")));
            return Ok(Some(rec));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bisection_lands_before_the_first_line_in_range() {
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let path = tmp.path().join("x-20231114T221320.000001Z-1-0001.ndjson");
        let mut text = String::new();
        let mut starts = Vec::new();
        for i in 0..20_000i64 {
            starts.push((text.len() as u64, i));
            let ts = crate::encode::ts_string(1_700_000_000_000_000 + i * 1_000_000);
            text.push_str(&format!(
                "{{\"ts\":\"{ts}\",\"message\":\"line {i} padding padding\"}}\n"
            ));
        }
        std::fs::write(&path, &text).unwrap();
        let at = 1_700_000_000_000_000 + 15_000 * 1_000_000;
        let off = seek_time(&path, at).unwrap();
        let first = starts.iter().find(|(_, i)| *i == 15_000).unwrap().0;
        assert!(off <= first && first - off < 200 << 10, "{off} {first}");
        assert!(starts.iter().any(|(o, _)| *o == off));
        assert_eq!(seek_time(&path, 0), Some(0));
    }

    #[test]
    fn timestamps_and_names() {
        assert_eq!(
            parse_ts("2023-11-14T22:13:20.123456Z"),
            Some(1_700_000_000_123_456)
        );
        assert_eq!(parse_ts("1970-01-01T00:00:00.000000Z"), Some(0));
        assert_eq!(
            parse_ts("2023-11-14T22:13:20+00:00"),
            Some(1_700_000_000_000_000)
        );
        assert_eq!(
            name_time("logsluice-20231114T221320.000001Z-42-0001.ndjson.gz"),
            Some(1_700_000_000_000_001)
        );
        assert_eq!(
            name_time("my-app-20231114T221320.5Z-42-0001.ndjson"),
            Some(1_700_000_000_500_000)
        );
        assert_eq!(name_time("other.ndjson"), None);
    }
}
