//! `tether config show`: every key the file can set — its effective value (flags aside) and
//! where that value comes from (`default`, `file F`, `env VAR`). Keys a file leaves unset are
//! listed too, so an operator sees the whole policy in one place, not only what they typed.

use super::settings::{self, Settings};
use super::{duration, Config, OnBusy};
use crate::output::LogFormat;
use std::path::PathBuf;

/// Wide enough for the longest key, `report.comment.token_env`.
const KEY_WIDTH: usize = 24;

/// The rows, in the order of the file's documentation; `render` lays them out.
struct Table<'c> {
    cfg: &'c Config,
    out: String,
}

impl Table<'_> {
    fn row(&mut self, key: &str, value: impl Into<String>, set: bool) {
        let source = if set { self.file() } else { "default".into() };
        self.row_from(key, value, &source);
    }

    /// A key clap also reads from the environment: the variable wins over the file.
    fn row_env(&mut self, key: &str, value: impl Into<String>, set: bool, env: &str) {
        if std::env::var_os(env).is_some_and(|v| !v.is_empty()) {
            self.row_from(key, value, &format!("env {env}"));
        } else {
            self.row(key, value, set);
        }
    }

    fn row_from(&mut self, key: &str, value: impl Into<String>, source: &str) {
        let value = value.into();
        self.out
            .push_str(&format!("{key:<KEY_WIDTH$} {value:<40} ({source})\n"));
    }

    fn file(&self) -> String {
        match &self.cfg.path {
            Some(p) => format!("file {}", p.display()),
            None => "file".into(),
        }
    }
}

pub(crate) fn render(cfg: &Config) -> String {
    let s = Settings::new(cfg);
    let mut t = Table {
        cfg,
        out: String::new(),
    };
    t.out.push_str(&format!(
        "{:<KEY_WIDTH$} {}\n",
        "config file",
        cfg.path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| format!("none ({} not present)", super::default_path().display()))
    ));
    let env_path = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let lock_dir = s
        .lock_dir(env_path("TETHER_LOCK_DIR"))
        .preferred()
        .display()
        .to_string();
    t.row_env(
        "lock_dir",
        lock_dir,
        cfg.lock_dir.is_some(),
        "TETHER_LOCK_DIR",
    );
    let runs_dir = s
        .runs_dir(env_path("TETHER_RUNS_DIR"))
        .preferred()
        .display()
        .to_string();
    t.row_env(
        "runs_dir",
        runs_dir,
        cfg.runs_dir.is_some(),
        "TETHER_RUNS_DIR",
    );
    let d = duration::canonical;
    t.row("deadline", d(s.deadline(None)), cfg.deadline.is_some());
    t.row("grace", d(s.grace(None)), cfg.grace.is_some());
    let teardown_timeout = d(s.teardown_timeout(None));
    t.row(
        "teardown_timeout",
        teardown_timeout,
        cfg.teardown_timeout.is_some(),
    );
    let retain_failed = d(s.retain_failed(None));
    t.row("retain_failed", retain_failed, cfg.retain_failed.is_some());
    let on_busy = match s.on_busy(None) {
        OnBusy::Wait => "wait",
        OnBusy::Fail => "fail",
        OnBusy::CancelOlder => "cancel-older",
    };
    t.row("on_busy", on_busy, cfg.on_busy.is_some());
    let order = s.queue_order(None).as_str();
    t.row("queue_order", order, cfg.queue_order.is_some());
    let max_queue = s
        .max_queue(None)
        .map(|n| n.to_string())
        .unwrap_or_else(|| "none".into());
    t.row("max_queue", max_queue, cfg.max_queue.is_some());
    let log_format = match s.log_format(None) {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    };
    t.row("log_format", log_format, cfg.log_format.is_some());
    let agent_watch = s.agent_watch(None).to_string();
    t.row("agent_watch", agent_watch, cfg.agent_watch.is_some());
    t.row("slots", or_none(cfg.slots), cfg.slots.is_some());
    t.row("setup", or_none(cfg.setup.as_ref()), cfg.setup.is_some());
    let teardown = or_none(cfg.teardown.as_ref());
    t.row("teardown", teardown, cfg.teardown.is_some());
    let allow = cfg
        .env_allow
        .as_ref()
        .map(|v| v.join(" "))
        .unwrap_or_else(|| "(everything passes)".into());
    t.row("env.allow", allow, cfg.env_allow.is_some());
    if cfg.env_set.is_empty() {
        t.row("env.set", "none", false);
    }
    for (k, v) in &cfg.env_set {
        t.row(&format!("env.set.{k}"), v.clone(), true);
    }
    if cfg.run_env.is_empty() {
        t.row("run_env", "none", false);
    }
    for (k, v) in &cfg.run_env {
        t.row(&format!("run_env.{k}"), v.clone(), true);
    }
    let run_as = cfg
        .run_as
        .as_ref()
        .map(|r| format!("{}:{}", r.user, r.group.as_deref().unwrap_or("-")));
    t.row("run_as", or_none(run_as), cfg.run_as.is_some());
    limits(&mut t);
    report(&mut t);
    cluster(&mut t);
    t.out
}

/// Where the cluster's server is and where its password comes from (issue 16).
fn cluster(t: &mut Table<'_>) {
    let file = t.cfg.cluster.clone();
    let file = file.as_ref();
    let url = file.and_then(|c| c.url.as_ref()).map(|u| u.to_string());
    let url_set = url.is_some();
    let url = url.unwrap_or_else(|| "none (single host: local locks only)".into());
    match std::env::var("TETHER_CLUSTER_URL")
        .ok()
        .filter(|v| !v.is_empty())
    {
        Some(text) => {
            let shown = match super::cluster::parse_url(&text) {
                Ok(u) => u.to_string(),
                Err(e) => format!("invalid: {e}"),
            };
            t.row_from("cluster.url", shown, "env TETHER_CLUSTER_URL");
        }
        None => t.row("cluster.url", url, url_set),
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
    t.row("cluster.password", password, pw_set);
    let ca = file.and_then(|c| c.ca_file.as_ref());
    let ca_shown = ca
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "none (public CAs for verify-full)".into());
    t.row("cluster.ca_file", ca_shown, ca.is_some());
    let timeout = file.and_then(|c| c.connect_timeout);
    let shown = duration::canonical(timeout.unwrap_or(settings::CLUSTER_CONNECT_TIMEOUT));
    t.row("cluster.connect_timeout", shown, timeout.is_some());
    // Self-fencing (PROTOCOL §16): each knob, defaulted as a run uses it.
    let timing = file.cloned().unwrap_or_default().timing();
    for (key, set, value) in [
        (
            "cluster.heartbeat",
            file.and_then(|c| c.heartbeat).is_some(),
            timing.heartbeat,
        ),
        (
            "cluster.self_fence",
            file.and_then(|c| c.self_fence).is_some(),
            timing.self_fence,
        ),
        (
            "cluster.server_release",
            file.and_then(|c| c.server_release).is_some(),
            timing.server_release,
        ),
    ] {
        t.row(key, duration::canonical(value), set);
    }
}

fn limits(t: &mut Table<'_>) {
    let l = t.cfg.limits.clone();
    t.row(
        "limits.memory",
        or_none(l.memory.map(size)),
        l.memory.is_some(),
    );
    t.row("limits.pids", or_none(l.pids), l.pids.is_some());
    t.row("limits.cpu", or_none(l.cpu), l.cpu.is_some());
    t.row("limits.nofile", or_none(l.nofile), l.nofile.is_some());
    t.row("limits.nproc", or_none(l.nproc), l.nproc.is_some());
}

fn report(t: &mut Table<'_>) {
    let r = t.cfg.report.clone().unwrap_or_default();
    let comment = r.comment.as_ref();
    let api = comment.map(|c| c.api.clone());
    t.row("report.comment.api", or_none(api), comment.is_some());
    let url = comment.map(|c| c.url.clone());
    t.row("report.comment.url", or_none(url), comment.is_some());
    let token_env = comment.map(|c| c.token_env.clone());
    let set = comment.is_some();
    t.row("report.comment.token_env", or_none(token_env), set);
    let webhook = or_none(r.webhook.as_ref());
    t.row("report.webhook", webhook, r.webhook.is_some());
    let timeout = duration::canonical(r.timeout.unwrap_or(settings::REPORT_TIMEOUT));
    t.row("report.timeout", timeout, r.timeout.is_some());
    let retries = r.retries.unwrap_or(settings::REPORT_RETRIES).to_string();
    t.row("report.retries", retries, r.retries.is_some());
}

fn or_none(v: Option<impl ToString>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "none".into())
}

/// A byte count as the file would spell it: `2G`, `512M`, `64K`, else bytes.
fn size(bytes: u64) -> String {
    for (unit, shift) in [("G", 30), ("M", 20), ("K", 10)] {
        if bytes != 0 && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(shown: &str) -> Vec<String> {
        shown
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect()
    }

    /// Every key the file can set has a row even when unset (limits and report were missing).
    #[test]
    fn every_key_has_a_row_set_or_not() {
        let empty = keys(&render(&Config::default()));
        for top in super::super::TOP_KEYS {
            assert!(
                empty
                    .iter()
                    .any(|k| k == top || k.starts_with(&format!("{top}."))),
                "no row for {top}: {empty:?}"
            );
        }
        for nested in [
            "limits.memory",
            "limits.pids",
            "limits.cpu",
            "limits.nofile",
            "limits.nproc",
            "report.comment.api",
            "report.comment.url",
            "report.comment.token_env",
            "report.webhook",
            "report.timeout",
            "report.retries",
            "cluster.url",
            "cluster.password",
            "cluster.ca_file",
            "cluster.connect_timeout",
            "cluster.heartbeat",
            "cluster.self_fence",
            "cluster.server_release",
        ] {
            assert!(empty.iter().any(|k| k == nested), "no row for {nested}");
        }
    }

    #[test]
    fn set_values_show_as_the_file_spells_them_and_name_the_file() {
        let text = "limits: {memory: 512M, cpu: 1.5}\n\
                    report:\n  webhook: https://hooks.example.org/x\n  retries: 5\n  \
                    comment: {api: gitea, url: https://git.example.org, token_env: TOKEN}\n";
        let mut cfg = super::super::parse(text, "t.yml").expect("parses");
        cfg.path = Some("t.yml".into());
        let shown = render(&cfg);
        let row = |key: &str| {
            shown
                .lines()
                .find(|l| l.split_whitespace().next() == Some(key))
                .unwrap_or_else(|| panic!("no {key} row:\n{shown}"))
                .split_whitespace()
                .skip(1)
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(row("limits.memory"), "512M (file t.yml)");
        assert_eq!(row("limits.cpu"), "1.5 (file t.yml)");
        assert_eq!(row("limits.pids"), "none (default)");
        assert_eq!(row("report.retries"), "5 (file t.yml)");
        assert_eq!(row("report.timeout"), "10s (default)");
        assert_eq!(row("report.comment.token_env"), "TOKEN (file t.yml)");
        assert_eq!(
            row("report.webhook"),
            "https://hooks.example.org/x (file t.yml)"
        );
    }
}
