//! GitLab CI: the pipeline id is the build, the job id (unique per instance; a retried job
//! gets a new one) the job.

use crate::ident::ci_env::info::{pr_number, CiInfo, Vars};

/// GitLab CI: `GITLAB_CI=true`.
pub(super) fn gitlab(v: &Vars) -> Option<CiInfo> {
    v.is("GITLAB_CI", "true").then(|| CiInfo {
        system: "gitlab".into(),
        repo: v.get("CI_PROJECT_PATH"),
        build: v.get("CI_PIPELINE_ID"),
        // Job ids are unique per GitLab instance; a retried job gets a new one.
        job: v.get("CI_JOB_ID"),
        pr: pr_number(v.get("CI_MERGE_REQUEST_IID")),
        branch: v.get("CI_COMMIT_REF_NAME"),
        commit: v.get("CI_COMMIT_SHA"),
        link: v.get("CI_JOB_URL").or_else(|| v.get("CI_PIPELINE_URL")),
    })
}

#[cfg(test)]
mod tests {
    use crate::ident::ci_env::testing::{detect, h};
    use crate::ident::ci_env::CiInfo;

    #[test]
    fn gitlab_merge_request_and_branch() {
        let mr = detect(&[
            ("GITLAB_CI", "true"),
            ("CI", "true"),
            ("CI_PROJECT_PATH", "grp/sub/proj"),
            ("CI_PIPELINE_ID", "5001"),
            ("CI_JOB_ID", "90210"),
            ("CI_MERGE_REQUEST_IID", "7"),
            ("CI_COMMIT_SHA", "deadbeef"),
            (
                "CI_JOB_URL",
                "https://gitlab.example.org/grp/sub/proj/-/jobs/90210",
            ),
            (
                "CI_PIPELINE_URL",
                "https://gitlab.example.org/grp/sub/proj/-/pipelines/5001",
            ),
            ("CI_COMMIT_REF_NAME", "topic"),
        ])
        .expect("gitlab");
        assert_eq!(
            mr,
            CiInfo {
                system: "gitlab".into(),
                repo: Some("grp/sub/proj".into()),
                build: Some("5001".into()),
                job: Some("90210".into()),
                pr: Some("7".into()),
                branch: Some("topic".into()),
                commit: Some("deadbeef".into()),
                link: Some("https://gitlab.example.org/grp/sub/proj/-/jobs/90210".into()),
            }
        );
        assert_eq!(
            mr.default_run_id(),
            format!("gitlab-grp-sub-proj-{}-5001-90210", h("grp/sub/proj"))
        );
        assert_eq!(mr.default_group().as_deref(), Some("grp/sub/proj#pr-7"));

        let branch = detect(&[
            ("GITLAB_CI", "true"),
            ("CI_PROJECT_PATH", "grp/proj"),
            ("CI_PIPELINE_ID", "5002"),
            ("CI_COMMIT_REF_NAME", "main"),
            (
                "CI_PIPELINE_URL",
                "https://gitlab.example.org/grp/proj/-/pipelines/5002",
            ),
        ])
        .expect("gitlab");
        assert_eq!(branch.pr, None);
        assert_eq!(branch.default_group().as_deref(), Some("grp/proj@main"));
        assert_eq!(
            branch.link.as_deref(),
            Some("https://gitlab.example.org/grp/proj/-/pipelines/5002"),
            "pipeline url when there is no job url"
        );
    }
}
