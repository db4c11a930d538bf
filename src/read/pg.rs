//! Reading the `logs` table. SQL is assembled from fixed fragments and validated
//! identifiers only; every value the user gave is a bound parameter. Keyset paging on
//! (ts, id) always comes with an explicit bound on `ts` so day partitions are pruned.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Postgres, Row};

use super::cursor::Pos;
use super::exclude::Exclude;
use super::filter::{BadInput, FieldOp, Filter};
use super::summary::{group_value, Spec, MAX_GROUPS};
use super::{Found, ReadError, Scan};
use crate::destinations::postgres::schema::{quote, Names};
use crate::destinations::postgres::{dsn_secrets, redact_dsn, scrub, server_message};
use crate::encode::ts_string;
use crate::per_process::PerProcess;

/// The http-only columns: dropped from app records so every store returns the same shape.
const HTTP_COLUMNS: &[&str] = &[
    "method",
    "scheme",
    "http_version",
    "path",
    "query",
    "route",
    "status",
    "duration_ms",
    "ttfb_ms",
    "client_addr",
    "user_agent",
    "trace_id",
    "span_id",
    "request_headers",
    "response_headers",
    "request_body",
    "response_body",
    "request_size",
    "response_size",
    "sample_rate",
    "error",
];

pub struct PgConfig {
    pub dsn: String,
    pub schema: String,
    pub table: String,
    pub statement_timeout: Duration,
    pub connect_timeout: Duration,
}

pub struct PgStore {
    /// The runtime and pools of this process: built on first use, and again in a forked
    /// child (see [`PgStore::live`]).
    live: PerProcess<PgLive>,
    names: Names,
    target: String,
    secrets: Vec<String>,
    opts: PgConnectOptions,
    connect_timeout: Duration,
}

/// What talking to the server takes in one process. A forked child inherits its parent's
/// copy without the runtime's threads (its queries would wait for ever) and with the
/// parent's connections: it builds its own on first use and never touches the copy.
pub struct PgLive {
    /// Always Some until drop (see the Drop impl).
    runtime: Option<tokio::runtime::Runtime>,
    pool: PgPool,
    /// Counts writers' NOTIFYs (and LISTEN (re)starts) for [`PgStore::wakeups`].
    wakeups: Arc<Wakeups>,
    listener: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl PgLive {
    pub fn rt(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("the runtime lives until drop")
    }
}

impl Drop for PgLive {
    /// Without waiting for the workers: the last reference may go on one of them (an async
    /// call that outlived its Python reader), and a reader dropped on a Python thread must
    /// not wait, GIL held, for a worker that may be waiting for the GIL.
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// A counter that threads can wait on to change.
#[derive(Default)]
pub struct Wakeups {
    count: parking_lot::Mutex<u64>,
    changed: parking_lot::Condvar,
}

impl Wakeups {
    fn bump(&self) {
        *self.count.lock() += 1;
        self.changed.notify_all();
    }

    /// The count once it differs from `seen`, or after `timeout` whatever it is.
    pub fn wait(&self, seen: u64, timeout: Duration) -> u64 {
        let mut count = self.count.lock();
        if *count == seen {
            self.changed.wait_for(&mut count, timeout);
        }
        *count
    }
}

/// LISTENs on `channel` until the connection fails; every notification bumps `wakeups`.
async fn listen_until_error(
    pool: &PgPool,
    channel: &str,
    wakeups: &Wakeups,
) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(channel).await?;
    // Rows committed before the LISTEN took effect sent their hint to nobody: one poll now.
    wakeups.bump();
    loop {
        // None: the connection dropped and was re-established; hints sent in between were
        // lost, so poll once more too.
        let _ = listener.try_recv().await?;
        wakeups.bump();
    }
}

enum Arg {
    Text(String),
    TextArr(Vec<String>),
    I64(i64),
    I16(i16),
    F64(f64),
}

/// A WHERE clause under construction: fragments with `$n` placeholders and their values.
#[derive(Default)]
struct Sql {
    conds: Vec<String>,
    args: Vec<Arg>,
}

impl Sql {
    fn arg(&mut self, a: Arg) -> String {
        self.args.push(a);
        format!("${}", self.args.len())
    }
    fn ts(&mut self, us: i64) -> String {
        format!("{}::timestamptz", self.arg(Arg::Text(ts_string(us))))
    }
    fn push(&mut self, c: String) {
        self.conds.push(c);
    }
    fn where_clause(&self) -> String {
        if self.conds.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", self.conds.join(" AND "))
        }
    }
    fn bind<'q>(
        &self,
        mut q: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
        for a in &self.args {
            q = match a {
                Arg::Text(s) => q.bind(s.clone()),
                Arg::TextArr(v) => q.bind(v.clone()),
                Arg::I64(n) => q.bind(*n),
                Arg::I16(n) => q.bind(*n),
                Arg::F64(n) => q.bind(*n),
            };
        }
        q
    }
}

fn like_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    for c in s.chars() {
        if matches!(c, '\\' | '%' | '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The filter's conditions (not the keyset or as-of parts).
fn filter_sql(f: &Filter, sql: &mut Sql) {
    if let Some(s) = f.since_us {
        let p = sql.ts(s);
        sql.push(format!("ts >= {p}"));
    }
    if let Some(u) = f.until_us {
        let p = sql.ts(u);
        sql.push(format!("ts <= {p}"));
    }
    if !f.levels.is_empty() {
        let p = sql.arg(Arg::TextArr(f.levels.clone()));
        sql.push(format!("level = ANY({p}::text[])"));
    }
    if let Some(m) = f.min_level {
        let p = sql.arg(Arg::I16(i16::try_from(m).unwrap_or(i16::MAX)));
        sql.push(format!("level_no >= {p}::smallint"));
        if m >= 40 {
            // A constant of our own, so the planner can use the small errors-only index.
            sql.push("level_no >= 40".into());
        }
    }
    for (col, v) in [
        ("kind", &f.kind),
        ("logger", &f.logger),
        ("request_id", &f.request_id),
        ("trace_id", &f.trace_id),
        ("method", &f.method),
        ("route", &f.route),
    ] {
        if let Some(v) = v {
            let p = sql.arg(Arg::Text(v.clone()));
            sql.push(format!("{} = {p}", quote(col)));
        }
    }
    if let Some(pid) = f.process {
        let p = sql.arg(Arg::I64(i64::from(pid)));
        sql.push(format!("process = {p}::integer"));
    }
    if let Some(path) = &f.path {
        let p = sql.arg(Arg::Text(format!("{}%", like_escape(path))));
        sql.push(format!("path LIKE {p}"));
    }
    if let Some((lo, hi)) = f.status {
        let a = sql.arg(Arg::I16(lo as i16));
        let b = sql.arg(Arg::I16(hi as i16));
        sql.push(format!("status BETWEEN {a}::smallint AND {b}::smallint"));
    }
    if let Some(d) = f.min_duration_ms {
        let p = sql.arg(Arg::F64(d));
        sql.push(format!("duration_ms >= {p}::float8"));
    }
    if let Some(t) = &f.text {
        let p = sql.arg(Arg::Text(format!("%{}%", like_escape(t))));
        sql.push(format!("message ILIKE {p}"));
    }
    for c in &f.fields {
        let path = sql.arg(Arg::TextArr(c.path.clone()));
        let at = format!("(fields #> {path}::text[])");
        let num = format!(
            "(CASE WHEN jsonb_typeof({at}) = 'number' THEN (fields #>> {path}::text[])::float8 END)"
        );
        let cond = match &c.op {
            FieldOp::Eq(v) if !v.is_object() && !v.is_array() => {
                // Containment, so the optional jsonb_path_ops GIN index can serve it.
                let mut doc = v.clone();
                for key in c.path.iter().rev() {
                    doc = json!({ key: doc });
                }
                let p = sql.arg(Arg::Text(doc.to_string()));
                format!("fields @> {p}::jsonb")
            }
            FieldOp::Eq(v) => {
                let p = sql.arg(Arg::Text(v.to_string()));
                format!("{at} = {p}::jsonb")
            }
            FieldOp::Ne(v) => {
                let p = sql.arg(Arg::Text(v.to_string()));
                format!("{at} IS DISTINCT FROM {p}::jsonb")
            }
            FieldOp::Exists(true) => format!("coalesce(jsonb_typeof({at}), 'null') <> 'null'"),
            FieldOp::Exists(false) => format!("coalesce(jsonb_typeof({at}), 'null') = 'null'"),
            FieldOp::In(list) => {
                let p = sql.arg(Arg::Text(Value::Array(list.clone()).to_string()));
                format!("{at} IN (SELECT jsonb_array_elements({p}::jsonb))")
            }
            FieldOp::Gt(x) => format!("{num} > {}::float8", sql.arg(Arg::F64(*x))),
            FieldOp::Gte(x) => format!("{num} >= {}::float8", sql.arg(Arg::F64(*x))),
            FieldOp::Lt(x) => format!("{num} < {}::float8", sql.arg(Arg::F64(*x))),
            FieldOp::Lte(x) => format!("{num} <= {}::float8", sql.arg(Arg::F64(*x))),
            FieldOp::Between(a, b) => {
                let (a, b) = (sql.arg(Arg::F64(*a)), sql.arg(Arg::F64(*b)));
                format!("{num} BETWEEN {a}::float8 AND {b}::float8")
            }
        };
        sql.push(cond);
    }
    exclude_sql(&f.exclude, sql);
}

/// Exclusions, NULL-safe: a row without the column (an app record has no route) is kept.
fn exclude_sql(ex: &Exclude, sql: &mut Sql) {
    for (col, values) in ex.equalities() {
        for v in values {
            let p = sql.arg(Arg::Text(v.clone()));
            sql.push(format!("{} IS DISTINCT FROM {p}", quote(col)));
        }
    }
    for (lo, hi) in &ex.statuses {
        let a = sql.arg(Arg::I16(*lo as i16));
        let b = sql.arg(Arg::I16(*hi as i16));
        sql.push(format!(
            "NOT coalesce(status BETWEEN {a}::smallint AND {b}::smallint, false)"
        ));
    }
    for path in &ex.paths {
        let p = sql.arg(Arg::Text(format!("{}%", like_escape(path))));
        sql.push(format!("NOT coalesce(path LIKE {p}, false)"));
    }
    for t in &ex.texts {
        let p = sql.arg(Arg::Text(format!("%{}%", like_escape(t))));
        sql.push(format!("NOT coalesce(message ILIKE {p}, false)"));
    }
}

/// Keyset and as-of conditions, each with an explicit time bound beside the row
/// comparison (partition pruning needs a bare `ts` condition).
fn scan_sql(scan: &Scan, sql: &mut Sql) {
    filter_sql(&scan.filter, sql);
    if let Some(a) = scan.asof_ts {
        let p = sql.ts(a);
        sql.push(format!("ts <= {p}"));
    }
    if let Some(id) = scan.asof_id {
        let p = sql.arg(Arg::I64(id));
        sql.push(format!("id <= {p}::bigint"));
    }
    if let Some(Pos { ts, id }) = &scan.after {
        let t = sql.ts(*ts);
        let id = id
            .parse::<i64>()
            .unwrap_or(if scan.filter.desc { i64::MAX } else { i64::MIN });
        let i = sql.arg(Arg::I64(id));
        let (cmp, bound) = if scan.filter.desc {
            ("<", "<=")
        } else {
            (">", ">=")
        };
        sql.push(format!(
            "ts {bound} {t} AND (ts, id) {cmp} ({t}, {i}::bigint)"
        ));
    }
}

/// A row (`id`, micros, `to_jsonb(row)::text`) in the NDJSON shape.
fn row_record(row: &PgRow) -> Result<Map<String, Value>, sqlx::Error> {
    let id: i64 = row.try_get(0)?;
    let us: i64 = row.try_get(1)?;
    let text: String = row.try_get(2)?;
    let mut rec: Map<String, Value> = serde_json::from_str(&text).unwrap_or_default();
    rec.insert("id".into(), Value::String(id.to_string()));
    rec.insert("ts".into(), Value::String(ts_string(us)));
    if let Some(t) = rec.get("thread").and_then(Value::as_i64) {
        if t < 0 {
            rec.insert("thread".into(), json!(t as u64));
        }
    }
    if rec.get("kind").and_then(Value::as_str) != Some("http") {
        for c in HTTP_COLUMNS {
            if rec.get(*c).is_some_and(Value::is_null) {
                rec.remove(*c);
            }
        }
    }
    Ok(rec)
}

/// The slowest requests of each (group key, bucket).
type SlowByGroup = std::collections::HashMap<(String, Option<i64>), Vec<(f64, Value)>>;

/// `id::bigint`: a table its owner made may number rows with `serial` (int4).
const SELECT: &str =
    "SELECT id::bigint, (extract(epoch FROM ts) * 1000000)::bigint, to_jsonb(l)::text FROM";

fn is_timeout(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("57014"))
}

impl PgStore {
    pub fn open(cfg: PgConfig) -> Result<PgStore, ReadError> {
        // A bad name or DSN is the caller's input to fix, not a failure to retry.
        let names =
            Names::new(&cfg.schema, &cfg.table).map_err(|m| ReadError::from(BadInput(m)))?;
        let target = redact_dsn(&cfg.dsn);
        let ms = cfg.statement_timeout.as_millis().max(1);
        let opts = PgConnectOptions::from_str(&cfg.dsn)
            .map_err(|_| ReadError::from(BadInput(format!("invalid DSN {target}"))))?
            .application_name("logsluice-reader")
            .options([("statement_timeout", format!("{ms}"))]);
        let secrets = dsn_secrets(&cfg.dsn);
        Ok(PgStore {
            live: PerProcess::default(),
            names,
            target,
            secrets,
            opts,
            connect_timeout: cfg.connect_timeout,
        })
    }

    /// The runtime and pools of this process, built on first use and built afresh in a
    /// forked child (gunicorn `--preload`, multiprocessing), as the pipeline's core is.
    pub fn live(&self) -> Result<Arc<PgLive>, ReadError> {
        self.live.get_or_try_init(|| {
            let rt = super::reader_runtime("logsluice-reader")?;
            let pool = {
                let _guard = rt.enter();
                PgPoolOptions::new()
                    .max_connections(4)
                    .min_connections(0)
                    .acquire_timeout(self.connect_timeout)
                    .idle_timeout(Some(Duration::from_secs(300)))
                    .connect_lazy_with(self.opts.clone())
            };
            Ok(Arc::new(PgLive {
                runtime: Some(rt),
                pool,
                wakeups: Default::default(),
                listener: Default::default(),
            }))
        })
    }

    /// Runs `work` on this process's runtime, waiting for it.
    pub fn block_on<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, ReadError>>,
    ) -> Result<T, ReadError> {
        self.live()?.rt().block_on(work)
    }

    /// The pool of this process.
    fn pool(&self) -> Result<PgPool, ReadError> {
        Ok(self.live()?.pool.clone())
    }

    /// Starts LISTENing (on a connection of its own) for the writers' NOTIFY hints, if not
    /// already in this process. Reconnects after a failure, a second later.
    pub fn listen(&self) -> Result<(), ReadError> {
        let live = self.live()?;
        let mut slot = live.listener.lock();
        if slot.as_ref().is_some_and(|h| !h.is_finished()) {
            return Ok(());
        }
        let pool = {
            let _guard = live.rt().enter();
            PgPoolOptions::new()
                .max_connections(1)
                .min_connections(0)
                .acquire_timeout(self.connect_timeout)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_lazy_with(self.opts.clone().application_name("logsluice-listener"))
        };
        let channel = self.names.notify_channel();
        let wakeups = live.wakeups.clone();
        *slot = Some(live.rt().spawn(async move {
            loop {
                let _ = listen_until_error(&pool, &channel, &wakeups).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }));
        Ok(())
    }

    /// Stops LISTENing (its connection closes).
    pub fn unlisten(&self) {
        let Some(live) = self.live.current() else {
            return;
        };
        let task = live.listener.lock().take();
        if let Some(task) = task {
            task.abort();
        }
    }

    /// This process's hint counter (a forked child counts its own hints, from 0).
    pub fn wakeups(&self) -> Result<Arc<Wakeups>, ReadError> {
        Ok(self.live()?.wakeups.clone())
    }

    fn fail(&self, e: sqlx::Error) -> ReadError {
        let message = match &e {
            sqlx::Error::Database(db) => server_message(db.as_ref()),
            other => other.to_string(),
        };
        ReadError::Failed(scrub(
            &self.secrets,
            format!("PostgreSQL {}: {message}", self.target),
        ))
    }

    /// The id sequence's position: rows inserted after page 1 draw larger ids.
    pub async fn sequence_value(&self) -> Option<i64> {
        let sql = format!(
            "SELECT last_value FROM {}.{}",
            quote(&self.names.schema),
            quote(&format!("{}_id_seq", self.names.table))
        );
        let pool = self.pool().ok()?;
        let row = sqlx::query(AssertSqlSafe(sql))
            .fetch_one(&pool)
            .await
            .ok()?;
        row.try_get::<i64, _>(0).ok()
    }

    /// Seconds since the oldest transaction that has written (holds an xid) in this
    /// database began: rows it inserted are not visible yet, and will be once it commits.
    pub fn oldest_write_age(&self) -> Result<Option<f64>, ReadError> {
        let sql = "SELECT extract(epoch FROM now() - min(xact_start))::float8 FROM pg_stat_activity \
                   WHERE datname = current_database() AND backend_xid IS NOT NULL AND pid <> pg_backend_pid()";
        let live = self.live()?;
        let row = live
            .rt()
            .block_on(sqlx::query(sql).fetch_one(&live.pool))
            .map_err(|e| self.fail(e))?;
        row.try_get::<Option<f64>, _>(0).map_err(|e| self.fail(e))
    }

    /// The page query and its arguments.
    fn page_sql(&self, scan: &Scan) -> (String, Sql) {
        let mut sql = Sql::default();
        scan_sql(scan, &mut sql);
        let dir = if scan.filter.desc { "DESC" } else { "ASC" };
        let limit = sql.arg(Arg::I64(scan.filter.limit as i64));
        let table = self.names.qualified();
        let text = if scan.filter.request_id.is_some() || scan.filter.trace_id.is_some() {
            // A request's or a trace's records are few and their partial index finds them
            // all at once. Left to itself, the planner may rather walk (ts, id) in order,
            // hoping to meet a rare id early: seconds for an id far back (measured at 5M
            // rows). The OFFSET 0 subquery keeps the ORDER BY/LIMIT from steering it so.
            format!(
                "{SELECT} (SELECT * FROM {table} {} OFFSET 0) l ORDER BY ts {dir}, id {dir} LIMIT {limit}",
                sql.where_clause()
            )
        } else {
            format!(
                "{SELECT} {table} l {} ORDER BY ts {dir}, id {dir} LIMIT {limit}",
                sql.where_clause()
            )
        };
        (text, sql)
    }

    pub async fn find(&self, scan: &Scan) -> Result<Found, ReadError> {
        let (text, sql) = self.page_sql(scan);
        let pool = self.pool()?;
        let result = sql
            .bind(sqlx::query(AssertSqlSafe(text)))
            .fetch_all(&pool)
            .await;
        match result {
            Ok(rows) => Ok(Found {
                records: rows
                    .iter()
                    .map(row_record)
                    .collect::<Result<_, _>>()
                    .map_err(|e| self.fail(e))?,
                partial: false,
                resume: None,
            }),
            // The budget ran out: an empty partial page; the cursor stays where it was.
            Err(e) if is_timeout(&e) => Ok(Found {
                records: vec![],
                partial: true,
                resume: Some(scan.after.clone().unwrap_or(Pos {
                    ts: if scan.filter.desc {
                        scan.range().1
                    } else {
                        scan.range().0
                    },
                    id: String::new(),
                })),
            }),
            Err(e) => Err(self.fail(e)),
        }
    }

    pub async fn get(&self, id: &str) -> Result<Option<Map<String, Value>>, ReadError> {
        let Ok(id) = id.trim().parse::<i64>() else {
            return Ok(None);
        };
        let text = format!("{SELECT} {} l WHERE id = $1", self.names.qualified());
        let pool = self.pool()?;
        let row = sqlx::query(AssertSqlSafe(text))
            .bind(id)
            .fetch_optional(&pool)
            .await
            .map_err(|e| self.fail(e))?;
        row.as_ref()
            .map(row_record)
            .transpose()
            .map_err(|e| self.fail(e))
    }

    pub async fn summary(&self, filter: &Filter, spec: &Spec) -> Result<Value, ReadError> {
        let mut sql = Sql::default();
        filter_sql(filter, &mut sql);
        let keys: Vec<String> = spec.keys.iter().map(|k| quote(k)).collect();
        let mut group = keys.clone();
        let bucket = match spec.bucket {
            Some(b) => {
                let p = sql.arg(Arg::I64(b));
                let e =
                    format!("(floor(extract(epoch FROM ts) / {p}::bigint)::bigint * {p}::bigint)");
                group.push(e.clone());
                e
            }
            None => "NULL::bigint".into(),
        };
        let group_by = group.join(", ");
        let keys_json: Vec<String> = spec
            .keys
            .iter()
            .map(|k| format!("'{k}', {}", quote(k)))
            .collect();
        let cls = |c: u16| {
            format!(
                "count(*) FILTER (WHERE status BETWEEN {} AND {})",
                c * 100,
                c * 100 + 99
            )
        };
        let main = format!(
            "SELECT jsonb_build_object({keys})::text, {bucket}, count(*), {c1}, {c2}, {c3}, {c4}, {c5}, \
             count(*) FILTER (WHERE status >= 500 OR (status IS NULL AND level_no >= 40)), \
             percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms), \
             percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms), \
             percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_ms), avg(duration_ms), max(duration_ms) \
             FROM {t} {w} GROUP BY {group_by} ORDER BY 2 NULLS FIRST, 3 DESC LIMIT {MAX_GROUPS}",
            keys = keys_json.join(", "),
            c1 = cls(1),
            c2 = cls(2),
            c3 = cls(3),
            c4 = cls(4),
            c5 = cls(5),
            t = self.names.qualified(),
            w = sql.where_clause(),
        );
        let slow = format!(
            "SELECT k, b, id::bigint, (extract(epoch FROM ts) * 1000000)::bigint, duration_ms, status, method, path, request_id FROM (\
             SELECT jsonb_build_object({keys})::text AS k, {bucket} AS b, id, ts, duration_ms, status, method, path, request_id, \
             row_number() OVER (PARTITION BY {group_by} ORDER BY duration_ms DESC) AS rn \
             FROM {t} {w} {and} duration_ms IS NOT NULL) s WHERE rn <= {n}",
            keys = keys_json.join(", "),
            t = self.names.qualified(),
            w = sql.where_clause(),
            and = if sql.conds.is_empty() { "WHERE" } else { "AND" },
            n = spec.slowest,
        );
        let pool = self.pool()?;
        let result = async {
            let rows = sql
                .bind(sqlx::query(AssertSqlSafe(main)))
                .fetch_all(&pool)
                .await?;
            let slow_rows = if spec.slowest > 0 {
                sql.bind(sqlx::query(AssertSqlSafe(slow)))
                    .fetch_all(&pool)
                    .await?
            } else {
                vec![]
            };
            Ok::<_, sqlx::Error>((rows, slow_rows))
        }
        .await;
        let (rows, slow_rows) = match result {
            Ok(r) => r,
            Err(e) if is_timeout(&e) => {
                return Ok(json!({"groups": [], "approximate": false, "partial": true}));
            }
            Err(e) => return Err(self.fail(e)),
        };
        let mut slowest: SlowByGroup = Default::default();
        for r in &slow_rows {
            let get = || -> Result<_, sqlx::Error> {
                let k: String = r.try_get(0)?;
                let b: Option<i64> = r.try_get(1)?;
                let id: i64 = r.try_get(2)?;
                let us: i64 = r.try_get(3)?;
                let d: f64 = r.try_get(4)?;
                let status: Option<i16> = r.try_get(5)?;
                let method: Option<String> = r.try_get(6)?;
                let path: Option<String> = r.try_get(7)?;
                let rid: Option<String> = r.try_get(8)?;
                let v = json!({"id": id.to_string(), "ts": ts_string(us), "duration_ms": d, "status": status,
                               "method": method, "path": path, "request_id": rid});
                Ok(((k, b), d, v))
            };
            let (key, d, v) = get().map_err(|e| self.fail(e))?;
            slowest.entry(key).or_default().push((d, v));
        }
        let mut groups = Vec::new();
        for r in &rows {
            let get = || -> Result<_, sqlx::Error> {
                let k: String = r.try_get(0)?;
                let b: Option<i64> = r.try_get(1)?;
                let mut counts = [0u64; 7];
                for (i, c) in counts.iter_mut().enumerate() {
                    *c = r.try_get::<i64, _>(2 + i)? as u64;
                }
                let f = |i: usize| -> Result<Value, sqlx::Error> {
                    Ok(r.try_get::<Option<f64>, _>(i)?
                        .map_or(Value::Null, |v| json!(v)))
                };
                Ok((k, b, counts, [f(9)?, f(10)?, f(11)?], f(12)?, f(13)?))
            };
            let (k, b, counts, pcts, avg, max) = get().map_err(|e| self.fail(e))?;
            let key: Map<String, Value> = serde_json::from_str(&k).unwrap_or_default();
            let mut slow = slowest.remove(&(k, b)).unwrap_or_default();
            slow.sort_by(|a, b| b.0.total_cmp(&a.0));
            let classes = [0, counts[1], counts[2], counts[3], counts[4], counts[5]];
            groups.push(group_value(
                key,
                b,
                counts[0],
                classes,
                counts[6],
                pcts,
                avg,
                max,
                slow.into_iter().map(|(_, v)| v).collect(),
            ));
        }
        Ok(json!({"groups": groups, "approximate": false, "partial": false}))
    }

    pub fn explain(&self, scan: &Scan) -> Result<String, ReadError> {
        let (text, sql) = self.page_sql(scan);
        let text = format!("EXPLAIN (ANALYZE, BUFFERS) {text}");
        let live = self.live()?;
        let rows = live
            .rt()
            .block_on(
                sql.bind(sqlx::query(AssertSqlSafe(text)))
                    .fetch_all(&live.pool),
            )
            .map_err(|e| self.fail(e))?;
        Ok(rows
            .iter()
            .filter_map(|r| r.try_get::<String, _>(0).ok())
            .collect::<Vec<_>>()
            .join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_values_never_reach_the_sql_text() {
        let evil = "x'); DROP TABLE logs; --";
        let f = Filter::parse(
            json!({"logger": evil, "text": evil, "route": evil, "path": evil, "request_id": evil,
                   "fields": {"a": evil, "b": {"in": [evil]}, "c": {"ne": evil}},
                   "exclude": {"route": evil, "path": evil, "text": evil, "logger": [evil, "x"]}})
            .as_object()
            .unwrap(),
        )
        .unwrap();
        let scan = Scan {
            filter: f,
            after: Some(Pos {
                ts: 1,
                id: "5".into(),
            }),
            asof_ts: Some(2),
            asof_id: Some(9),
        };
        let mut sql = Sql::default();
        scan_sql(&scan, &mut sql);
        let text = sql.where_clause();
        assert!(!text.contains("DROP"), "{text}");
        assert!(text.contains("\"route\" IS DISTINCT FROM $"), "{text}");
        assert!(text.contains("NOT coalesce(path LIKE $"), "{text}");
        assert!(text.contains("(ts, id) < ("));
        assert!(text.contains("ts <= $"));
        assert_eq!(like_escape("a%b_c\\"), "a\\%b\\_c\\\\");
    }
}
