//! Buildkite. Build numbers count per pipeline, and a pipeline's slug is unique within its
//! organization, so `<organization>/<pipeline>` stands where other systems have the repo. The
//! job is the job's UUID (`BUILDKITE_JOB_ID`): unique, and a retried job is a new job with a new
//! UUID, so retries never share a run id.

use crate::ident::ci_env::info::{pr_number, CiInfo, Vars};

/// Buildkite: `BUILDKITE=true`.
pub(super) fn buildkite(v: &Vars) -> Option<CiInfo> {
    if !v.is("BUILDKITE", "true") {
        return None;
    }
    let repo = match (
        v.get("BUILDKITE_ORGANIZATION_SLUG"),
        v.get("BUILDKITE_PIPELINE_SLUG"),
    ) {
        (Some(org), Some(pipeline)) => Some(format!("{org}/{pipeline}")),
        (None, pipeline) => pipeline,
        (Some(_), None) => None,
    };
    // BUILDKITE_PULL_REQUEST is the number, or `false` outside a pull request.
    let pr = pr_number(v.get("BUILDKITE_PULL_REQUEST"));
    let branch = if v.get("BUILDKITE_TAG").is_some() {
        None
    } else if pr.is_some() {
        v.get("BUILDKITE_PULL_REQUEST_BASE_BRANCH")
    } else {
        v.get("BUILDKITE_BRANCH")
    };
    let job = v.get("BUILDKITE_JOB_ID");
    // The build page with the job's anchor, which Buildkite opens at that job.
    let link = v.get("BUILDKITE_BUILD_URL").map(|url| match &job {
        Some(job) => format!("{url}#{job}"),
        None => url,
    });
    Some(CiInfo {
        system: "buildkite".into(),
        repo,
        build: v.get("BUILDKITE_BUILD_NUMBER"),
        job,
        pr,
        branch,
        commit: v.get("BUILDKITE_COMMIT"),
        link,
    })
}

#[cfg(test)]
mod tests {
    use crate::ident::ci_env::testing::{assert_valid, detect, detect_with, h};
    use crate::ident::ci_env::CiInfo;
    use std::collections::HashSet;

    const JOB: &str = "0190f3c2-5d8e-4a7b-9c1d-2e3f4a5b6c7d";

    #[test]
    fn buildkite_pull_request() {
        let ci = detect(&[
            ("BUILDKITE", "true"),
            ("CI", "true"),
            ("BUILDKITE_ORGANIZATION_SLUG", "acme"),
            ("BUILDKITE_PIPELINE_SLUG", "immich-e2e"),
            ("BUILDKITE_BUILD_NUMBER", "1503"),
            ("BUILDKITE_JOB_ID", JOB),
            (
                "BUILDKITE_BUILD_URL",
                "https://buildkite.com/acme/immich-e2e/builds/1503",
            ),
            ("BUILDKITE_PULL_REQUEST", "88"),
            ("BUILDKITE_PULL_REQUEST_BASE_BRANCH", "main"),
            ("BUILDKITE_BRANCH", "someone:fix-upload"),
            ("BUILDKITE_COMMIT", "abad1dea"),
            ("BUILDKITE_RETRY_COUNT", "0"),
        ])
        .expect("buildkite");
        assert_eq!(
            ci,
            CiInfo {
                system: "buildkite".into(),
                repo: Some("acme/immich-e2e".into()),
                build: Some("1503".into()),
                job: Some(JOB.into()),
                pr: Some("88".into()),
                branch: Some("main".into()),
                commit: Some("abad1dea".into()),
                link: Some(format!(
                    "https://buildkite.com/acme/immich-e2e/builds/1503#{JOB}"
                )),
            }
        );
        let id = ci.default_run_id();
        assert_eq!(
            id,
            format!(
                "buildkite-acme-immich-e2e-{}-1503-{JOB}",
                h("acme/immich-e2e")
            )
        );
        assert_valid(&id);
        assert_eq!(ci.default_group().as_deref(), Some("acme/immich-e2e#pr-88"));
    }

    #[test]
    fn buildkite_branch_tag_and_missing_pieces() {
        let base = [
            ("BUILDKITE", "true"),
            ("BUILDKITE_PIPELINE_SLUG", "app"),
            ("BUILDKITE_BUILD_NUMBER", "9"),
        ];
        let with = |extra: &[(&str, &str)]| detect_with(&base, extra).expect("buildkite");

        let push = with(&[
            ("BUILDKITE_PULL_REQUEST", "false"),
            ("BUILDKITE_BRANCH", "main"),
        ]);
        assert_eq!(push.pr, None, "`false` is no pull request");
        assert_eq!(push.default_group().as_deref(), Some("app@main"));
        assert_eq!(push.link, None);
        assert_eq!(
            push.default_run_id(),
            "buildkite-app-9",
            "no job id, no job part"
        );

        let tag = with(&[("BUILDKITE_BRANCH", "v2.0"), ("BUILDKITE_TAG", "v2.0")]);
        assert_eq!(tag.branch, None, "a tag build has no branch");

        let no_job = with(&[(
            "BUILDKITE_BUILD_URL",
            "https://buildkite.com/a/app/builds/9",
        )]);
        assert_eq!(
            no_job.link.as_deref(),
            Some("https://buildkite.com/a/app/builds/9")
        );

        let org_only = detect(&[
            ("BUILDKITE", "TRUE"),
            ("BUILDKITE_ORGANIZATION_SLUG", "acme"),
        ])
        .expect("buildkite");
        assert_eq!(org_only.repo, None);
        assert_eq!(org_only.default_run_id(), "buildkite-unknown-unknown");
    }

    #[test]
    fn buildkite_jobs_retries_and_organizations_get_distinct_ids() {
        let id = |org: &str, job: &str| {
            let id = detect(&[
                ("BUILDKITE", "true"),
                ("BUILDKITE_ORGANIZATION_SLUG", org),
                ("BUILDKITE_PIPELINE_SLUG", "app"),
                ("BUILDKITE_BUILD_NUMBER", "9"),
                ("BUILDKITE_JOB_ID", job),
            ])
            .expect("buildkite")
            .default_run_id();
            assert_valid(&id);
            id
        };
        let ids: HashSet<String> = [
            id("acme", JOB),
            // A retry is a new job with a new UUID.
            id("acme", "0190f3c2-5d8e-4a7b-9c1d-2e3f4a5b6c7e"),
            id("other", JOB),
        ]
        .into_iter()
        .collect();
        assert_eq!(ids.len(), 3, "{ids:?}");
    }
}
