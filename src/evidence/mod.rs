//! Evidence: how each IAM user really calls AWS, read from CloudTrail, judged by the perimeter
//! rule, aggregated per user and hour, and kept in the store.
//!
//! Every source (trail files in a folder, the trail bucket in S3, an Athena query) produces
//! [`CallGroup`]s: one representative record with how many calls it stands for and when they
//! happened. Files and S3 yield one group per record; Athena yields grouped rows, so that
//! classification stays in Rust, in one place, whatever the source.

pub mod aggregate;
pub mod athena;
pub mod files;
pub mod refresh;
pub mod s3;

use chrono::{DateTime, Utc};

use crate::trail::Record;

/// Identical calls, as far as the classifier and the aggregates are concerned.
#[derive(Debug, Clone, PartialEq)]
pub struct CallGroup {
    /// The representative record.
    pub record: Record,
    /// How many calls it stands for (at least 1).
    pub calls: u64,
    /// The earliest of those calls.
    pub first: DateTime<Utc>,
    /// The latest of those calls.
    pub last: DateTime<Utc>,
}

impl CallGroup {
    /// One recorded call; `None` when the record has no usable `eventTime`.
    pub fn single(record: Record) -> Option<CallGroup> {
        let at = record.event_time()?;
        Some(CallGroup { record, calls: 1, first: at, last: at })
    }
}

/// What the evidence says about one user over a window: the answers an operator (and the
/// eligibility rules) need before locking them.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct UserEvidence {
    /// The IAM user name.
    pub user: String,
    /// The user's ARN, when a record carried it.
    pub arn: Option<String>,
    /// The earliest applicable call in the window.
    pub first_call: DateTime<Utc>,
    /// The latest applicable call in the window.
    pub last_call: DateTime<Utc>,
    /// Calls the perimeter applies to (not_applicable ones are not counted).
    pub calls: u64,
    /// Calls the lockdown policy would have denied.
    pub would_deny: u64,
    /// The most recent call from outside the perimeter.
    pub last_outside: Option<OutsideCall>,
    /// Outside sources (IP, endpoint, service), most calls first.
    pub outside_sources: Vec<OutsideSource>,
    /// Recorded denials that look like the lockdown policy's (explicit identity-based deny).
    pub explicit_denials: u64,
    /// Every other recorded denial ("no policy allows", SCPs, resource policies).
    pub other_denials: u64,
}

/// One call from outside the perimeter that the policy would deny.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OutsideCall {
    /// When the call was made.
    pub at: DateTime<Utc>,
    /// The IP address, VPC endpoint ID or service that the call came from.
    pub source: String,
    /// The IAM action, `service:Name`.
    pub action: String,
    /// Why the policy would deny it.
    pub reason: crate::perimeter::DenyReason,
}

/// A source outside the perimeter a user called from, with how often and when last.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OutsideSource {
    /// The IP address, VPC endpoint ID or service the calls came from.
    pub source: String,
    /// Calls from it in the window.
    pub calls: u64,
    /// The latest of those calls.
    pub last_seen: DateTime<Utc>,
}

/// How current the evidence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Freshness {
    /// When the last refresh finished successfully.
    pub last_success: Option<DateTime<Utc>>,
    /// The end of the newest window a successful refresh covered.
    pub covered_until: Option<DateTime<Utc>>,
    /// The perimeter the stored verdicts were derived under (`None`: never stamped).
    pub judged_under: Option<crate::perimeter::Fingerprint>,
    /// User-hours stored before request contexts were kept (or being read again): their
    /// verdicts cannot follow a perimeter change until the next refresh has re-read them.
    pub legacy_hours: u64,
}

/// The evidence the controller reads. SQLite implements it today; a server database can later.
pub trait EvidenceStore {
    /// Why the store could not answer.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Every user with applicable calls in `[since, until)`, in user-name order.
    fn user_evidence(&self, since: DateTime<Utc>, until: DateTime<Utc>) -> Result<Vec<UserEvidence>, Self::Error>;

    /// The evidence of `users` alone in `[since, until)`: what [`EvidenceStore::user_evidence`]
    /// says of them, read user by user rather than for everyone.
    fn evidence_of_users(
        &self,
        users: &[String],
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<UserEvidence>, Self::Error>;

    /// A number that changes whenever the stored evidence may have (every evidence write moves
    /// it, in the same transaction): a reader may keep what it read while it stays the same.
    fn evidence_generation(&self) -> Result<u64, Self::Error>;

    /// How current the stored evidence is, from the refresh log.
    fn freshness(&self) -> Result<Freshness, Self::Error>;

    /// One user's evidence in `[since, until)`; `None` when they made no applicable call.
    fn evidence_of(
        &self,
        user: &str,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Option<UserEvidence>, Self::Error>;

    /// One user's calls in `[since, until)` by perimeter verdict and reason, most calls first.
    fn verdict_counts(
        &self,
        user: &str,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<(crate::perimeter::Verdict, u64)>, Self::Error>;
}

/// Where trail files are delivered: a local folder or the trail bucket. Keys are `/`-separated
/// paths relative to the root (the bucket prefix, or the folder); listing is in key order, which
/// for CloudTrail's layout is delivery order within a day prefix.
pub trait TrailObjects: Send + Sync {
    /// The immediate "sub-folders" of `prefix` (each ending in `/`), in order.
    fn list_prefixes(&self, prefix: &str) -> impl Future<Output = Result<Vec<String>, SourceError>> + Send;

    /// Object keys under `prefix` (recursively) that sort after `start_after`, in order.
    fn list_keys(
        &self,
        prefix: &str,
        start_after: Option<&str>,
    ) -> impl Future<Output = Result<Vec<String>, SourceError>> + Send;

    /// The object's bytes, as stored (possibly gzip-compressed).
    fn fetch(&self, key: &str) -> impl Future<Output = Result<Vec<u8>, SourceError>> + Send;
}

/// A source could not be read. Carries what was being done and why.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{what}: {source}")]
    /// A local file or folder could not be read.
    Io {
        /// What was being read.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    #[error("{operation}: {message}")]
    /// An AWS call failed.
    Aws {
        /// The AWS operation that failed.
        operation: String,
        /// The error AWS (or the transport) gave.
        message: String,
    },
    /// This one object cannot be read and retrying will not help (a dangling link, a FIFO, no
    /// permission, too large): readers skip it, count it and go on with the rest.
    #[error("cannot read {key}: {why}")]
    Unreadable {
        /// The object that cannot be read.
        key: String,
        /// Why not.
        why: String,
    },
    #[error("{0}")]
    /// Any other failure, described for people.
    Other(String),
}

/// One user-hour's calls from one source outside the perimeter, as the store keeps them (judged
/// under the perimeter the evidence is stamped with): what a replay of the rollout needs to know
/// which calls a lockdown would have denied.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OutsideCalls {
    /// The IAM user who made the calls.
    pub user: String,
    /// The hour the calls fell in.
    pub hour: DateTime<Utc>,
    /// The IP address, VPC endpoint ID or service the calls came from.
    pub source: String,
    /// How many calls.
    pub calls: u64,
    /// The last such call in the hour.
    pub last_seen: DateTime<Utc>,
    /// The action of that last call.
    pub action: String,
    /// Why the policy would deny the last call.
    pub reason: crate::perimeter::DenyReason,
}

/// One user-hour's recorded denials, counted when the evidence was read.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RecordedDenials {
    /// The IAM user who was denied.
    pub user: String,
    /// The hour the denials fell in.
    pub hour: DateTime<Utc>,
    /// The user's last applicable call in the hour (the hour itself when none was recorded).
    pub last_call: DateTime<Utc>,
    /// Denials that look like the lockdown policy's (explicit identity-based deny).
    pub explicit: u64,
    /// Every other denial ("no policy allows", SCPs, resource policies).
    pub other: u64,
}
