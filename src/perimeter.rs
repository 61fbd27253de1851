//! The perimeter rule, in one place: it renders the IAM Deny policy attached to the lockdown
//! group, and it classifies every recorded CloudTrail call as "would that policy allow or deny
//! it?". The two must never disagree; `tests/agreement.rs` evaluates the rendered JSON against
//! each record's request context and compares it with [`Perimeter::classify`].
//!
//! How a record maps onto IAM's request context (the modelling assumptions both sides share):
//! - a call through a VPC endpoint has `aws:SourceVpc` = the endpoint's VPC from configuration
//!   (CloudTrail records only the endpoint ID) and no `aws:SourceIp`; an endpoint that is not
//!   listed, or that belongs to another account, is in some VPC we do not trust;
//! - a call made by an AWS service for the user (`invokedBy`, a service DNS name or `AWS Internal`
//!   as the source) has `aws:ViaAWSService` = true, `aws:CalledVia` = that service, and no
//!   network keys;
//! - any other call has `aws:SourceIp` = `sourceIPAddress` when that is a valid address.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::trail::Record;

/// IAM's limit for a managed policy document, counted without whitespace.
pub(crate) const MANAGED_POLICY_LIMIT: usize = 6_144;

/// Actions that no IAM policy can deny (AWS documents that a Deny on them has no effect).
const NEVER_DENIED: &[&str] = &["sts:GetCallerIdentity"];

/// The trusted network: the account, its VPCs, endpoints and CIDRs, and the actions the Deny covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Perimeter {
    /// The account whose IAM users the policy applies to.
    pub account_id: String,
    /// VPCs whose traffic is trusted (`aws:SourceVpc`).
    pub trusted_vpcs: Vec<String>,
    /// Endpoint ID -> the VPC it lives in.
    pub trusted_endpoints: BTreeMap<String, String>,
    /// Public egress ranges trusted (`aws:SourceIp`).
    pub trusted_cidrs: Vec<IpNet>,
    /// Let AWS services act for the user (`aws:ViaAWSService`).
    pub allow_aws_service_calls: bool,
    /// Services always allowed to call onward for the user (`aws:CalledVia`).
    pub called_via_services: Vec<String>,
    /// Presigned S3 GET URLs are allowed from anywhere.
    pub allow_presigned_s3_reads: bool,
    /// Users tagged `<key>=true` are exempt from the Deny.
    pub exempt_tag_key: Option<String>,
    /// Actions the Deny never covers (services without network condition keys).
    pub not_actions: Vec<String>,
}

/// One account's own trusted VPCs and endpoints (`accounts.perimeter.<id>`), trusted for that
/// account alone on top of the shared perimeter; CIDRs and every other setting stay shared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Additions {
    /// VPCs trusted for this account only.
    pub trusted_vpcs: Vec<String>,
    /// Endpoint ID -> its VPC (one of the shared or this account's VPCs), for this account only.
    pub trusted_endpoints: BTreeMap<String, String>,
}

/// What the perimeter policy would do to one CloudTrail record, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "verdict", content = "reason", rename_all = "snake_case")]
pub enum Verdict {
    /// The policy would allow the call.
    Allowed(AllowReason),
    /// The policy would deny the call.
    WouldDeny(DenyReason),
    /// The policy does not apply to the record.
    NotApplicable(SkipReason),
}

named_enum!(
    /// Why the perimeter policy would allow a call.
    AllowReason {
        /// The action is one the Deny does not cover (`not_actions`).
        NotAction = "not_action",
        /// The user carries the exemption tag.
        Exempt = "exempt",
        /// An AWS service made the call for the user and service calls are allowed.
        ViaAwsService = "via_aws_service",
        /// A `called_via` service made the call for the user.
        CalledVia = "called_via",
        /// A presigned S3 read, allowed from anywhere.
        PresignedRead = "presigned_read",
        /// Through a trusted VPC endpoint of the account.
        TrustedEndpoint = "trusted_endpoint",
        /// From an address in a trusted CIDR.
        TrustedCidr = "trusted_cidr",
    }
);

named_enum!(
    /// Why the perimeter policy would deny a call.
    DenyReason {
        /// A public address outside every trusted CIDR.
        UntrustedIp = "untrusted_ip",
        /// A VPC endpoint that is not listed (for example AWS-owned) or belongs to another account.
        UntrustedEndpoint = "untrusted_endpoint",
        /// A service acted for the user, but service calls are not allowed and it is not a
        /// `called_via` service.
        UntrustedService = "untrusted_service",
        /// `sourceIPAddress` is neither an address nor a service name, so nothing proves the call
        /// came from a trusted network.
        UnrecognizedSource = "unrecognized_source",
        /// No source address recorded at all.
        NoSource = "no_source",
    }
);

named_enum!(
    /// Why the perimeter policy does not apply to a record at all.
    SkipReason {
        /// The record names no caller.
        NoUserIdentity = "no_user_identity",
        /// A role session, the root user, an AWS service: the group policy does not apply.
        NotIamUser = "not_iam_user",
        /// A user of another account.
        OtherAccount = "other_account",
        /// Service events, console sign-ins, network-activity events: not API calls by the user.
        NotApiCall = "not_api_call",
        /// The record names no action.
        NoAction = "no_action",
        /// Actions IAM never denies.
        NeverDenied = "never_denied",
    }
);

impl Verdict {
    /// The reason's stable name (for storage and reports).
    pub fn reason_name(&self) -> &'static str {
        match self {
            Verdict::Allowed(r) => r.as_str(),
            Verdict::WouldDeny(r) => r.as_str(),
            Verdict::NotApplicable(r) => r.as_str(),
        }
    }

    /// The verdict's stable name: `allowed`, `would_deny` or `not_applicable`.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Verdict::Allowed(_) => "allowed",
            Verdict::WouldDeny(_) => "would_deny",
            Verdict::NotApplicable(_) => "not_applicable",
        }
    }
}

/// A stable hash of a perimeter's canonical form: verdicts stored with one can be trusted only
/// while the configured perimeter has the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Fingerprint(pub u64);

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl From<Fingerprint> for String {
    fn from(fingerprint: Fingerprint) -> String {
        fingerprint.to_string()
    }
}

impl TryFrom<String> for Fingerprint {
    type Error = String;

    fn try_from(text: String) -> Result<Fingerprint, String> {
        u64::from_str_radix(&text, 16).map(Fingerprint).map_err(|e| format!("perimeter fingerprint {text:?}: {e}"))
    }
}

/// Where the call came from, as the policy's condition keys see it.
enum Origin<'a> {
    Endpoint { id: &'a str, account: Option<&'a str> },
    Service(&'a str),
    Address(IpAddr),
    Unrecognized,
    Missing,
}

fn origin(record: &Record) -> Origin<'_> {
    if let Some(id) = record.vpc_endpoint_id.as_deref().filter(|id| !id.is_empty()) {
        return Origin::Endpoint { id, account: record.vpc_endpoint_account_id.as_deref().filter(|a| !a.is_empty()) };
    }
    let invoked_by = record.user_identity.as_ref().and_then(|u| u.invoked_by.as_deref());
    if let Some(service) = invoked_by.filter(|s| !s.is_empty()) {
        return Origin::Service(service);
    }
    match record.source_ip_address.as_deref() {
        None | Some("") => Origin::Missing,
        Some(source) => match source.parse::<IpAddr>() {
            Ok(ip) => Origin::Address(ip),
            Err(_) if source == "AWS Internal" || source.ends_with(".amazonaws.com") => Origin::Service(source),
            Err(_) => Origin::Unrecognized,
        },
    }
}

impl Perimeter {
    /// The perimeter of one account: this shared one, for `account_id`, with that account's
    /// additions merged in. Both the account's policy and its classifier are this one value, so
    /// they cannot disagree about which VPCs and endpoints the account trusts.
    pub fn for_account(&self, account_id: &str, additions: &Additions) -> Perimeter {
        let mut merged = self.clone();
        merged.account_id = account_id.to_string();
        for vpc in &additions.trusted_vpcs {
            if !merged.trusted_vpcs.contains(vpc) {
                merged.trusted_vpcs.push(vpc.clone());
            }
        }
        merged.trusted_endpoints.extend(additions.trusted_endpoints.iter().map(|(e, v)| (e.clone(), v.clone())));
        merged
    }

    /// Would the rendered policy deny this recorded call? `exempt` answers whether a user name
    /// carries the exemption tag (CloudTrail records do not carry tags).
    pub fn classify(&self, record: &Record, exempt: &HashSet<String>) -> Verdict {
        use Verdict::*;
        let Some(identity) = record.user_identity.as_ref() else {
            return NotApplicable(SkipReason::NoUserIdentity);
        };
        if identity.kind.as_deref() != Some("IAMUser") {
            return NotApplicable(SkipReason::NotIamUser);
        }
        let account = identity.account_id.as_deref().or(record.recipient_account_id.as_deref());
        if account != Some(self.account_id.as_str()) {
            return NotApplicable(SkipReason::OtherAccount);
        }
        if matches!(record.event_type.as_deref(), Some("AwsServiceEvent" | "AwsConsoleSignIn" | "AwsVpceEvent")) {
            return NotApplicable(SkipReason::NotApiCall);
        }
        let Some(action) = record.action() else {
            return NotApplicable(SkipReason::NoAction);
        };
        if NEVER_DENIED.iter().any(|a| a.eq_ignore_ascii_case(&action)) {
            return NotApplicable(SkipReason::NeverDenied);
        }
        if self.not_actions.iter().any(|pattern| action_matches(pattern, &action)) {
            return Allowed(AllowReason::NotAction);
        }
        if self.exempt_tag_key.is_some() && identity.user_name.as_ref().is_some_and(|u| exempt.contains(u)) {
            return Allowed(AllowReason::Exempt);
        }
        let origin = origin(record);
        if let Origin::Service(service) = origin {
            if self.allow_aws_service_calls {
                return Allowed(AllowReason::ViaAwsService);
            }
            if self.called_via_services.iter().any(|s| s == service) {
                return Allowed(AllowReason::CalledVia);
            }
        }
        if self.allow_presigned_s3_reads
            && action.eq_ignore_ascii_case("s3:GetObject")
            && record.s3_auth_method.as_deref() == Some("QueryString")
        {
            return Allowed(AllowReason::PresignedRead);
        }
        match origin {
            Origin::Endpoint { id, account } => {
                let ours = account.is_none_or(|a| a == self.account_id);
                let vpc = self.trusted_endpoints.get(id);
                if ours && vpc.is_some_and(|vpc| self.trusted_vpcs.contains(vpc)) {
                    Allowed(AllowReason::TrustedEndpoint)
                } else {
                    WouldDeny(DenyReason::UntrustedEndpoint)
                }
            }
            Origin::Address(ip) if self.trusted_cidrs.iter().any(|net| net.contains(&ip)) => {
                Allowed(AllowReason::TrustedCidr)
            }
            Origin::Address(_) => WouldDeny(DenyReason::UntrustedIp),
            Origin::Service(_) => WouldDeny(DenyReason::UntrustedService),
            Origin::Unrecognized => WouldDeny(DenyReason::UnrecognizedSource),
            Origin::Missing => WouldDeny(DenyReason::NoSource),
        }
    }

    /// The fingerprint of everything [`Perimeter::classify`] reads: lists sorted and
    /// de-duplicated (their order means nothing), hashed with FNV-1a, which unlike std's hasher
    /// is the same in every build.
    pub fn fingerprint(&self) -> Fingerprint {
        fn sorted<T: ToString>(items: &[T]) -> Vec<String> {
            let mut items: Vec<String> = items.iter().map(ToString::to_string).collect();
            items.sort();
            items.dedup();
            items
        }
        let canonical = serde_json::json!({
            "account_id": self.account_id,
            "trusted_vpcs": sorted(&self.trusted_vpcs),
            "trusted_endpoints": self.trusted_endpoints,
            "trusted_cidrs": sorted(&self.trusted_cidrs),
            "allow_aws_service_calls": self.allow_aws_service_calls,
            "called_via_services": sorted(&self.called_via_services),
            "allow_presigned_s3_reads": self.allow_presigned_s3_reads,
            "exempt_tag_key": self.exempt_tag_key,
            "not_actions": sorted(&self.not_actions),
        });
        let hash = canonical
            .to_string()
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3));
        Fingerprint(hash)
    }

    /// The IAM policy document for the lockdown group.
    pub fn policy(&self) -> PolicyDocument {
        let mut network = BTreeMap::new();
        if self.allow_aws_service_calls {
            network.insert("BoolIfExists", condition("aws:ViaAWSService", ["false".to_string()]));
        }
        if !self.called_via_services.is_empty() {
            network.insert(
                "ForAllValues:StringNotEquals",
                condition("aws:CalledVia", self.called_via_services.iter().cloned()),
            );
        }
        if !self.trusted_cidrs.is_empty() {
            network.insert(
                "NotIpAddressIfExists",
                condition("aws:SourceIp", self.trusted_cidrs.iter().map(|n| n.to_string())),
            );
        }
        if !self.trusted_vpcs.is_empty() {
            network.insert("StringNotEqualsIfExists", condition("aws:SourceVpc", self.trusted_vpcs.iter().cloned()));
        }
        if let Some(key) = &self.exempt_tag_key {
            network
                .entry("StringNotEqualsIfExists")
                .or_default()
                .insert(format!("aws:PrincipalTag/{key}"), vec!["true".to_string()]);
        }

        let mut not_actions = self.not_actions.clone();
        let mut statements = Vec::new();
        // If a not_action already exempts s3:GetObject, a presigned-read statement would deny
        // reads that the not_action lets through.
        let object_reads_exempt = self.not_actions.iter().any(|p| action_matches(p, "s3:GetObject"));
        if self.allow_presigned_s3_reads && !object_reads_exempt {
            not_actions.push("s3:GetObject".to_string());
            let mut presigned = network.clone();
            presigned
                .entry("StringNotEqualsIfExists")
                .or_default()
                .insert("s3:authType".to_string(), vec!["REST-QUERY-STRING".to_string()]);
            statements.push(Statement {
                sid: "DenyObjectReadsOutsideTrustedNetworksUnlessPresigned",
                effect: "Deny",
                action: Some(vec!["s3:GetObject".to_string()]),
                not_action: None,
                resource: "*",
                condition: presigned,
            });
        }
        not_actions.sort();
        not_actions.dedup();
        statements.insert(
            0,
            Statement {
                sid: "DenyOutsideTrustedNetworks",
                effect: "Deny",
                action: None,
                not_action: Some(not_actions),
                resource: "*",
                condition: network,
            },
        );
        PolicyDocument { version: "2012-10-17", statement: statements }
    }
}

fn condition(key: &str, values: impl IntoIterator<Item = String>) -> BTreeMap<String, Vec<String>> {
    BTreeMap::from([(key.to_string(), values.into_iter().collect())])
}

/// IAM action matching: case-insensitive, `*` any run, `?` one character.
pub fn action_matches(pattern: &str, action: &str) -> bool {
    fn go(p: &[u8], a: &[u8]) -> bool {
        match (p.first(), a.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], a) || (!a.is_empty() && go(p, &a[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &a[1..]),
            (Some(x), Some(y)) if x.eq_ignore_ascii_case(y) => go(&p[1..], &a[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), action.as_bytes())
}

/// The rendered perimeter policy, as IAM reads it.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyDocument {
    #[serde(rename = "Version")]
    /// The policy language version.
    pub version: &'static str,
    #[serde(rename = "Statement")]
    /// The statements, in order.
    pub statement: Vec<Statement>,
}

/// One statement of the perimeter policy.
#[derive(Debug, Clone, Serialize)]
pub struct Statement {
    #[serde(rename = "Sid")]
    /// The statement's ID.
    pub sid: &'static str,
    #[serde(rename = "Effect")]
    /// `Deny` for every perimeter statement.
    pub effect: &'static str,
    #[serde(rename = "Action", skip_serializing_if = "Option::is_none")]
    /// The actions covered, when listed.
    pub action: Option<Vec<String>>,
    #[serde(rename = "NotAction", skip_serializing_if = "Option::is_none")]
    /// The actions not covered, when the statement covers all others.
    pub not_action: Option<Vec<String>>,
    #[serde(rename = "Resource")]
    /// `*`: every resource.
    pub resource: &'static str,
    #[serde(rename = "Condition")]
    /// Operator -> condition key -> values: when the statement applies.
    pub condition: BTreeMap<&'static str, BTreeMap<String, Vec<String>>>,
}

/// The rendered policy is over IAM's size limit for a managed policy.
#[derive(Debug, thiserror::Error)]
#[error(
    "the rendered policy is {size} characters without whitespace, over IAM's {MANAGED_POLICY_LIMIT}-character limit for a managed policy; trust fewer, wider CIDRs or fewer VPCs"
)]
pub struct PolicyTooLarge {
    /// The policy's size in characters, without whitespace.
    pub size: usize,
}

impl PolicyDocument {
    /// Compact JSON as IAM stores it, checked against the managed-policy size limit.
    pub fn to_json(&self) -> Result<String, PolicyTooLarge> {
        let json = serde_json::to_string(self).unwrap_or_default();
        let size = json.chars().filter(|c| !c.is_whitespace()).count();
        if size > MANAGED_POLICY_LIMIT {
            return Err(PolicyTooLarge { size });
        }
        Ok(json)
    }

    /// The policy as indented JSON, refused when its compact form is over IAM's limit.
    pub fn to_pretty_json(&self) -> Result<String, PolicyTooLarge> {
        self.to_json()?;
        Ok(serde_json::to_string_pretty(self).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trail::UserIdentity;

    const ACCOUNT: &str = "123456789012";

    fn perimeter() -> Perimeter {
        Perimeter {
            account_id: ACCOUNT.into(),
            trusted_vpcs: vec!["vpc-0a1b2c3d".into()],
            trusted_endpoints: BTreeMap::from([("vpce-0123456789abcdef0".into(), "vpc-0a1b2c3d".into())]),
            trusted_cidrs: vec!["203.0.113.0/24".parse().unwrap(), "2001:db8:1234::/48".parse().unwrap()],
            allow_aws_service_calls: true,
            called_via_services: vec!["athena.amazonaws.com".into()],
            allow_presigned_s3_reads: true,
            exempt_tag_key: Some("lockstep-exempt".into()),
            not_actions: crate::config::DEFAULT_NOT_ACTIONS.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn call(source_ip: &str) -> Record {
        Record {
            event_source: Some("ec2.amazonaws.com".into()),
            event_name: Some("DescribeInstances".into()),
            event_type: Some("AwsApiCall".into()),
            source_ip_address: Some(source_ip.into()),
            recipient_account_id: Some(ACCOUNT.into()),
            user_identity: Some(UserIdentity {
                kind: Some("IAMUser".into()),
                user_name: Some("alice".into()),
                arn: Some(format!("arn:aws:iam::{ACCOUNT}:user/alice")),
                account_id: Some(ACCOUNT.into()),
                ..UserIdentity::default()
            }),
            ..Record::default()
        }
    }

    fn with(mut r: Record, f: impl FnOnce(&mut Record)) -> Record {
        f(&mut r);
        r
    }

    #[test]
    fn each_account_trusts_its_own_endpoints_and_the_shared_ones_only() {
        const OTHER: &str = "111122223333";
        let shared = perimeter();
        let own = Additions {
            trusted_vpcs: vec!["vpc-11112222".into()],
            trusted_endpoints: BTreeMap::from([("vpce-11112222".into(), "vpc-11112222".into())]),
        };
        let other = shared.for_account(OTHER, &own);
        let main = shared.for_account(ACCOUNT, &Additions::default());
        assert_eq!(main, shared, "no additions: the shared perimeter itself");
        assert_eq!(other.trusted_vpcs, ["vpc-0a1b2c3d", "vpc-11112222"]);
        assert_eq!(other.trusted_cidrs, shared.trusted_cidrs);
        let through = |account: &str, endpoint: &str| {
            with(call("10.0.0.1"), |r| {
                r.recipient_account_id = Some(account.into());
                r.vpc_endpoint_id = Some(endpoint.into());
                if let Some(user) = r.user_identity.as_mut() {
                    user.account_id = Some(account.into());
                }
            })
        };
        let none = HashSet::new();
        let trusted = Verdict::Allowed(AllowReason::TrustedEndpoint);
        let untrusted = Verdict::WouldDeny(DenyReason::UntrustedEndpoint);
        assert_eq!(other.classify(&through(OTHER, "vpce-11112222"), &none), trusted);
        assert_eq!(other.classify(&through(OTHER, "vpce-0123456789abcdef0"), &none), trusted);
        assert_eq!(main.classify(&through(ACCOUNT, "vpce-11112222"), &none), untrusted);
        // The account's policy names its own VPC; the other account's does not.
        let policy = |p: &Perimeter| p.policy().to_json().unwrap();
        assert!(policy(&other).contains("vpc-11112222"));
        assert!(!policy(&main).contains("vpc-11112222"));
    }

    #[test]
    fn fingerprint_ignores_list_order_and_follows_what_classify_reads() {
        let base = perimeter();
        let mut reordered = base.clone();
        reordered.trusted_cidrs.reverse();
        reordered.not_actions.reverse();
        assert_eq!(reordered.fingerprint(), base.fingerprint());
        let mut wider = base.clone();
        wider.trusted_cidrs.push("198.51.100.0/24".parse().unwrap());
        let mut moved = base.clone();
        moved.trusted_endpoints.insert("vpce-0123456789abcdef0".into(), "vpc-other".into());
        let mut no_presigned = base.clone();
        no_presigned.allow_presigned_s3_reads = false;
        for changed in [wider, moved, no_presigned] {
            assert_ne!(changed.fingerprint(), base.fingerprint(), "{changed:?}");
        }
        let text = base.fingerprint().to_string();
        assert_eq!(text.len(), 16);
        assert_eq!(Fingerprint::try_from(text), Ok(base.fingerprint()));
    }

    #[test]
    fn classifier_table() {
        use AllowReason as A;
        use DenyReason as D;
        use SkipReason as S;
        use Verdict::*;
        let exempt: HashSet<String> = HashSet::from(["bob".to_string()]);
        let via_endpoint = |id: &str, account: Option<&str>| {
            with(call("10.1.2.3"), |r| {
                r.vpc_endpoint_id = Some(id.into());
                r.vpc_endpoint_account_id = account.map(Into::into);
            })
        };
        let service = |source: &str, invoked_by: Option<&str>| {
            with(call(source), |r| {
                r.user_identity.as_mut().unwrap().invoked_by = invoked_by.map(Into::into);
            })
        };
        let table: Vec<(&str, Record, Verdict)> = vec![
            ("trusted IPv4", call("203.0.113.77"), Allowed(A::TrustedCidr)),
            ("untrusted IPv4", call("198.51.100.1"), WouldDeny(D::UntrustedIp)),
            ("IPv6 inside", call("2001:db8:1234:5::1"), Allowed(A::TrustedCidr)),
            ("IPv6 outside", call("2001:db8:9999::1"), WouldDeny(D::UntrustedIp)),
            ("trusted endpoint", via_endpoint("vpce-0123456789abcdef0", None), Allowed(A::TrustedEndpoint)),
            (
                "trusted endpoint, our account",
                via_endpoint("vpce-0123456789abcdef0", Some(ACCOUNT)),
                Allowed(A::TrustedEndpoint),
            ),
            (
                "AWS-owned endpoint (S3 console)",
                via_endpoint("vpce-0aaaaaaaaaaaaaaaa", Some("999999999999")),
                WouldDeny(D::UntrustedEndpoint),
            ),
            (
                "listed endpoint id, other account",
                via_endpoint("vpce-0123456789abcdef0", Some("999999999999")),
                WouldDeny(D::UntrustedEndpoint),
            ),
            (
                "endpoint without a trusted mapping",
                via_endpoint("vpce-0bbbbbbbbbbbbbbbb", None),
                WouldDeny(D::UntrustedEndpoint),
            ),
            ("service DNS name as source", service("athena.amazonaws.com", None), Allowed(A::ViaAwsService)),
            ("invokedBy", service("athena.amazonaws.com", Some("athena.amazonaws.com")), Allowed(A::ViaAwsService)),
            ("AWS Internal", service("AWS Internal", None), Allowed(A::ViaAwsService)),
            ("zero-padded junk IP", call("035.249.253.232"), WouldDeny(D::UnrecognizedSource)),
            ("no source at all", with(call(""), |r| r.source_ip_address = None), WouldDeny(D::NoSource)),
            (
                "exempt user",
                with(call("198.51.100.1"), |r| r.user_identity.as_mut().unwrap().user_name = Some("bob".into())),
                Allowed(A::Exempt),
            ),
            (
                "not-action service",
                with(call("198.51.100.1"), |r| {
                    r.event_source = Some("es.amazonaws.com".into());
                    r.event_name = Some("ESHttpGet".into());
                }),
                Allowed(A::NotAction),
            ),
            (
                "presigned read from anywhere",
                with(call("198.51.100.1"), |r| {
                    r.event_source = Some("s3.amazonaws.com".into());
                    r.event_name = Some("GetObject".into());
                    r.s3_auth_method = Some("QueryString".into());
                }),
                Allowed(A::PresignedRead),
            ),
            (
                "header-signed read from outside",
                with(call("198.51.100.1"), |r| {
                    r.event_source = Some("s3.amazonaws.com".into());
                    r.event_name = Some("GetObject".into());
                    r.s3_auth_method = Some("AuthHeader".into());
                }),
                WouldDeny(D::UntrustedIp),
            ),
            (
                "presigned put is not a read",
                with(call("198.51.100.1"), |r| {
                    r.event_source = Some("s3.amazonaws.com".into());
                    r.event_name = Some("PutObject".into());
                    r.s3_auth_method = Some("QueryString".into());
                }),
                WouldDeny(D::UntrustedIp),
            ),
            (
                "console session from outside",
                with(call("198.51.100.1"), |r| {
                    r.user_identity.as_mut().unwrap().access_key_id = Some("ASIAEXAMPLE".into());
                }),
                WouldDeny(D::UntrustedIp),
            ),
            (
                "missing userIdentity",
                with(call("198.51.100.1"), |r| r.user_identity = None),
                NotApplicable(S::NoUserIdentity),
            ),
            (
                "assumed role",
                with(call("198.51.100.1"), |r| r.user_identity.as_mut().unwrap().kind = Some("AssumedRole".into())),
                NotApplicable(S::NotIamUser),
            ),
            (
                "other account",
                with(call("198.51.100.1"), |r| {
                    r.user_identity.as_mut().unwrap().account_id = Some("999999999999".into());
                }),
                NotApplicable(S::OtherAccount),
            ),
            (
                "service event",
                with(call("198.51.100.1"), |r| r.event_type = Some("AwsServiceEvent".into())),
                NotApplicable(S::NotApiCall),
            ),
            (
                "console sign-in",
                with(call("198.51.100.1"), |r| r.event_type = Some("AwsConsoleSignIn".into())),
                NotApplicable(S::NotApiCall),
            ),
            (
                "GetCallerIdentity",
                with(call("198.51.100.1"), |r| {
                    r.event_source = Some("sts.amazonaws.com".into());
                    r.event_name = Some("GetCallerIdentity".into());
                }),
                NotApplicable(S::NeverDenied),
            ),
        ];
        let p = perimeter();
        for (name, record, expected) in table {
            assert_eq!(p.classify(&record, &exempt), expected, "{name}");
        }
    }

    #[test]
    fn service_calls_when_only_called_via_is_trusted() {
        let p = Perimeter { allow_aws_service_calls: false, ..perimeter() };
        let none = HashSet::new();
        let athena = with(call("athena.amazonaws.com"), |r| {
            r.user_identity.as_mut().unwrap().invoked_by = Some("athena.amazonaws.com".into())
        });
        assert_eq!(p.classify(&athena, &none), Verdict::Allowed(AllowReason::CalledVia));
        let cfn = with(call("cloudformation.amazonaws.com"), |r| {
            r.user_identity.as_mut().unwrap().invoked_by = Some("cloudformation.amazonaws.com".into())
        });
        assert_eq!(p.classify(&cfn, &none), Verdict::WouldDeny(DenyReason::UntrustedService));
    }

    #[test]
    fn action_patterns() {
        assert!(action_matches("es:ES*", "es:ESHttpGet"));
        assert!(action_matches("elasticfilesystem:client*", "elasticfilesystem:ClientMount"));
        assert!(action_matches("s3:Get?bject", "S3:GETOBJECT"));
        assert!(!action_matches("dax:*", "dynamodb:GetItem"));
        assert!(!action_matches("rds-db:connect", "rds-db:connectx"));
    }

    #[test]
    fn policy_is_deterministic_and_shaped() {
        let doc = perimeter().policy();
        let json = doc.to_pretty_json().unwrap();
        assert_eq!(json, perimeter().policy().to_pretty_json().unwrap());
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["Version"], "2012-10-17");
        let statements = value["Statement"].as_array().unwrap();
        assert_eq!(statements.len(), 2);
        assert!(statements[0]["NotAction"].as_array().unwrap().contains(&"s3:GetObject".into()));
        assert_eq!(statements[1]["Action"][0], "s3:GetObject");
        assert_eq!(statements[1]["Condition"]["StringNotEqualsIfExists"]["s3:authType"][0], "REST-QUERY-STRING");
        assert_eq!(
            statements[0]["Condition"]["StringNotEqualsIfExists"]["aws:PrincipalTag/lockstep-exempt"][0],
            "true"
        );
    }

    #[test]
    fn no_presigned_statement_when_a_not_action_covers_object_reads() {
        let mut p = perimeter();
        p.not_actions.push("s3:Get*".into());
        let doc = p.policy();
        assert_eq!(doc.statement.len(), 1, "{doc:#?}");
        let outside_read = with(call("198.51.100.1"), |r| {
            r.event_source = Some("s3.amazonaws.com".into());
            r.event_name = Some("GetObject".into());
        });
        assert_eq!(p.classify(&outside_read, &HashSet::new()), Verdict::Allowed(AllowReason::NotAction));
    }

    #[test]
    fn oversized_policy_is_refused() {
        let mut p = perimeter();
        p.trusted_cidrs = (0..400u32)
            .map(|i| IpNet::from(ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(0x0b00_0000 + (i << 8)), 24).unwrap()))
            .collect();
        let err = p.policy().to_json().unwrap_err();
        assert!(err.size > MANAGED_POLICY_LIMIT);
        assert!(err.to_string().contains("6144"));
    }
}
