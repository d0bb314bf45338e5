//! `tether janitor` and `tether forget` on the command line: their arguments, and the glue
//! from arguments and config to the mechanism.

use crate::config::args::{duration, load, ClusterArgs, OutputArgs, PlaceArgs};
use clap::Args;
use std::time::Duration;

#[derive(Debug, Args)]
pub(crate) struct JanitorArgs {
    /// Fallback teardown for dead runs without a readable run record (run by sh -c).
    #[arg(long)]
    pub(crate) teardown: Option<String>,
    /// [default: 5m]
    #[arg(long, value_parser = duration)]
    pub(crate) teardown_timeout: Option<Duration>,
    /// SIGTERM→SIGKILL grace for a dead run's leftover processes [default: 10s].
    #[arg(long, value_parser = duration)]
    pub(crate) grace: Option<Duration>,
    /// Sweep this app only.
    #[arg(long)]
    pub(crate) app: Option<String>,
    /// Say what would be done; take no lock and change nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Print one JSON document on stdout.
    #[arg(long)]
    pub(crate) json: bool,
    /// Keep clean (--keep-run-dir) run dirs this long before removing them [default: 24h].
    #[arg(long, value_parser = duration)]
    pub(crate) retain_failed: Option<Duration>,
    /// Leave run cgroups of dead runs younger than this to the next holder of their app;
    /// older ones (their state is gone) are killed and removed.
    #[arg(long, value_parser = duration, default_value = "10m")]
    pub(crate) orphan_age: Duration,
    #[command(flatten)]
    pub(crate) places: PlaceArgs,
    /// With a cluster: reap under each app's cluster lock too, kill the leftovers of this
    /// host's runs reaped elsewhere, report other hosts' dead runs.
    #[command(flatten)]
    pub(crate) cluster: ClusterArgs,
    #[command(flatten)]
    pub(crate) output: OutputArgs,
}

#[derive(Debug, Args)]
pub(crate) struct ForgetArgs {
    /// The dead run's id. A live run is refused.
    pub(crate) run_id: String,
    #[command(flatten)]
    pub(crate) places: PlaceArgs,
    #[command(flatten)]
    pub(crate) output: OutputArgs,
}

/// `tether janitor`.
pub(crate) fn janitor(args: JanitorArgs) -> i32 {
    args.output.init();
    let cfg = match load(&args.places, Some(&args.output)) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let s = crate::config::settings::Settings::new(&cfg);
    let app = match args.app.as_deref().map(crate::ident::names::Domain::parse) {
        None => None,
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => {
            crate::output::error(&e);
            return crate::exit::TETHER_FAILURE;
        }
    };
    let cluster = match args.cluster.target(&cfg) {
        Ok(c) => c,
        Err(e) => {
            crate::output::error(&e.message);
            return e.exit_code();
        }
    };
    let opts = crate::reap::janitor::Options {
        lock_dir: s.lock_dir(args.places.lock_dir),
        runs_dir: s.runs_dir(args.places.runs_dir),
        teardown: args.teardown.or(cfg.teardown.clone()),
        teardown_timeout: s.teardown_timeout(args.teardown_timeout),
        grace: s.grace(args.grace),
        app,
        dry_run: args.dry_run,
        retain: s.retain_failed(args.retain_failed),
        orphan_age: args.orphan_age,
        cluster,
    };
    match crate::reap::janitor::sweep(&opts) {
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
                    "janitor summary: live={} kept={} reaped={} removed={} skipped={} failed={}{}",
                    report.live,
                    report.kept,
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

/// `tether forget`.
pub(crate) fn forget(args: ForgetArgs) -> i32 {
    args.output.init();
    let cfg = match load(&args.places, Some(&args.output)) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let s = crate::config::settings::Settings::new(&cfg);
    match crate::reap::forget::forget(
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
