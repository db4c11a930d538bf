//! Summaries: records grouped by route (with method), status, level, kind or logger,
//! optionally per time bucket, with counts per status class, error rate, duration
//! percentiles and the slowest requests. PostgreSQL computes exact percentiles; the file
//! and blob scanners keep a bounded sample per group (exact below `SAMPLE_CAP`,
//! marked approximate above it).

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::filter::BadInput;

pub const SAMPLE_CAP: usize = 50_000;
pub const MAX_GROUPS: usize = 500;

#[derive(Clone, Debug)]
pub struct Spec {
    pub by: String,
    /// The grouping columns (validated names from a fixed list).
    pub keys: Vec<&'static str>,
    /// Bucket width in seconds.
    pub bucket: Option<i64>,
    pub slowest: usize,
}

impl Spec {
    pub fn new(by: &str, bucket: Option<i64>, slowest: usize) -> Result<Spec, BadInput> {
        let keys: Vec<&'static str> = match by {
            "route" => vec!["route", "method"],
            "status" => vec!["status"],
            "level" => vec!["level"],
            "kind" => vec!["kind"],
            "logger" => vec!["logger"],
            "method" => vec!["method"],
            _ => {
                return Err(BadInput(format!(
                    "by={by:?} is not a grouping; use route, status, level, kind, logger or method"
                )))
            }
        };
        Ok(Spec {
            by: by.to_owned(),
            keys,
            bucket,
            slowest,
        })
    }

    pub fn http_only(&self) -> bool {
        matches!(self.by.as_str(), "route" | "status" | "method")
    }
}

/// One group's figures, accumulated record by record (files and blobs).
#[derive(Default)]
pub struct Acc {
    pub count: u64,
    pub classes: [u64; 6],
    pub errors: u64,
    pub durations: Vec<f64>,
    pub seen_durations: u64,
    pub sum_ms: f64,
    pub max_ms: Option<f64>,
    pub slowest: Vec<(f64, Value)>,
    pub approximate: bool,
}

impl Acc {
    pub fn add(&mut self, r: &Map<String, Value>, top: usize) {
        self.count += 1;
        if let Some(st) = r.get("status").and_then(Value::as_u64) {
            let class = (st / 100) as usize;
            if (1..=5).contains(&class) {
                self.classes[class] += 1;
            }
            if st >= 500 {
                self.errors += 1;
            }
        } else if r.get("level_no").and_then(Value::as_u64).unwrap_or(0) >= 40 {
            self.errors += 1;
        }
        if let Some(d) = r.get("duration_ms").and_then(Value::as_f64) {
            self.seen_durations += 1;
            self.sum_ms += d;
            self.max_ms = Some(self.max_ms.map_or(d, |m| m.max(d)));
            if self.durations.len() < SAMPLE_CAP {
                self.durations.push(d);
            } else {
                // Reservoir sampling keeps a uniform sample in bounded memory.
                self.approximate = true;
                let j = fastrand::u64(..self.seen_durations) as usize;
                if j < SAMPLE_CAP {
                    self.durations[j] = d;
                }
            }
            if top > 0
                && (self.slowest.len() < top || self.slowest.last().is_some_and(|(m, _)| d > *m))
            {
                self.slowest.push((d, slow_entry(r)));
                self.slowest.sort_by(|a, b| b.0.total_cmp(&a.0));
                self.slowest.truncate(top);
            }
        }
    }

    pub fn finish(mut self, key: Map<String, Value>, bucket: Option<i64>) -> Value {
        self.durations.sort_by(f64::total_cmp);
        let pct = |p: f64| -> Value {
            let n = self.durations.len();
            if n == 0 {
                return Value::Null;
            }
            // Linear interpolation between closest ranks, as percentile_cont does.
            let rank = p * (n - 1) as f64;
            let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
            let v =
                self.durations[lo] + (self.durations[hi] - self.durations[lo]) * (rank - lo as f64);
            json!(v)
        };
        let avg = if self.seen_durations > 0 {
            json!(self.sum_ms / self.seen_durations as f64)
        } else {
            Value::Null
        };
        group_value(
            key,
            bucket,
            self.count,
            self.classes,
            self.errors,
            [pct(0.5), pct(0.95), pct(0.99)],
            avg,
            self.max_ms.map_or(Value::Null, |m| json!(m)),
            self.slowest.into_iter().map(|(_, v)| v).collect(),
        )
    }
}

pub fn slow_entry(r: &Map<String, Value>) -> Value {
    let g = |k: &str| r.get(k).cloned().unwrap_or(Value::Null);
    json!({
        "id": g("id"), "ts": g("ts"), "duration_ms": g("duration_ms"), "status": g("status"),
        "method": g("method"), "path": g("path"), "request_id": g("request_id"),
    })
}

#[allow(clippy::too_many_arguments)]
pub fn group_value(
    key: Map<String, Value>,
    bucket: Option<i64>,
    count: u64,
    classes: [u64; 6],
    errors: u64,
    pcts: [Value; 3],
    avg: Value,
    max: Value,
    slowest: Vec<Value>,
) -> Value {
    let [p50, p95, p99] = pcts;
    let bucket = bucket.map_or(Value::Null, |b| {
        Value::String(crate::encode::ts_string(b * 1_000_000))
    });
    json!({
        "key": key,
        "bucket": bucket,
        "count": count,
        "status": {"1xx": classes[1], "2xx": classes[2], "3xx": classes[3], "4xx": classes[4], "5xx": classes[5]},
        "errors": errors,
        "error_rate": if count > 0 { errors as f64 / count as f64 } else { 0.0 },
        "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "avg_ms": avg, "max_ms": max,
        "slowest": slowest,
    })
}

/// A group's key, its bucket start (seconds) and its figures.
pub type Group = (Map<String, Value>, Option<i64>, Acc);

/// Groups records one by one (files and blobs).
#[derive(Default)]
pub struct Grouper {
    pub groups: HashMap<String, Group>,
    pub overflow: bool,
}

impl Grouper {
    pub fn add(&mut self, spec: &Spec, ts_us: i64, r: &Map<String, Value>) {
        let mut key = Map::new();
        for k in &spec.keys {
            key.insert((*k).to_owned(), r.get(*k).cloned().unwrap_or(Value::Null));
        }
        let bucket = spec
            .bucket
            .map(|b| ts_us.div_euclid(1_000_000).div_euclid(b) * b);
        let id = format!("{}|{bucket:?}", Value::Object(key.clone()));
        if !self.groups.contains_key(&id) && self.groups.len() >= MAX_GROUPS * 4 {
            self.overflow = true;
            return;
        }
        self.groups
            .entry(id)
            .or_insert_with(|| (key, bucket, Acc::default()))
            .2
            .add(r, spec.slowest);
    }

    pub fn finish(self, partial: bool) -> Value {
        let mut approximate = self.overflow;
        let mut rows: Vec<(u64, Option<i64>, Value)> = self
            .groups
            .into_values()
            .map(|(key, bucket, acc)| {
                approximate |= acc.approximate;
                (acc.count, bucket, acc.finish(key, bucket))
            })
            .collect();
        rows.sort_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)));
        rows.truncate(MAX_GROUPS);
        json!({
            "groups": rows.into_iter().map(|r| r.2).collect::<Vec<_>>(),
            "approximate": approximate,
            "partial": partial,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate() {
        let mut acc = Acc::default();
        for d in 1..=100 {
            let r = json!({"status": if d > 90 { 500 } else { 200 }, "duration_ms": d as f64});
            acc.add(r.as_object().unwrap(), 3);
        }
        let v = acc.finish(Map::new(), None);
        assert_eq!(v["count"], 100);
        assert_eq!(v["errors"], 10);
        assert_eq!(v["status"]["5xx"], 10);
        assert!((v["p50_ms"].as_f64().unwrap() - 50.5).abs() < 1e-9);
        assert_eq!(v["slowest"].as_array().unwrap().len(), 3);
        assert_eq!(v["slowest"][0]["duration_ms"], 100.0);
        assert!(Spec::new("route; drop", None, 5).is_err());
    }
}
