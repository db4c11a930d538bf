//! Negative filters (`exclude`): values that drop a record, for the viewer's "click a value
//! to hide it" and `--exclude NAME=VALUE` on the command line.
//!
//! `exclude` is a mapping of a filter name to one value or a list of values, e.g.
//! `{"route": ["/health", "/metrics"], "status": "4xx", "level": "DEBUG"}`. A record is left
//! out when it matches any of them. Each value means what the same include filter means
//! (`status`: code, class or range; `path`: prefix; `text`: case-insensitive substring of
//! the message; the rest: equality), and is validated by the same rules. A record without
//! the field (an app record has no route or status) is never dropped by it: in SQL the
//! comparisons are NULL-safe.

use serde_json::{Map, Value};

use super::filter::{BadInput, Filter};

/// The names `exclude` takes.
pub const NAMES: &[&str] = &[
    "level",
    "kind",
    "logger",
    "method",
    "route",
    "status",
    "request_id",
    "path",
    "text",
];

/// At most this many values per name.
const MAX_VALUES: usize = 50;

/// Parsed exclusions, each list sorted and without duplicates (the cursor fingerprint
/// does not depend on the order they were given in).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Exclude {
    pub levels: Vec<String>,
    pub kinds: Vec<String>,
    pub loggers: Vec<String>,
    pub methods: Vec<String>,
    pub routes: Vec<String>,
    pub request_ids: Vec<String>,
    /// Inclusive ranges.
    pub statuses: Vec<(u16, u16)>,
    /// Prefixes.
    pub paths: Vec<String>,
    /// Lower-cased substrings of the message.
    pub texts: Vec<String>,
}

fn canonical<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v.dedup();
    v
}

impl Exclude {
    pub fn is_empty(&self) -> bool {
        self == &Exclude::default()
    }

    /// Parses the `exclude` mapping; each value goes through the include filter's own
    /// validation, so both sides accept and normalise the same input.
    pub fn parse(v: &Value) -> Result<Exclude, BadInput> {
        let Value::Object(m) = v else {
            return Err(BadInput(format!(
                "exclude must be a mapping of {} to a value or a list of values",
                NAMES.join(", ")
            )));
        };
        let mut ex = Exclude::default();
        for (name, values) in m {
            if !NAMES.contains(&name.as_str()) {
                return Err(BadInput(format!(
                    "exclude: unknown name {name:?}; known: {}",
                    NAMES.join(", ")
                )));
            }
            let list: Vec<&Value> = match values {
                Value::Array(a) => a.iter().collect(),
                Value::Null => vec![],
                one => vec![one],
            };
            if list.len() > MAX_VALUES {
                return Err(BadInput(format!(
                    "exclude[{name:?}]: at most {MAX_VALUES} values"
                )));
            }
            for value in list {
                if value.is_null() || value.is_array() || value.is_object() {
                    return Err(BadInput(format!(
                        "exclude[{name:?}]: {value} is not a single value"
                    )));
                }
                let mut one = Map::new();
                one.insert(name.clone(), value.clone());
                let f = Filter::parse(&one).map_err(|e| BadInput(format!("exclude: {}", e.0)))?;
                match name.as_str() {
                    "level" => ex.levels.extend(f.levels),
                    "kind" => ex.kinds.extend(f.kind),
                    "logger" => ex.loggers.extend(f.logger),
                    "method" => ex.methods.extend(f.method),
                    "route" => ex.routes.extend(f.route),
                    "request_id" => ex.request_ids.extend(f.request_id),
                    "status" => ex.statuses.extend(f.status),
                    "path" => ex.paths.extend(f.path),
                    _ => ex.texts.extend(f.text),
                }
            }
        }
        Ok(Exclude {
            levels: canonical(ex.levels),
            kinds: canonical(ex.kinds),
            loggers: canonical(ex.loggers),
            methods: canonical(ex.methods),
            routes: canonical(ex.routes),
            request_ids: canonical(ex.request_ids),
            statuses: canonical(ex.statuses),
            paths: canonical(ex.paths),
            texts: canonical(ex.texts),
        })
    }

    /// The string columns compared for equality, with their excluded values.
    pub fn equalities(&self) -> [(&'static str, &[String]); 6] {
        [
            ("level", &self.levels),
            ("kind", &self.kinds),
            ("logger", &self.loggers),
            ("method", &self.methods),
            ("route", &self.routes),
            ("request_id", &self.request_ids),
        ]
    }

    /// Whether a decoded record (NDJSON field names) is dropped.
    pub fn drops(&self, r: &Map<String, Value>) -> bool {
        let s = |k: &str| r.get(k).and_then(Value::as_str);
        for (key, values) in self.equalities() {
            if let Some(v) = s(key) {
                if values.iter().any(|x| x == v) {
                    return true;
                }
            }
        }
        if let Some(st) = r.get("status").and_then(Value::as_u64) {
            if self
                .statuses
                .iter()
                .any(|(lo, hi)| st >= u64::from(*lo) && st <= u64::from(*hi))
            {
                return true;
            }
        }
        if let Some(p) = s("path") {
            if self.paths.iter().any(|x| p.starts_with(x.as_str())) {
                return true;
            }
        }
        if !self.texts.is_empty() {
            if let Some(m) = s("message") {
                let m = m.to_lowercase();
                if self.texts.iter().any(|t| m.contains(t.as_str())) {
                    return true;
                }
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn parse_normalises_validates_and_orders() {
        let a =
            Exclude::parse(&json!({"level": ["warn", "DEBUG"], "status": "4xx", "method": "get"}))
                .unwrap();
        assert_eq!(a.levels, ["DEBUG", "WARNING"]);
        assert_eq!(a.statuses, [(400, 499)]);
        assert_eq!(a.methods, ["GET"]);
        let b = Exclude::parse(
            &json!({"method": "GET", "status": ["4xx"], "level": ["DEBUG", "WARNING", "debug"]}),
        )
        .unwrap();
        assert_eq!(a, b);
        for bad in [
            json!({"level": "LOUD"}),
            json!({"status": "6xx"}),
            json!({"colour": "red"}),
            json!({"route": [["nested"]]}),
            json!({"kind": "job"}),
            json!("route=/x"),
        ] {
            assert!(Exclude::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn drops_only_records_that_have_the_value() {
        let ex = Exclude::parse(&json!({"route": "/health", "status": "5xx", "path": "/static/", "text": "PING", "level": "DEBUG"}))
            .unwrap();
        assert!(ex.drops(&rec(json!({"route": "/health", "status": 200}))));
        assert!(ex.drops(&rec(json!({"route": "/items", "status": 503}))));
        assert!(ex.drops(&rec(json!({"path": "/static/app.js"}))));
        assert!(ex.drops(&rec(json!({"message": "a ping from x"}))));
        assert!(ex.drops(&rec(json!({"level": "DEBUG"}))));
        assert!(!ex.drops(&rec(json!({"route": "/items", "status": 200, "path": "/items/1", "message": "ok", "level": "INFO"}))));
        // Records without the field are kept.
        assert!(!ex.drops(&rec(json!({"kind": "app", "message": "hello"}))));
    }
}
