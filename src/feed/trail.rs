//! The guard's event feed from the trail folder or bucket (`guard.source: files` or `s3`).
//!
//! New trail files are tailed with an in-memory cursor per day prefix.
//!
//! The cursor is deliberately not persisted: after a restart the feed re-reads the recent window
//! (the guard window plus delivery slack), which rebuilds the cohort's rate, and denials it has
//! already stored are ignored by event ID.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::clock::Clock;
use crate::evidence::files::{is_trail_key, resume_after, scan_prefixes};
use crate::evidence::{SourceError, TrailObjects};
use crate::feed::EventFeed;
use crate::trail::{self, Record};

/// The guard's feed read from newly delivered trail files (a folder or the S3 bucket).
pub struct TrailFeed<T> {
    objects: Arc<T>,
    account_id: String,
    clock: Arc<dyn Clock>,
    /// How far back a fresh feed starts reading.
    lookback: chrono::Duration,
    /// Keys already read, by prefix.
    seen: BTreeMap<String, BTreeSet<String>>,
    /// Files skipped because they can never be read, since the feed started.
    unreadable: u64,
}

impl<T: TrailObjects> TrailFeed<T> {
    /// A feed over `objects` for `account_id`, starting `lookback` before now.
    pub fn new(objects: Arc<T>, account_id: &str, clock: Arc<dyn Clock>, lookback: std::time::Duration) -> Self {
        TrailFeed {
            objects,
            account_id: account_id.to_string(),
            clock,
            lookback: chrono::Duration::from_std(lookback).unwrap_or(chrono::Duration::hours(1)),
            seen: BTreeMap::new(),
            unreadable: 0,
        }
    }

    /// How many files were skipped because they can never be read, since the feed started.
    pub fn unreadable(&self) -> u64 {
        self.unreadable
    }

    async fn new_records(&mut self) -> Result<Vec<Record>, SourceError> {
        let now = self.clock.now();
        let scans = scan_prefixes(self.objects.as_ref(), &self.account_id, now - self.lookback, now).await?;
        // Forget prefixes that fell out of the window.
        let live: BTreeSet<&str> = scans.iter().map(|s| s.prefix.as_str()).collect();
        self.seen.retain(|prefix, _| live.contains(prefix.as_str()));

        let mut records = Vec::new();
        for scan in &scans {
            let seen = self.seen.entry(scan.prefix.clone()).or_default();
            // A key named for a delivery after now (a forged name) must not move the cursor
            // past the real files still to come that day.
            let last = seen.iter().rev().find(|key| delivered_at(key).is_none_or(|at| at <= now));
            let start_after = match (scan.ordered, last) {
                (true, Some(last)) => Some(resume_after(last).to_string()),
                _ => None,
            };
            let keys = self.objects.list_keys(&scan.prefix, start_after.as_deref()).await?;
            let fresh: Vec<String> = keys.into_iter().filter(|k| is_trail_key(k) && !seen.contains(k)).collect();
            for key in fresh {
                let raw = match self.objects.fetch(&key).await {
                    Ok(raw) => raw,
                    // One file that can never be read (a dangling link, no permission, too
                    // large) is skipped for good; the rest of the poll goes on.
                    Err(SourceError::Unreadable { key, why }) => {
                        self.unreadable += 1;
                        tracing::warn!(%key, %why, skipped_so_far = self.unreadable, "unreadable trail file skipped by the guard's feed");
                        seen.insert(key);
                        continue;
                    }
                    Err(error) => return Err(error),
                };
                match trail::parse_bytes(&raw) {
                    Ok(parsed) => {
                        if !parsed.bad.is_empty() {
                            tracing::warn!(%key, skipped = parsed.bad.len(), "malformed records in trail file");
                        }
                        records.extend(parsed.records);
                    }
                    Err(why) => tracing::warn!(%key, %why, "unreadable trail file skipped"),
                }
                seen.insert(key);
            }
        }
        Ok(records)
    }
}

/// The delivery minute CloudTrail puts in a file's name
/// (`<account>_CloudTrail_<region>_<YYYYMMDDTHHmmZ>_<random>.json.gz`), if it has one.
fn delivered_at(key: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let name = key.rsplit('/').next()?;
    let stamp = name.split('_').nth(3)?;
    chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%MZ").ok().map(|t| t.and_utc())
}

impl<T: TrailObjects + 'static> EventFeed for TrailFeed<T> {
    async fn poll(&mut self) -> Result<Vec<Record>, SourceError> {
        self.new_records().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::evidence::files::Folder;

    #[tokio::test]
    async fn an_unreadable_file_is_skipped_counted_and_the_rest_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let now = chrono::DateTime::parse_from_rfc3339("2026-03-10T02:00:00Z").unwrap().to_utc();
        let day = dir.path().join("AWSLogs/123456789012/CloudTrail/us-east-1/2026/03/10");
        std::fs::create_dir_all(&day).unwrap();
        let record = r#"{"Records":[{"eventVersion":"1.08","eventTime":"2026-03-10T01:00:00Z","eventSource":"s3.amazonaws.com","eventName":"ListBuckets","eventID":"e1","userIdentity":{"type":"IAMUser","userName":"ann","arn":"arn:aws:iam::123456789012:user/ann","accountId":"123456789012"},"sourceIPAddress":"203.0.113.9"}]}"#;
        std::fs::write(day.join("123456789012_CloudTrail_us-east-1_20260310T0105Z_b.json"), record).unwrap();
        std::os::unix::fs::symlink(
            day.join("nowhere"),
            day.join("123456789012_CloudTrail_us-east-1_20260310T0100Z_a.json"),
        )
        .unwrap();
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(now));
        let mut feed = TrailFeed::new(
            Arc::new(Folder::new(dir.path())),
            "123456789012",
            clock,
            std::time::Duration::from_secs(3600),
        );
        let records = feed.poll().await.unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(feed.unreadable(), 1);
        assert!(feed.poll().await.unwrap().is_empty(), "neither file is read again");
        assert_eq!(feed.unreadable(), 1);
    }

    #[test]
    fn the_delivery_minute_comes_from_a_cloudtrail_file_name_only() {
        let key = "AWSLogs/123/CloudTrail/us-east-1/2026/03/10/123_CloudTrail_us-east-1_20260310T0105Z_abc.json.gz";
        assert_eq!(delivered_at(key).map(|t| t.to_rfc3339()).as_deref(), Some("2026-03-10T01:05:00+00:00"));
        assert_eq!(delivered_at("AWSLogs/x/records.json"), None);
        assert_eq!(delivered_at("123_CloudTrail_us-east-1_2099_x.json.gz"), None);
    }
}
