//! `tether forget <run-id>`: the way out of a dead run whose reap keeps failing (a teardown
//! with a typo fails the same way forever, and every later run of its app exits 125).
//!
//! It refuses a live run (its `run.lock` is held), runs nothing (no teardown, no kill),
//! appends who forgot what to `<runs dir>/.forgotten.jsonl`, marks the app's lock metadata
//! clean when it names the run (or the next holder would reap it again from there), and
//! removes the run dir. The app itself may still be deployed: that is the operator's call,
//! and the line says so.

use crate::config::places::Place;
use crate::error::{Error, Result};
use crate::ident::names::RunId;
use crate::output;
use crate::state::dirs;
use crate::state::lock::{self, TryLock};
use crate::state::record::{self, State};
use crate::state::rundir::{self, RunDir};
use nix::fcntl::OFlag;
use std::io::Write;
use std::path::Path;

/// The audit trail of forgotten runs, in the runs dir (a name no run id can have).
pub(crate) const FORGOTTEN_LOG: &str = ".forgotten.jsonl";

/// The exact command that forgets `run_id`, with the dirs when they are not the defaults.
pub(crate) fn hint(lock_dir: Option<&Path>, runs_dir: Option<&Path>, run_id: &str) -> String {
    let mut cmd = String::from("tether forget");
    let defaults = [
        (lock_dir, Place::default_lock_dir(), "--lock-dir"),
        (runs_dir, Place::default_runs_dir(), "--runs-dir"),
    ];
    for (given, default, flag) in defaults {
        if let Some(p) = given.filter(|p| *p != default.preferred()) {
            cmd.push_str(&format!(" {flag} {}", quote(&p.display().to_string())));
        }
    }
    cmd.push(' ');
    cmd.push_str(&quote(run_id));
    cmd
}

fn quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "_./:=@%+,-".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Forget run `id`. Returns the exit code.
pub(crate) fn forget(lock_place: &Place, runs_place: &Place, id: &str) -> Result<()> {
    let id = RunId::parse(id).map_err(Error::tether)?;
    let Some(runs) = dirs::choose("runs dir", runs_place, 0o700)?.existing() else {
        return Err(Error::tether(format!("no run {id}: there is no runs dir")));
    };
    let runs = runs.dir;
    let dir = match rundir::open_trusted(&runs, id.as_str()) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::tether(format!(
                "no run {id} in {}",
                runs.path().display()
            )))
        }
        Err(e) => return Err(Error::tether(format!("run dir: {e}"))),
    };
    let held = match lock::try_acquire(&dir, rundir::LOCK_FILE) {
        Ok(TryLock::Held(h)) => h,
        Ok(TryLock::Busy(file)) => {
            let pid = crate::sys::proc_locks::holder_of(&file)
                .map(|p| p.to_string())
                .unwrap_or_else(|| "unknown".into());
            return Err(Error::tether(format!(
                "run {id} is live (its run.lock is held by pid {pid}): refusing to forget it"
            )));
        }
        Err(e) => {
            return Err(Error::tether(format!(
                "run dir {}: {e}",
                dir.path().display()
            )))
        }
    };
    let rec = record::read_record(&dir).ok();
    let app = rec.as_ref().map(|r| r.meta.app.clone());
    if let Some(app) = &app {
        settle_lock_metadata(lock_place, app, id.as_str());
    }
    let who = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| "unknown".into());
    let entry = serde_json::json!({
        "forgotten_at": record::unix_now(),
        "by_uid": nix::unistd::geteuid().as_raw(),
        "by_user": who,
        "run_id": id.as_str(),
        "app": app,
        "state": rec.as_ref().map(|r| r.meta.state.as_str()),
        "teardown": rec.as_ref().and_then(|r| r.teardown.clone()),
        "reap_failures": rec.as_ref().map(|r| r.reap_failures),
    });
    let log = runs
        .open_file(
            FORGOTTEN_LOG,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_APPEND,
            0o600,
        )
        .and_then(|mut f| {
            let mut line = entry.to_string();
            line.push('\n');
            f.write_all(line.as_bytes())
        });
    if let Err(e) = log {
        return Err(Error::tether(format!(
            "cannot record the forgetting in {}: {e}; nothing was removed",
            runs.join(FORGOTTEN_LOG).display()
        )));
    }
    let run_dir = RunDir::adopt(runs.clone(), id.to_string(), dir, held);
    let path = run_dir.path();
    run_dir
        .remove()
        .map_err(|e| Error::tether(format!("cannot remove {}: {e}", path.display())))?;
    let state = rec
        .as_ref()
        .map(|r| r.meta.state.as_str())
        .unwrap_or("unknown");
    output::emit_forced(
        output::Level::Info,
        "forgotten",
        &format!(
            "forgot run {id} of {} (state {state}): run dir removed, no teardown ran — the app \
             may still be deployed; recorded in {}",
            app.as_deref().unwrap_or("an unknown app"),
            runs.join(FORGOTTEN_LOG).display()
        ),
        &[("run_id", id.as_str().into())],
        true,
    );
    Ok(())
}

/// Mark the app's lock metadata clean when it names the forgotten run (only when the lock is
/// free: a live holder's metadata names that holder).
fn settle_lock_metadata(lock_place: &Place, app: &str, id: &str) {
    let Ok(app) = crate::ident::names::Domain::parse(app) else {
        return;
    };
    let lock = match dirs::choose("lock dir", lock_place, 0o755) {
        Ok(chosen) => chosen.existing(),
        Err(e) => {
            // The run is still forgotten (its state lives in the runs dir); but an untrusted
            // lock dir is never written to, and the operator must hear that its metadata may
            // still name the run.
            output::warn(
                "forget",
                &format!(
                    "{}; the lock metadata of {app} was left as it is",
                    e.message
                ),
            );
            None
        }
    };
    let Some(lock) = lock else {
        return;
    };
    let name = crate::state::lock::app_lock_name(&app);
    if let Ok(Some(held)) = lock::try_acquire_existing(&lock.dir, &name) {
        if let Some(mut meta) = record::read_meta(held.file()) {
            if meta.run_id == id && meta.state != State::Clean {
                meta.state = State::Clean;
                let _ = record::write_meta(held.file(), &meta);
            }
        }
    }
}
