//! The guard's event feeds: the trail records that arrived since the last poll, from the
//! configured `guard.source`. [`from_config`] is the one place that builds the feed.

use std::future::Future;
use std::sync::Arc;

use crate::clock::Clock;
use crate::config::Config;
use crate::evidence::SourceError;
use crate::evidence::files::Folder;
use crate::evidence::refresh::Source;
use crate::evidence::s3::S3Trail;
use crate::trail::Record;

pub mod athena;
mod trail;

pub use athena::{AthenaFeed, LATE_DELIVERY};
pub use trail::TrailFeed;

/// New trail records since the last poll.
pub trait EventFeed: Send + Sync {
    /// The records delivered since the previous poll (none is returned twice).
    fn poll(&mut self) -> impl Future<Output = Result<Vec<Record>, SourceError>> + Send;
}

/// The feed of whichever source `guard.source` names.
pub enum AnyFeed {
    /// Trail files in a folder.
    Files(TrailFeed<Folder>),
    /// Trail files in the bucket.
    S3(TrailFeed<S3Trail>),
    /// Windowed Athena queries.
    Athena(AthenaFeed),
}

impl EventFeed for AnyFeed {
    async fn poll(&mut self) -> Result<Vec<Record>, SourceError> {
        match self {
            AnyFeed::Files(feed) => feed.poll().await,
            AnyFeed::S3(feed) => feed.poll().await,
            AnyFeed::Athena(feed) => feed.poll().await,
        }
    }
}

/// The guard's feed from `guard.source`, reading the same evidence section as the evidence
/// source of that kind, and reaching back the guard window plus its grace on a fresh start.
/// AWS clients use the standard credential chain and endpoint.
pub async fn from_config(config: &Config, clock: Arc<dyn Clock>) -> Result<AnyFeed, SourceError> {
    let lookback = config.guard.window + config.guard.grace;
    let account = &config.account_id;
    Ok(match Source::of_kind(config, config.guard.source, "guard.source").await? {
        Source::Folder(folder) => AnyFeed::Files(TrailFeed::new(folder, account, clock, lookback)),
        Source::S3(bucket) => AnyFeed::S3(TrailFeed::new(bucket, account, clock, lookback)),
        Source::Athena { client, config: athena } => {
            AnyFeed::Athena(AthenaFeed::new(client, athena, account, clock, lookback))
        }
    })
}
