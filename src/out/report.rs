//! Reporting back (CLI-CONTRACT §14): the summary as a PR comment (Gitea/Forgejo or GitHub API) and/or
//! a JSON POST to a webhook.
//!
//! Reporting can never change the exit code or hold up a teardown: it runs after teardown,
//! under one overall time budget (default 10 s) with at most 3 retries, backing off, on 5xx
//! answers and connection errors; a failure is one warning line. The HTTP client is `ureq`
//! (blocking, no runtime, no threads — see DECISIONS.md).

use crate::config::duration::human;
use crate::config::settings::{REPORT_RETRIES, REPORT_TIMEOUT};
use crate::config::{CommentReport, Report};
use crate::ident::ci_env::CiInfo;
use crate::out::summary::Summary;
use crate::output;
use std::time::{Duration, Instant};

const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// The PR comment body: a short markdown table of the summary with the build link.
pub(crate) fn comment_body(s: &Summary) -> String {
    let ms = |v: u64| human(Duration::from_millis(v));
    let mut body = format!(
        "### tether: run `{}` — **{}**\n\n\
         | app | result | exit | lock wait | runtime | teardown |\n\
         |---|---|---|---|---|---|\n\
         | `{}` | {} | {} | {} | {} | {} |\n",
        s.run_id,
        s.result,
        s.app,
        s.result,
        s.exit,
        ms(s.lock_wait_ms),
        ms(s.runtime_ms),
        s.teardown
    );
    if let Some(link) = s.ci.as_ref().and_then(|c| c.link.as_deref()) {
        body.push_str(&format!("\n[build log]({link})\n"));
    }
    body
}

/// Where the comment goes: `(url, authorization header)`, or why it cannot be sent.
pub(crate) fn comment_target(
    c: &CommentReport,
    ci: Option<&CiInfo>,
    token: Option<String>,
) -> Result<(String, String), String> {
    let ci = ci.ok_or("not running in a recognised CI: no repo or PR to comment on")?;
    let repo = ci
        .repo
        .as_deref()
        .ok_or("the CI environment names no repo")?;
    let pr = ci.pr.as_deref().ok_or("not a pull request build")?;
    let token = token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| format!("the token variable {} is not set", c.token_env))?;
    let base = c.url.trim_end_matches('/');
    Ok(match c.api.as_str() {
        "github" => (
            format!("{base}/repos/{repo}/issues/{pr}/comments"),
            format!("Bearer {token}"),
        ),
        _ => (
            format!("{base}/api/v1/repos/{repo}/issues/{pr}/comments"),
            format!("token {token}"),
        ),
    })
}

/// Send everything configured. Never fails; logs one warning per failed target.
pub(crate) fn publish(cfg: &Report, summary: &Summary) {
    let budget = cfg.timeout.unwrap_or(REPORT_TIMEOUT);
    let retries = cfg.retries.unwrap_or(REPORT_RETRIES);
    let end = Instant::now() + budget;
    if let Some(c) = &cfg.comment {
        let token = std::env::var(&c.token_env).ok();
        match comment_target(c, summary.ci.as_ref(), token) {
            Ok((url, auth)) => {
                let body = serde_json::json!({ "body": comment_body(summary) });
                if let Err(e) = post(&url, Some(&auth), &body, end, retries) {
                    output::warn("report", &format!("PR comment not posted: {e}"));
                }
            }
            Err(why) => output::debug("report", &format!("PR comment skipped: {why}")),
        }
    }
    if let Some(url) = &cfg.webhook {
        let body = serde_json::to_value(summary).unwrap_or_default();
        if let Err(e) = post(url, None, &body, end, retries) {
            output::warn("report", &format!("webhook {url} not notified: {e}"));
        }
    }
}

fn post(
    url: &str,
    auth: Option<&str>,
    body: &serde_json::Value,
    end: Instant,
    retries: u32,
) -> Result<(), String> {
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 0;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("timed out".into());
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(left))
            .http_status_as_error(false)
            .user_agent(concat!("tether/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        let mut req = agent
            .post(url)
            .header("Accept", "application/json")
            .header("Content-Type", "application/json");
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let outcome = match req.send_json(body) {
            Ok(resp) if resp.status().is_success() => return Ok(()),
            Ok(resp) if resp.status().is_server_error() => {
                Err(format!("server answered {}", resp.status()))
            }
            Ok(resp) => return Err(format!("server answered {}", resp.status())),
            Err(e) => Err(e.to_string()),
        };
        attempt += 1;
        if attempt > retries || Instant::now() + backoff >= end {
            return outcome.map_err(|e| format!("{e} (after {attempt} attempt(s))"));
        }
        std::thread::sleep(backoff); // backoff between retries, bounded by the budget
        backoff *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> Summary {
        Summary {
            run_id: "drone-org-app-1a2b3c4d-267-1.3".into(),
            app: "immi-ad3e33.ci.example.org".into(),
            result: "passed".into(),
            exit: 0,
            lock_wait_ms: 1_200,
            slot_wait_ms: None,
            runtime_ms: 187_000,
            teardown: "ok".into(),
            reason: "exited".into(),
            ci: Some(CiInfo {
                system: "drone".into(),
                repo: Some("org/app".into()),
                build: Some("267".into()),
                job: Some("1.3".into()),
                pr: Some("2".into()),
                branch: Some("main".into()),
                commit: Some("abc123".into()),
                link: Some("https://drone.example.org/org/app/267".into()),
            }),
        }
    }

    #[test]
    fn comment_body_snapshot() {
        insta::assert_snapshot!(comment_body(&summary()));
    }

    #[test]
    fn summary_json_snapshot() {
        insta::assert_json_snapshot!(summary());
    }

    #[test]
    fn targets_follow_each_api() {
        let s = summary();
        let gitea = CommentReport {
            api: "gitea".into(),
            url: "https://git.example.org/".into(),
            token_env: "T".into(),
        };
        assert_eq!(
            comment_target(&gitea, s.ci.as_ref(), Some("sekrit".into())),
            Ok((
                "https://git.example.org/api/v1/repos/org/app/issues/2/comments".into(),
                "token sekrit".into()
            ))
        );
        let gh = CommentReport {
            api: "github".into(),
            url: "https://api.github.com".into(),
            token_env: "T".into(),
        };
        assert_eq!(
            comment_target(&gh, s.ci.as_ref(), Some("x".into())).map(|t| t.0),
            Ok("https://api.github.com/repos/org/app/issues/2/comments".into())
        );
        assert!(comment_target(&gh, s.ci.as_ref(), None).is_err());
        assert!(comment_target(&gh, None, Some("x".into())).is_err());
    }
}
