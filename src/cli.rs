//! The command line: parse (pure, touches nothing), then hand over to the layer that owns the
//! subcommand (each defines its own arguments).
//! Every clap error is a usage error, exit 125 (clap's own default, 2, would collide with a
//! command's status); `--help` and `--version` exit 0.

use crate::cluster::check::ClusterCmdArgs;
use crate::config::args::ConfigArgs;
use crate::out::status::StatusArgs;
use crate::reap::cmd::{ForgetArgs, JanitorArgs};
use crate::run::RunArgs;
use clap::{Parser, Subcommand};
use std::ffi::OsString;

#[derive(Debug, Parser)]
#[command(
    name = "tether",
    version,
    about = "CI harness runner: one app lock, one teardown, nothing outlives a dead run",
    // A flag given twice: the last one wins (as with most tools; a wrapper may add defaults).
    args_override_self = true
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run a command under the per-app lock with lifetime guards and one teardown.
    Run(RunArgs),
    /// Reap what dead runs left (leftover processes, the app, run dirs); never a live run.
    Janitor(JanitorArgs),
    /// Show app locks (holders and waiters from the kernel), slots and run dirs.
    Status(StatusArgs),
    /// Validate or show the configuration.
    Config(ConfigArgs),
    /// Give up on a dead run whose reap keeps failing: remove its state, run nothing.
    Forget(ForgetArgs),
    /// The cluster-wide locks' PostgreSQL server: `tether cluster check`.
    Cluster(ClusterCmdArgs),
}

/// Parse argv and run; returns the process exit code.
pub fn main_with_args(args: impl IntoIterator<Item = OsString>) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            let _ = e.print();
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => 0,
                _ => crate::exit::TETHER_FAILURE,
            };
        }
    };
    match cli.command {
        Command::Run(args) => crate::run::run(args),
        Command::Janitor(args) => crate::reap::cmd::janitor(args),
        Command::Status(args) => crate::out::status::main(args),
        Command::Config(args) => crate::config::args::main(args),
        Command::Forget(args) => crate::reap::cmd::forget(args),
        Command::Cluster(args) => crate::cluster::check::main(args),
    }
}
