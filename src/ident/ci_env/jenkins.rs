//! Jenkins. The build number counts per job, so the job's full name (`JOB_NAME`, with its
//! folders; in a multibranch pipeline it ends with the branch or `PR-<n>`) stands where other
//! systems have the repo: it makes the run id unique per build, and a multibranch job is one
//! branch or one pull request, so it also keys the cancel-older group. Several `sh` steps of one
//! build are told apart by the declarative stage they run in (`STAGE_NAME`).

use crate::ident::ci_env::info::{pr_number, CiInfo, Vars};

/// Jenkins: `BUILD_TAG=jenkins-<job>-<number>` (set for every build), or `JENKINS_URL` together
/// with `BUILD_NUMBER` (`JENKINS_URL` alone is often set in a shell for the Jenkins CLI).
pub(super) fn jenkins(v: &Vars) -> Option<CiInfo> {
    let tagged = v
        .get("BUILD_TAG")
        .is_some_and(|t| t.starts_with("jenkins-"));
    let served = v.get("JENKINS_URL").is_some() && v.get("BUILD_NUMBER").is_some();
    if !(tagged || served) {
        return None;
    }
    // CHANGE_ID: the change request of a multibranch job (a pull request number on GitHub,
    // Gitea, Bitbucket; a merge request's on GitLab). Anything but digits is no PR.
    let pr = pr_number(v.get("CHANGE_ID"));
    let branch = if v.get("TAG_NAME").is_some() {
        None
    } else if pr.is_some() {
        v.get("CHANGE_TARGET")
    } else {
        // BRANCH_NAME in a multibranch job; the Git plugin's GIT_BRANCH (`origin/main`)
        // elsewhere.
        v.get("BRANCH_NAME").or_else(|| {
            v.get("GIT_BRANCH")
                .map(|b| match b.strip_prefix("origin/") {
                    Some(rest) if !rest.is_empty() => rest.to_owned(),
                    _ => b,
                })
        })
    };
    Some(CiInfo {
        system: "jenkins".into(),
        repo: v.get("JOB_NAME"),
        build: v.get("BUILD_NUMBER"),
        job: v.get("STAGE_NAME"),
        pr,
        branch,
        commit: v.get("GIT_COMMIT"),
        link: v.get("BUILD_URL"),
    })
}

#[cfg(test)]
mod tests {
    use crate::ident::ci_env::testing::{assert_valid, detect, detect_with, h};
    use crate::ident::ci_env::CiInfo;
    use std::collections::HashSet;

    /// A multibranch pipeline building pull request 12 of `team/app`.
    const PR_BUILD: [(&str, &str); 11] = [
        ("JENKINS_URL", "https://jenkins.example.org/"),
        ("BUILD_TAG", "jenkins-team-app-PR-12-7"),
        ("BUILD_NUMBER", "7"),
        ("JOB_NAME", "team/app/PR-12"),
        (
            "BUILD_URL",
            "https://jenkins.example.org/job/team/job/app/job/PR-12/7/",
        ),
        ("BRANCH_NAME", "PR-12"),
        ("CHANGE_ID", "12"),
        ("CHANGE_TARGET", "main"),
        ("STAGE_NAME", "e2e"),
        ("GIT_COMMIT", "c0ffee00"),
        ("CI", "true"),
    ];

    #[test]
    fn jenkins_multibranch_pull_request() {
        let ci = detect(&PR_BUILD).expect("jenkins");
        assert_eq!(
            ci,
            CiInfo {
                system: "jenkins".into(),
                repo: Some("team/app/PR-12".into()),
                build: Some("7".into()),
                job: Some("e2e".into()),
                pr: Some("12".into()),
                branch: Some("main".into()),
                commit: Some("c0ffee00".into()),
                link: Some("https://jenkins.example.org/job/team/job/app/job/PR-12/7/".into()),
            }
        );
        let id = ci.default_run_id();
        assert_eq!(
            id,
            format!("jenkins-team-app-PR-12-{}-7-e2e", h("team/app/PR-12"))
        );
        assert_valid(&id);
        assert_eq!(ci.default_group().as_deref(), Some("team/app/PR-12#pr-12"));
    }

    #[test]
    fn jenkins_branches_tags_and_plain_jobs() {
        let base = [("BUILD_TAG", "jenkins-x-1"), ("BUILD_NUMBER", "1")];
        let with = |extra: &[(&str, &str)]| detect_with(&base, extra).expect("jenkins");

        let branch = with(&[
            ("JOB_NAME", "app/feature%2Fx"),
            ("BRANCH_NAME", "feature/x"),
        ]);
        assert_eq!(branch.pr, None);
        assert_eq!(
            branch.default_group().as_deref(),
            Some("app/feature%2Fx@feature/x")
        );

        let tag = with(&[
            ("JOB_NAME", "app/v1.0"),
            ("BRANCH_NAME", "v1.0"),
            ("TAG_NAME", "v1.0"),
        ]);
        assert_eq!(tag.branch, None, "a tag build has no branch");
        assert_eq!(tag.default_group(), None);

        // A plain (not multibranch) job with the Git plugin.
        let plain = with(&[("JOB_NAME", "deploy"), ("GIT_BRANCH", "origin/release/2")]);
        assert_eq!(plain.branch.as_deref(), Some("release/2"));
        assert_eq!(plain.job, None, "no stage, no job part");
        assert_eq!(plain.default_run_id(), "jenkins-deploy-1");

        // A non-numeric change id (Gerrit) is no PR.
        assert_eq!(
            with(&[("CHANGE_ID", "I8473b95934b5732ac55d26311a706c9c2bde9940")]).pr,
            None
        );

        // JENKINS_URL with a build number, no BUILD_TAG (a pipeline that overrode it).
        let served = detect(&[
            ("JENKINS_URL", "https://jenkins.example.org/"),
            ("BUILD_NUMBER", "3"),
            ("JOB_NAME", "deploy"),
        ])
        .expect("jenkins");
        assert_eq!(served.default_run_id(), "jenkins-deploy-3");
    }

    #[test]
    fn jenkins_stages_branches_and_builds_get_distinct_ids() {
        let id = |job: &str, build: &str, stage: &str| {
            // An empty STAGE_NAME counts as absent.
            let extra = [
                ("JOB_NAME", job),
                ("BUILD_NUMBER", build),
                ("STAGE_NAME", stage),
            ];
            let id = detect_with(&PR_BUILD, &extra)
                .expect("jenkins")
                .default_run_id();
            assert_valid(&id);
            id
        };
        let ids: HashSet<String> = [
            id("app/main", "5", "e2e"),
            id("app/main", "5", "smoke test"),
            id("app/main", "5", ""),
            id("app/main", "6", "e2e"),
            // Branches of one multibranch project count their builds separately.
            id("app/PR-5", "5", "e2e"),
            // Job names that read alike once squeezed into the run-id alphabet.
            id("app-main", "5", "e2e"),
        ]
        .into_iter()
        .collect();
        assert_eq!(ids.len(), 6, "{ids:?}");
    }
}
