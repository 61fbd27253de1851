//! IAM at the edge: the few calls the controller makes, behind the [`Iam`] trait, and their
//! implementation with `aws-sdk-iam`.
//!
//! The lockdown policy is a customer-managed policy attached to the lockdown group, so AWS
//! names it in denial messages (`...explicit deny in an identity-based policy:
//! arn:aws:iam::<acct>:policy/<name>`), which is the guard's strongest signal. Throttling and
//! transient errors are retried by the SDK's standard retry strategy (see `aws::sdk_config`);
//! what still fails comes back as an [`IamError`] and the controller retries on its next step.

use std::collections::HashSet;
use std::future::Future;

use aws_sdk_iam::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_iam::types::{EntityType, UserDetail};

pub use crate::rollout::IamUser;

/// How the lockdown group and its policy compare with what the perimeter renders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyStatus {
    /// The lockdown group does not exist.
    GroupMissing,
    /// The perimeter policy does not exist.
    PolicyMissing,
    /// The policy exists but is not attached to the group.
    NotAttached,
    /// Attached, but its default version is not the rendered document.
    Drifted {
        /// The policy document IAM holds.
        current: String,
    },
    /// The group has the rendered policy attached: adding a user locks them.
    InPlace,
}

impl PolicyStatus {
    /// What is wrong with the group's policy, for people; `None` when it is in place.
    pub fn problem(&self, group: &str, policy: &str) -> Option<String> {
        Some(
            match self {
                PolicyStatus::InPlace => return None,
                PolicyStatus::GroupMissing => format!("IAM group {group} does not exist"),
                PolicyStatus::PolicyMissing => format!("managed policy {policy} does not exist"),
                PolicyStatus::NotAttached => format!("managed policy {policy} is not attached to group {group}"),
                PolicyStatus::Drifted { .. } => {
                    format!("managed policy {policy} differs from the policy rendered from rollout.yaml")
                }
            } + "; run `lockstep policy apply --commit` (promotions are stopped until then)",
        )
    }
}

/// An IAM call failed: which operation, the AWS error code and its message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("IAM {operation} failed: {code}: {message}")]
pub struct IamError {
    /// The IAM operation (`AddUserToGroup`, ...).
    pub operation: &'static str,
    /// The AWS error code (`NoSuchEntity`, `Throttling`, ...) or a transport-level description.
    pub code: String,
    /// The error's message.
    pub message: String,
}

impl IamError {
    pub(crate) fn is_no_such_entity(&self) -> bool {
        self.code == "NoSuchEntity"
    }
}

/// The IAM user directory as one read returned it, and what the read cost.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directory {
    /// Every IAM user with path and tags.
    pub users: Vec<IamUser>,
    /// IAM API calls the read made (one per page; none for an in-memory IAM).
    pub iam_calls: u64,
}

/// Users per `GetAccountAuthorizationDetails` page (IAM's maximum).
const DIRECTORY_PAGE_SIZE: i32 = 1000;

/// Pages after which a directory read gives up: ten times IAM's largest user quota, so only an
/// answer whose markers never end reaches it.
const DIRECTORY_MAX_PAGES: u64 = 5_000;

/// The IAM operations lockstep uses. Writes are idempotent: adding a member twice or removing
/// a non-member succeeds.
pub trait Iam: Send + Sync {
    /// Every IAM user with path and tags, and how many IAM calls reading them took.
    fn list_users(&self) -> impl Future<Output = Result<Directory, IamError>> + Send;
    /// Names of the group's members, all pages.
    fn group_members(&self, group: &str) -> impl Future<Output = Result<Vec<String>, IamError>> + Send;
    /// Adds `user` to `group` (succeeds if already a member).
    fn add_to_group(&self, group: &str, user: &str) -> impl Future<Output = Result<(), IamError>> + Send;
    /// Removes `user` from `group` (succeeds if not a member).
    fn remove_from_group(&self, group: &str, user: &str) -> impl Future<Output = Result<(), IamError>> + Send;
    /// How the group and its managed policy compare with `document`.
    fn policy_status(
        &self,
        group: &str,
        policy: &str,
        document: &str,
    ) -> impl Future<Output = Result<PolicyStatus, IamError>> + Send;
    /// Creates the group and the managed policy as needed, makes `document` the policy's
    /// default version, attaches it; returns what changed.
    fn apply_policy(
        &self,
        group: &str,
        policy: &str,
        document: &str,
    ) -> impl Future<Output = Result<Vec<String>, IamError>> + Send;
    /// Sets these tags on the user (a key it already has takes the new value).
    fn tag_user(&self, user: &str, tags: &[(String, String)]) -> impl Future<Output = Result<(), IamError>> + Send;
    /// Removes these tag keys from the user (keys it does not have are ignored).
    fn untag_user(&self, user: &str, keys: &[String]) -> impl Future<Output = Result<(), IamError>> + Send;
}

/// `aws-sdk-iam` behind the [`Iam`] trait.
#[derive(Clone, Debug)]
pub struct AwsIam {
    client: aws_sdk_iam::Client,
    account_id: String,
}

impl AwsIam {
    /// The real IAM client for `account_id`.
    pub fn new(sdk: &aws_config::SdkConfig, account_id: &str) -> AwsIam {
        AwsIam { client: aws_sdk_iam::Client::new(sdk), account_id: account_id.to_string() }
    }

    fn policy_arn(&self, policy: &str) -> String {
        format!("arn:aws:iam::{}:policy/{policy}", self.account_id)
    }

    /// The default version's document, or `None` if the policy does not exist.
    async fn current_document(&self, policy: &str) -> Result<Option<String>, IamError> {
        let arn = self.policy_arn(policy);
        let found = match self.client.get_policy().policy_arn(&arn).send().await {
            Ok(found) => found,
            Err(e) => {
                let e = error("GetPolicy", e);
                return if e.is_no_such_entity() { Ok(None) } else { Err(e) };
            }
        };
        let version = found.policy().and_then(|p| p.default_version_id()).unwrap_or("v1").to_string();
        let got = self
            .client
            .get_policy_version()
            .policy_arn(&arn)
            .version_id(&version)
            .send()
            .await
            .map_err(|e| error("GetPolicyVersion", e))?;
        Ok(got.policy_version().and_then(|v| v.document()).map(decode_document))
    }

    async fn is_attached(&self, group: &str, policy: &str) -> Result<bool, IamError> {
        let arn = self.policy_arn(policy);
        let attached = all_pages(|marker| async {
            let page = self
                .client
                .list_attached_group_policies()
                .group_name(group)
                .set_marker(marker)
                .send()
                .await
                .map_err(|e| error("ListAttachedGroupPolicies", e))?;
            let next = page.is_truncated().then(|| page.marker().map(str::to_string)).flatten();
            let arns = page.attached_policies().iter().filter_map(|p| p.policy_arn().map(str::to_string)).collect();
            Ok((arns, next))
        })
        .await?;
        Ok(attached.contains(&arn))
    }

    async fn group_exists(&self, group: &str) -> Result<bool, IamError> {
        match self.client.get_group().group_name(group).max_items(1).send().await {
            Ok(_) => Ok(true),
            Err(e) => {
                let e = error("GetGroup", e);
                if e.is_no_such_entity() { Ok(false) } else { Err(e) }
            }
        }
    }
}

impl Iam for AwsIam {
    /// One `GetAccountAuthorizationDetails` (users only) per page of up to 1,000 users, each
    /// page turned into [`IamUser`]s and dropped before the next is read.
    async fn list_users(&self) -> Result<Directory, IamError> {
        const OPERATION: &str = "GetAccountAuthorizationDetails";
        let mut pages = self
            .client
            .get_account_authorization_details()
            .filter(EntityType::User)
            .max_items(DIRECTORY_PAGE_SIZE)
            .into_paginator()
            .send();
        let mut directory = Directory::default();
        let mut seen = HashSet::new();
        while let Some(page) = pages.next().await {
            directory.iam_calls += 1;
            let page = page.map_err(|e| error(OPERATION, e))?;
            let bad_answer = |what: String| IamError {
                operation: OPERATION,
                code: "InvalidAnswer".to_string(),
                message: format!("page {}: {what}", directory.iam_calls),
            };
            for (index, detail) in page.user_detail_list().iter().enumerate() {
                let user = directory_user(detail).map_err(|what| bad_answer(format!("user #{}: {what}", index + 1)))?;
                if !seen.insert(user.name.clone()) {
                    return Err(bad_answer(format!("user {} listed twice", user.name)));
                }
                directory.users.push(user);
            }
            if directory.iam_calls >= DIRECTORY_MAX_PAGES && page.is_truncated() {
                return Err(bad_answer(format!("still truncated after {DIRECTORY_MAX_PAGES} pages; giving up")));
            }
        }
        Ok(directory)
    }

    async fn group_members(&self, group: &str) -> Result<Vec<String>, IamError> {
        all_pages(|marker| async {
            let page = self
                .client
                .get_group()
                .group_name(group)
                .set_marker(marker)
                .send()
                .await
                .map_err(|e| error("GetGroup", e))?;
            let next = page.is_truncated().then(|| page.marker().map(str::to_string)).flatten();
            Ok((page.users().iter().map(|u| u.user_name().to_string()).collect(), next))
        })
        .await
    }

    async fn add_to_group(&self, group: &str, user: &str) -> Result<(), IamError> {
        self.client
            .add_user_to_group()
            .group_name(group)
            .user_name(user)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| error("AddUserToGroup", e))
    }

    async fn remove_from_group(&self, group: &str, user: &str) -> Result<(), IamError> {
        match self.client.remove_user_from_group().group_name(group).user_name(user).send().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = error("RemoveUserFromGroup", e);
                // Not a member (any more): the desired state already holds.
                if e.is_no_such_entity() { Ok(()) } else { Err(e) }
            }
        }
    }

    async fn policy_status(&self, group: &str, policy: &str, document: &str) -> Result<PolicyStatus, IamError> {
        if !self.group_exists(group).await? {
            return Ok(PolicyStatus::GroupMissing);
        }
        let Some(current) = self.current_document(policy).await? else {
            return Ok(PolicyStatus::PolicyMissing);
        };
        if !self.is_attached(group, policy).await? {
            return Ok(PolicyStatus::NotAttached);
        }
        if same_document(&current, document) {
            Ok(PolicyStatus::InPlace)
        } else {
            Ok(PolicyStatus::Drifted { current })
        }
    }

    async fn apply_policy(&self, group: &str, policy: &str, document: &str) -> Result<Vec<String>, IamError> {
        let mut changes = Vec::new();
        if !self.group_exists(group).await? {
            self.client.create_group().group_name(group).send().await.map_err(|e| error("CreateGroup", e))?;
            changes.push(format!("created group {group}"));
        }
        let arn = self.policy_arn(policy);
        match self.current_document(policy).await? {
            None => {
                self.client
                    .create_policy()
                    .policy_name(policy)
                    .policy_document(document)
                    .description("lockstep: deny calls from outside trusted networks (rendered from rollout.yaml)")
                    .send()
                    .await
                    .map_err(|e| error("CreatePolicy", e))?;
                changes.push(format!("created managed policy {arn}"));
            }
            Some(current) if !same_document(&current, document) => {
                self.make_room_for_a_version(&arn).await?;
                self.client
                    .create_policy_version()
                    .policy_arn(&arn)
                    .policy_document(document)
                    .set_as_default(true)
                    .send()
                    .await
                    .map_err(|e| error("CreatePolicyVersion", e))?;
                changes.push(format!("made the rendered document the default version of {arn}"));
            }
            Some(_) => {}
        }
        if !self.is_attached(group, policy).await? {
            self.client
                .attach_group_policy()
                .group_name(group)
                .policy_arn(&arn)
                .send()
                .await
                .map_err(|e| error("AttachGroupPolicy", e))?;
            changes.push(format!("attached {arn} to group {group}"));
        }
        Ok(changes)
    }

    async fn tag_user(&self, user: &str, tags: &[(String, String)]) -> Result<(), IamError> {
        let tags = tags
            .iter()
            .map(|(key, value)| aws_sdk_iam::types::Tag::builder().key(key).value(value).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| IamError { operation: "TagUser", code: "InvalidTag".to_string(), message: e.to_string() })?;
        self.client
            .tag_user()
            .user_name(user)
            .set_tags(Some(tags))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| error("TagUser", e))
    }

    async fn untag_user(&self, user: &str, keys: &[String]) -> Result<(), IamError> {
        self.client
            .untag_user()
            .user_name(user)
            .set_tag_keys(Some(keys.to_vec()))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| error("UntagUser", e))
    }
}

impl AwsIam {
    /// IAM keeps at most five versions of a managed policy: delete the oldest non-default one.
    async fn make_room_for_a_version(&self, arn: &str) -> Result<(), IamError> {
        let listed = self
            .client
            .list_policy_versions()
            .policy_arn(arn)
            .send()
            .await
            .map_err(|e| error("ListPolicyVersions", e))?;
        let versions = listed.versions();
        if versions.len() < 5 {
            return Ok(());
        }
        let oldest = versions
            .iter()
            .filter(|v| !v.is_default_version())
            .min_by_key(|v| v.create_date().map(|d| d.secs()).unwrap_or(i64::MAX));
        if let Some(version) = oldest.and_then(|v| v.version_id()) {
            self.client
                .delete_policy_version()
                .policy_arn(arn)
                .version_id(version)
                .send()
                .await
                .map_err(|e| error("DeletePolicyVersion", e))?;
        }
        Ok(())
    }
}

/// One user of a directory page, or what is missing from it.
fn directory_user(detail: &UserDetail) -> Result<IamUser, String> {
    let name = detail.user_name().filter(|n| !n.is_empty()).ok_or("no UserName")?;
    let arn = detail.arn().filter(|a| !a.is_empty()).ok_or_else(|| format!("{name} has no Arn"))?;
    Ok(IamUser {
        name: name.to_string(),
        arn: arn.to_string(),
        // IAM's default path; every real answer carries one.
        path: detail.path().unwrap_or("/").to_string(),
        tags: detail.tags().iter().map(|t| (t.key().to_string(), t.value().to_string())).collect(),
    })
}

/// Collects every page of a marker-paginated IAM listing.
pub(crate) async fn all_pages<T, F, Fut>(mut fetch: F) -> Result<Vec<T>, IamError>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, Option<String>), IamError>>,
{
    let mut items = Vec::new();
    let mut marker = None;
    loop {
        let (page, next) = fetch(marker.take()).await?;
        items.extend(page);
        match next {
            Some(next) if !next.is_empty() => marker = Some(next),
            _ => return Ok(items),
        }
    }
}

fn error<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug + 'static>(
    operation: &'static str,
    e: SdkError<E, R>,
) -> IamError {
    match &e {
        SdkError::ServiceError(service) => IamError {
            operation,
            code: service.err().code().unwrap_or("Unknown").to_string(),
            message: service.err().message().unwrap_or("").to_string(),
        },
        other => IamError {
            operation,
            code: match other {
                SdkError::TimeoutError(_) => "Timeout",
                SdkError::DispatchFailure(_) => "DispatchFailure",
                SdkError::ResponseError(_) => "ResponseError",
                _ => "ConstructionFailure",
            }
            .to_string(),
            // A credentials failure (a role that cannot be assumed) carries STS's answer inside.
            message: crate::aws::cause_message(other),
        },
    }
}

/// IAM returns policy documents URL-encoded (RFC 3986); some emulators do not.
fn decode_document(raw: &str) -> String {
    if raw.trim_start().starts_with('{') {
        return raw.to_string();
    }
    percent_encoding::percent_decode_str(raw).decode_utf8_lossy().into_owned()
}

/// Policy documents are compared as JSON values, so formatting and key order do not matter.
fn same_document(a: &str, b: &str) -> bool {
    match (serde_json::from_str::<serde_json::Value>(a), serde_json::from_str::<serde_json::Value>(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn all_pages_follows_markers_to_the_end() {
        let pages = |marker: Option<String>| async move {
            Ok(match marker.as_deref() {
                None => (vec![1, 2], Some("m1".to_string())),
                Some("m1") => (vec![3], Some("m2".to_string())),
                Some("m2") => (vec![4, 5], None),
                Some(other) => panic!("unexpected marker {other}"),
            })
        };
        assert_eq!(all_pages(pages).await.unwrap(), vec![1, 2, 3, 4, 5]);
    }

    #[tokio::test]
    async fn all_pages_stops_on_error() {
        let failing = |marker: Option<String>| async move {
            match marker {
                None => Ok((vec![1], Some("m1".to_string()))),
                Some(_) => {
                    Err(IamError { operation: "GetGroup", code: "Throttling".into(), message: "Rate exceeded".into() })
                }
            }
        };
        assert_eq!(all_pages(failing).await.unwrap_err().code, "Throttling");
    }

    #[test]
    fn a_directory_user_needs_a_name_and_an_arn() {
        let tag = aws_sdk_iam::types::Tag::builder().key("team").value("red").build().unwrap();
        let full = UserDetail::builder().user_name("ann").arn("arn:aws:iam::1:user/ann").tags(tag).build();
        let ann = directory_user(&full).unwrap();
        assert_eq!((ann.name.as_str(), ann.path.as_str()), ("ann", "/"));
        assert_eq!(ann.tags.get("team").map(String::as_str), Some("red"));
        assert_eq!(directory_user(&UserDetail::builder().arn("arn").build()).unwrap_err(), "no UserName");
        assert_eq!(directory_user(&UserDetail::builder().user_name("bob").build()).unwrap_err(), "bob has no Arn");
    }

    #[test]
    fn documents_compare_as_json() {
        let doc = r#"{"Version":"2012-10-17","Statement":[]}"#;
        let encoded = "%7B%22Statement%22%3A%5B%5D%2C%20%22Version%22%3A%222012-10-17%22%7D";
        assert!(same_document(&decode_document(encoded), doc));
        assert!(same_document(&decode_document(doc), doc));
        assert!(!same_document(r#"{"Version":"2008-10-17","Statement":[]}"#, doc));
        assert!(!same_document("not json", doc));
    }
}
