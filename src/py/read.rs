//! `ReaderCore`: the read side for `logsluice.Reader`. Requests and answers cross as JSON
//! text; every call releases the GIL while it reads.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::config::AzureBlobConfig;
use crate::read::blob::{BlobConfig, BlobStore};
use crate::read::files::{FilesConfig, FilesStore};
use crate::read::pg::{PgConfig, PgStore};
use crate::read::{ReadError, Reader, Scan, Store};

use super::asyncio_bridge::{self, InFlight};

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum SourceSpec {
    Files {
        directory: String,
        #[serde(default)]
        max_bytes: Option<u64>,
        #[serde(default)]
        max_files: Option<usize>,
        #[serde(default)]
        max_seconds: Option<f64>,
        #[serde(default)]
        slack_seconds: Option<f64>,
    },
    Blob {
        #[serde(default)]
        connection_string: Option<String>,
        #[serde(default)]
        account_url: Option<String>,
        #[serde(default)]
        credential: Option<String>,
        #[serde(default)]
        container_url: Option<String>,
        #[serde(default = "logs")]
        container: String,
        #[serde(default)]
        prefix: String,
        #[serde(default)]
        name_template: Option<String>,
        #[serde(default)]
        max_bytes: Option<u64>,
        #[serde(default)]
        max_files: Option<usize>,
        #[serde(default)]
        max_seconds: Option<f64>,
        #[serde(default)]
        concurrency: Option<usize>,
    },
    Postgres {
        dsn: String,
        #[serde(default = "public")]
        schema: String,
        #[serde(default = "logs")]
        table: String,
        #[serde(default = "ten")]
        statement_timeout: f64,
        #[serde(default = "ten")]
        connect_timeout: f64,
    },
}

fn public() -> String {
    "public".into()
}
fn logs() -> String {
    "logs".into()
}
fn ten() -> f64 {
    10.0
}

fn err(e: ReadError) -> PyErr {
    match e {
        ReadError::Bad(b) => PyValueError::new_err(b.0),
        ReadError::Failed(m) => PyRuntimeError::new_err(m),
    }
}

fn object(text: &str) -> PyResult<Map<String, Value>> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(PyValueError::new_err("the request must be a JSON object")),
    }
}

#[pyclass(frozen, module = "logsluice._core", name = "ReaderCore")]
pub struct PyReader {
    inner: Arc<Reader>,
    in_flight: InFlight,
}

impl PyReader {
    fn pg(&self) -> PyResult<&PgStore> {
        match &self.inner.store {
            Store::Pg(s) => Ok(s),
            Store::Files(_) | Store::Blob(_) => {
                Err(PyRuntimeError::new_err("a PostgreSQL source only"))
            }
        }
    }

    /// Runs `work` against the PostgreSQL store on its runtime; an asyncio future.
    fn spawn<'py, F, Fut>(&self, py: Python<'py>, work: F) -> PyResult<Bound<'py, PyAny>>
    where
        F: FnOnce(Arc<Reader>) -> Fut,
        Fut: std::future::Future<Output = asyncio_bridge::Outcome> + Send + 'static,
    {
        let live = self.pg()?.live().map_err(err)?;
        asyncio_bridge::spawn(py, live.rt(), &self.in_flight, work(self.inner.clone()))
    }
}

fn pg_of(reader: &Reader) -> &PgStore {
    match &reader.store {
        Store::Pg(s) => s,
        Store::Files(_) | Store::Blob(_) => unreachable!("checked by PyReader::pg"),
    }
}

#[pymethods]
impl PyReader {
    #[new]
    fn new(py: Python<'_>, spec_json: &str) -> PyResult<Self> {
        let spec: SourceSpec = serde_json::from_str(spec_json)
            .map_err(|e| PyValueError::new_err(format!("invalid reader source: {e}")))?;
        let secs = |v: f64| {
            crate::config::seconds(v).clamp(Duration::from_millis(1), Duration::from_secs(25))
        };
        let reader = py
            .detach(|| -> Result<Reader, ReadError> {
                Ok(match spec {
                    SourceSpec::Files {
                        directory,
                        max_bytes,
                        max_files,
                        max_seconds,
                        slack_seconds,
                    } => {
                        let mut cfg = FilesConfig::new(PathBuf::from(&directory));
                        if let Some(b) = max_bytes {
                            cfg.max_bytes = b.max(1);
                        }
                        if let Some(f) = max_files {
                            cfg.max_files = f;
                        }
                        if let Some(s) = max_seconds {
                            cfg.max_time = secs(s);
                        }
                        if let Some(s) = slack_seconds {
                            cfg.slack_us = (s.max(0.0) * 1e6) as i64;
                        }
                        Reader::new(
                            Store::Files(FilesStore { cfg }),
                            &format!("files:{directory}"),
                        )
                    }
                    SourceSpec::Blob {
                        connection_string,
                        account_url,
                        credential,
                        container_url,
                        container,
                        prefix,
                        name_template,
                        max_bytes,
                        max_files,
                        max_seconds,
                        concurrency,
                    } => {
                        let mut target = AzureBlobConfig {
                            connection_string,
                            account_url,
                            credential,
                            container_url,
                            container,
                            prefix,
                            ..Default::default()
                        };
                        if let Some(t) = name_template {
                            target.name_template = t;
                        }
                        let mut cfg = BlobConfig::new(target);
                        if let Some(b) = max_bytes {
                            cfg.max_bytes = b.max(1);
                        }
                        if let Some(f) = max_files {
                            cfg.max_blobs = f;
                        }
                        if let Some(s) = max_seconds {
                            cfg.max_time = secs(s);
                        }
                        if let Some(c) = concurrency {
                            cfg.concurrency = c.clamp(1, 64);
                        }
                        // The cursor key: where the blobs are, secrets included (as for a
                        // DSN), not the budgets: readers of one container share cursors.
                        let t = &cfg.target;
                        let identity = format!(
                            "blob:{:?}:{:?}:{:?}:{:?}:{}:{}",
                            t.connection_string,
                            t.account_url,
                            t.credential,
                            t.container_url,
                            t.container,
                            t.prefix
                        );
                        let store = BlobStore::open(cfg)?;
                        Reader::new(Store::Blob(Box::new(store)), &identity)
                    }
                    SourceSpec::Postgres {
                        dsn,
                        schema,
                        table,
                        statement_timeout,
                        connect_timeout,
                    } => {
                        let identity = format!("postgres:{dsn}:{schema}.{table}");
                        let store = PgStore::open(PgConfig {
                            dsn,
                            schema,
                            table,
                            statement_timeout: secs(statement_timeout),
                            connect_timeout: secs(connect_timeout),
                        })?;
                        Reader::new(Store::Pg(Box::new(store)), &identity)
                    }
                })
            })
            .map_err(err)?;
        Ok(PyReader {
            inner: Arc::new(reader),
            in_flight: InFlight::default(),
        })
    }

    /// One page: `{"records": [...], "next": cursor or null, "partial": bool}` as JSON.
    fn query(&self, py: Python<'_>, request_json: &str) -> PyResult<String> {
        let req = object(request_json)?;
        let inner = self.inner.clone();
        let page = py.detach(move || inner.query(&req)).map_err(err)?;
        Ok(
            json!({"records": page.records, "next": page.next, "partial": page.partial})
                .to_string(),
        )
    }

    /// One record by id, as JSON, or None.
    fn get(&self, py: Python<'_>, id: &str) -> PyResult<Option<String>> {
        let inner = self.inner.clone();
        let id = id.to_owned();
        let rec = py.detach(move || inner.get(&id)).map_err(err)?;
        Ok(rec.map(|r| Value::Object(r).to_string()))
    }

    fn summary(&self, py: Python<'_>, request_json: &str) -> PyResult<String> {
        let req = object(request_json)?;
        let inner = self.inner.clone();
        let v = py.detach(move || inner.summary(&req)).map_err(err)?;
        Ok(v.to_string())
    }

    /// PostgreSQL: `query` as an awaitable (an asyncio future completed from the core's
    /// runtime; cancelling it drops the query).
    fn aquery<'py>(&self, py: Python<'py>, request_json: &str) -> PyResult<Bound<'py, PyAny>> {
        let req = object(request_json)?;
        self.spawn(py, move |inner| async move {
            let page = inner.query_pg(pg_of(&inner), &req).await?;
            Ok(Some(
                json!({"records": page.records, "next": page.next, "partial": page.partial})
                    .to_string(),
            ))
        })
    }

    /// PostgreSQL: `get` as an awaitable.
    fn aget<'py>(&self, py: Python<'py>, id: &str) -> PyResult<Bound<'py, PyAny>> {
        let id = id.to_owned();
        self.spawn(py, move |inner| async move {
            let rec = pg_of(&inner).get(&id).await?;
            Ok(rec.map(|r| Value::Object(r).to_string()))
        })
    }

    /// PostgreSQL: `summary` as an awaitable.
    fn asummary<'py>(&self, py: Python<'py>, request_json: &str) -> PyResult<Bound<'py, PyAny>> {
        let req = object(request_json)?;
        self.spawn(py, move |inner| async move {
            let v = inner.summary_pg(pg_of(&inner), &req).await?;
            Ok(Some(v.to_string()))
        })
    }

    /// Awaitables started and not yet finished or dropped.
    fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// PostgreSQL: LISTEN for the writers' NOTIFY hints (on a connection of its own).
    fn listen(&self) -> PyResult<()> {
        self.pg()?.listen().map_err(err)
    }

    fn unlisten(&self) -> PyResult<()> {
        self.pg()?.unlisten();
        Ok(())
    }

    /// Waits up to `timeout` seconds for a hint: returns the hint count, which differs
    /// from `seen` when one (or a LISTEN restart) came.
    fn wait_wakeup(&self, py: Python<'_>, seen: u64, timeout: f64) -> PyResult<u64> {
        let wakeups = self.pg()?.wakeups().map_err(err)?;
        let timeout = crate::config::seconds(timeout).min(Duration::from_secs(60));
        Ok(py.detach(move || wakeups.wait(seen, timeout)))
    }

    /// PostgreSQL: seconds since the oldest still-open writing transaction began (None
    /// when there is none, or for files).
    fn oldest_write_age(&self, py: Python<'_>) -> PyResult<Option<f64>> {
        let inner = self.inner.clone();
        py.detach(move || match &inner.store {
            Store::Pg(s) => s.oldest_write_age(),
            Store::Files(_) | Store::Blob(_) => Ok(None),
        })
        .map_err(err)
    }

    /// PostgreSQL only: `EXPLAIN (ANALYZE, BUFFERS)` of the page query for these filters.
    fn explain(&self, py: Python<'_>, request_json: &str) -> PyResult<String> {
        let req = object(request_json)?;
        let inner = self.inner.clone();
        py.detach(move || {
            let mut filt = req;
            let after = filt
                .remove("_after")
                .and_then(|a| serde_json::from_value(a).ok());
            let filter = crate::read::filter::Filter::parse(&filt)?;
            let scan = Scan {
                filter,
                after,
                asof_ts: None,
                asof_id: None,
            };
            match &inner.store {
                Store::Pg(s) => s.explain(&scan),
                Store::Files(_) | Store::Blob(_) => Err(ReadError::Failed(
                    "explain needs a PostgreSQL source".into(),
                )),
            }
        })
        .map_err(err)
    }

    /// Work counters of a blob source (list calls, blobs and bytes downloaded) as JSON;
    /// `{}` for other sources.
    fn stats(&self) -> String {
        match &self.inner.store {
            Store::Blob(s) => s.stats_json().to_string(),
            _ => "{}".into(),
        }
    }

    /// Blob sources: the records of blobs not yet in `seen_json` (a JSON list of names)
    /// in the partitions from `list_from` (epoch seconds) to now, skipping blobs whose
    /// records all predate `min_ts`. Returns JSON `{"records": [...], "seen": [...]}`.
    fn poll_new(
        &self,
        py: Python<'_>,
        request_json: &str,
        list_from: f64,
        min_ts: f64,
        seen_json: &str,
    ) -> PyResult<String> {
        let req = object(request_json)?;
        let seen: std::collections::HashSet<String> = serde_json::from_str(seen_json)
            .map_err(|_| PyValueError::new_err("seen must be a JSON list of names"))?;
        let inner = self.inner.clone();
        let polled = py
            .detach(move || {
                let Store::Blob(s) = &inner.store else {
                    return Err(ReadError::Failed("poll_new needs a blob source".into()));
                };
                let filter = crate::read::filter::Filter::parse(&req)?;
                s.poll(
                    &filter,
                    (list_from * 1e6) as i64,
                    (min_ts * 1e6) as i64,
                    seen,
                )
            })
            .map_err(err)?;
        Ok(json!({"records": polled.records, "seen": polled.seen}).to_string())
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyReader>()?;
    Ok(())
}
