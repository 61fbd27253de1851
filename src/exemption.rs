//! Exemptions that expire: what the IAM tags say about each exempt user, and when the daemon
//! ends an exemption. Pure functions of the directory and `now`; the tag writes are at the edge
//! (`Iam::tag_user`, `Iam::untag_user`), the operator's record in the ledger.
//!
//! An exemption is the perimeter's exemption tag `<key>=true` (the policy's Deny does not apply
//! to users carrying it, and the planner never promotes them). `lockstep exempt` adds
//! `<key>-until` (RFC 3339, UTC) and `<key>-reason`; an exemption without `<key>-until` was set by
//! hand and never expires.

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use serde::Serialize;

use crate::config::later;
use crate::rollout::IamUser;

named_enum!(
    /// Where an exemption stands in the ledger. `granting` and `expiring` are journaled intents,
    /// written before the IAM tag write they announce.
    ExemptionState {
        /// Journaled; the tags are being written.
        Granting = "granting",
        /// The tags are in IAM.
        Granted = "granted",
        /// Past its end; the tags are being removed.
        Expiring = "expiring",
        /// The tags are gone: the user is judged like anyone else.
        Expired = "expired",
    }
);

/// An operator's exemption, as `lockstep exempt --commit` journals it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant<'a> {
    /// The IAM user name.
    pub user: &'a str,
    /// When it ends.
    pub until: DateTime<Utc>,
    /// Why (also the `<key>-reason` tag).
    pub reason: &'a str,
    /// The operator.
    pub by: &'a str,
}

/// An exemption as the ledger records it: who granted it, why and when, and where it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    /// The IAM user name.
    pub user: String,
    /// Where it stands.
    pub state: ExemptionState,
    /// When it ends (`None` for one the daemon found set by hand).
    pub until: Option<DateTime<Utc>>,
    /// Why (empty for one set by hand).
    pub reason: String,
    /// The operator who granted it (empty for one set by hand).
    pub by: String,
    /// When it was granted (or first recorded).
    pub at: DateTime<Utc>,
    /// When its state last changed.
    pub changed_at: DateTime<Utc>,
}

/// How far ahead an exemption counts as expiring soon (the gauge and its alert).
pub const EXPIRING_SOON: chrono::Duration = chrono::Duration::days(7);

/// IAM's limit on a tag value's length.
const TAG_VALUE_MAX: usize = 256;

/// The tag that holds an exemption's end.
pub fn until_key(key: &str) -> String {
    format!("{key}-until")
}

/// The tag that holds why the user is exempt.
pub fn reason_key(key: &str) -> String {
    format!("{key}-reason")
}

/// Every tag an exemption consists of: what expiry removes.
pub fn tag_keys(key: &str) -> Vec<String> {
    vec![key.to_string(), until_key(key), reason_key(key)]
}

/// The tags `lockstep exempt` sets.
pub fn grant_tags(key: &str, until: DateTime<Utc>, reason: &str) -> Vec<(String, String)> {
    vec![
        (key.to_string(), "true".to_string()),
        (until_key(key), until.to_rfc3339_opts(SecondsFormat::Secs, true)),
        (reason_key(key), reason.to_string()),
    ]
}

/// When an exemption ends, as its tags say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Expiry {
    /// It ends at this instant.
    At(DateTime<Utc>),
    /// No `<key>-until` tag: set by hand, it never ends on its own.
    Never,
    /// The `<key>-until` tag holds something that is not a time (kept: only a person can tell).
    Unreadable(String),
}

/// One exempt user as IAM shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Exemption {
    /// The IAM user name.
    pub user: String,
    /// When the exemption ends.
    pub expiry: Expiry,
    /// The `<key>-reason` tag, if any.
    pub reason: Option<String>,
}

impl Exemption {
    /// Whether the exemption has ended by `now`.
    pub fn is_due(&self, now: DateTime<Utc>) -> bool {
        matches!(self.expiry, Expiry::At(until) if until <= now)
    }

    /// Whether it ends after `now` but within [`EXPIRING_SOON`].
    pub fn expires_soon(&self, now: DateTime<Utc>) -> bool {
        matches!(self.expiry, Expiry::At(until) if until > now && until - now <= EXPIRING_SOON)
    }
}

/// The exempt users of the directory (tag `key` = `true`), by name.
pub fn exemptions(users: &[IamUser], key: &str) -> Vec<Exemption> {
    let (until, reason) = (until_key(key), reason_key(key));
    let mut found: Vec<Exemption> = users
        .iter()
        .filter(|u| u.tags.get(key).is_some_and(|v| v == "true"))
        .map(|u| Exemption {
            user: u.name.clone(),
            expiry: match u.tags.get(&until) {
                None => Expiry::Never,
                Some(text) => DateTime::parse_from_rfc3339(text)
                    .map(|at| Expiry::At(at.with_timezone(&Utc)))
                    .unwrap_or_else(|_| Expiry::Unreadable(text.clone())),
            },
            reason: u.tags.get(&reason).cloned(),
        })
        .collect();
    found.sort_by(|a, b| a.user.cmp(&b.user));
    found
}

/// The users whose exemption has ended by `now`: the daemon removes their tags.
pub fn due(users: &[IamUser], key: &str, now: DateTime<Utc>) -> Vec<String> {
    exemptions(users, key).into_iter().filter(|e| e.is_due(now)).map(|e| e.user).collect()
}

/// How many exemptions end within [`EXPIRING_SOON`] of `now`.
pub fn expiring_soon(users: &[IamUser], key: &str, now: DateTime<Utc>) -> usize {
    exemptions(users, key).iter().filter(|e| e.expires_soon(now)).count()
}

/// `--until`: a date (the exemption ends at 00:00 UTC that day), an RFC 3339 time, or a
/// duration from `now` (`7d`, `36h`); it must lie in the future.
pub fn parse_until(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let text = text.trim();
    let until = if let Ok(day) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        day.and_hms_opt(0, 0, 0).map(|t| t.and_utc()).ok_or_else(|| format!("{text:?} is not a day"))?
    } else if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        at.with_timezone(&Utc)
    } else {
        let span = crate::config::parse_duration(text).map_err(|why| {
            format!(
                "expected a date (2026-12-31), a time (2026-12-31T18:00:00Z) or a duration (7d), got {text:?}: {why}"
            )
        })?;
        later(now, span)
    };
    if until <= now {
        return Err(format!("{} is not in the future", until.to_rfc3339_opts(SecondsFormat::Secs, true)));
    }
    Ok(until)
}

/// A reason IAM accepts as a tag value: at most 256 characters, letters, digits, spaces and
/// `_ . : / = + - @`.
pub fn check_reason(reason: &str) -> Result<(), String> {
    if reason.trim().is_empty() {
        return Err("the reason is empty; say why the user is exempt".to_string());
    }
    if reason.chars().count() > TAG_VALUE_MAX {
        return Err(format!("the reason has {} characters; IAM tag values hold at most 256", reason.chars().count()));
    }
    let allowed = |c: char| c.is_alphanumeric() || c == ' ' || "_.:/=+-@".contains(c);
    if let Some(bad) = reason.chars().find(|c| !allowed(*c)) {
        return Err(format!("the reason contains {bad:?}; IAM tag values allow letters, digits, spaces and _.:/=+-@"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::TimeZone;

    use super::*;

    const KEY: &str = "lockstep-exempt";

    fn at(day: u32, hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, day, hour, 0, 0).unwrap()
    }

    fn user(name: &str, tags: &[(&str, &str)]) -> IamUser {
        IamUser {
            name: name.into(),
            arn: format!("arn:aws:iam::123456789012:user/{name}"),
            path: "/".into(),
            tags: tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
        }
    }

    fn directory() -> Vec<IamUser> {
        vec![
            user(
                "ann",
                &[
                    (KEY, "true"),
                    ("lockstep-exempt-until", "2026-12-03T00:00:00Z"),
                    ("lockstep-exempt-reason", "vendor"),
                ],
            ),
            user("ben", &[(KEY, "true")]),
            user("cat", &[(KEY, "true"), ("lockstep-exempt-until", "next week")]),
            user("dan", &[(KEY, "true"), ("lockstep-exempt-until", "2026-12-20T00:00:00Z")]),
            user("eve", &[(KEY, "false"), ("lockstep-exempt-until", "2026-12-01T00:00:00Z")]),
            user("fay", &[("team", "red")]),
        ]
    }

    #[test]
    fn the_tags_say_who_is_exempt_and_until_when() {
        let found = exemptions(&directory(), KEY);
        let summary: Vec<_> = found.iter().map(|e| (e.user.as_str(), e.expiry.clone(), e.reason.as_deref())).collect();
        assert_eq!(
            summary,
            [
                ("ann", Expiry::At(at(3, 0)), Some("vendor")),
                ("ben", Expiry::Never, None),
                ("cat", Expiry::Unreadable("next week".into()), None),
                ("dan", Expiry::At(at(20, 0)), None),
            ]
        );
    }

    #[test]
    fn an_exemption_is_due_at_its_end_and_not_before() {
        assert!(due(&directory(), KEY, at(2, 23)).is_empty());
        assert_eq!(due(&directory(), KEY, at(3, 0)), ["ann"]);
        // Set by hand, unreadable, or not exempt at all: never removed by the daemon.
        assert_eq!(due(&directory(), KEY, at(31, 0)), ["ann", "dan"]);
    }

    #[test]
    fn expiring_soon_counts_ends_within_seven_days() {
        assert_eq!(expiring_soon(&directory(), KEY, at(1, 0)), 1, "ann in two days; dan in 19");
        assert_eq!(expiring_soon(&directory(), KEY, at(13, 0)), 1, "dan in exactly 7 days");
        assert_eq!(expiring_soon(&directory(), KEY, at(3, 0)), 0, "ann is due, not expiring soon");
    }

    #[test]
    fn until_takes_a_date_a_time_or_a_duration_in_the_future() {
        let now = at(1, 12);
        assert_eq!(parse_until("2026-12-31", now), Ok(at(31, 0)));
        assert_eq!(parse_until("2026-12-02T06:00:00+06:00", now), Ok(at(2, 0)));
        assert_eq!(parse_until("7d", now), Ok(at(8, 12)));
        assert_eq!(parse_until("2026-12-01", now), Err("2026-12-01T00:00:00Z is not in the future".into()));
        assert!(parse_until("soon", now).unwrap_err().contains("expected a date"));
    }

    #[test]
    fn a_reason_must_be_a_valid_tag_value() {
        assert_eq!(check_reason("vendor VPN migration: INC-42 @ops"), Ok(()));
        assert!(check_reason("  ").unwrap_err().contains("empty"));
        assert!(check_reason("it's broken").unwrap_err().contains("'\\''"));
        assert!(check_reason(&"x".repeat(257)).unwrap_err().contains("257 characters"));
    }

    #[test]
    fn granted_tags_round_trip_through_the_reader() {
        let tags = grant_tags(KEY, at(9, 0), "vendor");
        let owned: Vec<(&str, &str)> = tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let found = exemptions(&[user("ann", &owned)], KEY);
        assert_eq!(found[0].expiry, Expiry::At(at(9, 0)));
        assert_eq!(tag_keys(KEY), tags.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>());
    }
}
