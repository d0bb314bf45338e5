//! The command-line arguments every subcommand shares (where state lives, how much to say),
//! and `tether config`. clap derive structs live with the layer that uses them; `cli` only
//! puts them together.

use super::Config;
use crate::output::LogFormat;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

/// Where tether keeps its state, and its config file (run, janitor, status).
#[derive(Debug, Args)]
pub(crate) struct PlaceArgs {
    #[arg(long, env = "TETHER_LOCK_DIR")]
    pub(crate) lock_dir: Option<PathBuf>,
    #[arg(long, env = "TETHER_RUNS_DIR")]
    pub(crate) runs_dir: Option<PathBuf>,
    #[arg(long, env = "TETHER_CONFIG")]
    pub(crate) config: Option<PathBuf>,
}

/// The cluster's PostgreSQL server (issue 16). The URL carries no password: that comes from
/// the config's `cluster.password_env` or `cluster.password_file`.
#[derive(Debug, Args)]
pub(crate) struct ClusterArgs {
    /// postgres://user@host[:port]/dbname[?sslmode=disable|require|verify-full]
    // Parsed after clap, not by a value parser: clap would echo a refused value, password and
    // all, in its error.
    #[arg(long, env = "TETHER_CLUSTER_URL")]
    pub(crate) cluster_url: Option<String>,
}

impl ClusterArgs {
    /// The cluster to use (flag > environment > file), `None` when there is none.
    pub(crate) fn target(
        &self,
        cfg: &Config,
    ) -> crate::error::Result<Option<super::cluster::ClusterTarget>> {
        let flag = match self.cluster_url.as_deref().filter(|u| !u.is_empty()) {
            Some(text) => Some(
                super::cluster::parse_url(text)
                    .map_err(|m| crate::error::Error::tether(format!("--cluster-url: {m}")))?,
            ),
            None => None,
        };
        Ok(super::cluster::target(flag, cfg.cluster.as_ref()))
    }
}

/// How much tether says, and in which format (run, janitor).
#[derive(Debug, Args)]
pub(crate) struct OutputArgs {
    /// [default: text]
    #[arg(long, value_enum)]
    pub(crate) log_format: Option<LogFormat>,
    /// Only warnings, errors and the summary.
    #[arg(short, long, conflicts_with = "verbose")]
    pub(crate) quiet: bool,
    /// Debug lines too.
    #[arg(short, long)]
    pub(crate) verbose: bool,
}

impl OutputArgs {
    /// Start the output with the flags; a config file's `log_format` applies later, only
    /// where no flag was given (`adopt_config`).
    pub(crate) fn init(&self) {
        crate::output::init(
            self.log_format.unwrap_or_default(),
            self.quiet,
            self.verbose,
        );
    }

    pub(crate) fn adopt_config(&self, cfg: &Config) {
        if let (None, Some(f)) = (self.log_format, cfg.log_format) {
            crate::output::set_format(f);
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct ConfigArgs {
    #[command(subcommand)]
    pub(crate) action: ConfigAction,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ConfigAction {
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

/// Load the config file a command names (or the default one); on error print the message
/// and give the exit code. With `output`, a config `log_format` applies where no flag set one.
pub(crate) fn load(places: &PlaceArgs, output: Option<&OutputArgs>) -> Result<Config, i32> {
    match super::load(places.config.as_deref()) {
        Ok(c) => {
            if let Some(o) = output {
                o.adopt_config(&c);
            }
            Ok(c)
        }
        Err(e) => {
            crate::output::error(&e.message);
            Err(e.exit_code())
        }
    }
}

/// clap's parser for durations (`90s`, `15m`, `1h30m`).
pub(crate) fn duration(text: &str) -> Result<Duration, String> {
    super::duration::parse(text)
}

/// What `config check` asks of the layers above about `run_as` (does the user exist here?):
/// `Ok(Some(warning))`, `Ok(None)` for fine, `Err` for a config `tether run` would refuse.
pub(crate) type RunAsCheck = fn(&super::RunAs) -> crate::error::Result<Option<String>>;

/// `tether config check|show`.
pub(crate) fn main(args: ConfigArgs, check_run_as: RunAsCheck) -> i32 {
    match args.action {
        ConfigAction::Check { file, config } => {
            let path = file.or(config);
            let checked = super::load(path.as_deref()).and_then(|c| {
                if let Some(ra) = &c.run_as {
                    let name = c.path.as_ref().map(|p| p.display().to_string());
                    let name = name.unwrap_or_default();
                    match check_run_as(ra) {
                        Ok(Some(w)) => {
                            crate::output::warn("config", &format!("config {name}: {w}"))
                        }
                        Ok(None) => {}
                        Err(e) => {
                            return Err(crate::error::Error::tether(format!(
                                "config {name}: {}",
                                e.message
                            )))
                        }
                    }
                }
                Ok(c)
            });
            match checked {
                Ok(c) => {
                    match &c.path {
                        Some(p) => crate::output::stdout(&format!("config {}: ok\n", p.display())),
                        None => crate::output::stdout(&format!(
                            "no config file (looked for {}): built-in defaults\n",
                            super::default_path().display()
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
        ConfigAction::Show { config } => match super::load(config.as_deref()) {
            Ok(c) => {
                crate::output::stdout(&super::show::render(&c));
                0
            }
            Err(e) => {
                crate::output::error(&e.message);
                e.exit_code()
            }
        },
    }
}
