//! Test support, compiled only into this crate's unit tests and, through the `test-support`
//! feature that the root package enables in its `[dev-dependencies]`, into the integration
//! tests: never into the `lockstep` binary.
//!
//! An in-memory fake is for unit tests of pure logic around the controller; the emulator tests
//! (`tests/`, moto on 127.0.0.1) remain the proof that the AWS paths work.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};

use crate::evidence::CallGroup;
use crate::iam::{Directory, Iam, IamError, IamUser, PolicyStatus};
use crate::perimeter::Perimeter;
use crate::trail::{Record, UserIdentity};

/// The AWS account the test perimeter and calls belong to.
pub const ACCOUNT: &str = "123456789012";

/// The plainest perimeter of [`ACCOUNT`]: only 203.0.113.0/24 is trusted, no VPC endpoints, no
/// exemptions; AWS service calls and presigned S3 reads are allowed. Tests that need more
/// override fields with `..perimeter()`.
pub fn perimeter() -> Perimeter {
    Perimeter {
        account_id: ACCOUNT.into(),
        trusted_vpcs: vec![],
        trusted_endpoints: BTreeMap::new(),
        trusted_cidrs: vec!["203.0.113.0/24".parse().expect("a literal CIDR")],
        allow_aws_service_calls: true,
        called_via_services: vec![],
        allow_presigned_s3_reads: true,
        exempt_tag_key: None,
        not_actions: vec![],
    }
}

/// One API call by IAM user `user` of [`ACCOUNT`] at `time` (RFC 3339) from the address
/// `source`, for `action` (`service:Name`), as CloudTrail records it.
pub fn user_call(user: &str, time: &str, source: &str, action: &str) -> CallGroup {
    let (service, name) = action.split_once(':').unwrap_or_else(|| panic!("{action} is not service:Name"));
    let record = Record {
        event_time: Some(time.into()),
        event_source: Some(format!("{service}.amazonaws.com")),
        event_name: Some(name.into()),
        event_type: Some("AwsApiCall".into()),
        source_ip_address: Some(source.into()),
        user_identity: Some(UserIdentity {
            kind: Some("IAMUser".into()),
            user_name: Some(user.into()),
            arn: Some(format!("arn:aws:iam::{ACCOUNT}:user/{user}")),
            account_id: Some(ACCOUNT.into()),
            ..UserIdentity::default()
        }),
        ..Record::default()
    };
    CallGroup::single(record).unwrap_or_else(|| panic!("{time} is not an RFC 3339 time"))
}

/// IAM in memory: a fixed set of users (whose tags can change), the lockdown group's members in a
/// set, the lockdown policy always in place. Writes are idempotent like IAM's;
/// [`MemoryIam::failing`] makes every write fail as throttled, without changing anything.
#[derive(Debug, Default)]
pub struct MemoryIam {
    users: Mutex<Vec<IamUser>>,
    group: Mutex<BTreeSet<String>>,
    fail_writes: bool,
}

impl MemoryIam {
    /// An IAM that lists `users` and has `members` in the lockdown group already.
    pub fn new(users: Vec<IamUser>, members: &[&str]) -> MemoryIam {
        let group = members.iter().map(|m| m.to_string()).collect();
        MemoryIam { users: Mutex::new(users), group: Mutex::new(group), fail_writes: false }
    }

    /// The same IAM, but every group write fails with `Throttling`.
    pub fn failing(self) -> MemoryIam {
        MemoryIam { fail_writes: true, ..self }
    }

    /// The lockdown group's members now.
    pub fn members(&self) -> BTreeSet<String> {
        self.group().clone()
    }

    /// The users' directory entries now (tags as written since).
    pub fn users(&self) -> Vec<IamUser> {
        unpoisoned(&self.users).clone()
    }

    fn group(&self) -> MutexGuard<'_, BTreeSet<String>> {
        unpoisoned(&self.group)
    }

    fn write(&self, operation: &'static str, change: impl FnOnce(&mut BTreeSet<String>)) -> Result<(), IamError> {
        self.check_write(operation)?;
        change(&mut self.group());
        Ok(())
    }

    fn check_write(&self, operation: &'static str) -> Result<(), IamError> {
        if self.fail_writes {
            return Err(IamError { operation, code: "Throttling".into(), message: "slow down".into() });
        }
        Ok(())
    }

    /// Changes `user`'s tags like IAM: `NoSuchEntity` for a user it does not have.
    fn retag(
        &self,
        operation: &'static str,
        user: &str,
        change: impl FnOnce(&mut BTreeMap<String, String>),
    ) -> Result<(), IamError> {
        self.check_write(operation)?;
        let mut users = unpoisoned(&self.users);
        let Some(entry) = users.iter_mut().find(|u| u.name == user) else {
            return Err(IamError {
                operation,
                code: "NoSuchEntity".into(),
                message: format!("The user with name {user} cannot be found."),
            });
        };
        change(&mut entry.tags);
        Ok(())
    }
}

/// A panicking test cannot leave a set half-changed, so a poisoned lock is still usable.
fn unpoisoned<T>(lock: &Mutex<T>) -> MutexGuard<'_, T> {
    lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Iam for MemoryIam {
    async fn list_users(&self) -> Result<Directory, IamError> {
        Ok(Directory { users: self.users(), iam_calls: 0 })
    }
    async fn group_members(&self, _group: &str) -> Result<Vec<String>, IamError> {
        Ok(self.members().into_iter().collect())
    }
    async fn add_to_group(&self, _group: &str, user: &str) -> Result<(), IamError> {
        self.write("AddUserToGroup", |group| {
            group.insert(user.to_string());
        })
    }
    async fn remove_from_group(&self, _group: &str, user: &str) -> Result<(), IamError> {
        self.write("RemoveUserFromGroup", |group| {
            group.remove(user);
        })
    }
    async fn policy_status(&self, _group: &str, _policy: &str, _document: &str) -> Result<PolicyStatus, IamError> {
        Ok(PolicyStatus::InPlace)
    }
    async fn apply_policy(&self, _group: &str, _policy: &str, _document: &str) -> Result<Vec<String>, IamError> {
        Ok(Vec::new())
    }
    async fn tag_user(&self, user: &str, tags: &[(String, String)]) -> Result<(), IamError> {
        self.retag("TagUser", user, |have| have.extend(tags.iter().cloned()))
    }
    async fn untag_user(&self, user: &str, keys: &[String]) -> Result<(), IamError> {
        self.retag("UntagUser", user, |have| have.retain(|k, _| !keys.contains(k)))
    }
}
