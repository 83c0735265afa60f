//! `estafeta user add|passwd|del|list`: placeholder until the auth crate lands.

use std::process::ExitCode;

use clap::Subcommand;
use estafeta_config::Config;

/// The `user` subcommands.
#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// List the users.
    List,
}

/// Runs a `user` subcommand against the users file of `cfg`.
pub fn run(_command: UserCommand, cfg: &Config) -> ExitCode {
    eprintln!("users file: {}", cfg.auth.users_file.display());
    ExitCode::FAILURE
}
