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
        }
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
            let start_after = match (scan.ordered, seen.last()) {
                (true, Some(last)) => Some(resume_after(last).to_string()),
                _ => None,
            };
            let keys = self.objects.list_keys(&scan.prefix, start_after.as_deref()).await?;
            let fresh: Vec<String> = keys.into_iter().filter(|k| is_trail_key(k) && !seen.contains(k)).collect();
            for key in fresh {
                let raw = self.objects.fetch(&key).await?;
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

impl<T: TrailObjects + 'static> EventFeed for TrailFeed<T> {
    async fn poll(&mut self) -> Result<Vec<Record>, SourceError> {
        self.new_records().await
    }
}
