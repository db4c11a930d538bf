//! The read side: one filter set over every store the write side fills.
//!
//! `Filter` (filter.rs) is parsed and validated once; `files.rs` scans LocalFiles
//! directories (rotated and gzipped files, skipped by the time range their names and
//! modification times give), `blob.rs` reads Azure Blob containers (listing only the
//! partitions in the time range), `pg.rs` builds SQL with bound parameters only. Paging is by
//! keyset on (ts, id) with a signed cursor (cursor.rs); summaries group http records.

pub mod blob;
pub mod cursor;
pub mod exclude;
pub mod files;
pub mod filter;
pub mod lines;
pub mod pg;
pub mod summary;

use serde_json::{Map, Value};

use cursor::{Cursor, Pos, Signer};
use filter::{BadInput, Filter};

/// Why a read failed: the caller's input, or the store.
#[derive(Debug)]
pub enum ReadError {
    Bad(BadInput),
    Failed(String),
}

impl From<BadInput> for ReadError {
    fn from(b: BadInput) -> Self {
        ReadError::Bad(b)
    }
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Bad(b) => f.write_str(&b.0),
            ReadError::Failed(m) => f.write_str(m),
        }
    }
}

/// What a store is asked for one page.
#[derive(Clone, Debug)]
pub struct Scan {
    pub filter: Filter,
    /// Start strictly after this position (in the filter's order).
    pub after: Option<Pos>,
    pub asof_ts: Option<i64>,
    pub asof_id: Option<i64>,
}

impl Scan {
    /// Every record of `filter`, no paging position (summaries).
    pub fn whole(filter: &Filter) -> Scan {
        Scan {
            filter: filter.clone(),
            after: None,
            asof_ts: None,
            asof_id: None,
        }
    }

    /// The effective inclusive time range.
    pub fn range(&self) -> (i64, i64) {
        let mut lo = self.filter.since_us.unwrap_or(i64::MIN);
        let mut hi = self.filter.until_us.unwrap_or(i64::MAX);
        if let Some(a) = self.asof_ts {
            hi = hi.min(a);
        }
        if let Some(p) = &self.after {
            if self.filter.desc {
                hi = hi.min(p.ts);
            } else {
                lo = lo.max(p.ts);
            }
        }
        (lo, hi)
    }

    /// Whether (ts, id) is strictly past `after` in the scan's order.
    pub fn past_after(&self, ts: i64, id: &str) -> bool {
        match &self.after {
            None => true,
            Some(p) => {
                let o = cursor::cmp_pos(ts, id, p);
                if self.filter.desc {
                    o.is_lt()
                } else {
                    o.is_gt()
                }
            }
        }
    }
}

pub struct Found {
    /// In the scan's order, at most `limit`.
    pub records: Vec<Map<String, Value>>,
    pub partial: bool,
    /// When partial with no record: where to resume.
    pub resume: Option<Pos>,
}

impl Found {
    /// A scanner's page, `found` sorted in the scan's order. When part of the range was left
    /// unread (`unread`: the nearest time it could hold), only the records nothing unread can
    /// sort before are kept; an empty page then resumes just past that time, so every page
    /// moves forward.
    pub fn scanned(
        mut found: Vec<(i64, Pos, Map<String, Value>)>,
        unread: Option<i64>,
        desc: bool,
    ) -> Found {
        let mut resume = None;
        if let Some(bound) = unread {
            found.retain(|(ts, _, _)| if desc { *ts > bound } else { *ts < bound });
            if found.is_empty() {
                let ts = if desc {
                    bound.saturating_add(1)
                } else {
                    bound.saturating_sub(1)
                };
                resume = Some(Pos {
                    ts,
                    id: String::new(),
                });
            }
        }
        Found {
            records: found.into_iter().map(|(_, _, r)| r).collect(),
            partial: unread.is_some(),
            resume,
        }
    }
}

/// A page query, parsed and validated, before it reaches the store.
struct Plan {
    scan: Scan,
    fp: String,
    signed: bool,
    /// Page 1: the as-of position is taken now (the id sequence, for PostgreSQL).
    first_page: bool,
}

pub struct Page {
    pub records: Vec<Map<String, Value>>,
    pub next: Option<String>,
    pub partial: bool,
}

pub enum Store {
    Files(files::FilesStore),
    Blob(Box<blob::BlobStore>),
    Pg(Box<pg::PgStore>),
}

pub struct Reader {
    pub store: Store,
    signer: Signer,
}

fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// A reader's runtime: one worker thread, named for `ps`/`top`, built per process (see
/// the readers' `live`).
pub fn reader_runtime(thread_name: &str) -> Result<tokio::runtime::Runtime, ReadError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(thread_name)
        .enable_all()
        .build()
        .map_err(|e| ReadError::Failed(format!("cannot start runtime: {e}")))
}

pub fn ts_of(r: &Map<String, Value>) -> i64 {
    r.get("ts")
        .and_then(Value::as_str)
        .and_then(files::parse_ts)
        .unwrap_or(0)
}

pub fn id_of(r: &Map<String, Value>) -> String {
    r.get("id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// Splits the request object into the filter and the paging/internal parts.
fn split_request(req: &Map<String, Value>) -> (Map<String, Value>, Option<String>, Option<Pos>) {
    let mut filt = req.clone();
    let cursor = filt
        .remove("cursor")
        .and_then(|c| c.as_str().map(str::to_owned));
    let after = filt
        .remove("_after")
        .and_then(|a| serde_json::from_value::<Pos>(a).ok());
    (filt, cursor, after)
}

impl Reader {
    pub fn new(store: Store, identity: &str) -> Self {
        Reader {
            store,
            signer: Signer::new(identity),
        }
    }

    /// One page. `req` holds the filters plus `cursor` (from a previous page) or the
    /// internal `_after` position (tail and context: no as-of bound, no signature).
    pub fn query(&self, req: &Map<String, Value>) -> Result<Page, ReadError> {
        match &self.store {
            Store::Files(s) => {
                let plan = self.plan(req)?;
                let found = s.find(&plan.scan)?;
                Ok(self.finish(plan, found))
            }
            Store::Blob(s) => {
                let plan = self.plan(req)?;
                let found = s.find(&plan.scan)?;
                Ok(self.finish(plan, found))
            }
            Store::Pg(s) => s.block_on(self.query_pg(s, req)),
        }
    }

    /// [`Reader::query`] over PostgreSQL, as a future for the store's runtime.
    pub async fn query_pg(
        &self,
        s: &pg::PgStore,
        req: &Map<String, Value>,
    ) -> Result<Page, ReadError> {
        let mut plan = self.plan(req)?;
        if plan.first_page {
            plan.scan.asof_id = s.sequence_value().await;
        }
        let found = s.find(&plan.scan).await?;
        Ok(self.finish(plan, found))
    }

    fn plan(&self, req: &Map<String, Value>) -> Result<Plan, ReadError> {
        let (filt, cursor_text, after) = split_request(req);
        let filter = Filter::parse(&filt)?;
        let fp = filter.fingerprint();
        let (asof_ts, asof_id, after, signed) = match (cursor_text, after) {
            (Some(text), _) => {
                let c = self.signer.decode(&text, &fp)?;
                if c.desc != filter.desc {
                    return Err(BadInput(
                        "invalid cursor: it belongs to a query with another order".into(),
                    )
                    .into());
                }
                (Some(c.asof_ts), c.asof_id, Some(c.after), true)
            }
            (None, Some(pos)) => (None, None, Some(pos), false),
            (None, None) => (Some(now_us()), None, None, true),
        };
        Ok(Plan {
            first_page: signed && after.is_none(),
            scan: Scan {
                filter,
                after,
                asof_ts,
                asof_id,
            },
            fp,
            signed,
        })
    }

    fn finish(&self, plan: Plan, found: Found) -> Page {
        let Plan {
            scan, fp, signed, ..
        } = plan;
        let last = found
            .records
            .last()
            .map(|r| Pos {
                ts: ts_of(r),
                id: id_of(r),
            })
            .or(found.resume.clone());
        let more = found.records.len() >= scan.filter.limit || found.partial;
        let next = match last {
            Some(after) if more && signed => Some(self.signer.encode(&Cursor {
                v: 1,
                fp,
                desc: scan.filter.desc,
                asof_ts: scan.asof_ts.unwrap_or_else(now_us),
                asof_id: scan.asof_id,
                after,
            })),
            _ => None,
        };
        Page {
            records: found.records,
            next,
            partial: found.partial,
        }
    }

    /// One record by its id.
    pub fn get(&self, id: &str) -> Result<Option<Map<String, Value>>, ReadError> {
        match &self.store {
            Store::Files(s) => s.get(id),
            Store::Blob(s) => s.get(id),
            Store::Pg(s) => s.block_on(s.get(id)),
        }
    }

    pub fn summary(&self, req: &Map<String, Value>) -> Result<Value, ReadError> {
        let (filter, spec) = Self::summary_plan(req)?;
        match &self.store {
            Store::Files(s) => s.summary(&filter, &spec),
            Store::Blob(s) => s.summary(&filter, &spec),
            Store::Pg(s) => s.block_on(s.summary(&filter, &spec)),
        }
    }

    /// [`Reader::summary`] over PostgreSQL, as a future for the store's runtime.
    pub async fn summary_pg(
        &self,
        s: &pg::PgStore,
        req: &Map<String, Value>,
    ) -> Result<Value, ReadError> {
        let (filter, spec) = Self::summary_plan(req)?;
        s.summary(&filter, &spec).await
    }

    fn summary_plan(req: &Map<String, Value>) -> Result<(Filter, summary::Spec), ReadError> {
        let mut filt = req.clone();
        let by = filt
            .remove("by")
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| "route".into());
        let bucket = match filt.remove("bucket") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(
                filter::parse_relative(&s)
                    .filter(|us| *us >= 1_000_000)
                    .ok_or_else(|| {
                        BadInput(format!("bucket={s:?} is not a duration like 1m or 1h"))
                    })?
                    / 1_000_000,
            ),
            Some(other) => {
                return Err(BadInput(format!("bucket must be like 1m or 1h, got {other}")).into())
            }
        };
        let top = match filt.remove("slowest") {
            None | Some(Value::Null) => 5,
            Some(v) => v
                .as_u64()
                .filter(|n| *n <= 50)
                .ok_or_else(|| BadInput("slowest must be a whole number 0..50".into()))?
                as usize,
        };
        let spec = summary::Spec::new(&by, bucket, top)?;
        let mut filter = Filter::parse(&filt)?;
        if spec.http_only() && filter.kind.is_none() {
            filter.kind = Some("http".into());
        }
        Ok((filter, spec))
    }
}
