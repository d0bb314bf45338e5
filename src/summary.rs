//! The run's last word (SPEC §7): one summary line, and the same as JSON for bots.

use crate::ci_env::CiInfo;
use crate::duration::human;
use crate::output;
use serde::Serialize;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub run_id: String,
    pub app: String,
    /// passed | failed | cancelled | deadline
    pub result: String,
    pub exit: i32,
    pub lock_wait_ms: u64,
    pub runtime_ms: u64,
    /// ok | failed | none
    pub teardown: String,
    /// exited | signal | deadline | parent-died | busy | error
    pub reason: String,
    pub ci: Option<CiInfo>,
}

impl Summary {
    pub fn line(&self) -> String {
        format!(
            "run {} summary: app={} result={} exit={} lock_wait={} runtime={} teardown={}",
            self.run_id,
            self.app,
            self.result,
            self.exit,
            human(Duration::from_millis(self.lock_wait_ms)),
            human(Duration::from_millis(self.runtime_ms)),
            self.teardown
        )
    }

    /// Print the line (even under --quiet) and write the JSON file if asked.
    pub fn publish(&self, json_file: Option<&Path>) {
        let fields = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_object().cloned())
            .unwrap_or_default();
        let fields: Vec<(&str, serde_json::Value)> = fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        output::emit_forced(output::Level::Info, "summary", &self.line(), &fields, true);
        if let Some(path) = json_file {
            let write = serde_json::to_vec_pretty(self)
                .map_err(std::io::Error::other)
                .and_then(|mut t| {
                    t.push(b'\n');
                    // path-ok: the operator's own --summary-json file, not tether's state
                    std::fs::write(path, t)
                });
            if let Err(e) = write {
                output::warn(
                    "summary",
                    &format!("cannot write summary JSON {}: {e}", path.display()),
                );
            }
        }
    }
}
