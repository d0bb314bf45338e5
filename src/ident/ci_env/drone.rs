//! Drone and Woodpecker (which grew out of Drone and keeps its shape: build number, then
//! `<stage>.<step>` or `<workflow>.<step>`).

use crate::ident::ci_env::info::{dotted, pr_number, CiInfo, Vars};

/// The variables one system of the family names each field by.
struct Names {
    system: &'static str,
    repo: &'static str,
    build: &'static str,
    /// `<stage>.<step>` (Drone), `<workflow>.<step>` (Woodpecker).
    job: [&'static str; 2],
    pr: &'static str,
    branch: &'static str,
    commit: &'static str,
    link: &'static str,
}

const WOODPECKER: Names = Names {
    system: "woodpecker",
    repo: "CI_REPO",
    build: "CI_PIPELINE_NUMBER",
    job: ["CI_WORKFLOW_NUMBER", "CI_STEP_NUMBER"],
    pr: "CI_COMMIT_PULL_REQUEST",
    branch: "CI_COMMIT_BRANCH",
    commit: "CI_COMMIT_SHA",
    link: "CI_PIPELINE_URL",
};

const DRONE: Names = Names {
    system: "drone",
    repo: "DRONE_REPO",
    build: "DRONE_BUILD_NUMBER",
    job: ["DRONE_STAGE_NUMBER", "DRONE_STEP_NUMBER"],
    pr: "DRONE_PULL_REQUEST",
    branch: "DRONE_BRANCH",
    commit: "DRONE_COMMIT_SHA",
    link: "DRONE_BUILD_LINK",
};

/// Woodpecker: `CI=woodpecker`.
pub(super) fn woodpecker(v: &Vars) -> Option<CiInfo> {
    v.is("CI", "woodpecker").then(|| read(v, &WOODPECKER))
}

/// Drone: `DRONE=true`.
pub(super) fn drone(v: &Vars) -> Option<CiInfo> {
    v.is("DRONE", "true").then(|| read(v, &DRONE))
}

fn read(v: &Vars, names: &Names) -> CiInfo {
    CiInfo {
        system: names.system.into(),
        repo: v.get(names.repo),
        build: v.get(names.build),
        job: dotted(v.get(names.job[0]), v.get(names.job[1])),
        pr: pr_number(v.get(names.pr)),
        branch: v.get(names.branch),
        commit: v.get(names.commit),
        link: v.get(names.link),
    }
}

#[cfg(test)]
mod tests {
    use crate::ident::ci_env::testing::{assert_valid, detect, drone, h};
    use crate::ident::ci_env::CiInfo;

    #[test]
    fn drone_fields_id_and_group() {
        let ci = detect(&[
            ("CI", "true"),
            ("DRONE", "true"),
            ("DRONE_REPO", "coop-cloud/immich"),
            ("DRONE_BUILD_NUMBER", "267"),
            ("DRONE_STAGE_NUMBER", "1"),
            ("DRONE_STEP_NUMBER", "3"),
            ("DRONE_PULL_REQUEST", "42"),
            ("DRONE_COMMIT_SHA", "ad3e33f00"),
            (
                "DRONE_BUILD_LINK",
                "https://drone.example.org/coop-cloud/immich/267",
            ),
            ("DRONE_BRANCH", "main"),
        ])
        .expect("drone");
        assert_eq!(
            ci,
            CiInfo {
                system: "drone".into(),
                repo: Some("coop-cloud/immich".into()),
                build: Some("267".into()),
                job: Some("1.3".into()),
                pr: Some("42".into()),
                branch: Some("main".into()),
                commit: Some("ad3e33f00".into()),
                link: Some("https://drone.example.org/coop-cloud/immich/267".into()),
            }
        );
        let id = ci.default_run_id();
        assert_eq!(
            id,
            format!("drone-coop-cloud-immich-{}-267-1.3", h("coop-cloud/immich"))
        );
        assert_valid(&id);
        assert_eq!(
            ci.default_group().as_deref(),
            Some("coop-cloud/immich#pr-42")
        );
    }

    #[test]
    fn drone_push_groups_by_branch() {
        let ci = detect(&[
            ("DRONE", "TRUE"),
            ("DRONE_REPO", "o/n"),
            ("DRONE_BUILD_NUMBER", "5"),
            ("DRONE_PULL_REQUEST", ""),
            ("DRONE_BRANCH", "release/1.x"),
        ])
        .expect("drone");
        assert_eq!(ci.pr, None);
        assert_eq!(ci.job, None);
        assert_eq!(ci.default_group().as_deref(), Some("o/n@release/1.x"));
        assert_eq!(ci.default_run_id(), format!("drone-o-n-{}-5", h("o/n")));
    }

    #[test]
    fn woodpecker_fields_id_and_group() {
        let ci = detect(&[
            ("CI", "woodpecker"),
            ("CI_REPO", "owner/app"),
            ("CI_PIPELINE_NUMBER", "88"),
            ("CI_WORKFLOW_NUMBER", "2"),
            ("CI_STEP_NUMBER", "4"),
            ("CI_COMMIT_PULL_REQUEST", "17"),
            ("CI_COMMIT_SHA", "cafebabe"),
            (
                "CI_PIPELINE_URL",
                "https://ci.example.org/repos/3/pipeline/88",
            ),
            ("CI_COMMIT_BRANCH", "main"),
        ])
        .expect("woodpecker");
        assert_eq!(ci.system, "woodpecker");
        assert_eq!(ci.repo.as_deref(), Some("owner/app"));
        assert_eq!(ci.build.as_deref(), Some("88"));
        assert_eq!(ci.job.as_deref(), Some("2.4"));
        assert_eq!(ci.pr.as_deref(), Some("17"));
        assert_eq!(ci.commit.as_deref(), Some("cafebabe"));
        assert_eq!(ci.branch.as_deref(), Some("main"));
        assert_eq!(
            ci.link.as_deref(),
            Some("https://ci.example.org/repos/3/pipeline/88")
        );
        assert_eq!(
            ci.default_run_id(),
            format!("woodpecker-owner-app-{}-88-2.4", h("owner/app"))
        );
        assert_eq!(ci.default_group().as_deref(), Some("owner/app#pr-17"));
    }

    #[test]
    fn woodpecker_wins_over_drone_markers() {
        let ci = detect(&[("CI", "woodpecker"), ("DRONE", "true"), ("CI_REPO", "a/b")])
            .expect("detected");
        assert_eq!(ci.system, "woodpecker");
    }

    #[test]
    fn missing_stage_or_step_reads_zero() {
        assert_eq!(drone("o/n", "1", "", "2").job.as_deref(), Some("0.2"));
        assert_eq!(drone("o/n", "1", "2", "").job.as_deref(), Some("2.0"));
        assert_eq!(drone("o/n", "1", "", "").job, None);
    }
}
