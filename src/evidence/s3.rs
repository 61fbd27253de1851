//! The trail bucket as a [`TrailObjects`] source: CloudTrail's delivery layout under the bucket
//! prefix, listed with ListObjectsV2 (delimiter for "folders", `StartAfter` and continuation
//! tokens for keys) and read with GetObject.

use aws_sdk_s3::Client;

use crate::aws::error_message;
use crate::config::S3Location;
use crate::evidence::{SourceError, TrailObjects};

/// Trail files in `s3://bucket/prefix/`. Keys handed in and out are relative to the prefix.
#[derive(Debug, Clone)]
pub struct S3Trail {
    client: Client,
    bucket: String,
    /// The configured prefix with exactly one trailing `/`, or empty for the bucket root.
    root: String,
}

impl S3Trail {
    /// Trail files under `location` in S3.
    pub fn new(client: Client, location: &S3Location) -> S3Trail {
        let prefix = location.prefix.trim_matches('/');
        S3Trail {
            client,
            bucket: location.bucket.clone(),
            root: if prefix.is_empty() { String::new() } else { format!("{prefix}/") },
        }
    }

    fn full(&self, relative: &str) -> String {
        format!("{}{relative}", self.root)
    }

    fn relative<'a>(&self, full: &'a str) -> &'a str {
        full.strip_prefix(&self.root).unwrap_or(full)
    }

    fn failed<E, R>(&self, operation: &str, key: &str, err: aws_sdk_s3::error::SdkError<E, R>) -> SourceError
    where
        E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        SourceError::Aws {
            operation: format!("s3:{operation} s3://{}/{}", self.bucket, self.full(key)),
            message: error_message(&err),
        }
    }
}

impl TrailObjects for S3Trail {
    async fn list_prefixes(&self, prefix: &str) -> Result<Vec<String>, SourceError> {
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(self.full(prefix))
            .delimiter("/")
            .into_paginator()
            .send();
        let mut prefixes = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.failed("ListObjectsV2", prefix, e))?;
            prefixes
                .extend(page.common_prefixes().iter().filter_map(|p| p.prefix()).map(|p| self.relative(p).to_string()));
        }
        Ok(prefixes)
    }

    async fn list_keys(&self, prefix: &str, start_after: Option<&str>) -> Result<Vec<String>, SourceError> {
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(self.full(prefix))
            .set_start_after(start_after.map(|key| self.full(key)))
            .into_paginator()
            .send();
        let mut keys = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.failed("ListObjectsV2", prefix, e))?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key())
                    // "Folder" placeholders made by the console are not trail files.
                    .filter(|key| !key.ends_with('/'))
                    .map(|key| self.relative(key).to_string()),
            );
        }
        Ok(keys)
    }

    async fn fetch(&self, key: &str) -> Result<Vec<u8>, SourceError> {
        let object = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .send()
            .await
            .map_err(|e| self.failed("GetObject", key, e))?;
        // Never hold more of one object than any inflate limit allows: such a file is skipped.
        let limit = crate::config::MAX_INFLATED_SIZE;
        if object.content_length().is_some_and(|size| u64::try_from(size).unwrap_or(0) > limit) {
            return Err(SourceError::Unreadable { key: key.to_string(), why: format!("larger than {limit} bytes") });
        }
        let body = object.body.collect().await.map_err(|e| SourceError::Aws {
            operation: format!("s3:GetObject s3://{}/{} (reading the body)", self.bucket, self.full(key)),
            message: e.to_string(),
        })?;
        Ok(body.into_bytes().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trail(prefix: &str) -> S3Trail {
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .build();
        S3Trail::new(Client::from_conf(config), &S3Location { bucket: "b".into(), prefix: prefix.into() })
    }

    #[test]
    fn prefix_is_normalised_to_one_trailing_slash() {
        for (configured, root) in [("", ""), ("/", ""), ("logs", "logs/"), ("/logs/", "logs/"), ("a/b/", "a/b/")] {
            let t = trail(configured);
            assert_eq!(t.root, root, "{configured:?}");
            assert_eq!(t.full("AWSLogs/"), format!("{root}AWSLogs/"));
            assert_eq!(t.relative(&t.full("AWSLogs/x")), "AWSLogs/x");
        }
    }
}
