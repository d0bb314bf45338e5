//! CI detection: recognise the CI system tether runs under from its environment; derive from it
//! the default run id (`--run-id`) and the default cancel-older group (`--group`); and record
//! the system, repo, build, job, PR number, branch, commit and build link for the lock metadata,
//! the run record and the summary.
//!
//! One file per CI system (or family of systems that share their variables): each reads its
//! variables into a [`CiInfo`] (`info`), whose run id and group are derived the same way for
//! all. This file only picks the system, in [`DETECTION_ORDER`].

mod buildkite;
mod drone;
mod github;
mod gitlab;
mod info;
mod jenkins;

pub(crate) use info::{local_run_id, CiInfo};

use crate::ident::ci_env::info::Vars;

/// A CI system's detector: `None` unless the system's marker is in the environment.
type Detector = fn(&Vars) -> Option<CiInfo>;

/// The CI systems, tried in this order; the first whose marker is set wins.
///
/// | system | marker |
/// |---|---|
/// | Woodpecker | `CI=woodpecker` |
/// | Drone | `DRONE=true` |
/// | GitLab CI | `GITLAB_CI=true` |
/// | Forgejo Actions | `FORGEJO_ACTIONS=true` |
/// | Gitea Actions | `GITEA_ACTIONS=true` |
/// | GitHub Actions | `GITHUB_ACTIONS=true` |
/// | Buildkite | `BUILDKITE=true` |
/// | Jenkins | `BUILD_TAG=jenkins-…`, or `JENKINS_URL` and `BUILD_NUMBER` |
///
/// Why this order: Woodpecker sets Drone-compatible variables, so it goes before Drone; Forgejo
/// and Gitea set `GITHUB_ACTIONS=true` (and Forgejo's runner sets `GITEA_ACTIONS=true` too), so
/// they go before GitHub, Forgejo first. The systems added later (Buildkite, Jenkins) go after
/// the first four, so no environment that was detected as one of those four reads differently
/// now; Jenkins, whose markers are the weakest (a shell can carry `JENKINS_URL` for the Jenkins
/// CLI), goes last. Markers are compared case-insensitively; every value is trimmed and an empty
/// value counts as absent.
const DETECTION_ORDER: [Detector; 8] = [
    drone::woodpecker,
    drone::drone,
    gitlab::gitlab,
    github::forgejo,
    github::gitea,
    github::github,
    buildkite::buildkite,
    jenkins::jenkins,
];

impl CiInfo {
    /// Detect from a lookup function (tests pass a map; production passes `std::env::var`), in
    /// [`DETECTION_ORDER`]. `None` outside CI.
    pub(crate) fn detect(get: &dyn Fn(&str) -> Option<String>) -> Option<CiInfo> {
        let vars = Vars(get);
        DETECTION_ORDER.iter().find_map(|detect| detect(&vars))
    }

    /// [`CiInfo::detect`] on the process environment (non-UTF-8 values count as absent).
    pub(crate) fn from_process_env() -> Option<CiInfo> {
        Self::detect(&|key| std::env::var(key).ok())
    }
}

/// Helpers the CI systems' unit tests share.
#[cfg(test)]
mod testing {
    use super::info::{fnv1a32, is_valid_run_id};
    use super::CiInfo;
    use std::collections::HashMap;

    pub(super) fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    pub(super) fn detect(pairs: &[(&str, &str)]) -> Option<CiInfo> {
        let map = env(pairs);
        CiInfo::detect(&move |k| map.get(k).cloned())
    }

    /// [`detect`] on `base` and then `extra`: a key in `extra` overrides the same key in `base`,
    /// as a later assignment does in an environment.
    pub(super) fn detect_with(base: &[(&str, &str)], extra: &[(&str, &str)]) -> Option<CiInfo> {
        let all: Vec<(&str, &str)> = base.iter().chain(extra).copied().collect();
        detect(&all)
    }

    pub(super) fn h(s: &str) -> String {
        format!("{:08x}", fnv1a32(s.as_bytes()))
    }

    pub(super) fn assert_valid(id: &str) {
        assert!(
            is_valid_run_id(id),
            "invalid run id {id:?} (len {})",
            id.len()
        );
        assert!(
            crate::ident::names::RunId::parse(id).is_ok(),
            "{id:?} is refused by names::RunId"
        );
    }

    pub(super) fn drone(repo: &str, build: &str, stage: &str, step: &str) -> CiInfo {
        detect(&[
            ("DRONE", "true"),
            ("DRONE_REPO", repo),
            ("DRONE_BUILD_NUMBER", build),
            ("DRONE_STAGE_NUMBER", stage),
            ("DRONE_STEP_NUMBER", step),
        ])
        .expect("drone detected")
    }

    pub(super) fn info(
        system: &str,
        repo: Option<&str>,
        build: Option<&str>,
        job: Option<&str>,
    ) -> CiInfo {
        CiInfo {
            system: system.into(),
            repo: repo.map(Into::into),
            build: build.map(Into::into),
            job: job.map(Into::into),
            pr: None,
            branch: None,
            commit: None,
            link: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{assert_valid, detect};
    use super::*;

    /// Each system's marker, in the documented order, with the name it is detected as.
    const MARKERS: [(&str, &str, &str); 8] = [
        ("CI", "woodpecker", "woodpecker"),
        ("DRONE", "true", "drone"),
        ("GITLAB_CI", "true", "gitlab"),
        ("FORGEJO_ACTIONS", "true", "forgejo"),
        ("GITEA_ACTIONS", "true", "gitea"),
        ("GITHUB_ACTIONS", "true", "github"),
        ("BUILDKITE", "true", "buildkite"),
        ("BUILD_TAG", "jenkins-app-1", "jenkins"),
    ];

    #[test]
    fn detection_follows_the_documented_order() {
        // With the markers of every system from `i` on, system `i` wins: so each one beats
        // every one after it.
        for i in 0..MARKERS.len() {
            let pairs: Vec<(&str, &str)> = MARKERS[i..].iter().map(|(k, v, _)| (*k, *v)).collect();
            let ci = detect(&pairs).expect("detected");
            assert_eq!(ci.system, MARKERS[i].2, "markers {pairs:?}");
        }
        // And each marker alone is its system.
        for (key, value, system) in MARKERS {
            let ci = detect(&[(key, value)]).expect("detected");
            assert_eq!(ci.system, system, "{key}={value}");
        }
    }

    #[test]
    fn forgejo_and_gitea_win_over_github_whatever_else_is_set() {
        // What a Forgejo runner sets: all three markers.
        let all = [
            ("GITHUB_ACTIONS", "true"),
            ("GITEA_ACTIONS", "true"),
            ("FORGEJO_ACTIONS", "true"),
            ("GITHUB_SERVER_URL", "https://code.example.org"),
        ];
        assert_eq!(detect(&all).expect("forgejo").system, "forgejo");
        // What a Gitea runner sets (and a Forgejo runner older than the FORGEJO_* variables).
        assert_eq!(detect(&all[..2]).expect("gitea").system, "gitea");
        assert_eq!(
            detect(&[("FORGEJO_ACTIONS", "false"), ("GITHUB_ACTIONS", "true")])
                .expect("github")
                .system,
            "github"
        );
    }

    #[test]
    fn the_first_four_systems_are_still_detected_as_before() {
        // Buildkite or Jenkins variables that leak into a Drone, Woodpecker, GitLab or GitHub
        // step change nothing.
        let extra = [
            ("BUILDKITE", "true"),
            ("BUILD_TAG", "jenkins-x-1"),
            ("JENKINS_URL", "https://jenkins.example.org/"),
            ("BUILD_NUMBER", "1"),
        ];
        for (key, value, system) in &MARKERS[..6] {
            if matches!(*system, "forgejo" | "gitea") {
                continue;
            }
            let mut pairs = vec![(*key, *value)];
            pairs.extend_from_slice(&extra);
            assert_eq!(detect(&pairs).expect("detected").system, *system);
        }
    }

    #[test]
    fn outside_ci_is_none() {
        assert_eq!(detect(&[]), None);
        assert_eq!(detect(&[("CI", "true")]), None);
        assert_eq!(detect(&[("DRONE", "false"), ("DRONE_REPO", "a/b")]), None);
        assert_eq!(detect(&[("GITHUB_ACTIONS", "")]), None);
        assert_eq!(detect(&[("GITLAB_CI", "1")]), None);
        assert_eq!(detect(&[("CI", "drone")]), None);
    }

    #[test]
    fn the_new_systems_need_their_markers() {
        assert_eq!(detect(&[("BUILDKITE", "false")]), None);
        assert_eq!(detect(&[("BUILDKITE_BUILD_NUMBER", "5")]), None);
        assert_eq!(
            detect(&[("FORGEJO_ACTIONS", "1"), ("GITEA_ACTIONS", "")]),
            None
        );
        // A shell set up for the Jenkins CLI is not a Jenkins build, nor is a tag of another
        // tool.
        assert_eq!(
            detect(&[("JENKINS_URL", "https://jenkins.example.org/")]),
            None
        );
        assert_eq!(
            detect(&[("BUILD_TAG", "release-1.2"), ("BUILD_NUMBER", "3")]),
            None
        );
    }

    #[test]
    fn process_env_detection_is_consistent() {
        // The test host may itself be a CI job: whatever is detected must give a valid id.
        if let Some(ci) = CiInfo::from_process_env() {
            assert_valid(&ci.default_run_id());
        }
    }
}
