//! Credentials never reach the log: at `LOCKSTEP_LOG=trace` the AWS SDK would print the access
//! key ID and the session token of every request it signs.

mod common;

use std::process::Command;

const ACCESS_KEY_ID: &str = "AKIAHOSTILELOGTEST42";
const SECRET: &str = "hostile-log-test-secret-key-do-not-print";
const SESSION_TOKEN: &str = "HostileLogTestSessionTokenXyZ0123456789";

#[test]
fn aws_credentials_stay_out_of_trace_logs() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rollout.yaml");
    std::fs::write(&config, std::fs::read_to_string("rollout.yaml").unwrap()).unwrap();
    for level in ["trace", "aws_smithy_runtime=trace,aws_sigv4=trace,hyper=trace", "debug"] {
        let out = Command::new(env!("CARGO_BIN_EXE_lockstep"))
            .args(["--config", config.to_str().unwrap(), "policy", "apply"])
            .env("LOCKSTEP_LOG", level)
            .env("AWS_ENDPOINT_URL", common::endpoint())
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("AWS_SESSION_TOKEN", SESSION_TOKEN)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", dir.path().join("none"))
            .env("AWS_SHARED_CREDENTIALS_FILE", dir.path().join("none"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{level}: {stderr}");
        // The SDK really signed and sent requests with these credentials.
        assert!(stdout.contains("dry run"), "{stdout}");
        for secret in [ACCESS_KEY_ID, SECRET, SESSION_TOKEN] {
            assert!(!stderr.contains(secret), "{level}: {secret} appears in the log");
            assert!(!stdout.contains(secret), "{level}: {secret} appears on stdout");
        }
    }
}
