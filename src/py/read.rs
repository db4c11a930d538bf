//! `ReaderCore`: the read side for `logsluice.Reader`. Requests and answers cross as JSON
//! text; every call releases the GIL while it reads.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::read::files::{FilesConfig, FilesStore};
use crate::read::pg::{PgConfig, PgStore};
use crate::read::{ReadError, Reader, Scan, Store};

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
}

#[pymethods]
impl PyReader {
    #[new]
    fn new(py: Python<'_>, spec_json: &str) -> PyResult<Self> {
        let spec: SourceSpec = serde_json::from_str(spec_json)
            .map_err(|e| PyValueError::new_err(format!("invalid reader source: {e}")))?;
        let secs = |v: f64| Duration::from_secs_f64(v.clamp(0.001, 25.0));
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
                        Reader::new(Store::Pg(store), &identity)
                    }
                })
            })
            .map_err(err)?;
        Ok(PyReader {
            inner: Arc::new(reader),
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
                Store::Files(_) => Err(ReadError::Failed(
                    "explain needs a PostgreSQL source".into(),
                )),
            }
        })
        .map_err(err)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyReader>()?;
    Ok(())
}
