//! `tether run`'s arguments.

use crate::config::args::{duration, ClusterArgs, OutputArgs, PlaceArgs};
use crate::config::{OnBusy, QueueOrder};
use clap::Args;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// App domain this run deploys (lock key), e.g. immi-ad3e33.ci.example.org.
    #[arg(long, env = "TETHER_APP", value_name = "DOMAIN")]
    pub(crate) app: String,
    /// Run id (default: derived from the CI environment, else local-<time>-<pid>).
    #[arg(long, env = "TETHER_RUN_ID")]
    pub(crate) run_id: Option<String>,
    /// Whether `run_id` came from `TETHER_RUN_ID` (an error then names the variable).
    #[arg(skip)]
    pub(crate) run_id_from_env: bool,
    /// Tear down when this much time has passed since tether started (0 = never) [default: 60m].
    #[arg(long, value_parser = duration)]
    pub(crate) deadline: Option<Duration>,
    /// SIGTERM→SIGKILL grace for the command's process tree [default: 10s].
    #[arg(long, value_parser = duration)]
    pub(crate) grace: Option<Duration>,
    /// Give up waiting for the app lock after this long (exit 75).
    #[arg(long, value_parser = duration)]
    pub(crate) lock_timeout: Option<Duration>,
    /// What to do when another run holds the app lock [default: wait].
    #[arg(long, value_enum)]
    pub(crate) on_busy: Option<OnBusy>,
    /// Which waiter goes next when the app is free [default: oldest-first].
    #[arg(long, value_enum)]
    pub(crate) queue_order: Option<QueueOrder>,
    /// Give up at once (exit 75) when this many runs already wait for the app.
    #[arg(long, value_name = "N")]
    pub(crate) max_queue: Option<u32>,
    /// Group key for --on-busy cancel-older (default: CI repo + PR, else repo + branch).
    #[arg(long)]
    pub(crate) group: Option<String>,
    /// Cap on concurrently running commands on this host, across apps.
    #[arg(long)]
    pub(crate) slots: Option<u32>,
    /// Shell command run (by sh -c) after the lock is taken, before the command.
    #[arg(long)]
    pub(crate) setup: Option<String>,
    /// Shell command run (by sh -c) after the command's tree is gone.
    #[arg(long)]
    pub(crate) teardown: Option<String>,
    /// Bound on the teardown command [default: 5m].
    #[arg(long, value_parser = duration)]
    pub(crate) teardown_timeout: Option<Duration>,
    /// Keep the run dir after a successful teardown (for inspection).
    #[arg(long)]
    pub(crate) keep_run_dir: bool,
    /// Do not tear down when the reader of tether's stdout/stderr pipe goes away (by default
    /// that is taken as the CI agent's death: reason agent-gone, exit 143).
    #[arg(long, overrides_with = "agent_watch")]
    pub(crate) no_agent_watch: bool,
    /// Watch stdout/stderr even if the config file says `agent_watch: false`.
    #[arg(long, overrides_with = "no_agent_watch")]
    pub(crate) agent_watch: bool,
    #[command(flatten)]
    pub(crate) places: PlaceArgs,
    #[command(flatten)]
    pub(crate) cluster: ClusterArgs,
    /// Write the summary as JSON to this file.
    #[arg(long)]
    pub(crate) summary_json: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) output: OutputArgs,
    /// How often the waiting line repeats.
    #[arg(long, hide = true, env = "TETHER_WAIT_PROGRESS_INTERVAL", default_value = "60s", value_parser = duration)]
    pub(crate) wait_progress_interval: Duration,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub(crate) command: Vec<OsString>,
}

impl RunArgs {
    /// `--agent-watch` / `--no-agent-watch`, whichever came last; `None` for neither.
    pub(crate) fn agent_watch_flag(&self) -> Option<bool> {
        match (self.agent_watch, self.no_agent_watch) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        }
    }
}
