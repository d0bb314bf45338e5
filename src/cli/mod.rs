//! The command line: parse (pure, touches nothing), then hand over to the layer that owns the
//! subcommand (each defines its own arguments). What describes the command line itself lives
//! here: usage errors (`usage`) and the man pages and completions generated from it (`docs`).
//! Every clap error is a usage error, exit 125 (clap's own default, 2, would collide with a
//! command's status), printed as one `tether: usage: …` line; `--help` and `--version` exit 0.

mod docs;
mod usage;

use crate::config::args::ConfigArgs;
use crate::out::status::StatusArgs;
use crate::reap::cmd::{ForgetArgs, JanitorArgs};
use crate::run::RunArgs;
use clap::{CommandFactory, Parser, Subcommand};
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
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    Completions(docs::CompletionsArgs),
    /// Print the man page tether(1) on stdout, or write every page with --dir.
    Man(docs::ManArgs),
}

/// Parse argv and run; returns the process exit code.
pub fn main_with_args(args: impl IntoIterator<Item = OsString>) -> i32 {
    let argv: Vec<OsString> = args.into_iter().collect();
    let cli = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(e) => return usage::report(&e, &Cli::command(), &argv),
    };
    match cli.command {
        Command::Run(args) => crate::run::run(args),
        Command::Janitor(args) => crate::reap::cmd::janitor(args),
        Command::Status(args) => crate::out::status::main(args),
        Command::Config(args) => crate::config::args::main(args),
        Command::Forget(args) => crate::reap::cmd::forget(args),
        Command::Completions(args) => docs::completions(args, Cli::command()),
        Command::Man(args) => docs::man(args, Cli::command()),
    }
}
