//! Shared Key authorisation for the Blob service, as an azure_core pipeline policy:
//! `azure_storage_blob` 1.x signs only with Entra ID tokens, while connection strings and
//! Azurite use the account key. Reference: "Authorize with Shared Key" (Azure Storage REST).
//!
//! The policy runs per try, last before the transport, so it signs the final headers and a
//! fresh `x-ms-date` on every attempt.

use std::sync::Arc;

use async_trait::async_trait;
use azure_core::http::policies::{Policy, PolicyResult};
use azure_core::http::{Context, Request, Url};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

pub struct SharedKeyPolicy {
    account: String,
    key: Vec<u8>,
}

impl std::fmt::Debug for SharedKeyPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedKeyPolicy")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

impl SharedKeyPolicy {
    pub fn new(account: String, key: Vec<u8>) -> Self {
        SharedKeyPolicy { account, key }
    }

    pub fn sign(&self, string_to_sign: &str) -> String {
        // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key)
            .expect("HMAC takes any key length");
        mac.update(string_to_sign.as_bytes());
        azure_core::base64::encode(mac.finalize().into_bytes())
    }
}

/// RFC 1123 date, as `x-ms-date` wants it.
pub fn http_date(now: chrono::DateTime<chrono::Utc>) -> String {
    now.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

const SIGNED_STANDARD_HEADERS: [&str; 11] = [
    "content-encoding",
    "content-language",
    "content-length",
    "content-md5",
    "content-type",
    "date",
    "if-modified-since",
    "if-match",
    "if-none-match",
    "if-unmodified-since",
    "range",
];

/// The string to sign for service version 2009-09-19 and later.
/// `headers` are (lowercase name, value) pairs of the request as it will be sent.
pub fn string_to_sign<'a>(
    method: &str,
    url: &Url,
    headers: impl Iterator<Item = (&'a str, &'a str)>,
    account: &str,
) -> String {
    let mut standard: [&str; 11] = [""; 11];
    let mut ms: Vec<(String, &str)> = Vec::new();
    for (name, value) in headers {
        let lower = name.to_ascii_lowercase();
        if let Some(i) = SIGNED_STANDARD_HEADERS.iter().position(|h| *h == lower) {
            standard[i] = value;
        } else if lower.starts_with("x-ms-") {
            ms.push((lower, value));
        }
    }
    // Since 2015-02-21 a zero Content-Length is signed as the empty string.
    if standard[2] == "0" {
        standard[2] = "";
    }
    let mut out = String::with_capacity(256);
    out.push_str(method);
    out.push('\n');
    for v in standard {
        out.push_str(v);
        out.push('\n');
    }
    ms.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, value) in ms {
        out.push_str(&name);
        out.push(':');
        out.push_str(value.trim());
        out.push('\n');
    }
    out.push('/');
    out.push_str(account);
    out.push_str(url.path());
    let mut params: Vec<(String, Vec<String>)> = Vec::new();
    for (k, v) in url.query_pairs() {
        let k = k.to_ascii_lowercase();
        match params.iter_mut().find(|(name, _)| *name == k) {
            Some((_, values)) => values.push(v.into_owned()),
            None => params.push((k, vec![v.into_owned()])),
        }
    }
    params.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, mut values) in params {
        values.sort();
        out.push('\n');
        out.push_str(&name);
        out.push(':');
        out.push_str(&values.join(","));
    }
    out
}

#[async_trait]
impl Policy for SharedKeyPolicy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        request.insert_header("x-ms-date", http_date(chrono::Utc::now()));
        // Some operations (Put Block List) leave Content-Length to the transport, which
        // adds it after this policy: sign what will be sent.
        let has_length = request
            .headers()
            .iter()
            .any(|(k, _)| k.as_str().eq_ignore_ascii_case("content-length"));
        if !has_length {
            if let Some(len) = request.body().len().filter(|n| *n > 0) {
                request.insert_header("content-length", len.to_string());
            }
        }
        let to_sign = string_to_sign(
            request.method().as_str(),
            request.url(),
            request
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
            &self.account,
        );
        let auth = format!("SharedKey {}:{}", self.account, self.sign(&to_sign));
        request.insert_header("authorization", auth);
        next[0].send(ctx, request, &next[1..]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_a_known_vector() {
        // The vector azure_core's own hmac tests use.
        let key = azure_core::base64::decode(
            "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF",
        )
        .unwrap();
        let p = SharedKeyPolicy::new("acct".into(), key);
        assert_eq!(
            p.sign("create hmac signature for data"),
            "D/y9XyIEdUzEbdV570h8dou/mfkbMA1lKCOPqPDPAd0="
        );
        assert!(!format!("{p:?}").contains("FFFF"));
    }

    #[test]
    fn canonical_string_for_a_put_blob() {
        let url = Url::parse(
            "http://127.0.0.1:10000/devstoreaccount1/logs/app/2026/x.ndjson.gz?timeout=30&comp=block&blockid=QUJD%3D",
        )
        .unwrap();
        let headers = [
            ("content-length", "123"),
            ("content-type", "application/octet-stream"),
            ("x-ms-version", "2026-04-06"),
            ("x-ms-date", "Mon, 23 Nov 2026 17:00:00 GMT"),
            ("x-ms-meta-record_count", " 10 "),
            ("x-ms-blob-type", "BlockBlob"),
            ("user-agent", "ignored"),
            ("X-MS-Client-Request-Id", "abc"),
        ];
        let s = string_to_sign("PUT", &url, headers.into_iter(), "devstoreaccount1");
        let expected = "PUT\n\n\n123\n\napplication/octet-stream\n\n\n\n\n\n\n\
            x-ms-blob-type:BlockBlob\n\
            x-ms-client-request-id:abc\n\
            x-ms-date:Mon, 23 Nov 2026 17:00:00 GMT\n\
            x-ms-meta-record_count:10\n\
            x-ms-version:2026-04-06\n\
            /devstoreaccount1/devstoreaccount1/logs/app/2026/x.ndjson.gz\n\
            blockid:QUJD=\ncomp:block\ntimeout:30";
        assert_eq!(s, expected);
    }

    #[test]
    fn zero_length_is_signed_empty() {
        let url = Url::parse("https://acct.blob.core.windows.net/logs?restype=container").unwrap();
        let s = string_to_sign("PUT", &url, [("content-length", "0")].into_iter(), "acct");
        assert_eq!(
            s,
            "PUT\n\n\n\n\n\n\n\n\n\n\n\n/acct/logs\nrestype:container"
        );
    }

    #[test]
    fn date_is_rfc1123() {
        let t = chrono::DateTime::from_timestamp(1_795_453_200, 0).unwrap();
        assert_eq!(http_date(t), "Mon, 23 Nov 2026 17:00:00 GMT");
    }
}
