//! S3-compatible object storage through `object_store`.
//!
//! Endpoint and credentials come from the environment: `AWS_ENDPOINT_URL`
//! (plain http allowed, for a local server), `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`. Requests are path-style. A PUT
//! is atomic and durable once acknowledged, so [`Storage::sync`] has
//! nothing to do; a touch is a rewrite of the same bytes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};

use crate::error::{Error, ErrorKind, Result};
use crate::store::{ObjectMeta, Storage};

/// A repository under `s3://bucket/prefix`.
pub struct S3Store {
    s3: AmazonS3,
    rt: tokio::runtime::Runtime,
    bucket: String,
    prefix: String,
}

impl S3Store {
    /// Connect to `bucket` (configured from the environment).
    pub fn new(bucket: &str, prefix: &str) -> Result<S3Store> {
        let loc = format!("s3://{bucket}/{prefix}");
        let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Ok(ep) = std::env::var("AWS_ENDPOINT_URL") {
            b = b
                .with_endpoint(&ep)
                .with_allow_http(ep.starts_with("http://"));
        }
        if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err() {
            b = b.with_region("us-east-1");
        }
        let s3 = b.build().map_err(|e| {
            Error::with_source(ErrorKind::InvalidArgument, format!("repository {loc}"), e)
        })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| {
                Error::with_source(ErrorKind::Storage, format!("repository {loc}: runtime"), e)
            })?;
        Ok(S3Store {
            s3,
            rt,
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
        })
    }

    fn path(&self, key: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(key)
        } else {
            Path::from(format!("{}/{key}", self.prefix))
        }
    }

    fn err(&self, op: &str, key: &str, e: object_store::Error) -> Error {
        Error::with_source(
            ErrorKind::Storage,
            format!("{op} {key} in repository {}", self.describe()),
            e,
        )
    }
}

fn systime(secs: i64, nanos: u32) -> SystemTime {
    UNIX_EPOCH + Duration::new(secs.max(0) as u64, nanos)
}

impl Storage for S3Store {
    fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.rt.block_on(async {
            match self.s3.get(&self.path(key)).await {
                Ok(r) => Ok(Some(
                    r.bytes()
                        .await
                        .map_err(|e| self.err("read", key, e))?
                        .to_vec(),
                )),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.err("read", key, e)),
            }
        })
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        self.rt.block_on(async {
            self.s3
                .put(&self.path(key), PutPayload::from(data.to_vec()))
                .await
                .map(|_| ())
                .map_err(|e| self.err("write", key, e))
        })
    }

    fn exists(&self, key: &str) -> Result<bool> {
        self.rt.block_on(async {
            match self.s3.head(&self.path(key)).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(self.err("stat", key, e)),
            }
        })
    }

    fn touch(&self, key: &str, data: &dyn Fn() -> Result<Vec<u8>>) -> Result<bool> {
        if !self.exists(key)? {
            return Ok(false);
        }
        self.put(key, &data()?)?;
        Ok(true)
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let base = self.path(prefix.trim_end_matches('/'));
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut out = self.rt.block_on(async {
            let mut s = self.s3.list(Some(&base));
            let mut out = Vec::new();
            while let Some(m) = s.next().await {
                let m = m.map_err(|e| self.err("list", prefix, e))?;
                let full = m.location.to_string();
                let Some(key) = full.strip_prefix(&strip) else {
                    continue;
                };
                if !key.starts_with(prefix) {
                    continue;
                }
                out.push(ObjectMeta {
                    key: key.to_string(),
                    size: m.size,
                    modified: systime(
                        m.last_modified.timestamp(),
                        m.last_modified.timestamp_subsec_nanos(),
                    ),
                });
            }
            Ok::<_, Error>(out)
        })?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.rt.block_on(async {
            match self.s3.delete(&self.path(key)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.err("delete", key, e)),
            }
        })
    }

    fn delete_if_older(&self, key: &str, cutoff: SystemTime) -> Result<bool> {
        let head = self
            .rt
            .block_on(async { self.s3.head(&self.path(key)).await });
        match head {
            Ok(m) => {
                let t = systime(
                    m.last_modified.timestamp(),
                    m.last_modified.timestamp_subsec_nanos(),
                );
                if t >= cutoff {
                    return Ok(false);
                }
                self.delete(key)?;
                Ok(true)
            }
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.err("sweep", key, e)),
        }
    }

    fn atomic_conditional_delete(&self) -> bool {
        false
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }
}
