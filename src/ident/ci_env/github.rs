//! GitHub Actions and the forges whose Actions speak its dialect: Forgejo and Gitea set the same
//! `GITHUB_*` variables (plus their own marker), so one reader serves all three. They differ in
//! the system's name and in the link: GitHub addresses a run by its run id, Forgejo and Gitea by
//! its number within the repository (`GITHUB_RUN_NUMBER`), on their own server
//! (`GITHUB_SERVER_URL`), never github.com.

use crate::ident::ci_env::info::{pr_number, CiInfo, Vars};

/// Which Actions implementation set the `GITHUB_*` variables.
#[derive(Clone, Copy)]
enum Forge {
    GitHub,
    Forgejo,
    Gitea,
}

/// GitHub Actions: `GITHUB_ACTIONS=true` (also set by Forgejo and Gitea, detected before it).
pub(super) fn github(v: &Vars) -> Option<CiInfo> {
    v.is("GITHUB_ACTIONS", "true")
        .then(|| actions(v, Forge::GitHub))
}

/// Forgejo Actions: `FORGEJO_ACTIONS=true` (Forgejo runners also set `GITEA_ACTIONS=true`).
pub(super) fn forgejo(v: &Vars) -> Option<CiInfo> {
    v.is("FORGEJO_ACTIONS", "true")
        .then(|| actions(v, Forge::Forgejo))
}

/// Gitea Actions: `GITEA_ACTIONS=true`.
pub(super) fn gitea(v: &Vars) -> Option<CiInfo> {
    v.is("GITEA_ACTIONS", "true")
        .then(|| actions(v, Forge::Gitea))
}

fn actions(v: &Vars, forge: Forge) -> CiInfo {
    let repo = v.get("GITHUB_REPOSITORY");
    let build = v.get("GITHUB_RUN_ID");
    let git_ref = v.get("GITHUB_REF");
    let pr = git_ref
        .as_deref()
        .and_then(|r| r.strip_prefix("refs/pull/"))
        .and_then(|rest| pr_number(rest.split('/').next().map(str::to_owned)));
    let branch = match git_ref.as_deref() {
        Some(r) => r
            .strip_prefix("refs/heads/")
            .filter(|b| !b.is_empty())
            .map(str::to_owned),
        // No GITHUB_REF: trust GITHUB_REF_NAME only when it names a branch (for a PR it
        // reads `<n>/merge`, for a tag the tag).
        None if v.get("GITHUB_REF_TYPE").as_deref() == Some("branch") => v.get("GITHUB_REF_NAME"),
        None => None,
    };
    // A re-run keeps the run id and bumps the attempt: the attempt belongs in the job.
    let job = match (v.get("GITHUB_JOB"), v.get("GITHUB_RUN_ATTEMPT")) {
        (Some(job), Some(attempt)) => Some(format!("{job}.{attempt}")),
        (Some(job), None) => Some(job),
        (None, Some(attempt)) => Some(format!("0.{attempt}")),
        (None, None) => None,
    };
    let (system, run_in_link, query) = match forge {
        Forge::GitHub => ("github", build.clone(), ""),
        Forge::Forgejo => ("forgejo", v.get("GITHUB_RUN_NUMBER"), ""),
        // Gitea's newer routes (1.26 on) read `/actions/runs/<n>` as a run id first; `by_index=1`
        // makes them read the number, and older versions (which only know numbers) ignore it.
        Forge::Gitea => ("gitea", v.get("GITHUB_RUN_NUMBER"), "?by_index=1"),
    };
    let link = match (v.get("GITHUB_SERVER_URL"), &repo, run_in_link) {
        (Some(server), Some(repo), Some(run)) => Some(format!(
            "{}/{repo}/actions/runs/{run}{query}",
            server.trim_end_matches('/')
        )),
        _ => None,
    };
    CiInfo {
        system: system.into(),
        repo,
        build,
        job,
        pr,
        branch,
        commit: v.get("GITHUB_SHA"),
        link,
    }
}

#[cfg(test)]
mod tests {
    use crate::ident::ci_env::testing::{assert_valid, detect, detect_with, h};
    use crate::ident::ci_env::CiInfo;
    use std::collections::HashSet;

    #[test]
    fn github_pull_request() {
        let ci = detect(&[
            ("CI", "true"),
            ("GITHUB_ACTIONS", "true"),
            ("GITHUB_REPOSITORY", "octo/tether"),
            ("GITHUB_RUN_ID", "9876543210"),
            ("GITHUB_RUN_ATTEMPT", "2"),
            ("GITHUB_JOB", "integration"),
            ("GITHUB_REF", "refs/pull/123/merge"),
            ("GITHUB_REF_NAME", "123/merge"),
            ("GITHUB_SHA", "0123abcd"),
            ("GITHUB_SERVER_URL", "https://github.com/"),
        ])
        .expect("github");
        assert_eq!(
            ci,
            CiInfo {
                system: "github".into(),
                repo: Some("octo/tether".into()),
                build: Some("9876543210".into()),
                job: Some("integration.2".into()),
                pr: Some("123".into()),
                branch: None,
                commit: Some("0123abcd".into()),
                link: Some("https://github.com/octo/tether/actions/runs/9876543210".into()),
            }
        );
        assert_eq!(
            ci.default_run_id(),
            format!(
                "github-octo-tether-{}-9876543210-integration.2",
                h("octo/tether")
            )
        );
        assert_eq!(ci.default_group().as_deref(), Some("octo/tether#pr-123"));
    }

    #[test]
    fn github_push_branch_tag_and_missing_pieces() {
        let base = [
            ("GITHUB_ACTIONS", "true"),
            ("GITHUB_REPOSITORY", "o/r"),
            ("GITHUB_RUN_ID", "1"),
        ];
        let with = |extra: &[(&str, &str)]| {
            let mut all = base.to_vec();
            all.extend_from_slice(extra);
            detect(&all).expect("github")
        };

        let push = with(&[("GITHUB_REF", "refs/heads/feature/x")]);
        assert_eq!(push.branch.as_deref(), Some("feature/x"));
        assert_eq!(push.pr, None);
        assert_eq!(push.default_group().as_deref(), Some("o/r@feature/x"));
        assert_eq!(push.link, None, "no server url, no link");

        let tag = with(&[("GITHUB_REF", "refs/tags/v1"), ("GITHUB_REF_NAME", "v1")]);
        assert_eq!(tag.branch, None);
        assert_eq!(tag.default_group(), None);

        let no_ref = with(&[("GITHUB_REF_NAME", "dev"), ("GITHUB_REF_TYPE", "branch")]);
        assert_eq!(no_ref.branch.as_deref(), Some("dev"));
        let no_ref_tag = with(&[("GITHUB_REF_NAME", "v2"), ("GITHUB_REF_TYPE", "tag")]);
        assert_eq!(no_ref_tag.branch, None);

        let bad_pr = with(&[("GITHUB_REF", "refs/pull/abc/merge")]);
        assert_eq!(bad_pr.pr, None);

        // Job without attempt, attempt without job, neither.
        assert_eq!(with(&[("GITHUB_JOB", "t")]).job.as_deref(), Some("t"));
        assert_eq!(
            with(&[("GITHUB_RUN_ATTEMPT", "3")]).job.as_deref(),
            Some("0.3")
        );
        let bare = with(&[]);
        assert_eq!(bare.job, None);
        assert_eq!(bare.default_run_id(), format!("github-o-r-{}-1", h("o/r")));
    }

    #[test]
    fn github_attempts_and_jobs_get_distinct_ids() {
        let id = |job: &str, attempt: &str| {
            detect(&[
                ("GITHUB_ACTIONS", "true"),
                ("GITHUB_REPOSITORY", "o/r"),
                ("GITHUB_RUN_ID", "77"),
                ("GITHUB_JOB", job),
                ("GITHUB_RUN_ATTEMPT", attempt),
            ])
            .expect("github")
            .default_run_id()
        };
        let ids: HashSet<String> = [
            id("test", "1"),
            id("test", "2"),
            id("lint", "1"),
            id("lint", "2"),
        ]
        .into_iter()
        .collect();
        assert_eq!(ids.len(), 4);
    }

    /// What a Forgejo runner sets for a pull request's run: its marker, Gitea's, GitHub's and
    /// the `GITHUB_*` variables, on its own server.
    const FORGEJO_PR: [(&str, &str); 12] = [
        ("CI", "true"),
        ("GITHUB_ACTIONS", "true"),
        ("GITEA_ACTIONS", "true"),
        ("FORGEJO_ACTIONS", "true"),
        ("GITHUB_SERVER_URL", "https://code.example.org/"),
        ("GITHUB_REPOSITORY", "coop/app"),
        ("GITHUB_RUN_ID", "4711"),
        ("GITHUB_RUN_NUMBER", "37"),
        ("GITHUB_RUN_ATTEMPT", "1"),
        ("GITHUB_JOB", "e2e"),
        ("GITHUB_REF", "refs/pull/12/head"),
        ("GITHUB_SHA", "feedface"),
    ];

    #[test]
    fn forgejo_pull_request_links_to_its_own_server_by_run_number() {
        let ci = detect(&FORGEJO_PR).expect("forgejo");
        assert_eq!(
            ci,
            CiInfo {
                system: "forgejo".into(),
                repo: Some("coop/app".into()),
                build: Some("4711".into()),
                job: Some("e2e.1".into()),
                pr: Some("12".into()),
                branch: None,
                commit: Some("feedface".into()),
                link: Some("https://code.example.org/coop/app/actions/runs/37".into()),
            }
        );
        let id = ci.default_run_id();
        assert_eq!(id, format!("forgejo-coop-app-{}-4711-e2e.1", h("coop/app")));
        assert_valid(&id);
        assert_eq!(ci.default_group().as_deref(), Some("coop/app#pr-12"));
    }

    #[test]
    fn gitea_links_by_run_number_on_its_own_server() {
        let ci = detect_with(
            &FORGEJO_PR,
            &[
                ("FORGEJO_ACTIONS", ""),
                ("GITHUB_SERVER_URL", "https://gitea.example.org"),
                ("GITHUB_REF", "refs/heads/main"),
            ],
        )
        .expect("gitea");
        assert_eq!(ci.system, "gitea");
        assert_eq!(
            ci.link.as_deref(),
            Some("https://gitea.example.org/coop/app/actions/runs/37?by_index=1")
        );
        assert_eq!(ci.pr, None);
        assert_eq!(ci.branch.as_deref(), Some("main"));
        assert_eq!(ci.default_group().as_deref(), Some("coop/app@main"));
        let id = ci.default_run_id();
        assert_eq!(id, format!("gitea-coop-app-{}-4711-e2e.1", h("coop/app")));
        assert_valid(&id);
    }

    #[test]
    fn forgejo_and_gitea_never_link_to_github() {
        // No server URL, or no run number: no link at all rather than a guess.
        for marker in ["FORGEJO_ACTIONS", "GITEA_ACTIONS"] {
            let no_server = detect(&[
                (marker, "true"),
                ("GITHUB_ACTIONS", "true"),
                ("GITHUB_REPOSITORY", "o/r"),
                ("GITHUB_RUN_ID", "9"),
                ("GITHUB_RUN_NUMBER", "2"),
            ])
            .expect("detected");
            assert_eq!(no_server.link, None, "{marker}");
            let no_number = detect(&[
                (marker, "true"),
                ("GITHUB_SERVER_URL", "https://code.example.org"),
                ("GITHUB_REPOSITORY", "o/r"),
                ("GITHUB_RUN_ID", "9"),
            ])
            .expect("detected");
            assert_eq!(no_number.link, None, "{marker}");
        }
    }

    #[test]
    fn forgejo_attempts_jobs_and_systems_get_distinct_ids() {
        let id = |marker: &str, job: &str, attempt: &str| {
            let forgejo = if marker == "forgejo" { "true" } else { "" };
            detect_with(
                &FORGEJO_PR,
                &[
                    ("FORGEJO_ACTIONS", forgejo),
                    ("GITHUB_JOB", job),
                    ("GITHUB_RUN_ATTEMPT", attempt),
                ],
            )
            .expect("detected")
            .default_run_id()
        };
        let ids: HashSet<String> = [
            id("forgejo", "test", "1"),
            id("forgejo", "test", "2"),
            id("forgejo", "lint", "1"),
            id("gitea", "test", "1"),
        ]
        .into_iter()
        .collect();
        assert_eq!(ids.len(), 4, "{ids:?}");
    }
}
