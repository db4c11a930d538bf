//! Destination configuration as the Python face hands it over (JSON), with the documented
//! defaults. Python validates first for friendly messages; `validate` here is the last word.

use std::time::Duration;

use serde::Deserialize;

use crate::record::Kind;

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnFull {
    Drop,
    Block,
}

/// What every destination shares: routing, queue, batching, retries, breaker.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Common {
    pub name: String,
    pub min_level: u16,
    pub kinds: Vec<Kind>,
    pub queue_max_records: usize,
    pub queue_max_bytes: usize,
    pub on_full: OnFull,
    pub block_timeout: f64,
    pub batch_max_records: usize,
    pub batch_max_bytes: usize,
    pub batch_max_delay: f64,
    pub max_retries: u32,
    pub retry_initial: f64,
    pub retry_max: f64,
    pub attempt_timeout: f64,
    pub breaker_threshold: u32,
    pub breaker_cooldown: f64,
}

impl Default for Common {
    fn default() -> Self {
        Common {
            name: String::new(),
            min_level: 0,
            kinds: vec![Kind::App, Kind::Http],
            queue_max_records: 100_000,
            queue_max_bytes: 64 << 20,
            on_full: OnFull::Drop,
            block_timeout: 0.1,
            batch_max_records: 10_000,
            batch_max_bytes: 4 << 20,
            batch_max_delay: 1.0,
            max_retries: 3,
            retry_initial: 0.1,
            retry_max: 10.0,
            attempt_timeout: 30.0,
            breaker_threshold: 5,
            breaker_cooldown: 10.0,
        }
    }
}

impl Common {
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("queue_max_records", self.queue_max_records as f64),
            ("queue_max_bytes", self.queue_max_bytes as f64),
            ("batch_max_records", self.batch_max_records as f64),
            ("batch_max_bytes", self.batch_max_bytes as f64),
            ("batch_max_delay", self.batch_max_delay),
            ("attempt_timeout", self.attempt_timeout),
            ("breaker_threshold", self.breaker_threshold as f64),
            ("retry_initial", self.retry_initial),
            ("retry_max", self.retry_max),
        ];
        for (name, v) in positive {
            if !(v > 0.0 && v.is_finite()) {
                return Err(format!("{name} must be a positive number, got {v}"));
            }
        }
        for (name, v) in [
            ("block_timeout", self.block_timeout),
            ("breaker_cooldown", self.breaker_cooldown),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(format!("{name} must be zero or a positive number, got {v}"));
            }
        }
        if self.name.is_empty() {
            return Err("name must not be empty".into());
        }
        if self.name == RESERVED_NAME {
            return Err(format!(
                "name={RESERVED_NAME:?} is reserved (Pipeline.stats() reports the middleware's \
                 counters under it); choose another name="
            ));
        }
        if self.kinds.is_empty() {
            return Err("kinds must name at least one of 'app', 'http'".into());
        }
        Ok(())
    }

    pub fn wants(&self, level_no: u16, kind: Kind) -> bool {
        level_no >= self.min_level && self.kinds.contains(&kind)
    }
}

/// The longest wait any option or call turns into (about 31 years): long enough to mean
/// "forever", short enough that a deadline `Instant::now() + d` cannot overflow.
const MAX_SECONDS: f64 = 1e9;

/// Seconds as a `Duration`, saturating: negative or NaN is zero, anything huge (infinity
/// included) is [`MAX_SECONDS`]. `Duration::from_secs_f64` panics on those instead.
pub fn seconds(v: f64) -> Duration {
    if v.is_nan() || v <= 0.0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(v.min(MAX_SECONDS))
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalFilesConfig {
    pub directory: String,
    pub prefix: String,
    pub max_file_bytes: u64,
    /// Seconds per file; 0 disables time rotation.
    pub rotate_seconds: u64,
    pub compress: bool,
    /// Rotated files kept per directory; 0 keeps all.
    pub keep: usize,
    pub fsync: bool,
}

impl Default for LocalFilesConfig {
    fn default() -> Self {
        LocalFilesConfig {
            directory: "./logs".into(),
            prefix: "logsluice".into(),
            max_file_bytes: 100 << 20,
            rotate_seconds: 3600,
            compress: false,
            keep: 0,
            fsync: false,
        }
    }
}

/// A destination whose writer fails on demand: used by tests of the generic machinery
/// (breaker, retries, queue-full) through the real Python API.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlledConfig {
    pub control_file: String,
    pub output_file: String,
}

/// PostgreSQL: binary COPY into a self-managed, day-partitioned table (README "PostgreSQL").
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// `postgresql://user:password@host:port/db?...`; the password never leaves this struct.
    pub dsn: String,
    pub schema: String,
    pub table: String,
    /// `"day"` (range partitions per UTC day, per kind) or `None` for a plain table.
    pub partition: Option<String>,
    pub create_table: bool,
    /// Seconds to keep, per kind; a kind not listed is kept forever.
    pub retention: std::collections::HashMap<Kind, f64>,
    /// Day partitions created ahead of today.
    pub premake_days: u32,
    /// Seconds between maintenance runs (partitions ahead, retention).
    pub maintenance_interval: f64,
    pub connect_timeout: f64,
    pub statement_timeout: f64,
    pub dead_letter_dir: Option<String>,
    pub application_name: String,
    /// `NOTIFY` the table's channel after a batch commits (coalesced), so tails wake early.
    pub notify: bool,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            dsn: String::new(),
            schema: "public".into(),
            table: "logs".into(),
            partition: Some("day".into()),
            create_table: true,
            retention: Default::default(),
            premake_days: 2,
            maintenance_interval: 3600.0,
            connect_timeout: 10.0,
            statement_timeout: 30.0,
            dead_letter_dir: None,
            application_name: "logsluice".into(),
            notify: true,
        }
    }
}

impl std::fmt::Debug for PostgresConfig {
    // Hand-written so the DSN's password can never reach a debug print.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("dsn", &crate::destinations::postgres::redact_dsn(&self.dsn))
            .field("schema", &self.schema)
            .field("table", &self.table)
            .field("partition", &self.partition)
            .field("create_table", &self.create_table)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BlobCompression {
    None,
    Gzip,
}

/// Azure Blob Storage: one block blob of NDJSON per batch (and per kind and time partition).
/// Exactly one of `connection_string`, `account_url` or `container_url` says where.
/// `Debug` is written by hand: connection strings, keys and SAS tokens are secrets.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AzureBlobConfig {
    pub connection_string: Option<String>,
    pub account_url: Option<String>,
    /// With `account_url`: "default", "managed_identity", "workload_identity",
    /// "azure_cli", "environment", a SAS token or an account key.
    pub credential: Option<String>,
    /// A container URL, usually with a SAS token in its query.
    pub container_url: Option<String>,
    pub container: String,
    pub prefix: String,
    pub compression: BlobCompression,
    pub compression_level: u32,
    pub name_template: String,
    pub create_container: bool,
    /// Blobs larger than this are uploaded as blocks of this size.
    pub block_size: u64,
    pub max_concurrency: usize,
}

impl Default for AzureBlobConfig {
    fn default() -> Self {
        AzureBlobConfig {
            connection_string: None,
            account_url: None,
            credential: None,
            container_url: None,
            container: "logs".into(),
            prefix: String::new(),
            compression: BlobCompression::Gzip,
            compression_level: 4,
            name_template: crate::destinations::azure_blob::naming::DEFAULT_TEMPLATE.into(),
            create_container: true,
            block_size: 4 << 20,
            max_concurrency: 4,
        }
    }
}

impl std::fmt::Debug for AzureBlobConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |v: &Option<String>| v.as_ref().map(|_| "<hidden>");
        f.debug_struct("AzureBlobConfig")
            .field("connection_string", &hidden(&self.connection_string))
            .field("account_url", &self.account_url)
            .field("credential", &hidden(&self.credential))
            .field("container_url", &hidden(&self.container_url))
            .field("container", &self.container)
            .field("prefix", &self.prefix)
            .field("compression", &self.compression)
            .field("name_template", &self.name_template)
            .field("create_container", &self.create_container)
            .field("block_size", &self.block_size)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Target {
    LocalFiles(LocalFilesConfig),
    Controlled(ControlledConfig),
    Postgres(PostgresConfig),
    AzureBlob(AzureBlobConfig),
}

impl Target {
    /// Checks what can be checked without I/O, so a bad option fails at construction.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Target::AzureBlob(cfg) => crate::destinations::azure_blob::validate(cfg),
            Target::Postgres(cfg) => crate::destinations::postgres::validate(cfg),
            _ => Ok(()),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationSpec {
    #[serde(default)]
    pub common: Common,
    pub target: Target,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineOptions {
    pub max_message_bytes: usize,
    pub max_field_bytes: usize,
    /// The middleware's finished requests waiting for or under redaction, at most (more are
    /// dropped and counted as `handoff_dropped`): by count and by their bytes.
    pub handoff_max_requests: usize,
    pub handoff_max_bytes: usize,
    /// Where records a store could not take before `close` are written, to be delivered
    /// by the next start with the same directory (see `spill`). `None`: they are dropped.
    pub spill_dir: Option<String>,
    /// The spill directory's size, at most; records beyond it are dropped (`spill_full`).
    pub spill_max_bytes: u64,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            max_message_bytes: 64 << 10,
            max_field_bytes: 64 << 10,
            handoff_max_requests: 20_000,
            handoff_max_bytes: 64 << 20,
            spill_dir: None,
            spill_max_bytes: 256 << 20,
        }
    }
}

/// The key of the middleware's counters in `Pipeline.stats()`, beside the destinations'.
const RESERVED_NAME: &str = "http";

pub fn parse_specs(json: &str) -> Result<Vec<DestinationSpec>, String> {
    let specs: Vec<DestinationSpec> = serde_json::from_str(json)
        .map_err(|e| format!("invalid destination configuration: {e}"))?;
    let mut names = std::collections::HashSet::new();
    for s in &specs {
        s.common
            .validate()
            .map_err(|e| format!("destination {:?}: {e}", s.common.name))?;
        s.target
            .validate()
            .map_err(|e| format!("destination {:?}: {e}", s.common.name))?;
        if !names.insert(s.common.name.clone()) {
            return Err(format!(
                "two destinations are named {:?}; give one a different name=",
                s.common.name
            ));
        }
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_saturate_instead_of_panicking() {
        assert_eq!(seconds(f64::NAN), Duration::ZERO);
        assert_eq!(seconds(-1.0), Duration::ZERO);
        assert_eq!(seconds(0.25), Duration::from_millis(250));
        for huge in [1e20, f64::INFINITY] {
            assert_eq!(seconds(huge), Duration::from_secs(1_000_000_000));
            // The deadlines built from them must not overflow either.
            let _ = std::time::Instant::now() + seconds(huge);
        }
    }

    #[test]
    fn defaults_fill_in_and_unknown_keys_fail() {
        let specs = parse_specs(r#"[{"common":{"name":"local_files"},"target":{"type":"local_files","directory":"/tmp/x"}}]"#).unwrap();
        assert_eq!(specs[0].common.queue_max_records, 100_000);
        assert!(parse_specs(
            r#"[{"common":{"name":"a","bogus":1},"target":{"type":"local_files"}}]"#
        )
        .is_err());
        assert!(parse_specs(
            r#"[{"common":{"name":"a","batch_max_delay":-1},"target":{"type":"local_files"}}]"#
        )
        .is_err());
    }

    #[test]
    fn the_middleware_counters_name_is_reserved() {
        let spec = r#"[{"common":{"name":"http"},"target":{"type":"local_files"}}]"#;
        assert!(parse_specs(spec).unwrap_err().contains("reserved"));
    }

    #[test]
    fn duplicate_names_fail() {
        let one = r#"{"common":{"name":"a"},"target":{"type":"local_files"}}"#;
        assert!(parse_specs(&format!("[{one},{one}]"))
            .unwrap_err()
            .contains("two destinations"));
    }
}
