//! CloudTrail records: a tolerant model of one record and readers for the file shapes seen in the
//! wild (`{"Records": [...]}` as CloudTrail writes it, a bare JSON array, or one record per line;
//! each plain or gzip-compressed).
//!
//! Every field may be missing or null. A record that does not parse at all is reported with its
//! position and skipped; the rest of the file is still read.

use std::borrow::Cow;
use std::fmt;
use std::io::Read;
use std::path::Path;

use serde::Deserialize;
use serde_json::value::RawValue;

/// One CloudTrail record, tolerant of missing and unknown fields.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Record {
    #[serde(rename = "eventID")]
    /// `eventID`: unique per event, the same in every delivery of it.
    pub event_id: Option<String>,
    /// `eventTime`, RFC 3339.
    pub event_time: Option<String>,
    /// `eventSource`, the service called (`s3.amazonaws.com`).
    pub event_source: Option<String>,
    /// `eventName`, the API operation.
    pub event_name: Option<String>,
    /// `eventType` (`AwsApiCall`, `AwsServiceEvent`, `AwsConsoleSignIn`, ...).
    pub event_type: Option<String>,
    /// `awsRegion`.
    pub aws_region: Option<String>,
    /// `recipientAccountId`: the account that received the call.
    pub recipient_account_id: Option<String>,
    #[serde(rename = "sourceIPAddress")]
    /// `sourceIPAddress`: an address, or a service name for calls made by a service.
    pub source_ip_address: Option<String>,
    /// `errorCode`, for failed calls.
    pub error_code: Option<String>,
    /// `errorMessage`, which may state the cause of a denial.
    pub error_message: Option<String>,
    /// `userIdentity`: who made the call.
    pub user_identity: Option<UserIdentity>,
    /// `vpcEndpointId`, for calls through a VPC endpoint.
    pub vpc_endpoint_id: Option<String>,
    /// `vpcEndpointAccountId`: the endpoint's owner.
    pub vpc_endpoint_account_id: Option<String>,
    #[serde(deserialize_with = "auth_method", rename = "additionalEventData")]
    /// S3's `additionalEventData.AuthenticationMethod` (`QueryString` for presigned URLs).
    pub s3_auth_method: Option<String>,
}

/// Who made a call, as CloudTrail records it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct UserIdentity {
    #[serde(rename = "type")]
    /// `type`: `IAMUser`, `AssumedRole`, `Root`, `AWSService`, ...
    pub kind: Option<String>,
    /// The caller's ARN.
    pub arn: Option<String>,
    /// `userName`, for IAM users.
    pub user_name: Option<String>,
    /// The caller's account.
    pub account_id: Option<String>,
    /// The access key used.
    pub access_key_id: Option<String>,
    /// `invokedBy`: the service that made the call for the caller.
    pub invoked_by: Option<String>,
}

/// Pulls `AuthenticationMethod` out of `additionalEventData`, which is an object in trail files
/// and JSON text in Athena; anything else is ignored rather than failing the record.
fn auth_method<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    struct Data {
        #[serde(rename = "AuthenticationMethod")]
        method: Option<String>,
    }
    let value = Option::<serde_json::Value>::deserialize(de)?;
    Ok(match value {
        Some(serde_json::Value::Object(map)) => {
            map.get("AuthenticationMethod").and_then(|m| m.as_str()).map(str::to_string)
        }
        Some(serde_json::Value::String(text)) => serde_json::from_str::<Data>(&text).ok().and_then(|d| d.method),
        _ => None,
    })
}

/// The message-only view of a denial, for evidence that has no perimeter at hand (hourly
/// aggregates, feeds). The guard attributes denials by cause with [`crate::guard::attribute`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Denial {
    /// "explicit deny in an identity-based policy", or the message names the lockdown policy:
    /// what the lockdown policy produces.
    ExplicitIdentityDeny,
    /// Any other access denial ("no identity-based policy allows ...", SCPs, resource policies).
    Other,
}

/// The kind of policy a denial message blames (IAM user guide, "access denied error messages").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyType {
    /// An identity-based policy (user, group or role).
    IdentityBased,
    /// A resource-based policy (bucket, key, queue policy).
    ResourceBased,
    /// An organization service control policy.
    ServiceControl,
    /// An organization resource control policy.
    ResourceControl,
    /// A permissions boundary.
    PermissionsBoundary,
    /// A session policy.
    Session,
    /// A VPC endpoint policy.
    VpcEndpoint,
    /// "explicit deny in a policy", or a type this parser does not know.
    Unnamed,
}

/// The phrases IAM uses for each policy type, lower case, as they follow "in a(n) " or "no ".
const POLICY_PHRASES: &[(&str, PolicyType)] = &[
    ("identity-based policy", PolicyType::IdentityBased),
    ("resource-based policy", PolicyType::ResourceBased),
    ("service control policy", PolicyType::ServiceControl),
    ("resource control policy", PolicyType::ResourceControl),
    ("permissions boundary", PolicyType::PermissionsBoundary),
    ("session policy", PolicyType::Session),
    ("vpc endpoint policy", PolicyType::VpcEndpoint),
];

/// What a denial's code and message say caused it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, Deserialize)]
#[serde(tag = "stated", rename_all = "snake_case")]
pub enum StatedCause {
    /// "... because no <type> policy allows the <action> action".
    ImplicitDeny {
        /// The policy type that allows nothing.
        policy_type: PolicyType,
    },
    /// "... with an explicit deny in a <type> policy[: <policy ARN>]".
    ExplicitDeny {
        /// The policy type that denied.
        policy_type: PolicyType,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        /// The denying policy's ARN, when the message names it.
        policy_arn: Option<String>,
    },
    /// `VpceAccessDenied`: a VPC endpoint policy refused the request (network-activity events).
    VpcEndpointDenied,
    /// No cause given: S3's bare "Access Denied", EC2's "Encoded authorization failure message",
    /// "not authorized to perform" without "because"/"with", or no message at all.
    Unstated,
}

/// A refused call: the error code and what the message says caused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The `errorCode`.
    pub code: String,
    /// What the message says caused it.
    pub stated: StatedCause,
}

/// Whether an `errorCode` is an access denial. AWS's own alarm template matches `AccessDenied*`
/// and `*UnauthorizedOperation`; `Forbidden` and `VpceAccessDenied` are denials too.
/// `ThrottlingException` and other errors are not.
pub(crate) fn is_denial_code(code: &str) -> bool {
    code.starts_with("AccessDenied")
        || code.ends_with("UnauthorizedOperation")
        || matches!(code, "Forbidden" | "ForbiddenException" | "VpceAccessDenied")
}

/// Reads the cause out of a denial message. Matching is case-insensitive and looks for IAM's
/// fixed phrases anywhere, so prefixes such as EC2's "You are not authorized to perform this
/// operation. User: ..." and suffixes such as "Encoded authorization failure message: ..." do not
/// matter.
pub(crate) fn stated_cause(code: &str, message: &str) -> StatedCause {
    if code == "VpceAccessDenied" {
        return StatedCause::VpcEndpointDenied;
    }
    let lower = message.to_ascii_lowercase();
    if let Some(at) = lower.find("explicit deny in ") {
        let rest = &lower[at + "explicit deny in ".len()..];
        let rest = rest.strip_prefix("an ").or_else(|| rest.strip_prefix("a ")).unwrap_or(rest);
        let (policy_type, after) = policy_phrase(rest);
        // Byte offsets agree between `lower` and `message`: ASCII lowering keeps lengths.
        let after_at = message.len() - after.len();
        let policy_arn = message[after_at..]
            .strip_prefix(": ")
            .filter(|tail| tail.starts_with("arn:"))
            .and_then(|tail| tail.split(char::is_whitespace).next())
            .map(|arn| arn.trim_end_matches(['.', ',', ')', ';']).to_string());
        return StatedCause::ExplicitDeny { policy_type, policy_arn };
    }
    if let Some(at) = lower.find("because no ") {
        let (policy_type, _) = policy_phrase(&lower[at + "because no ".len()..]);
        return StatedCause::ImplicitDeny { policy_type };
    }
    StatedCause::Unstated
}

/// The policy type a phrase starts with, and the text after it. An unknown phrase is `Unnamed`
/// and consumes only a leading "policy".
fn policy_phrase(text: &str) -> (PolicyType, &str) {
    POLICY_PHRASES
        .iter()
        .find_map(|(phrase, kind)| text.strip_prefix(phrase).map(|rest| (*kind, rest)))
        .unwrap_or_else(|| (PolicyType::Unnamed, text.strip_prefix("policy").unwrap_or(text)))
}

impl Record {
    /// The IAM user name, for calls made by IAM users.
    pub fn user_name(&self) -> Option<&str> {
        self.user_identity.as_ref()?.user_name.as_deref()
    }

    /// The caller's ARN.
    pub fn user_arn(&self) -> Option<&str> {
        self.user_identity.as_ref()?.arn.as_deref()
    }

    /// The IAM action, `s3:GetObject`, from event source and name.
    pub fn action(&self) -> Option<String> {
        let source = self.event_source.as_deref()?;
        let name = self.event_name.as_deref()?;
        Some(format!("{}:{name}", action_prefix(source)))
    }

    /// When the call was made; `None` when missing or malformed.
    pub fn event_time(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        let text = self.event_time.as_deref()?;
        chrono::DateTime::parse_from_rfc3339(text).ok().map(|t| t.to_utc())
    }

    /// Whether the call was refused for lack of permission, and what the message says caused
    /// it. Throttling and other errors are not denials.
    pub fn refusal(&self) -> Option<Refusal> {
        let code = self.error_code.as_deref().filter(|c| is_denial_code(c))?;
        let stated = stated_cause(code, self.error_message.as_deref().unwrap_or(""));
        Some(Refusal { code: code.to_string(), stated })
    }

    /// The message-only view: an explicit identity-based deny (or one naming the lockdown
    /// policy) versus any other denial.
    pub fn denial(&self, lockdown_policy: &str) -> Option<Denial> {
        let refusal = self.refusal()?;
        let message = self.error_message.as_deref().unwrap_or("");
        let identity_deny =
            matches!(refusal.stated, StatedCause::ExplicitDeny { policy_type: PolicyType::IdentityBased, .. });
        if identity_deny || names_policy(message, lockdown_policy) {
            Some(Denial::ExplicitIdentityDeny)
        } else {
            Some(Denial::Other)
        }
    }
}

/// Whether a policy ARN is the policy called `name` (at any path).
pub(crate) fn arn_names_policy(arn: &str, name: &str) -> bool {
    !name.is_empty()
        && arn
            .split_once(":policy/")
            .is_some_and(|(_, path_and_name)| path_and_name == name || path_and_name.ends_with(&format!("/{name}")))
}

/// Whether a denial message names `name` as the denying policy. AWS appends the denying policy's
/// ARN after "... policy: " (`...explicit deny in an identity-based policy:
/// arn:aws:iam::<acct>:policy/[path/]<name>`); an ARN after "on resource: " is what was asked for,
/// not what denied it, and does not count.
fn names_policy(message: &str, name: &str) -> bool {
    message.match_indices("policy: arn:").any(|(at, _)| {
        let arn = message[at + "policy: ".len()..].split(char::is_whitespace).next().unwrap_or("");
        arn_names_policy(arn.trim_end_matches(['.', ',', ')']), name)
    })
}

/// The IAM service prefix for an event source; most are the host's first label.
pub fn action_prefix(event_source: &str) -> &str {
    let host = event_source.strip_suffix(".amazonaws.com").unwrap_or(event_source);
    match host {
        "monitoring" => "cloudwatch",
        "email" => "ses",
        "elasticmapreduce" => "elasticmapreduce",
        "runtime.sagemaker" | "api.sagemaker" => "sagemaker",
        "execute-api" => "execute-api",
        other => other.split('.').next().unwrap_or(other),
    }
}

/// Where a bad record sits in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// Index into the `Records` array or the bare array.
    Index(usize),
    /// 1-based line of a one-record-per-line file.
    Line(usize),
    /// The file as a whole.
    File,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Index(i) => write!(f, "record {i}"),
            Position::Line(n) => write!(f, "line {n}"),
            Position::File => write!(f, "file"),
        }
    }
}

/// A record that could not be used, where it was and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    /// Where in the file the record is.
    pub position: Position,
    /// Why it cannot be used.
    pub reason: String,
}

/// What one file yielded.
#[derive(Debug, Default)]
pub struct Parsed {
    /// The records that parsed.
    pub records: Vec<Record>,
    /// The records that did not, and why.
    pub bad: Vec<BadRecord>,
}

/// A trail file could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read {path}: {source}")]
    /// The file could not be opened or read.
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    /// The file is not CloudTrail JSON.
    Malformed {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
}

/// Whether a file inside a directory looks like trail data (explicitly named files are always read).
pub(crate) fn is_trail_file_name(name: &str) -> bool {
    [".json", ".json.gz", ".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz"].iter().any(|ext| name.ends_with(ext))
}

/// Expands files and directories (recursively, in name order, following links) into the trail
/// files to read. An entry that cannot be walked (a dangling link, a link loop, an unreadable
/// folder) or a trail-named entry that is not a regular file (a FIFO, a socket, a device) is
/// returned as an error with its path and reason, and the walk goes on.
pub fn expand_inputs(inputs: &[std::path::PathBuf]) -> Vec<Result<std::path::PathBuf, ReadError>> {
    let mut files = Vec::new();
    for input in inputs {
        if !input.is_dir() {
            files.push(Ok(input.clone()));
            continue;
        }
        for entry in walkdir::WalkDir::new(input).follow_links(true).sort_by_file_name() {
            match entry {
                Ok(e) if e.file_type().is_dir() => {}
                Ok(e) if !is_trail_file_name(&e.file_name().to_string_lossy()) => {}
                Ok(e) if e.file_type().is_file() => files.push(Ok(e.into_path())),
                Ok(e) => files.push(Err(ReadError::Io {
                    path: e.path().display().to_string(),
                    source: std::io::Error::other("not a regular file"),
                })),
                Err(e) => files.push(Err(ReadError::Io {
                    path: e.path().map(|p| p.display().to_string()).unwrap_or_else(|| input.display().to_string()),
                    source: e.into(),
                })),
            }
        }
    }
    files
}

/// The most bytes one trail file may inflate to unless configured otherwise
/// (`evidence.max_inflated_size`).
pub const DEFAULT_MAX_INFLATED: u64 = crate::config::DEFAULT_MAX_INFLATED_SIZE;

/// Reads and parses one trail file from disk within the default inflate limit.
pub fn read_file(path: &Path) -> Result<Parsed, ReadError> {
    read_file_within(path, DEFAULT_MAX_INFLATED)
}

/// Reads and parses one trail file from disk (gzip detected by its magic bytes). Only regular
/// files are opened (a FIFO would block), and no more than `max_inflated` bytes are read or
/// inflated.
pub fn read_file_within(path: &Path, max_inflated: u64) -> Result<Parsed, ReadError> {
    let io = |source| ReadError::Io { path: path.display().to_string(), source };
    let metadata = std::fs::metadata(path).map_err(io)?;
    if !metadata.is_file() {
        return Err(io(std::io::Error::other("not a regular file")));
    }
    let mut raw = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(max_inflated.saturating_add(1)).read_to_end(&mut raw))
        .map_err(io)?;
    parse_bytes_within(&raw, max_inflated).map_err(|why| ReadError::Malformed { path: path.display().to_string(), why })
}

/// Parses the bytes of one trail file, compressed or not, within the default inflate limit.
pub fn parse_bytes(raw: &[u8]) -> Result<Parsed, String> {
    parse_bytes_within(raw, DEFAULT_MAX_INFLATED)
}

/// Parses the bytes of one trail file, compressed or not; a file that is or inflates to more
/// than `max_inflated` bytes is refused, having inflated no more than that.
pub fn parse_bytes_within(raw: &[u8], max_inflated: u64) -> Result<Parsed, String> {
    let text = decompress(raw, max_inflated)?;
    let text = std::str::from_utf8(&text).map_err(|e| format!("not UTF-8 text: {e}"))?;
    Ok(parse_text(text))
}

fn decompress(raw: &[u8], max_inflated: u64) -> Result<Cow<'_, [u8]>, String> {
    let too_large = || format!("larger than {max_inflated} bytes inflated (evidence.max_inflated_size)");
    if raw.len() as u64 > max_inflated {
        return Err(too_large());
    }
    if raw.starts_with(&[0x1f, 0x8b]) {
        // Trail files are ~10x compressed; reserving up front avoids repeated regrowth.
        let expected = raw.len().saturating_mul(10).min(usize::try_from(max_inflated).unwrap_or(usize::MAX));
        let mut out = Vec::with_capacity(expected);
        flate2::read::MultiGzDecoder::new(raw)
            .take(max_inflated.saturating_add(1))
            .read_to_end(&mut out)
            .map_err(|e| format!("bad gzip data: {e}"))?;
        if out.len() as u64 > max_inflated {
            return Err(too_large());
        }
        Ok(Cow::Owned(out))
    } else {
        Ok(Cow::Borrowed(raw))
    }
}

/// Parses decompressed text in any of the accepted shapes.
pub fn parse_text(text: &str) -> Parsed {
    let trimmed = text.trim_start_matches('\u{feff}').trim_start();
    if trimmed.starts_with('[') {
        return parse_array(trimmed);
    }
    if trimmed.starts_with('{') {
        #[derive(Deserialize)]
        struct Envelope<'a> {
            #[serde(rename = "Records", borrow)]
            records: Vec<&'a RawValue>,
        }
        if let Ok(envelope) = serde_json::from_str::<Envelope>(trimmed) {
            return parse_each(envelope.records.into_iter().enumerate().map(|(i, r)| (Position::Index(i), r.get())));
        }
    }
    parse_lines(text)
}

fn parse_array(text: &str) -> Parsed {
    match serde_json::from_str::<Vec<&RawValue>>(text) {
        Ok(items) => parse_each(items.into_iter().enumerate().map(|(i, r)| (Position::Index(i), r.get()))),
        Err(e) => Parsed {
            records: Vec::new(),
            bad: vec![BadRecord { position: Position::File, reason: format!("not a JSON array of records: {e}") }],
        },
    }
}

fn parse_lines(text: &str) -> Parsed {
    let lines = text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| (Position::Line(n + 1), line));
    let parsed = parse_each(lines);
    if parsed.records.is_empty() && !parsed.bad.is_empty() {
        // Nothing parsed line by line either: say what the file is not, once.
        return Parsed {
            records: Vec::new(),
            bad: vec![BadRecord {
                position: Position::File,
                reason: format!(
                    "not a CloudTrail file ({{\"Records\": [...]}}, a JSON array, or one record per line); first error at {}: {}",
                    parsed.bad[0].position, parsed.bad[0].reason
                ),
            }],
        };
    }
    parsed
}

fn parse_each<'a>(items: impl Iterator<Item = (Position, &'a str)>) -> Parsed {
    let mut parsed = Parsed::default();
    for (position, text) in items {
        match serde_json::from_str::<Record>(text) {
            Ok(record) => parsed.records.push(record),
            Err(e) => parsed.bad.push(BadRecord { position, reason: e.to_string() }),
        }
    }
    parsed
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str = r#"{"eventTime":"2024-01-02T03:04:05Z","eventSource":"s3.amazonaws.com","eventName":"GetObject",
        "sourceIPAddress":"203.0.113.9","userIdentity":{"type":"IAMUser","userName":"alice","arn":"arn:aws:iam::123456789012:user/alice"},
        "additionalEventData":{"AuthenticationMethod":"QueryString","SignatureVersion":"SigV4"}}"#;

    #[test]
    fn all_shapes_parse_to_the_same_record() {
        let one = ONE.replace('\n', " ");
        let shapes = [format!("{{\"Records\": [{one}]}}"), format!("[{one}]"), format!("{one}\n")];
        for shape in shapes {
            let parsed = parse_text(&shape);
            assert!(parsed.bad.is_empty(), "{shape}: {:?}", parsed.bad);
            assert_eq!(parsed.records.len(), 1);
            let r = &parsed.records[0];
            assert_eq!(r.user_name(), Some("alice"));
            assert_eq!(r.action().as_deref(), Some("s3:GetObject"));
            assert_eq!(r.s3_auth_method.as_deref(), Some("QueryString"));
        }
    }

    #[test]
    fn gzip_is_detected() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let text = format!("{{\"Records\": [{ONE}]}}");
        enc.write_all(text.as_bytes()).unwrap();
        let compressed = enc.finish().unwrap();
        let parsed = parse_bytes(&compressed).unwrap();
        assert_eq!(parsed.records.len(), 1);
        assert!(parse_bytes(&[0x1f, 0x8b, 0, 1, 2]).is_err());
        let inflated = text.len() as u64;
        assert!(parse_bytes_within(&compressed, inflated).is_ok());
        let refused = parse_bytes_within(&compressed, inflated - 1).unwrap_err();
        assert!(refused.contains("max_inflated_size"), "{refused}");
        assert!(parse_bytes_within(b"[]", 1).is_err(), "plain files count their own size");
    }

    #[test]
    fn nulls_and_missing_fields_are_fine_and_bad_records_are_skipped() {
        let text = r#"{"Records": [
            {"eventTime": null, "userIdentity": null, "additionalEventData": "{\"AuthenticationMethod\":\"AuthHeader\"}"},
            {"eventTime": 42},
            {}
        ]}"#;
        let parsed = parse_text(text);
        assert_eq!(parsed.records.len(), 2);
        assert_eq!(parsed.records[0].s3_auth_method.as_deref(), Some("AuthHeader"));
        assert_eq!(parsed.bad.len(), 1);
        assert_eq!(parsed.bad[0].position, Position::Index(1));
    }

    #[test]
    fn line_files_report_the_bad_line() {
        let text = format!("{}\nnot json\n\n{}\n", ONE.replace('\n', " "), ONE.replace('\n', " "));
        let parsed = parse_text(&text);
        assert_eq!(parsed.records.len(), 2);
        assert_eq!(parsed.bad[0].position, Position::Line(2));
    }

    #[test]
    fn garbage_is_one_file_level_error() {
        let parsed = parse_text("hello\nworld\n");
        assert!(parsed.records.is_empty());
        assert_eq!(parsed.bad.len(), 1);
        assert_eq!(parsed.bad[0].position, Position::File);
    }

    #[test]
    fn denials_are_told_apart() {
        let mut r = Record {
            error_code: Some("AccessDenied".into()),
            error_message: Some("User: arn:aws:iam::1:user/a is not authorized to perform: s3:GetObject because no identity-based policy allows the s3:GetObject action".into()),
            ..Record::default()
        };
        assert_eq!(r.denial("lockstep"), Some(Denial::Other));
        r.error_message = Some("... with an explicit deny in an identity-based policy".into());
        assert_eq!(r.denial("lockstep"), Some(Denial::ExplicitIdentityDeny));
        r.error_message = Some("... explicit deny in an identity-based policy: arn:aws:iam::1:policy/lockstep".into());
        assert_eq!(r.denial("lockstep"), Some(Denial::ExplicitIdentityDeny));
        r.error_message = Some("User x is not authorized to perform: s3:PutObject with an explicit deny in a policy: arn:aws:iam::1:policy/team/lockstep.".into());
        assert_eq!(r.denial("lockstep"), Some(Denial::ExplicitIdentityDeny));
        r.error_message = Some("... with an explicit deny in a policy: arn:aws:iam::1:policy/lockstep-other".into());
        assert_eq!(r.denial("lockstep"), Some(Denial::Other));
        // Asking for the lockdown policy itself and being refused is not the policy denying.
        r.error_message = Some(
            "User: arn:aws:iam::1:user/a is not authorized to perform: iam:GetPolicy on resource: arn:aws:iam::1:policy/lockstep because no identity-based policy allows the iam:GetPolicy action".into(),
        );
        assert_eq!(r.denial("lockstep"), Some(Denial::Other));
        r.error_code = Some("Client.UnauthorizedOperation".into());
        r.error_message = None;
        assert_eq!(r.denial("lockstep"), Some(Denial::Other));
        r.error_code = Some("ThrottlingException".into());
        assert_eq!(r.denial("lockstep"), None);
    }
}
