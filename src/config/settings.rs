//! Effective settings: flag > environment > config file > built-in default (SPEC §2).
//!
//! clap already folds the environment into the flag value (`--lock-dir` / `TETHER_LOCK_DIR`),
//! so the order here is "what clap gave" > file > default. The built-in defaults live here and
//! nowhere else.

use super::places::Place;
use super::OnBusy;
use crate::config::duration;
use crate::config::Config;
use crate::output::LogFormat;
use std::path::PathBuf;
use std::time::Duration;

pub(crate) const DEADLINE: Duration = Duration::from_secs(60 * 60);
pub(crate) const GRACE: Duration = Duration::from_secs(10);
pub(crate) const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(5 * 60);
pub(crate) const RETAIN_FAILED: Duration = Duration::from_secs(24 * 60 * 60);
/// Bound on connecting to the cluster's server (`cluster.connect_timeout`).
pub(crate) const CLUSTER_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct Settings<'a> {
    cfg: &'a Config,
}

impl<'a> Settings<'a> {
    pub(crate) fn new(cfg: &'a Config) -> Self {
        Settings { cfg }
    }

    pub(crate) fn lock_dir(&self, flag: Option<PathBuf>) -> Place {
        flag.or(self.cfg.lock_dir.clone())
            .map(Place::given)
            .unwrap_or_else(Place::default_lock_dir)
    }

    pub(crate) fn runs_dir(&self, flag: Option<PathBuf>) -> Place {
        flag.or(self.cfg.runs_dir.clone())
            .map(Place::given)
            .unwrap_or_else(Place::default_runs_dir)
    }

    pub(crate) fn deadline(&self, flag: Option<Duration>) -> Duration {
        flag.or(self.cfg.deadline).unwrap_or(DEADLINE)
    }

    pub(crate) fn grace(&self, flag: Option<Duration>) -> Duration {
        flag.or(self.cfg.grace).unwrap_or(GRACE)
    }

    pub(crate) fn teardown_timeout(&self, flag: Option<Duration>) -> Duration {
        flag.or(self.cfg.teardown_timeout)
            .unwrap_or(TEARDOWN_TIMEOUT)
    }

    pub(crate) fn retain_failed(&self, flag: Option<Duration>) -> Duration {
        flag.or(self.cfg.retain_failed).unwrap_or(RETAIN_FAILED)
    }

    pub(crate) fn on_busy(&self, flag: Option<OnBusy>) -> OnBusy {
        flag.or(self.cfg.on_busy).unwrap_or(OnBusy::Wait)
    }

    /// Watch stdout/stderr for the CI agent's death (D32): on unless turned off.
    pub(crate) fn agent_watch(&self, flag: Option<bool>) -> bool {
        flag.or(self.cfg.agent_watch).unwrap_or(true)
    }

    pub(crate) fn log_format(&self, flag: Option<LogFormat>) -> LogFormat {
        flag.or(self.cfg.log_format).unwrap_or_default()
    }
}

/// `tether config show`: every key, its effective value (without flags), and its source.
pub(crate) fn show(cfg: &Config) -> String {
    fn line(out: &mut String, key: &str, value: String, source: &str) {
        out.push_str(&format!("{key:<18} {value:<40} ({source})\n"));
    }
    let src = |set: bool, env: Option<&str>| -> String {
        if env.is_some_and(|e| std::env::var_os(e).is_some_and(|v| !v.is_empty())) {
            format!("env {}", env.unwrap_or_default())
        } else if set {
            match &cfg.path {
                Some(p) => format!("file {}", p.display()),
                None => "file".into(),
            }
        } else {
            "default".into()
        }
    };
    let env_path = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let mut out = String::new();
    out.push_str(&format!(
        "config file        {}\n",
        cfg.path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| format!(
                "none ({} not present)",
                crate::config::default_path().display()
            ))
    ));
    let s = Settings::new(cfg);
    line(
        &mut out,
        "lock_dir",
        s.lock_dir(env_path("TETHER_LOCK_DIR"))
            .preferred()
            .display()
            .to_string(),
        &src(cfg.lock_dir.is_some(), Some("TETHER_LOCK_DIR")),
    );
    line(
        &mut out,
        "runs_dir",
        s.runs_dir(env_path("TETHER_RUNS_DIR"))
            .preferred()
            .display()
            .to_string(),
        &src(cfg.runs_dir.is_some(), Some("TETHER_RUNS_DIR")),
    );
    let d = |v: Duration| duration::canonical(v);
    line(
        &mut out,
        "deadline",
        d(s.deadline(None)),
        &src(cfg.deadline.is_some(), None),
    );
    line(
        &mut out,
        "grace",
        d(s.grace(None)),
        &src(cfg.grace.is_some(), None),
    );
    line(
        &mut out,
        "teardown_timeout",
        d(s.teardown_timeout(None)),
        &src(cfg.teardown_timeout.is_some(), None),
    );
    line(
        &mut out,
        "retain_failed",
        d(s.retain_failed(None)),
        &src(cfg.retain_failed.is_some(), None),
    );
    let on_busy = match s.on_busy(None) {
        OnBusy::Wait => "wait",
        OnBusy::Fail => "fail",
        OnBusy::CancelOlder => "cancel-older",
    };
    line(
        &mut out,
        "on_busy",
        on_busy.into(),
        &src(cfg.on_busy.is_some(), None),
    );
    let lf = match s.log_format(None) {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    };
    line(
        &mut out,
        "log_format",
        lf.into(),
        &src(cfg.log_format.is_some(), None),
    );
    line(
        &mut out,
        "agent_watch",
        s.agent_watch(None).to_string(),
        &src(cfg.agent_watch.is_some(), None),
    );
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "none".into());
    line(
        &mut out,
        "slots",
        cfg.slots
            .map(|n| n.to_string())
            .unwrap_or_else(|| "none".into()),
        &src(cfg.slots.is_some(), None),
    );
    line(
        &mut out,
        "setup",
        opt(&cfg.setup),
        &src(cfg.setup.is_some(), None),
    );
    line(
        &mut out,
        "teardown",
        opt(&cfg.teardown),
        &src(cfg.teardown.is_some(), None),
    );
    line(
        &mut out,
        "env.allow",
        cfg.env_allow
            .as_ref()
            .map(|v| v.join(" "))
            .unwrap_or_else(|| "(everything passes)".into()),
        &src(cfg.env_allow.is_some(), None),
    );
    for (k, v) in &cfg.env_set {
        line(
            &mut out,
            &format!("env.set.{k}"),
            v.clone(),
            &src(true, None),
        );
    }
    for (k, v) in &cfg.run_env {
        line(
            &mut out,
            &format!("run_env.{k}"),
            v.clone(),
            &src(true, None),
        );
    }
    line(
        &mut out,
        "run_as",
        cfg.run_as
            .as_ref()
            .map(|r| {
                format!(
                    "{}:{}",
                    r.user,
                    r.group.clone().unwrap_or_else(|| "-".into())
                )
            })
            .unwrap_or_else(|| "none".into()),
        &src(cfg.run_as.is_some(), None),
    );
    show_cluster(&mut out, cfg, &src);
    out
}

/// The `cluster` lines of `config show`: where the server is, where the password comes from.
fn show_cluster(out: &mut String, cfg: &Config, src: &dyn Fn(bool, Option<&str>) -> String) {
    use super::cluster;
    let line = |out: &mut String, key: &str, value: String, source: String| {
        out.push_str(&format!("{key:<18} {value:<40} ({source})\n"));
    };
    let file = cfg.cluster.as_ref();
    let env_url = std::env::var("TETHER_CLUSTER_URL")
        .ok()
        .filter(|v| !v.is_empty());
    let url = match &env_url {
        Some(text) => match cluster::parse_url(text) {
            Ok(u) => u.to_string(),
            Err(e) => format!("invalid: {e}"),
        },
        None => file
            .and_then(|c| c.url.as_ref())
            .map(|u| u.to_string())
            .unwrap_or_else(|| "none (single host: local locks only)".into()),
    };
    let url_set = file.is_some_and(|c| c.url.is_some());
    line(
        out,
        "cluster.url",
        url,
        src(url_set, Some("TETHER_CLUSTER_URL")),
    );
    if env_url.is_none() && !url_set {
        return;
    }
    let password = match (
        file.and_then(|c| c.password_env.as_ref()),
        file.and_then(|c| c.password_file.as_ref()),
    ) {
        (Some(var), _) => format!("from ${var}"),
        (None, Some(path)) => format!("from {}", path.display()),
        (None, None) => "none".into(),
    };
    let pw_set = file.is_some_and(|c| c.password_env.is_some() || c.password_file.is_some());
    line(out, "cluster.password", password, src(pw_set, None));
    let ca = file.and_then(|c| c.ca_file.as_ref());
    line(
        out,
        "cluster.ca_file",
        ca.map(|p| p.display().to_string())
            .unwrap_or_else(|| "none (public CAs for verify-full)".into()),
        src(ca.is_some(), None),
    );
    let timeout = file.and_then(|c| c.connect_timeout);
    line(
        out,
        "cluster.connect_timeout",
        duration::canonical(timeout.unwrap_or(CLUSTER_CONNECT_TIMEOUT)),
        src(timeout.is_some(), None),
    );
}
