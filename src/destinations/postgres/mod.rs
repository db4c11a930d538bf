//! PostgreSQL: batches go in with one binary `COPY ... FROM STDIN` each, into a table
//! logsluice creates, migrates forward and partitions by kind and UTC day. The writer runs
//! on its own OS thread; sqlx runs on a current-thread tokio runtime owned by the writer.
//!
//! One connection per writer: batches are written one after another, so a larger pool
//! would sit idle. It is opened on first use and reopened after any connection-level
//! failure (server restart, reset, timeout), so a restart costs one retried attempt.

pub mod copy;
pub mod schema;

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgDatabaseError, PgSeverity};
use sqlx::{AssertSqlSafe, Connection, Row};

use super::{Abort, Outcome, WriteError, Writer};
use crate::breaker::Breaker;
use crate::config::PostgresConfig;
use crate::destinations;
use crate::encode::write_ndjson;
use crate::record::{Kind, Record};
use schema::{Layout, Names, KINDS};

const US_PER_DAY: i64 = 86_400_000_000;
/// Line-number hints used per batch before isolation falls back to halving. A hint finds
/// one offender per COPY (halving needs about 2·log2(n/bad) of them); what follows it goes
/// on in pieces of [`HINT_PIECE`] rows, so each hint resends at most that many rows, and a
/// batch made entirely of bad records costs O(hints · piece + n log n) rows.
const MAX_LINE_HINTS: usize = 1024;
const HINT_PIECE: usize = 256;
/// How many attempts' time a batch refused for its data may spend isolating its bad
/// records (each costs a few round trips); what is not sorted out by then is counted as
/// invalid, the good records found are kept.
const ISOLATION_ATTEMPTS: u32 = 4;
/// COPY data is sent whenever this much is encoded.
const SEND_SLICE_BYTES: usize = 256 << 10;
/// Rows removed per DELETE when a plain (unpartitioned) table applies retention.
const DELETE_CHUNK: i64 = 10_000;
/// The least time between two NOTIFYs on one channel from this process: NOTIFY takes a
/// database-wide lock at commit, so a busy writer must not send one per batch.
const NOTIFY_GAP: Duration = Duration::from_millis(250);

/// Server processes of given-up connections remembered for ending, at most (one is added
/// per connection given up, and all are ended by the next connection).
const MAX_ORPHANS: usize = 16;
/// Ends the given server processes (pid and start time, so that a later process given the
/// same pid is never touched): a statement cut off by the attempt's time limit may still
/// run or wait for a lock, and a COMMIT may still be waiting for a synchronous standby.
/// Allowed for processes of the same role.
const END_ORPHANS: &str = "SELECT count(pg_terminate_backend(a.pid)) FROM pg_stat_activity a \
     JOIN unnest($1::int4[], $2::text[]) AS o(pid, started) ON a.pid = o.pid \
     AND to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') = o.started \
     WHERE a.pid <> pg_backend_pid()";

/// A day no partition can be made for (kind, day number since the epoch), and why.
type Refused = ((Kind, i64), String);

/// When each channel was last notified by this process (every writer of the process).
static LAST_NOTIFY: std::sync::LazyLock<
    parking_lot::Mutex<std::collections::HashMap<String, Instant>>,
> = std::sync::LazyLock::new(Default::default);

/// Takes the channel's notify slot if the last NOTIFY is at least [`NOTIFY_GAP`] old.
fn notify_slot(channel: &str) -> bool {
    let now = Instant::now();
    let mut last = LAST_NOTIFY.lock();
    match last.get(channel) {
        Some(t) if now.duration_since(*t) < NOTIFY_GAP => false,
        _ => {
            last.insert(channel.to_owned(), now);
            true
        }
    }
}

/// `postgresql://user:***@host:port/db?...`: the DSN with its password (in the user info
/// or a `password=` parameter) masked. Safe for messages, reprs and debug output.
pub fn redact_dsn(dsn: &str) -> String {
    let (scheme, rest) = match dsn.find("://") {
        Some(i) => (&dsn[..i + 3], &dsn[i + 3..]),
        None => return "<unparseable DSN>".into(),
    };
    let (authority, tail) = rest.split_at(authority_end(rest));
    let authority = match authority.rfind('@') {
        Some(at) => {
            let (userinfo, host) = authority.split_at(at);
            match userinfo.find(':') {
                Some(colon) => format!("{}:***{host}", &userinfo[..colon]),
                None => authority.to_owned(),
            }
        }
        None => authority.to_owned(),
    };
    let tail = match tail.find('?') {
        Some(q) => {
            let params: Vec<String> = tail[q + 1..]
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => p.to_owned(),
                })
                .collect();
            format!("{}?{}", &tail[..q], params.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}{authority}{tail}")
}

/// Where the `user:password@host:port` part of a DSN (after `://`) ends. A password may
/// hold `/`, `?` or `#` unencoded, so the user info runs to the last `@`: cutting at the
/// first `/` would leave such a password unmasked.
fn authority_end(rest: &str) -> usize {
    let from = rest.rfind('@').unwrap_or(0);
    rest[from..]
        .find(['/', '?', '#'])
        .map_or(rest.len(), |i| from + i)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The password spellings a DSN carries (raw and percent-decoded), to scrub from messages.
pub(crate) fn dsn_secrets(dsn: &str) -> Vec<String> {
    let mut out = Vec::new();
    let rest = dsn.split_once("://").map_or(dsn, |(_, r)| r);
    let authority = &rest[..authority_end(rest)];
    if let Some((userinfo, _)) = authority.rsplit_once('@') {
        if let Some((_, pw)) = userinfo.split_once(':') {
            out.push(pw.to_owned());
        }
    }
    if let Some((_, query)) = rest.split_once('?') {
        for p in query.split('&') {
            if let Some((k, v)) = p.split_once('=') {
                if k.eq_ignore_ascii_case("password") {
                    out.push(v.to_owned());
                }
            }
        }
    }
    // A DSN without a password falls back to PGPASSWORD, as libpq does.
    if let Ok(pw) = std::env::var("PGPASSWORD") {
        out.push(pw);
    }
    let decoded: Vec<String> = out.iter().map(|p| percent_decode(p)).collect();
    out.extend(decoded);
    out.retain(|p| p.len() >= 3);
    out.sort_by_key(|p| std::cmp::Reverse(p.len()));
    out.dedup();
    out
}

/// What a failed operation means for the batch.
#[derive(Debug)]
enum Failure {
    /// The data of some row was refused (SQLSTATE classes 22 and 23): isolate it.
    Data {
        code: String,
        message: String,
        line: Option<usize>,
    },
    /// The table or a column vanished: re-check the schema, then retry.
    Schema(String),
    Transient {
        message: String,
        drop_conn: bool,
    },
    /// The server could not take this batch as it is (see [`ErrorKind::Oversized`]).
    Oversized(String),
    Permanent(String),
}

/// `COPY logs, line 12, column message: "..."` -> 12.
fn copy_line(context: &str) -> Option<usize> {
    context.lines().find_map(|l| {
        let rest = l.trim_start().strip_prefix("COPY ")?;
        let at = rest.find(", line ")?;
        let digits: String = rest[at + 7..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    })
}

/// The server's message and SQLSTATE (`… (SQLSTATE 42P01)`), as every error from the
/// server is reported: sqlx's own display appends the server's source line instead.
pub(crate) fn server_message(db: &dyn sqlx::error::DatabaseError) -> String {
    format!(
        "{} (SQLSTATE {})",
        db.message(),
        db.code().unwrap_or_default()
    )
}

/// What a server error's SQLSTATE means for the batch.
#[derive(Debug, PartialEq, Eq)]
enum Sqlstate {
    /// The data of a row: isolate the offenders, keep the rest.
    Data,
    /// The table or a column is gone.
    Schema,
    Permanent,
    /// Retry, then write the batch in smaller pieces: the lock table filled by a batch
    /// spanning many day partitions (53200), a COPY past `statement_timeout` (57014).
    Oversized,
    /// Retry on the same connection.
    Retry,
    /// Retry on a fresh connection.
    Reconnect,
}

fn sqlstate(code: &str) -> Sqlstate {
    let class = code.get(..2).unwrap_or("");
    match (class, code) {
        // 54000: a value past one of the server's limits (a jsonb over 256 MB, a string over
        // 1 GB): that record's own data, which no retry can make fit.
        ("22" | "23", _) | (_, "54000") => Sqlstate::Data,
        (_, "42P01" | "42703") => Sqlstate::Schema,
        ("28" | "3D", _) | (_, "42501" | "3F000") => Sqlstate::Permanent,
        (_, "53200" | "57014") => Sqlstate::Oversized,
        (_, "40001" | "40P01" | "55P03" | "55006") => Sqlstate::Retry,
        ("42", _) => Sqlstate::Permanent,
        _ => Sqlstate::Reconnect,
    }
}

/// The SQLSTATE of a server error, if `e` is one.
fn sqlstate_of(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

fn classify(e: &sqlx::Error) -> Failure {
    match e {
        sqlx::Error::Database(db) => {
            let code = sqlstate_of(e).unwrap_or_default();
            let message = server_message(db.as_ref());
            match sqlstate(&code) {
                Sqlstate::Data => Failure::Data {
                    line: db
                        .try_downcast_ref::<PgDatabaseError>()
                        .and_then(|pg| pg.r#where())
                        .and_then(copy_line),
                    code,
                    message,
                },
                Sqlstate::Schema => Failure::Schema(message),
                Sqlstate::Permanent => Failure::Permanent(message),
                Sqlstate::Oversized => Failure::Oversized(message),
                Sqlstate::Retry => Failure::Transient {
                    message,
                    drop_conn: false,
                },
                Sqlstate::Reconnect => Failure::Transient {
                    message,
                    drop_conn: true,
                },
            }
        }
        sqlx::Error::Tls(e) => Failure::Permanent(format!("TLS: {e}")),
        sqlx::Error::Configuration(e) => Failure::Permanent(format!("configuration: {e}")),
        sqlx::Error::Io(e) => Failure::Transient {
            message: format!("connection: {e}"),
            drop_conn: true,
        },
        other => Failure::Transient {
            message: other.to_string(),
            drop_conn: true,
        },
    }
}

pub struct Postgres {
    rt: tokio::runtime::Runtime,
    inner: Inner,
    /// Cuts the conversation with the server short when the pipeline closes past its
    /// deadline (a connect to a host that never answers, a COMMIT never acknowledged).
    abort: Arc<Abort>,
}

struct Inner {
    cfg: PostgresConfig,
    names: Names,
    opts: PgConnectOptions,
    /// The DSN without its password, for messages.
    target: String,
    secrets: Vec<String>,
    conn: Option<PgConnection>,
    /// The server process behind `conn`, and how to read and look up transaction ids there.
    backend: Option<Backend>,
    /// Server processes of connections given up mid-conversation (an attempt cut off by its
    /// time limit): they may still hold a transaction and its locks, or wait in a COMMIT, and
    /// are ended from the next connection.
    orphans: Vec<Backend>,
    /// A batch whose COMMIT was sent but never answered: the server may have committed it.
    /// The next attempt asks the server instead of sending the batch again.
    in_doubt: Option<InDoubt>,
    /// Known once the schema has been checked (and created or migrated) on this connection.
    layout: Option<Layout>,
    /// (kind, day number since the epoch) of day partitions known to exist.
    days: HashSet<(Kind, i64)>,
    /// COPY statements: app columns only, and all columns.
    copy_sql: [String; 2],
    buf: Vec<u8>,
    next_maintenance: Instant,
    maintenance_breaker: Breaker,
    notices: Vec<(u16, String)>,
    channel: String,
    /// A batch committed since the last NOTIFY (sent when the channel's slot frees up, on
    /// the next batch or the next idle tick).
    notify_pending: bool,
}

/// A server process, told apart from a later one given the same pid by its start time.
#[derive(Clone, Debug)]
struct Backend {
    pid: i32,
    started: String,
    /// `SELECT` of the current transaction's id, and of a transaction's status by its id:
    /// `pg_current_xact_id`/`pg_xact_status` (13+), `txid_current`/`txid_status` (10-12).
    xid_sql: Option<(&'static str, &'static str)>,
    /// Which server's transaction ids these are: its cluster's system identifier and its
    /// timeline, `?` for a part the role may not read. A failover lands on another cluster
    /// or, for a promoted standby (same system identifier), on a new timeline: its ids go
    /// their own way from there, and one that reads "committed" there may be a later
    /// transaction of its own.
    server: String,
}

/// A transaction whose COMMIT went out without an answer (the attempt's time ran out, or
/// the connection broke): its id, the server it belongs to, and the records left out of
/// it as data errors.
#[derive(Debug)]
struct InDoubt {
    xid: String,
    server: String,
    bad: Vec<(usize, String)>,
}

/// How a batch's COPY went.
enum Copied {
    /// Committed, by this attempt or by an earlier one whose answer was lost; the records
    /// named (index in the batch, reason) were left out as data errors.
    Done(Vec<(usize, String)>),
    /// The server refused the data of a row of `kept` (indexes in the batch); `set_aside`
    /// were left out before the COPY.
    Refused {
        kept: Vec<usize>,
        set_aside: Vec<(usize, String)>,
        message: String,
        line: Option<usize>,
    },
}

/// Whether a COMMIT's outcome is known from its result: it succeeded, or the server
/// answered with an ERROR (the transaction is rolled back). A lost connection, a timeout or
/// a FATAL (a backend ended while it waited for a synchronous standby, after committing
/// locally) leave it unknown.
fn commit_known(result: &Result<(), sqlx::Error>) -> bool {
    match result {
        Ok(()) => true,
        Err(sqlx::Error::Database(db)) => db
            .try_downcast_ref::<PgDatabaseError>()
            .is_some_and(|pg| pg.severity() == PgSeverity::Error),
        Err(_) => false,
    }
}

fn secs(v: f64) -> Duration {
    crate::config::seconds(v).max(Duration::from_millis(1))
}

/// The DSN's connection options, or why it cannot be used (its password scrubbed).
fn connect_options(cfg: &PostgresConfig) -> Result<PgConnectOptions, String> {
    PgConnectOptions::from_str(&cfg.dsn).map_err(|e| {
        let message = format!("invalid DSN {}: {e}", redact_dsn(&cfg.dsn));
        scrub(&dsn_secrets(&cfg.dsn), message)
    })
}

/// What can be checked without connecting: the names and the DSN (at construction, so a
/// typo is a `ValueError` there, not a stream of failed batches).
pub fn validate(cfg: &PostgresConfig) -> Result<(), String> {
    Names::new(&cfg.schema, &cfg.table)?;
    connect_options(cfg).map(drop)
}

impl Postgres {
    /// Validates the configuration; connecting waits for the first batch.
    pub fn open(cfg: PostgresConfig) -> Result<Self, WriteError> {
        let names = Names::new(&cfg.schema, &cfg.table).map_err(WriteError::permanent)?;
        let secrets = dsn_secrets(&cfg.dsn);
        let target = redact_dsn(&cfg.dsn);
        // PostgreSQL takes at most i32::MAX milliseconds.
        let statement_ms = (cfg.statement_timeout * 1000.0)
            .round()
            .clamp(1.0, f64::from(i32::MAX)) as u64;
        let opts = connect_options(&cfg)
            .map_err(WriteError::permanent)?
            .application_name(&cfg.application_name)
            .options([("statement_timeout", format!("{statement_ms}"))]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| WriteError::transient(format!("cannot start runtime: {e}")))?;
        let channel = names.notify_channel();
        Ok(Postgres {
            rt,
            abort: Arc::new(Abort::default()),
            inner: Inner {
                copy_sql: [
                    names.copy_statement(copy::APP_COLUMNS),
                    names.copy_statement(copy::COLUMNS.len()),
                ],
                names,
                opts,
                target,
                secrets,
                conn: None,
                backend: None,
                orphans: Vec::new(),
                in_doubt: None,
                layout: None,
                days: HashSet::new(),
                buf: Vec::with_capacity(1 << 20),
                next_maintenance: Instant::now(),
                maintenance_breaker: Breaker::new(3, Duration::from_secs(600)),
                notices: Vec::new(),
                channel,
                notify_pending: false,
                cfg,
            },
        })
    }
}

impl Postgres {
    /// Lets `abort` cut the writer's I/O short.
    pub fn abortable_by(mut self, abort: Arc<Abort>) -> Self {
        self.abort = abort;
        self
    }
}

pub(crate) fn scrub(secrets: &[String], mut message: String) -> String {
    for s in secrets {
        if message.contains(s.as_str()) {
            message = message.replace(s.as_str(), "***");
        }
    }
    message
}

/// The server process behind a new connection, and whether the server can tell a
/// transaction's status by its id; `None` when it cannot be asked (then an unanswered
/// COMMIT's batch is sent again, as any client would).
async fn identify(conn: &mut PgConnection) -> Option<Backend> {
    let row = sqlx::query(
        "SELECT pg_backend_pid(), \
         (SELECT to_char(backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') \
          FROM pg_stat_activity WHERE pid = pg_backend_pid()), \
         to_regprocedure('pg_xact_status(xid8)') IS NOT NULL, \
         to_regprocedure('txid_status(bigint)') IS NOT NULL, \
         CASE WHEN has_function_privilege(to_regprocedure('pg_control_system()'), 'EXECUTE') \
              THEN (SELECT system_identifier::text FROM pg_control_system()) END, \
         CASE WHEN pg_is_in_recovery() THEN NULL \
              WHEN has_function_privilege(to_regprocedure('pg_walfile_name(pg_lsn)'), 'EXECUTE') \
              AND has_function_privilege(to_regprocedure('pg_current_wal_lsn()'), 'EXECUTE') \
              THEN substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END",
    )
    .fetch_one(&mut *conn)
    .await
    .ok()?;
    let xid_sql = match (row.try_get(2).ok()?, row.try_get(3).ok()?) {
        (true, _) => Some((
            "SELECT pg_current_xact_id()::text",
            "SELECT pg_xact_status($1::text::xid8)::text",
        )),
        (false, true) => Some((
            "SELECT txid_current()::text",
            "SELECT txid_status($1::text::bigint)::text",
        )),
        (false, false) => None,
    };
    Some(Backend {
        pid: row.try_get(0).ok()?,
        started: row.try_get::<Option<String>, _>(1).ok()??,
        xid_sql,
        server: format!(
            "{}/{}",
            row.try_get::<Option<String>, _>(4)
                .ok()?
                .as_deref()
                .unwrap_or("?"),
            row.try_get::<Option<String>, _>(5)
                .ok()?
                .as_deref()
                .unwrap_or("?"),
        ),
    })
}

/// The batch's records whose day can have a partition (indexes in the batch), and the
/// others with the reason.
fn set_apart(batch: &[Arc<Record>], refused: &[Refused]) -> (Vec<usize>, Vec<(usize, String)>) {
    if refused.is_empty() {
        return ((0..batch.len()).collect(), Vec::new());
    }
    let mut kept = Vec::with_capacity(batch.len());
    let mut set_aside = Vec::new();
    for (i, r) in batch.iter().enumerate() {
        let key = (r.kind, r.ts_us.div_euclid(US_PER_DAY));
        match refused.iter().find(|(k, _)| *k == key) {
            Some((_, why)) => set_aside.push((i, why.clone())),
            None => kept.push(i),
        }
    }
    (kept, set_aside)
}

async fn exec(conn: &mut PgConnection, sql: String) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(conn)
        .await
        .map(|_| ())
}

/// `BEGIN`, and the new transaction's id when the server can tell its status later (in
/// the same round trip).
async fn begin(
    conn: &mut PgConnection,
    backend: Option<&Backend>,
) -> Result<Option<String>, sqlx::Error> {
    match backend.and_then(|b| b.xid_sql) {
        Some((current, _)) => {
            let row = sqlx::raw_sql(AssertSqlSafe(format!("BEGIN; {current}")))
                .fetch_one(&mut *conn)
                .await?;
            Ok(Some(row.try_get(0)?))
        }
        None => exec(conn, "BEGIN".into()).await.map(|()| None),
    }
}

/// `COMMIT`, leaving `in_doubt` set while its outcome is unknown: when the answer never
/// comes (the attempt's time ran out, the connection broke) the server may still have
/// committed, and the next attempt asks it rather than sending the batch again.
async fn commit(
    conn: &mut PgConnection,
    backend: Option<&Backend>,
    xid: Option<String>,
    in_doubt: &mut Option<InDoubt>,
    bad: &[(usize, String)],
) -> Result<(), sqlx::Error> {
    *in_doubt = xid.map(|xid| InDoubt {
        xid,
        server: backend.map(|b| b.server.clone()).unwrap_or_default(),
        bad: bad.to_vec(),
    });
    let result = exec(conn, "COMMIT".into()).await;
    if commit_known(&result) {
        *in_doubt = None;
    }
    result
}

/// One COPY in its own transaction. A COPY still waiting (on a lock) when the attempt
/// gives up completes later on the server; as an implicit transaction it would then commit
/// beside the retry's copy. In a transaction it cannot commit without our COMMIT (and its
/// server process is ended from the next connection).
async fn copy_committed(
    conn: &mut PgConnection,
    backend: Option<&Backend>,
    sql: &[String; 2],
    buf: &mut Vec<u8>,
    rows: &[&Record],
    in_doubt: &mut Option<InDoubt>,
    set_aside: &[(usize, String)],
) -> Result<(), sqlx::Error> {
    let xid = begin(conn, backend).await?;
    match copy_rows(conn, sql, buf, rows).await {
        Ok(_) => commit(conn, backend, xid, in_doubt, set_aside).await,
        Err(e) => {
            // Ends the failed transaction; if the connection broke, the error says so.
            let _ = exec(conn, "ROLLBACK".into()).await;
            Err(e)
        }
    }
}

async fn copy_rows(
    conn: &mut PgConnection,
    sql: &[String; 2],
    buf: &mut Vec<u8>,
    rows: &[&Record],
) -> Result<u64, sqlx::Error> {
    let all_columns = rows.iter().any(|r| copy::needs_all_columns(r));
    let mut copy_in = conn.copy_in_raw(&sql[all_columns as usize]).await?;
    // Encoded and sent in slices, so the server parses and inserts the first rows while the
    // rest are still being encoded.
    buf.clear();
    copy::header(buf);
    let last = rows.len().saturating_sub(1);
    for (i, r) in rows.iter().enumerate() {
        copy::row(buf, r, all_columns);
        if i == last {
            copy::trailer(buf);
        }
        if buf.len() >= SEND_SLICE_BYTES || i == last {
            if let Err(e) = copy_in.send(&buf[..]).await {
                let _ = copy_in.abort("logsluice: sending failed").await;
                return Err(e);
            }
            buf.clear();
        }
    }
    if rows.is_empty() {
        copy::trailer(buf);
        copy_in.send(&buf[..]).await?;
    }
    copy_in.finish().await
}

impl Inner {
    /// Gives the connection up. Its server process may outlive it (a statement still
    /// running or waiting, a COMMIT waiting for a standby): it is ended from the next
    /// connection.
    fn drop_conn(&mut self) {
        if self.conn.take().is_some() {
            if let Some(backend) = self.backend.take() {
                if self.orphans.len() < MAX_ORPHANS {
                    self.orphans.push(backend);
                }
            }
        }
        self.backend = None;
        self.layout = None;
    }

    fn fail(&mut self, f: Failure) -> WriteError {
        match f {
            Failure::Transient { message, drop_conn } => {
                if drop_conn {
                    self.drop_conn();
                }
                WriteError::transient(scrub(&self.secrets, message))
            }
            Failure::Permanent(message) => {
                self.drop_conn();
                WriteError::permanent(scrub(&self.secrets, message))
            }
            Failure::Oversized(message) => WriteError::oversized(scrub(&self.secrets, message)),
            Failure::Schema(message) => {
                self.layout = None;
                self.days.clear();
                let m = format!("{} changed underneath: {message}", self.names.display());
                WriteError::transient(scrub(&self.secrets, m))
            }
            Failure::Data { message, .. } => WriteError::transient(scrub(&self.secrets, message)),
        }
    }

    async fn connect(&mut self) -> Result<(), WriteError> {
        if self.conn.is_some() {
            return Ok(());
        }
        let timeout = secs(self.cfg.connect_timeout);
        let result = tokio::time::timeout(timeout, async {
            let mut conn = PgConnection::connect_with(&self.opts).await?;
            let backend = identify(&mut conn).await;
            Ok::<_, sqlx::Error>((conn, backend))
        })
        .await;
        let (conn, backend) = match result {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                let f = match classify(&e) {
                    Failure::Permanent(m) => {
                        Failure::Permanent(format!("cannot connect to {}: {m}", self.target))
                    }
                    Failure::Transient { message, .. }
                    | Failure::Schema(message)
                    | Failure::Oversized(message)
                    | Failure::Data { message, .. } => Failure::Transient {
                        message: format!("cannot connect to {}: {message}", self.target),
                        drop_conn: true,
                    },
                };
                return Err(self.fail(f));
            }
            Err(_) => {
                return Err(WriteError::transient(format!(
                    "cannot connect to {}: timed out after {:.1}s",
                    self.target,
                    timeout.as_secs_f64()
                )))
            }
        };
        self.conn = Some(conn);
        self.backend = backend;
        self.layout = None;
        Ok(())
    }

    async fn ensure_schema(&mut self) -> Result<Layout, WriteError> {
        if let Some(layout) = self.layout {
            return Ok(layout);
        }
        let conn = self.conn.as_mut().expect("connected");
        let result = schema_check(conn, &self.names, &self.cfg).await;
        if result.is_err() {
            let _ = exec(conn, "ROLLBACK".into()).await;
        }
        match result {
            Ok((layout, notes)) => {
                self.notices.extend(notes);
                self.layout = Some(layout);
                self.days.clear();
                Ok(layout)
            }
            Err(SchemaError::Db(e)) => Err(self.fail(classify(&e))),
            Err(SchemaError::Refused(m)) => Err(WriteError::permanent(scrub(&self.secrets, m))),
        }
    }

    /// Creates the day partitions the batch needs (under the DDL advisory lock). Returns
    /// the days no partition can be made for, with the reason: their records are refused as
    /// data, the rest of the batch is written.
    async fn ensure_days(&mut self, batch: &[Arc<Record>]) -> Result<Vec<Refused>, sqlx::Error> {
        let mut needed: Vec<(Kind, i64)> = Vec::new();
        for r in batch {
            let key = (r.kind, r.ts_us.div_euclid(US_PER_DAY));
            if !self.days.contains(&key) && !needed.contains(&key) {
                needed.push(key);
            }
        }
        if needed.is_empty() {
            return Ok(Vec::new());
        }
        let conn = self.conn.as_mut().expect("connected");
        let refused = create_days(conn, &self.names, &needed).await?;
        self.days.extend(
            needed
                .into_iter()
                .filter(|key| !refused.iter().any(|(k, _)| k == key)),
        );
        Ok(refused)
    }

    /// Gives up the doubt: the batch is sent again (`None`: not written), with a warning
    /// when it may be stored twice.
    fn send_again(&mut self, notice: Option<String>) -> Option<Vec<(usize, String)>> {
        self.in_doubt = None;
        self.notices.extend(notice.map(|n| (30, n)));
        None
    }

    /// Before anything else on a new attempt: ends the server processes of connections
    /// given up mid-conversation, and learns the outcome of a COMMIT left unanswered.
    /// `Some(records left out)` when that COMMIT went through: the batch is written and not
    /// sent again. An error while the server has not settled it yet (its process still
    /// ending): sending the batch again then could store it twice.
    async fn settle_earlier(
        &mut self,
        deadline: Instant,
    ) -> Result<Option<Vec<(usize, String)>>, WriteError> {
        let conn = self.conn.as_mut().expect("connected");
        if !self.orphans.is_empty() {
            let pids: Vec<i32> = self.orphans.iter().map(|b| b.pid).collect();
            let started: Vec<String> = self.orphans.iter().map(|b| b.started.clone()).collect();
            let ended = sqlx::query(END_ORPHANS)
                .bind(pids)
                .bind(started)
                .execute(&mut *conn)
                .await;
            match ended.map_err(|e| classify(&e)) {
                // Permanent: not allowed to (another role's process); it ends by itself
                // once it finds the client gone.
                Ok(_) | Err(Failure::Permanent(_)) => self.orphans.clear(),
                Err(f) => return Err(self.fail(f)),
            }
        }
        let Some((xid, then)) = self
            .in_doubt
            .as_ref()
            .map(|d| (d.xid.clone(), d.server.clone()))
        else {
            return Ok(None);
        };
        let Some((_, status_sql)) = self.backend.as_ref().and_then(|b| b.xid_sql) else {
            // This server cannot tell: sent again.
            return Ok(self.send_again(None));
        };
        // Identity parts a role cannot read are `?` on both sides: then only the parts
        // read are compared, and the status is trusted as it was before the check existed.
        let now = self.backend.as_ref().map_or("", |b| b.server.as_str());
        if now != then {
            // Another server since the COMMIT (a failover): its ids are not the ones the
            // transaction was given, so whatever it says of this one cannot be trusted.
            let notice = format!(
                "reconnected to another server (system/timeline {now}, was {then}): whether \
                 transaction {xid} committed cannot be told there, so its batch is sent again \
                 and may be stored twice"
            );
            return Ok(self.send_again(Some(notice)));
        }
        let mut pause = Duration::from_millis(10);
        loop {
            let conn = self.conn.as_mut().expect("connected");
            let status = sqlx::query(status_sql)
                .bind(&xid)
                .fetch_one(&mut *conn)
                .await
                .and_then(|row| row.try_get::<Option<String>, _>(0));
            match status {
                // "Transaction ID … is in the future": this server never saw it (another
                // server took over the address), so the batch is not stored here.
                Err(e) if sqlstate_of(&e).as_deref() == Some("22023") => {
                    return Ok(self.send_again(Some(format!(
                        "the server no longer knows transaction {xid} (another server took \
                         over?): its batch is sent again"
                    ))));
                }
                Err(e) => return Err(self.fail(classify(&e))),
                // Too old for the server to tell: sent again rather than held for good.
                Ok(None) => {
                    return Ok(self.send_again(Some(format!(
                        "the server cannot tell any more whether transaction {xid} committed: \
                         its batch is sent again and may be stored twice"
                    ))));
                }
                Ok(Some(s)) if s == "committed" => {
                    return Ok(self.in_doubt.take().map(|d| d.bad));
                }
                Ok(Some(s)) if s == "aborted" => return Ok(self.send_again(None)),
                // In progress: its process still ending or waiting.
                Ok(_) => {}
            }
            if Instant::now() + pause >= deadline {
                return Err(WriteError::transient(format!(
                    "the COMMIT of an earlier attempt (transaction {xid}) is not settled on the \
                     server yet; the batch is not sent again while it may still be committed"
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// One attempt: the COPY (with connecting and schema work) within `timeout`; a batch
    /// that failed on its data gets [`ISOLATION_ATTEMPTS`] times as long to sort out its bad
    /// records, which take many round trips (cut short, every good record would be lost).
    async fn write(
        &mut self,
        batch: &[Arc<Record>],
        timeout: Duration,
    ) -> Result<Outcome, WriteError> {
        let deadline = Instant::now() + timeout;
        let copied = tokio::time::timeout(timeout, self.copy_batch(batch, deadline)).await;
        let bad = match copied {
            Err(_) => return Err(self.timed_out(timeout)),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(Copied::Done(bad))) => bad,
            Ok(Ok(Copied::Refused {
                kept,
                set_aside,
                message,
                line,
            })) => {
                // Checked between statements; the hard limit, one attempt later, is for a
                // statement that never returns.
                let limit = timeout * ISOLATION_ATTEMPTS;
                let until = Instant::now() + limit;
                let isolating = self.isolate(batch, &kept, set_aside, message, line, until);
                match tokio::time::timeout(limit + timeout, isolating).await {
                    Err(_) => return Err(self.timed_out(limit + timeout)),
                    Ok(r) => r?,
                }
            }
        };
        if self.buf.capacity() > 32 << 20 {
            self.buf = Vec::with_capacity(1 << 20);
        }
        Ok(self.settled(batch, &bad))
    }

    /// A committed batch's outcome: the records left out are invalid, and dead-lettered.
    fn settled(&mut self, batch: &[Arc<Record>], bad: &[(usize, String)]) -> Outcome {
        if !bad.is_empty() {
            if let Some(dir) = self.cfg.dead_letter_dir.clone() {
                if let Err(e) = self.dead_letter(&dir, batch, bad) {
                    self.notices
                        .push((30, format!("cannot write dead letters to {dir}: {e}")));
                }
            }
        }
        Outcome {
            invalid: bad.len() as u64,
        }
    }

    /// Cut off mid-conversation: the connection's state is unknown.
    fn timed_out(&mut self, after: Duration) -> WriteError {
        self.drop_conn();
        WriteError::transient(format!(
            "attempt timed out after {:.1}s",
            after.as_secs_f64()
        ))
    }

    /// The batch in one COPY, unless an earlier attempt's unanswered COMMIT stored it.
    async fn copy_batch(
        &mut self,
        batch: &[Arc<Record>],
        deadline: Instant,
    ) -> Result<Copied, WriteError> {
        self.connect().await?;
        if let Some(bad) = self.settle_earlier(deadline).await? {
            return Ok(Copied::Done(bad));
        }
        let layout = self.ensure_schema().await?;
        let mut retried = false;
        loop {
            let refused = if layout == Layout::Daily {
                match self.ensure_days(batch).await {
                    Ok(refused) => refused,
                    Err(e) => return Err(self.fail(classify(&e))),
                }
            } else {
                Vec::new()
            };
            let (kept, set_aside) = set_apart(batch, &refused);
            if kept.is_empty() {
                return Ok(Copied::Done(set_aside));
            }
            let rows: Vec<&Record> = kept.iter().map(|&i| &*batch[i]).collect();
            let conn = self.conn.as_mut().expect("connected");
            let copied = copy_committed(
                conn,
                self.backend.as_ref(),
                &self.copy_sql,
                &mut self.buf,
                &rows,
                &mut self.in_doubt,
                &set_aside,
            )
            .await;
            let e = match copied {
                Ok(()) => return Ok(Copied::Done(set_aside)),
                Err(e) => e,
            };
            return match classify(&e) {
                // A partition dropped by another process's retention, or one this process
                // believed existed: refresh and try once more before suspecting the data.
                Failure::Data { code, .. }
                    if code == "23514" && layout == Layout::Daily && !retried =>
                {
                    self.days.clear();
                    retried = true;
                    continue;
                }
                Failure::Data { message, line, .. } => Ok(Copied::Refused {
                    kept,
                    set_aside,
                    message,
                    line,
                }),
                f => Err(self.fail(f)),
            };
        }
    }

    /// Writes every good record of a batch that failed with a data error, in one
    /// transaction (so a retry after a connection failure never duplicates), one savepoint
    /// per attempt. The failing line number, when the server names it, points straight at
    /// an offender; otherwise sets are halved.
    /// Works on the records `kept` of the batch; returns every record left out (`set_aside`
    /// and the offenders found), by index in the batch.
    async fn isolate(
        &mut self,
        batch: &[Arc<Record>],
        kept: &[usize],
        set_aside: Vec<(usize, String)>,
        first_message: String,
        first_line: Option<usize>,
        deadline: Instant,
    ) -> Result<Vec<(usize, String)>, WriteError> {
        let rows: Vec<&Record> = kept.iter().map(|&i| &*batch[i]).collect();
        let mut bad: Vec<(usize, String)> = Vec::new();
        let mut hints = 0;
        let mut stack: Vec<Vec<usize>> = Vec::new();
        // Rows the server accepted before an offender (rolled back with it): known good,
        // written together, a piece at a time, and at the latest when time runs out.
        let mut good: Vec<usize> = Vec::new();
        let all: Vec<usize> = (0..rows.len()).collect();
        split(
            &mut stack,
            &mut bad,
            &mut good,
            &mut hints,
            all,
            first_message,
            first_line,
        );
        let conn = self.conn.as_mut().expect("connected");
        let (backend, sql, buf, in_doubt) = (
            self.backend.as_ref(),
            &self.copy_sql,
            &mut self.buf,
            &mut self.in_doubt,
        );
        let mut left_out = set_aside;
        let result: Result<(), sqlx::Error> = async {
            let xid = begin(conn, backend).await?;
            loop {
                let late = Instant::now() > deadline;
                let set =
                    if !good.is_empty() && (late || good.len() >= HINT_PIECE || stack.is_empty()) {
                        std::mem::take(&mut good)
                    } else if late {
                        // Out of time: the good records found are committed, the rest counted
                        // as invalid (and dead-lettered) rather than all retried and lost.
                        for i in stack.drain(..).flatten() {
                            bad.push((i, "not isolated within the time limit".into()));
                        }
                        break;
                    } else {
                        match stack.pop() {
                            Some(set) => set,
                            None => break,
                        }
                    };
                if set.is_empty() {
                    continue;
                }
                let subset: Vec<&Record> = set.iter().map(|&i| rows[i]).collect();
                exec(conn, "SAVEPOINT logsluice_split".into()).await?;
                match copy_rows(conn, sql, buf, &subset).await {
                    Ok(_) => exec(conn, "RELEASE SAVEPOINT logsluice_split".into()).await?,
                    Err(e) => match classify(&e) {
                        Failure::Data { message, line, .. } => {
                            // One round trip for both.
                            let undo = "ROLLBACK TO SAVEPOINT logsluice_split; \
                                        RELEASE SAVEPOINT logsluice_split";
                            exec(conn, undo.into()).await?;
                            split(
                                &mut stack, &mut bad, &mut good, &mut hints, set, message, line,
                            );
                        }
                        _ => return Err(e),
                    },
                }
            }
            left_out.extend(bad.drain(..).map(|(i, why)| (kept[i], why)));
            commit(conn, backend, xid, in_doubt, &left_out).await
        }
        .await;
        if let Err(e) = result {
            // The transaction is gone with the error (or the connection): nothing written,
            // unless the COMMIT went out unanswered (the next attempt asks the server).
            self.drop_conn();
            return Err(self.fail(classify(&e)));
        }
        Ok(left_out)
    }

    fn dead_letter(
        &self,
        dir: &str,
        rows: &[Arc<Record>],
        bad: &[(usize, String)],
    ) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let name = format!(
            "{}-dead-letter-{}-{}.ndjson",
            self.names.table,
            Utc::now().format("%Y%m%d"),
            std::process::id()
        );
        let mut out = Vec::new();
        for (i, error) in bad {
            write_ndjson(&mut out, &rows[*i]);
            // Splice the error in before the closing brace of the line.
            out.truncate(out.len() - 2);
            out.extend_from_slice(b",\"logsluice_error\":");
            serde_json::to_writer(&mut out, &scrub(&self.secrets, error.clone()))?;
            out.extend_from_slice(b"}\n");
        }
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(PathBuf::from(dir).join(name))?;
        f.write_all(&out)
    }

    /// Partitions ahead and retention; failures never touch the batch path.
    /// The wake-up hint for tails: its own statement, after the batch's COPY committed; a
    /// lost one only delays tails to their next poll.
    async fn notify(&mut self, last: bool) {
        if !self.cfg.notify || !self.notify_pending || !(last || notify_slot(&self.channel)) {
            return;
        }
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        self.notify_pending = false;
        let sent = sqlx::query("SELECT pg_notify($1, '')")
            .bind(&self.channel)
            .execute(conn)
            .await;
        if sent.is_err() {
            self.drop_conn();
        }
    }

    async fn maintain(&mut self) {
        let now = Instant::now();
        if now < self.next_maintenance || !self.maintenance_breaker.allow(now) {
            return;
        }
        let Some(layout) = self.layout else { return };
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        match maintenance(conn, &self.names, &self.cfg, layout).await {
            Ok((created, dropped)) => {
                self.maintenance_breaker.success();
                self.next_maintenance = now + secs(self.cfg.maintenance_interval);
                self.days.extend(created);
                for key in &dropped {
                    self.days.remove(key);
                }
                if !dropped.is_empty() {
                    self.notices.push((
                        20,
                        format!(
                            "retention dropped {} partition(s) of {}",
                            dropped.len(),
                            self.names.display()
                        ),
                    ));
                }
            }
            Err(e) => {
                let _ = exec(conn, "ROLLBACK".into()).await;
                self.maintenance_breaker.failure(now);
                let f = classify(&e);
                let message = match &f {
                    Failure::Data { message, .. }
                    | Failure::Schema(message)
                    | Failure::Transient { message, .. }
                    | Failure::Oversized(message)
                    | Failure::Permanent(message) => message.clone(),
                };
                if matches!(
                    f,
                    Failure::Transient {
                        drop_conn: true,
                        ..
                    }
                ) {
                    self.drop_conn();
                }
                self.next_maintenance = now + Duration::from_secs(60);
                self.notices.push((
                    30,
                    format!("maintenance failed: {}", scrub(&self.secrets, message)),
                ));
            }
        }
    }
}

/// Pushes the parts of a failed `set` to try next; a set of one is an offender.
fn split(
    stack: &mut Vec<Vec<usize>>,
    bad: &mut Vec<(usize, String)>,
    good: &mut Vec<usize>,
    hints: &mut usize,
    set: Vec<usize>,
    message: String,
    line: Option<usize>,
) {
    if set.len() == 1 {
        bad.push((set[0], message));
        return;
    }
    match line.filter(|l| (1..=set.len()).contains(l)) {
        Some(l) if *hints < MAX_LINE_HINTS => {
            *hints += 1;
            bad.push((set[l - 1], message));
            good.extend_from_slice(&set[..l - 1]);
            stack.extend(set[l..].chunks(HINT_PIECE).rev().map(<[usize]>::to_vec));
        }
        _ => {
            let mid = set.len() / 2;
            stack.push(set[mid..].to_vec());
            stack.push(set[..mid].to_vec());
        }
    }
}

enum SchemaError {
    Db(sqlx::Error),
    Refused(String),
}

impl From<sqlx::Error> for SchemaError {
    fn from(e: sqlx::Error) -> Self {
        SchemaError::Db(e)
    }
}

/// Opens a transaction holding the table's DDL advisory lock. `lock_timeout` bounds how long
/// a statement may wait for a table lock (and so how long it can hold up others queued
/// behind it); a timeout is a transient error, tried again later.
async fn lock_ddl(
    conn: &mut PgConnection,
    names: &Names,
    lock_timeout: &'static str,
) -> Result<(), sqlx::Error> {
    exec(conn, "BEGIN".into()).await?;
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(lock_timeout)
        .execute(&mut *conn)
        .await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(names.lock_key())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn relation_exists(conn: &mut PgConnection, regclass: &str) -> Result<bool, sqlx::Error> {
    let row = sqlx::query("SELECT to_regclass($1) IS NOT NULL")
        .bind(regclass)
        .fetch_one(&mut *conn)
        .await?;
    row.try_get(0)
}

/// Checks the table, creating or migrating it when `create_table`; returns its layout and
/// notes for the "logsluice" logger. Creation holds an advisory lock, so many processes
/// starting at once create everything exactly once.
async fn schema_check(
    conn: &mut PgConnection,
    names: &Names,
    cfg: &PostgresConfig,
) -> Result<(Layout, Vec<(u16, String)>), SchemaError> {
    let mut notes = Vec::new();
    let wanted = if cfg.partition.is_some() {
        Layout::Daily
    } else {
        Layout::Plain
    };
    if cfg.create_table {
        lock_ddl(conn, names, "10s").await?;
    } else {
        exec(conn, "BEGIN".into()).await?;
    }
    let found = sqlx::query(
        "SELECT c.relkind::text, COALESCE(pg_get_partkeydef(c.oid), '') \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = $2",
    )
    .bind(&names.schema)
    .bind(&names.table)
    .fetch_optional(&mut *conn)
    .await?;
    let layout = match found {
        None if !cfg.create_table => {
            return Err(SchemaError::Refused(format!(
                "table {} does not exist and create_table=False; create it (see the README for the DDL) or let logsluice create it",
                names.display()
            )))
        }
        None => {
            let has_schema = sqlx::query("SELECT 1 FROM pg_namespace WHERE nspname = $1")
                .bind(&names.schema)
                .fetch_optional(&mut *conn)
                .await?
                .is_some();
            if !has_schema {
                exec(conn, format!("CREATE SCHEMA IF NOT EXISTS {}", schema::quote(&names.schema))).await?;
            }
            exec(conn, names.create_sql(wanted)).await?;
            exec(conn, names.index_sql()).await?;
            notes.push((20, format!("created table {}", names.display())));
            wanted
        }
        Some(row) => {
            let relkind: String = row.try_get(0)?;
            let partkey: String = row.try_get(1)?;
            match (relkind.as_str(), partkey.as_str()) {
                ("r", _) => {
                    if wanted == Layout::Daily && cfg.create_table {
                        notes.push((30, format!(
                            "{} is a plain table (created without partitions); it is kept as is and retention deletes rows in chunks",
                            names.display()
                        )));
                    }
                    Layout::Plain
                }
                ("p", "LIST (kind)") => Layout::Daily,
                ("p", _) => Layout::Foreign,
                (other, _) => {
                    return Err(SchemaError::Refused(format!(
                        "{} is not a table (relkind {other:?})",
                        names.display()
                    )))
                }
            }
        }
    };
    let cols = sqlx::query(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
         WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
    )
    .bind(names.qualified())
    .fetch_all(&mut *conn)
    .await?;
    let existing: Vec<(String, String)> = cols
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<_, sqlx::Error>>()?;
    let (missing, wrong) = schema::diff_columns(&existing);
    if !wrong.is_empty() {
        return Err(SchemaError::Refused(format!(
            "table {} has columns of the wrong type: {}",
            names.display(),
            wrong.join("; ")
        )));
    }
    if !missing.is_empty() {
        if !cfg.create_table {
            let list: Vec<String> = missing
                .iter()
                .map(|c| format!("{c} {}", schema::column_type(c)))
                .collect();
            return Err(SchemaError::Refused(format!(
                "table {} (create_table=False) is missing columns: {}",
                names.display(),
                list.join(", ")
            )));
        }
        exec(conn, names.add_columns_sql(&missing)).await?;
        notes.push((
            20,
            format!(
                "migrated {}: added columns {}",
                names.display(),
                missing.join(", ")
            ),
        ));
    }
    if cfg.create_table {
        if layout == Layout::Daily {
            for kind in KINDS {
                if !relation_exists(conn, &names.kind_partition(kind)).await? {
                    exec(
                        conn,
                        format!(
                            "CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES IN ('{}') PARTITION BY RANGE (\"ts\")",
                            names.kind_partition(kind),
                            names.qualified(),
                            kind.as_str()
                        ),
                    )
                    .await?;
                }
            }
        }
        let indexes =
            sqlx::query("SELECT count(*) FROM pg_indexes WHERE schemaname = $1 AND tablename = $2")
                .bind(&names.schema)
                .bind(&names.table)
                .fetch_one(&mut *conn)
                .await?;
        let count: i64 = indexes.try_get(0)?;
        if count < 5 && layout != Layout::Foreign {
            exec(conn, names.index_sql()).await?;
        }
    }
    exec(conn, "COMMIT".into()).await?;
    Ok((layout, notes))
}

async fn existing_relations(
    conn: &mut PgConnection,
    schema: &str,
    candidates: &[String],
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query(
        "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = ANY($2)",
    )
    .bind(schema)
    .bind(candidates)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|r| r.try_get(0))
    .collect()
}

/// Creates the day partitions in `needed` that do not exist yet. Checked once without the
/// lock (the common case: all there) and again under it (another process may have won).
/// Returns the days no partition can be made for (outside years 1 to 9999, or refused by
/// the server as data), with the reason; the others are made all the same.
async fn create_days(
    conn: &mut PgConnection,
    names: &Names,
    needed: &[(Kind, i64)],
) -> Result<Vec<Refused>, sqlx::Error> {
    let mut refused = Vec::new();
    let mut wanted: Vec<((Kind, i64), String, String)> = Vec::new();
    for &(kind, n) in needed {
        let sql = schema::day_of(n.saturating_mul(US_PER_DAY))
            .and_then(|day| Some((day, names.create_day_sql(kind, day)?)));
        match sql {
            Some((day, sql)) => wanted.push(((kind, n), names.day_partition_name(kind, day), sql)),
            None => refused.push((
                (kind, n),
                "no day partition is made for a time outside the years 1 to 9999 (UTC)".into(),
            )),
        }
    }
    if wanted.is_empty() {
        return Ok(refused);
    }
    let all_names: Vec<String> = wanted.iter().map(|w| w.1.clone()).collect();
    let existing = existing_relations(conn, &names.schema, &all_names).await?;
    if all_names.iter().all(|n| existing.contains(n)) {
        return Ok(refused);
    }
    let result = async {
        lock_ddl(conn, names, "2s").await?;
        let existing = existing_relations(conn, &names.schema, &all_names).await?;
        for (key, name, sql) in &wanted {
            if existing.contains(name) {
                continue;
            }
            // In a savepoint: a day the server refuses costs its own records only.
            let made = exec(
                conn,
                format!("SAVEPOINT logsluice_day;\n{sql};\nRELEASE SAVEPOINT logsluice_day"),
            )
            .await;
            if let Err(e) = made {
                let undo = "ROLLBACK TO SAVEPOINT logsluice_day; RELEASE SAVEPOINT logsluice_day";
                // 42P17 from ATTACH: a partition made by hand already covers the day, and
                // the day's rows go there.
                if sqlstate_of(&e).as_deref() == Some("42P17") {
                    exec(conn, undo.into()).await?;
                    continue;
                }
                let Failure::Data { message, .. } = classify(&e) else {
                    return Err(e);
                };
                exec(conn, undo.into()).await?;
                refused.push((*key, format!("cannot make partition {name}: {message}")));
            }
        }
        exec(conn, "COMMIT".into()).await
    }
    .await;
    if let Err(e) = result {
        let _ = exec(conn, "ROLLBACK".into()).await;
        return Err(e);
    }
    Ok(refused)
}

/// Creates partitions ahead and applies retention. Returns the partitions created and dropped.
async fn maintenance(
    conn: &mut PgConnection,
    names: &Names,
    cfg: &PostgresConfig,
    layout: Layout,
) -> Result<(Vec<(Kind, i64)>, Vec<(Kind, i64)>), sqlx::Error> {
    let now = Utc::now();
    let today = now.timestamp_micros().div_euclid(US_PER_DAY);
    let mut created = Vec::new();
    let mut dropped = Vec::new();
    match layout {
        Layout::Daily => {
            for kind in KINDS {
                for d in 0..=i64::from(cfg.premake_days) {
                    created.push((kind, today + d));
                }
            }
            let refused = create_days(conn, names, &created).await?;
            created.retain(|key| !refused.iter().any(|(k, _)| k == key));
            for kind in KINDS {
                let Some(&keep) = cfg.retention.get(&kind) else {
                    continue;
                };
                let parts: Vec<String> = sqlx::query(
                    "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                     WHERE i.inhparent = to_regclass($1)",
                )
                .bind(names.kind_partition(kind))
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
                let expired: Vec<chrono::NaiveDate> = parts
                    .iter()
                    .filter_map(|p| names.parse_day_partition(kind, p))
                    .filter(|d| schema::expired(*d, now, keep))
                    .collect();
                if expired.is_empty() {
                    continue;
                }
                lock_ddl(conn, names, "1s").await?;
                for day in &expired {
                    exec(conn, names.drop_day_sql(kind, *day)).await?;
                }
                exec(conn, "COMMIT".into()).await?;
                for day in expired {
                    let n = day
                        .and_hms_opt(0, 0, 0)
                        .map_or(0, |d| d.and_utc().timestamp_micros().div_euclid(US_PER_DAY));
                    dropped.push((kind, n));
                }
            }
        }
        Layout::Plain => {
            for kind in KINDS {
                let Some(&keep) = cfg.retention.get(&kind) else {
                    continue;
                };
                let Some(cutoff) = schema::cutoff(now, keep) else {
                    continue;
                };
                let sql = format!(
                    "DELETE FROM {t} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {t} WHERE \"kind\" = $1 AND \"ts\" < to_timestamp($2) LIMIT $3))",
                    t = names.qualified()
                );
                let started = Instant::now();
                loop {
                    let done = sqlx::query(AssertSqlSafe(sql.clone()))
                        .bind(kind.as_str())
                        .bind(cutoff.timestamp_micros() as f64 / 1e6)
                        .bind(DELETE_CHUNK)
                        .execute(&mut *conn)
                        .await?
                        .rows_affected();
                    if done < DELETE_CHUNK as u64 || started.elapsed() > Duration::from_secs(30) {
                        break;
                    }
                }
            }
        }
        Layout::Foreign => {}
    }
    Ok((created, dropped))
}

impl Writer for Postgres {
    fn write_batch(
        &mut self,
        batch: &[Arc<Record>],
        timeout: Duration,
    ) -> Result<Outcome, WriteError> {
        let Postgres { rt, inner, abort } = self;
        let _guard = rt.enter();
        rt.block_on(async {
            let Some(r) = abort.unless_fired(inner.write(batch, timeout)).await else {
                // Cut off mid-conversation: the connection's state is unknown. A COMMIT sent
                // without an answer stays in doubt, and `given_up` says so.
                inner.drop_conn();
                return Err(destinations::aborted());
            };
            if r.is_ok() {
                inner.notify_pending = true;
                let notified = tokio::time::timeout(timeout, inner.notify(false));
                if !matches!(abort.unless_fired(notified).await, Some(Ok(()))) {
                    inner.drop_conn();
                }
            }
            if r.is_ok() {
                let maintained = tokio::time::timeout(timeout, inner.maintain());
                if !matches!(abort.unless_fired(maintained).await, Some(Ok(()))) {
                    // Maintenance cut off mid-statement: start the next batch on a fresh
                    // connection.
                    inner.drop_conn();
                }
            }
            r
        })
    }

    fn given_up(&mut self, batch: &[Arc<Record>], timeout: Duration) -> Option<Outcome> {
        let Postgres { rt, inner, abort } = self;
        let doubt = inner.in_doubt.as_ref()?;
        let xid = doubt.xid.clone();
        let _guard = rt.enter();
        let asked = if timeout.is_zero() {
            None
        } else {
            let deadline = Instant::now() + timeout;
            rt.block_on(abort.unless_fired(tokio::time::timeout(timeout, async {
                inner.connect().await?;
                inner.settle_earlier(deadline).await
            })))
            .and_then(Result::ok)
        };
        match asked {
            Some(Ok(Some(bad))) => return Some(inner.settled(batch, &bad)),
            // Rolled back: it is dropped as the pipeline says.
            Some(Ok(None)) if inner.in_doubt.is_none() => return None,
            Some(Err(_)) | None => inner.drop_conn(),
            Some(Ok(None)) => {}
        }
        inner.in_doubt = None;
        inner.notices.push((
            30,
            format!(
                "a batch of {} records counted as not written may be stored all the same: the \
                 server had not settled its COMMIT (transaction {xid}) when the writer gave up",
                batch.len()
            ),
        ));
        None
    }

    fn idle(&mut self) {
        let Postgres { rt, inner, abort } = self;
        let _guard = rt.enter();
        if inner.conn.is_some() && inner.layout.is_some() {
            let timeout = secs(inner.cfg.statement_timeout);
            let done = rt.block_on(abort.unless_fired(tokio::time::timeout(timeout, async {
                inner.notify(false).await;
                inner.maintain().await
            })));
            if !matches!(done, Some(Ok(()))) {
                inner.drop_conn();
            }
        }
    }

    fn notices(&mut self) -> Vec<(u16, String)> {
        std::mem::take(&mut self.inner.notices)
    }

    fn close(&mut self) -> Result<(), WriteError> {
        let Postgres { rt, inner, abort } = self;
        let _guard = rt.enter();
        if abort.is_fired() {
            // Closing past its deadline: no goodbyes to a server that may not answer.
            inner.drop_conn();
            return Ok(());
        }
        // The last batch's hint, even inside the gap: nothing later would send it.
        let _ = rt.block_on(tokio::time::timeout(
            Duration::from_secs(2),
            inner.notify(true),
        ));
        if let Some(conn) = inner.conn.take() {
            let _ = rt.block_on(tokio::time::timeout(Duration::from_secs(2), conn.close()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::HttpFields;

    /// The server tests/test_postgres.py names in LOGSLUICE_TEST_PG_DSN (and its table),
    /// when that test also set `flag`; `None` (nothing to run) otherwise.
    fn real_server(flag: Option<&str>) -> Option<PostgresConfig> {
        let dsn = std::env::var("LOGSLUICE_TEST_PG_DSN").ok()?;
        if let Some(flag) = flag {
            std::env::var(flag).ok()?;
        }
        Some(PostgresConfig {
            dsn,
            table: std::env::var("LOGSLUICE_TEST_PG_TABLE").unwrap(),
            ..Default::default()
        })
    }

    /// Writes http records (the middleware's) to the server tests/test_postgres.py names in
    /// LOGSLUICE_TEST_PG_DSN; that test then reads the columns back. Without it, nothing runs.
    #[test]
    fn real_server_http_records() {
        let Some(config) = real_server(None) else {
            return;
        };
        let mut w = Postgres::open(config).unwrap();
        let now = Utc::now().timestamp_micros();
        let mut full = Record::new(now, "INFO", 20, Kind::Http, "GET /items/7 200".into());
        full.request_id = Some("req-http-1".into());
        full.http = Some(Box::new(HttpFields {
            method: "GET".into(),
            scheme: "https".into(),
            http_version: "1.1".into(),
            path: "/items/7".into(),
            query: Some("q=1".into()),
            route: Some("/items/{id}".into()),
            status: 200,
            duration_ms: 12.5,
            ttfb_ms: Some(3.25),
            client_addr: Some("127.0.0.1:5555".into()),
            user_agent: Some("curl/8".into()),
            trace_id: Some("t1".into()),
            span_id: Some("s1".into()),
            request_headers: serde_json::json!({"accept": "*/*"}),
            response_headers: serde_json::json!({"content-type": "application/json"}),
            request_body: Some("{\"a\": 1}".into()),
            response_body: Some("ok".into()),
            request_size: Some(8),
            response_size: Some(2),
            sample_rate: 0.5,
            error: false,
        }));
        let mut minimal = Record::new(now + 1, "ERROR", 40, Kind::Http, "POST /x 500".into());
        minimal.http = Some(Box::new(HttpFields {
            method: "POST".into(),
            path: "/x".into(),
            status: 500,
            sample_rate: 1.0,
            error: true,
            ..Default::default()
        }));
        let batch: Vec<Arc<Record>> = [full, minimal]
            .into_iter()
            .map(|r| Arc::new(r.finish(1 << 16)))
            .collect();
        let outcome = w.write_batch(&batch, Duration::from_secs(30)).unwrap();
        assert_eq!(outcome.invalid, 0);
        w.close().unwrap();
    }

    /// Records dated outside the years day partitions cover (never from Python, whose
    /// times are kept within years 1 to 9999, but a producer of records may go wrong) cost
    /// only themselves. Run by tests/test_postgres.py, which reads the table and the dead
    /// letters back; without LOGSLUICE_TEST_PG_DEAD, nothing runs.
    #[test]
    fn real_server_days_without_a_partition() {
        let Some(config) = real_server(Some("LOGSLUICE_TEST_PG_DEAD")) else {
            return;
        };
        let mut w = Postgres::open(PostgresConfig {
            dead_letter_dir: std::env::var("LOGSLUICE_TEST_PG_DEAD").ok(),
            ..config
        })
        .unwrap();
        let now = Utc::now().timestamp_micros();
        // 10000-01-01T01:00:00Z, and 10^12 s before the epoch (the year 29720 BC).
        let year_10000 = 253_402_304_400_000_000;
        let ancient = -1_000_000_000_000_000_000;
        let batch: Vec<Arc<Record>> = [
            (now, "good 1"),
            (year_10000, "year 10000"),
            (ancient, "29720 BC"),
            (now + 1, "good 2"),
        ]
        .into_iter()
        .map(|(ts, m)| Arc::new(Record::new(ts, "INFO", 20, Kind::App, m.into()).finish(1 << 16)))
        .collect();
        let outcome = w.write_batch(&batch, Duration::from_secs(30)).unwrap();
        assert_eq!(outcome.invalid, 2);
        w.close().unwrap();
    }

    /// A COMMIT left in doubt is settled by the server that gave the transaction its id, and
    /// by no other: after a failover, an id of the old server may read "committed" on the
    /// new one (as a later transaction of its own), and the batch is sent again instead.
    /// Run by tests/test_postgres.py, which reads the table back; without
    /// LOGSLUICE_TEST_PG_DOUBT, nothing runs.
    #[test]
    fn real_server_in_doubt_settled_by_its_own_server_only() {
        let Some(config) = real_server(Some("LOGSLUICE_TEST_PG_DOUBT")) else {
            return;
        };
        let mut w = Postgres::open(config).unwrap();
        let now = Utc::now().timestamp_micros();
        let batch = |message: &str| {
            vec![Arc::new(
                Record::new(now, "INFO", 20, Kind::App, message.into()).finish(1 << 16),
            )]
        };
        let timeout = Duration::from_secs(30);
        w.write_batch(&batch("first"), timeout).unwrap();
        let server = w.inner.backend.as_ref().unwrap().server.clone();
        assert!(
            !server.contains('?'),
            "{server}: the test role reads both parts"
        );
        // A transaction of this server, committed: what a later one on a new server after a
        // failover looks like to the status query.
        let conn = w.inner.conn.as_mut().unwrap();
        let xid: String =
            w.rt.block_on(sqlx::query_scalar("SELECT pg_current_xact_id()::text").fetch_one(conn))
                .unwrap();
        let doubt = |server: &str| InDoubt {
            xid: xid.clone(),
            server: server.into(),
            bad: Vec::new(),
        };
        // Left in doubt on another server: sent again, with a notice.
        w.inner.in_doubt = Some(doubt("0/00000001"));
        w.write_batch(&batch("sent again"), timeout).unwrap();
        let notices = w.notices();
        assert!(
            notices
                .iter()
                .any(|(_, m)| m.contains("reconnected to another server")),
            "{notices:?}"
        );
        assert!(w.inner.in_doubt.is_none());
        // Left in doubt on this server: settled as committed, not sent again.
        w.inner.in_doubt = Some(doubt(&server));
        w.write_batch(&batch("settled"), timeout).unwrap();
        assert!(w.inner.in_doubt.is_none());
        w.close().unwrap();
    }

    #[test]
    fn sqlstates_decide_what_happens_to_the_batch() {
        // A value past one of the server's limits (54000: a jsonb over 256 MB) is the
        // record's own data: isolated and dead-lettered, never retried until dropped.
        assert_eq!(sqlstate("54000"), Sqlstate::Data);
        for data in ["22P02", "22008", "22009", "23514", "23505"] {
            assert_eq!(sqlstate(data), Sqlstate::Data, "{data}");
        }
        assert_eq!(sqlstate("42P01"), Sqlstate::Schema);
        assert_eq!(sqlstate("42703"), Sqlstate::Schema);
        for permanent in ["28P01", "3D000", "42501", "3F000", "42601"] {
            assert_eq!(sqlstate(permanent), Sqlstate::Permanent, "{permanent}");
        }
        for retry in ["40001", "40P01", "55P03", "55006"] {
            assert_eq!(sqlstate(retry), Sqlstate::Retry, "{retry}");
        }
        // The server answered, the batch was too much for one write: retried, then halved.
        for oversized in ["57014", "53200"] {
            assert_eq!(sqlstate(oversized), Sqlstate::Oversized, "{oversized}");
        }
        // Other program limits stay transient, as does anything unknown.
        for reconnect in ["57P01", "53300", "54001", "08006", "XX000", ""] {
            assert_eq!(sqlstate(reconnect), Sqlstate::Reconnect, "{reconnect}");
        }
    }

    #[test]
    fn dsn_password_is_masked_everywhere() {
        assert_eq!(
            redact_dsn("postgresql://app:s3cr%40t@db:5432/app?sslmode=require&password=x1y2"),
            "postgresql://app:***@db:5432/app?sslmode=require&password=***"
        );
        assert_eq!(redact_dsn("postgresql://db/app"), "postgresql://db/app");
        assert_eq!(redact_dsn("postgres://u@h"), "postgres://u@h");
        assert_eq!(redact_dsn("nonsense"), "<unparseable DSN>");
        let secrets = dsn_secrets("postgresql://app:s3cr%40t@db/app");
        assert!(
            secrets.contains(&"s3cr@t".to_string()) && secrets.contains(&"s3cr%40t".to_string())
        );
        assert_eq!(scrub(&secrets, "bad s3cr@t here".into()), "bad *** here");
    }

    #[test]
    fn copy_context_gives_the_line() {
        assert_eq!(
            copy_line("COPY logs, line 12, column message: \"x\""),
            Some(12)
        );
        assert_eq!(copy_line("COPY logs, line 3"), Some(3));
        assert_eq!(copy_line("SQL function \"f\"\nCOPY logs, line 7"), Some(7));
        assert_eq!(copy_line("something else"), None);
    }

    #[test]
    fn split_uses_hints_then_halves() {
        let mut stack = Vec::new();
        let mut bad = Vec::new();
        let mut good = Vec::new();
        let mut hints = 0;
        let mut run = |stack: &mut Vec<Vec<usize>>, hints: &mut usize, set: Vec<usize>, line| {
            split(stack, &mut bad, &mut good, hints, set, "m".into(), line);
        };
        run(&mut stack, &mut hints, (0..10).collect(), Some(4));
        assert_eq!(stack, vec![vec![4, 5, 6, 7, 8, 9]]);
        // What follows an offender goes on in pieces, the first piece tried first.
        stack.clear();
        run(
            &mut stack,
            &mut hints,
            (0..(2 * HINT_PIECE + 10)).collect(),
            Some(5),
        );
        let sizes: Vec<usize> = stack.iter().map(Vec::len).collect();
        assert_eq!(sizes, [5, HINT_PIECE, HINT_PIECE]);
        assert_eq!(stack[2][0], 5);
        stack.clear();
        hints = MAX_LINE_HINTS;
        run(&mut stack, &mut hints, (0..4).collect(), Some(2));
        assert_eq!(stack.pop(), Some(vec![0, 1]));
        assert_eq!(stack.pop(), Some(vec![2, 3]));
        // The offenders named by hints, and the rows the server took before each.
        assert_eq!(bad, vec![(3, "m".to_string()), (4, "m".to_string())]);
        assert_eq!(good, vec![0, 1, 2, 0, 1, 2, 3]);
        split(
            &mut stack,
            &mut bad,
            &mut good,
            &mut hints,
            vec![7],
            "x".into(),
            None,
        );
        assert_eq!(bad.last(), Some(&(7, "x".to_string())));
    }
}
