//! What the command's environment is (CLI-CONTRACT §8): the parent's (or only the names `env.allow`
//! lets through), plus tether's own variables, `env.set`, and `run_env` templated per run.
//!
//! The failure this closes: a secret meant for the teardown or the PR-comment reporter (a
//! forge token) leaking into a test command that prints its environment. With `env.allow`
//! only listed names pass; the report token's variable never passes unless allowed by name.

use crate::config::Config;
use std::ffi::OsString;

/// Names tether itself sets; an inherited value must never shadow them.
const OWN: &[&str] = &[
    "TETHER_APP",
    "TETHER_RUN_ID",
    "TETHER_RUN_DIR",
    "TETHER_RUN_TOKEN",
    "TETHER_REASON",
    "TETHER_EXIT_CODE",
    "TETHER_SLOT",
    "TMPDIR",
];

#[derive(Debug, Clone, Default)]
pub(crate) struct EnvPolicy {
    pub(crate) allow: Option<Vec<String>>,
    pub(crate) set: Vec<(String, String)>,
    pub(crate) run_env: Vec<(String, String)>,
    /// Variables only tether's own side may see (the report token).
    pub(crate) secrets: Vec<String>,
}

/// The values `run_env` templates expand to.
pub(crate) struct RunVars<'a> {
    pub(crate) run_dir: &'a str,
    pub(crate) run_id: &'a str,
    pub(crate) app: &'a str,
    pub(crate) slot: &'a str,
}

impl EnvPolicy {
    pub(crate) fn from_config(cfg: &Config) -> EnvPolicy {
        EnvPolicy {
            allow: cfg.env_allow.clone(),
            set: cfg.env_set.clone(),
            run_env: cfg.run_env.clone(),
            secrets: cfg
                .report
                .as_ref()
                .and_then(|r| r.comment.as_ref())
                .map(|c| vec![c.token_env.clone()])
                .unwrap_or_default(),
        }
    }

    fn passes(&self, name: &str, for_command: bool) -> bool {
        if OWN.contains(&name) {
            return false;
        }
        if !for_command {
            return true;
        }
        match &self.allow {
            Some(globs) => globs.iter().any(|g| glob_match(g, name)),
            None => !self.secrets.iter().any(|s| s == name),
        }
    }

    /// The environment before tether's own variables: filtered parent env, `env.set` and the
    /// expanded `run_env`. `for_command` applies the allow-list (setup and teardown are
    /// tether's side and see everything).
    pub(crate) fn build(&self, for_command: bool, vars: &RunVars<'_>) -> Vec<(OsString, OsString)> {
        let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(k, _)| k.to_str().is_some_and(|k| self.passes(k, for_command)))
            .collect();
        for (k, v) in &self.set {
            set(&mut env, k, v.into());
        }
        for (k, v) in self.expanded_run_env(vars) {
            set(&mut env, &k, v.into());
        }
        env
    }

    pub(crate) fn expanded_run_env(&self, vars: &RunVars<'_>) -> Vec<(String, String)> {
        self.run_env
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    expand(v, vars.run_dir, vars.run_id, vars.app, vars.slot),
                )
            })
            .collect()
    }
}

/// Set or replace `name`.
pub(crate) fn set(env: &mut Vec<(OsString, OsString)>, name: &str, value: OsString) {
    env.retain(|(k, _)| k != name);
    env.push((name.into(), value));
}
/// `Err(var)` for the first `{var}` that is not a known template variable.
pub(crate) fn check_template(text: &str) -> std::result::Result<(), String> {
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            return Err(after.to_owned());
        };
        let var = &after[..close];
        if !super::TEMPLATE_VARS.contains(&var) {
            return Err(var.to_owned());
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

/// Expand `{run_dir}`, `{run_id}`, `{app}`, `{slot}`.
pub(crate) fn expand(text: &str, run_dir: &str, run_id: &str, app: &str, slot: &str) -> String {
    text.replace("{run_dir}", run_dir)
        .replace("{run_id}", run_id)
        .replace("{app}", app)
        .replace("{slot}", slot)
}

/// Shell-style glob with `*` and `?`, for `env.allow`.
pub(crate) fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}
