//! Keyset positions and the opaque, signed cursor that carries them between pages.
//!
//! A cursor is `base64url(json) "." base64url(hmac-sha256(json)[..16])`. The JSON holds the
//! filters' fingerprint, the "as of" bound taken at page 1 and the last position returned.
//! The key is `LOGSLUICE_CURSOR_SECRET` when set, else derived from the source (its DSN,
//! password included, or its directory): every process reading the same source accepts
//! the same cursors, and nothing a client sends is ever formatted into SQL anyway.

use std::cmp::Ordering;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::filter::BadInput;

/// A record's place in the total order (time, then id).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pos {
    pub ts: i64,
    pub id: String,
}

/// Splits an id into (text, number): PostgreSQL ids are numbers, file ids end in
/// `:offset`; both compare numerically on the number.
pub fn id_key(id: &str) -> (&str, u64) {
    if let Ok(n) = id.parse::<u64>() {
        return ("", n);
    }
    match id.rsplit_once(':') {
        Some((a, b)) => match b.parse::<u64>() {
            Ok(n) => (a, n),
            Err(_) => (id, 0),
        },
        None => (id, 0),
    }
}

pub fn cmp_pos(a_ts: i64, a_id: &str, b: &Pos) -> Ordering {
    a_ts.cmp(&b.ts)
        .then_with(|| id_key(a_id).cmp(&id_key(&b.id)))
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    pub v: u8,
    /// Fingerprint of the filters.
    pub fp: String,
    pub desc: bool,
    /// Nothing newer than this (microseconds) belongs to the listing that began at page 1.
    pub asof_ts: i64,
    /// PostgreSQL: the id sequence's value at page 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asof_id: Option<i64>,
    /// The last position returned; the next page starts strictly after it.
    pub after: Pos,
}

#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl Signer {
    pub fn new(source_identity: &str) -> Self {
        let secret = std::env::var("LOGSLUICE_CURSOR_SECRET").unwrap_or_default();
        let mut h = Sha256::new();
        h.update(b"logsluice cursor v1\0");
        if secret.is_empty() {
            h.update(source_identity.as_bytes());
        } else {
            h.update(secret.as_bytes());
        }
        Signer {
            key: h.finalize().to_vec(),
        }
    }

    fn mac(&self, data: &[u8]) -> Vec<u8> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key).expect("any key length");
        mac.update(data);
        mac.finalize().into_bytes()[..16].to_vec()
    }

    pub fn encode(&self, c: &Cursor) -> String {
        let json = serde_json::to_vec(c).unwrap_or_default();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&json),
            URL_SAFE_NO_PAD.encode(self.mac(&json))
        )
    }

    /// Decodes and checks a cursor against the filters it is used with.
    pub fn decode(&self, text: &str, fingerprint: &str) -> Result<Cursor, BadInput> {
        let invalid =
            || BadInput("invalid cursor: it was altered or does not come from this source".into());
        let (body, sig) = text.trim().split_once('.').ok_or_else(invalid)?;
        let json = URL_SAFE_NO_PAD.decode(body).map_err(|_| invalid())?;
        let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|_| invalid())?;
        let want = self.mac(&json);
        // Constant-time enough for 16 bytes: compare every byte.
        if sig.len() != want.len()
            || sig.iter().zip(&want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) != 0
        {
            return Err(invalid());
        }
        let c: Cursor = serde_json::from_slice(&json).map_err(|_| invalid())?;
        if c.v != 1 {
            return Err(invalid());
        }
        if c.fp != fingerprint {
            return Err(BadInput(
                "invalid cursor: it belongs to a query with other filters".into(),
            ));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper() {
        let s = Signer::new("postgresql://a:b@h/db");
        let c = Cursor {
            v: 1,
            fp: "abc".into(),
            desc: true,
            asof_ts: 5,
            asof_id: Some(9),
            after: Pos {
                ts: 3,
                id: "7".into(),
            },
        };
        let text = s.encode(&c);
        assert_eq!(s.decode(&text, "abc").unwrap(), c);
        assert!(s.decode(&text, "other").is_err());
        let mut bytes = text.clone().into_bytes();
        bytes[3] = if bytes[3] == b'A' { b'B' } else { b'A' };
        assert!(s.decode(&String::from_utf8(bytes).unwrap(), "abc").is_err());
        assert!(s.decode("garbage", "abc").is_err());
        assert!(Signer::new("other source").decode(&text, "abc").is_err());
    }

    #[test]
    fn ids_compare_numerically() {
        assert!(id_key("f.ndjson:100") > id_key("f.ndjson:20"));
        assert!(id_key("100") > id_key("20"));
        let p = Pos {
            ts: 5,
            id: "10".into(),
        };
        assert_eq!(cmp_pos(5, "9", &p), Ordering::Less);
        assert_eq!(cmp_pos(6, "1", &p), Ordering::Greater);
    }
}
