//! Azure Blob Storage: each batch becomes one block blob of NDJSON (gzip by default) per
//! kind and time partition, named from a template, with the record count and the first and
//! last timestamp in the blob's metadata.
//!
//! The writer runs the async `azure_storage_blob` client on its own current-thread tokio
//! runtime. A retried batch reuses its encoded blobs and their names, so a retry after an
//! upload that did land overwrites the same blob: nothing is stored twice.
//!
//! Layout: `conn` (where and how to authorise), `shared_key` (account-key signing policy),
//! `credential` (Entra ID), `naming` (blob names), `errors` (service errors to `WriteError`).

pub mod conn;
pub mod credential;
pub(crate) mod errors;
pub mod naming;
pub mod shared_key;

use std::collections::HashMap;
use std::io::Write;
use std::num::NonZero;
use std::sync::{Arc, Weak};
use std::time::Duration;

use azure_core::http::{ClientOptions, NoFormat, RequestContent, RetryOptions};
use azure_core::Bytes;
use azure_storage_blob::models::BlockBlobClientUploadOptions;
use azure_storage_blob::{BlobContainerClient, BlobContainerClientOptions};
use flate2::write::GzEncoder;

use super::{Abort, Outcome, WriteError, Writer};
use crate::config::{AzureBlobConfig, BlobCompression};
use crate::encode::{encode_batch, ts_string, write_ndjson};
use crate::record::{Kind, Record};
use conn::{Auth, Endpoint};
use errors::Redactor;
use naming::{Identity, Template};

/// Largest block the service takes (API 2019-12-12 and later: 4000 MiB); we stay far below.
const MAX_BLOCK_SIZE: u64 = 4000 << 20;
const MIN_BLOCK_SIZE: u64 = 1 << 10;

/// Checks the configuration without I/O (called when the pipeline is built).
pub fn validate(cfg: &AzureBlobConfig) -> Result<(), String> {
    conn::resolve(cfg)?;
    Template::parse(&cfg.name_template)?;
    naming::check_prefix(&cfg.prefix)?;
    if !cfg.prefix.is_empty() && !cfg.name_template.contains("{prefix}") {
        return Err(format!(
            "prefix {:?} is set but name_template has no {{prefix}}: the prefix would be left \
             out of every name",
            cfg.prefix
        ));
    }
    if cfg.compression_level > 9 {
        return Err(format!(
            "compression_level must be 0..9, got {}",
            cfg.compression_level
        ));
    }
    if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&cfg.block_size) {
        return Err(format!(
            "block_size must be between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE} bytes, got {}",
            cfg.block_size
        ));
    }
    if !(1..=64).contains(&cfg.max_concurrency) {
        return Err(format!(
            "max_concurrency must be 1..64, got {}",
            cfg.max_concurrency
        ));
    }
    Ok(())
}

/// One blob of a batch: encoded once, uploaded until it lands.
struct Part {
    name: String,
    body: Bytes,
    metadata: HashMap<String, String>,
    uploaded: bool,
}

/// The blobs of the batch being delivered, kept across retries of that batch.
struct Pending {
    /// The batch's first record. Holding the `Weak` keeps its allocation from being
    /// reused, so pointer equality means "the same record", hence the same batch.
    first: Weak<Record>,
    len: usize,
    parts: Vec<Part>,
}

impl Pending {
    fn is_for(&self, batch: &[Arc<Record>]) -> bool {
        batch.len() == self.len && std::ptr::eq(self.first.as_ptr(), Arc::as_ptr(&batch[0]))
    }
}

pub struct AzureBlob {
    rt: tokio::runtime::Runtime,
    client: BlobContainerClient,
    endpoint: String,
    template: Template,
    id: Identity,
    compression: BlobCompression,
    level: u32,
    create_container: bool,
    block_size: NonZero<u64>,
    concurrency: NonZero<usize>,
    seq: u64,
    pending: Option<Pending>,
    raw: Vec<u8>,
    redactor: Redactor,
    /// Cuts an upload short when the pipeline closes past its deadline.
    abort: Arc<Abort>,
}

impl AzureBlob {
    /// Lets `abort` cut the writer's uploads short.
    pub fn abortable_by(mut self, abort: Arc<Abort>) -> Self {
        self.abort = abort;
        self
    }

    pub fn open(cfg: AzureBlobConfig) -> Result<Self, WriteError> {
        validate(&cfg).map_err(WriteError::permanent)?;
        let endpoint = conn::resolve(&cfg).map_err(WriteError::permanent)?;
        let template = Template::parse(&cfg.name_template).map_err(WriteError::permanent)?;
        let redactor = Redactor::new(&cfg, &endpoint);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| WriteError::transient(format!("cannot start a tokio runtime: {e}")))?;
        let client = {
            let _guard = rt.enter();
            build_client(&endpoint)
                .map_err(|e| WriteError::permanent(redactor.clean(&errors::chain(&e))))?
        };
        let gzip = cfg.compression == BlobCompression::Gzip;
        Ok(AzureBlob {
            rt,
            client,
            endpoint: endpoint.display_url(),
            template,
            id: Identity {
                prefix: cfg.prefix.clone(),
                host: naming::host_name(),
                pid: std::process::id(),
                start: naming::start_id(chrono::Utc::now()),
                ext: if gzip { ".ndjson.gz" } else { ".ndjson" },
            },
            compression: cfg.compression,
            level: cfg.compression_level,
            create_container: cfg.create_container,
            block_size: NonZero::new(cfg.block_size).unwrap_or(NonZero::<u64>::MIN),
            concurrency: NonZero::new(cfg.max_concurrency).unwrap_or(NonZero::<usize>::MIN),
            seq: 0,
            pending: None,
            raw: Vec::with_capacity(512 << 10),
            redactor,
            abort: Arc::new(Abort::default()),
        })
    }

    /// Splits the batch by kind and time partition (as the template names them), keeping
    /// each producer's order, and encodes one blob per group.
    fn prepare(&mut self, batch: &[Arc<Record>]) -> Result<Pending, WriteError> {
        let mut groups: Vec<((Kind, i64), Vec<usize>)> = Vec::new();
        for (i, r) in batch.iter().enumerate() {
            let kind = if self.template.by_kind {
                r.kind
            } else {
                Kind::App
            };
            let key = (kind, self.template.bucket(r.ts_us));
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push(i),
                None => groups.push((key, vec![i])),
            }
        }
        let mut parts = Vec::with_capacity(groups.len());
        for ((_, _), idx) in groups {
            let first = &batch[idx[0]];
            let (mut lo, mut hi) = (first.ts_us, first.ts_us);
            for &i in &idx {
                lo = lo.min(batch[i].ts_us);
                hi = hi.max(batch[i].ts_us);
            }
            let body = self.encode(batch, &idx)?;
            self.seq += 1;
            let name = self
                .template
                .render(&self.id, first.kind, first.ts_us, self.seq);
            let mut metadata = HashMap::new();
            metadata.insert("record_count".to_owned(), idx.len().to_string());
            metadata.insert("first_ts".to_owned(), ts_string(lo));
            metadata.insert("last_ts".to_owned(), ts_string(hi));
            if self.template.by_kind {
                metadata.insert("kind".to_owned(), first.kind.as_str().to_owned());
            }
            parts.push(Part {
                name,
                body,
                metadata,
                uploaded: false,
            });
        }
        Ok(Pending {
            first: Arc::downgrade(&batch[0]),
            len: batch.len(),
            parts,
        })
    }

    /// NDJSON of the records at `idx`, gzip-compressed unless turned off. Gzip is fed in
    /// chunks of a few hundred KiB, so the uncompressed batch never sits in memory whole
    /// and the chunk is still in cache when it is compressed.
    fn encode(&mut self, batch: &[Arc<Record>], idx: &[usize]) -> Result<Bytes, WriteError> {
        const CHUNK: usize = 256 << 10;
        self.raw.clear();
        if self.compression == BlobCompression::None {
            let estimate: usize = idx.iter().map(|&i| batch[i].size).sum();
            let mut out = Vec::with_capacity(estimate);
            encode_batch(idx.iter().map(|&i| &*batch[i]), &mut out);
            return Ok(Bytes::from(out));
        }
        let estimate: usize = idx.iter().map(|&i| batch[i].size).sum::<usize>() / 8;
        let mut enc = GzEncoder::new(
            Vec::with_capacity(estimate + 1024),
            flate2::Compression::new(self.level),
        );
        let gzip_error = |e: std::io::Error| WriteError::transient(format!("gzip failed: {e}"));
        for &i in idx {
            write_ndjson(&mut self.raw, &batch[i]);
            if self.raw.len() >= CHUNK {
                enc.write_all(&self.raw).map_err(gzip_error)?;
                self.raw.clear();
                crate::pipeline::let_application_run();
            }
        }
        enc.write_all(&self.raw).map_err(gzip_error)?;
        self.raw.clear();
        enc.finish().map(Bytes::from).map_err(gzip_error)
    }
}

pub(crate) fn build_client(endpoint: &Endpoint) -> azure_core::Result<BlobContainerClient> {
    let mut client_options = ClientOptions {
        // The core retries whole batches with backoff, jitter and a breaker; a second
        // retry loop inside the SDK would multiply attempts and hide errors.
        retry: RetryOptions::none(),
        ..Default::default()
    };
    let mut credential = None;
    match &endpoint.auth {
        Auth::SharedKey { account, key } => {
            client_options
                .per_try_policies
                .push(Arc::new(shared_key::SharedKeyPolicy::new(
                    account.clone(),
                    key.clone(),
                )));
        }
        Auth::Sas => {}
        Auth::Entra(mode) => credential = Some(credential::build(*mode)?),
    }
    BlobContainerClient::new(
        endpoint.container_url.clone(),
        credential,
        Some(BlobContainerClientOptions {
            client_options,
            ..Default::default()
        }),
    )
}

impl Writer for AzureBlob {
    fn write_batch(
        &mut self,
        batch: &[Arc<Record>],
        timeout: Duration,
    ) -> Result<Outcome, WriteError> {
        if batch.is_empty() {
            return Ok(Outcome::default());
        }
        if !self.pending.as_ref().is_some_and(|p| p.is_for(batch)) {
            // A new batch: whatever an abandoned one left is forgotten here.
            self.pending = None;
            self.pending = Some(self.prepare(batch)?);
        }
        let pending = self.pending.as_mut().expect("prepared above");
        let client = &self.client;
        let opts = UploadOpts {
            create_container: self.create_container,
            block_size: self.block_size,
            concurrency: self.concurrency,
            gzip: self.compression == BlobCompression::Gzip,
        };
        let abort = &self.abort;
        let result = self.rt.block_on(abort.unless_fired(async {
            tokio::time::timeout(timeout, async {
                for part in pending.parts.iter_mut().filter(|p| !p.uploaded) {
                    upload(client, part, &opts).await?;
                    part.uploaded = true;
                }
                Ok::<(), Failure>(())
            })
            .await
        }));
        // An upload cut off leaves its blob unwritten (a block blob appears whole or not at
        // all); the parts uploaded before it are kept for a retry.
        let Some(result) = result else {
            return Err(super::aborted());
        };
        match result {
            Ok(Ok(())) => {
                self.pending = None;
                Ok(Outcome::default())
            }
            Ok(Err(failure)) => Err(errors::to_write_error(
                failure,
                &self.endpoint,
                &self.redactor,
            )),
            Err(_) => Err(WriteError::transient(format!(
                "upload to {} timed out after {:.1}s",
                self.endpoint,
                timeout.as_secs_f64()
            ))),
        }
    }
}

struct UploadOpts {
    create_container: bool,
    block_size: NonZero<u64>,
    concurrency: NonZero<usize>,
    gzip: bool,
}

/// What failed and while doing what.
pub(crate) struct Failure {
    pub(crate) during: errors::Step,
    pub(crate) error: azure_core::Error,
}

async fn upload(
    client: &BlobContainerClient,
    part: &Part,
    opts: &UploadOpts,
) -> Result<(), Failure> {
    let blob = client.blob_client(&part.name).block_blob_client();
    let send = || {
        let options = BlockBlobClientUploadOptions {
            blob_content_type: Some("application/x-ndjson".into()),
            blob_content_encoding: opts.gzip.then(|| "gzip".to_owned()),
            metadata: Some(part.metadata.clone()),
            partition_size: Some(opts.block_size),
            parallel: Some(opts.concurrency),
            ..Default::default()
        };
        let content: RequestContent<Bytes, NoFormat> = part.body.clone().into();
        blob.upload(content, Some(options))
    };
    match send().await {
        Ok(_) => Ok(()),
        Err(e) if opts.create_container && errors::container_missing(&e) => {
            create_container(client).await?;
            send().await.map(|_| ()).map_err(|error| Failure {
                during: errors::Step::Upload,
                error,
            })
        }
        Err(error) => Err(Failure {
            during: errors::Step::Upload,
            error,
        }),
    }
}

async fn create_container(client: &BlobContainerClient) -> Result<(), Failure> {
    match client.create(None).await {
        Ok(_) => Ok(()),
        Err(e) if errors::container_exists(&e) => Ok(()),
        Err(error) => Err(Failure {
            during: errors::Step::CreateContainer,
            error,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(template: &str) -> AzureBlob {
        AzureBlob::open(AzureBlobConfig {
            connection_string: Some("UseDevelopmentStorage=true".into()),
            name_template: template.into(),
            ..Default::default()
        })
        .unwrap()
    }

    fn rec(ts_us: i64, kind: Kind, msg: &str) -> Arc<Record> {
        Arc::new(Record::new(ts_us, "INFO", 20, kind, msg.into()).finish(1024))
    }

    fn gunzip(b: &[u8]) -> String {
        use std::io::Read;
        let mut s = String::new();
        flate2::read::GzDecoder::new(b)
            .read_to_string(&mut s)
            .unwrap();
        s
    }

    #[test]
    fn a_batch_splits_by_kind_and_hour_keeping_order() {
        let mut w = writer(naming::DEFAULT_TEMPLATE);
        let hour = 3_600_000_000;
        let t0 = 1_795_453_200_000_000;
        let batch = vec![
            rec(t0, Kind::App, "a1"),
            rec(t0 + 1, Kind::Http, "h1"),
            rec(t0 + 2, Kind::App, "a2"),
            rec(t0 + hour, Kind::App, "a3"),
            rec(t0 + 3, Kind::App, "a4"),
        ];
        let p = w.prepare(&batch).unwrap();
        assert!(p.is_for(&batch));
        assert!(!p.is_for(&batch[1..]));
        let names: Vec<&str> = p.parts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(
            names[0].starts_with("app/2026/11/23/17/") && names[0].ends_with("-000001.ndjson.gz")
        );
        assert!(names[1].starts_with("http/2026/11/23/17/"));
        assert!(names[2].starts_with("app/2026/11/23/18/"));
        let text = gunzip(&p.parts[0].body);
        let msgs: Vec<String> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["message"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(msgs, ["a1", "a2", "a4"]);
        let m = &p.parts[0].metadata;
        assert_eq!(m["record_count"], "3");
        assert_eq!(m["first_ts"], "2026-11-23T17:00:00.000000Z");
        assert_eq!(m["last_ts"], "2026-11-23T17:00:00.000003Z");
        assert_eq!(m["kind"], "app");
    }

    #[test]
    fn without_kind_in_the_template_one_blob_holds_both() {
        let mut w = writer("{prefix}{yyyy}/{host}-{pid}-{start}-{seq}{ext}");
        let t0 = 1_795_453_200_000_000;
        let batch = vec![rec(t0, Kind::App, "a"), rec(t0, Kind::Http, "h")];
        let p = w.prepare(&batch).unwrap();
        assert_eq!(p.parts.len(), 1);
        assert_eq!(gunzip(&p.parts[0].body).lines().count(), 2);
        assert!(!p.parts[0].metadata.contains_key("kind"));
    }

    #[test]
    fn entra_id_clients_build_without_io() {
        let open = |credential: &str| {
            AzureBlob::open(AzureBlobConfig {
                account_url: Some("https://acct.blob.core.windows.net".into()),
                credential: Some(credential.into()),
                ..Default::default()
            })
        };
        for mode in ["default", "managed_identity", "azure_cli"] {
            let w = open(mode).unwrap_or_else(|e| panic!("{mode}: {}", e.message));
            assert_eq!(w.endpoint, "https://acct.blob.core.windows.net/logs");
        }
        if std::env::var_os("AZURE_CLIENT_SECRET").is_none() {
            let err = open("environment").err().unwrap();
            assert!(
                err.message.contains("AZURE_CLIENT_SECRET"),
                "{}",
                err.message
            );
        }
        // Entra ID tokens only travel over https.
        let err = AzureBlob::open(AzureBlobConfig {
            account_url: Some("http://127.0.0.1:10000/devstoreaccount1".into()),
            credential: Some("default".into()),
            ..Default::default()
        })
        .err()
        .unwrap();
        assert!(err.message.contains("https"), "{}", err.message);
    }

    #[test]
    fn validate_rejects_bad_options() {
        let base = AzureBlobConfig {
            connection_string: Some("UseDevelopmentStorage=true".into()),
            ..Default::default()
        };
        assert!(validate(&base).is_ok());
        for bad in [
            AzureBlobConfig {
                block_size: 10,
                ..base.clone()
            },
            AzureBlobConfig {
                compression_level: 11,
                ..base.clone()
            },
            AzureBlobConfig {
                prefix: "/abs".into(),
                ..base.clone()
            },
            AzureBlobConfig {
                container: "Bad_Name".into(),
                ..base.clone()
            },
        ] {
            assert!(validate(&bad).is_err());
        }
    }
}
