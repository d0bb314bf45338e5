//! A run that holds its app until the test releases it: the other side of every busy-app,
//! waiting-line, cancel and live-holder test.

use std::path::Path;

use crate::command::{RunningTether, TetherCmd};
use crate::files::{sh_wait_for, wait_holder_pid};
use crate::sandbox::Sandbox;
use crate::wait::wait_pids;
use crate::{shell_quote, TIMEOUT};

/// A run started by [`start_held_run`], holding its app.
#[derive(Debug)]
pub struct HeldRun {
    pub run: RunningTether,
    /// tether's core: the pid in the app's lock metadata.
    pub core: i32,
    /// The command's own pid (`sh`).
    pub cmd_pid: i32,
}

/// Starts `tether run --app <app> --run-id <id> … -- sh -c <script>` whose command writes its
/// pid to a fresh marker (atomically) and then waits (bounded, `exit 99` after ~30 s) for
/// `release` to exist. `configure` adds what the test needs (teardown, options) to the
/// builder. Returns once the command runs and the app's lock metadata names run `id` as
/// `running`, having checked that the pid there is tether's core (the front's child named
/// `tether`), not the front.
pub fn start_held_run<'a>(
    sb: &'a Sandbox,
    app: &str,
    id: &str,
    release: &Path,
    configure: impl FnOnce(TetherCmd<'a>) -> TetherCmd<'a>,
) -> HeldRun {
    let pid_file = sb.fresh_mark("held.pid");
    let script = format!(
        "echo $$ > {p}.tmp && mv {p}.tmp {p}; {wait}",
        p = shell_quote(&pid_file),
        wait = sh_wait_for(&shell_quote(release))
    );
    let run = configure(sb.tether_run().app(app).run_id(id))
        .command(["sh", "-c", &script])
        .spawn();
    let cmd_pid = wait_pids(&pid_file, TIMEOUT)[0];
    let core = wait_holder_pid(sb, app, id);
    assert_eq!(
        core,
        run.wait_core_pid(TIMEOUT),
        "metadata pid is the core's"
    );
    assert_ne!(core, run.pid(), "the core is not the front");
    HeldRun { run, core, cmd_pid }
}
