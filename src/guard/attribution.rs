//! Attribution by cause: which denials could the lockdown policy have produced? One pure rule
//! over what the message states and what the perimeter classifier says about the denied call's
//! own request context. See the module documentation of [`crate::guard`] for the order.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::perimeter::{self, DenyReason, Perimeter, SkipReason};
use crate::trail::{PolicyType, Record, StatedCause, arn_names_policy};

named_enum!(
    /// Why a watched user was denied, as far as the guard can tell.
    Cause {
        /// The lockdown policy denied the call.
        Lockdown = "lockdown",
        /// Something else denied it; counted and shown, never acted on.
        Other = "other",
        /// Nothing says which; judged statistically against the expected rate.
        Unknown = "unknown",
    }
);

/// Which rule decided the cause, with what it looked at.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum Evidence {
    /// The message names the lockdown policy's ARN as the denying policy.
    NamesLockdownPolicy {
        /// The ARN the message names.
        policy_arn: String,
    },
    /// The message states a cause the lockdown (one explicit Deny in an identity-based group
    /// policy) cannot produce: an implicit deny, an explicit deny in another policy type or in
    /// another named policy, a VPC endpoint policy.
    StatesOtherCause {
        /// The cause the message states.
        stated: StatedCause,
    },
    /// The classifier says the rendered policy allows this call, so something else denied it.
    PerimeterAllows {
        /// The classifier's verdict on the call.
        classifier: perimeter::Verdict,
    },
    /// The lockdown policy cannot apply to this record (a role session, another account, a
    /// service event, an action IAM never denies).
    LockdownDoesNotApply {
        /// The classifier's verdict on the call.
        classifier: perimeter::Verdict,
    },
    /// The classifier says the rendered policy denies this call, and the message states no
    /// cause the lockdown cannot produce.
    PerimeterDenies {
        /// The classifier's verdict on the call.
        classifier: perimeter::Verdict,
        /// The cause the message states (none the lockdown cannot produce).
        stated: StatedCause,
    },
    /// The record lacks what the classifier needs (source address, action, identity) and the
    /// message gives no cause the lockdown cannot produce.
    Undecidable {
        /// The classifier's verdict on the call.
        classifier: perimeter::Verdict,
        /// The cause the message states (none the lockdown cannot produce).
        stated: StatedCause,
    },
    /// Stored before attribution by cause existed, under this kind name.
    Legacy {
        /// The stored kind name.
        kind: String,
    },
}

/// One denial's cause and the evidence for it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Attribution {
    /// Whose fault the denial is.
    pub cause: Cause,
    /// The rule that decided it, with what it looked at.
    pub evidence: Evidence,
}

impl Attribution {
    /// The text the ledger stores for this attribution (JSON), read back by
    /// [`Attribution::from_stored`].
    pub(crate) fn to_stored(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| self.cause.as_str().to_string())
    }

    /// Reads what [`Attribution::to_stored`] wrote; the two-way kinds stored by older versions
    /// (`explicit_identity_deny`, `other`) map to `lockdown` and `other`, anything else to
    /// `unknown`, never an error.
    pub(crate) fn from_stored(text: &str) -> Attribution {
        if let Ok(attribution) = serde_json::from_str(text) {
            return attribution;
        }
        let cause = match text {
            "explicit_identity_deny" | "lockdown" => Cause::Lockdown,
            "other" => Cause::Other,
            _ => Cause::Unknown,
        };
        Attribution { cause, evidence: Evidence::Legacy { kind: text.to_string() } }
    }
}

/// Attributes a recorded call of a watched user: `None` when it was not an access denial
/// (success, throttling, any other error). `exempt` holds the user names carrying the
/// exemption tag, as [`Perimeter::classify`] takes them; `lockdown_policy` is the lockdown
/// policy's name (matched against a named policy ARN at any path).
pub fn attribute(
    record: &Record,
    perimeter: &Perimeter,
    exempt: &HashSet<String>,
    lockdown_policy: &str,
) -> Option<Attribution> {
    let refusal = record.refusal()?;
    Some(attribute_stated(refusal.stated, perimeter.classify(record, exempt), lockdown_policy))
}

/// The rule itself, on what the message states and what the classifier says. In order:
/// 1. the message names the lockdown policy: `Lockdown`;
/// 2. the message states a cause the lockdown cannot produce: `Other`;
/// 3. the classifier says allowed: `Other`; the policy cannot apply to the record: `Other`;
/// 4. the classifier says the policy denies it on the record's own network facts: `Lockdown`;
/// 5. the record lacks those facts (no or unparseable source, no action, no identity): `Unknown`.
pub fn attribute_stated(stated: StatedCause, classifier: perimeter::Verdict, lockdown_policy: &str) -> Attribution {
    use perimeter::Verdict::*;
    let found = |cause, evidence| Attribution { cause, evidence };
    if let StatedCause::ExplicitDeny { policy_arn: Some(arn), .. } = &stated
        && arn_names_policy(arn, lockdown_policy)
    {
        return found(Cause::Lockdown, Evidence::NamesLockdownPolicy { policy_arn: arn.clone() });
    }
    if rules_out_lockdown(&stated) {
        return found(Cause::Other, Evidence::StatesOtherCause { stated });
    }
    match classifier {
        Allowed(_) => found(Cause::Other, Evidence::PerimeterAllows { classifier }),
        NotApplicable(
            SkipReason::NotIamUser | SkipReason::OtherAccount | SkipReason::NotApiCall | SkipReason::NeverDenied,
        ) => found(Cause::Other, Evidence::LockdownDoesNotApply { classifier }),
        WouldDeny(DenyReason::UntrustedIp | DenyReason::UntrustedEndpoint | DenyReason::UntrustedService) => {
            found(Cause::Lockdown, Evidence::PerimeterDenies { classifier, stated })
        }
        WouldDeny(DenyReason::NoSource | DenyReason::UnrecognizedSource)
        | NotApplicable(SkipReason::NoUserIdentity | SkipReason::NoAction) => {
            found(Cause::Unknown, Evidence::Undecidable { classifier, stated })
        }
    }
}

/// Whether the stated cause is one a single explicit Deny in an identity-based group policy
/// can never produce. An implicit deny removes no Allow; only an identity-based explicit deny
/// (or one whose type the message does not name) could be the lockdown, and not when it names
/// another policy.
fn rules_out_lockdown(stated: &StatedCause) -> bool {
    match stated {
        StatedCause::ImplicitDeny { .. } | StatedCause::VpcEndpointDenied => true,
        StatedCause::ExplicitDeny { policy_type, policy_arn } => {
            !matches!(policy_type, PolicyType::IdentityBased | PolicyType::Unnamed) || policy_arn.is_some()
        }
        StatedCause::Unstated => false,
    }
}
