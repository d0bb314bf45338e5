//! The command line: parse (pure, touches nothing), then hand over to the mechanism.
//! Every clap error is a usage error, exit 125 (clap's own default, 2, would collide with a
//! command's status); `--help` and `--version` exit 0.

use crate::output::LogFormat;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "tether",
    version,
    about = "CI harness runner: one app lock, one teardown, nothing outlives a dead run",
    // A flag given twice: the last one wins (as with most tools; a wrapper may add defaults).
    args_override_self = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
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
}

/// Where tether keeps its state, and its config file (run, janitor, status).
#[derive(Debug, Args)]
pub struct PlaceArgs {
    #[arg(long, env = "TETHER_LOCK_DIR")]
    pub lock_dir: Option<PathBuf>,
    #[arg(long, env = "TETHER_RUNS_DIR")]
    pub runs_dir: Option<PathBuf>,
    #[arg(long, env = "TETHER_CONFIG")]
    pub config: Option<PathBuf>,
}

/// How much tether says, and in which format (run, janitor).
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// [default: text]
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Only warnings, errors and the summary.
    #[arg(short, long, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Debug lines too.
    #[arg(short, long)]
    pub verbose: bool,
}

impl OutputArgs {
    /// Start the output with the flags; a config file's `log_format` applies later, only
    /// where no flag was given (`adopt_config`).
    pub fn init(&self) {
        crate::output::init(
            self.log_format.unwrap_or_default(),
            self.quiet,
            self.verbose,
        );
    }

    pub fn adopt_config(&self, cfg: &crate::config::Config) {
        if let (None, Some(f)) = (self.log_format, cfg.log_format) {
            crate::output::set_format(f);
        }
    }
}

#[derive(Debug, Args)]
pub struct JanitorArgs {
    /// Fallback teardown for dead runs without a readable run record (run by sh -c).
    #[arg(long)]
    pub teardown: Option<String>,
    /// [default: 5m]
    #[arg(long, value_parser = duration)]
    pub teardown_timeout: Option<Duration>,
    /// SIGTERM→SIGKILL grace for a dead run's leftover processes [default: 10s].
    #[arg(long, value_parser = duration)]
    pub grace: Option<Duration>,
    /// Sweep this app only.
    #[arg(long)]
    pub app: Option<String>,
    /// Say what would be done; take no lock and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON document on stdout.
    #[arg(long)]
    pub json: bool,
    /// Keep clean (--keep-run-dir) run dirs this long before removing them [default: 24h].
    #[arg(long, value_parser = duration)]
    pub retain_failed: Option<Duration>,
    /// Leave run cgroups of dead runs younger than this to the next holder of their app;
    /// older ones (their state is gone) are killed and removed.
    #[arg(long, value_parser = duration, default_value = "10m")]
    pub orphan_age: Duration,
    #[command(flatten)]
    pub places: PlaceArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub places: PlaceArgs,
}

#[derive(Debug, Args)]
pub struct ForgetArgs {
    /// The dead run's id. A live run is refused.
    pub run_id: String,
    #[command(flatten)]
    pub places: PlaceArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub action: ConfigAction,
}

#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Validate a config file (default: --config / TETHER_CONFIG / the default path).
    Check {
        file: Option<PathBuf>,
        #[arg(long, env = "TETHER_CONFIG", hide = true)]
        config: Option<PathBuf>,
    },
    /// Print the effective configuration and where each value comes from.
    Show {
        #[arg(long, env = "TETHER_CONFIG")]
        config: Option<PathBuf>,
    },
}

fn duration(text: &str) -> Result<Duration, String> {
    crate::duration::parse(text)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnBusy {
    Wait,
    Fail,
    CancelOlder,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// App domain this run deploys (lock key), e.g. immi-ad3e33.ci.example.org.
    #[arg(long, env = "TETHER_APP")]
    pub app: String,
    /// Run id (default: derived from the CI environment, else local-<time>-<pid>).
    #[arg(long, env = "TETHER_RUN_ID")]
    pub run_id: Option<String>,
    /// Tear down when this much time has passed since tether started (0 = never) [default: 60m].
    #[arg(long, value_parser = duration)]
    pub deadline: Option<Duration>,
    /// SIGTERM→SIGKILL grace for the command's process tree [default: 10s].
    #[arg(long, value_parser = duration)]
    pub grace: Option<Duration>,
    /// Give up waiting for the app lock after this long (exit 75).
    #[arg(long, value_parser = duration)]
    pub lock_timeout: Option<Duration>,
    /// What to do when another run holds the app lock [default: wait].
    #[arg(long, value_enum)]
    pub on_busy: Option<OnBusy>,
    /// Group key for --on-busy cancel-older (default: CI repo + PR, else repo + branch).
    #[arg(long)]
    pub group: Option<String>,
    /// Cap on concurrently running commands on this host, across apps.
    #[arg(long)]
    pub slots: Option<u32>,
    /// Shell command run (by sh -c) after the lock is taken, before the command.
    #[arg(long)]
    pub setup: Option<String>,
    /// Shell command run (by sh -c) after the command's tree is gone.
    #[arg(long)]
    pub teardown: Option<String>,
    /// Bound on the teardown command [default: 5m].
    #[arg(long, value_parser = duration)]
    pub teardown_timeout: Option<Duration>,
    /// Keep the run dir after a successful teardown (for inspection).
    #[arg(long)]
    pub keep_run_dir: bool,
    /// Do not tear down when the reader of tether's stdout/stderr pipe goes away (by default
    /// that is taken as the CI agent's death: reason agent-gone, exit 143).
    #[arg(long, overrides_with = "agent_watch")]
    pub no_agent_watch: bool,
    /// Watch stdout/stderr even if the config file says `agent_watch: false`.
    #[arg(long, overrides_with = "no_agent_watch")]
    pub agent_watch: bool,
    #[command(flatten)]
    pub places: PlaceArgs,
    /// Write the summary as JSON to this file.
    #[arg(long)]
    pub summary_json: Option<PathBuf>,
    #[command(flatten)]
    pub output: OutputArgs,
    /// How often the waiting line repeats.
    #[arg(long, hide = true, env = "TETHER_WAIT_PROGRESS_INTERVAL", default_value = "60s", value_parser = duration)]
    pub wait_progress_interval: Duration,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

impl RunArgs {
    /// `--agent-watch` / `--no-agent-watch`, whichever came last; `None` for neither.
    pub fn agent_watch_flag(&self) -> Option<bool> {
        match (self.agent_watch, self.no_agent_watch) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        }
    }
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
        Command::Janitor(args) => janitor(args),
        Command::Status(args) => status(args),
        Command::Config(args) => config_command(args),
        Command::Forget(args) => forget(args),
    }
}

fn forget(args: ForgetArgs) -> i32 {
    args.output.init();
    let cfg = match crate::config::load(args.places.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            crate::output::error(&e.message);
            return e.exit_code();
        }
    };
    args.output.adopt_config(&cfg);
    let s = crate::settings::Settings::new(&cfg);
    match crate::forget::forget(
        &s.lock_dir(args.places.lock_dir),
        &s.runs_dir(args.places.runs_dir),
        &args.run_id,
    ) {
        Ok(()) => 0,
        Err(e) => {
            crate::output::error(&e.message);
            e.exit_code()
        }
    }
}

fn config_command(args: ConfigArgs) -> i32 {
    match args.action {
        ConfigAction::Check { file, config } => {
            let path = file.or(config);
            match crate::config::load(path.as_deref()) {
                Ok(c) => {
                    match &c.path {
                        Some(p) => crate::output::stdout(&format!("config {}: ok\n", p.display())),
                        None => crate::output::stdout(&format!(
                            "no config file (looked for {}): built-in defaults\n",
                            crate::config::default_path().display()
                        )),
                    }
                    0
                }
                Err(e) => {
                    crate::output::error(&e.message);
                    e.exit_code()
                }
            }
        }
        ConfigAction::Show { config } => match crate::config::load(config.as_deref()) {
            Ok(c) => {
                crate::output::stdout(&crate::settings::show(&c));
                0
            }
            Err(e) => {
                crate::output::error(&e.message);
                e.exit_code()
            }
        },
    }
}

fn janitor(args: JanitorArgs) -> i32 {
    args.output.init();
    let cfg = match crate::config::load(args.places.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            crate::output::error(&e.message);
            return e.exit_code();
        }
    };
    args.output.adopt_config(&cfg);
    let s = crate::settings::Settings::new(&cfg);
    let app = match args.app.as_deref().map(crate::names::Domain::parse) {
        None => None,
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => {
            crate::output::error(&e);
            return crate::exit::TETHER_FAILURE;
        }
    };
    let opts = crate::janitor::Options {
        lock_dir: s.lock_dir(args.places.lock_dir),
        runs_dir: s.runs_dir(args.places.runs_dir),
        teardown: args.teardown.or(cfg.teardown.clone()),
        teardown_timeout: s.teardown_timeout(args.teardown_timeout),
        grace: s.grace(args.grace),
        app,
        dry_run: args.dry_run,
        retain: s.retain_failed(args.retain_failed),
        orphan_age: args.orphan_age,
    };
    match crate::janitor::sweep(&opts) {
        Ok(report) => {
            if args.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(text) => crate::output::stdout(&format!("{text}\n")),
                    Err(e) => crate::output::error(&format!("cannot encode report: {e}")),
                }
            }
            crate::output::emit_forced(
                crate::output::Level::Info,
                "janitor-summary",
                &format!(
                    "janitor summary: live={} reaped={} removed={} skipped={} failed={}{}",
                    report.live,
                    report.reaped,
                    report.removed,
                    report.skipped,
                    report.failed,
                    if report.dry_run { " (dry run)" } else { "" }
                ),
                &[],
                true,
            );
            i32::from(report.failed > 0)
        }
        Err(e) => {
            crate::output::error(&e.message);
            e.exit_code()
        }
    }
}

fn status(args: StatusArgs) -> i32 {
    let cfg = match crate::config::load(args.places.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            crate::output::error(&e.message);
            return e.exit_code();
        }
    };
    let s = crate::settings::Settings::new(&cfg);
    let dirs =
        crate::dirs::choose("lock dir", &s.lock_dir(args.places.lock_dir), 0o755).and_then(|l| {
            let r = crate::dirs::choose("runs dir", &s.runs_dir(args.places.runs_dir), 0o700)?;
            Ok((l.existing(), r.existing()))
        });
    let (lock_dir, runs_dir) = match dirs {
        Ok(d) => d,
        Err(e) => {
            crate::output::error(&e.message);
            return e.exit_code();
        }
    };
    let st = crate::status::collect(
        lock_dir.as_ref().map(|d| &d.dir),
        runs_dir.as_ref().map(|d| &d.dir),
    );
    if args.json {
        match serde_json::to_string_pretty(&st) {
            Ok(text) => crate::output::stdout(&format!("{text}\n")),
            Err(e) => {
                crate::output::error(&format!("cannot encode status: {e}"));
                return crate::exit::TETHER_FAILURE;
            }
        }
    } else {
        crate::output::stdout(&st.to_text());
    }
    0
}
