//! The rendered policy and the classifier must never disagree.
//!
//! `Perimeter::policy()` renders the Deny policy IAM enforces; `Perimeter::classify()` predicts,
//! from CloudTrail, what that policy does to each recorded call, and every promotion rests on
//! that prediction. If they drift apart, the controller either locks users out (the policy
//! denies what the classifier allowed) or holds them back for nothing.
//!
//! So this test evaluates the *rendered JSON* with a small IAM evaluator written here, against a
//! request context built here from each record, over a generated corpus of trail records and
//! several perimeters, and demands the classifier's answer for every record in the policy's
//! scope. Nothing reuses the classifier's logic: the action matcher, the condition operators and
//! the record-to-context mapping are written from IAM's documented condition semantics and the
//! modelling assumptions at the top of `src/perimeter.rs`. Only `trail::action_prefix` (which
//! IAM prefix an event source has) is shared, on purpose.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::OnceLock;

use ipnet::IpNet;
use lockstep::config::Config;
use lockstep::perimeter::{AllowReason, DenyReason, Perimeter, SkipReason, Verdict};
use lockstep::trail::{self, Record};
use serde_json::{Map, Value, json};

// ---------------------------------------------------------------------------------------------
// A small IAM evaluator for Deny statements, reading the policy as IAM does: from its JSON.

/// What IAM knows about a request: the action and the condition keys present.
#[derive(Debug, Default)]
struct Request {
    action: String,
    keys: BTreeMap<String, Vec<String>>,
}

impl Request {
    fn new(action: &str) -> Request {
        Request { action: action.to_string(), keys: BTreeMap::new() }
    }

    fn with(mut self, key: &str, values: &[&str]) -> Request {
        self.keys.insert(key.to_string(), values.iter().map(|v| v.to_string()).collect());
        self
    }

    /// The values of a key (IAM matches key names case-insensitively); a key without values
    /// counts as missing.
    fn values(&self, key: &str) -> Option<&[String]> {
        self.keys.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v.as_slice()).filter(|v| !v.is_empty())
    }
}

/// Whether any Deny statement of the policy applies to the request.
fn policy_denies(policy: &Value, request: &Request) -> bool {
    match &policy["Statement"] {
        Value::Array(statements) => statements.iter().any(|s| deny_applies(s, request)),
        one @ Value::Object(_) => deny_applies(one, request),
        other => panic!("Statement must be an object or an array, got {other}"),
    }
}

fn deny_applies(statement: &Value, request: &Request) -> bool {
    let fields = statement.as_object().unwrap_or_else(|| panic!("a statement must be an object, got {statement}"));
    const KNOWN: &[&str] = &["Sid", "Effect", "Action", "NotAction", "Resource", "Condition"];
    if let Some(unknown) = fields.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        panic!("the evaluator does not implement the statement element {unknown:?}");
    }
    match fields.get("Effect").and_then(Value::as_str) {
        Some("Deny") => {}
        Some("Allow") => return false,
        other => panic!("unknown Effect {other:?}"),
    }
    let resources = strings(fields.get("Resource").expect("a statement needs Resource"), "Resource");
    assert_eq!(resources, ["*"], "the evaluator only implements Resource \"*\"");
    let listed = |actions: &Value, element| {
        strings(actions, element).iter().any(|pattern| wildcard_matches(pattern, &request.action))
    };
    let in_scope = match (fields.get("Action"), fields.get("NotAction")) {
        (Some(actions), None) => listed(actions, "Action"),
        (None, Some(actions)) => !listed(actions, "NotAction"),
        _ => panic!("a statement needs exactly one of Action and NotAction: {statement}"),
    };
    in_scope && conditions_hold(fields.get("Condition"), request)
}

/// A policy element holding a string or an array of strings.
fn strings<'a>(value: &'a Value, element: &str) -> Vec<&'a str> {
    match value {
        Value::String(one) => vec![one.as_str()],
        Value::Array(items) => items
            .iter()
            .map(|item| item.as_str().unwrap_or_else(|| panic!("{element}: expected strings, got {item}")))
            .collect(),
        other => panic!("{element}: expected a string or an array of strings, got {other}"),
    }
}

/// IAM action matching: case-insensitive, `*` any run of characters, `?` exactly one.
/// Iterative, remembering the last `*` to backtrack to.
fn wildcard_matches(pattern: &str, action: &str) -> bool {
    let p: Vec<char> = pattern.to_lowercase().chars().collect();
    let a: Vec<char> = action.to_lowercase().chars().collect();
    let (mut pi, mut ai) = (0, 0);
    let mut last_star: Option<(usize, usize)> = None;
    while ai < a.len() {
        if pi < p.len() && p[pi] == '*' {
            last_star = Some((pi, ai));
            pi += 1;
        } else if pi < p.len() && (p[pi] == '?' || p[pi] == a[ai]) {
            pi += 1;
            ai += 1;
        } else if let Some((star, resumed)) = last_star {
            // Let the last `*` swallow one more character and retry.
            last_star = Some((star, resumed + 1));
            pi = star + 1;
            ai = resumed + 1;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Every operator block, and every key within a block, must hold: they are ANDed.
fn conditions_hold(condition: Option<&Value>, request: &Request) -> bool {
    let Some(condition) = condition else {
        return true;
    };
    let blocks = condition.as_object().unwrap_or_else(|| panic!("Condition must be an object, got {condition}"));
    blocks.iter().all(|(name, keys)| {
        let operator = Operator::parse(name);
        let keys =
            keys.as_object().unwrap_or_else(|| panic!("{name}: expected an object of condition keys, got {keys}"));
        keys.iter().all(|(key, wanted)| operator.holds(request.values(key), &strings(wanted, key)))
    })
}

#[derive(Debug, Clone, Copy)]
enum SetQualifier {
    Single,
    ForAllValues,
    ForAnyValue,
}

#[derive(Debug, Clone, Copy)]
enum Comparison {
    String,
    Bool,
    Ip,
}

/// A condition operator: `[ForAllValues:|ForAnyValue:]<base>[IfExists]`.
#[derive(Debug)]
struct Operator {
    set: SetQualifier,
    comparison: Comparison,
    negated: bool,
    if_exists: bool,
}

impl Operator {
    fn parse(name: &str) -> Operator {
        let unknown =
            || -> ! { panic!("unknown condition operator {name:?}: teach the evaluator before the policy uses it") };
        let (set, rest) = match name.split_once(':') {
            None => (SetQualifier::Single, name),
            Some(("ForAllValues", rest)) => (SetQualifier::ForAllValues, rest),
            Some(("ForAnyValue", rest)) => (SetQualifier::ForAnyValue, rest),
            Some(_) => unknown(),
        };
        let (base, if_exists) = match rest.strip_suffix("IfExists") {
            Some(base) => (base, true),
            None => (rest, false),
        };
        let (comparison, negated) = match base {
            "StringEquals" => (Comparison::String, false),
            "StringNotEquals" => (Comparison::String, true),
            "Bool" => (Comparison::Bool, false),
            "IpAddress" => (Comparison::Ip, false),
            "NotIpAddress" => (Comparison::Ip, true),
            _ => unknown(),
        };
        Operator { set, comparison, negated, if_exists }
    }

    /// Whether the condition holds for one key; `present` is `None` when the request lacks it.
    fn holds(&self, present: Option<&[String]>, wanted: &[&str]) -> bool {
        // One request value against the policy's values: any may match; for a negated operator,
        // none may.
        let value_holds = |value: &String| wanted.iter().any(|w| self.matches(w, value)) != self.negated;
        match (self.set, present) {
            (SetQualifier::ForAllValues, None) => true,
            (SetQualifier::ForAllValues, Some(values)) => values.iter().all(value_holds),
            (SetQualifier::ForAnyValue, None) => self.if_exists,
            (SetQualifier::ForAnyValue, Some(values)) => values.iter().any(value_holds),
            (SetQualifier::Single, None) => self.if_exists || self.negated,
            (SetQualifier::Single, Some(values)) => {
                values.iter().any(|v| wanted.iter().any(|w| self.matches(w, v))) != self.negated
            }
        }
    }

    fn matches(&self, wanted: &str, value: &str) -> bool {
        match self.comparison {
            Comparison::String => wanted == value,
            Comparison::Bool => wanted.eq_ignore_ascii_case(value),
            Comparison::Ip => {
                let net = wanted
                    .parse::<IpNet>()
                    .or_else(|_| wanted.parse::<IpAddr>().map(IpNet::from))
                    .unwrap_or_else(|_| panic!("the policy holds {wanted:?} where a CIDR belongs"));
                // A value that is not an address is in no range.
                value.parse::<IpAddr>().is_ok_and(|ip| net.contains(&ip))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A record's request context, from the modelling assumptions at the top of src/perimeter.rs.

/// Some VPC no perimeter trusts: where calls through unknown endpoints come from.
const UNTRUSTED_VPC: &str = "vpc-unknown";

/// The request IAM would have seen for an in-scope record (read from its JSON, not from the
/// parsed `Record`, so the parser is checked too).
fn request_context(record: &Value, perimeter: &Perimeter, exempt: &HashSet<String>) -> Request {
    let source = text(record, &["eventSource"]).expect("an in-scope record has an event source");
    let name = text(record, &["eventName"]).expect("an in-scope record has an event name");
    let prefix = trail::action_prefix(source);
    let mut request = Request::new(&format!("{prefix}:{name}"));

    let address = text(record, &["sourceIPAddress"]);
    let service = text(record, &["userIdentity", "invokedBy"])
        .or(address.filter(|a| *a == "AWS Internal" || a.ends_with(".amazonaws.com")));
    if let Some(endpoint) = text(record, &["vpcEndpointId"]) {
        let ours = text(record, &["vpcEndpointAccountId"]).is_none_or(|a| a == perimeter.account_id);
        let vpc = match perimeter.trusted_endpoints.get(endpoint) {
            Some(vpc) if ours => vpc.as_str(),
            _ => UNTRUSTED_VPC,
        };
        request = request
            .with("aws:SourceVpc", &[vpc])
            .with("aws:SourceVpce", &[endpoint])
            .with("aws:ViaAWSService", &["false"]);
    } else if let Some(service) = service {
        request = request.with("aws:ViaAWSService", &["true"]).with("aws:CalledVia", &[service]);
    } else {
        request = request.with("aws:ViaAWSService", &["false"]);
        if let Some(ip) = address.filter(|a| a.parse::<IpAddr>().is_ok()) {
            request = request.with("aws:SourceIp", &[ip]);
        }
    }

    let user = text(record, &["userIdentity", "userName"]);
    if let (Some(key), Some(user)) = (&perimeter.exempt_tag_key, user)
        && exempt.contains(user)
    {
        request = request.with(&format!("aws:PrincipalTag/{key}"), &["true"]);
    }

    if prefix.eq_ignore_ascii_case("s3") {
        // An object in trail files, JSON text in Athena results.
        let method = match record.get("additionalEventData") {
            Some(Value::String(json_text)) => serde_json::from_str::<Value>(json_text)
                .ok()
                .and_then(|data| text(&data, &["AuthenticationMethod"]).map(str::to_string)),
            _ => text(record, &["additionalEventData", "AuthenticationMethod"]).map(str::to_string),
        };
        match method.as_deref() {
            Some("QueryString") => request = request.with("s3:authType", &["REST-QUERY-STRING"]),
            Some("AuthHeader") => request = request.with("s3:authType", &["REST-HEADER"]),
            _ => {}
        }
    }
    request
}

/// The string at `path`. Missing, null and empty all read as absent: an empty field says
/// nothing about where a call came from.
fn text<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(value, |v, key| v.get(key))?.as_str().filter(|s| !s.is_empty())
}

// ---------------------------------------------------------------------------------------------
// The corpus: deterministic, varied records, written as trail files and read back by the real
// reader.

const CORPUS_SIZE: usize = 12_000;
const RECORDS_PER_FILE: usize = 250;
const OTHER_ACCOUNT: &str = "999999999999";
const USERS: &[&str] = &["alice", "bob", "carol", "erin", "break-glass-admin", "svc-ci"];
const EXEMPT_USERS: &[&str] = &["bob", "erin"];
const AWS_OWNED_ENDPOINT: &str = "vpce-0aaaaaaaaaaaaaaaa";
const UNLISTED_ENDPOINT: &str = "vpce-0bbbbbbbbbbbbbbbb";
/// Services acting for users besides the configured `called_via_services`.
const OTHER_SERVICES: &[&str] = &[
    "cloudformation.amazonaws.com",
    "kms.amazonaws.com",
    "secretsmanager.amazonaws.com",
    "dynamodb.amazonaws.com",
    "AWS Internal",
];
/// Source addresses that are not plain usable addresses (seen in real trails, or malformed).
const JUNK_SOURCES: &[&str] =
    &["035.249.253.232", "203.0.113.300", "203.0.113.0/24", "fe80::1%eth0", "localhost", "::ffff:203.0.113.5", ""];

/// (eventSource, eventName). Repeats weigh the mix; near misses sit next to each not-action
/// pattern.
const ACTIONS: &[(&str, &str)] = &[
    ("s3.amazonaws.com", "GetObject"),
    ("s3.amazonaws.com", "GetObject"),
    ("s3.amazonaws.com", "GetObject"),
    ("s3.amazonaws.com", "getobject"),
    ("s3.amazonaws.com", "PutObject"),
    ("s3.amazonaws.com", "PutObject"),
    ("s3.amazonaws.com", "ListBucket"),
    ("ec2.amazonaws.com", "DescribeInstances"),
    ("ec2.amazonaws.com", "DescribeInstances"),
    ("iam.amazonaws.com", "ListUsers"),
    ("sts.amazonaws.com", "GetCallerIdentity"),
    ("sts.amazonaws.com", "AssumeRole"),
    ("kms.amazonaws.com", "Decrypt"),
    ("athena.amazonaws.com", "StartQueryExecution"),
    ("monitoring.amazonaws.com", "PutMetricData"),
    ("runtime.sagemaker.amazonaws.com", "InvokeEndpoint"),
    ("signin.amazonaws.com", "ConsoleLogin"),
    ("es.amazonaws.com", "ESHttpGet"),
    ("es.amazonaws.com", "esHttpPost"),
    ("es.amazonaws.com", "DescribeDomains"),
    ("dax.amazonaws.com", "GetItem"),
    ("dynamodb.amazonaws.com", "GetItem"),
    ("neptune-db.amazonaws.com", "connect"),
    ("neptune-db.amazonaws.com", "ReadDataViaQuery"),
    ("neptune-graph.amazonaws.com", "ReadDataViaQuery"),
    ("kafka-cluster.amazonaws.com", "Connect"),
    ("kafka.amazonaws.com", "ListClusters"),
    ("elasticfilesystem.amazonaws.com", "ClientMount"),
    ("elasticfilesystem.amazonaws.com", "CreateFileSystem"),
    ("rds-db.amazonaws.com", "connect"),
    ("rds-db.amazonaws.com", "connectx"),
    ("rds.amazonaws.com", "DescribeDBInstances"),
];

/// splitmix64: tiny, seeded, good enough to spread the corpus.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn percent(&mut self, p: usize) -> bool {
        self.below(100) < p
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

struct Generator {
    rng: Rng,
    account: String,
    cidrs: Vec<IpNet>,
    v4_cidrs: Vec<IpNet>,
    endpoints: Vec<String>,
    services: Vec<String>,
}

impl Generator {
    fn new(seed: u64, shipped: &Perimeter) -> Generator {
        let mut services = shipped.called_via_services.clone();
        services.extend(OTHER_SERVICES.iter().map(|s| s.to_string()));
        Generator {
            rng: Rng(seed),
            account: shipped.account_id.clone(),
            cidrs: shipped.trusted_cidrs.clone(),
            v4_cidrs: shipped.trusted_cidrs.iter().filter(|n| matches!(n, IpNet::V4(_))).copied().collect(),
            endpoints: shipped.trusted_endpoints.keys().cloned().collect(),
            services,
        }
    }

    /// A value, `null`, or nothing at all (each field may be missing or null in real trails).
    fn sometimes_null(&mut self, value: Value) -> Option<Value> {
        match self.rng.below(20) {
            0 => None,
            1 => Some(Value::Null),
            _ => Some(value),
        }
    }

    fn record(&mut self) -> Value {
        let mut r = Map::new();
        let rng = &mut self.rng;
        r.insert("eventVersion".into(), json!("1.09"));
        let time =
            format!("2024-05-{:02}T{:02}:{:02}:{:02}Z", 1 + rng.below(28), rng.below(24), rng.below(60), rng.below(60));
        r.insert("eventTime".into(), json!(time));
        r.insert("awsRegion".into(), json!("us-east-1"));

        let &(source, name) = rng.pick(ACTIONS);
        if !rng.percent(1) {
            r.insert("eventSource".into(), json!(source));
        }
        if !rng.percent(1) {
            r.insert("eventName".into(), json!(name));
        }
        let event_type = match rng.below(100) {
            0..=79 => Some(json!("AwsApiCall")),
            80..=84 => Some(json!("AwsConsoleAction")),
            85..=87 => None,
            88 => Some(Value::Null),
            89..=92 => Some(json!("AwsServiceEvent")),
            93..=96 => Some(json!("AwsConsoleSignIn")),
            _ => Some(json!("AwsVpceEvent")),
        };
        if let Some(event_type) = event_type {
            r.insert("eventType".into(), event_type);
        }
        let recipient = if rng.percent(92) { self.account.clone() } else { OTHER_ACCOUNT.to_string() };
        if let Some(recipient) = self.sometimes_null(json!(recipient)) {
            r.insert("recipientAccountId".into(), recipient);
        }

        let mut identity = self.identity(&mut r);
        self.origin(&mut r, &mut identity);
        match self.rng.below(50) {
            0 => {}
            1 => {
                r.insert("userIdentity".into(), Value::Null);
            }
            _ => {
                r.insert("userIdentity".into(), Value::Object(identity));
            }
        }
        self.auth_method(&mut r, source == "s3.amazonaws.com");
        if self.rng.percent(5) {
            r.insert("errorCode".into(), json!("AccessDenied"));
            r.insert("errorMessage".into(), json!("User is not authorized because no identity-based policy allows it"));
        }
        Value::Object(r)
    }

    fn identity(&mut self, r: &mut Map<String, Value>) -> Map<String, Value> {
        let mut identity = Map::new();
        let kind = match self.rng.below(100) {
            0..=79 => Some("IAMUser"),
            80..=84 => Some("AssumedRole"),
            85..=87 => Some("Root"),
            88..=90 => Some("AWSService"),
            91..=93 => Some("FederatedUser"),
            94..=96 => Some(""),
            _ => None,
        };
        if let Some(kind) = kind {
            identity.insert("type".into(), json!(kind));
        }
        let user = *self.rng.pick(USERS);
        let account = match self.rng.below(20) {
            0 => None,
            1 => Some(OTHER_ACCOUNT.to_string()),
            _ => Some(self.account.clone()),
        };
        let arn_account = account.clone().unwrap_or_else(|| self.account.clone());
        identity.insert("arn".into(), json!(format!("arn:aws:iam::{arn_account}:user/{user}")));
        identity.insert("principalId".into(), json!("AIDAEXAMPLEPRINCIPAL"));
        if let Some(account) = account {
            identity.insert("accountId".into(), json!(account));
        }
        if !self.rng.percent(2) {
            identity.insert("userName".into(), json!(user));
        }
        if self.rng.percent(15) {
            // A console session: temporary keys and a session context.
            identity.insert("accessKeyId".into(), json!("ASIAEXAMPLECONSOLE00"));
            identity.insert(
                "sessionContext".into(),
                json!({"attributes": {"creationDate": "2024-05-01T08:00:00Z", "mfaAuthenticated": "true"}}),
            );
            r.insert("sessionCredentialFromConsole".into(), json!("true"));
        } else if let Some(key) = self.sometimes_null(json!("AKIAEXAMPLEKEY000000")) {
            identity.insert("accessKeyId".into(), key);
        }
        identity
    }

    /// Where the call came from: an address, junk, a VPC endpoint, or a service.
    fn origin(&mut self, r: &mut Map<String, Value>, identity: &mut Map<String, Value>) {
        let source = match self.rng.below(100) {
            0..=39 => Some(json!(self.address())),
            40..=47 => Some(json!(*self.rng.pick(JUNK_SOURCES))),
            48..=49 => None,
            50 => Some(Value::Null),
            51..=70 => Some(self.endpoint(r)),
            71..=92 => Some(json!(self.service(identity))),
            _ => {
                // Endpoint fields present but empty or null: no endpoint after all.
                let empty = if self.rng.percent(50) { json!("") } else { Value::Null };
                r.insert("vpcEndpointId".into(), empty);
                Some(json!(self.address()))
            }
        };
        if let Some(source) = source {
            r.insert("sourceIPAddress".into(), source);
        }
    }

    /// Inside, at the edges of, and just outside the trusted ranges, and anywhere else.
    fn address(&mut self) -> String {
        let net = *self.rng.pick(&self.cidrs);
        let address = match self.rng.below(10) {
            0 => net.network(),
            1 => net.broadcast(),
            2 => shift(net.network(), -1),
            3 => shift(net.broadcast(), 1),
            4 | 5 => self.inside(net),
            6 => IpAddr::V4(Ipv4Addr::from(self.rng.next() as u32)),
            7 => {
                // Elsewhere in the documentation prefix, rarely inside the trusted /48.
                let low = u128::from(self.rng.next()) << 32 | u128::from(self.rng.next() as u32);
                IpAddr::V6(Ipv6Addr::from(0x2001_0db8_u128 << 96 | low))
            }
            8 => {
                let private = 0x0a00_0000 | (self.rng.next() as u32 & 0x00ff_ffff);
                IpAddr::V4(Ipv4Addr::from(private))
            }
            _ => {
                // IPv4-mapped IPv6 form of a trusted IPv4 address.
                let v4 = *self.rng.pick(&self.v4_cidrs);
                return format!("::ffff:{}", self.inside(v4));
            }
        };
        address.to_string()
    }

    fn inside(&mut self, net: IpNet) -> IpAddr {
        let (high, low) = (self.rng.next(), self.rng.next());
        match net {
            IpNet::V4(n) => IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) | (low as u32 & u32::from(n.hostmask())))),
            IpNet::V6(n) => {
                let random = u128::from(high) << 64 | u128::from(low);
                IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | (random & u128::from(n.hostmask()))))
            }
        }
    }

    /// Calls through our endpoints, AWS-owned ones, unlisted ones, and other accounts' ones;
    /// returns the (private, usually) source address recorded with them.
    fn endpoint(&mut self, r: &mut Map<String, Value>) -> Value {
        let listed = self.rng.pick(&self.endpoints).clone();
        let (id, account) = match self.rng.below(8) {
            0..=2 => {
                let account = match self.rng.below(5) {
                    0 => None,
                    1 => Some(json!("")),
                    2 => Some(Value::Null),
                    _ => Some(json!(self.account)),
                };
                (listed, account)
            }
            3 => (listed, Some(json!(OTHER_ACCOUNT))),
            4 | 5 => {
                let account = if self.rng.percent(70) { Some(json!(OTHER_ACCOUNT)) } else { None };
                (AWS_OWNED_ENDPOINT.to_string(), account)
            }
            _ => {
                let account = if self.rng.percent(50) { Some(json!(self.account)) } else { None };
                (UNLISTED_ENDPOINT.to_string(), account)
            }
        };
        r.insert("vpcEndpointId".into(), json!(id));
        if let Some(account) = account {
            r.insert("vpcEndpointAccountId".into(), account);
        }
        match self.rng.below(10) {
            0 => json!(self.address()),
            1 => json!(self.rng.pick(&self.services).clone()),
            _ => json!(format!("10.0.{}.{}", self.rng.below(256), self.rng.below(256))),
        }
    }

    /// A service acting for the user, told by `invokedBy`, by the source, or by both; returns
    /// the source address.
    fn service(&mut self, identity: &mut Map<String, Value>) -> String {
        let service = self.rng.pick(&self.services).clone();
        match self.rng.below(5) {
            0 | 1 => {
                identity.insert("invokedBy".into(), json!(service));
                service
            }
            2 => {
                identity.insert("invokedBy".into(), json!(service));
                self.address()
            }
            3 => service,
            _ => {
                // An empty invokedBy names no service.
                identity.insert("invokedBy".into(), json!(""));
                if self.rng.percent(50) { service } else { self.address() }
            }
        }
    }

    /// S3's `AuthenticationMethod`, in every shape `additionalEventData` comes in.
    fn auth_method(&mut self, r: &mut Map<String, Value>, s3: bool) {
        if !s3 && !self.rng.percent(10) {
            return;
        }
        let method = *self.rng.pick(&[Some("QueryString"), Some("QueryString"), Some("AuthHeader"), None]);
        let data = match (self.rng.below(10), method) {
            (0, _) => return,
            (1, _) => Value::Null,
            (2, Some(method)) => json!(format!("{{\"AuthenticationMethod\":\"{method}\"}}")),
            (_, Some(method)) => json!({"SignatureVersion": "SigV4", "AuthenticationMethod": method}),
            (_, None) => json!({"SignatureVersion": "SigV4"}),
        };
        r.insert("additionalEventData".into(), data);
    }
}

fn shift(ip: IpAddr, delta: i32) -> IpAddr {
    match ip {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a).wrapping_add_signed(delta))),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a).wrapping_add_signed(delta.into()))),
    }
}

/// Each record as generated JSON and as the trail reader parsed it, index for index.
struct Corpus {
    json: Vec<Value>,
    records: Vec<Record>,
}

fn corpus() -> &'static Corpus {
    static CORPUS: OnceLock<Corpus> = OnceLock::new();
    CORPUS.get_or_init(|| generate(0x10c4_57e9_a9e3_3e47, &shipped(), CORPUS_SIZE))
}

/// `size` records generated around `perimeter` (its account, CIDRs, endpoints and services),
/// written as trail files of every shape and read back.
fn generate(seed: u64, perimeter: &Perimeter, size: usize) -> Corpus {
    let mut generator = Generator::new(seed, perimeter);
    let json: Vec<Value> = (0..size).map(|_| generator.record()).collect();
    let mut records = Vec::with_capacity(json.len());
    // One file per chunk, cycling through the shapes the reader accepts.
    for (i, file) in json.chunks(RECORDS_PER_FILE).enumerate() {
        let text = match i % 3 {
            0 => json!({ "Records": file }).to_string(),
            1 => Value::Array(file.to_vec()).to_string(),
            _ => file.iter().map(Value::to_string).collect::<Vec<_>>().join("\n"),
        };
        let parsed = trail::parse_text(&text);
        assert!(parsed.bad.is_empty(), "file {i}: {:?}", parsed.bad);
        assert_eq!(parsed.records.len(), file.len(), "file {i}");
        records.extend(parsed.records);
    }
    Corpus { json, records }
}

// ---------------------------------------------------------------------------------------------
// Comparing the two sides.

fn shipped() -> Perimeter {
    Config::parse(include_str!("../rollout.yaml"), Path::new("rollout.yaml")).expect("rollout.yaml is valid").perimeter
}

fn exempt_users() -> HashSet<String> {
    EXEMPT_USERS.iter().map(|u| u.to_string()).collect()
}

fn rendered(perimeter: &Perimeter) -> Value {
    let json = perimeter.policy().to_json().expect("the policy fits IAM's size limit");
    serde_json::from_str(&json).expect("the policy is JSON")
}

/// The shipped perimeter and variants that switch each feature off or change it.
fn perimeters() -> Vec<(&'static str, Perimeter)> {
    let shipped = shipped();
    let variant = |change: fn(&mut Perimeter)| {
        let mut p = shipped.clone();
        change(&mut p);
        p
    };
    vec![
        ("shipped rollout.yaml", shipped.clone()),
        ("no AWS service calls", variant(|p| p.allow_aws_service_calls = false)),
        (
            "no service calls, no called_via",
            variant(|p| {
                p.allow_aws_service_calls = false;
                p.called_via_services.clear();
            }),
        ),
        ("presigned reads off", variant(|p| p.allow_presigned_s3_reads = false)),
        ("no exempt tag key", variant(|p| p.exempt_tag_key = None)),
        ("no trusted CIDRs", variant(|p| p.trusted_cidrs.clear())),
        (
            "no trusted VPCs or endpoints",
            variant(|p| {
                p.trusted_vpcs.clear();
                p.trusted_endpoints.clear();
            }),
        ),
        (
            "custom not_actions",
            variant(|p| {
                p.not_actions = ["s3:Get*", "kms:Decrypt", "ec2:Describe?nstances", "IAM:list*", "rds-db:connect"]
                    .map(String::from)
                    .into();
            }),
        ),
        (
            "nothing trusted, empty Condition",
            variant(|p| {
                p.trusted_cidrs.clear();
                p.trusted_vpcs.clear();
                p.trusted_endpoints.clear();
                p.allow_aws_service_calls = false;
                p.called_via_services.clear();
                p.allow_presigned_s3_reads = false;
                p.exempt_tag_key = None;
            }),
        ),
    ]
}

#[derive(Default)]
struct Tally {
    kinds: BTreeMap<&'static str, usize>,
    reasons: BTreeMap<&'static str, usize>,
    disagreements: usize,
    examples: Vec<String>,
}

const MAX_EXAMPLES: usize = 10;

/// Runs the corpus through the classifier and, for in-scope records, through the evaluator.
/// `perimeter` supplies the context mapping (endpoints, account, exempt tag key).
fn compare(policy: &Value, perimeter: &Perimeter, classify: impl Fn(&Record) -> Verdict) -> Tally {
    compare_on(corpus(), policy, perimeter, classify)
}

/// [`compare`] over another corpus.
fn compare_on(corpus: &Corpus, policy: &Value, perimeter: &Perimeter, classify: impl Fn(&Record) -> Verdict) -> Tally {
    let exempt = exempt_users();
    let mut tally = Tally::default();
    for (json, record) in corpus.json.iter().zip(&corpus.records) {
        let verdict = classify(record);
        *tally.kinds.entry(verdict.kind_name()).or_default() += 1;
        *tally.reasons.entry(verdict.reason_name()).or_default() += 1;
        if matches!(verdict, Verdict::NotApplicable(_)) {
            continue;
        }
        let request = request_context(json, perimeter, &exempt);
        let denied = policy_denies(policy, &request);
        if denied != matches!(verdict, Verdict::WouldDeny(_)) {
            tally.disagreements += 1;
            if tally.examples.len() < MAX_EXAMPLES {
                tally.examples.push(format!(
                    "record:  {json}\ncontext: {request:?}\npolicy denies: {denied}, classifier: {verdict:?}"
                ));
            }
        }
    }
    tally
}

#[test]
fn policy_and_classifier_agree_on_every_record() {
    let mut examples = Vec::new();
    let mut disagreements = 0;
    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    for (name, perimeter) in perimeters() {
        let policy = rendered(&perimeter);
        let exempt = exempt_users();
        let tally = compare(&policy, &perimeter, |record| perimeter.classify(record, &exempt));
        println!("{name:34} {:?} disagreements: {}", tally.kinds, tally.disagreements);
        // Plenty of each verdict, or the comparison proves little.
        for kind in ["allowed", "would_deny", "not_applicable"] {
            let count = tally.kinds.get(kind).copied().unwrap_or(0);
            assert!(count >= CORPUS_SIZE / 20, "{name}: only {count} {kind} records: {:?}", tally.kinds);
        }
        for (reason, count) in tally.reasons {
            *reasons.entry(reason).or_default() += count;
        }
        disagreements += tally.disagreements;
        let room = MAX_EXAMPLES.saturating_sub(examples.len());
        examples.extend(tally.examples.into_iter().take(room).map(|e| format!("[{name}]\n{e}")));
    }
    // Every branch of the classifier is exercised somewhere.
    let all_reasons = AllowReason::ALL
        .iter()
        .map(|r| r.as_str())
        .chain(DenyReason::ALL.iter().map(|r| r.as_str()))
        .chain(SkipReason::ALL.iter().map(|r| r.as_str()));
    for reason in all_reasons {
        let count = reasons.get(reason).copied().unwrap_or(0);
        assert!(count >= 20, "reason {reason} reached only {count} times: {reasons:?}");
    }
    println!("reasons over all perimeters: {reasons:?}");
    if disagreements > 0 {
        panic!(
            "the policy and the classifier disagree on {disagreements} records; the first {}:\n\n{}",
            examples.len(),
            examples.join("\n\n")
        );
    }
}

/// Three accounts on top of the shipped file: two with VPCs and endpoints of their own.
const ACCOUNTS: &str = r#"
accounts:
  role: "arn:aws:iam::{account}:role/lockstep-rollout"
  list:
    - id: "123456789012"
    - id: "111122223333"
    - id: "444455556666"
  perimeter:
    "111122223333":
      trusted_vpcs: [vpc-0c1d2e3f]
      trusted_vpc_endpoints: {vpce-0c1d2e3f: vpc-0c1d2e3f}
    "444455556666":
      trusted_vpc_endpoints: {vpce-44445555: vpc-1b2c3d4e}
"#;

#[test]
fn each_accounts_policy_and_classifier_agree() {
    let text = format!("{}{ACCOUNTS}", include_str!("../rollout.yaml"));
    let config = Config::parse(&text, Path::new("rollout.yaml")).expect("the three-account file is valid");
    assert_eq!(config.accounts.len(), 3);
    // Every account's records also come through the other accounts' endpoints.
    let every_endpoint: BTreeMap<String, String> =
        config.accounts.iter().flat_map(|a| a.perimeter.trusted_endpoints.clone()).collect();
    let exempt = exempt_users();
    for (i, account) in config.accounts.iter().enumerate() {
        let mut around = account.perimeter.clone();
        around.trusted_endpoints = every_endpoint.clone();
        let corpus = generate(0x5eed_0000 + i as u64, &around, CORPUS_SIZE / 3);
        let policy = rendered(&account.perimeter);
        let tally = compare_on(&corpus, &policy, &account.perimeter, |r| account.perimeter.classify(r, &exempt));
        println!("{account} {:?} disagreements: {}", tally.kinds, tally.disagreements);
        for reason in ["trusted_endpoint", "untrusted_endpoint", "other_account"] {
            assert!(tally.reasons.get(reason).is_some_and(|n| *n > 20), "{account}: {:?}", tally.reasons);
        }
        assert_eq!(tally.disagreements, 0, "{account}:\n\n{}", tally.examples.join("\n\n"));
    }
}

// ---------------------------------------------------------------------------------------------
// The check bites when either side changes alone.

fn disagreements_with_shipped_classifier(policy: &Value) -> usize {
    let perimeter = shipped();
    let exempt = exempt_users();
    compare(policy, &perimeter, |record| perimeter.classify(record, &exempt)).disagreements
}

#[test]
fn a_policy_without_the_ip_condition_is_caught() {
    let mut policy = rendered(&shipped());
    for statement in policy["Statement"].as_array_mut().unwrap() {
        let removed = statement["Condition"].as_object_mut().unwrap().remove("NotIpAddressIfExists");
        assert!(removed.is_some(), "the shipped policy trusts CIDRs in every statement");
    }
    assert!(disagreements_with_shipped_classifier(&policy) > 0);
}

#[test]
fn a_policy_that_denies_presigned_reads_is_caught() {
    let mut policy = rendered(&shipped());
    let not_action = policy["Statement"][0]["NotAction"].as_array_mut().unwrap();
    let before = not_action.len();
    not_action.retain(|a| a != "s3:GetObject");
    assert_eq!(not_action.len(), before - 1);
    assert!(disagreements_with_shipped_classifier(&policy) > 0);
}

#[test]
fn a_classifier_that_ignores_presigned_reads_is_caught() {
    let perimeter = shipped();
    let blind = Perimeter { allow_presigned_s3_reads: false, ..perimeter.clone() };
    let exempt = exempt_users();
    let tally = compare(&rendered(&perimeter), &perimeter, |record| blind.classify(record, &exempt));
    assert!(tally.disagreements > 0);
}

#[test]
fn a_classifier_that_ignores_exemptions_is_caught() {
    let perimeter = shipped();
    let tally = compare(&rendered(&perimeter), &perimeter, |record| perimeter.classify(record, &HashSet::new()));
    assert!(tally.disagreements > 0);
}

// ---------------------------------------------------------------------------------------------
// The evaluator itself, on hand-written policies.

fn deny_all_when(condition: Value) -> Value {
    json!({"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Action": "*", "Resource": "*", "Condition": condition}]})
}

fn key_policy(operator: &str, key: &str, values: Value) -> Value {
    deny_all_when(json!({ operator: { key: values } }))
}

#[test]
fn evaluator_missing_keys() {
    let bare = Request::new("ec2:DescribeInstances");
    let cases = [
        ("StringEquals", false),
        ("StringNotEquals", true),
        ("StringEqualsIfExists", true),
        ("StringNotEqualsIfExists", true),
        ("Bool", false),
        ("BoolIfExists", true),
        ("IpAddress", false),
        ("NotIpAddress", true),
        ("IpAddressIfExists", true),
        ("NotIpAddressIfExists", true),
        ("ForAllValues:StringEquals", true),
        ("ForAllValues:StringNotEquals", true),
        ("ForAnyValue:StringEquals", false),
        ("ForAnyValue:StringEqualsIfExists", true),
    ];
    for (operator, denies) in cases {
        let value = if operator.contains("Ip") { "203.0.113.0/24" } else { "true" };
        let policy = key_policy(operator, "aws:SomeKey", json!(value));
        assert_eq!(policy_denies(&policy, &bare), denies, "{operator} on a missing key");
        // A key present without values is missing too.
        assert_eq!(policy_denies(&policy, &Request::new("ec2:RunInstances").with("aws:SomeKey", &[])), denies);
    }
}

#[test]
fn evaluator_if_exists_on_a_present_key_is_the_plain_operator() {
    let policy = key_policy("StringNotEqualsIfExists", "aws:SourceVpc", json!(["vpc-1", "vpc-2"]));
    let from = |vpc| Request::new("s3:PutObject").with("aws:SourceVpc", &[vpc]);
    assert!(!policy_denies(&policy, &from("vpc-2")));
    assert!(policy_denies(&policy, &from("vpc-3")));
    let policy = key_policy("BoolIfExists", "aws:ViaAWSService", json!("false"));
    assert!(policy_denies(&policy, &Request::new("s3:PutObject").with("aws:ViaAWSService", &["FALSE"])));
    assert!(!policy_denies(&policy, &Request::new("s3:PutObject").with("aws:ViaAWSService", &["true"])));
}

#[test]
fn evaluator_values_are_ored_and_keys_and_operators_anded() {
    let request =
        Request::new("s3:GetObject").with("aws:PrincipalTag/team", &["blue"]).with("aws:SourceIp", &["203.0.113.9"]);
    assert!(policy_denies(&key_policy("StringEquals", "aws:PrincipalTag/team", json!(["red", "blue"])), &request));
    assert!(!policy_denies(&key_policy("StringNotEquals", "aws:PrincipalTag/team", json!(["red", "blue"])), &request));
    assert!(policy_denies(&key_policy("StringNotEquals", "aws:PrincipalTag/team", json!(["red", "green"])), &request));
    // Key names match case-insensitively, values do not.
    assert!(!policy_denies(&key_policy("StringEquals", "AWS:PRINCIPALTAG/TEAM", json!("Blue")), &request));
    assert!(policy_denies(&key_policy("StringEquals", "AWS:PRINCIPALTAG/TEAM", json!("blue")), &request));

    let both = |ip: &str| {
        deny_all_when(json!({
            "StringEquals": {"aws:PrincipalTag/team": "blue", "aws:PrincipalTag/missing": "x"},
            "IpAddress": {"aws:SourceIp": ip},
        }))
    };
    assert!(!policy_denies(&both("203.0.113.0/24"), &request), "one key of a block fails");
    let two_operators = |ip: &str| {
        deny_all_when(json!({"StringEquals": {"aws:PrincipalTag/team": "blue"}, "IpAddress": {"aws:SourceIp": ip}}))
    };
    assert!(policy_denies(&two_operators("203.0.113.0/24"), &request));
    assert!(!policy_denies(&two_operators("198.51.100.0/24"), &request), "one operator fails");
}

#[test]
fn evaluator_set_operators() {
    let policy = key_policy("ForAllValues:StringNotEquals", "aws:CalledVia", json!(["athena.amazonaws.com"]));
    let via = |services: &[&str]| Request::new("s3:GetObject").with("aws:CalledVia", services);
    assert!(policy_denies(&policy, &via(&["kms.amazonaws.com"])));
    assert!(!policy_denies(&policy, &via(&["athena.amazonaws.com"])));
    assert!(!policy_denies(&policy, &via(&["kms.amazonaws.com", "athena.amazonaws.com"])), "every value must pass");

    let policy = key_policy("ForAnyValue:StringEquals", "aws:CalledVia", json!("athena.amazonaws.com"));
    assert!(policy_denies(&policy, &via(&["kms.amazonaws.com", "athena.amazonaws.com"])));
    assert!(!policy_denies(&policy, &via(&["kms.amazonaws.com"])));
}

#[test]
fn evaluator_addresses() {
    let from = |ip: &str| Request::new("ec2:RunInstances").with("aws:SourceIp", &[ip]);
    let outside =
        key_policy("NotIpAddress", "aws:SourceIp", json!(["203.0.113.0/24", "2001:db8:1234::/48", "198.51.100.7"]));
    assert!(!policy_denies(&outside, &from("203.0.113.255")));
    assert!(!policy_denies(&outside, &from("2001:db8:1234:ffff::1")));
    assert!(!policy_denies(&outside, &from("198.51.100.7")), "a bare address is a /32");
    assert!(policy_denies(&outside, &from("198.51.100.8")));
    assert!(policy_denies(&outside, &from("2001:db8:1235::")));
    // Not an address: in no range, so the negated operator holds and the plain one does not.
    assert!(policy_denies(&outside, &from("035.249.253.232")));
    assert!(policy_denies(&outside, &from("AWS Internal")));
    let inside = key_policy("IpAddress", "aws:SourceIp", json!("203.0.113.0/24"));
    assert!(!policy_denies(&inside, &from("AWS Internal")));
    assert!(policy_denies(&inside, &from("203.0.113.1")));
}

#[test]
fn evaluator_actions() {
    let statement =
        |element: &str, actions: Value| json!({"Statement": {"Effect": "Deny", element: actions, "Resource": ["*"]}});
    let denies = |policy: &Value, action: &str| policy_denies(policy, &Request::new(action));
    let not_action = statement("NotAction", json!(["es:ES*", "rds-db:connect", "s3:Get?bject"]));
    assert!(!denies(&not_action, "ES:eshttpget"));
    assert!(denies(&not_action, "es:DescribeDomains"));
    assert!(!denies(&not_action, "rds-db:Connect"));
    assert!(denies(&not_action, "rds-db:connectx"));
    assert!(!denies(&not_action, "s3:GetObject"));
    assert!(denies(&not_action, "s3:GetObjectAcl"));
    let action = statement("Action", json!("s3:*Object*"));
    assert!(denies(&action, "s3:GetObjectObjectAcl"));
    assert!(!denies(&action, "s3:ListBucket"));
    let allow = json!({"Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]});
    assert!(!denies(&allow, "s3:GetObject"), "only Deny statements count");
}

#[test]
fn wildcards() {
    assert!(wildcard_matches("*", ""));
    assert!(wildcard_matches("a*b*c", "aXbYbZc"));
    assert!(!wildcard_matches("a*b*c", "aXbYbZ"));
    assert!(wildcard_matches("elasticfilesystem:client*", "elasticfilesystem:ClientMount"));
    assert!(!wildcard_matches("dax:*", "dynamodb:GetItem"));
    assert!(!wildcard_matches("s3:Get?bject", "s3:GetObject2"));
    assert!(!wildcard_matches("?", ""));
}

#[test]
#[should_panic(expected = "unknown condition operator")]
fn evaluator_refuses_unknown_operators() {
    policy_denies(
        &key_policy("DateGreaterThan", "aws:CurrentTime", json!("2024-01-01T00:00:00Z")),
        &Request::new("s3:GetObject"),
    );
}
