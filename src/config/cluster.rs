//! The cluster (issue 16): where the PostgreSQL server that holds the cluster-wide app locks
//! is, as the operator gave it. Pure: a `postgres://` URL parsed strictly (host, port, user,
//! dbname, `sslmode`), and where the password comes from (an environment variable named in the
//! config, or a file), never from the command line: a URL with a password is refused.
//!
//! ```yaml
//! cluster:
//!   url: postgres://tether@db.example.org:5432/ci?sslmode=verify-full
//!   password_env: TETHER_PG_PASSWORD      # or password_file: /etc/tether/pg-password
//!   ca_file: /etc/tether/pg-ca.pem        # verify-full: trust this CA (default: public CAs)
//!   connect_timeout: 5s
//!   heartbeat: 1s          # how often a holder renews its session (PROTOCOL §16)
//!   self_fence: 5s         # a holder kills its command this long after its last answered beat
//!   server_release: 15s    # the server drops a silent holder's session (and lock) by then
//! ```

use super::read::{unknown_key, Ctx};
use super::yaml::Node;
use crate::error::Result;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// How the connection is protected (the libpq names; only these three).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SslMode {
    /// Plain TCP (a trusted network, or a unix socket).
    Disable,
    /// TLS, the server's certificate not checked (libpq's `require`).
    Require,
    /// TLS, the certificate chain and the host name checked.
    VerifyFull,
}

impl SslMode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Require => "require",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// A parsed `postgres://user@host:port/dbname?sslmode=…` URL (no password, ever).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClusterUrl {
    pub(crate) user: String,
    /// A name or an address (IPv6 without its brackets).
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) dbname: String,
    pub(crate) sslmode: SslMode,
}

impl fmt::Display for ClusterUrl {
    /// The URL as tether names the server in messages (no password: it never has one).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        write!(
            f,
            "postgres://{}@{host}:{}/{}?sslmode={}",
            self.user,
            self.port,
            self.dbname,
            self.sslmode.name()
        )
    }
}

/// The `cluster:` block of the config file.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ClusterConfig {
    /// The URL as written (parsed when the block is read, so a bad one fails `config check`).
    pub(crate) url: Option<ClusterUrl>,
    pub(crate) password_env: Option<String>,
    pub(crate) password_file: Option<PathBuf>,
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) connect_timeout: Option<Duration>,
    pub(crate) heartbeat: Option<Duration>,
    pub(crate) self_fence: Option<Duration>,
    pub(crate) server_release: Option<Duration>,
}

const KEYS: &[&str] = &[
    "url",
    "password_env",
    "password_file",
    "ca_file",
    "connect_timeout",
    "heartbeat",
    "self_fence",
    "server_release",
];

/// The timing of self-fencing (PROTOCOL §16, DECISIONS D58): how often a holder renews its
/// session, when it gives up on it, and by when the server drops a silent one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FenceTiming {
    pub(crate) heartbeat: Duration,
    pub(crate) self_fence: Duration,
    pub(crate) server_release: Duration,
}

/// The defaults of issue 16 §4: self-fence ≤ 5 s, server release ≤ 15 s.
pub(crate) const DEFAULT_TIMING: FenceTiming = FenceTiming {
    heartbeat: Duration::from_secs(1),
    self_fence: Duration::from_secs(5),
    server_release: Duration::from_secs(15),
};

/// What `server_release` must exceed `self_fence + heartbeat` by: the server's keepalive grid
/// (it may drop a silent session up to one keepalive interval, 1 s, before `server_release`)
/// plus 1 s for the core to notice the loss and SIGKILL the tree on a loaded host (D58).
pub(crate) const RELEASE_MARGIN: Duration = Duration::from_secs(2);

/// The server's keepalive interval (and idle time) on a lock session, in whole seconds (the
/// settings' unit): the grid on which the server's kernel decides (PROTOCOL §16).
pub(crate) const SERVER_KEEPALIVE_S: u64 = 1;

/// How often the server checks a lock session's socket while a statement runs (a waiter's
/// `pg_advisory_lock`): a vanished waiter leaves the queue within this of its socket dying.
pub(crate) const CHECK_INTERVAL_MS: u64 = 1000;

/// The server-side settings of a lock session (`SET` per session, PROTOCOL §16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServerTimeouts {
    pub(crate) keepalives_idle_s: u64,
    pub(crate) keepalives_interval_s: u64,
    pub(crate) keepalives_count: u64,
    pub(crate) user_timeout_ms: u64,
    pub(crate) check_interval_ms: u64,
}

impl FenceTiming {
    /// The settings that make the server drop a silent session no earlier than
    /// `server_release − 1 s` and no later than `server_release` after the last byte it received
    /// (Linux: with `TCP_USER_TIMEOUT` set, the keepalive timer — probing every interval from
    /// the idle time on — aborts at its first firing with the time since the last receipt at
    /// or past the user timeout and one probe out; unacknowledged data is aborted once it is
    /// older than the user timeout). The count is for a server that ignores
    /// `tcp_user_timeout`: idle + count × interval stays within the same window.
    pub(crate) fn server(&self) -> ServerTimeouts {
        let release_ms = self.server_release.as_millis() as u64;
        let grid_ms = SERVER_KEEPALIVE_S * 1000;
        ServerTimeouts {
            keepalives_idle_s: SERVER_KEEPALIVE_S,
            keepalives_interval_s: SERVER_KEEPALIVE_S,
            keepalives_count: (release_ms / grid_ms)
                .saturating_sub(SERVER_KEEPALIVE_S)
                .max(1),
            user_timeout_ms: release_ms.saturating_sub(grid_ms),
            check_interval_ms: CHECK_INTERVAL_MS,
        }
    }

    /// The knobs must keep the promise: a holder kills its command before the server can
    /// release its lock. The message names the keys.
    pub(crate) fn validate(&self) -> std::result::Result<(), String> {
        let FenceTiming {
            heartbeat,
            self_fence,
            server_release,
        } = *self;
        let show = super::duration::canonical;
        if heartbeat.is_zero() {
            return Err("heartbeat must be more than 0s".into());
        }
        if self_fence < heartbeat * 2 {
            return Err(format!(
                "self_fence ({}) must be at least twice heartbeat ({}): one late beat must not \
                 fence a healthy run",
                show(self_fence),
                show(heartbeat)
            ));
        }
        let floor = self_fence + heartbeat + RELEASE_MARGIN;
        if server_release < floor {
            return Err(format!(
                "server_release ({}) must be at least self_fence + heartbeat + {} ({}): the \
                 server may drop a silent session 1s before server_release, and the holder's \
                 command must be dead by then",
                show(server_release),
                show(RELEASE_MARGIN),
                show(floor)
            ));
        }
        Ok(())
    }
}

impl ClusterConfig {
    /// The timing with the defaults filled in.
    pub(crate) fn timing(&self) -> FenceTiming {
        FenceTiming {
            heartbeat: self.heartbeat.unwrap_or(DEFAULT_TIMING.heartbeat),
            self_fence: self.self_fence.unwrap_or(DEFAULT_TIMING.self_fence),
            server_release: self.server_release.unwrap_or(DEFAULT_TIMING.server_release),
        }
    }
}

/// The default port of PostgreSQL.
const DEFAULT_PORT: u16 = 5432;

/// Read the `cluster:` block.
pub(super) fn parse_block(ctx: &Ctx<'_>, node: &Node) -> Result<ClusterConfig> {
    let mut c = ClusterConfig::default();
    for (k, kl, v) in ctx.map(node)? {
        let sub = Ctx {
            name: ctx.name,
            key: k,
        };
        match k.as_str() {
            "url" => {
                c.url = match sub.opt_str(v)? {
                    None => None,
                    Some(text) => Some(parse_url(&text).map_err(|m| sub.err(v.line, m))?),
                }
            }
            "password_env" => c.password_env = sub.opt_str(v)?,
            "password_file" => c.password_file = sub.opt_str(v)?.map(PathBuf::from),
            "ca_file" => c.ca_file = sub.opt_str(v)?.map(PathBuf::from),
            "connect_timeout" => c.connect_timeout = sub.opt_duration(v)?,
            "heartbeat" => c.heartbeat = sub.opt_duration(v)?,
            "self_fence" => c.self_fence = sub.opt_duration(v)?,
            "server_release" => c.server_release = sub.opt_duration(v)?,
            _ => return Err(ctx.err(*kl, unknown_key(k, KEYS))),
        }
    }
    if c.password_env.is_some() && c.password_file.is_some() {
        return Err(ctx.err(
            node.line,
            "give password_env or password_file, not both".into(),
        ));
    }
    if c.connect_timeout == Some(Duration::ZERO) {
        return Err(ctx.err(node.line, "connect_timeout must be more than 0s".into()));
    }
    c.timing().validate().map_err(|m| ctx.err(node.line, m))?;
    Ok(c)
}

/// Parse a cluster URL. The message names what is wrong and never repeats a password.
pub(crate) fn parse_url(text: &str) -> std::result::Result<ClusterUrl, String> {
    let rest = text
        .strip_prefix("postgres://")
        .or_else(|| text.strip_prefix("postgresql://"))
        .ok_or_else(|| {
            format!(
                "cluster URL {:?}: expected postgres://user@host[:port]/dbname[?sslmode=…]",
                redact(text)
            )
        })?;
    let bad = |what: &str| format!("cluster URL {:?}: {what}", redact(text));
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = before_query.split_once('/').unwrap_or((before_query, ""));
    let Some((userinfo, hostport)) = authority.rsplit_once('@') else {
        return Err(bad("names no user (postgres://USER@host/dbname)"));
    };
    if userinfo.contains(':') {
        return Err(bad(
            "has a password in it: never put a password in the URL (it would show in \
             process lists and logs); use password_env or password_file in the config's \
             cluster block",
        ));
    }
    let user = decode(userinfo).ok_or_else(|| bad("bad %-escape in the user"))?;
    if user.is_empty() {
        return Err(bad("names no user (postgres://USER@host/dbname)"));
    }
    let (host, port) = split_host_port(hostport).ok_or_else(|| bad("bad host or port"))?;
    let dbname = decode(path).ok_or_else(|| bad("bad %-escape in the database name"))?;
    if dbname.is_empty() || dbname.contains('/') {
        return Err(bad("names no database (postgres://user@host/DBNAME)"));
    }
    let mut sslmode = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "sslmode" => {
                sslmode = Some(match v {
                    "disable" => SslMode::Disable,
                    "require" => SslMode::Require,
                    "verify-full" => SslMode::VerifyFull,
                    other => {
                        return Err(bad(&format!(
                            "sslmode {other:?}: expected disable, require or verify-full"
                        )))
                    }
                })
            }
            "password" => {
                return Err(bad(
                    "has a password in it: use password_env or password_file",
                ))
            }
            other => {
                return Err(bad(&format!(
                    "unknown parameter {other:?} (known: sslmode)"
                )))
            }
        }
    }
    Ok(ClusterUrl {
        user,
        host,
        port,
        dbname,
        // Absent: the safe one (D44).
        sslmode: sslmode.unwrap_or(SslMode::VerifyFull),
    })
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`.
fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        match after {
            "" => (h, None),
            _ => (h, Some(after.strip_prefix(':')?)),
        }
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':');
    if host.is_empty() || !host.chars().all(valid) {
        return None;
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0)?,
    };
    Some((host.to_owned(), port))
}

/// Percent-decoding (UTF-8); `None` on a bad escape.
fn decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The URL with anything between `://` and `@` that has a `:` in it masked, for messages.
fn redact(text: &str) -> String {
    let Some((scheme, rest)) = text.split_once("://") else {
        return text.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, after)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{after}")
        }
        _ => text.to_owned(),
    }
}

/// Where to connect and how: the URL from the flag (or `TETHER_CLUSTER_URL`), else the
/// file's; the password source, CA and timeout from the file.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ClusterTarget {
    pub(crate) url: ClusterUrl,
    pub(crate) password_env: Option<String>,
    pub(crate) password_file: Option<PathBuf>,
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) connect_timeout: Option<Duration>,
    pub(crate) timing: FenceTiming,
}

/// The cluster to use, or `None`: no cluster configured, today's single-host behaviour.
pub(crate) fn target(
    flag: Option<ClusterUrl>,
    file: Option<&ClusterConfig>,
) -> Option<ClusterTarget> {
    let url = flag.or_else(|| file.and_then(|c| c.url.clone()))?;
    let file = file.cloned().unwrap_or_default();
    let timing = file.timing();
    Some(ClusterTarget {
        url,
        password_env: file.password_env,
        password_file: file.password_file,
        ca_file: file.ca_file,
        connect_timeout: file.connect_timeout,
        timing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_strictly() {
        let u = parse_url("postgres://tether@db.example.org:6543/ci?sslmode=disable").expect("ok");
        assert_eq!(u.user, "tether");
        assert_eq!(u.host, "db.example.org");
        assert_eq!(u.port, 6543);
        assert_eq!(u.dbname, "ci");
        assert_eq!(u.sslmode, SslMode::Disable);
        let u = parse_url("postgresql://ci%40x@[::1]/my%20db").expect("ok");
        assert_eq!((u.user.as_str(), u.host.as_str()), ("ci@x", "::1"));
        assert_eq!((u.port, u.dbname.as_str()), (5432, "my db"));
        assert_eq!(
            u.sslmode,
            SslMode::VerifyFull,
            "absent sslmode is verify-full"
        );
        assert_eq!(
            u.to_string(),
            "postgres://ci@x@[::1]:5432/my db?sslmode=verify-full"
        );
        let u = parse_url("postgres://t@h/d?sslmode=require").expect("ok");
        assert_eq!(u.sslmode, SslMode::Require);
    }

    #[test]
    fn passwords_are_refused_and_never_echoed() {
        for url in [
            "postgres://tether:s3cret@db/ci",
            "postgres://tether:s3cret@db:5432/ci?sslmode=disable",
        ] {
            let m = parse_url(url).expect_err(url);
            assert!(m.contains("has a password in it"), "{m}");
            assert!(m.contains("password_env or password_file"), "{m}");
            assert!(!m.contains("s3cret"), "the password leaked: {m}");
        }
        let m = parse_url("postgres://t@db/ci?password=s3cret").expect_err("query password");
        assert!(m.contains("has a password in it"), "{m}");
    }

    #[test]
    fn bad_urls_name_the_culprit() {
        let cases = [
            ("mysql://t@h/d", "expected postgres://"),
            ("postgres://h/d", "names no user"),
            ("postgres://@h/d", "names no user"),
            ("postgres://t@h", "names no database"),
            ("postgres://t@h/", "names no database"),
            ("postgres://t@h:0/d", "bad host or port"),
            ("postgres://t@h:99999/d", "bad host or port"),
            ("postgres://t@:5432/d", "bad host or port"),
            (
                "postgres://t@h/d?sslmode=prefer",
                "sslmode \"prefer\": expected disable",
            ),
            (
                "postgres://t@h/d?connect_timeout=3",
                "unknown parameter \"connect_timeout\"",
            ),
            ("postgres://t%zz@h/d", "bad %-escape in the user"),
        ];
        for (url, want) in cases {
            let m = parse_url(url).expect_err(url);
            assert!(m.contains(want), "{url}: {m}");
        }
    }

    fn block(text: &str) -> std::result::Result<Option<ClusterConfig>, String> {
        super::super::parse(text, "c.yml")
            .map(|c| c.cluster)
            .map_err(|e| e.message)
    }

    #[test]
    fn the_cluster_block_is_read_strictly() {
        let c = block(
            "cluster:\n  url: postgres://tether@db:5433/ci?sslmode=require\n  \
             password_env: PGPW\n  ca_file: /etc/ca.pem\n  connect_timeout: 3s\n",
        )
        .expect("valid")
        .expect("a cluster");
        assert_eq!(c.url.as_ref().map(|u| u.port), Some(5433));
        assert_eq!(c.password_env.as_deref(), Some("PGPW"));
        assert_eq!(c.ca_file, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(c.connect_timeout, Some(Duration::from_secs(3)));
        assert_eq!(
            block("deadline: 1m\n").expect("valid"),
            None,
            "no block, no cluster"
        );
        let cases = [
            (
                "cluster:\n  urll: x\n",
                ":2: key \"cluster\": unknown key \"urll\" (did you mean \"url\"?)",
            ),
            (
                "cluster:\n  url: http://x\n",
                ":2: key \"url\": cluster URL \"http://x\"",
            ),
            (
                "cluster:\n  password_env: A\n  password_file: /p\n",
                ":2: key \"cluster\": give password_env or password_file, not both",
            ),
            (
                "cluster:\n  connect_timeout: 0s\n",
                "connect_timeout must be more than 0s",
            ),
            (
                "cluster: postgres://t@h/d\n",
                "key \"cluster\": expected a mapping",
            ),
        ];
        for (text, want) in cases {
            let m = block(text).expect_err(text);
            assert!(m.contains(want), "{text}: {m}");
        }
    }

    #[test]
    fn the_flag_wins_over_the_file() {
        let file = ClusterConfig {
            url: Some(parse_url("postgres://a@file/db").expect("ok")),
            password_env: Some("PW".into()),
            ..Default::default()
        };
        let flag = parse_url("postgres://b@flag/db").expect("ok");
        let t = target(Some(flag), Some(&file)).expect("a target");
        assert_eq!(t.url.host, "flag");
        assert_eq!(
            t.password_env.as_deref(),
            Some("PW"),
            "the password source stays the file's"
        );
        assert_eq!(
            target(None, Some(&file)).map(|t| t.url.host),
            Some("file".into())
        );
        assert_eq!(target(None, None), None, "no cluster configured");
    }

    #[test]
    fn the_fence_timing_is_read_defaulted_and_validated_naming_the_keys() {
        let c = block("cluster:\n  heartbeat: 200ms\n  self_fence: 1s\n  server_release: 4s\n")
            .expect("valid")
            .expect("a block");
        let t = c.timing();
        assert_eq!(t.heartbeat, Duration::from_millis(200));
        assert_eq!(t.self_fence, Duration::from_secs(1));
        assert_eq!(t.server_release, Duration::from_secs(4));
        assert_eq!(ClusterConfig::default().timing(), DEFAULT_TIMING);
        assert_eq!(
            DEFAULT_TIMING.validate(),
            Ok(()),
            "the defaults keep the promise"
        );
        let cases = [
            ("heartbeat: 0s", "heartbeat must be more than 0s"),
            (
                "heartbeat: 3s",
                "self_fence (5s) must be at least twice heartbeat (3s)",
            ),
            (
                "self_fence: 14s",
                "server_release (15s) must be at least self_fence + heartbeat + 2s (17s)",
            ),
            (
                "server_release: 7999ms",
                "server_release (7999ms) must be at least self_fence + heartbeat + 2s (8s)",
            ),
        ];
        for (line, want) in cases {
            let text = format!("cluster:\n  {line}\n");
            let m = block(&text).expect_err(&text);
            assert!(m.contains(want), "{text}: {m}");
        }
        assert!(
            block("cluster:\n  server_release: 8s\n").is_ok(),
            "the floor itself is fine"
        );
    }

    #[test]
    fn the_server_drops_a_silent_session_within_the_last_second_before_server_release() {
        let s = DEFAULT_TIMING.server();
        assert_eq!(
            s,
            ServerTimeouts {
                keepalives_idle_s: 1,
                keepalives_interval_s: 1,
                keepalives_count: 14,
                user_timeout_ms: 14_000,
                check_interval_ms: 1000,
            }
        );
        for release_ms in [3000u64, 3500, 8000, 15_000, 60_000] {
            let t = FenceTiming {
                server_release: Duration::from_millis(release_ms),
                ..DEFAULT_TIMING
            };
            let s = t.server();
            // Linux aborts at the first keepalive firing (idle, idle + interval, …) with one
            // probe out and the silence at or past the user timeout.
            let grid = s.keepalives_interval_s * 1000;
            let mut drop_at = s.keepalives_idle_s * 1000 + grid;
            while drop_at < s.user_timeout_ms {
                drop_at += grid;
            }
            assert!(drop_at <= release_ms, "{release_ms}: dropped at {drop_at}");
            assert!(
                drop_at + 1000 >= release_ms,
                "{release_ms}: dropped at {drop_at}"
            );
            // Without tcp_user_timeout: idle + count probes.
            let plain = s.keepalives_idle_s * 1000 + s.keepalives_count * grid;
            assert!(
                plain <= release_ms && plain + 1000 >= release_ms,
                "{release_ms}: {plain}"
            );
        }
    }
}
