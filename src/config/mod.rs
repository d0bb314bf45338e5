//! The config file (CLI-CONTRACT §10): one YAML file with the operator's policy.
//!
//! Strict on purpose: an unknown key, a wrong type, a bad duration or an unknown template
//! variable is an error naming the file, the line and the key (`config /etc/tether/config.yml:2:
//! unknown key "teardwon" (did you mean "teardown"?)`). A typo in a teardown key must never
//! silently become "no teardown". Precedence (CLI-CONTRACT §3): flag > environment > file > default;
//! this module only reads the file, `run`/`cli` apply the order.

pub(crate) mod args;
pub(crate) mod cluster;
pub(crate) mod duration;
pub(crate) mod env;
pub(crate) mod places;
mod read;
pub(crate) mod settings;
mod show;
pub(crate) mod yaml;

use crate::error::{Error, Result};
use crate::output::LogFormat;
use read::{unknown_key, Ctx};
use std::path::{Path, PathBuf};
use std::time::Duration;
use yaml::{Node, Value};

/// What a run does when another run holds its app (`--on-busy`, config `on_busy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum OnBusy {
    Wait,
    Fail,
    CancelOlder,
}

/// Which waiter of an app goes next (`--queue-order`, config `queue_order`; PROTOCOL §15).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub(crate) enum QueueOrder {
    // First come, first served. (Plain comments: a doc comment here would turn clap's help
    // for every flag into its long, spaced-out form.)
    #[default]
    OldestFirst,
    // The latest arrival goes next (GitLab's `newest_first`).
    NewestFirst,
}

impl QueueOrder {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            QueueOrder::OldestFirst => "oldest-first",
            QueueOrder::NewestFirst => "newest-first",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct RunAs {
    pub(crate) user: String,
    pub(crate) group: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Limits {
    /// Bytes.
    pub(crate) memory: Option<u64>,
    pub(crate) pids: Option<u64>,
    /// CPUs (e.g. 1.5).
    pub(crate) cpu: Option<f64>,
    pub(crate) nofile: Option<u64>,
    pub(crate) nproc: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct CommentReport {
    /// `gitea` (also Forgejo) or `github`.
    pub(crate) api: String,
    /// API base URL, e.g. `https://git.example.org` or `https://api.github.com`.
    pub(crate) url: String,
    /// Name of the environment variable holding the token.
    pub(crate) token_env: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Report {
    pub(crate) comment: Option<CommentReport>,
    pub(crate) webhook: Option<String>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) retries: Option<u32>,
}

/// Everything the file can say. `None` = not set in the file.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Config {
    pub(crate) path: Option<PathBuf>,
    pub(crate) lock_dir: Option<PathBuf>,
    pub(crate) runs_dir: Option<PathBuf>,
    pub(crate) deadline: Option<Duration>,
    pub(crate) grace: Option<Duration>,
    pub(crate) slots: Option<u32>,
    pub(crate) setup: Option<String>,
    pub(crate) teardown: Option<String>,
    pub(crate) teardown_timeout: Option<Duration>,
    pub(crate) on_busy: Option<OnBusy>,
    pub(crate) queue_order: Option<QueueOrder>,
    /// At most this many runs wait for one app; one more gives up at once (exit 75).
    pub(crate) max_queue: Option<u32>,
    pub(crate) retain_failed: Option<Duration>,
    pub(crate) log_format: Option<LogFormat>,
    /// Tear down when the reader of stdout/stderr goes away (the CI agent died).
    pub(crate) agent_watch: Option<bool>,
    pub(crate) env_allow: Option<Vec<String>>,
    pub(crate) env_set: Vec<(String, String)>,
    pub(crate) run_env: Vec<(String, String)>,
    pub(crate) run_as: Option<RunAs>,
    pub(crate) report: Option<Report>,
    pub(crate) limits: Limits,
    /// The cluster-wide lock's PostgreSQL server (issue 16); `None`: single host.
    pub(crate) cluster: Option<cluster::ClusterConfig>,
}

const TOP_KEYS: &[&str] = &[
    "lock_dir",
    "runs_dir",
    "deadline",
    "grace",
    "slots",
    "setup",
    "teardown",
    "teardown_timeout",
    "on_busy",
    "queue_order",
    "max_queue",
    "retain_failed",
    "log_format",
    "agent_watch",
    "env",
    "run_env",
    "run_as",
    "report",
    "limits",
    "cluster",
];

/// Template variables `run_env` values may use.
pub(crate) const TEMPLATE_VARS: &[&str] = &["run_dir", "run_id", "app", "slot"];

pub(crate) fn default_path() -> PathBuf {
    if places::is_root() {
        PathBuf::from("/etc/tether/config.yml")
    } else {
        std::env::var_os("XDG_CONFIG_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/".into()))
                    .join(".config")
            })
            .join("tether/config.yml")
    }
}

/// Load the config: `explicit` (flag or `TETHER_CONFIG`) must exist; the default path is read
/// only if present.
pub(crate) fn load(explicit: Option<&Path>) -> Result<Config> {
    match explicit {
        Some(p) => load_file(p),
        None => {
            let p = default_path();
            if p.exists() {
                load_file(&p)
            } else {
                Ok(Config::default())
            }
        }
    }
}

pub(crate) fn load_file(path: &Path) -> Result<Config> {
    let name = path.display().to_string();
    let bytes = read_regular(path)
        .map_err(|e| Error::tether(format!("config {name}: cannot read: {e}")))?;
    let text = utf8(&bytes)
        .map_err(|(line, msg)| Error::tether(format!("config {name}:{line}: {msg}")))?;
    let mut cfg = parse(text, &name)?;
    cfg.path = Some(path.to_owned());
    Ok(cfg)
}

/// A config file is small; anything bigger is not one.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Read a regular file, never blocking: a FIFO (or a device) named as the config is refused
/// instead of hanging the run that opened it.
fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // path-ok: read only, the operator's own file as named; O_NONBLOCK and the regular-file
    // check below keep a FIFO or a device from hanging the run.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(std::io::Error::other(format!(
            "{} bytes, more than a config file's {MAX_CONFIG_BYTES}",
            meta.len()
        )));
    }
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The text, or where it stops being UTF-8: the 1-based line and the byte offset.
fn utf8(bytes: &[u8]) -> std::result::Result<&str, (usize, String)> {
    std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        let line = 1 + bytes[..at].iter().filter(|&&b| b == b'\n').count();
        (
            line,
            format!(
                "not UTF-8: byte 0x{:02x} at offset {at} (save the file as UTF-8)",
                bytes[at]
            ),
        )
    })
}

/// Parse config text; `name` is used in messages.
pub(crate) fn parse(text: &str, name: &str) -> Result<Config> {
    let err = |line: usize, msg: String| Error::tether(format!("config {name}:{line}: {msg}"));
    let root =
        yaml::parse(text).map_err(|(line, msg)| err(line, format!("invalid YAML: {msg}")))?;
    let mut cfg = Config::default();
    let Some(root) = root else {
        return Ok(cfg);
    };
    let entries = match root.value {
        Value::Map(e) => e,
        _ => {
            return Err(err(
                root.line,
                format!("expected a mapping of keys, got {}", root.kind()),
            ))
        }
    };
    let mut seen: Vec<&str> = Vec::new();
    for (key, line, node) in &entries {
        let Some(known) = TOP_KEYS.iter().find(|k| **k == key) else {
            return Err(err(*line, unknown_key(key, TOP_KEYS)));
        };
        if seen.contains(known) {
            return Err(err(*line, format!("key \"{key}\" is given twice")));
        }
        seen.push(known);
        let ctx = Ctx { name, key };
        match key.as_str() {
            "lock_dir" => cfg.lock_dir = ctx.opt_str(node)?.map(PathBuf::from),
            "runs_dir" => cfg.runs_dir = ctx.opt_str(node)?.map(PathBuf::from),
            "deadline" => cfg.deadline = ctx.opt_duration(node)?,
            "grace" => cfg.grace = ctx.opt_duration(node)?,
            "teardown_timeout" => cfg.teardown_timeout = ctx.opt_duration(node)?,
            "retain_failed" => cfg.retain_failed = ctx.opt_duration(node)?,
            "slots" => {
                cfg.slots = ctx.opt_u32(node)?;
                if cfg.slots == Some(0) {
                    return Err(ctx.err(node.line, "must be at least 1".into()));
                }
            }
            "setup" => cfg.setup = ctx.opt_str(node)?,
            "teardown" => cfg.teardown = ctx.opt_str(node)?,
            "on_busy" => {
                cfg.on_busy = match ctx.opt_str(node)?.as_deref() {
                    None => None,
                    Some("wait") => Some(OnBusy::Wait),
                    Some("fail") => Some(OnBusy::Fail),
                    Some("cancel-older") => Some(OnBusy::CancelOlder),
                    Some(other) => {
                        return Err(ctx.err(
                            node.line,
                            format!("expected wait, fail or cancel-older, got {other:?}"),
                        ))
                    }
                }
            }
            "queue_order" => {
                cfg.queue_order = match ctx.opt_str(node)?.as_deref() {
                    None => None,
                    Some("oldest-first") => Some(QueueOrder::OldestFirst),
                    Some("newest-first") => Some(QueueOrder::NewestFirst),
                    Some(other) => {
                        return Err(ctx.err(
                            node.line,
                            format!("expected oldest-first or newest-first, got {other:?}"),
                        ))
                    }
                }
            }
            "max_queue" => cfg.max_queue = ctx.opt_u32(node)?,
            "log_format" => {
                cfg.log_format = match ctx.opt_str(node)?.as_deref() {
                    None => None,
                    Some("text") => Some(LogFormat::Text),
                    Some("json") => Some(LogFormat::Json),
                    Some(other) => {
                        return Err(
                            ctx.err(node.line, format!("expected text or json, got {other:?}"))
                        )
                    }
                }
            }
            "agent_watch" => cfg.agent_watch = ctx.opt_bool(node)?,
            "env" => {
                for (k, kl, v) in ctx.map(node)? {
                    let sub = Ctx { name, key: k };
                    match k.as_str() {
                        "allow" => cfg.env_allow = Some(sub.str_list(v)?),
                        "set" => cfg.env_set = sub.str_map(v)?,
                        _ => return Err(err(*kl, unknown_key(k, &["allow", "set"]))),
                    }
                }
            }
            "run_env" => {
                cfg.run_env = ctx.str_map(node)?;
                for (k, v) in &cfg.run_env {
                    if let Err(var) = env::check_template(v) {
                        let line = ctx
                            .map(node)?
                            .iter()
                            .find(|(kk, _, _)| kk == k)
                            .map(|(_, l, _)| *l)
                            .unwrap_or(node.line);
                        return Err(err(
                            line,
                            format!(
                                "run_env \"{k}\": unknown template variable {{{var}}} (known: {})",
                                TEMPLATE_VARS
                                    .iter()
                                    .map(|v| format!("{{{v}}}"))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        ));
                    }
                }
            }
            "run_as" => {
                let mut ra = RunAs::default();
                for (k, kl, v) in ctx.map(node)? {
                    let sub = Ctx { name, key: k };
                    match k.as_str() {
                        "user" => ra.user = sub.opt_str(v)?.unwrap_or_default(),
                        "group" => ra.group = sub.opt_str(v)?,
                        _ => return Err(err(*kl, unknown_key(k, &["user", "group"]))),
                    }
                }
                if ra.user.is_empty() {
                    return Err(ctx.err(node.line, "run_as needs a \"user\"".into()));
                }
                cfg.run_as = Some(ra);
            }
            "report" => cfg.report = Some(parse_report(&ctx, node)?),
            "cluster" => cfg.cluster = Some(cluster::parse_block(&ctx, node)?),
            "limits" => {
                for (k, kl, v) in ctx.map(node)? {
                    let sub = Ctx { name, key: k };
                    match k.as_str() {
                        "memory" => cfg.limits.memory = sub.opt_bytes(v)?,
                        "pids" => cfg.limits.pids = sub.opt_uint(v)?,
                        "cpu" => cfg.limits.cpu = sub.opt_float(v)?,
                        "nofile" => cfg.limits.nofile = sub.opt_uint(v)?,
                        "nproc" => cfg.limits.nproc = sub.opt_uint(v)?,
                        _ => {
                            return Err(err(
                                *kl,
                                unknown_key(k, &["memory", "pids", "cpu", "nofile", "nproc"]),
                            ))
                        }
                    }
                }
            }
            _ => unreachable!("key list and match agree"),
        }
    }
    Ok(cfg)
}

fn parse_report(ctx: &Ctx<'_>, node: &Node) -> Result<Report> {
    let mut r = Report::default();
    for (k, kl, v) in ctx.map(node)? {
        let sub = Ctx {
            name: ctx.name,
            key: k,
        };
        match k.as_str() {
            "webhook" => r.webhook = sub.opt_str(v)?,
            "timeout" => r.timeout = sub.opt_duration(v)?,
            "retries" => r.retries = sub.opt_u32(v)?,
            "comment" => {
                let mut c = CommentReport::default();
                for (ck, ckl, cv) in sub.map(v)? {
                    let csub = Ctx {
                        name: ctx.name,
                        key: ck,
                    };
                    match ck.as_str() {
                        "api" => c.api = csub.opt_str(cv)?.unwrap_or_default(),
                        "url" => c.url = csub.opt_str(cv)?.unwrap_or_default(),
                        "token_env" => c.token_env = csub.opt_str(cv)?.unwrap_or_default(),
                        _ => {
                            return Err(sub.err(*ckl, unknown_key(ck, &["api", "url", "token_env"])))
                        }
                    }
                }
                if !matches!(c.api.as_str(), "gitea" | "forgejo" | "github") {
                    return Err(sub.err(
                        v.line,
                        format!(
                            "comment.api must be gitea, forgejo or github, got {:?}",
                            c.api
                        ),
                    ));
                }
                if c.url.is_empty() || c.token_env.is_empty() {
                    return Err(sub.err(v.line, "comment needs \"url\" and \"token_env\"".into()));
                }
                r.comment = Some(c);
            }
            _ => {
                return Err(ctx.err(
                    *kl,
                    unknown_key(k, &["comment", "webhook", "timeout", "retries"]),
                ))
            }
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_config_parses() {
        let text = r#"
lock_dir: /run/lock/tether
deadline: 45m
grace: 20s
slots: 4
teardown: ./undeploy.sh
on_busy: cancel-older
env:
  allow: ["PATH", "CI_*"]
  set: {LANG: C.UTF-8}
run_env:
  ABRA_DIR: "{run_dir}/abra"
run_as: {user: ci, group: ci}
limits: {memory: 2G, pids: 512, cpu: 1.5, nofile: 4096}
report:
  timeout: 10s
  comment: {api: gitea, url: "https://git.example.org", token_env: GITEA_TOKEN}
"#;
        let c = parse(text, "t.yml").expect("valid");
        assert_eq!(c.deadline, Some(Duration::from_secs(2700)));
        assert_eq!(c.slots, Some(4));
        assert_eq!(c.on_busy, Some(OnBusy::CancelOlder));
        assert_eq!(c.env_allow, Some(vec!["PATH".into(), "CI_*".into()]));
        assert_eq!(
            c.run_env,
            vec![("ABRA_DIR".into(), "{run_dir}/abra".into())]
        );
        assert_eq!(c.limits.memory, Some(2 << 30));
        assert_eq!(c.run_as.map(|r| r.user), Some("ci".into()));
        assert_eq!(c.agent_watch, None);
    }

    #[test]
    fn agent_watch_is_a_switch() {
        for (text, want) in [
            ("agent_watch: false\n", Some(false)),
            ("agent_watch: true\n", Some(true)),
            ("agent_watch: False\n", Some(false)),
            ("agent_watch:\n", None),
        ] {
            assert_eq!(
                parse(text, "t.yml").expect(text).agent_watch,
                want,
                "{text}"
            );
        }
        assert!(msg("agent_watch: \"false\"\n")
            .contains(":1: key \"agent_watch\": expected true or false, got \"false\""));
        assert!(msg("agent_watch: no\n").contains("expected true or false, got \"no\""));
        assert!(msg("agent_wacth: false\n").contains("(did you mean \"agent_watch\"?)"));
    }

    fn msg(text: &str) -> String {
        parse(text, "/etc/tether/config.yml")
            .expect_err(text)
            .message
    }

    #[test]
    fn errors_name_file_line_and_key() {
        assert_eq!(
            msg("deadline: 10m\nteardwon: x\n"),
            "config /etc/tether/config.yml:2: unknown key \"teardwon\" (did you mean \"teardown\"?)"
        );
        assert!(msg("deadline: 10x\n")
            .starts_with("config /etc/tether/config.yml:1: key \"deadline\": invalid duration"));
        assert!(msg("slots: many\n").contains(":1: key \"slots\": expected a whole number"));
        assert!(msg("slots: 4294967297\n").contains(":1: key \"slots\": 4294967297 is too large"));
        assert!(msg("run_env:\n  A: \"{run_dir}/{nope}\"\n")
            .contains(":2: run_env \"A\": unknown template variable {nope}"));
        assert!(msg("env:\n  allow: PATH\n").contains("key \"allow\": expected a list"));
        assert!(msg("- a\n- b\n").contains("expected a mapping"));
        assert!(msg("grace: [1]\n").contains("key \"grace\": expected a value, got a list"));
        assert!(msg("x: {a: [}\n").contains("invalid YAML"));
        assert!(msg("zzz: 1\n").contains("unknown key \"zzz\" (known: lock_dir"));
    }

    #[test]
    fn globs_and_templates() {
        use env::{check_template, expand, glob_match};
        assert!(glob_match("CI_*", "CI_REPO"));
        assert!(glob_match("*", "X"));
        assert!(!glob_match("CI_*", "GITHUB_TOKEN"));
        assert!(glob_match("A?C", "ABC"));
        assert_eq!(
            expand("{run_dir}/abra-{slot}", "/r/1", "1", "a", "00"),
            "/r/1/abra-00"
        );
        assert_eq!(check_template("{run_dir}/x"), Ok(()));
        assert_eq!(check_template("{bogus}"), Err("bogus".into()));
    }
}
