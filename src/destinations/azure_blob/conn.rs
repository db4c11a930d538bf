//! Where the blobs go and how requests are authorised: a connection string, an account URL
//! with a credential, or a container URL (usually carrying a SAS token). Every error here
//! describes the problem without repeating the input: the input holds secrets.

use azure_core::http::Url;

use crate::config::AzureBlobConfig;

/// Azurite's well-known development account and key: public and documented, not secrets.
pub const DEV_ACCOUNT: &str = "devstoreaccount1";
pub const DEV_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const DEV_ENDPOINT: &str = "http://127.0.0.1:10000";

/// Entra ID credential kinds (`credential="default"` tries them in the usual order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entra {
    Default,
    Environment,
    WorkloadIdentity,
    ManagedIdentity,
    AzureCli,
}

impl Entra {
    pub fn parse(name: &str) -> Option<Entra> {
        Some(match name {
            "default" => Entra::Default,
            "environment" => Entra::Environment,
            "workload_identity" => Entra::WorkloadIdentity,
            "managed_identity" => Entra::ManagedIdentity,
            "azure_cli" => Entra::AzureCli,
            _ => return None,
        })
    }
}

#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// Account key: requests are signed by [`super::shared_key::SharedKeyPolicy`].
    SharedKey {
        account: String,
        key: Vec<u8>,
    },
    /// A SAS token, already in the container URL's query.
    Sas,
    Entra(Entra),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::SharedKey { account, .. } => write!(f, "SharedKey({account})"),
            Auth::Sas => f.write_str("Sas"),
            Auth::Entra(e) => write!(f, "Entra({e:?})"),
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The container's URL, with the SAS token in its query under [`Auth::Sas`].
    pub container_url: Url,
    pub auth: Auth,
}

/// A container URL's last non-empty path segment: the container's name.
fn container_name_of(url: &Url) -> &str {
    url.path_segments()
        .and_then(|mut s| s.rfind(|p| !p.is_empty()))
        .unwrap_or_default()
}

impl Endpoint {
    pub fn container_name(&self) -> &str {
        container_name_of(&self.container_url)
    }

    /// The container URL without its query: safe to show.
    pub fn display_url(&self) -> String {
        let mut u = self.container_url.clone();
        u.set_query(None);
        u.to_string()
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("container_url", &self.display_url())
            .field("auth", &self.auth)
            .finish()
    }
}

/// The parts of an Azure Storage connection string this destination understands.
#[derive(Default, PartialEq, Eq)]
pub struct ConnectionString {
    pub protocol: Option<String>,
    pub account_name: Option<String>,
    pub account_key: Option<String>,
    pub blob_endpoint: Option<String>,
    pub endpoint_suffix: Option<String>,
    pub sas: Option<String>,
    pub development: bool,
    pub development_proxy: Option<String>,
}

impl ConnectionString {
    /// `Key=Value;Key=Value`: keys case-insensitive, values may contain `=` (base64
    /// padding, SAS tokens). Keys for other services (QueueEndpoint...) are ignored.
    pub fn parse(s: &str) -> Result<ConnectionString, String> {
        let mut cs = ConnectionString::default();
        for (i, part) in s.split(';').enumerate() {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let Some((key, value)) = part.split_once('=') else {
                return Err(format!(
                    "connection string: part {} is not Key=Value",
                    i + 1
                ));
            };
            let value = value.trim().to_owned();
            match key.trim().to_ascii_lowercase().as_str() {
                "defaultendpointsprotocol" => cs.protocol = Some(value.to_ascii_lowercase()),
                "accountname" => cs.account_name = Some(value),
                "accountkey" => cs.account_key = Some(value),
                "blobendpoint" => cs.blob_endpoint = Some(value),
                "endpointsuffix" => cs.endpoint_suffix = Some(value),
                "sharedaccesssignature" => cs.sas = Some(value),
                "usedevelopmentstorage" => cs.development = value.eq_ignore_ascii_case("true"),
                "developmentstorageproxyuri" => cs.development_proxy = Some(value),
                _ => {}
            }
        }
        Ok(cs)
    }

    /// The blob service URL and how to authorise against it.
    pub fn resolve(&self) -> Result<(Url, Auth), String> {
        if self.development {
            let base = self
                .development_proxy
                .as_deref()
                .unwrap_or(DEV_ENDPOINT)
                .trim_end_matches('/');
            let url = parse_url(&format!("{base}/{DEV_ACCOUNT}"), "connection string")?;
            let key = decode_key(DEV_KEY)?;
            return Ok((
                url,
                Auth::SharedKey {
                    account: DEV_ACCOUNT.into(),
                    key,
                },
            ));
        }
        let service = match (&self.blob_endpoint, &self.account_name) {
            (Some(endpoint), _) => parse_url(endpoint, "connection string BlobEndpoint")?,
            (None, Some(account)) => {
                let protocol = self.protocol.as_deref().unwrap_or("https");
                if protocol != "https" && protocol != "http" {
                    return Err(
                        "connection string: DefaultEndpointsProtocol must be https or http".into(),
                    );
                }
                let suffix = self
                    .endpoint_suffix
                    .as_deref()
                    .unwrap_or("core.windows.net");
                parse_url(
                    &format!("{protocol}://{account}.blob.{suffix}"),
                    "connection string AccountName/EndpointSuffix",
                )?
            }
            (None, None) => {
                return Err(
                    "connection string: needs AccountName (or BlobEndpoint, or UseDevelopmentStorage=true)"
                        .into(),
                )
            }
        };
        let auth = match (&self.account_key, &self.sas) {
            (Some(key), _) => {
                let Some(account) = self.account_name.clone() else {
                    return Err("connection string: AccountKey needs AccountName".into());
                };
                Auth::SharedKey {
                    account,
                    key: decode_key(key)?,
                }
            }
            (None, Some(_)) => Auth::Sas,
            (None, None) => {
                return Err("connection string: needs AccountKey or SharedAccessSignature".into())
            }
        };
        Ok((service, auth))
    }
}

fn parse_url(s: &str, what: &str) -> Result<Url, String> {
    let url = Url::parse(s.trim()).map_err(|e| format!("{what}: not a URL ({e})"))?;
    if url.scheme() != "https" && url.scheme() != "http" {
        return Err(format!("{what}: must be an https:// (or http://) URL"));
    }
    if url.cannot_be_a_base() || url.host_str().is_none() {
        return Err(format!("{what}: must be an https:// (or http://) URL"));
    }
    Ok(url)
}

fn decode_key(key: &str) -> Result<Vec<u8>, String> {
    match azure_core::base64::decode(key.trim()) {
        Ok(k) if !k.is_empty() => Ok(k),
        _ => Err("the account key is not valid base64".into()),
    }
}

/// The account name for Shared Key signing: the first label of `acct.blob.core.windows.net`,
/// or the first path segment of an emulator's path-style URL (`http://127.0.0.1:10000/acct`).
fn account_from_url(url: &Url) -> Option<String> {
    let host = url.host_str()?;
    let is_ip = host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[');
    if !is_ip && host != "localhost" && host.contains(".blob.") {
        return host.split('.').next().map(str::to_owned);
    }
    url.path_segments()?
        .next()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// Whether a container name follows the service's rules: 3-63 characters, lowercase letters,
/// digits and single hyphens, starting and ending with a letter or digit.
pub fn valid_container(name: &str) -> bool {
    let b = name.as_bytes();
    (3..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !name.contains("--")
}

fn is_sas(s: &str) -> bool {
    s.trim_start_matches('?')
        .split('&')
        .any(|kv| kv.starts_with("sig="))
}

fn with_container(service: &Url, container: &str) -> Result<Url, String> {
    let mut url = service.clone();
    url.set_query(None);
    url.set_fragment(None);
    url.path_segments_mut()
        .map_err(|_| "the blob endpoint cannot hold a container path".to_string())?
        .pop_if_empty()
        .push(container);
    Ok(url)
}

fn credential_auth(credential: &str, url: &Url) -> Result<Auth, String> {
    if let Some(mode) = Entra::parse(credential) {
        return Ok(Auth::Entra(mode));
    }
    if is_sas(credential) {
        return Ok(Auth::Sas);
    }
    let key = decode_key(credential).map_err(|_| {
        "credential must be \"default\", \"managed_identity\", \"workload_identity\", \
         \"azure_cli\", \"environment\", a SAS token or an account key (base64)"
            .to_string()
    })?;
    let account = account_from_url(url).ok_or_else(|| {
        "an account key needs the account name in the URL (https://ACCOUNT.blob.core.windows.net)"
            .to_string()
    })?;
    Ok(Auth::SharedKey { account, key })
}

fn set_sas(url: &mut Url, sas: &str) {
    url.set_query(Some(sas.trim().trim_start_matches('?')));
}

/// Resolves the configuration to one container URL and one way to authorise.
pub fn resolve(cfg: &AzureBlobConfig) -> Result<Endpoint, String> {
    let given = [
        cfg.connection_string.is_some(),
        cfg.account_url.is_some(),
        cfg.container_url.is_some(),
    ];
    match given.iter().filter(|g| **g).count() {
        1 => {}
        0 => {
            return Err(
                "give one of connection_string, account_url (with credential) or container_url"
                    .into(),
            )
        }
        _ => return Err("give only one of connection_string, account_url or container_url".into()),
    }
    if let Some(cs) = &cfg.connection_string {
        if cfg.credential.is_some() {
            return Err(
                "credential is for account_url or container_url, not with a connection string"
                    .into(),
            );
        }
        let parsed = ConnectionString::parse(cs)?;
        let (service, auth) = parsed.resolve()?;
        check_container(&cfg.container)?;
        let mut container_url = with_container(&service, &cfg.container)?;
        if auth == Auth::Sas {
            set_sas(
                &mut container_url,
                parsed.sas.as_deref().unwrap_or_default(),
            );
        }
        return Ok(Endpoint {
            container_url,
            auth,
        });
    }
    if let Some(account_url) = &cfg.account_url {
        let service = parse_url(account_url, "account_url")?;
        check_container(&cfg.container)?;
        let mut container_url = with_container(&service, &cfg.container)?;
        let auth = match cfg.credential.as_deref() {
            Some(c) => credential_auth(c.trim(), &service)?,
            None if service.query().is_some_and(is_sas) => Auth::Sas,
            None => {
                return Err(
                    "account_url needs credential= (\"default\" for Entra ID, a SAS token or an account key)"
                        .into(),
                )
            }
        };
        if auth == Auth::Sas {
            let sas = match cfg.credential.as_deref() {
                Some(c) => c.to_owned(),
                None => service.query().unwrap_or_default().to_owned(),
            };
            set_sas(&mut container_url, &sas);
        }
        return Ok(Endpoint {
            container_url,
            auth,
        });
    }
    let raw = cfg.container_url.as_deref().unwrap_or_default();
    let mut container_url = parse_url(raw, "container_url")?;
    container_url.set_fragment(None);
    let container = container_name_of(&container_url).to_owned();
    check_container(&container)
        .map_err(|e| format!("container_url must end with the container name: {e}"))?;
    let auth = match cfg.credential.as_deref() {
        Some(c) => {
            let auth = credential_auth(c.trim(), &container_url)?;
            if auth == Auth::Sas {
                set_sas(&mut container_url, c);
            }
            auth
        }
        None if container_url.query().is_some_and(is_sas) => Auth::Sas,
        None => {
            return Err(
                "container_url needs a SAS token in its query (?sv=...&sig=...) or credential="
                    .into(),
            )
        }
    };
    Ok(Endpoint {
        container_url,
        auth,
    })
}

fn check_container(name: &str) -> Result<(), String> {
    if valid_container(name) {
        Ok(())
    } else {
        Err(format!(
            "container {name:?} is not a valid name (3-63 lowercase letters, digits and single hyphens)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AzureBlobConfig {
        AzureBlobConfig::default()
    }

    fn with_cs(cs: &str) -> Result<Endpoint, String> {
        resolve(&AzureBlobConfig {
            connection_string: Some(cs.into()),
            ..cfg()
        })
    }

    #[test]
    fn azurite_style_connection_string() {
        let e = with_cs(&format!(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={DEV_KEY};\
             BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;"
        ))
        .unwrap();
        assert_eq!(
            e.container_url.as_str(),
            "http://127.0.0.1:10000/devstoreaccount1/logs"
        );
        match e.auth {
            Auth::SharedKey { account, key } => {
                assert_eq!(account, "devstoreaccount1");
                assert_eq!(key.len(), 64);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn development_storage_shortcut() {
        let e = with_cs("UseDevelopmentStorage=true").unwrap();
        assert_eq!(
            e.container_url.as_str(),
            "http://127.0.0.1:10000/devstoreaccount1/logs"
        );
        assert!(matches!(e.auth, Auth::SharedKey { ref account, .. } if account == DEV_ACCOUNT));
        let e =
            with_cs("UseDevelopmentStorage=true;DevelopmentStorageProxyUri=http://127.0.0.1:9999/")
                .unwrap();
        assert_eq!(
            e.container_url.as_str(),
            "http://127.0.0.1:9999/devstoreaccount1/logs"
        );
    }

    #[test]
    fn account_name_and_suffix_build_the_endpoint() {
        let e = with_cs("AccountName=acct;AccountKey=a2V5;EndpointSuffix=core.chinacloudapi.cn")
            .unwrap();
        assert_eq!(
            e.container_url.as_str(),
            "https://acct.blob.core.chinacloudapi.cn/logs"
        );
        let e = with_cs("accountname=acct;accountkey=a2V5;defaultendpointsprotocol=http").unwrap();
        assert_eq!(
            e.container_url.as_str(),
            "http://acct.blob.core.windows.net/logs"
        );
    }

    #[test]
    fn sas_connection_string_puts_the_token_in_the_url() {
        let e = with_cs(
            "BlobEndpoint=https://acct.blob.core.windows.net/;SharedAccessSignature=sv=2022-11-02&sig=abc%3D",
        )
        .unwrap();
        assert_eq!(e.auth, Auth::Sas);
        assert_eq!(e.container_url.path(), "/logs");
        assert_eq!(e.container_url.query(), Some("sv=2022-11-02&sig=abc%3D"));
        assert_eq!(e.display_url(), "https://acct.blob.core.windows.net/logs");
    }

    #[test]
    fn bad_connection_strings_say_why_without_echoing() {
        let secret = "c2VjcmV0LXNlY3JldA==";
        let err = with_cs(&format!("AccountName=a;AccountKey={secret};junk")).unwrap_err();
        assert!(err.contains("part 3"), "{err}");
        assert!(!err.contains(secret));
        let err = with_cs("AccountName=a;AccountKey=not base64!!").unwrap_err();
        assert!(
            err.contains("base64") && !err.contains("not base64!!"),
            "{err}"
        );
        assert!(with_cs("AccountName=a").unwrap_err().contains("AccountKey"));
        assert!(with_cs("BlobEndpoint=ftp://x/").is_err());
        assert!(with_cs("").is_err());
    }

    #[test]
    fn account_url_with_credentials() {
        let base = |credential: &str| AzureBlobConfig {
            account_url: Some("https://acct.blob.core.windows.net".into()),
            credential: Some(credential.into()),
            container: "app-logs".into(),
            ..cfg()
        };
        let e = resolve(&base("default")).unwrap();
        assert_eq!(e.auth, Auth::Entra(Entra::Default));
        assert_eq!(
            e.container_url.as_str(),
            "https://acct.blob.core.windows.net/app-logs"
        );
        assert_eq!(
            resolve(&base("managed_identity")).unwrap().auth,
            Auth::Entra(Entra::ManagedIdentity)
        );
        let e = resolve(&base("a2V5")).unwrap();
        assert!(matches!(e.auth, Auth::SharedKey { ref account, .. } if account == "acct"));
        let e = resolve(&base("?sv=1&sig=x")).unwrap();
        assert_eq!(
            (e.auth, e.container_url.query()),
            (Auth::Sas, Some("sv=1&sig=x"))
        );
        assert!(resolve(&base("not a key!")).is_err());
        let mut none = base("x");
        none.credential = None;
        assert!(resolve(&none).unwrap_err().contains("credential"));
    }

    #[test]
    fn emulator_account_url_takes_account_from_path() {
        let e = resolve(&AzureBlobConfig {
            account_url: Some("http://127.0.0.1:10000/devstoreaccount1".into()),
            credential: Some(DEV_KEY.into()),
            ..cfg()
        })
        .unwrap();
        assert!(matches!(e.auth, Auth::SharedKey { ref account, .. } if account == DEV_ACCOUNT));
        assert_eq!(e.container_url.path(), "/devstoreaccount1/logs");
    }

    #[test]
    fn container_url_with_sas() {
        let e = resolve(&AzureBlobConfig {
            container_url: Some(
                "https://acct.blob.core.windows.net/logs?sv=1&sp=cw&sig=s3cr3t".into(),
            ),
            ..cfg()
        })
        .unwrap();
        assert_eq!(e.auth, Auth::Sas);
        assert!(!format!("{e:?}").contains("s3cr3t"));
        let err = resolve(&AzureBlobConfig {
            container_url: Some("https://acct.blob.core.windows.net/logs".into()),
            ..cfg()
        })
        .unwrap_err();
        assert!(err.contains("SAS"), "{err}");
    }

    #[test]
    fn exactly_one_location() {
        assert!(resolve(&cfg()).is_err());
        assert!(resolve(&AzureBlobConfig {
            connection_string: Some("UseDevelopmentStorage=true".into()),
            account_url: Some("https://a.blob.core.windows.net".into()),
            ..cfg()
        })
        .unwrap_err()
        .contains("only one"));
    }

    #[test]
    fn container_names() {
        for ok in ["logs", "a-b-c", "abc", &"x".repeat(63)] {
            assert!(valid_container(ok), "{ok}");
        }
        for bad in ["ab", "Logs", "a--b", "-ab", "ab-", "a_b", &"x".repeat(64)] {
            assert!(!valid_container(bad), "{bad}");
        }
    }
}
