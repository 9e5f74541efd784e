//! The fleet's object store (`[fleet.objects]`): an S3-compatible bucket for SSH recordings, through
//! `object_store` (path-style requests, SigV4). What goes where ([`recording_key`], [`Manifest`]), create-only
//! puts, multipart uploads of large recordings, and the errors an admin acts on, naming the key to fix.
//!
//! Create-only: a small object is put with `PutMode::Create` (`If-None-Match: *`), so it never replaces what is
//! there. A multipart upload cannot be conditional through `object_store`, so a large recording is looked up
//! first and only uploaded when absent; the manifest that follows is always a conditional create and is the
//! upload's commit point (review refuses a recording without one). A key that already holds an object is
//! accepted only if it is byte-identical (the same hash): a retry after a crash, never a second version.
#![deny(unsafe_code)]

use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path;
use object_store::{ObjectStore as _, ObjectStoreExt as _, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::config::{ObjectSettings, SecretSource};

/// The manifest's `format`.
pub const MANIFEST_FORMAT: &str = "rampart-recording-manifest-v1";

/// What the object store says about one recording, next to it (`<object>.manifest.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub node: String,
    pub tenant: String,
    pub session_id: String,
    pub channel_seq: Option<u32>,
    /// The channel's close record in the node's hash chain (it names the recording and its hash).
    pub chain_seq: u64,
    pub object: String,
    /// Hex SHA-256 of the object's bytes.
    pub sha256: String,
    pub size: u64,
    /// `ssh-log-cli` (sealed) or `rampart-rec-v1`.
    pub recording_format: String,
}

/// Why an object operation failed, as the admin or the uploader acts on it.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// The store answered, and the config is wrong (no such bucket, credentials refused).
    #[error("{0}")]
    Config(String),
    /// The store is unreachable or erring: retry later.
    #[error("{0}")]
    Unavailable(String),
    /// No object under the key.
    #[error("no object {0} in the bucket")]
    NotFound(String),
    /// A different object already has the key (create-only refused to replace it).
    #[error("{0}")]
    Conflict(String),
    /// The object is not what its manifest and audit record say.
    #[error("{0}")]
    Tampered(String),
}

/// The bucket, with the node's credentials.
#[derive(Clone)]
pub struct Objects {
    store: Arc<AmazonS3>,
    settings: ObjectSettings,
    /// The config file (for messages).
    source: String,
}

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Objects")
            .field("bucket", &self.settings.bucket)
            .field("endpoint", &self.settings.endpoint)
            .finish_non_exhaustive()
    }
}

fn read_secret(src: &str, key: &str, s: &SecretSource) -> anyhow::Result<String> {
    let v = match s {
        SecretSource::File(p) => std::fs::read_to_string(p).map_err(|e| {
            anyhow::anyhow!(
                "{src}: fleet.objects.{key}_file: cannot read {}: {e}; write the {key} into it (mode 0600)",
                p.display()
            )
        })?,
        // Read once at start, like the files (the gateway reads no environment on the data path).
        SecretSource::Env(name) => std::env::var(name).map_err(|_| {
            anyhow::anyhow!(
                "{src}: fleet.objects.{key}_env: the environment variable {name} is not set; set it for the gateway's process, or name a file with fleet.objects.{key}_file"
            )
        })?,
    };
    let v = v.trim().to_owned();
    if v.is_empty() {
        anyhow::bail!("{src}: fleet.objects.{key}: is empty; put the object store's {key} there");
    }
    Ok(v)
}

impl Objects {
    /// Reads the credentials (files or environment; call it before the sandbox confines file access) and
    /// builds the client. Does not connect.
    pub fn new(s: &ObjectSettings, source: &FsPath) -> anyhow::Result<Objects> {
        let src = source.display().to_string();
        let id = read_secret(&src, "access_key_id", &s.access_key_id)?;
        let secret = read_secret(&src, "secret_access_key", &s.secret_access_key)?;
        // Short bounded retries per request; the uploader retries whole uploads with its own backoff.
        let retry = object_store::RetryConfig {
            backoff: object_store::BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: 2,
            retry_timeout: Duration::from_secs(20),
        };
        let client = object_store::ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(120))
            .with_allow_http(true);
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&s.bucket)
            .with_region(&s.region)
            .with_access_key_id(id)
            .with_secret_access_key(secret)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .with_retry(retry)
            .with_client_options(client);
        if let Some(e) = &s.endpoint {
            b = b.with_endpoint(e).with_virtual_hosted_style_request(false);
        }
        let store = b
            .build()
            .map_err(|e| anyhow::anyhow!("{src}: [fleet.objects]: {e}"))?;
        Ok(Objects {
            store: Arc::new(store),
            settings: s.clone(),
            source: src,
        })
    }

    pub fn settings(&self) -> &ObjectSettings {
        &self.settings
    }

    fn classify(&self, e: object_store::Error, key: &str) -> ObjectError {
        let src = &self.source;
        let bucket = &self.settings.bucket;
        let at = self
            .settings
            .endpoint
            .as_deref()
            .unwrap_or("AWS S3")
            .to_owned();
        let detail = super::error_text(&e);
        match e {
            object_store::Error::NotFound { .. } => {
                if detail.contains("NoSuchBucket") {
                    ObjectError::Config(format!(
                        "{src}: fleet.objects.bucket: {at} has no bucket {bucket:?}; create it, or fix fleet.objects.bucket"
                    ))
                } else {
                    ObjectError::NotFound(key.to_owned())
                }
            }
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
                ObjectError::Conflict(format!("{key}: another object already has this key"))
            }
            object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
                ObjectError::Config(format!(
                    "{src}: fleet.objects.secret_access_key_file: {at} refused the credentials for bucket {bucket:?} ({detail}); check the access key id and secret (fleet.objects.access_key_id_* and secret_access_key_*)"
                ))
            }
            _ => {
                if detail.contains("NoSuchBucket") {
                    ObjectError::Config(format!(
                        "{src}: fleet.objects.bucket: {at} has no bucket {bucket:?}; create it, or fix fleet.objects.bucket"
                    ))
                } else if ["SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "403 Forbidden"]
                    .iter()
                    .any(|m| detail.contains(m))
                {
                    ObjectError::Config(format!(
                        "{src}: fleet.objects.secret_access_key_file: {at} refused the credentials for bucket {bucket:?} ({detail}); check the access key id and secret (fleet.objects.access_key_id_* and secret_access_key_*)"
                    ))
                } else {
                    ObjectError::Unavailable(format!(
                        "fleet.objects.endpoint: object store {at} (bucket {bucket:?}) failed: {detail}"
                    ))
                }
            }
        }
    }

    /// Whether the bucket exists and takes the credentials (a listing under the prefix).
    pub async fn check(&self) -> Result<(), ObjectError> {
        let prefix = Path::from(self.settings.prefix.trim_end_matches('/'));
        let p = if self.settings.prefix.is_empty() {
            None
        } else {
            Some(&prefix)
        };
        match self.store.list_with_delimiter(p).await {
            Ok(_) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => Err(ObjectError::Config(format!(
                "{}: fleet.objects.bucket: {} has no bucket {:?}; create it, or fix fleet.objects.bucket",
                self.source,
                self.settings.endpoint.as_deref().unwrap_or("AWS S3"),
                self.settings.bucket
            ))),
            Err(e) => Err(self.classify(e, "(bucket listing)")),
        }
    }

    /// The object's bytes.
    pub async fn get(&self, key: &str) -> Result<Bytes, ObjectError> {
        let path = Path::from(key);
        let r = self
            .store
            .get(&path)
            .await
            .map_err(|e| self.classify(e, key))?;
        r.bytes().await.map_err(|e| self.classify(e, key))
    }

    /// Puts `bytes` under `key` unless the key exists; an existing object with the same bytes is a success
    /// (an earlier attempt got through), any other is [`ObjectError::Conflict`].
    pub async fn put_create(&self, key: &str, bytes: Bytes) -> Result<(), ObjectError> {
        let path = Path::from(key);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&path, PutPayload::from(bytes.clone()), opts)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match self.classify(e, key) {
                ObjectError::Conflict(_) => self.same_or_conflict(key, &hex_sha256(&bytes)).await,
                other => Err(other),
            },
        }
    }

    async fn same_or_conflict(&self, key: &str, sha256: &str) -> Result<(), ObjectError> {
        let there = self.get(key).await?;
        if hex_sha256(&there) == sha256 {
            Ok(())
        } else {
            Err(ObjectError::Conflict(format!(
                "{key}: the bucket already holds a different object under this key (create-only: it is left alone)"
            )))
        }
    }

    /// Uploads the file at `path` (whose hex SHA-256 is `sha256`) under `key`, create-only: one conditional
    /// put up to `part_size`, above that a multipart upload after a lookup.
    pub async fn upload_file(
        &self,
        key: &str,
        path: &FsPath,
        sha256: &str,
    ) -> Result<(), ObjectError> {
        let local = |e: std::io::Error| {
            ObjectError::Conflict(format!("the local recording {}: {e}", path.display()))
        };
        let size = std::fs::metadata(path).map_err(local)?.len();
        if size <= self.settings.part_size as u64 {
            let bytes = Bytes::from(std::fs::read(path).map_err(local)?);
            if hex_sha256(&bytes) != sha256 {
                return Err(ObjectError::Tampered(format!(
                    "the local recording {} does not match the hash its audit record names; it is not uploaded",
                    path.display()
                )));
            }
            return self.put_create(key, bytes).await;
        }
        let obj = Path::from(key);
        match self.store.head(&obj).await {
            Ok(_) => return self.same_or_conflict(key, sha256).await,
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.classify(e, key)),
        }
        let mut upload = self
            .store
            .put_multipart(&obj)
            .await
            .map_err(|e| self.classify(e, key))?;
        let result = async {
            use std::io::Read as _;
            let mut f = std::fs::File::open(path).map_err(local)?;
            let mut h = Sha256::new();
            loop {
                let mut buf = Vec::with_capacity(self.settings.part_size);
                (&mut f)
                    .take(self.settings.part_size as u64)
                    .read_to_end(&mut buf)
                    .map_err(local)?;
                if buf.is_empty() {
                    break;
                }
                h.update(&buf);
                upload
                    .put_part(PutPayload::from(buf))
                    .await
                    .map_err(|e| self.classify(e, key))?;
            }
            if hex::encode(h.finalize()) != sha256 {
                return Err(ObjectError::Tampered(format!(
                    "the local recording {} does not match the hash its audit record names; it is not uploaded",
                    path.display()
                )));
            }
            upload
                .complete()
                .await
                .map_err(|e| self.classify(e, key))?;
            Ok(())
        }
        .await;
        if result.is_err() {
            let _ = upload.abort().await;
        }
        result
    }
}

/// Where a recording goes: `<prefix><tenant>/<yyyy>/<mm>/<dd>/<session>/<file>`, the date (UTC) of the
/// channel's close record, the file name of the local recording.
pub fn recording_key(
    prefix: &str,
    tenant: &str,
    at_ms: i64,
    session_id: &str,
    local_path: &str,
) -> String {
    let day = time::OffsetDateTime::from_unix_timestamp(at_ms.div_euclid(1000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let file = local_path.rsplit('/').next().unwrap_or(local_path);
    format!(
        "{prefix}{tenant}/{:04}/{:02}/{:02}/{session_id}/{file}",
        day.year(),
        u8::from(day.month()),
        day.day()
    )
}

pub fn manifest_key(object_key: &str) -> String {
    format!("{object_key}.manifest.json")
}

pub fn hex_sha256(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Checks a downloaded recording against its manifest and the hash its audit record names (`record_sha256`,
/// from the hash chain): all three must agree, and the manifest must describe this recording.
pub fn verify_download(
    manifest: &Manifest,
    object_key: &str,
    session_id: &str,
    object: &[u8],
    record_sha256: Option<&str>,
) -> Result<(), ObjectError> {
    let got = hex_sha256(object);
    if manifest.format != MANIFEST_FORMAT
        || manifest.object != object_key
        || manifest.session_id != session_id
    {
        return Err(ObjectError::Tampered(format!(
            "{}: the manifest does not describe this recording (object {:?}, session {:?}); refusing to show it",
            manifest_key(object_key),
            manifest.object,
            manifest.session_id
        )));
    }
    if got != manifest.sha256 || object.len() as u64 != manifest.size {
        return Err(ObjectError::Tampered(format!(
            "{object_key}: the object's SHA-256 is {got} ({} bytes), its manifest says {} ({} bytes): it was changed \
             in the bucket; refusing to show it",
            object.len(),
            manifest.sha256,
            manifest.size
        )));
    }
    if let Some(r) = record_sha256 {
        if r != manifest.sha256 {
            return Err(ObjectError::Tampered(format!(
                "{object_key}: the manifest's SHA-256 {} is not the one the audit record names ({r}): object and \
                 manifest were replaced; refusing to show it",
                manifest.sha256
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(object: &[u8]) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT.into(),
            node: "gw-a".into(),
            tenant: "acme".into(),
            session_id: "s1".into(),
            channel_seq: Some(1),
            chain_seq: 7,
            object: "acme/2026/12/07/s1/1.cap".into(),
            sha256: hex_sha256(object),
            size: object.len() as u64,
            recording_format: "ssh-log-cli".into(),
        }
    }

    #[test]
    fn keys_are_per_tenant_day_and_session() {
        // 2026-12-07T23:59:59.999Z
        let k = recording_key(
            "fleet/",
            "acme",
            1_796_687_999_999,
            "s1",
            "recordings/acme/s1/1.cap",
        );
        assert_eq!(k, "fleet/acme/2026/12/07/s1/1.cap");
        assert_eq!(
            manifest_key(&k),
            "fleet/acme/2026/12/07/s1/1.cap.manifest.json"
        );
    }

    #[test]
    fn a_changed_object_or_manifest_is_refused() {
        let obj = b"sealed recording".to_vec();
        let m = manifest(&obj);
        let key = m.object.clone();
        let sha = m.sha256.clone();
        // The control: the untouched object passes.
        verify_download(&m, &key, "s1", &obj, Some(&sha)).unwrap();
        let mut bad = obj.clone();
        bad[0] ^= 1;
        let e = verify_download(&m, &key, "s1", &bad, Some(&sha)).unwrap_err();
        assert!(
            matches!(e, ObjectError::Tampered(_)) && e.to_string().contains("changed"),
            "{e}"
        );
        // Object and manifest replaced together: the audit record's hash still catches it.
        let m2 = manifest(&bad);
        let e = verify_download(&m2, &key, "s1", &bad, Some(&sha)).unwrap_err();
        assert!(e.to_string().contains("audit record"), "{e}");
        // A manifest of another session.
        let e = verify_download(&m, &key, "s2", &obj, Some(&sha)).unwrap_err();
        assert!(e.to_string().contains("does not describe"), "{e}");
    }
}
