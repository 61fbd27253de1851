//! `deploy/lockstep-iam-policy.json` grants exactly what the code calls: every AWS SDK operation
//! in src/ maps to one IAM action, and the policy's actions are those plus the few that Athena and
//! the SDK need on the caller's behalf. A new SDK call without its action in the policy fails here.

use std::collections::BTreeSet;

use serde_json::Value;

/// SDK operation (the fluent builder's method name) -> the IAM action it needs.
const OPERATIONS: &[(&str, &str)] = &[
    ("get_account_authorization_details", "iam:GetAccountAuthorizationDetails"),
    ("tag_user", "iam:TagUser"),
    ("untag_user", "iam:UntagUser"),
    ("get_group", "iam:GetGroup"),
    ("add_user_to_group", "iam:AddUserToGroup"),
    ("remove_user_from_group", "iam:RemoveUserFromGroup"),
    ("list_attached_group_policies", "iam:ListAttachedGroupPolicies"),
    ("create_group", "iam:CreateGroup"),
    ("attach_group_policy", "iam:AttachGroupPolicy"),
    ("get_policy", "iam:GetPolicy"),
    ("get_policy_version", "iam:GetPolicyVersion"),
    ("list_policy_versions", "iam:ListPolicyVersions"),
    ("create_policy", "iam:CreatePolicy"),
    ("create_policy_version", "iam:CreatePolicyVersion"),
    ("delete_policy_version", "iam:DeletePolicyVersion"),
    ("list_objects_v2", "s3:ListBucket"),
    ("get_object", "s3:GetObject"),
    ("start_query_execution", "athena:StartQueryExecution"),
    ("get_query_execution", "athena:GetQueryExecution"),
    ("get_query_results", "athena:GetQueryResults"),
    ("stop_query_execution", "athena:StopQueryExecution"),
    ("list_accounts", "organizations:ListAccounts"),
    ("list_accounts_for_parent", "organizations:ListAccountsForParent"),
    ("list_parents", "organizations:ListParents"),
    ("list_tags_for_resource", "organizations:ListTagsForResource"),
];

/// Actions IAM authorizes only on every resource (`"Resource": "*"`): no statement may grant
/// anything else that way.
const ACCOUNT_WIDE: &[&str] = &[
    "iam:GetAccountAuthorizationDetails",
    "organizations:ListAccounts",
    "organizations:ListAccountsForParent",
    "organizations:ListParents",
    "organizations:ListTagsForResource",
];

/// Actions no code calls directly: the SDK's credentials provider assumes other accounts' roles,
/// and Athena runs queries with the caller's permissions, reading the table from Glue and writing
/// results to the output location in S3.
const NOT_CALLED_DIRECTLY: &[&str] = &[
    "glue:GetDatabase",
    "glue:GetTable",
    "glue:GetPartitions",
    "s3:GetBucketLocation",
    "s3:PutObject",
    "s3:AbortMultipartUpload",
    // The SDK's credentials provider, for every account reached through a role (`accounts.role`).
    "sts:AssumeRole",
];

fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Method names called with no arguments directly on a receiver named `client`
/// (`self.client.get_group()`, `client\n.start_query_execution()`), and the number of `.send()`s.
fn sdk_calls(source: &str) -> (Vec<String>, usize) {
    let compact: String = source.split_whitespace().collect();
    let mut calls = Vec::new();
    let mut rest = compact.as_str();
    while let Some(at) = rest.find("client.") {
        rest = &rest[at + "client.".len()..];
        let name: String =
            rest.chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
        if !name.is_empty() && rest[name.len()..].starts_with("()") {
            calls.push(name);
        }
    }
    (calls, compact.matches(".send()").count())
}

#[test]
fn the_shipped_iam_policy_grants_exactly_the_calls_the_code_makes() {
    let mut files = Vec::new();
    rust_files(std::path::Path::new("src"), &mut files);
    let mut called = BTreeSet::new();
    for file in &files {
        let source = std::fs::read_to_string(file).unwrap();
        let (calls, sends) = sdk_calls(&source);
        // Every SDK request is built from `client.<operation>()` and sent once: a request built
        // another way would escape this check.
        assert_eq!(calls.len(), sends, "{}: {calls:?} for {sends} .send() calls", file.display());
        for call in calls {
            let Some((_, action)) = OPERATIONS.iter().find(|(op, _)| *op == call) else {
                panic!(
                    "{} calls the SDK operation {call}: add its IAM action to OPERATIONS and to deploy/lockstep-iam-policy.json",
                    file.display()
                );
            };
            called.insert(action.to_string());
        }
    }
    assert!(called.len() >= 15, "the scan found the code's calls: {called:?}");

    let policy: Value =
        serde_json::from_str(&std::fs::read_to_string("deploy/lockstep-iam-policy.json").unwrap()).unwrap();
    let mut granted = BTreeSet::new();
    for statement in policy["Statement"].as_array().unwrap() {
        assert_eq!(statement["Effect"], "Allow");
        let actions = match &statement["Action"] {
            Value::String(action) => vec![action.clone()],
            actions => actions.as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect(),
        };
        if statement["Resource"].to_string().contains("\"*\"") {
            let wide: Vec<_> = actions.iter().filter(|a| !ACCOUNT_WIDE.contains(&a.as_str())).collect();
            assert!(wide.is_empty(), "{wide:?} granted on every resource: {statement}");
        }
        granted.extend(actions);
    }
    let mut needed = called.clone();
    needed.extend(NOT_CALLED_DIRECTLY.iter().map(|a| a.to_string()));
    let missing: Vec<_> = needed.difference(&granted).collect();
    let extra: Vec<_> = granted.difference(&needed).collect();
    assert!(missing.is_empty(), "the policy lacks {missing:?}");
    assert!(extra.is_empty(), "the policy grants {extra:?}, which nothing needs");
    let unused: Vec<_> = OPERATIONS.iter().filter(|(_, action)| !called.contains(*action)).collect();
    assert!(unused.is_empty(), "OPERATIONS lists calls the code no longer makes: {unused:?}");
}

#[test]
fn the_policy_names_the_group_and_policy_of_the_shipped_configuration() {
    let policy = std::fs::read_to_string("deploy/lockstep-iam-policy.json").unwrap();
    let config = lockstep::config::Config::load(std::path::Path::new("rollout.yaml")).unwrap();
    assert!(policy.contains(&format!(":group/{}\"", config.lockdown.group)));
    assert!(policy.contains(&format!(":policy/{}\"", config.lockdown.policy_name)));
    // Tag writes are limited to the exemption tags (the key and its `-until`/`-reason` companions).
    let key = config.perimeter.exempt_tag_key.expect("the shipped configuration names an exemption tag");
    assert!(policy.contains(&format!("[\"{key}\", \"{key}-*\"]")), "the policy limits TagUser to {key}*");
}

#[test]
fn the_scan_sees_calls_across_lines_and_counts_sends() {
    let source = "let page = self\n    .client\n    .list_users()\n    .set_marker(m)\n    .send()\n    .await?;\nclient.get_object().bucket(b).send()";
    assert_eq!(sdk_calls(source), (vec!["list_users".to_string(), "get_object".to_string()], 2));
}

#[test]
fn the_readme_names_every_placeholder_of_the_policy() {
    let policy = std::fs::read_to_string("deploy/lockstep-iam-policy.json").unwrap();
    let readme = std::fs::read_to_string("README.md").unwrap();
    let words: BTreeSet<&str> =
        policy.split(|c: char| !(c.is_ascii_uppercase() || c == '_')).filter(|w| w.len() > 3).collect();
    assert!(words.contains("ACCOUNT_ID") && words.contains("TRAIL_BUCKET"), "{words:?}");
    for placeholder in words {
        assert!(readme.contains(&format!("`{placeholder}`")), "README.md explains the placeholder {placeholder}");
    }
}
