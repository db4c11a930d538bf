//! Service errors to `WriteError`: which are worth retrying, what the server asked us to
//! wait, and a message that never carries a key, a SAS token or a signature.

use std::time::Duration;

use azure_core::error::ErrorKind;
use azure_core::http::headers::HeaderName;
use azure_core::http::StatusCode;

use super::conn::Endpoint;
use super::Failure;
use crate::config::AzureBlobConfig;
use crate::destinations::WriteError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Upload,
    CreateContainer,
}

/// Removes secrets from text that may quote them (a transport error quotes the URL, with
/// its SAS query).
pub(crate) struct Redactor {
    secrets: Vec<String>,
}

impl Redactor {
    pub(crate) fn new(cfg: &AzureBlobConfig, endpoint: &Endpoint) -> Self {
        let mut secrets = Vec::new();
        if let Some(cs) = &cfg.connection_string {
            // Only the secret values: endpoints and account names are useful in messages.
            for part in cs.split(';') {
                if let Some((k, v)) = part.split_once('=') {
                    let k = k.trim().to_ascii_lowercase();
                    if k == "accountkey" || k == "sharedaccesssignature" {
                        secrets.push(v.trim().to_owned());
                    }
                }
            }
        }
        if let Some(c) = &cfg.credential {
            if super::conn::Entra::parse(c.trim()).is_none() {
                secrets.push(c.trim().to_owned());
            }
        }
        if let Some(q) = endpoint.container_url.query() {
            secrets.push(q.to_owned());
        }
        // Long ones first, so a secret containing another is removed whole.
        secrets.retain(|s| s.len() >= 8);
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Redactor { secrets }
    }

    pub(crate) fn clean(&self, text: &str) -> String {
        let mut out = strip_url_queries(text);
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "<redacted>");
            }
        }
        out = redact_param(&out, "sig=");
        out
    }
}

/// Cuts the query off every URL in the text: queries are where SAS tokens live.
fn strip_url_queries(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("http") {
        out.push_str(&rest[..start]);
        let url = &rest[start..];
        let end = url
            .find(|c: char| c.is_whitespace() || matches!(c, ')' | '"' | '\'' | '>' | ','))
            .unwrap_or(url.len());
        let token = &url[..end];
        match token.find('?') {
            Some(q) => out.push_str(&token[..q]),
            None => out.push_str(token),
        }
        rest = &url[end..];
    }
    out.push_str(rest);
    out
}

fn redact_param(text: &str, key: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(key) {
        out.push_str(&rest[..i + key.len()]);
        out.push_str("<redacted>");
        let after = &rest[i + key.len()..];
        let end = after
            .find(|c: char| c == '&' || c.is_whitespace() || matches!(c, ')' | '"' | '\''))
            .unwrap_or(after.len());
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// The error and its sources, joined, without repeats.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !s.is_empty() && !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    let text = parts.join(": ");
    if text.chars().count() > 400 {
        text.chars().take(400).collect::<String>() + "…"
    } else {
        text
    }
}

pub(crate) fn status_and_code(e: &azure_core::Error) -> Option<(u16, Option<&str>)> {
    match e.kind() {
        ErrorKind::HttpResponse {
            status, error_code, ..
        } => Some((u16::from(*status), error_code.as_deref())),
        _ => None,
    }
}

pub(crate) fn container_missing(e: &azure_core::Error) -> bool {
    e.http_status() == Some(StatusCode::NotFound)
        && status_and_code(e).and_then(|(_, c)| c) == Some("ContainerNotFound")
}

pub(crate) fn container_exists(e: &azure_core::Error) -> bool {
    e.http_status() == Some(StatusCode::Conflict)
        && status_and_code(e).and_then(|(_, c)| c) == Some("ContainerAlreadyExists")
}

/// `x-ms-retry-after-ms`, `retry-after-ms` or `Retry-After` (seconds) of a response.
fn retry_after(e: &azure_core::Error) -> Option<Duration> {
    let ErrorKind::HttpResponse {
        raw_response: Some(raw),
        ..
    } = e.kind()
    else {
        return None;
    };
    let h = raw.headers();
    for name in ["x-ms-retry-after-ms", "retry-after-ms"] {
        if let Some(ms) = h
            .get_optional_str(&HeaderName::from_static(name))
            .and_then(|v| v.trim().parse::<f64>().ok())
        {
            return Some(Duration::from_secs_f64((ms / 1000.0).clamp(0.0, 3600.0)));
        }
    }
    h.get_optional_str(&HeaderName::from_static("retry-after"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|s| Duration::from_secs_f64(s.clamp(0.0, 3600.0)))
}

/// Whether an HTTP status is worth retrying.
pub(crate) fn transient_status(status: u16, code: Option<&str>) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
        || (status >= 500 && status != 501 && status != 505)
        || (status == 409 && code == Some("ContainerBeingDeleted"))
}

pub(crate) fn to_write_error(f: Failure, endpoint: &str, redactor: &Redactor) -> WriteError {
    let what = match f.during {
        Step::Upload => "upload",
        Step::CreateContainer => "creating the container",
    };
    let e = &f.error;
    match e.kind() {
        ErrorKind::HttpResponse { .. } => {
            let (status, code) = status_and_code(e).unwrap_or((0, None));
            let code_text = code.map(|c| format!(" {c}")).unwrap_or_default();
            let hint = match (status, code) {
                (401 | 403, _) => {
                    "; check the account key, SAS token (permissions, expiry) or the identity's \
                     role (Storage Blob Data Contributor)"
                }
                (404, Some("ContainerNotFound")) => {
                    "; the container does not exist (create_container=False)"
                }
                _ => "",
            };
            let message = redactor.clean(&format!(
                "{what} to {endpoint} failed: HTTP {status}{code_text}{hint}"
            ));
            if transient_status(status, code) {
                WriteError {
                    retry_after: retry_after(e),
                    ..WriteError::transient(message)
                }
            } else {
                WriteError::permanent(message)
            }
        }
        ErrorKind::Connection | ErrorKind::Io | ErrorKind::Other => WriteError::transient(
            redactor.clean(&format!("{what} to {endpoint} failed: {}", chain(e))),
        ),
        ErrorKind::Credential => WriteError::permanent(redactor.clean(&format!(
            "{what} to {endpoint} failed: Entra ID credential: {}",
            chain(e)
        ))),
        ErrorKind::DataConversion => WriteError::permanent(
            redactor.clean(&format!("{what} to {endpoint} failed: {}", chain(e))),
        ),
        #[allow(unreachable_patterns)]
        _ => WriteError::transient(
            redactor.clean(&format!("{what} to {endpoint} failed: {}", chain(e))),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::ErrorKind as Kind;

    fn redactor() -> Redactor {
        let cfg = AzureBlobConfig {
            container_url: Some(
                "https://acct.blob.core.windows.net/logs?sv=2022&sp=cw&sig=TOPSECRETsig%3D".into(),
            ),
            ..Default::default()
        };
        let endpoint = super::super::conn::resolve(&cfg).unwrap();
        Redactor::new(&cfg, &endpoint)
    }

    #[test]
    fn messages_lose_queries_and_signatures() {
        let r = redactor();
        let msg = r.clean(
            "error sending request for url (https://acct.blob.core.windows.net/logs/x?comp=block&sig=TOPSECRETsig%3D): refused",
        );
        assert_eq!(
            msg,
            "error sending request for url (https://acct.blob.core.windows.net/logs/x): refused"
        );
        assert!(!r.clean("oops sig=TOPSECRETsig%3D&x").contains("TOPSECRET"));
        assert!(!r
            .clean("token sv=2022&sp=cw&sig=TOPSECRETsig%3D")
            .contains("TOPSECRET"));
    }

    #[test]
    fn statuses_are_classified() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(transient_status(s, None), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 413, 501] {
            assert!(!transient_status(s, None), "{s}");
        }
        assert!(transient_status(409, Some("ContainerBeingDeleted")));
    }

    fn http_error(status: u16, code: &str, headers: &[(&'static str, &'static str)]) -> Failure {
        let mut h = azure_core::http::headers::Headers::new();
        for (k, v) in headers {
            h.insert(*k, *v);
        }
        let raw = azure_core::http::RawResponse::from_bytes(StatusCode::from(status), h, "");
        Failure {
            during: Step::Upload,
            error: azure_core::Error::new(
                ErrorKind::HttpResponse {
                    status: StatusCode::from(status),
                    error_code: Some(code.into()),
                    raw_response: Some(Box::new(raw)),
                },
                std::io::Error::other("x"),
            ),
        }
    }

    #[test]
    fn throttling_honours_retry_after_and_auth_is_permanent() {
        let r = redactor();
        let url = "https://acct.blob.core.windows.net/logs";
        let w = to_write_error(
            http_error(503, "ServerBusy", &[("retry-after", "2")]),
            url,
            &r,
        );
        assert_eq!(
            (w.kind, w.retry_after),
            (Kind::Transient, Some(Duration::from_secs(2)))
        );
        assert!(w.message.contains("HTTP 503 ServerBusy"), "{}", w.message);
        let w = to_write_error(
            http_error(429, "TooManyRequests", &[("x-ms-retry-after-ms", "250")]),
            url,
            &r,
        );
        assert_eq!(w.retry_after, Some(Duration::from_millis(250)));
        let w = to_write_error(http_error(403, "AuthenticationFailed", &[]), url, &r);
        assert_eq!((w.kind, w.retry_after), (Kind::Permanent, None));
        assert!(w.message.contains("account key"), "{}", w.message);
        let w = to_write_error(http_error(404, "ContainerNotFound", &[]), url, &r);
        assert_eq!(w.kind, Kind::Permanent);
        assert!(w.message.contains("create_container=False"));
    }

    #[test]
    fn connection_errors_are_transient_and_clean() {
        let r = redactor();
        let e = azure_core::Error::with_message(
            ErrorKind::Connection,
            "tcp connect error for https://acct.blob.core.windows.net/logs?sig=TOPSECRETsig%3D",
        );
        let w = to_write_error(
            Failure {
                during: Step::Upload,
                error: e,
            },
            "https://acct.blob.core.windows.net/logs",
            &r,
        );
        assert_eq!(w.kind, Kind::Transient);
        assert!(!w.message.contains("TOPSECRET"), "{}", w.message);
    }
}
