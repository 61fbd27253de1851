//! Athena, apart from any one query: the generic client ([`client`]) and the SQL text every query
//! over the CloudTrail table shares ([`sql`]). The evidence query lives with the evidence
//! ([`crate::evidence::athena`]), the guard's two queries with the guard's feed
//! ([`crate::feed::athena`]).

pub(crate) mod client;
pub(crate) mod sql;

/// What the tests of every Athena query start from.
#[cfg(test)]
pub(crate) mod fixtures {
    use chrono::{DateTime, TimeZone, Utc};

    use crate::config::{self, Partitioning};

    /// A table in a database whose name needs quoting.
    pub(crate) fn cfg(partitioning: Partitioning) -> config::Athena {
        config::Athena {
            database: "trail db".into(),
            table: "cloudtrail_logs".into(),
            workgroup: "primary".into(),
            output_location: "s3://results/".into(),
            partitioning,
            account_partition: None,
            poll_interval: std::time::Duration::from_millis(1),
            timeout: std::time::Duration::from_secs(5),
        }
    }

    pub(crate) fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }
}
