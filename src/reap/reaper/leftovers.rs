//! What a reaper kills and runs for a dead run it cannot fully know: leftovers by cgroup and
//! token (never while the core lives), unknown dead runs (unreadable records, garbage lock
//! metadata), and the teardown commands it runs for them.

use super::{base_env, finish_dir, ReapFailed, Reaper};
use crate::ident::names::{Domain, RunId};
use crate::output;
use crate::state::record::LockMeta;
use crate::state::rundir::RunDir;
use crate::sys::cgroup::RunCgroup;
use crate::sys::shell;
use crate::sys::tree::{self, Members};
use std::ffi::OsString;
use std::path::Path;

impl Reaper<'_> {
    /// A run dir whose `run.lock` we hold but whose record cannot be read (empty after a power
    /// loss, corrupt, not tether's): an unknown dead run. Its app is unknown, so only what is
    /// named after its run id can be found: processes carrying its id and a token of a dead
    /// core, and cgroups named after it with a dead core. Then the fallback teardown (with
    /// `TETHER_RUN_ID`, no `TETHER_APP`), then the dir goes.
    pub(crate) fn reap_unreadable(
        &mut self,
        dir: RunDir,
        id: &RunId,
        why: &str,
    ) -> Result<(), ReapFailed> {
        self.mark_reaped(id.as_str());
        output::emit(
            output::Level::Info,
            "reaping",
            &format!("reaping dead run {id} of an unknown app ({why})"),
            &[("run_id", id.as_str().into())],
        );
        let mut members = Members {
            dead_run: Some(id.to_string()),
            ..Members::default()
        };
        let cgroups = crate::sys::cgroup::orphans_of_run(id.as_str());
        let killed = self.terminate_all(&mut members, &cgroups);
        if killed > 0 {
            output::info(
                "reaping",
                &format!("killed {killed} leftover process(es) of dead run {id}"),
            );
        }
        self.say_no_record(&format!("dead run {id}"));
        if let Some(script) = self.policy.fallback_teardown.clone() {
            let mut env = base_env();
            env.push(("TETHER_RUN_ID".into(), id.as_str().into()));
            env.push(("TETHER_RUN_DIR".into(), dir.path().into_os_string()));
            let o = self.run_teardown(&script, &env, Path::new("/"), &mut |_| {});
            if !o.ok() {
                dir.release();
                return Err(ReapFailed::new(
                    format!(
                        "teardown of dead run {id} {}; its run dir is kept for the next reap",
                        o.describe()
                    ),
                    Some(id.as_str()),
                ));
            }
        }
        finish_dir(Some(dir), true);
        Ok(())
    }

    pub(super) fn say_no_record(&self, whom: &str) {
        let msg = match &self.policy.fallback_teardown {
            Some(_) => format!("no readable run record for {whom}: using the configured teardown"),
            None => format!(
                "no readable run record for {whom} and no teardown configured \
                 (--teardown): no teardown ran"
            ),
        };
        output::warn("reaping", &msg);
    }

    pub(super) fn reap_unknown(&mut self, app: &Domain, why: &str) -> Result<(), ReapFailed> {
        output::info(
            "reaping",
            &format!("reaping dead run unknown of {app} ({why})"),
        );
        let Some(script) = self.policy.fallback_teardown.clone() else {
            output::warn(
                "reaping",
                &format!(
                    "no teardown configured for the unknown dead run of {app}: no teardown ran"
                ),
            );
            return Ok(());
        };
        let mut env = base_env();
        env.push(("TETHER_APP".into(), app.as_str().into()));
        let o = self.run_teardown(&script, &env, Path::new("/"), &mut |_| {});
        if o.ok() {
            Ok(())
        } else {
            Err(ReapFailed::new(
                format!("teardown of the unknown dead run of {app} {}", o.describe()),
                None,
            ))
        }
    }

    pub(super) fn run_teardown(
        &mut self,
        script: &str,
        env: &[(OsString, OsString)],
        cwd: &Path,
        on_exit: &mut dyn FnMut(&shell::Outcome),
    ) -> shell::Outcome {
        shell::run_shell(
            script,
            env,
            Some(cwd),
            self.cgroup.as_ref(),
            self.policy.teardown_timeout,
            self.sup,
            on_exit,
        )
    }

    /// Kill what a dead run left: its cgroup and the processes carrying its token — only
    /// when they are provably its own (containment), and never while its core is alive.
    pub(crate) fn kill_leftovers(&mut self, meta: &LockMeta) {
        if crate::sys::procfs::core_alive(meta.pid, meta.pid_start) {
            output::warn(
                "reaping",
                &format!(
                    "the core of dead run {} (pid {}) is still alive: leaving its processes alone",
                    meta.run_id, meta.pid
                ),
            );
            return;
        }
        let mut members = Members::default();
        let cgroup = match (&meta.cgroup, meta.run_cgroup()) {
            (None, _) => None,
            (Some(_), Ok(cg)) => Some(cg),
            (Some(path), Err(why)) => {
                output::warn(
                    "reaping",
                    &format!(
                        "ignoring the cgroup {path} recorded for dead run {}: {why}",
                        meta.run_id
                    ),
                );
                None
            }
        };
        let token = meta.expected_token();
        if meta.token.as_deref() == Some(token.as_str()) {
            members.env_markers = vec![
                format!("TETHER_RUN_ID={}", meta.run_id),
                format!("TETHER_RUN_TOKEN={token}"),
            ];
        }
        let cgroups: Vec<RunCgroup> = cgroup.into_iter().collect();
        self.terminate_all(&mut members, &cgroups);
    }

    /// Terminate `members` plus every process of `cgroups` (grace, then KILL), remove the
    /// cgroups, and return how many processes there were.
    fn terminate_all(&mut self, members: &mut Members, cgroups: &[RunCgroup]) -> usize {
        let mut killed = 0;
        let mut pass = |members: &Members, this: &mut Self| {
            let done = tree::terminate(members, this.policy.grace, this.sup);
            killed += done.found;
            if !done.survivors.is_empty() {
                output::warn(
                    "reaping",
                    &format!(
                        "processes of a dead run survived SIGKILL: {:?}",
                        done.survivors
                    ),
                );
            }
        };
        if cgroups.is_empty() {
            pass(members, self);
        }
        for cg in cgroups {
            members.cgroup = Some(cg.clone());
            pass(members, self);
            members.dead_run = None;
            members.env_markers.clear();
            if let Err(e) = cg.remove() {
                output::debug(
                    "reaping",
                    &format!("cannot remove {}: {e}", cg.path().display()),
                );
            }
        }
        killed
    }
}
