//! The command line: parse (pure, touches nothing), then hand over to the layer that owns the
//! subcommand (each defines its own arguments). What describes the command line itself lives
//! here: usage errors (`usage`) and the man pages and completions generated from it (`docs`).
//! Every clap error is a usage error, exit 125 (clap's own default, 2, would collide with a
//! command's status), printed as one `tether: usage: …` line; `--help` and `--version` exit 0.

mod docs;
mod usage;

use crate::cluster::check::ClusterCmdArgs;
use crate::config::args::ConfigArgs;
use crate::out::history::HistoryArgs;
use crate::out::status::StatusArgs;
use crate::reap::cmd::{ForgetArgs, JanitorArgs};
use crate::run::RunArgs;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
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
    /// Show finished runs from the journal, with per-app lock-wait and hold-time figures.
    History(HistoryArgs),
    /// Validate or show the configuration.
    Config(ConfigArgs),
    /// Give up on a dead run whose reap keeps failing: remove its state, run nothing.
    Forget(ForgetArgs),
    /// The cluster-wide locks' PostgreSQL server: `tether cluster check`.
    Cluster(ClusterCmdArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    Completions(docs::CompletionsArgs),
    /// Print the man page tether(1) on stdout, or write every page with --dir.
    Man(docs::ManArgs),
}

/// Parse argv and run; returns the process exit code.
pub fn main_with_args(args: impl IntoIterator<Item = OsString>) -> i32 {
    one_malloc_arena();
    // clap reads a flag's variable when the flag is defined, so the empty ones go before the
    // command that parses is built; that costs a second build only when there is one (every
    // flag read from the environment is named `TETHER_…`).
    let empty_tether_var = std::env::vars_os()
        .any(|(name, value)| value.is_empty() && name.as_encoded_bytes().starts_with(b"TETHER_"));
    if empty_tether_var {
        unset_empty_env_flags(&Cli::command());
    }
    let mut command = Cli::command();
    let argv: Vec<OsString> = args.into_iter().collect();
    let parsed = command
        .try_get_matches_from_mut(&argv)
        .and_then(|m| Cli::from_arg_matches(&m).map(|cli| (cli, m)));
    let cli = match parsed {
        Ok((mut cli, matches)) => {
            note_env_sources(&mut cli, &matches);
            // Both live as long as the process: freeing them piece by piece costs a run more
            // than building them did.
            std::mem::forget(matches);
            std::mem::forget(command);
            cli
        }
        Err(e) => return usage::report(&e, &Cli::command(), &argv),
    };
    match cli.command {
        Command::Run(args) => crate::run::run(args),
        Command::Janitor(args) => crate::reap::cmd::janitor(args),
        Command::Status(args) => crate::out::status::main(args),
        Command::History(args) => crate::out::history::main(args),
        Command::Config(args) => crate::config::args::main(args, crate::ident::identity::check),
        Command::Forget(args) => crate::reap::cmd::forget(args),
        Command::Cluster(args) => crate::cluster::check::main(args),
        Command::Completions(args) => docs::completions(args, Cli::command()),
        Command::Man(args) => docs::man(args, Cli::command()),
    }
}

/// A `TETHER_*` variable that backs a flag but is set to the empty string counts as unset, as
/// `${VAR:-default}` would have it (`TETHER_CONFIG=` must not be "no file name given"). Runs
/// first, while the process has one thread, so changing its environment is sound; the
/// command inherits the same view.
/// tether's few threads (a lock wait, a cluster session's) share the main thread's malloc
/// arena. glibc would give each thread that allocates a heap of its own (64 MiB of address
/// space mapped and trimmed, four system calls and its first page faults) for a thread that
/// lives a few milliseconds in every queued run (B7).
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt sets an allocator parameter under the allocator's own lock; tether has
    // started no thread yet, so none has an arena of its own.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn unset_empty_env_flags(cmd: &clap::Command) {
    for arg in cmd.get_arguments() {
        if let Some(name) = arg.get_env() {
            if std::env::var_os(name).is_some_and(|v| v.is_empty()) {
                std::env::remove_var(name);
            }
        }
    }
    for sub in cmd.get_subcommands() {
        unset_empty_env_flags(sub);
    }
}

/// Remember which values came from the environment, so an error can name the variable.
fn note_env_sources(cli: &mut Cli, matches: &clap::ArgMatches) {
    if let (Command::Run(args), Some(m)) = (&mut cli.command, matches.subcommand_matches("run")) {
        args.run_id_from_env = m.value_source("run_id") == Some(ValueSource::EnvVariable);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `main_with_args` looks for empty `TETHER_…` variables only: a flag backed by a variable
    /// of another name would keep its empty value ("a value is required").
    #[test]
    fn every_flag_read_from_the_environment_is_a_tether_variable() {
        fn walk(cmd: &clap::Command, names: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                if let Some(name) = arg.get_env() {
                    names.push(name.to_string_lossy().into_owned());
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, names);
            }
        }
        let mut names = Vec::new();
        walk(&Cli::command(), &mut names);
        assert!(!names.is_empty());
        let others: Vec<_> = names.iter().filter(|n| !n.starts_with("TETHER_")).collect();
        assert!(others.is_empty(), "not TETHER_…: {others:?}");
    }
}
