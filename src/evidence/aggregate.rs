//! Aggregation: turns [`CallGroup`]s into per-user, per-hour aggregates. Pure: no I/O, no clock.
//!
//! Calls are judged with [`Perimeter::classify`] and an *empty* exempt set: evidence records how a
//! user really calls AWS; whether the user is exempt is a property of the user, decided elsewhere.
//! Only IAM users of the configured account are kept; role sessions, service events and other
//! accounts say nothing about an IAM user.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, DurationRound, TimeDelta, Utc};

use crate::config::Config;
use crate::evidence::CallGroup;
use crate::perimeter::{DenyReason, Perimeter, SkipReason, Verdict};
use crate::trail::{Denial, Record, UserIdentity};

/// What aggregation needs from the configuration: the perimeter rule and the lockdown policy's
/// name (to tell its denials from everyone else's).
#[derive(Debug, Clone)]
pub struct Judge {
    /// The perimeter rule every call is classified by.
    pub perimeter: Perimeter,
    /// The lockdown policy's name, to tell its denials from every other.
    pub lockdown_policy: String,
}

impl Judge {
    /// Judges records by the configured perimeter and lockdown policy.
    pub fn new(config: &Config) -> Judge {
        Judge { perimeter: config.perimeter.clone(), lockdown_policy: config.lockdown.policy_name.clone() }
    }

    /// The verdict on a call with `context`, by any user (evidence is judged with no one exempt),
    /// with where it came from when the policy would deny it, and its action.
    pub fn judge_context(&self, context: &RequestContext) -> JudgedContext {
        let record = context.record("", None);
        let verdict = self.perimeter.classify(&record, &HashSet::new());
        JudgedContext {
            verdict,
            outside_source: match verdict {
                Verdict::WouldDeny(reason) => Some(outside_source(&record, reason)),
                _ => None,
            },
            action: record.action().unwrap_or_default(),
        }
    }
}

/// [`Judge::judge_context`]'s answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JudgedContext {
    /// The perimeter's verdict on the call.
    pub verdict: Verdict,
    /// Where the call came from, when the policy would deny it.
    pub outside_source: Option<String>,
    /// The IAM action, `service:Name`.
    pub action: String,
}

/// Per-user, per-hour aggregates of some calls (one trail file, or one Athena window).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Aggregates {
    users: BTreeMap<String, BTreeMap<DateTime<Utc>, UserHour>>,
    /// Every distinct request context of the calls, judged once: what the store keeps of it.
    judged: BTreeMap<RequestContext, JudgedContext>,
}

/// One user's calls in one hour.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UserHour {
    /// The user's ARN, when a record in the hour carried it.
    pub arn: Option<String>,
    /// First and last call the perimeter applies to (`None` when every call was not applicable).
    pub first_call: Option<DateTime<Utc>>,
    /// The latest applicable call in the hour.
    pub last_call: Option<DateTime<Utc>>,
    /// Calls by verdict and reason, not-applicable ones included.
    pub verdicts: BTreeMap<Verdict, u64>,
    /// Sources of calls the policy would deny, by source.
    pub outside: BTreeMap<String, OutsideSeen>,
    /// Recorded denials that look like the lockdown policy's.
    pub explicit_denials: u64,
    /// Every other recorded denial.
    pub other_denials: u64,
    /// The calls as the perimeter rule reads them: what the verdicts above are derived from,
    /// kept so that they can be derived again under another perimeter.
    pub contexts: BTreeMap<RequestContext, ContextSeen>,
}

/// Everything [`Perimeter::classify`] reads from a call of one of our IAM users, besides who
/// made it. Absent fields are empty strings, which the classifier treats as absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestContext {
    /// `eventSource`, the service called.
    pub event_source: String,
    /// `eventName`, the API operation.
    pub event_name: String,
    /// `eventType` (`AwsApiCall`, `AwsServiceEvent`, ...).
    pub event_type: String,
    /// The caller's account (`userIdentity.accountId`, else `recipientAccountId`).
    pub account: String,
    /// `sourceIPAddress`: an address or a service name.
    pub source_ip: String,
    /// `vpcEndpointId`, when the call came through one.
    pub endpoint: String,
    /// `vpcEndpointAccountId`: who owns that endpoint.
    pub endpoint_account: String,
    /// `userIdentity.invokedBy`: the service that called for the user.
    pub invoked_by: String,
    /// S3's `additionalEventData.AuthenticationMethod` (presigned URLs).
    pub s3_auth_method: String,
}

impl RequestContext {
    /// The fields in declaration order: the order the store's columns follow.
    pub fn columns(&self) -> [&str; 9] {
        [
            &self.event_source,
            &self.event_name,
            &self.event_type,
            &self.account,
            &self.source_ip,
            &self.endpoint,
            &self.endpoint_account,
            &self.invoked_by,
            &self.s3_auth_method,
        ]
    }

    /// The context of `record`, the fields the classifier reads.
    pub fn of(record: &Record) -> RequestContext {
        let text = |field: Option<&str>| field.unwrap_or_default().to_string();
        let identity = record.user_identity.as_ref();
        RequestContext {
            event_source: text(record.event_source.as_deref()),
            event_name: text(record.event_name.as_deref()),
            event_type: text(record.event_type.as_deref()),
            account: text(identity.and_then(|i| i.account_id.as_deref()).or(record.recipient_account_id.as_deref())),
            source_ip: text(record.source_ip_address.as_deref()),
            endpoint: text(record.vpc_endpoint_id.as_deref()),
            endpoint_account: text(record.vpc_endpoint_account_id.as_deref()),
            invoked_by: text(identity.and_then(|i| i.invoked_by.as_deref())),
            s3_auth_method: text(record.s3_auth_method.as_deref()),
        }
    }

    /// The record of an IAM user's call with this context: what the classifier is given, at
    /// first reading and at every re-judgement alike.
    pub fn record(&self, user: &str, arn: Option<&str>) -> Record {
        let field = |text: &str| (!text.is_empty()).then(|| text.to_string());
        Record {
            event_source: field(&self.event_source),
            event_name: field(&self.event_name),
            event_type: field(&self.event_type),
            recipient_account_id: field(&self.account),
            source_ip_address: field(&self.source_ip),
            vpc_endpoint_id: field(&self.endpoint),
            vpc_endpoint_account_id: field(&self.endpoint_account),
            s3_auth_method: field(&self.s3_auth_method),
            user_identity: Some(UserIdentity {
                kind: Some("IAMUser".to_string()),
                user_name: Some(user.to_string()),
                arn: arn.map(str::to_string),
                account_id: field(&self.account),
                invoked_by: field(&self.invoked_by),
                ..UserIdentity::default()
            }),
            ..Record::default()
        }
    }
}

/// How many calls had one context in an hour, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextSeen {
    /// Calls with the context in the hour.
    pub calls: u64,
    /// The earliest of them.
    pub first: DateTime<Utc>,
    /// The latest of them.
    pub last: DateTime<Utc>,
}

impl ContextSeen {
    fn merge(&mut self, other: &ContextSeen) {
        self.calls += other.calls;
        self.first = self.first.min(other.first);
        self.last = self.last.max(other.last);
    }
}

impl UserHour {
    fn merge(&mut self, other: &UserHour) {
        self.arn = self.arn.clone().max(other.arn.clone());
        self.first_call = earliest(self.first_call, other.first_call);
        self.last_call = self.last_call.max(other.last_call);
        for (verdict, calls) in &other.verdicts {
            *self.verdicts.entry(*verdict).or_default() += calls;
        }
        for (source, theirs) in &other.outside {
            self.outside.entry(source.clone()).and_modify(|seen| seen.merge(theirs)).or_insert_with(|| theirs.clone());
        }
        self.explicit_denials += other.explicit_denials;
        self.other_denials += other.other_denials;
        for (context, seen) in &other.contexts {
            self.contexts.entry(context.clone()).and_modify(|mine| mine.merge(seen)).or_insert(*seen);
        }
    }
}

fn earliest(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Calls from one outside source.
#[derive(Debug, Clone, PartialEq)]
pub struct OutsideSeen {
    /// Calls from the source in the hour.
    pub calls: u64,
    /// The latest of them.
    pub last_seen: DateTime<Utc>,
    /// The action of the latest call.
    pub last_action: String,
    /// Why the policy would deny the latest call.
    pub reason: DenyReason,
}

impl OutsideSeen {
    /// The latest call wins; ties by the greater action and reason, so that merging (here and in
    /// the store) does not depend on order.
    fn is_after(&self, other: &OutsideSeen) -> bool {
        (self.last_seen, self.last_action.as_str(), self.reason.as_str())
            > (other.last_seen, other.last_action.as_str(), other.reason.as_str())
    }

    fn merge(&mut self, other: &OutsideSeen) {
        self.calls += other.calls;
        if other.is_after(self) {
            self.last_seen = other.last_seen;
            self.last_action.clone_from(&other.last_action);
            self.reason = other.reason;
        }
    }
}

/// Aggregates `groups` in one go.
pub fn aggregate<'a>(groups: impl IntoIterator<Item = &'a CallGroup>, judge: &Judge) -> Aggregates {
    let mut aggregates = Aggregates::default();
    for group in groups {
        aggregates.add(group, judge);
    }
    aggregates
}

/// The start of the hour `at` falls in.
pub fn hour_of(at: DateTime<Utc>) -> DateTime<Utc> {
    at.duration_trunc(TimeDelta::hours(1)).unwrap_or(at)
}

impl Aggregates {
    /// Adds one group, counted in the hour of its first call.
    pub fn add(&mut self, group: &CallGroup, judge: &Judge) {
        let record = &group.record;
        // Role sessions, other accounts and records without an identity say nothing about our
        // IAM users, under any perimeter of this account.
        if matches!(
            judge.perimeter.classify(record, &HashSet::new()),
            Verdict::NotApplicable(SkipReason::NoUserIdentity | SkipReason::NotIamUser | SkipReason::OtherAccount)
        ) {
            return;
        }
        let Some(user) = record.user_name().filter(|u| !u.is_empty()) else {
            return;
        };
        // Judged as stored (each distinct context once), so that a re-judgement under the same
        // perimeter gives the same verdict.
        let context = RequestContext::of(record);
        if !self.judged.contains_key(&context) {
            self.judged.insert(context.clone(), judge.judge_context(&context));
        }
        let seen = ContextSeen { calls: group.calls, first: group.first, last: group.last };
        let Some(hour) = self.add_judged(user, hour_of(group.first), record.user_arn(), &context, &seen) else {
            return;
        };
        hour.contexts.entry(context).and_modify(|mine| mine.merge(&seen)).or_insert(seen);
        match record.denial(&judge.lockdown_policy) {
            Some(Denial::ExplicitIdentityDeny) => hour.explicit_denials += group.calls,
            Some(Denial::Other) => hour.other_denials += group.calls,
            None => {}
        }
    }

    /// Adds the verdict of `context` (judged already, seen `seen.calls` times) to `user`'s `hour`.
    fn add_judged(
        &mut self,
        user: &str,
        hour: DateTime<Utc>,
        arn: Option<&str>,
        context: &RequestContext,
        seen: &ContextSeen,
    ) -> Option<&mut UserHour> {
        let judged = self.judged.get(context)?;
        let verdict = judged.verdict;
        // Most records add to an existing user: look up by &str before allocating a key.
        if !self.users.contains_key(user) {
            self.users.insert(user.to_string(), BTreeMap::new());
        }
        let hour = self.users.get_mut(user)?.entry(hour).or_default();
        // Like every merge here, independent of input order: a renamed user keeps one ARN.
        if arn > hour.arn.as_deref() {
            hour.arn = arn.map(str::to_string);
        }
        *hour.verdicts.entry(verdict).or_default() += seen.calls;
        if !matches!(verdict, Verdict::NotApplicable(_)) {
            hour.first_call = earliest(hour.first_call, Some(seen.first));
            hour.last_call = hour.last_call.max(Some(seen.last));
        }
        if let (Verdict::WouldDeny(reason), Some(source)) = (verdict, &judged.outside_source) {
            let call =
                OutsideSeen { calls: seen.calls, last_seen: seen.last, last_action: judged.action.clone(), reason };
            match hour.outside.get_mut(source) {
                Some(known) => known.merge(&call),
                None => {
                    hour.outside.insert(source.clone(), call);
                }
            }
        }
        Some(hour)
    }

    /// Adds `other` in, as if its calls had been added here: the result does not depend on the
    /// order aggregates are merged in.
    pub fn merge(&mut self, other: &Aggregates) {
        for (context, judged) in &other.judged {
            if !self.judged.contains_key(context) {
                self.judged.insert(context.clone(), judged.clone());
            }
        }
        for (user, hours) in &other.users {
            if !self.users.contains_key(user) {
                self.users.insert(user.clone(), hours.clone());
                continue;
            }
            let Some(mine) = self.users.get_mut(user) else { continue };
            for (hour, theirs) in hours {
                mine.entry(*hour).and_modify(|agg| agg.merge(theirs)).or_insert_with(|| theirs.clone());
            }
        }
    }

    /// Every (user, hour) in user and hour order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, DateTime<Utc>, &UserHour)> {
        self.users.iter().flat_map(|(user, hours)| hours.iter().map(move |(hour, agg)| (user.as_str(), *hour, agg)))
    }

    /// The judgement of a request context of these calls (each was judged when added).
    pub fn judgement(&self, context: &RequestContext) -> Option<&JudgedContext> {
        self.judged.get(context)
    }

    /// Whether no user had an applicable call.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The latest hour with any call.
    pub(crate) fn newest_hour(&self) -> Option<DateTime<Utc>> {
        self.users.values().filter_map(|hours| hours.keys().next_back()).max().copied()
    }

    /// Keeps only the hours `keep` accepts.
    pub(crate) fn retain_hours(&mut self, keep: impl Fn(DateTime<Utc>) -> bool) {
        for hours in self.users.values_mut() {
            hours.retain(|hour, _| keep(*hour));
        }
        self.users.retain(|_, hours| !hours.is_empty());
    }
}

/// What a denied call came from, as an operator would name it: the endpoint ID, the service, or
/// the address as recorded.
fn outside_source(record: &Record, reason: DenyReason) -> String {
    let invoked_by = record.user_identity.as_ref().and_then(|u| u.invoked_by.as_deref()).filter(|s| !s.is_empty());
    let source = match reason {
        DenyReason::UntrustedEndpoint => record.vpc_endpoint_id.as_deref(),
        DenyReason::UntrustedService => invoked_by.or(record.source_ip_address.as_deref()),
        DenyReason::UntrustedIp | DenyReason::UnrecognizedSource => record.source_ip_address.as_deref(),
        DenyReason::NoSource => None,
    };
    source.map(str::trim).filter(|s| !s.is_empty()).unwrap_or("(no source)").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perimeter::AllowReason;
    use crate::testkit;

    fn judge() -> Judge {
        Judge {
            perimeter: Perimeter {
                trusted_vpcs: vec!["vpc-0a1b2c3d".into()],
                trusted_endpoints: BTreeMap::from([("vpce-0123456789abcdef0".into(), "vpc-0a1b2c3d".into())]),
                // Set, so that a non-empty exempt set would change verdicts: it must not be used.
                exempt_tag_key: Some("lockstep-exempt".into()),
                not_actions: vec!["es:ES*".into()],
                ..testkit::perimeter()
            },
            lockdown_policy: "lockstep".into(),
        }
    }

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    use crate::testkit::user_call as call;

    fn with(mut g: CallGroup, f: impl FnOnce(&mut Record)) -> CallGroup {
        f(&mut g.record);
        g
    }

    fn hour<'a>(a: &'a Aggregates, user: &str, h: &str) -> &'a UserHour {
        a.iter()
            .find(|(u, t, _)| *u == user && *t == at(h))
            .map(|(_, _, agg)| agg)
            .unwrap_or_else(|| panic!("no {user} at {h} in {a:#?}"))
    }

    #[test]
    fn calls_are_split_by_user_and_hour_with_verdicts() {
        let groups = [
            call("alice", "2024-01-02T10:05:00Z", "203.0.113.5", "ec2:DescribeInstances"),
            call("alice", "2024-01-02T10:59:59Z", "203.0.113.6", "s3:ListBuckets"),
            call("alice", "2024-01-02T11:00:00Z", "198.51.100.7", "s3:ListBuckets"),
            call("bob", "2024-01-02T10:30:00Z", "198.51.100.7", "es:ESHttpGet"),
        ];
        let a = aggregate(&groups, &judge());
        assert_eq!(a.iter().count(), 3);
        let ten = hour(&a, "alice", "2024-01-02T10:00:00Z");
        assert_eq!(ten.verdicts, BTreeMap::from([(Verdict::Allowed(AllowReason::TrustedCidr), 2)]));
        assert_eq!(ten.first_call, Some(at("2024-01-02T10:05:00Z")));
        assert_eq!(ten.last_call, Some(at("2024-01-02T10:59:59Z")));
        assert!(ten.outside.is_empty());
        assert_eq!(ten.arn.as_deref(), Some("arn:aws:iam::123456789012:user/alice"));
        let eleven = hour(&a, "alice", "2024-01-02T11:00:00Z");
        assert_eq!(eleven.verdicts, BTreeMap::from([(Verdict::WouldDeny(DenyReason::UntrustedIp), 1)]));
        assert_eq!(eleven.outside["198.51.100.7"].last_action, "s3:ListBuckets");
        let bob = hour(&a, "bob", "2024-01-02T10:00:00Z");
        assert_eq!(bob.verdicts, BTreeMap::from([(Verdict::Allowed(AllowReason::NotAction), 1)]));
        assert_eq!(a.newest_hour(), Some(at("2024-01-02T11:00:00Z")));
    }

    #[test]
    fn exemption_is_not_applied() {
        // Even a user that carries the exempt tag is recorded with the verdict of their network.
        let a = aggregate(&[call("break-glass", "2024-01-02T10:00:00Z", "198.51.100.7", "iam:ListUsers")], &judge());
        let h = hour(&a, "break-glass", "2024-01-02T10:00:00Z");
        assert_eq!(h.verdicts.keys().next(), Some(&Verdict::WouldDeny(DenyReason::UntrustedIp)));
    }

    #[test]
    fn outside_sources_are_named_counted_and_keep_the_latest_call() {
        let endpoint = |time: &str, id: &str| {
            with(call("carol", time, "10.0.0.9", "s3:ListBuckets"), |r| r.vpc_endpoint_id = Some(id.into()))
        };
        let groups = [
            endpoint("2024-01-02T10:10:00Z", "vpce-0aaaaaaaaaaaaaaaa"),
            with(endpoint("2024-01-02T10:40:00Z", "vpce-0aaaaaaaaaaaaaaaa"), |r| {
                r.event_name = Some("GetBucketAcl".into())
            }),
            endpoint("2024-01-02T10:20:00Z", "vpce-0aaaaaaaaaaaaaaaa"),
            call("carol", "2024-01-02T10:30:00Z", "035.249.253.232", "s3:ListBuckets"),
            with(call("carol", "2024-01-02T10:31:00Z", "", "s3:ListBuckets"), |r| r.source_ip_address = None),
            endpoint("2024-01-02T10:50:00Z", "vpce-0123456789abcdef0"),
        ];
        let a = aggregate(&groups, &judge());
        let h = hour(&a, "carol", "2024-01-02T10:00:00Z");
        let seen = &h.outside["vpce-0aaaaaaaaaaaaaaaa"];
        assert_eq!(seen.calls, 3);
        assert_eq!(seen.last_seen, at("2024-01-02T10:40:00Z"));
        assert_eq!(seen.last_action, "s3:GetBucketAcl");
        assert_eq!(seen.reason, DenyReason::UntrustedEndpoint);
        assert_eq!(h.outside["035.249.253.232"].reason, DenyReason::UnrecognizedSource);
        assert_eq!(h.outside["(no source)"].reason, DenyReason::NoSource);
        assert_eq!(h.outside.len(), 3, "the trusted endpoint is not outside: {:?}", h.outside);
        assert_eq!(h.verdicts[&Verdict::Allowed(AllowReason::TrustedEndpoint)], 1);
    }

    #[test]
    fn denials_are_split_and_throttling_is_not_one() {
        let denied = |message: &str| {
            with(call("dave", "2024-01-02T10:00:00Z", "203.0.113.5", "s3:GetObject"), |r| {
                r.error_code = Some("AccessDenied".into());
                r.error_message = Some(message.into());
            })
        };
        let groups = [
            denied(
                "User: x is not authorized to perform: s3:GetObject because no identity-based policy allows the s3:GetObject action",
            ),
            denied(
                "User: x is not authorized to perform: s3:GetObject with an explicit deny in an identity-based policy: arn:aws:iam::123456789012:policy/lockstep",
            ),
            with(call("dave", "2024-01-02T10:00:00Z", "203.0.113.5", "s3:GetObject"), |r| {
                r.error_code = Some("ThrottlingException".into())
            }),
        ];
        let a = aggregate(&groups, &judge());
        let h = hour(&a, "dave", "2024-01-02T10:00:00Z");
        assert_eq!((h.explicit_denials, h.other_denials), (1, 1));
        assert_eq!(h.verdicts.values().sum::<u64>(), 3);
    }

    #[test]
    fn groups_count_their_calls_and_span() {
        let mut g = call("erin", "2024-01-02T10:00:00Z", "198.51.100.7", "s3:ListBuckets");
        g.calls = 40;
        g.last = at("2024-01-02T10:45:00Z");
        let a = aggregate(&[g], &judge());
        let h = hour(&a, "erin", "2024-01-02T10:00:00Z");
        assert_eq!(h.verdicts.values().sum::<u64>(), 40);
        assert_eq!(h.outside["198.51.100.7"].calls, 40);
        assert_eq!(h.last_call, Some(at("2024-01-02T10:45:00Z")));
    }

    #[test]
    fn records_that_are_not_about_our_iam_users_are_dropped() {
        let groups = [
            with(call("role", "2024-01-02T10:00:00Z", "198.51.100.7", "s3:ListBuckets"), |r| {
                r.user_identity.as_mut().unwrap().kind = Some("AssumedRole".into())
            }),
            with(call("other", "2024-01-02T10:00:00Z", "198.51.100.7", "s3:ListBuckets"), |r| {
                r.user_identity.as_mut().unwrap().account_id = Some("999999999999".into())
            }),
            with(call("x", "2024-01-02T10:00:00Z", "198.51.100.7", "s3:ListBuckets"), |r| r.user_identity = None),
        ];
        assert!(aggregate(&groups, &judge()).is_empty());
        // An IAM user's not-applicable calls are kept as verdicts but are not "calls".
        let sts =
            aggregate(&[call("frank", "2024-01-02T10:00:00Z", "198.51.100.7", "sts:GetCallerIdentity")], &judge());
        let h = hour(&sts, "frank", "2024-01-02T10:00:00Z");
        assert_eq!(h.verdicts.keys().next(), Some(&Verdict::NotApplicable(SkipReason::NeverDenied)));
        assert_eq!(h.first_call, None);
    }

    #[test]
    fn merging_in_any_split_or_order_equals_aggregating_everything() {
        let groups: Vec<CallGroup> = (0..40)
            .map(|i| {
                let user = ["ann", "ben", "cat"][i % 3];
                let time = format!("2024-01-02T{:02}:{:02}:00Z", 10 + i % 3, (i * 7) % 60);
                let source = ["203.0.113.5", "198.51.100.7", "198.51.100.8"][i % 4 % 3];
                let action = ["s3:ListBuckets", "ec2:DescribeInstances"][i % 2];
                call(user, &time, source, action)
            })
            .collect();
        let whole = aggregate(&groups, &judge());
        for split in [1, 7, 20, 39] {
            let (a, b) = groups.split_at(split);
            let (a, b) = (aggregate(a, &judge()), aggregate(b, &judge()));
            let mut ab = a.clone();
            ab.merge(&b);
            let mut ba = b.clone();
            ba.merge(&a);
            assert_eq!(ab, whole, "split at {split}");
            assert_eq!(ba, whole, "split at {split}, merged the other way");
        }
    }

    #[test]
    fn retention_drops_old_hours_and_empty_users() {
        let groups = [
            call("gina", "2024-01-02T08:00:00Z", "203.0.113.5", "s3:ListBuckets"),
            call("gina", "2024-01-02T10:00:00Z", "203.0.113.5", "s3:ListBuckets"),
            call("hank", "2024-01-02T08:00:00Z", "203.0.113.5", "s3:ListBuckets"),
        ];
        let mut a = aggregate(&groups, &judge());
        a.retain_hours(|h| h >= at("2024-01-02T09:00:00Z"));
        let left: Vec<_> = a.iter().map(|(u, h, _)| (u.to_string(), h)).collect();
        assert_eq!(left, vec![("gina".to_string(), at("2024-01-02T10:00:00Z"))]);
    }
}
