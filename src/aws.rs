//! AWS SDK setup, the standard way: region from configuration, the standard credential chain,
//! the standard endpoint override (`AWS_ENDPOINT_URL`, or an explicit URL for tests), and the
//! SDK's standard retry with extra attempts so that throttling (frequent on CloudTrail-sized
//! accounts) is waited out instead of failing a refresh, and timeouts so that a call that hangs
//! (a half-open connection, an endpoint that stopped answering) fails and is retried instead of
//! stalling the controller, and with it the guard, forever.
//!
//! Other accounts are reached with [`account_config`]: the same configuration, with credentials
//! from `sts:AssumeRole` into the account's role.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::sts::AssumeRoleProvider;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, ConfigLoader, Region, SdkConfig};
use aws_sdk_iam::config::{ProvideCredentials, SharedCredentialsProvider};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_smithy_types::error::ErrorMetadata;

use crate::config::Access;

/// The role session name lockstep's assumed sessions carry (CloudTrail records it in each
/// call's `userIdentity.arn`).
pub const SESSION_NAME: &str = "lockstep";

/// Attempts per request, first one included (the SDK's default is 3).
const MAX_ATTEMPTS: u32 = 8;
/// Longest pause between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(20);
/// Longest wait for a connection to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for one attempt, a large trail file's download included.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait for a call, every attempt and pause included.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(600);

/// The loader behind [`load`], for callers that must also pin something else (tests pin static
/// credentials so the chain never probes instance metadata).
pub fn loader(region: &str, endpoint_url: Option<&str>) -> ConfigLoader {
    let loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(region.to_string()))
        .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS).with_max_backoff(MAX_BACKOFF))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                .operation_timeout(OPERATION_TIMEOUT)
                .build(),
        );
    match endpoint_url {
        Some(url) => loader.endpoint_url(url),
        None => loader,
    }
}

/// The shared SDK configuration. `endpoint_url` overrides every service's endpoint; without it,
/// `AWS_ENDPOINT_URL` is still honoured by aws-config itself.
pub async fn load(region: &str, endpoint_url: Option<&str>) -> SdkConfig {
    loader(region, endpoint_url).load().await
}

/// An account's role could not be assumed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot assume role {role_arn}: {reason}")]
pub struct AssumeRoleFailed {
    /// The role lockstep tried to assume.
    pub role_arn: String,
    /// STS's answer (or why no answer came), for an operator.
    pub reason: String,
}

/// The SDK configuration acting in `config`'s account (an account view, or a file without
/// `accounts`): the default chain, or the account's role assumed on top of it.
pub async fn for_config(config: &crate::config::Config) -> Result<SdkConfig, AssumeRoleFailed> {
    account_config(&load(&config.region, None).await, config.access()).await
}

/// The SDK configuration that acts in one account: `base` (as [`load`] makes it: STS needs its
/// time source) itself for [`Access::Default`];
/// otherwise `base` with credentials from `sts:AssumeRole` into the account's role (session
/// [`SESSION_NAME`], the external ID if set), made with `base`'s own credentials, endpoint and
/// retry settings. The role is assumed once here, so that an account lockstep cannot reach is
/// reported as such before any call is made in it; clients built from the result then get
/// their credentials through the SDK's identity cache, which assumes the role on first use and
/// again shortly before the temporary credentials expire.
pub async fn account_config(base: &SdkConfig, access: &Access) -> Result<SdkConfig, AssumeRoleFailed> {
    let config = lazy_account_config(base, access).await;
    if let (Access::AssumeRole { role_arn, .. }, Some(provider)) = (access, config.credentials_provider()) {
        provider
            .provide_credentials()
            .await
            .map_err(|e| AssumeRoleFailed { role_arn: role_arn.clone(), reason: cause_message(&e) })?;
    }
    Ok(config)
}

/// [`account_config`] without assuming the role first: the first call made in the account
/// assumes it, and fails with STS's reason if it cannot (the daemon keeps such an account, blocked,
/// and tries again every step).
pub async fn lazy_account_config(base: &SdkConfig, access: &Access) -> SdkConfig {
    let Access::AssumeRole { role_arn, external_id } = access else {
        return base.clone();
    };
    let builder = AssumeRoleProvider::builder(role_arn.as_str()).session_name(SESSION_NAME).configure(base);
    let builder = match external_id {
        Some(id) => builder.external_id(id),
        None => builder,
    };
    let provider = SharedCredentialsProvider::new(builder.build().await);
    base.to_builder().credentials_provider(provider).build()
}

/// An S3 client. With an endpoint override (an emulator on 127.0.0.1, a private gateway), bucket
/// names cannot become host names, so requests use path-style addressing.
pub fn s3_client(config: &SdkConfig) -> aws_sdk_s3::Client {
    let s3 = aws_sdk_s3::config::Builder::from(config).force_path_style(config.endpoint_url().is_some()).build();
    aws_sdk_s3::Client::from_conf(s3)
}

/// What went wrong in one SDK call, for an operator: the service's error code and message when
/// the service answered, otherwise the whole cause chain (timeouts, DNS, TLS, ...).
pub fn error_message<E, R>(err: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    described(err.code(), err.message()).unwrap_or_else(|| DisplayErrorContext(err).to_string())
}

/// [`error_message`] for an error that carries the SDK error somewhere in its cause chain (a
/// credentials provider's error wraps STS's): the first service answer's code and message found
/// there, otherwise the whole chain.
pub(crate) fn cause_message(err: &(dyn std::error::Error + 'static)) -> String {
    std::iter::successors(Some(err), |e| e.source())
        .find_map(|e| e.downcast_ref::<ErrorMetadata>())
        .and_then(|answer| described(answer.code(), answer.message()))
        .unwrap_or_else(|| DisplayErrorContext(err).to_string())
}

/// `code: message` (or the code alone), if the service answered with a code.
fn described(code: Option<&str>, message: Option<&str>) -> Option<String> {
    match (code, message) {
        (Some(code), Some(message)) => Some(format!("{code}: {message}")),
        (Some(code), None) => Some(code.to_string()),
        (None, _) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Path-style addressing is checked against the emulator in tests/evidence_aws.rs (the S3
    // client config has no getter for it).
    #[tokio::test]
    async fn loader_applies_region_endpoint_and_retry() {
        let credentials = aws_sdk_s3::config::Credentials::new("AKIDTEST", "secret", None, None, "test");
        let config = loader("eu-west-1", Some("http://127.0.0.1:9")).credentials_provider(credentials).load().await;
        assert_eq!(config.region().map(|r| r.as_ref()), Some("eu-west-1"));
        assert_eq!(config.endpoint_url(), Some("http://127.0.0.1:9"));
        let retry = config.retry_config().expect("retry config is set");
        assert_eq!(retry.max_attempts(), MAX_ATTEMPTS);
        assert_eq!(retry.max_backoff(), MAX_BACKOFF);
    }

    /// A provider's error wrapping the service's answer, as `CredentialsError` wraps STS's.
    #[derive(Debug)]
    struct Wrapped(Option<ErrorMetadata>);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an error occurred while loading credentials")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.0.as_ref().map(|answer| answer as &(dyn std::error::Error + 'static))
        }
    }

    #[test]
    fn the_service_answer_is_found_in_the_cause_chain() {
        let denied = ErrorMetadata::builder().code("AccessDenied").message("not authorized").build();
        assert_eq!(cause_message(&Wrapped(Some(denied))), "AccessDenied: not authorized");
        // No answer in the chain: the whole chain, as for a transport failure.
        assert!(cause_message(&Wrapped(None)).starts_with("an error occurred while loading credentials"));
    }
}
