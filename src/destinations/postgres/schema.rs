//! The `logs` table: names, DDL, migration and partition bookkeeping. Identifiers are
//! validated to `[A-Za-z_][A-Za-z0-9_]*` and always double-quoted; values go in as bound
//! parameters. Only names built from validated identifiers and digits are formatted in.

use chrono::{DateTime, Datelike, NaiveDate, TimeDelta, Utc};

use super::copy::COLUMNS;
use crate::record::Kind;

/// The longest table name: partition and index names add at most 14 characters and
/// PostgreSQL cuts identifiers at 63 bytes.
pub const MAX_TABLE_LEN: usize = 48;

pub const SCHEMA_VERSION: u32 = 1;

pub const KINDS: [Kind; 2] = [Kind::App, Kind::Http];

pub fn validate_identifier(what: &str, name: &str, max: usize) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "{what} must be letters, digits and underscores, starting with a letter or underscore; got {name:?}"
        ));
    }
    if name.len() > max {
        return Err(format!(
            "{what} must be at most {max} characters; got {} ({name:?})",
            name.len()
        ));
    }
    Ok(())
}

/// `"name"`; only ever called on validated identifiers (no quote can occur inside).
pub fn quote(name: &str) -> String {
    debug_assert!(validate_identifier("identifier", name, 63).is_ok());
    format!("\"{name}\"")
}

/// How the existing (or to be created) table is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// A plain table: retention deletes in chunks.
    Plain,
    /// LIST (kind) -> RANGE (ts) per UTC day, created and dropped by logsluice.
    Daily,
    /// Partitioned by its owner some other way: written to, never altered.
    Foreign,
}

#[derive(Clone, Debug)]
pub struct Names {
    pub schema: String,
    pub table: String,
}

impl Names {
    pub fn new(schema: &str, table: &str) -> Result<Self, String> {
        validate_identifier("schema", schema, 63)?;
        validate_identifier("table", table, MAX_TABLE_LEN)?;
        Ok(Names {
            schema: schema.to_owned(),
            table: table.to_owned(),
        })
    }

    pub fn qualified(&self) -> String {
        format!("{}.{}", quote(&self.schema), quote(&self.table))
    }

    /// `schema.table` as shown to people and used as a `regclass` parameter.
    pub fn display(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    fn rel(&self, suffix: &str) -> String {
        format!(
            "{}.{}",
            quote(&self.schema),
            quote(&format!("{}{suffix}", self.table))
        )
    }

    pub fn kind_partition(&self, kind: Kind) -> String {
        self.rel(&format!("_{}", kind.as_str()))
    }

    pub fn kind_partition_regclass(&self, kind: Kind) -> String {
        format!("{}.{}_{}", quote(&self.schema), self.table, kind.as_str())
    }

    pub fn day_partition_name(&self, kind: Kind, day: NaiveDate) -> String {
        format!("{}_{}_{}", self.table, kind.as_str(), day.format("%Y%m%d"))
    }

    /// The advisory-lock key that serialises DDL on this table across processes.
    pub fn lock_key(&self) -> String {
        format!("logsluice:{}.{}", self.schema, self.table)
    }

    /// The channel writers `NOTIFY` after a commit and readers `LISTEN` on. Names built
    /// from two validated identifiers; long ones are cut and keep a hash of the whole so two
    /// tables do not share a channel (a shared one would only cost extra polls).
    pub fn notify_channel(&self) -> String {
        let full = format!("logsluice_{}_{}", self.schema, self.table);
        if full.len() <= 63 {
            return full;
        }
        // FNV-1a: stable across processes and builds, unlike the std hasher.
        let hash = full.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        format!("{}_{hash:016x}", &full[..46])
    }

    /// `COPY` of the first `columns` of [`COLUMNS`].
    pub fn copy_statement(&self, columns: usize) -> String {
        let cols: Vec<String> = COLUMNS[..columns].iter().map(|(c, _)| quote(c)).collect();
        format!(
            "COPY {} ({}) FROM STDIN (FORMAT binary)",
            self.qualified(),
            cols.join(", ")
        )
    }

    fn column_defs(&self) -> String {
        let mut defs = vec![format!(
            "\"id\" bigint NOT NULL DEFAULT nextval('{}'::regclass)",
            self.rel("_id_seq")
        )];
        for (name, ty) in COLUMNS {
            let not_null = matches!(*name, "ts" | "level" | "level_no" | "kind" | "message");
            defs.push(format!(
                "{} {ty}{}",
                quote(name),
                if not_null { " NOT NULL" } else { "" }
            ));
        }
        defs.join(",\n    ")
    }

    /// Creates schema objects that are missing; every statement is idempotent.
    pub fn create_sql(&self, layout: Layout) -> String {
        let t = self.qualified();
        let mut sql = vec![
            format!(
                "CREATE SEQUENCE IF NOT EXISTS {} AS bigint CACHE 100",
                self.rel("_id_seq")
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {t} (\n    {}\n){}",
                self.column_defs(),
                if layout == Layout::Daily {
                    " PARTITION BY LIST (\"kind\")"
                } else {
                    ""
                }
            ),
            format!("ALTER SEQUENCE {} OWNED BY {t}.\"id\"", self.rel("_id_seq")),
        ];
        if layout == Layout::Daily {
            for kind in KINDS {
                sql.push(format!(
                    "CREATE TABLE IF NOT EXISTS {} PARTITION OF {t} FOR VALUES IN ('{}') PARTITION BY RANGE (\"ts\")",
                    self.kind_partition(kind),
                    kind.as_str()
                ));
            }
        }
        sql.push(format!(
            "COMMENT ON TABLE {t} IS 'logsluice log records (schema {SCHEMA_VERSION}); managed by logsluice'"
        ));
        sql.join(";\n")
    }

    /// ADD COLUMN for what an older table lacks (never drops or rewrites anything).
    pub fn add_columns_sql(&self, missing: &[&str]) -> String {
        let t = self.qualified();
        let mut sql = Vec::new();
        for name in missing {
            if *name == "id" {
                sql.push(format!(
                    "CREATE SEQUENCE IF NOT EXISTS {} AS bigint CACHE 100",
                    self.rel("_id_seq")
                ));
                sql.push(format!(
                    "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS \"id\" bigint DEFAULT nextval('{}'::regclass)",
                    self.rel("_id_seq")
                ));
            } else if let Some((_, ty)) = COLUMNS.iter().find(|(c, _)| c == name) {
                sql.push(format!(
                    "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {} {ty}",
                    quote(name)
                ));
            }
        }
        sql.join(";\n")
    }

    /// The indexes the read side needs. A b-tree on (ts, id) serves "newest first" and
    /// keyset paging (BRIN cannot serve "last 100", and late or replayed records make it
    /// degrade); partial b-trees for request and trace ids; (route, ts) for http records;
    /// and a small partial index for errors, which are rare.
    pub fn index_sql(&self) -> String {
        let t = self.qualified();
        let idx = |suffix: &str| quote(&format!("{}{suffix}", self.table));
        [
            format!("CREATE INDEX IF NOT EXISTS {} ON {t} (\"ts\", \"id\")", idx("_ts_id")),
            format!("CREATE INDEX IF NOT EXISTS {} ON {t} (\"request_id\") WHERE \"request_id\" IS NOT NULL", idx("_request_id")),
            format!("CREATE INDEX IF NOT EXISTS {} ON {t} (\"trace_id\") WHERE \"trace_id\" IS NOT NULL", idx("_trace_id")),
            format!("CREATE INDEX IF NOT EXISTS {} ON {t} (\"route\", \"ts\") WHERE \"route\" IS NOT NULL", idx("_route_ts")),
            format!("CREATE INDEX IF NOT EXISTS {} ON {t} (\"ts\") WHERE \"level_no\" >= 40", idx("_errors_ts")),
            // Looking a record up by id (context, permalinks): ids are drawn in insert order,
            // so each block range holds a narrow id range and a BRIN of a few pages skips
            // the rest of the table, where no index meant a full scan (200 ms at 5M rows).
            format!("CREATE INDEX IF NOT EXISTS {} ON {t} USING brin (\"id\") WITH (autosummarize = on)", idx("_id_brin")),
        ]
        .join(";\n")
    }

    /// Opt-in indexes: a `jsonb_path_ops` GIN on `fields` (equality on extra fields) and a
    /// trigram GIN on `message` (`text` search; needs the pg_trgm extension).
    pub fn optional_index_sql(&self, fields_gin: bool, text_trgm: bool) -> String {
        let t = self.qualified();
        let idx = |suffix: &str| quote(&format!("{}{suffix}", self.table));
        let mut out = Vec::new();
        if fields_gin {
            out.push(format!(
                "CREATE INDEX IF NOT EXISTS {} ON {t} USING gin (\"fields\" jsonb_path_ops)",
                idx("_fields_gin")
            ));
        }
        if text_trgm {
            out.push("CREATE EXTENSION IF NOT EXISTS pg_trgm".to_owned());
            out.push(format!(
                "CREATE INDEX IF NOT EXISTS {} ON {t} USING gin (\"message\" gin_trgm_ops)",
                idx("_message_trgm")
            ));
        }
        out.join(";\n")
    }

    /// A day partition, made as a plain table and then attached: ATTACH takes only a SHARE
    /// UPDATE EXCLUSIVE lock on the parent, where CREATE TABLE ... PARTITION OF would take an
    /// ACCESS EXCLUSIVE one that stalls every writer and reader of the table meanwhile.
    /// `None` for a day outside [`partition_day`]'s range: no partition is made for it.
    pub fn create_day_sql(&self, kind: Kind, day: NaiveDate) -> Option<String> {
        partition_day(day)?;
        let next = day.succ_opt()?;
        let part = format!(
            "{}.{}",
            quote(&self.schema),
            quote(&self.day_partition_name(kind, day))
        );
        let parent = self.kind_partition(kind);
        Some(format!(
            "CREATE TABLE {part} (LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS);\n\
             ALTER TABLE {parent} ATTACH PARTITION {part} FOR VALUES FROM ('{}') TO ('{}')",
            midnight_utc(day),
            midnight_utc(next),
        ))
    }

    pub fn drop_day_sql(&self, kind: Kind, day: NaiveDate) -> String {
        format!(
            "DROP TABLE IF EXISTS {}.{}",
            quote(&self.schema),
            quote(&self.day_partition_name(kind, day))
        )
    }

    /// The day of a partition named by logsluice for `kind`, or None for anything else.
    pub fn parse_day_partition(&self, kind: Kind, name: &str) -> Option<NaiveDate> {
        let prefix = format!("{}_{}_", self.table, kind.as_str());
        let digits = name.strip_prefix(&prefix)?;
        if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        NaiveDate::parse_from_str(digits, "%Y%m%d").ok()
    }
}

/// The first and last day that get a day partition: years 1 to 9999, where partition names
/// keep their eight digits. A record dated outside them (it can only come from a clock or a
/// producer gone wrong) is refused as data rather than failing its batch.
pub fn partition_day(day: NaiveDate) -> Option<NaiveDate> {
    (1..=9999).contains(&day.year()).then_some(day)
}

/// Midnight UTC of `day` as PostgreSQL reads it: chrono's `%Y` writes year 10000 as
/// `+10000`, which PostgreSQL takes for a zone ("time zone displacement out of range").
fn midnight_utc(day: NaiveDate) -> String {
    format!(
        "{:04}-{:02}-{:02} 00:00:00+00",
        day.year(),
        day.month(),
        day.day()
    )
}

/// The UTC day of a timestamp in microseconds since the Unix epoch.
pub fn day_of(ts_us: i64) -> Option<NaiveDate> {
    DateTime::from_timestamp_micros(ts_us).map(|d| d.date_naive())
}

pub fn today() -> NaiveDate {
    Utc::now().date_naive()
}

/// Whether a day partition holds only rows older than `retention` seconds: its end
/// (midnight after `day`) is at or before `now - retention`.
pub fn expired(day: NaiveDate, now: DateTime<Utc>, retention_secs: f64) -> bool {
    let end = (day + TimeDelta::days(1))
        .and_hms_opt(0, 0, 0)
        .map(|d| d.and_utc());
    end.is_some_and(|end| cutoff(now, retention_secs).is_some_and(|cut| end <= cut))
}

/// `now - retention`, or `None` when that is before the earliest time a timestamp holds
/// (a retention of a million years keeps everything; it must not panic the writer).
pub fn cutoff(now: DateTime<Utc>, retention_secs: f64) -> Option<DateTime<Utc>> {
    let ms = retention_secs * 1000.0;
    if !ms.is_finite() || ms >= i64::MAX as f64 {
        return None;
    }
    now.checked_sub_signed(TimeDelta::try_milliseconds(ms as i64)?)
}

/// Compares the table's columns (name -> `format_type`) with what logsluice writes.
/// Returns (missing columns, wrong types as "name is X, logsluice writes Y").
pub fn diff_columns<'a>(existing: &[(String, String)]) -> (Vec<&'a str>, Vec<String>) {
    let mut missing = Vec::new();
    let mut wrong = Vec::new();
    let find = |n: &str| {
        existing
            .iter()
            .find(|(c, _)| c == n)
            .map(|(_, t)| t.as_str())
    };
    match find("id") {
        None => missing.push("id"),
        Some("bigint") => {}
        Some(_) => {} // any id the owner chose is fine: logsluice never writes it
    }
    for (name, ty) in COLUMNS {
        match find(name) {
            None => missing.push(*name),
            Some(t) if t == *ty || (*ty == "timestamptz" && t == "timestamp with time zone") => {}
            Some(t) => wrong.push(format!("{name} is {t}, logsluice writes {ty}")),
        }
    }
    (missing, wrong)
}

pub fn column_type(name: &str) -> &'static str {
    if name == "id" {
        return "bigint";
    }
    COLUMNS
        .iter()
        .find(|(c, _)| *c == name)
        .map(|(_, t)| *t)
        .unwrap_or("?")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_validated() {
        assert!(Names::new("public", "logs").is_ok());
        assert!(Names::new("public", "Logs_2").is_ok());
        for bad in [
            "",
            "1logs",
            "lo\"gs",
            "logs;drop table x",
            "logs-x",
            "lögs",
            "a b",
        ] {
            assert!(Names::new("public", bad).is_err(), "{bad:?}");
        }
        assert!(Names::new("public", &"x".repeat(49)).is_err());
        assert!(Names::new("pub\"lic", "logs").is_err());
    }

    #[test]
    fn notify_channels_are_identifiers_and_distinct() {
        let short = Names::new("public", "logs").unwrap().notify_channel();
        assert_eq!(short, "logsluice_public_logs");
        let long_schema = "s".repeat(63);
        let a = Names::new(&long_schema, &"a".repeat(48))
            .unwrap()
            .notify_channel();
        let b = Names::new(&long_schema, &format!("{}b", "a".repeat(47)))
            .unwrap()
            .notify_channel();
        assert_ne!(a, b);
        for c in [&short, &a, &b] {
            validate_identifier("channel", c, 63).unwrap();
        }
    }

    #[test]
    fn ddl_quotes_everything() {
        let n = Names::new("app", "logs").unwrap();
        assert_eq!(n.qualified(), "\"app\".\"logs\"");
        let sql = n.create_sql(Layout::Daily);
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS \"app\".\"logs\" ("));
        assert!(sql.contains("PARTITION BY LIST (\"kind\")"));
        assert!(sql.contains(
            "\"app\".\"logs_http\" PARTITION OF \"app\".\"logs\" FOR VALUES IN ('http')"
        ));
        let day = NaiveDate::from_ymd_opt(2026, 12, 31).unwrap();
        assert_eq!(
            n.create_day_sql(Kind::App, day).unwrap(),
            "CREATE TABLE \"app\".\"logs_app_20261231\" (LIKE \"app\".\"logs_app\" INCLUDING DEFAULTS \
             INCLUDING CONSTRAINTS);\nALTER TABLE \"app\".\"logs_app\" ATTACH PARTITION \"app\".\"logs_app_20261231\" \
             FOR VALUES FROM ('2026-12-31 00:00:00+00') TO ('2027-01-01 00:00:00+00')"
        );
        // The last day's upper bound is year 10000, written as PostgreSQL reads it.
        let last = NaiveDate::from_ymd_opt(9999, 12, 31).unwrap();
        let sql = n.create_day_sql(Kind::App, last).unwrap();
        assert!(sql.contains("\"logs_app_99991231\""), "{sql}");
        assert!(
            sql.ends_with("FROM ('9999-12-31 00:00:00+00') TO ('10000-01-01 00:00:00+00')"),
            "{sql}"
        );
        let first = NaiveDate::from_ymd_opt(1, 1, 1).unwrap();
        assert!(n
            .create_day_sql(Kind::Http, first)
            .unwrap()
            .ends_with("FROM ('0001-01-01 00:00:00+00') TO ('0001-01-02 00:00:00+00')"));
        // Days outside years 1 to 9999 get no partition (nor a name that is not 8 digits).
        for outside in [
            NaiveDate::from_ymd_opt(10000, 1, 1).unwrap(),
            NaiveDate::from_ymd_opt(0, 12, 31).unwrap(),
            NaiveDate::from_ymd_opt(-29719, 4, 5).unwrap(),
            NaiveDate::MAX,
        ] {
            assert_eq!(n.create_day_sql(Kind::App, outside), None, "{outside}");
        }
        assert_eq!(
            n.parse_day_partition(Kind::App, "logs_app_20261231"),
            Some(day)
        );
        assert_eq!(n.parse_day_partition(Kind::Http, "logs_app_20261231"), None);
        assert_eq!(n.parse_day_partition(Kind::App, "logs_app_2026123x"), None);
        assert!(n
            .copy_statement(COLUMNS.len())
            .starts_with("COPY \"app\".\"logs\" (\"ts\", \"level\""));
        assert!(!n.create_sql(Layout::Plain).contains("PARTITION"));
    }

    #[test]
    fn expiry_is_by_partition_end() {
        let now = DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z")
            .unwrap()
            .to_utc();
        let d = |s| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
        let day = 86400.0;
        assert!(!expired(d("2026-11-23"), now, day));
        assert!(!expired(d("2026-11-22"), now, day)); // ends 11-23 00:00 > 11-22 10:00
        assert!(expired(d("2026-11-21"), now, day));
        assert!(!expired(d("2026-11-16"), now, 7.0 * day));
        assert!(expired(d("2026-11-15"), now, 7.0 * day));
    }

    #[test]
    fn column_diff_names_missing_and_wrong() {
        let existing: Vec<(String, String)> = vec![
            ("id".into(), "bigint".into()),
            ("ts".into(), "timestamp with time zone".into()),
            ("level_no".into(), "integer".into()),
        ];
        let (missing, wrong) = diff_columns(&existing);
        assert!(missing.contains(&"message") && !missing.contains(&"ts"));
        assert_eq!(
            wrong,
            vec!["level_no is integer, logsluice writes smallint"]
        );
    }
}
