//! Reading an Azure Blob container the `AzureBlob` destination fills: gzip NDJSON block
//! blobs per batch, kind and time partition (the hour by default).
//!
//! Every query has a time range (the last hour unless one is given). Only the name
//! prefixes of the partitions inside it are listed (`app/2026/11/23/17/`, one list call
//! per kind and partition), partitions are visited in the query's order and a page stops
//! as soon as no later partition can hold a record that sorts before the ones found, so
//! page 500 costs what page 1 costs. A blob's time range comes from its partition and the
//! `first_ts`/`last_ts` metadata the writer sets: blobs outside the query's range are
//! never downloaded. Downloads run a few at a time and are gunzipped as they stream in;
//! records are matched line by line with the same code as the LocalFiles scanner.
//!
//! A record's id is `{blob name}:{byte offset of its line}` in the decompressed stream.
//! Requests run on the store's own tokio runtime; the caller (a Python thread with the GIL
//! released) blocks on them.

use std::collections::HashSet;
use std::io::{self, Write};
use std::num::NonZero;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use azure_core::http::StatusCode;
use azure_storage_blob::models::{
    BlobClientDownloadOptions, BlobContainerClientListBlobsOptions, ListBlobsIncludeItem,
};
use azure_storage_blob::BlobContainerClient;
use flate2::write::MultiGzDecoder;
use futures::{StreamExt, TryStreamExt};
use parking_lot::Mutex;
use serde_json::{json, Map, Value};

use super::cursor::{cmp_pos, Pos};
use super::files::parse_ts;
use super::filter::{BadInput, Filter};
use super::lines::{parse_record_id, LineMatcher};
use super::summary::{Grouper, Spec};
use super::{Found, ReadError, Scan};
use crate::config::AzureBlobConfig;
use crate::destinations::azure_blob::conn::{self, Auth, Endpoint};
use crate::destinations::azure_blob::errors::{chain, container_missing, Redactor};
use crate::destinations::azure_blob::{build_client, naming};
use crate::per_process::PerProcess;
use crate::record::Kind;

/// A query without `since` reads this far back (microseconds).
pub const DEFAULT_RANGE_US: i64 = 3_600_000_000;
/// More partitions than this in one range is a mistake (a minute template over a month):
/// the caller is asked for a narrower range instead of thousands of list calls.
const MAX_PARTITIONS: usize = 2_000;

#[derive(Clone, Debug)]
pub struct BlobConfig {
    pub target: AzureBlobConfig,
    /// Decompressed bytes one call may read.
    pub max_bytes: u64,
    /// Blobs one call may download.
    pub max_blobs: usize,
    /// Wall time one call may take.
    pub max_time: Duration,
    /// Downloads in flight at once.
    pub concurrency: usize,
}

impl BlobConfig {
    pub fn new(target: AzureBlobConfig) -> Self {
        BlobConfig {
            target,
            max_bytes: 2 << 30,
            max_blobs: 10_000,
            max_time: Duration::from_secs(20),
            concurrency: 8,
        }
    }
}

/// Counters of the work done, for tests and `Reader.stats()`.
#[derive(Default)]
pub struct Stats {
    pub list_calls: AtomicU64,
    pub blobs_downloaded: AtomicU64,
    pub bytes_downloaded: AtomicU64,
}

pub struct BlobStore {
    /// The runtime and client of this process: built on first use, and again in a forked
    /// child (see [`BlobStore::live`]).
    live: PerProcess<BlobLive>,
    target: Endpoint,
    template: naming::Template,
    prefix: String,
    cfg: BlobConfig,
    endpoint: String,
    redactor: Redactor,
    pub stats: Stats,
}

/// What reading takes in one process. A forked child inherits its parent's copy without
/// the runtime's threads (its requests would wait until their budget ran out) and with the
/// parent's connections: it builds its own on first use and never touches the copy.
struct BlobLive {
    /// Always Some until drop (see the Drop impl).
    rt: Option<tokio::runtime::Runtime>,
    client: BlobContainerClient,
}

impl BlobLive {
    fn block_on<F: std::future::Future>(&self, work: F) -> F::Output {
        self.rt
            .as_ref()
            .expect("the runtime lives until drop")
            .block_on(work)
    }
}

impl Drop for BlobLive {
    /// Without waiting for the workers (a reader dropped on a Python thread must not wait
    /// for them with the GIL held).
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// What one tail poll found: the new records in time order, and the names of the blobs
/// read (or known to be too old) to pass to the next poll.
pub struct Polled {
    pub records: Vec<Map<String, Value>>,
    pub seen: Vec<String>,
}

/// One blob to read and the times its records can have.
#[derive(Clone, Debug)]
struct BlobInfo {
    name: String,
    /// Bytes as stored (compressed).
    size: u64,
    lo: i64,
    hi: i64,
}

/// Partitions to list: their time range and one name prefix per kind.
#[derive(Clone, Debug, PartialEq)]
struct Unit {
    lo: i64,
    /// Inclusive.
    hi: i64,
    prefixes: Vec<String>,
}

/// What one call may spend: blobs and their bytes as stored, taken before each download
/// (concurrent downloads cannot overshoot), and time, which also stops a blob midway.
struct Budget {
    bytes: AtomicU64,
    blobs: AtomicU64,
    deadline: Instant,
}

/// How long past its call's deadline one request may go unanswered: the SDK's own
/// timeouts are off (`build_client`), and an endpoint that takes connections but never
/// answers must not hold the caller (or a tail's poller) for ever.
const STALL_GRACE: Duration = Duration::from_secs(2);

impl Budget {
    /// `fut`, or an error once the call's deadline and the grace have passed.
    async fn answered<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = T>,
    ) -> Result<T, ReadError> {
        let limit = tokio::time::Instant::from_std(self.deadline + STALL_GRACE);
        tokio::time::timeout_at(limit, fut)
            .await
            .map_err(|_| ReadError::Failed(format!("{what}: no answer within max_seconds")))
    }

    fn new(cfg: &BlobConfig) -> Self {
        Budget {
            bytes: AtomicU64::new(cfg.max_bytes),
            blobs: AtomicU64::new(cfg.max_blobs as u64),
            deadline: Instant::now() + cfg.max_time,
        }
    }
    fn late(&self) -> bool {
        Instant::now() > self.deadline
    }
    /// Whether any limit is reached.
    fn out(&self) -> bool {
        self.late()
            || self.bytes.load(Ordering::Relaxed) == 0
            || self.blobs.load(Ordering::Relaxed) == 0
    }
    /// Takes one blob from the budget; false when none is left. `force` (a page that has
    /// nothing it can return yet) overrides the byte and blob limits, not the deadline.
    fn take_blob(&self, force: bool, size: u64) -> bool {
        if self.late() || !force && self.out() {
            return false;
        }
        for (counter, n) in [(&self.blobs, 1), (&self.bytes, size)] {
            let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
        }
        true
    }
}

/// Splits decoded bytes into lines and hands each complete one, with the offset of its
/// first byte, to `on_line`. Fed by the gzip decoder as compressed chunks arrive.
struct Lines<F: FnMut(&[u8], u64)> {
    partial: Vec<u8>,
    offset: u64,
    on_line: F,
}

impl<F: FnMut(&[u8], u64)> Write for Lines<F> {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let n = data.len();
        while let Some(i) = memchr::memchr(b'\n', data) {
            let (line, rest) = data.split_at(i + 1);
            let whole = if self.partial.is_empty() {
                (self.on_line)(line, self.offset);
                line.len()
            } else {
                self.partial.extend_from_slice(line);
                (self.on_line)(&self.partial, self.offset);
                let n = self.partial.len();
                self.partial.clear();
                n
            };
            self.offset += whole as u64;
            data = rest;
        }
        self.partial.extend_from_slice(data);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The stored bytes of a blob as they arrive: gzip (checked by its magic number, whatever
/// the name says) or plain NDJSON.
enum Decoder<F: FnMut(&[u8], u64)> {
    Unknown(Lines<F>),
    Gzip(Box<MultiGzDecoder<Lines<F>>>),
    Plain(Lines<F>),
    Done,
}

impl<F: FnMut(&[u8], u64)> Decoder<F> {
    fn feed(&mut self, chunk: &[u8]) -> io::Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        if let Decoder::Unknown(_) = self {
            let Decoder::Unknown(lines) = std::mem::replace(self, Decoder::Done) else {
                unreachable!()
            };
            *self = if chunk[0] == 0x1f {
                Decoder::Gzip(Box::new(MultiGzDecoder::new(lines)))
            } else {
                Decoder::Plain(lines)
            };
        }
        match self {
            Decoder::Gzip(d) => d.write_all(chunk),
            Decoder::Plain(l) => l.write_all(chunk),
            _ => Ok(()),
        }
    }
    fn finish(&mut self) {
        if let Decoder::Gzip(d) = self {
            // A truncated gzip keeps the lines decoded so far.
            let _ = d.try_finish();
        }
    }
}

/// The best `limit` records in the scan's order, trimmed as they come in.
struct Best {
    desc: bool,
    limit: usize,
    found: Vec<(i64, Pos, Map<String, Value>)>,
}

impl Best {
    fn sort(&mut self) {
        let desc = self.desc;
        self.found.sort_by(|a, b| {
            let o = cmp_pos(a.0, &a.1.id, &b.1);
            if desc {
                o.reverse()
            } else {
                o
            }
        });
        self.found.truncate(self.limit);
    }
    fn push(&mut self, ts: i64, id: String, rec: Map<String, Value>) {
        self.found.push((ts, Pos { ts, id }, rec));
        if self.found.len() > self.limit * 4 + 64 {
            self.sort();
        }
    }
    /// Whether some record found sorts before everything that may remain unread (times
    /// up to `bound` going back, from `bound` going forward): the page can end there.
    fn secured(&self, bound: i64) -> bool {
        self.found.iter().any(
            |(ts, _, _)| {
                if self.desc {
                    *ts > bound
                } else {
                    *ts < bound
                }
            },
        )
    }

    /// Whether records with times in `lo..=hi` could still enter the page.
    fn could_take(&mut self, lo: i64, hi: i64) -> bool {
        if self.found.len() < self.limit {
            return true;
        }
        self.sort();
        let kth = self.found[self.limit - 1].0;
        if self.desc {
            hi >= kth
        } else {
            lo <= kth
        }
    }
}

impl BlobStore {
    pub fn open(cfg: BlobConfig) -> Result<Self, ReadError> {
        let bad = |e: String| ReadError::Bad(BadInput(format!("AzureBlob source: {e}")));
        let endpoint = resolve(&cfg.target).map_err(bad)?;
        let template = naming::Template::parse(&cfg.target.name_template).map_err(bad)?;
        naming::check_prefix(&cfg.target.prefix).map_err(bad)?;
        let redactor = Redactor::new(&cfg.target, &endpoint);
        // Checked now (a bad credential setting is the caller's to fix), built again by
        // each process that reads; the check starts no thread.
        {
            let check = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| ReadError::Failed(format!("cannot start runtime: {e}")))?;
            let _guard = check.enter();
            build_client(&endpoint).map_err(|e| bad(redactor.clean(&chain(&e))))?;
        }
        Ok(BlobStore {
            live: PerProcess::default(),
            target: endpoint.clone(),
            template,
            prefix: cfg.target.prefix.clone(),
            endpoint: endpoint.display_url(),
            redactor,
            cfg,
            stats: Stats::default(),
        })
    }

    /// The runtime and client of this process, built on first use and built afresh in a
    /// forked child (gunicorn `--preload`, multiprocessing), as the pipeline's core is.
    fn live(&self) -> Result<Arc<BlobLive>, ReadError> {
        self.live.get_or_try_init(|| {
            let rt = super::reader_runtime("logsluice-blob-reader")?;
            let client = {
                let _guard = rt.enter();
                build_client(&self.target).map_err(|e| {
                    ReadError::Failed(format!(
                        "AzureBlob source: {}",
                        self.redactor.clean(&chain(&e))
                    ))
                })?
            };
            Ok(Arc::new(BlobLive {
                rt: Some(rt),
                client,
            }))
        })
    }

    /// Where the blobs are read from, without any secret.
    pub fn display(&self) -> &str {
        &self.endpoint
    }

    /// A container that does not exist is the caller's to fix (a typo, or nothing was
    /// written yet): it must not read as "no records".
    fn fail(&self, what: &str, e: &azure_core::Error) -> ReadError {
        if container_missing(e) {
            return BadInput(format!(
                "container '{}' does not exist ({})",
                self.target.container_name(),
                self.endpoint
            ))
            .into();
        }
        ReadError::Failed(format!(
            "{what} in {} failed: {}",
            self.endpoint,
            self.redactor.clean(&chain(e))
        ))
    }

    fn kinds(&self, filter: &Filter) -> Vec<Kind> {
        if !self.template.by_kind {
            return vec![Kind::App];
        }
        match filter.kind.as_deref() {
            Some("app") => vec![Kind::App],
            Some("http") => vec![Kind::Http],
            _ => vec![Kind::App, Kind::Http],
        }
    }

    /// The partitions of `lo..=hi` in scan order, consecutive ones with the same prefixes
    /// merged (templates whose time tokens come after a per-writer token).
    fn units(&self, kinds: &[Kind], lo: i64, hi: i64, desc: bool) -> Result<Vec<Unit>, ReadError> {
        let mut units: Vec<Unit> = Vec::new();
        let mut t = lo;
        loop {
            let (start, end) = self.template.bucket_range(t);
            let mut exact = true;
            let prefixes: Vec<String> = kinds
                .iter()
                .map(|k| {
                    let (p, e) = self.template.list_prefix(&self.prefix, *k, t);
                    exact &= e;
                    p
                })
                .collect();
            let (ulo, uhi) = if exact {
                (start, end.saturating_sub(1))
            } else {
                (i64::MIN, i64::MAX)
            };
            match units.last_mut() {
                Some(last) if last.prefixes == prefixes => {
                    last.lo = last.lo.min(ulo);
                    last.hi = last.hi.max(uhi);
                }
                _ => units.push(Unit {
                    lo: ulo,
                    hi: uhi,
                    prefixes,
                }),
            }
            if units.len() > MAX_PARTITIONS {
                return Err(BadInput(format!(
                    "the time range spans more than {MAX_PARTITIONS} blob partitions; give a narrower since/until"
                ))
                .into());
            }
            if end > hi || end == i64::MAX {
                break;
            }
            t = end;
        }
        if desc {
            units.reverse();
        }
        Ok(units)
    }

    /// The query's time range, never past now (plus a minute of clock skew). Without
    /// `since`: the hour before the as-of time of page 1 (or before `until`); a scan from a
    /// position without as-of time (context, tail) the hour on the far side of it.
    fn range(&self, scan: &Scan) -> (i64, i64) {
        let (mut lo, mut hi) = scan.range();
        let now = chrono::Utc::now().timestamp_micros();
        hi = hi.min(now.saturating_add(60_000_000));
        if scan.filter.since_us.is_none() {
            match (scan.asof_ts, &scan.after) {
                (None, Some(p)) if !scan.filter.desc => {
                    hi = hi.min(p.ts.saturating_add(DEFAULT_RANGE_US))
                }
                (None, Some(p)) => lo = lo.max(p.ts.saturating_sub(DEFAULT_RANGE_US)),
                (asof, _) => {
                    let end = scan
                        .filter
                        .until_us
                        .unwrap_or(i64::MAX)
                        .min(asof.unwrap_or(now));
                    lo = lo.max(end.saturating_sub(DEFAULT_RANGE_US));
                }
            }
        }
        (lo, hi)
    }

    async fn list(
        &self,
        client: &BlobContainerClient,
        prefix: &str,
        unit: &Unit,
        budget: &Budget,
    ) -> Result<Vec<BlobInfo>, ReadError> {
        let opts = BlobContainerClientListBlobsOptions {
            prefix: Some(prefix.to_owned()),
            include: Some(vec![ListBlobsIncludeItem::Metadata]),
            ..Default::default()
        };
        let mut pages = client
            .list_blobs(Some(opts))
            .map_err(|e| self.fail("listing blobs", &e))?
            .into_pages();
        let mut out = Vec::new();
        loop {
            let page = match budget.answered("listing blobs", pages.next()).await? {
                None => break,
                Some(Ok(p)) => p,
                // Any other 404 to a listing is about the container too: Azure answers an
                // anonymous listing of a private one with `ResourceNotFound`, which must not
                // read as a container without logs.
                Some(Err(e))
                    if e.http_status() == Some(StatusCode::NotFound) && !container_missing(&e) =>
                {
                    return Err(BadInput(format!(
                        "container '{}' does not exist or is not readable with these credentials \
                         ({})",
                        self.target.container_name(),
                        self.endpoint
                    ))
                    .into())
                }
                Some(Err(e)) => return Err(self.fail("listing blobs", &e)),
            };
            self.stats.list_calls.fetch_add(1, Ordering::Relaxed);
            let body = page
                .into_model()
                .map_err(|e| self.fail("listing blobs", &e))?;
            for item in body.blob_items {
                let Some(name) = item.name else { continue };
                if !(name.ends_with(".ndjson") || name.ends_with(".ndjson.gz")) {
                    continue;
                }
                let meta = item.metadata.and_then(|m| m.values).unwrap_or_default();
                let at = |k: &str| meta.get(k).and_then(|v| parse_ts(v));
                let lo = at("first_ts").map_or(unit.lo, |t| t.max(unit.lo));
                let hi = at("last_ts").map_or(unit.hi, |t| t.min(unit.hi));
                let size = item.properties.and_then(|p| p.content_length).unwrap_or(0);
                out.push(BlobInfo { name, size, lo, hi });
            }
        }
        Ok(out)
    }

    /// Lists every prefix of a unit (one per kind) at once.
    async fn list_unit(
        &self,
        client: &BlobContainerClient,
        unit: &Unit,
        budget: &Budget,
    ) -> Result<Vec<BlobInfo>, ReadError> {
        let lists = futures::future::try_join_all(
            unit.prefixes
                .iter()
                .map(|p| self.list(client, p, unit, budget)),
        )
        .await?;
        Ok(lists.into_iter().flatten().collect())
    }

    /// Streams one blob through `on_line`; false when the deadline passed before its end.
    async fn read_blob<F: FnMut(&[u8], u64)>(
        &self,
        client: &BlobContainerClient,
        name: &str,
        budget: &Budget,
        on_line: F,
    ) -> Result<bool, ReadError> {
        let opts = BlobClientDownloadOptions {
            // One range request at a time per blob: the concurrency is across blobs.
            parallel: NonZero::new(1),
            ..Default::default()
        };
        let blob = client.blob_client(name);
        let download = blob.download(Some(opts));
        let result = match budget.answered("downloading a blob", download).await? {
            Ok(r) => r,
            // Deleted (retention) since the listing: nothing to read. Not the container.
            Err(e) if e.http_status() == Some(StatusCode::NotFound) && !container_missing(&e) => {
                return Ok(true)
            }
            Err(e) => return Err(self.fail("downloading a blob", &e)),
        };
        self.stats.blobs_downloaded.fetch_add(1, Ordering::Relaxed);
        let mut body = result.body;
        let mut dec = Decoder::Unknown(Lines {
            partial: Vec::new(),
            offset: 0,
            on_line,
        });
        loop {
            let Ok(next) = budget.answered("downloading a blob", body.next()).await else {
                // Stalled midway: what came so far stands, the rest is left unread.
                return Ok(false);
            };
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|e| self.fail("downloading a blob", &e))?;
            self.stats
                .bytes_downloaded
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if dec.feed(&chunk).is_err() {
                // Not gzip after all, or corrupt: what decoded so far stays valid.
                break;
            }
            if budget.late() {
                return Ok(false);
            }
        }
        dec.finish();
        Ok(true)
    }

    /// The matching records of one blob into `best` (those past the scan's position).
    async fn scan_into(
        &self,
        client: &BlobContainerClient,
        blob: &BlobInfo,
        scan: &Scan,
        range: (i64, i64),
        budget: &Budget,
        best: &Mutex<Best>,
    ) -> Result<bool, ReadError> {
        let mut matcher = LineMatcher::new(&scan.filter, range);
        self.read_blob(client, &blob.name, budget, |line, at| {
            if let Some((ts, mut rec)) = matcher.check(line) {
                let id = format!("{}:{at}", blob.name);
                if scan.past_after(ts, &id) {
                    rec.insert("id".into(), Value::String(id.clone()));
                    best.lock().push(ts, id, rec);
                }
            }
        })
        .await
    }

    pub fn find(&self, scan: &Scan) -> Result<Found, ReadError> {
        let (lo, hi) = self.range(scan);
        let desc = scan.filter.desc;
        let best = Mutex::new(Best {
            desc,
            limit: scan.filter.limit,
            found: Vec::new(),
        });
        if lo > hi {
            return Ok(Found {
                records: vec![],
                partial: false,
                resume: None,
            });
        }
        let units = self.units(&self.kinds(&scan.filter), lo, hi, desc)?;
        let budget = Budget::new(&self.cfg);
        // The bound of what was left unread when the budget ran out.
        let clamp = |(a, b): (i64, i64)| (a.max(lo), b.min(hi));
        let live = self.live()?;
        let client = &live.client;
        let unread = live.block_on(async {
            for (ui, unit) in units.iter().enumerate() {
                if !best.lock().could_take(unit.lo.max(lo), unit.hi.min(hi)) {
                    return Ok::<_, ReadError>(None);
                }
                let left = bound(desc, &units[ui..], |u| clamp((u.lo, u.hi)));
                if budget.late() || budget.out() && best.lock().secured(left) {
                    return Ok(Some(left));
                }
                let mut blobs: Vec<BlobInfo> = self
                    .list_unit(client, unit, &budget)
                    .await?
                    .into_iter()
                    .filter(|b| b.hi >= lo && b.lo <= hi)
                    .collect();
                if desc {
                    blobs.sort_by(|a, b| b.hi.cmp(&a.hi).then_with(|| b.name.cmp(&a.name)));
                } else {
                    blobs.sort_by(|a, b| a.lo.cmp(&b.lo).then_with(|| a.name.cmp(&b.name)));
                }
                let mut i = 0;
                while i < blobs.len() {
                    // Unread after this point: the rest of this partition and the later ones.
                    let rest = |from: usize| -> Vec<(i64, i64)> {
                        blobs[from..]
                            .iter()
                            .map(|b| (b.lo, b.hi))
                            .chain(units[ui + 1..].iter().map(|u| clamp((u.lo, u.hi))))
                            .collect()
                    };
                    // Past the byte or blob budget, a page still reads on until it has a
                    // record nothing unread can precede: every page moves forward.
                    let force = !best.lock().secured(bound(desc, &rest(i), |r| *r));
                    let mut wave = Vec::new();
                    let mut stopped = false;
                    while i < blobs.len() && wave.len() < self.cfg.concurrency.max(1) {
                        let b = &blobs[i];
                        if !best.lock().could_take(b.lo, b.hi) {
                            i += 1;
                            continue;
                        }
                        // Forced: one blob at a time, then look again.
                        if !budget.take_blob(force && wave.is_empty(), b.size) {
                            stopped = true;
                            break;
                        }
                        wave.push(b);
                        i += 1;
                    }
                    let (budget, best) = (&budget, &best);
                    let done = futures::stream::iter(wave.iter().map(|b| async move {
                        self.scan_into(client, b, scan, (lo, hi), budget, best)
                            .await
                            .map(|complete| (*b, complete))
                    }))
                    .buffer_unordered(self.cfg.concurrency.max(1))
                    .try_collect::<Vec<_>>()
                    .await?;
                    let cut: Vec<(i64, i64)> = done
                        .iter()
                        .filter(|(_, complete)| !complete)
                        .map(|(b, _)| (b.lo, b.hi))
                        .collect();
                    if stopped || !cut.is_empty() {
                        let mut left = rest(i);
                        let late = !cut.is_empty() || budget.late();
                        left.extend(cut);
                        if left.is_empty() {
                            return Ok(None);
                        }
                        let left = bound(desc, &left, |r| *r);
                        if late || best.lock().secured(left) {
                            return Ok(Some(left));
                        }
                    }
                }
            }
            Ok(None)
        })?;
        let mut best = best.into_inner();
        best.sort();
        Ok(Found::scanned(best.found, unread, desc))
    }

    pub fn summary(&self, filter: &Filter, spec: &Spec) -> Result<Value, ReadError> {
        let scan = Scan::whole(filter);
        let (lo, hi) = self.range(&scan);
        let grouper = Mutex::new(Grouper::default());
        let budget = Budget::new(&self.cfg);
        let units = self.units(&self.kinds(filter), lo, hi, false)?;
        let live = self.live()?;
        let client = &live.client;
        let complete = live.block_on(async {
            let mut blobs = Vec::new();
            for unit in &units {
                blobs.extend(
                    self.list_unit(client, unit, &budget)
                        .await?
                        .into_iter()
                        .filter(|b| b.hi >= lo && b.lo <= hi),
                );
            }
            let all = futures::stream::iter(blobs.iter().map(|b| {
                let grouper = &grouper;
                let budget = &budget;
                async move {
                    if !budget.take_blob(false, b.size) {
                        return Ok(false);
                    }
                    let mut matcher = LineMatcher::new(filter, (lo, hi));
                    self.read_blob(client, &b.name, budget, |line, _| {
                        if let Some((ts, rec)) = matcher.check(line) {
                            grouper.lock().add(spec, ts, &rec);
                        }
                    })
                    .await
                }
            }))
            .buffer_unordered(self.cfg.concurrency.max(1))
            .try_collect::<Vec<bool>>()
            .await?;
            Ok::<_, ReadError>(all.into_iter().all(|c| c))
        })?;
        Ok(grouper.into_inner().finish(!complete))
    }

    /// The record `{blob name}:{offset}`, or None.
    pub fn get(&self, id: &str) -> Result<Option<Map<String, Value>>, ReadError> {
        let Some((name, offset)) = parse_record_id(id).filter(|(name, _)| name.len() <= 1024)
        else {
            return Ok(None);
        };
        let budget = Budget::new(&self.cfg);
        let mut found: Option<Map<String, Value>> = None;
        let live = self.live()?;
        live.block_on(self.read_blob(&live.client, name, &budget, |line, at| {
            if at == offset && found.is_none() {
                found = serde_json::from_slice(line).ok();
            }
        }))?;
        Ok(found.map(|mut rec| {
            rec.insert("id".into(), Value::String(id.to_owned()));
            rec
        }))
    }

    /// Records of the blobs in the partitions from `list_from` to now whose names are not
    /// in `seen` (the live tail: new records only ever arrive in new blobs). Blobs whose
    /// records all predate `min_ts` are marked seen without being read. Returns the new
    /// records in time order and the names to pass next time (those still listed).
    pub fn poll(
        &self,
        filter: &Filter,
        list_from: i64,
        min_ts: i64,
        seen: HashSet<String>,
    ) -> Result<Polled, ReadError> {
        let now = chrono::Utc::now().timestamp_micros();
        let units = self.units(&self.kinds(filter), list_from.min(now), now, false)?;
        let budget = Budget::new(&self.cfg);
        let out = Mutex::new(Vec::<(i64, String, Map<String, Value>)>::new());
        let live = self.live()?;
        let client = &live.client;
        let listed = live.block_on(async {
            let mut listed: Vec<BlobInfo> = Vec::new();
            for unit in &units {
                listed.extend(self.list_unit(client, unit, &budget).await?);
            }
            let fresh: Vec<&BlobInfo> = listed
                .iter()
                .filter(|b| !seen.contains(&b.name) && b.hi >= min_ts)
                .collect();
            let read = futures::stream::iter(fresh.into_iter().map(|b| {
                let out = &out;
                let budget = &budget;
                async move {
                    if !budget.take_blob(false, b.size) {
                        return Ok((b.name.clone(), false));
                    }
                    let mut matcher = LineMatcher::new(filter, (min_ts, i64::MAX));
                    let complete = self
                        .read_blob(client, &b.name, budget, |line, at| {
                            if let Some((ts, mut rec)) = matcher.check(line) {
                                let id = format!("{}:{at}", b.name);
                                rec.insert("id".into(), Value::String(id.clone()));
                                out.lock().push((ts, id, rec));
                            }
                        })
                        .await?;
                    Ok::<_, ReadError>((b.name.clone(), complete))
                }
            }))
            .buffer_unordered(self.cfg.concurrency.max(1))
            .try_collect::<Vec<_>>()
            .await?;
            // A blob cut short by the budget is read again in full next time; its records
            // delivered now are dropped by the caller's id check.
            let unfinished: HashSet<String> = read
                .into_iter()
                .filter(|(_, complete)| !complete)
                .map(|(n, _)| n)
                .collect();
            Ok::<_, ReadError>(
                listed
                    .into_iter()
                    .map(|b| b.name)
                    .filter(|n| !unfinished.contains(n))
                    .collect::<Vec<_>>(),
            )
        })?;
        let mut out = out.into_inner();
        out.sort_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| super::cursor::id_key(&a.1).cmp(&super::cursor::id_key(&b.1)))
        });
        Ok(Polled {
            records: out.into_iter().map(|(_, _, r)| r).collect(),
            seen: listed,
        })
    }

    pub fn stats_json(&self) -> Value {
        json!({
            "list_calls": self.stats.list_calls.load(Ordering::Relaxed),
            "blobs_downloaded": self.stats.blobs_downloaded.load(Ordering::Relaxed),
            "bytes_downloaded": self.stats.bytes_downloaded.load(Ordering::Relaxed),
        })
    }
}

/// Desc: the newest time anything unread may hold; asc: the oldest.
fn bound<T>(desc: bool, rest: &[T], range: impl Fn(&T) -> (i64, i64)) -> i64 {
    if desc {
        rest.iter().map(|r| range(r).1).max().unwrap_or(i64::MIN)
    } else {
        rest.iter().map(|r| range(r).0).min().unwrap_or(i64::MAX)
    }
}

/// Where and how to read, as the writer resolves it, plus one case only a reader has: a
/// container URL with neither a SAS token nor a credential reads a public container
/// anonymously (requests go out unsigned, as under a SAS token already in the URL).
fn resolve(cfg: &AzureBlobConfig) -> Result<Endpoint, String> {
    if let (Some(url), None, None, None) = (
        cfg.container_url.as_deref(),
        cfg.credential.as_deref(),
        cfg.connection_string.as_deref(),
        cfg.account_url.as_deref(),
    ) {
        let parsed = azure_core::http::Url::parse(url.trim())
            .map_err(|_| "container_url is not a valid URL".to_string())?;
        if parsed.query().is_none_or(str::is_empty) {
            let mut with_sas = cfg.clone();
            with_sas.container_url = Some(format!("{}?sv=anonymous&sig=none", url.trim()));
            let mut e = conn::resolve(&with_sas)?;
            e.container_url.set_query(None);
            debug_assert!(e.auth == Auth::Sas);
            return Ok(e);
        }
    }
    conn::resolve(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(template: &str) -> BlobStore {
        BlobStore::open(BlobConfig::new(AzureBlobConfig {
            connection_string: Some("UseDevelopmentStorage=true".into()),
            name_template: template.into(),
            prefix: "svc/".into(),
            ..Default::default()
        }))
        .unwrap()
    }

    #[test]
    fn units_cover_the_range_by_hour_and_kind() {
        let s = store(naming::DEFAULT_TEMPLATE);
        let h = 3_600_000_000;
        let t0 = 1_795_453_200_000_000; // 2026-11-23 17:00 UTC
        let units = s
            .units(&[Kind::App, Kind::Http], t0 + 10, t0 + 2 * h + 5, true)
            .unwrap();
        let prefixes: Vec<Vec<String>> = units.iter().map(|u| u.prefixes.clone()).collect();
        assert_eq!(
            prefixes,
            [
                ["svc/app/2026/11/23/19/", "svc/http/2026/11/23/19/"],
                ["svc/app/2026/11/23/18/", "svc/http/2026/11/23/18/"],
                ["svc/app/2026/11/23/17/", "svc/http/2026/11/23/17/"],
            ]
        );
        assert_eq!((units[2].lo, units[2].hi), (t0, t0 + h - 1));
        let one = s.units(&[Kind::Http], t0, t0 + h - 1, false).unwrap();
        assert_eq!(one.len(), 1);
        assert!(s.units(&[Kind::App], t0, t0 + 5000 * h, false).is_err());
        let coarse = store("{yyyy}/{host}/{mm}{pid}{start}{seq}{ext}");
        let units = coarse.units(&[Kind::App], t0, t0 + 5 * h, false).unwrap();
        assert_eq!(units.len(), 1);
        assert_eq!((units[0].lo, units[0].hi), (i64::MIN, i64::MAX));
    }

    #[test]
    fn lines_split_across_chunks_with_offsets() {
        let mut got = Vec::new();
        let mut lines = Lines {
            partial: Vec::new(),
            offset: 0,
            on_line: |l: &[u8], at| got.push((String::from_utf8_lossy(l).into_owned(), at)),
        };
        lines.write_all(b"ab\ncd").unwrap();
        lines.write_all(b"e\n\nf").unwrap();
        drop(lines);
        assert_eq!(
            got,
            [
                ("ab\n".to_owned(), 0),
                ("cde\n".to_owned(), 3),
                ("\n".to_owned(), 7)
            ]
        );
    }

    #[test]
    fn gzip_and_plain_bodies_decode_alike() {
        use flate2::write::GzEncoder;
        let text = b"{\"a\":1}\n{\"a\":2}\n";
        let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::new(4));
        enc.write_all(text).unwrap();
        let gz = enc.finish().unwrap();
        for body in [gz.as_slice(), text.as_slice()] {
            let mut got = Vec::new();
            let mut d = Decoder::Unknown(Lines {
                partial: Vec::new(),
                offset: 0,
                on_line: |l: &[u8], at| got.push((l.len(), at)),
            });
            for chunk in body.chunks(5) {
                d.feed(chunk).unwrap();
            }
            d.finish();
            drop(d);
            assert_eq!(got, [(8, 0), (8, 8)]);
        }
    }

    #[test]
    fn the_container_is_named_from_its_url() {
        for (url, name) in [
            (
                "http://127.0.0.1:10000/devstoreaccount1/app-logs",
                "app-logs",
            ),
            (
                "https://acct.blob.core.windows.net/logs/?sv=1&sig=x",
                "logs",
            ),
        ] {
            let s = BlobStore::open(BlobConfig::new(AzureBlobConfig {
                container_url: Some(url.into()),
                ..Default::default()
            }))
            .unwrap();
            assert_eq!(s.target.container_name(), name, "{url}");
        }
        assert_eq!(
            store(naming::DEFAULT_TEMPLATE).target.container_name(),
            "logs"
        );
    }

    #[test]
    fn container_urls_without_a_token_read_anonymously() {
        let e = resolve(&AzureBlobConfig {
            container_url: Some("http://127.0.0.1:10000/devstoreaccount1/logs".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(e.auth, Auth::Sas);
        assert_eq!(e.container_url.query(), None);
        assert!(resolve(&AzureBlobConfig {
            container_url: Some("http://127.0.0.1:10000/devstoreaccount1/Bad_Name".into()),
            ..Default::default()
        })
        .is_err());
    }
}
