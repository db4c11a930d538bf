//! Entra ID credentials. azure_identity 1.0 has no `DefaultAzureCredential`, so
//! `credential="default"` is a small chain here, in the order the other Azure SDKs use:
//! environment (service principal secret), workload identity, managed identity, Azure CLI.
//! The first source that returns a token is kept for the life of the writer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use azure_core::credentials::{AccessToken, Secret, TokenCredential, TokenRequestOptions};
use azure_core::error::{Error, ErrorKind};
use azure_identity::{
    AzureCliCredential, ClientSecretCredential, ManagedIdentityCredential,
    ManagedIdentityCredentialOptions, UserAssignedId, WorkloadIdentityCredential,
};

use super::conn::Entra;

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn environment() -> azure_core::Result<Arc<dyn TokenCredential>> {
    let (Some(tenant), Some(client), Some(secret)) = (
        env("AZURE_TENANT_ID"),
        env("AZURE_CLIENT_ID"),
        env("AZURE_CLIENT_SECRET"),
    ) else {
        return Err(Error::with_message(
            ErrorKind::Credential,
            "environment credential needs AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET",
        ));
    };
    Ok(ClientSecretCredential::new(
        &tenant,
        client,
        Secret::new(secret),
        None,
    )?)
}

fn managed_identity() -> azure_core::Result<Arc<dyn TokenCredential>> {
    let options = ManagedIdentityCredentialOptions {
        user_assigned_id: env("AZURE_CLIENT_ID").map(UserAssignedId::ClientId),
        ..Default::default()
    };
    Ok(ManagedIdentityCredential::new(Some(options))?)
}

fn one(mode: Entra) -> azure_core::Result<Arc<dyn TokenCredential>> {
    match mode {
        Entra::Environment => environment(),
        Entra::WorkloadIdentity => Ok(WorkloadIdentityCredential::new(None)?),
        Entra::ManagedIdentity => managed_identity(),
        Entra::AzureCli => Ok(AzureCliCredential::new(None)?),
        Entra::Default => Ok(Arc::new(Chain::new()?)),
    }
}

/// Builds the credential for a mode. Construction does no I/O: a missing identity shows up
/// at the first upload as a clear `last_error`.
pub fn build(mode: Entra) -> azure_core::Result<Arc<dyn TokenCredential>> {
    one(mode)
}

#[derive(Debug)]
pub struct Chain {
    sources: Vec<(&'static str, Arc<dyn TokenCredential>)>,
    chosen: AtomicUsize,
}

impl Chain {
    fn new() -> azure_core::Result<Chain> {
        let mut sources: Vec<(&'static str, Arc<dyn TokenCredential>)> = Vec::new();
        if env("AZURE_CLIENT_SECRET").is_some() {
            sources.push(("environment", environment()?));
        }
        if env("AZURE_FEDERATED_TOKEN_FILE").is_some() {
            sources.push(("workload_identity", WorkloadIdentityCredential::new(None)?));
        }
        sources.push(("managed_identity", managed_identity()?));
        sources.push(("azure_cli", AzureCliCredential::new(None)?));
        Ok(Chain {
            sources,
            chosen: AtomicUsize::new(usize::MAX),
        })
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.sources.iter().map(|(n, _)| *n).collect()
    }
}

#[async_trait]
impl TokenCredential for Chain {
    async fn get_token(
        &self,
        scopes: &[&str],
        options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let chosen = self.chosen.load(Ordering::Relaxed);
        if let Some((_, source)) = self.sources.get(chosen) {
            return source.get_token(scopes, options).await;
        }
        let mut failures = Vec::new();
        for (i, (name, source)) in self.sources.iter().enumerate() {
            match source.get_token(scopes, options.clone()).await {
                Ok(token) => {
                    self.chosen.store(i, Ordering::Relaxed);
                    return Ok(token);
                }
                Err(e) => failures.push(format!("{name}: {}", first_line(&e.to_string()))),
            }
        }
        Err(Error::with_message(
            ErrorKind::Credential,
            format!("no Entra ID credential worked ({})", failures.join("; ")),
        ))
    }
}

fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or_default();
    line.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_chain_always_has_managed_identity_and_cli() {
        let chain = Chain::new().unwrap();
        let names = chain.names();
        assert!(
            names.ends_with(&["managed_identity", "azure_cli"]),
            "{names:?}"
        );
        assert!(build(Entra::AzureCli).is_ok());
        assert!(build(Entra::ManagedIdentity).is_ok());
    }
}
