//! Synthetic CloudTrail: a deterministic generator of realistic trail data for tests, the
//! sandbox and the benchmark.
//!
//! An [`Org`] is a set of IAM users with behaviours (CI bots behind a trusted VPC endpoint,
//! office users on trusted CIDRs, remote workers who sometimes call from home, presigned-URL
//! readers, users working through Athena and CloudFormation, console users whose S3 console calls
//! arrive through AWS-owned endpoints, users of services the policy exempts), plus the noise a
//! real trail has: "no identity-based policy allows" denials, throttling, role sessions, service
//! events and calls from other accounts. [`Org::generate`] produces the records of a time range
//! in virtual time; the same seed and range always give the same records, and generating
//! `[a, b)` then `[b, c)` gives exactly the records of `[a, c)`.
//!
//! [`RecordSpec`] describes one record and doubles as a builder for scripted ones (a user who
//! misbehaves after promotion); [`write_trail`] writes records as gzip `{"Records": [...]}`
//! files in CloudTrail's S3 layout, one file per region and 5-minute delivery window
//! ([`write_org_trail`]: an organisation trail's, each account under the organisation).

#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Datelike, DurationRound, TimeDelta, Timelike, Utc};
use ipnet::IpNet;
use rayon::prelude::*;
use serde_json::{Map, Value, json};

use lockstep::evidence::aggregate::hour_of;
use lockstep::perimeter::{Perimeter, action_matches};

/// How a user calls AWS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Behaviour {
    /// Around the clock, through a trusted VPC endpoint.
    CiBot,
    /// Office hours, from trusted CIDRs.
    Office,
    /// Mostly over the VPN (trusted), sometimes from home or a phone (untrusted IPv4/IPv6).
    Remote,
    /// Office calls, plus presigned S3 reads from anywhere.
    PresignedReader,
    /// Office calls, plus calls Athena and CloudFormation make for them (`invokedBy`).
    ViaService,
    /// The console: session credentials, and S3 console calls through AWS-owned endpoints.
    Console,
    /// Office calls, plus OpenSearch calls from anywhere (an action the policy exempts).
    NotActionUser,
}

/// One synthetic IAM user.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthUser {
    /// The IAM user name.
    pub name: String,
    /// IAM path, e.g. `/engineering/`.
    pub path: String,
    /// The user's ARN in the organisation's account.
    pub arn: String,
    /// IAM tags (an exemption tag for break-glass users).
    pub tags: Vec<(String, String)>,
    /// How the user calls AWS: what their records show.
    pub behaviour: Behaviour,
    /// Calls in a busy hour.
    pub rate: f64,
    /// Share of calls made from outside trusted networks (remote workers; 0 for most).
    pub outside_share: f64,
    /// Where a remote worker calls from outside (stable, so it shows as a top source).
    pub home_ip: String,
    access_key: String,
}

impl SynthUser {
    /// The user as the caller of their records in `account_id`.
    pub fn identity(&self, account_id: &str) -> Identity {
        Identity::IamUser {
            account: account_id.to_string(),
            name: self.name.clone(),
            arn: self.arn.clone(),
            access_key: self.access_key.clone(),
        }
    }
}

/// Who made a call.
#[derive(Debug, Clone, PartialEq)]
pub enum Identity {
    /// An IAM user: what the lockdown applies to.
    IamUser {
        /// The user's account.
        account: String,
        /// The user name.
        name: String,
        /// The user's ARN.
        arn: String,
        /// The access key the calls are signed with.
        access_key: String,
    },
    /// A role session: the group policy does not apply.
    AssumedRole {
        /// The role's account.
        account: String,
        /// The role name.
        role: String,
        /// The session name.
        session: String,
    },
    /// An AWS service acting on its own.
    AwsService {
        /// The service principal (`cloudformation.amazonaws.com`).
        service: String,
    },
}

impl Identity {
    /// IAM user `name` at path `/` in `account`.
    pub fn iam_user(account: &str, name: &str) -> Identity {
        Identity::IamUser {
            account: account.to_string(),
            name: name.to_string(),
            arn: format!("arn:aws:iam::{account}:user/{name}"),
            access_key: key_id("AKIA", fnv(&[account, name])),
        }
    }
}

/// Where a call came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// `sourceIPAddress` as given (junk such as `035.1.2.3` included).
    Ip(String),
    /// Through a VPC endpoint: CloudTrail records the endpoint and the private client address.
    Endpoint {
        /// The endpoint ID.
        id: String,
        /// The endpoint's owner.
        account: String,
        /// The private address the call came from.
        client_ip: String,
    },
    /// Made by a service for the caller (`invokedBy`, and the service as source).
    Service(String),
}

impl Origin {
    /// From the address `address`.
    pub fn ip(address: &str) -> Origin {
        Origin::Ip(address.to_string())
    }

    /// Through VPC endpoint `id` owned by `account`, from a fixed private address.
    pub fn endpoint(id: &str, account: &str) -> Origin {
        Origin::Endpoint { id: id.to_string(), account: account.to_string(), client_ip: "10.0.12.34".to_string() }
    }
}

/// One trail record to write. Build scripted ones with [`RecordSpec::new`] and the modifiers.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordSpec {
    /// The event time.
    pub at: DateTime<Utc>,
    /// Who made the call.
    pub identity: Identity,
    /// IAM action, `s3:GetObject`; event source and name derive from it.
    pub action: String,
    /// `awsRegion`, which also decides the delivery file.
    pub region: String,
    /// Where the call came from.
    pub origin: Origin,
    /// `AwsApiCall`, `AwsConsoleSignIn`, `AwsServiceEvent`.
    pub event_type: String,
    /// `errorCode` and `errorMessage`.
    pub error: Option<(String, String)>,
    /// An S3 request signed in the query string (a presigned URL).
    pub presigned: bool,
    /// Console session credentials.
    pub console: bool,
    /// `userAgent`.
    pub user_agent: String,
    /// Derived from the record's content and position when not set.
    pub event_id: Option<String>,
}

impl RecordSpec {
    /// A successful API call in us-east-1, made with the AWS CLI (or, when a service made it, with
    /// the service as user agent, as CloudTrail records it).
    pub fn new(identity: Identity, at: DateTime<Utc>, action: &str, origin: Origin) -> RecordSpec {
        let user_agent = match &origin {
            Origin::Service(service) => service.clone(),
            _ => CLI_AGENT.to_string(),
        };
        RecordSpec {
            at,
            identity,
            action: action.to_string(),
            region: "us-east-1".to_string(),
            origin,
            event_type: "AwsApiCall".to_string(),
            error: None,
            presigned: false,
            console: false,
            user_agent,
            event_id: None,
        }
    }

    /// Failed with `code` and `message`.
    pub fn error(mut self, code: &str, message: &str) -> RecordSpec {
        self.error = Some((code.to_string(), message.to_string()));
        self
    }

    /// Denied by the named lockdown policy, worded as IAM words it (policy ARN appended).
    pub fn denied_explicitly(self, policy_name: &str) -> RecordSpec {
        let (account, arn) = self.caller();
        let message = format!(
            "User: {arn} is not authorized to perform: {} with an explicit deny in an identity-based policy: arn:aws:iam::{account}:policy/{policy_name}",
            self.action
        );
        let code = denial_code(&self.action);
        self.error(code, &message)
    }

    /// Denied for lack of an Allow: the everyday background denial.
    pub fn denied_no_allow(self) -> RecordSpec {
        let (_, arn) = self.caller();
        let message = format!(
            "User: {arn} is not authorized to perform: {} because no identity-based policy allows the {} action",
            self.action, self.action
        );
        let code = denial_code(&self.action);
        self.error(code, &message)
    }

    /// Throttled: a failure that is not a denial.
    pub fn throttled(self) -> RecordSpec {
        self.error("ThrottlingException", "Rate exceeded")
    }

    /// An S3 request through a presigned URL.
    pub fn presigned(mut self) -> RecordSpec {
        self.presigned = true;
        self
    }

    /// Made from the console, with its session credentials and user agent.
    pub fn console(mut self) -> RecordSpec {
        self.console = true;
        self.user_agent = "AWS Internal".to_string();
        self
    }

    /// With this `eventType` instead of `AwsApiCall`.
    pub fn event_type(mut self, event_type: &str) -> RecordSpec {
        self.event_type = event_type.to_string();
        self
    }

    /// With this `userAgent`.
    pub fn user_agent(mut self, agent: &str) -> RecordSpec {
        self.user_agent = agent.to_string();
        self
    }

    fn caller(&self) -> (&str, String) {
        match &self.identity {
            Identity::IamUser { account, arn, .. } => (account, arn.clone()),
            Identity::AssumedRole { account, role, session } => {
                (account, format!("arn:aws:sts::{account}:assumed-role/{role}/{session}"))
            }
            Identity::AwsService { service } => ("", service.clone()),
        }
    }
}

/// The error code a service answers a denial with.
fn denial_code(action: &str) -> &'static str {
    match action.split(':').next().unwrap_or("") {
        "ec2" => "Client.UnauthorizedOperation",
        "s3" | "iam" | "sts" | "organizations" => "AccessDenied",
        _ => "AccessDeniedException",
    }
}

/// What the generator meant each user's records to show, counted independently of the
/// classifier, so tests can check the evidence pipeline against it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    /// Every record generated, whoever made it.
    pub records: u64,
    /// What each IAM user's records show, by user name.
    pub users: BTreeMap<String, UserTally>,
}

/// What one user's records were meant to show.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserTally {
    /// API calls the lockdown policy applies to (sign-ins and `sts:GetCallerIdentity` are not).
    pub calls: u64,
    /// Those the policy would deny.
    pub outside: u64,
    /// "No identity-based policy allows" denials.
    pub other_denials: u64,
}

impl Tally {
    /// Adds `other`'s counts (the tally of an adjacent time range).
    pub fn merge(&mut self, other: &Tally) {
        self.records += other.records;
        for (user, t) in &other.users {
            let mine = self.users.entry(user.clone()).or_default();
            mine.calls += t.calls;
            mine.outside += t.outside;
            mine.other_denials += t.other_denials;
        }
    }
}

/// Records of a time range, with what they were meant to show.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Generated {
    /// The records, in time order.
    pub records: Vec<RecordSpec>,
    /// What they were meant to show.
    pub tally: Tally,
}

/// The perimeter of the repository's example `rollout.yaml`, for organisations whose users should
/// sit inside and outside the networks the example trusts.
pub fn example_perimeter() -> Result<Perimeter, lockstep::config::ConfigError> {
    let config = lockstep::config::Config::parse(include_str!("../../../rollout.yaml"), Path::new("rollout.yaml"))?;
    Ok(config.perimeter)
}

/// A synthetic organisation (one account) and its users.
#[derive(Debug, Clone)]
pub struct Org {
    seed: u64,
    /// The organisation's account.
    pub account_id: String,
    /// Its IAM users.
    pub users: Vec<SynthUser>,
    perimeter: Perimeter,
    trusted_nets: Vec<IpNet>,
    trusted_endpoints: Vec<String>,
}

const REGIONS: &[&str] = &["us-east-1", "eu-west-1"];
const AWS_OWNED_ENDPOINT: &str = "vpce-0c1a2b3c4d5e6f708";
const AWS_OWNED_ACCOUNT: &str = "999988887777";
const OTHER_ACCOUNT: &str = "210987654321";
/// Address ranges for calls from outside (documentation and benchmarking ranges).
const OUTSIDE_V4: &[(u32, u32)] = &[(0xC000_0200, 8), (0xC612_0000, 17)];
const OUTSIDE_V6_PREFIX: u128 = 0x2001_0db8_ffff_0000_0000_0000_0000_0000;

impl Org {
    /// `users` users drawn from `seed`; `perimeter` says which networks and endpoints are
    /// trusted, so users can be placed inside or outside them.
    pub fn new(seed: u64, users: usize, perimeter: &Perimeter) -> Org {
        let mut org = Org {
            seed,
            account_id: perimeter.account_id.clone(),
            users: Vec::with_capacity(users),
            perimeter: perimeter.clone(),
            trusted_nets: perimeter.trusted_cidrs.clone(),
            trusted_endpoints: perimeter.trusted_endpoints.keys().cloned().collect(),
        };
        let mut rng = Rng::new(mix(&[seed, 0x05e7]));
        let mut taken = std::collections::HashSet::new();
        for index in 0..users {
            let user = org.new_user(index, &mut rng, &mut taken);
            org.users.push(user);
        }
        org
    }

    /// The user named `name`, if the organisation has one.
    pub fn user(&self, name: &str) -> Option<&SynthUser> {
        self.users.iter().find(|u| u.name == name)
    }

    fn new_user(&self, index: usize, rng: &mut Rng, taken: &mut std::collections::HashSet<String>) -> SynthUser {
        use Behaviour::*;
        let behaviour = *rng.weighted(&[
            (Office, 30),
            (Remote, 22),
            (CiBot, 10),
            (PresignedReader, 8),
            (ViaService, 12),
            (Console, 10),
            (NotActionUser, 8),
        ]);
        let base = match behaviour {
            CiBot => format!("ci-{}", rng.pick(&["deploy", "build", "release", "terraform", "backup", "etl", "sync"])),
            _ => format!("{}.{}", rng.pick(FIRST_NAMES), rng.pick(LAST_NAMES)),
        };
        let name = if taken.contains(&base) { format!("{base}{index}") } else { base };
        taken.insert(name.clone());
        let (path, team) = match behaviour {
            CiBot => ("/automation/", "platform"),
            ViaService | NotActionUser | PresignedReader => ("/data/", "analytics"),
            Remote if rng.f64() < 0.3 => ("/contractors/", "vendor"),
            _ => rng.pick(&[
                ("/engineering/", "backend"),
                ("/engineering/", "frontend"),
                ("/finance/", "finance"),
                ("/ops/", "sre"),
            ]),
        };
        let rate = match behaviour {
            CiBot => 20.0 + rng.f64() * 60.0,
            _ => 3.0 + rng.f64() * 25.0,
        };
        let outside_share = match behaviour {
            Remote if rng.f64() < 0.4 => 0.01 + rng.f64() * 0.1,
            _ => 0.0,
        };
        let mut tags = vec![
            ("team".to_string(), team.to_string()),
            ("kind".to_string(), if behaviour == CiBot { "bot" } else { "human" }.to_string()),
        ];
        if rng.f64() < 0.5 {
            tags.push(("cost-center".to_string(), format!("cc-{}", 100 + rng.below(8))));
        }
        let home_ip = self.outside_ip(rng);
        SynthUser {
            arn: format!("arn:aws:iam::{}:user{path}{name}", self.account_id),
            access_key: key_id("AKIA", rng.next()),
            name,
            path: path.to_string(),
            tags,
            behaviour,
            rate,
            outside_share,
            home_ip,
        }
    }

    /// Every record in `[start, end)`, in time order.
    pub fn generate(&self, start: DateTime<Utc>, end: DateTime<Utc>) -> Generated {
        let mut generated = Generated::default();
        let mut hour = hour_of(start);
        while hour < end {
            for (index, user) in self.users.iter().enumerate() {
                let mut rng = Rng::new(mix(&[self.seed, index as u64 + 1, hour.timestamp() as u64]));
                self.user_hour(user, hour, &mut rng, &mut generated);
            }
            let mut rng = Rng::new(mix(&[self.seed, 0, hour.timestamp() as u64]));
            self.background_hour(hour, &mut rng, &mut generated);
            hour += TimeDelta::hours(1);
        }
        generated.records.retain(|r| r.at >= start && r.at < end);
        generated.records.sort_by_key(|r| r.at);
        generated.tally = Tally::default();
        for record in &generated.records {
            self.count(record, &mut generated.tally);
        }
        generated
    }

    fn user_hour(&self, user: &SynthUser, hour: DateTime<Utc>, rng: &mut Rng, out: &mut Generated) {
        let expected = user.rate * activity(user.behaviour, hour);
        let calls = expected.floor() as usize + usize::from(rng.f64() < expected.fract());
        if user.behaviour == Behaviour::Console && hour.hour() == 8 && hour.weekday().num_days_from_monday() < 5 {
            let at = hour + TimeDelta::seconds(rng.below(600) as i64);
            let login = RecordSpec::new(
                user.identity(&self.account_id),
                at,
                "signin:ConsoleLogin",
                Origin::Ip(self.trusted_ip(rng)),
            )
            .event_type("AwsConsoleSignIn")
            .console();
            out.records.push(login);
        }
        for _ in 0..calls {
            let at = hour + TimeDelta::seconds(rng.below(3600) as i64);
            let mut record = self.user_call(user, at, rng);
            record.region = if rng.f64() < 0.8 { REGIONS[0] } else { REGIONS[1] }.to_string();
            if !record.action.ends_with(":GetCallerIdentity") {
                let roll = rng.f64();
                if roll < 0.006 {
                    record = record.denied_no_allow();
                } else if roll < 0.010 {
                    record = record.throttled();
                }
            }
            record.event_id = Some(uuid(rng));
            out.records.push(record);
        }
    }

    fn user_call(&self, user: &SynthUser, at: DateTime<Utc>, rng: &mut Rng) -> RecordSpec {
        use Behaviour::*;
        let roll = rng.f64();
        let (action, origin) = match user.behaviour {
            CiBot => (rng.pick(CI_ACTIONS), self.ci_origin(rng)),
            Remote if roll < user.outside_share => {
                let ip = if rng.f64() < 0.7 { user.home_ip.clone() } else { self.outside_ip(rng) };
                (rng.pick(DESK_ACTIONS), Origin::Ip(ip))
            }
            PresignedReader if roll < 0.6 => ("s3:GetObject", Origin::Ip(self.outside_ip(rng))),
            ViaService if roll < 0.35 => (rng.pick(ATHENA_READS), Origin::Service("athena.amazonaws.com".into())),
            ViaService if roll < 0.5 => {
                (rng.pick(STACK_ACTIONS), Origin::Service("cloudformation.amazonaws.com".into()))
            }
            ViaService if roll < 0.7 => (rng.pick(ATHENA_QUERIES), Origin::Ip(self.trusted_ip(rng))),
            Console if roll < 0.3 => {
                let id = AWS_OWNED_ENDPOINT.into();
                (
                    rng.pick(S3_CONSOLE_ACTIONS),
                    Origin::Endpoint { id, account: AWS_OWNED_ACCOUNT.into(), client_ip: private_ip(rng) },
                )
            }
            NotActionUser if roll < 0.5 => (rng.pick(SEARCH_ACTIONS), Origin::Ip(self.outside_ip(rng))),
            _ => (rng.pick(DESK_ACTIONS), Origin::Ip(self.trusted_ip(rng))),
        };
        let record = RecordSpec::new(user.identity(&self.account_id), at, action, origin);
        match user.behaviour {
            CiBot => record.user_agent(BOTO_AGENT),
            Console => record.console(),
            PresignedReader if roll < 0.6 => record.presigned().user_agent(BROWSER_AGENT),
            _ => record,
        }
    }

    /// Through a trusted endpoint, or a trusted CIDR when no endpoint is configured.
    fn ci_origin(&self, rng: &mut Rng) -> Origin {
        match self.trusted_endpoints.as_slice() {
            [] => Origin::Ip(self.trusted_ip(rng)),
            ids => Origin::Endpoint {
                id: ids[rng.index(ids.len())].clone(),
                account: self.account_id.clone(),
                client_ip: private_ip(rng),
            },
        }
    }

    /// Records that are not IAM users' API calls: role sessions, service events, another
    /// account's user.
    fn background_hour(&self, hour: DateTime<Utc>, rng: &mut Rng, out: &mut Generated) {
        let roles = (self.users.len() / 3).max(1);
        for _ in 0..roles {
            let at = hour + TimeDelta::seconds(rng.below(3600) as i64);
            let role = rng.pick(&[
                "OrganizationAccountAccessRole",
                "AWSReservedSSO_ReadOnly_0123abcd",
                "eks-node-role",
                "lambda-exec",
            ]);
            let identity = Identity::AssumedRole {
                account: self.account_id.clone(),
                role: role.to_string(),
                session: format!("session-{}", rng.below(1000)),
            };
            let mut record = RecordSpec::new(identity, at, rng.pick(DESK_ACTIONS), Origin::Ip(self.outside_ip(rng)));
            record.event_id = Some(uuid(rng));
            out.records.push(record);
        }
        for _ in 0..2 {
            let at = hour + TimeDelta::seconds(rng.below(3600) as i64);
            let service = rng.pick(&["kms.amazonaws.com", "sso.amazonaws.com", "health.amazonaws.com"]);
            let identity = Identity::AwsService { service: service.to_string() };
            let mut record = RecordSpec::new(identity, at, "kms:RotateKey", Origin::Service(service.to_string()))
                .event_type("AwsServiceEvent");
            record.event_id = Some(uuid(rng));
            out.records.push(record);
        }
        let at = hour + TimeDelta::seconds(rng.below(3600) as i64);
        let mut record = RecordSpec::new(
            Identity::iam_user(OTHER_ACCOUNT, "partner.auditor"),
            at,
            "s3:ListBucket",
            Origin::Ip(self.outside_ip(rng)),
        );
        record.event_id = Some(uuid(rng));
        out.records.push(record);
    }

    /// What a record was meant to be: counted from the generator's choices, not by classifying.
    fn count(&self, record: &RecordSpec, tally: &mut Tally) {
        tally.records += 1;
        let Identity::IamUser { account, name, .. } = &record.identity else {
            return;
        };
        if *account != self.account_id
            || record.event_type != "AwsApiCall"
            || record.action.ends_with(":GetCallerIdentity")
        {
            return;
        }
        let t = tally.users.entry(name.clone()).or_default();
        t.calls += 1;
        if record
            .error
            .as_ref()
            .is_some_and(|(code, _)| code.starts_with("AccessDenied") || code.ends_with("UnauthorizedOperation"))
        {
            t.other_denials += 1;
        }
        let p = &self.perimeter;
        let outside = if p.not_actions.iter().any(|pattern| action_matches(pattern, &record.action)) {
            false
        } else {
            match &record.origin {
                Origin::Service(service) => !(p.allow_aws_service_calls || p.called_via_services.contains(service)),
                _ if record.presigned && p.allow_presigned_s3_reads && record.action == "s3:GetObject" => false,
                Origin::Endpoint { id, account, .. } => {
                    !(*account == self.account_id && self.trusted_endpoints.contains(id))
                }
                Origin::Ip(ip) => {
                    !ip.parse::<IpAddr>().is_ok_and(|ip| self.trusted_nets.iter().any(|n| n.contains(&ip)))
                }
            }
        };
        t.outside += u64::from(outside);
    }

    /// An address in a trusted CIDR (or an outside one when none is configured).
    fn trusted_ip(&self, rng: &mut Rng) -> String {
        match self.trusted_nets.as_slice() {
            [] => self.outside_ip(rng),
            nets => random_in(&rng.pick(nets), rng).to_string(),
        }
    }

    /// An address in no trusted CIDR: IPv4 mostly, IPv6 sometimes.
    fn outside_ip(&self, rng: &mut Rng) -> String {
        for _ in 0..16 {
            let ip = if rng.f64() < 0.8 {
                let (base, bits) = rng.pick(OUTSIDE_V4);
                IpAddr::V4(Ipv4Addr::from(base + (rng.next() as u32 & ((1u32 << bits) - 1))))
            } else {
                IpAddr::V6(Ipv6Addr::from(OUTSIDE_V6_PREFIX | u128::from(rng.next() as u32)))
            };
            if !self.trusted_nets.iter().any(|n| n.contains(&ip)) {
                return ip.to_string();
            }
        }
        // Everything tried is trusted: a junk address is at least never inside a CIDR.
        "035.249.253.232".to_string()
    }
}

/// A private client address, as CloudTrail records calls through VPC endpoints.
fn private_ip(rng: &mut Rng) -> String {
    format!("10.{}.{}.{}", rng.below(256), rng.below(256), 1 + rng.below(254))
}

/// How busy a behaviour is in an hour (UTC): office hours on weekdays, bots around the clock.
fn activity(behaviour: Behaviour, hour: DateTime<Utc>) -> f64 {
    let weekday = hour.weekday().num_days_from_monday() < 5;
    let h = hour.hour();
    match behaviour {
        Behaviour::CiBot if weekday => 1.0,
        Behaviour::CiBot => 0.5,
        Behaviour::Remote if weekday && (6..22).contains(&h) => 0.8,
        _ if weekday && (8..18).contains(&h) => 1.0,
        _ => 0.03,
    }
}

fn random_in(net: &IpNet, rng: &mut Rng) -> IpAddr {
    match net {
        IpNet::V4(n) => {
            let host_bits = 32 - u32::from(n.prefix_len());
            let mask = if host_bits == 32 { u32::MAX } else { (1u32 << host_bits) - 1 };
            IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) | (rng.next() as u32 & mask)))
        }
        IpNet::V6(n) => {
            let host_bits = 128 - u32::from(n.prefix_len());
            let mask = if host_bits == 128 { u128::MAX } else { (1u128 << host_bits) - 1 };
            let random = (u128::from(rng.next()) << 64) | u128::from(rng.next());
            IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | (random & mask)))
        }
    }
}

const FIRST_NAMES: &[&str] = &[
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "ken", "lena", "mallory",
    "nina", "oscar", "peggy", "quinn", "rupert", "sybil", "trent", "ursula", "victor", "wendy", "yusuf", "zoe",
];
const LAST_NAMES: &[&str] = &[
    "nguyen", "smith", "garcia", "muller", "rossi", "tanaka", "okafor", "kowalski", "dubois", "silva", "jensen",
    "haddad", "ivanova", "brown", "singh", "kim", "lopez", "novak", "moreau", "costa",
];
const DESK_ACTIONS: &[&str] = &[
    "ec2:DescribeInstances",
    "s3:ListBuckets",
    "s3:GetObject",
    "s3:PutObject",
    "logs:FilterLogEvents",
    "cloudwatch:GetMetricData",
    "iam:ListRoles",
    "dynamodb:Query",
    "lambda:ListFunctions",
    "sts:GetCallerIdentity",
];
const ATHENA_READS: &[&str] = &["s3:GetObject", "s3:ListBucket", "glue:GetTable", "glue:GetPartitions"];
const ATHENA_QUERIES: &[&str] = &["athena:StartQueryExecution", "athena:GetQueryResults"];
const STACK_ACTIONS: &[&str] = &["ec2:RunInstances", "iam:CreateRole", "lambda:CreateFunction"];
const S3_CONSOLE_ACTIONS: &[&str] = &["s3:ListBucket", "s3:GetBucketLocation", "s3:GetBucketPolicy"];
const SEARCH_ACTIONS: &[&str] = &["es:ESHttpGet", "es:ESHttpPost"];
const CLI_AGENT: &str = "aws-cli/2.15.30 md/awscrt#0.19.19 ua/2.0 os/linux#6.1 md/arch#x86_64 lang/python#3.11.8";
const BOTO_AGENT: &str = "Boto3/1.34.69 md/Botocore#1.34.69 ua/2.0 os/linux#5.10 lang/python#3.12.2";
const BROWSER_AGENT: &str = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Safari/605.1.15";
const CI_ACTIONS: &[&str] = &[
    "s3:GetObject",
    "s3:PutObject",
    "ecr:GetAuthorizationToken",
    "ecr:BatchGetImage",
    "lambda:UpdateFunctionCode",
    "cloudformation:DescribeStacks",
    "sts:GetCallerIdentity",
];

// ---------------------------------------------------------------------------------------------
// Writing trail files.

/// Damage to put into written files, to exercise the readers' tolerance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Records that are JSON but not valid CloudTrail (one per file, in the first files).
    pub bad_records: usize,
    /// Extra files whose gzip stream is cut short.
    pub corrupt_files: usize,
}

/// What [`write_trail`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    /// Every file, corrupt ones included, in path order.
    pub files: Vec<PathBuf>,
    /// Good records.
    pub records: u64,
    /// Records written broken on purpose (faults).
    pub bad_records: u64,
    /// Files written unreadable on purpose (faults).
    pub corrupt_files: u64,
    /// Compressed bytes.
    pub bytes: u64,
}

/// Writes `records` under `root` as CloudTrail delivers them for trail account `account_id`:
/// `AWSLogs/<account>/CloudTrail/<region>/YYYY/MM/DD/<account>_CloudTrail_<region>_<time>_<id>.json.gz`,
/// one file per region and 5-minute window, delivered (and named) a few minutes after the
/// window. File names derive from their records, so writing the same records again rewrites the
/// same files. Files are compressed in parallel.
pub fn write_trail(root: &Path, account_id: &str, records: &[RecordSpec], faults: Faults) -> std::io::Result<Written> {
    write_deliveries(root, "AWSLogs/", account_id, records, faults)
}

/// [`write_trail`] for an organisation trail: member account `account_id`'s files under
/// `AWSLogs/<organization_id>/<account>/CloudTrail/<region>/...` (`organization_id` such as
/// `o-a1b2c3d4e5`), as the organisation's trail delivers them into one bucket.
pub fn write_org_trail(
    root: &Path,
    organization_id: &str,
    account_id: &str,
    records: &[RecordSpec],
    faults: Faults,
) -> std::io::Result<Written> {
    write_deliveries(root, &format!("AWSLogs/{organization_id}/"), account_id, records, faults)
}

/// The records' files under `root`, each at `<logs><account>/CloudTrail/...`.
fn write_deliveries(
    root: &Path,
    logs: &str,
    account_id: &str,
    records: &[RecordSpec],
    faults: Faults,
) -> std::io::Result<Written> {
    let mut windows: Deliveries = BTreeMap::new();
    for (position, record) in records.iter().enumerate() {
        let window = record.at.duration_trunc(TimeDelta::minutes(5)).unwrap_or(record.at);
        windows.entry((record.region.as_str(), window)).or_default().push((position, record));
    }
    let windows: Vec<_> = windows.into_iter().collect();
    let parts: Vec<std::io::Result<Written>> = windows
        .par_iter()
        .enumerate()
        .map(|(n, ((region, window), records))| {
            let delivered = *window + TimeDelta::minutes(8);
            let file = TrailFileSpec { root, logs, account_id, region, delivered, records };
            file.write(n < faults.bad_records, (n < faults.corrupt_files).then_some(n))
        })
        .collect();
    let mut written = Written::default();
    for part in parts {
        let part = part?;
        written.files.extend(part.files);
        written.records += part.records;
        written.bad_records += part.bad_records;
        written.corrupt_files += part.corrupt_files;
        written.bytes += part.bytes;
    }
    written.files.sort();
    Ok(written)
}

/// Records by region and 5-minute window, with their positions in the caller's list.
type Deliveries<'a> = BTreeMap<(&'a str, DateTime<Utc>), Vec<(usize, &'a RecordSpec)>>;

/// One delivery: the records of one region and 5-minute window.
struct TrailFileSpec<'a> {
    root: &'a Path,
    /// `AWSLogs/`, or an organisation trail's `AWSLogs/<organisation>/`.
    logs: &'a str,
    account_id: &'a str,
    region: &'a str,
    delivered: DateTime<Utc>,
    /// With their positions in the caller's list (event IDs derive from them).
    records: &'a [(usize, &'a RecordSpec)],
}

impl TrailFileSpec<'_> {
    /// Writes the file, with a malformed record first if `bad`, and a copy cut short (the
    /// `corrupt`-th) next to it.
    fn write(&self, bad: bool, corrupt: Option<usize>) -> std::io::Result<Written> {
        let mut rendered: Vec<Value> =
            self.records.iter().map(|(position, r)| render(r, self.account_id, *position)).collect();
        let ids: Vec<&str> = rendered.iter().filter_map(|r| r["eventID"].as_str()).collect();
        let path = trail_path(self.root, self.logs, self.account_id, self.region, self.delivered, fnv(&ids));
        if bad {
            rendered.insert(0, json!({"eventVersion": "1.09", "eventTime": 20240102, "userIdentity": "not an object"}));
        }
        let gz = gzip(&serde_json::to_vec(&json!({ "Records": rendered }))?)?;
        write_file(&path, &gz)?;
        let mut written = Written {
            records: self.records.len() as u64,
            bad_records: u64::from(bad),
            bytes: gz.len() as u64,
            ..Written::default()
        };
        if let Some(n) = corrupt {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file.json.gz");
            let cut_path = path.with_file_name(name.replace(".json.gz", &format!("{n}X.json.gz")));
            let cut = &gz[..gz.len() / 2];
            write_file(&cut_path, cut)?;
            written.corrupt_files = 1;
            written.bytes += cut.len() as u64;
            written.files.push(cut_path);
        }
        written.files.push(path);
        Ok(written)
    }
}

fn trail_path(root: &Path, logs: &str, account: &str, region: &str, delivered: DateTime<Utc>, hash: u64) -> PathBuf {
    let mut suffix = String::with_capacity(16);
    let mut rng = Rng::new(hash);
    for _ in 0..16 {
        suffix.push(char::from(rng.pick(ALPHANUMERIC)));
    }
    root.join(format!(
        "{logs}{account}/CloudTrail/{region}/{}/{account}_CloudTrail_{region}_{}_{suffix}.json.gz",
        delivered.format("%Y/%m/%d"),
        delivered.format("%Y%m%dT%H%MZ"),
    ))
}

const ALPHANUMERIC: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn gzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder =
        flate2::write::GzEncoder::new(Vec::with_capacity(bytes.len() / 8), flate2::Compression::default());
    encoder.write_all(bytes)?;
    encoder.finish()
}

fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, bytes)
}

/// The record as CloudTrail writes it.
fn render(spec: &RecordSpec, recipient: &str, position: usize) -> Value {
    let (service, name) = spec.action.split_once(':').unwrap_or((spec.action.as_str(), ""));
    let host = match service {
        "cloudwatch" => "monitoring",
        "ses" => "email",
        other => other,
    };
    let event_source = format!("{host}.amazonaws.com");
    let at = spec.at.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let hash = fnv(&[at.as_str(), &spec.action, &spec.caller().1, &position.to_string()]);
    let event_id = spec.event_id.clone().unwrap_or_else(|| uuid(&mut Rng::new(hash)));
    let mut rng = Rng::new(fnv(&[&event_id]));
    let s3_object = service == "s3" && name.ends_with("Object");
    let category = if s3_object || spec.action == "lambda:Invoke" { "Data" } else { "Management" };

    let mut identity = Map::new();
    match &spec.identity {
        Identity::IamUser { account, name: user, arn, access_key } => {
            identity.insert("type".into(), json!("IAMUser"));
            identity.insert("principalId".into(), json!(key_id("AIDA", fnv(&[arn]))));
            identity.insert("arn".into(), json!(arn));
            identity.insert("accountId".into(), json!(account));
            let key = if spec.console { key_id("ASIA", rng.next()) } else { access_key.clone() };
            identity.insert("accessKeyId".into(), json!(key));
            identity.insert("userName".into(), json!(user));
            if spec.console {
                identity.insert(
                    "sessionContext".into(),
                    json!({"sessionIssuer": {}, "webIdFederationData": {}, "attributes": {"creationDate": at, "mfaAuthenticated": "true"}}),
                );
            }
        }
        Identity::AssumedRole { account, role, session } => {
            let role_id = key_id("AROA", fnv(&[account, role]));
            identity.insert("type".into(), json!("AssumedRole"));
            identity.insert("principalId".into(), json!(format!("{role_id}:{session}")));
            identity.insert("arn".into(), json!(format!("arn:aws:sts::{account}:assumed-role/{role}/{session}")));
            identity.insert("accountId".into(), json!(account));
            identity.insert("accessKeyId".into(), json!(key_id("ASIA", rng.next())));
            identity.insert(
                "sessionContext".into(),
                json!({
                    "sessionIssuer": {"type": "Role", "principalId": role_id, "arn": format!("arn:aws:iam::{account}:role/{role}"), "accountId": account, "userName": role},
                    "attributes": {"creationDate": at, "mfaAuthenticated": "false"}
                }),
            );
        }
        Identity::AwsService { service } => {
            identity.insert("type".into(), json!("AWSService"));
            identity.insert("invokedBy".into(), json!(service));
        }
    }
    let source_ip = match &spec.origin {
        Origin::Ip(ip) => ip.clone(),
        Origin::Endpoint { client_ip, .. } => client_ip.clone(),
        Origin::Service(service) => {
            identity.insert("invokedBy".into(), json!(service));
            service.clone()
        }
    };

    let mut record = Map::new();
    record.insert("eventVersion".into(), json!(if s3_object { "1.10" } else { "1.09" }));
    record.insert("userIdentity".into(), Value::Object(identity));
    record.insert("eventTime".into(), json!(at));
    record.insert("eventSource".into(), json!(event_source));
    record.insert("eventName".into(), json!(name));
    record.insert("awsRegion".into(), json!(spec.region));
    record.insert("sourceIPAddress".into(), json!(source_ip));
    record.insert("userAgent".into(), json!(spec.user_agent));
    if let Some((code, message)) = &spec.error {
        record.insert("errorCode".into(), json!(code));
        record.insert("errorMessage".into(), json!(message));
    }
    let bucket = format!("{}-{}", recipient, rng.pick(&["artifacts", "datalake", "reports", "logs"]));
    let request = if service == "s3" {
        json!({"bucketName": bucket, "Host": format!("{bucket}.s3.{}.amazonaws.com", spec.region), "key": format!("data/part-{:05}.parquet", rng.below(100_000))})
    } else if spec.event_type == "AwsConsoleSignIn" {
        Value::Null
    } else {
        json!({"maxResults": 100})
    };
    record.insert("requestParameters".into(), request);
    record.insert(
        "responseElements".into(),
        if spec.event_type == "AwsConsoleSignIn" { json!({"ConsoleLogin": "Success"}) } else { Value::Null },
    );
    if service == "s3" {
        record.insert(
            "additionalEventData".into(),
            json!({
                "SignatureVersion": "SigV4",
                "CipherSuite": "TLS_AES_128_GCM_SHA256",
                "bytesTransferredIn": 0,
                "AuthenticationMethod": if spec.presigned { "QueryString" } else { "AuthHeader" },
                "x-amz-id-2": format!("{:016x}{:016x}", rng.next(), rng.next()),
                "bytesTransferredOut": rng.below(5_000_000),
            }),
        );
    }
    record.insert("requestID".into(), json!(format!("{:016X}", rng.next())));
    record.insert("eventID".into(), json!(event_id));
    let read_only = ["Get", "List", "Describe", "Head", "Filter", "Query", "BatchGet", "ESHttpGet"]
        .iter()
        .any(|verb| name.starts_with(verb));
    record.insert("readOnly".into(), json!(read_only));
    if s3_object {
        record.insert(
            "resources".into(),
            json!([
                {"type": "AWS::S3::Object", "ARN": format!("arn:aws:s3:::{bucket}/data/")},
                {"accountId": recipient, "type": "AWS::S3::Bucket", "ARN": format!("arn:aws:s3:::{bucket}")}
            ]),
        );
    }
    record.insert("eventType".into(), json!(spec.event_type));
    record.insert("managementEvent".into(), json!(category == "Management"));
    record.insert("recipientAccountId".into(), json!(recipient));
    if let Origin::Endpoint { id, account, .. } = &spec.origin {
        record.insert("vpcEndpointId".into(), json!(id));
        record.insert("vpcEndpointAccountId".into(), json!(account));
    }
    record.insert("eventCategory".into(), json!(category));
    if spec.console {
        record.insert("sessionCredentialFromConsole".into(), json!("true"));
    }
    if !matches!(spec.origin, Origin::Endpoint { .. }) {
        record.insert(
            "tlsDetails".into(),
            json!({"tlsVersion": "TLSv1.3", "cipherSuite": "TLS_AES_128_GCM_SHA256", "clientProvidedHostHeader": format!("{host}.{}.amazonaws.com", spec.region)}),
        );
    }
    Value::Object(record)
}

fn key_id(prefix: &str, seed: u64) -> String {
    let mut rng = Rng::new(seed);
    let mut id = prefix.to_string();
    for _ in 0..16 {
        id.push(char::from(rng.pick(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")));
    }
    id
}

fn uuid(rng: &mut Rng) -> String {
    let (a, b) = (rng.next(), rng.next());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | (b >> 48) & 0x3fff,
        b & 0xffff_ffff_ffff
    )
}

// ---------------------------------------------------------------------------------------------
// Determinism: a small seeded generator and hash, stable across platforms and Rust versions.

/// SplitMix64: tiny, fast, and good enough for synthetic data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn f64(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.index(items.len())]
    }

    fn weighted<'a, T>(&mut self, items: &'a [(T, u64)]) -> &'a T {
        let total: u64 = items.iter().map(|(_, w)| w).sum();
        let mut roll = self.below(total);
        for (item, weight) in items {
            if roll < *weight {
                return item;
            }
            roll -= weight;
        }
        &items[items.len() - 1].0
    }
}

fn mix(parts: &[u64]) -> u64 {
    parts.iter().fold(0x5EED, |acc, part| Rng::new(acc ^ part).next())
}

/// FNV-1a over the parts (with a separator), for names and IDs derived from content.
fn fnv<S: AsRef<str>>(parts: &[S]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.as_ref().bytes().chain(std::iter::once(0)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep::evidence::CallGroup;
    use lockstep::perimeter::{AllowReason, DenyReason, Verdict};
    use std::collections::HashSet;

    fn perimeter() -> Perimeter {
        example_perimeter().unwrap()
    }

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    #[test]
    fn same_seed_same_org_and_records_and_ranges_compose() {
        let p = perimeter();
        let (a, b) = (Org::new(7, 40, &p), Org::new(7, 40, &p));
        assert_eq!(a.users, b.users);
        assert_ne!(a.users, Org::new(8, 40, &p).users);
        let names: HashSet<_> = a.users.iter().map(|u| &u.name).collect();
        assert_eq!(names.len(), 40, "user names are unique");
        let (start, mid, end) = (at("2024-01-08T06:00:00Z"), at("2024-01-08T12:30:00Z"), at("2024-01-08T20:00:00Z"));
        let whole = a.generate(start, end);
        let mut parts = a.generate(start, mid);
        let second = a.generate(mid, end);
        parts.records.extend(second.records);
        parts.tally.merge(&second.tally);
        assert_eq!(whole.records, parts.records);
        assert_eq!(whole.tally, parts.tally);
        assert!(whole.records.iter().all(|r| r.at >= start && r.at < end));
        assert!(whole.records.len() > 1000, "{}", whole.records.len());
    }

    #[test]
    fn every_behaviour_and_kind_of_noise_appears() {
        let p = perimeter();
        let org = Org::new(1, 120, &p);
        let behaviours: HashSet<_> = org.users.iter().map(|u| u.behaviour).collect();
        assert_eq!(behaviours.len(), 7);
        assert!(org.users.iter().any(|u| u.path == "/contractors/"));
        let generated = org.generate(at("2024-01-08T00:00:00Z"), at("2024-01-09T00:00:00Z"));
        let exempt = HashSet::new();
        let mut verdicts: HashSet<Verdict> = HashSet::new();
        let mut errors: HashSet<&str> = HashSet::new();
        for spec in &generated.records {
            let record: lockstep::trail::Record = serde_json::from_value(render(spec, &org.account_id, 0)).unwrap();
            verdicts.insert(p.classify(&record, &exempt));
            if let Some((code, _)) = &spec.error {
                errors.insert(code);
            }
        }
        for expected in [
            Verdict::Allowed(AllowReason::TrustedEndpoint),
            Verdict::Allowed(AllowReason::TrustedCidr),
            Verdict::Allowed(AllowReason::PresignedRead),
            Verdict::Allowed(AllowReason::ViaAwsService),
            Verdict::Allowed(AllowReason::NotAction),
            Verdict::WouldDeny(DenyReason::UntrustedIp),
            Verdict::WouldDeny(DenyReason::UntrustedEndpoint),
        ] {
            assert!(verdicts.contains(&expected), "{expected:?} missing from {verdicts:?}");
        }
        assert!(verdicts.iter().any(|v| v.reason_name() == "not_iam_user"));
        assert!(verdicts.iter().any(|v| v.reason_name() == "other_account"));
        assert!(verdicts.iter().any(|v| v.reason_name() == "not_api_call"));
        assert!(errors.contains("ThrottlingException"));
        assert!(errors.iter().any(|c| c.starts_with("AccessDenied") || c.ends_with("UnauthorizedOperation")));
    }

    #[test]
    fn the_tally_agrees_with_the_classifier() {
        let p = perimeter();
        let org = Org::new(3, 60, &p);
        let generated = org.generate(at("2024-01-09T00:00:00Z"), at("2024-01-10T00:00:00Z"));
        let exempt = HashSet::new();
        let mut outside: BTreeMap<String, u64> = BTreeMap::new();
        for spec in &generated.records {
            let record: lockstep::trail::Record = serde_json::from_value(render(spec, &org.account_id, 0)).unwrap();
            if let Verdict::WouldDeny(_) = p.classify(&record, &exempt) {
                *outside.entry(record.user_name().unwrap().to_string()).or_default() += 1;
            }
        }
        let tallied: BTreeMap<String, u64> =
            generated.tally.users.iter().filter(|(_, t)| t.outside > 0).map(|(u, t)| (u.clone(), t.outside)).collect();
        assert_eq!(tallied, outside);
        assert!(!outside.is_empty());
    }

    #[test]
    fn scripted_records_render_as_cloudtrail_does() {
        let spec = RecordSpec::new(
            Identity::iam_user("123456789012", "alice"),
            at("2024-01-02T03:04:05Z"),
            "ec2:DescribeInstances",
            Origin::ip("192.0.2.7"),
        )
        .denied_explicitly("lockstep-network-perimeter");
        let value = render(&spec, "123456789012", 0);
        assert_eq!(value["errorCode"], "Client.UnauthorizedOperation");
        assert_eq!(value["eventSource"], "ec2.amazonaws.com");
        assert_eq!(value["userIdentity"]["arn"], "arn:aws:iam::123456789012:user/alice");
        let record: lockstep::trail::Record = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(record.denial("lockstep-network-perimeter"), Some(lockstep::trail::Denial::ExplicitIdentityDeny));
        assert_eq!(record.event_time(), Some(at("2024-01-02T03:04:05Z")));
        assert_eq!(value, render(&spec, "123456789012", 0), "rendering is deterministic");

        let endpoint = RecordSpec::new(
            Identity::iam_user("123456789012", "bot"),
            spec.at,
            "s3:GetObject",
            Origin::endpoint("vpce-0123456789abcdef0", "123456789012"),
        );
        let value = render(&endpoint, "123456789012", 1);
        assert_eq!(value["vpcEndpointId"], "vpce-0123456789abcdef0");
        assert_eq!(value["additionalEventData"]["AuthenticationMethod"], "AuthHeader");
        let record: lockstep::trail::Record = serde_json::from_value(value).unwrap();
        assert_eq!(perimeter().classify(&record, &HashSet::new()), Verdict::Allowed(AllowReason::TrustedEndpoint));
    }

    #[test]
    fn files_follow_the_delivery_layout_and_faults_are_injected() {
        let dir = tempfile::tempdir().unwrap();
        let p = perimeter();
        let org = Org::new(5, 10, &p);
        let generated = org.generate(at("2024-01-08T23:40:00Z"), at("2024-01-09T00:20:00Z"));
        let faults = Faults { bad_records: 2, corrupt_files: 1 };
        let written = write_trail(dir.path(), &org.account_id, &generated.records, faults).unwrap();
        assert_eq!(written.records, generated.records.len() as u64);
        assert_eq!((written.bad_records, written.corrupt_files), (2, 1));
        let name = written.files[0].strip_prefix(dir.path()).unwrap().to_str().unwrap().to_string();
        assert!(
            name.starts_with("AWSLogs/123456789012/CloudTrail/")
                && name.contains("_CloudTrail_")
                && name.ends_with(".json.gz"),
            "{name}"
        );
        // Records of 23:55-00:00 are delivered after midnight, into the next day's prefix.
        assert!(written.files.iter().any(|f| f.to_string_lossy().contains("/2024/01/09/")));
        let mut good = 0;
        let mut bad = 0;
        let mut broken = 0;
        for file in &written.files {
            match lockstep::trail::read_file(file) {
                Ok(parsed) => {
                    good += parsed.records.len() as u64;
                    bad += parsed.bad.len() as u64;
                    assert!(parsed.records.iter().all(|r| CallGroup::single(r.clone()).is_some()));
                }
                Err(_) => broken += 1,
            }
        }
        assert_eq!((good, bad, broken), (written.records, 2, 1));
        let again = write_trail(dir.path(), &org.account_id, &generated.records, faults).unwrap();
        assert_eq!(again.files, written.files, "same records, same file names");
    }

    #[test]
    fn an_organisation_trail_puts_each_account_under_the_organisation() {
        let dir = tempfile::tempdir().unwrap();
        let org = Org::new(5, 4, &perimeter());
        let generated = org.generate(at("2024-01-08T10:00:00Z"), at("2024-01-08T10:30:00Z"));
        let written =
            write_org_trail(dir.path(), "o-a1b2c3d4e5", &org.account_id, &generated.records, Faults::default())
                .unwrap();
        assert_eq!(written.records, generated.records.len() as u64);
        for file in &written.files {
            let name = file.strip_prefix(dir.path()).unwrap().to_str().unwrap();
            assert!(name.starts_with("AWSLogs/o-a1b2c3d4e5/123456789012/CloudTrail/"), "{name}");
            assert!(name.contains("/123456789012_CloudTrail_"), "{name}");
        }
    }
}
