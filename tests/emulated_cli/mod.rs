//! Runs the `lockstep` binary against the emulator: the environment it needs to reach moto, and
//! nothing from the developer's own AWS configuration.

use std::path::Path;
use std::process::Command;

use crate::common;

/// `lockstep` with `args`, the configuration at `config`, AWS pointed at the emulator;
/// `scratch` is a folder for the (absent) AWS config files.
pub fn lockstep(args: &[&str], config: &Path, scratch: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lockstep"));
    command
        .args(args)
        .env("LOCKSTEP_CONFIG", config)
        .env("LOCKSTEP_LOG", "warn")
        .env("AWS_ENDPOINT_URL", common::endpoint())
        .env("AWS_ACCESS_KEY_ID", "AKIDLOCKSTEPTESTS")
        .env("AWS_SECRET_ACCESS_KEY", "secret")
        .env("AWS_REGION", common::REGION)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", scratch.join("none"))
        .env("AWS_SHARED_CREDENTIALS_FILE", scratch.join("none"));
    command
}
