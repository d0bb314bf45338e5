//! What a CI run is, once detected, and the run id and group derived from it.
//!
//! The failure this closes: a derived run id that is not unique. Two steps (or stages, jobs,
//! re-run attempts) of one build must never collide on one run id — the second would be refused
//! as "in use", or would reconcile the first's run dir as a dead run's. Nor may runs of two
//! different repos share one id merely because they have the same build number, or because their
//! repo paths look alike once squeezed into the run-id charset (`a-b/c` and `a/b-c` both read
//! `a-b-c`), or because both are too long and were cut to the same prefix.
//!
//! How: the run id is `<system>-<repo>-<build>[-<job>]`, each part a *token*. A value that is
//! already a clean run-id token (`[A-Za-z0-9._-]`, short enough) is used as is — build numbers,
//! `<stage>.<step>`, GitHub job keys. A value that had to be changed (characters replaced by
//! `-`, or shortened) keeps a readable head and gets `-<8 hex digits>` of a 32-bit FNV-1a hash
//! of its full original text, so different values stay different. Repo paths contain `/`, so
//! the repo part practically always carries that hash. Everything here is a pure function of
//! the values given; nothing reads the clock or the pid except [`local_run_id`]'s caller.

use serde::{Deserialize, Serialize};

/// What tether learned about the CI run it is part of. Every field but `system` is optional:
/// CI systems differ in what they provide, and an empty variable counts as absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CiInfo {
    /// `"drone"`, `"woodpecker"`, `"gitlab"`, `"forgejo"`, `"gitea"`, `"github"`,
    /// `"buildkite"` or `"jenkins"`.
    pub(crate) system: String,
    /// `owner/name`, the GitLab `group/subgroup/project` path, the Buildkite
    /// `<organization>/<pipeline>` slugs, or the Jenkins job's full name.
    pub(crate) repo: Option<String>,
    /// Build / pipeline number (GitHub, Forgejo, Gitea: the run id; GitLab: the pipeline id).
    pub(crate) build: Option<String>,
    /// Drone `<stage>.<step>`, Woodpecker `<workflow>.<step>`, GitHub/Forgejo/Gitea
    /// `<job>.<attempt>`, GitLab the job id, Buildkite the job's UUID, Jenkins the stage name.
    /// A missing number reads `0` (no system numbers from 0, and a GitHub job key cannot start
    /// with a digit).
    pub(crate) job: Option<String>,
    /// PR / MR number, normalised to plain decimal digits.
    pub(crate) pr: Option<String>,
    /// The branch, when the system says which (Drone/Woodpecker/Buildkite/Jenkins: the target
    /// branch of a PR; GitHub/Forgejo/Gitea: only for branch pushes; GitLab: the ref name,
    /// which may be a tag; Buildkite/Jenkins: none for a tag build).
    pub(crate) branch: Option<String>,
    pub(crate) commit: Option<String>,
    /// Link to the build (or job) page, when the system gives one.
    pub(crate) link: Option<String>,
}

/// Longest run id (`names::RunId`).
const RUN_ID_MAX: usize = 128;
/// Caps on the parts of a derived run id; the repo gets what is left (at least 27 chars).
const SYSTEM_MAX: usize = 16;
const BUILD_MAX: usize = 32;
const JOB_MAX: usize = 48;
/// Hex digits of the FNV-1a hash added to an altered part.
const HASH_LEN: usize = 8;

impl CiInfo {
    /// Default run id: contains the build/pipeline number, unique per repo+build+job/step,
    /// only `[A-Za-z0-9._-]`, 1–128 chars, not starting with `.`.
    ///
    /// Form: `<system>-<repo>-<build>[-<job>]`, e.g. `drone-owner-name-1a2b3c4d-267-1.2`
    /// (`1a2b3c4d`: hash of `owner/name`, see the module docs). The job part is left out when
    /// the system gave no job/step at all. A missing repo reads `unknown`, and a missing build
    /// number yields `<system>-<repo>-unknown-<job>`: still a valid id, but no longer unique
    /// per build — uniqueness is then the caller's business (pass `--run-id`); this function is
    /// pure and reads neither the clock nor the pid.
    ///
    /// Build number and job are kept intact up to 32 and 48 characters (real ones are far
    /// shorter); a long repo path is shortened to fit in 128, keeping its hash.
    pub(crate) fn default_run_id(&self) -> String {
        let mut system = token(&self.system, SYSTEM_MAX);
        if system.starts_with('.') {
            system.insert_str(0, "ci");
        }
        let build = token(nonempty(&self.build).unwrap_or("unknown"), BUILD_MAX);
        let job = nonempty(&self.job).map(|j| token(j, JOB_MAX));

        let fixed = system.len() + 1 + 1 + build.len() + job.as_ref().map_or(0, |j| 1 + j.len());
        let repo_budget = RUN_ID_MAX.saturating_sub(fixed);
        let repo = token(nonempty(&self.repo).unwrap_or("unknown"), repo_budget);

        let mut id = format!("{system}-{repo}-{build}");
        if let Some(job) = job {
            id.push('-');
            id.push_str(&job);
        }
        debug_assert!(is_valid_run_id(&id), "derived an invalid run id {id:?}");
        id
    }

    /// Default cancel-older group (`--on-busy cancel-older`): `<repo>#pr-<n>` when a PR is known, else
    /// `<repo>@<branch>`, else `None` (also `None` without a repo).
    pub(crate) fn default_group(&self) -> Option<String> {
        let repo = nonempty(&self.repo)?;
        if let Some(pr) = nonempty(&self.pr) {
            Some(format!("{repo}#pr-{pr}"))
        } else {
            nonempty(&self.branch).map(|branch| format!("{repo}@{branch}"))
        }
    }
}

/// Outside CI: `local-<unix time>-<pid>`.
pub(crate) fn local_run_id(unix_time: u64, pid: u32) -> String {
    format!("local-{unix_time}-{pid}")
}

/// The environment as the detectors read it: every value trimmed, an empty one absent.
pub(crate) struct Vars<'a>(pub(crate) &'a dyn Fn(&str) -> Option<String>);

impl Vars<'_> {
    /// The variable's value, trimmed; empty (or unset, or not UTF-8) is `None`.
    pub(crate) fn get(&self, key: &str) -> Option<String> {
        (self.0)(key)
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    }

    /// Whether the variable is set to `want`, compared case-insensitively (markers such as
    /// `DRONE=true`).
    pub(crate) fn is(&self, key: &str, want: &str) -> bool {
        self.get(key).is_some_and(|x| x.eq_ignore_ascii_case(want))
    }
}

/// A field's value, trimmed; empty counts as absent (a hand-built or deserialized `CiInfo`
/// may hold `Some("")`).
fn nonempty(field: &Option<String>) -> Option<&str> {
    field.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// `<a>.<b>`, a missing half reading `0`; `None` when both are missing.
pub(super) fn dotted(a: Option<String>, b: Option<String>) -> Option<String> {
    if a.is_none() && b.is_none() {
        return None;
    }
    Some(format!(
        "{}.{}",
        a.as_deref().unwrap_or("0"),
        b.as_deref().unwrap_or("0")
    ))
}

/// A PR/MR number as plain decimal digits; anything else (including `0`, or a `false` some
/// systems put there) is no PR.
pub(super) fn pr_number(raw: Option<String>) -> Option<String> {
    let raw = raw?;
    let digits = raw.trim().trim_start_matches(['#', '!']);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match digits.parse::<u64>() {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(n.to_string()),
    }
}

fn is_run_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// The run-id rule of `names::RunId`: `[A-Za-z0-9._-]`, 1–128 chars, not starting with `.`.
pub(super) fn is_valid_run_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= RUN_ID_MAX
        && !id.starts_with('.')
        && id.chars().all(is_run_id_char)
}

/// Replace every character outside the run-id charset by `-`, a run of such characters by a
/// single `-`. The result is ASCII, so its byte length is its character count.
fn sanitize(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut replacing = false;
    for c in raw.chars() {
        if is_run_id_char(c) {
            out.push(c);
            replacing = false;
        } else if !replacing {
            out.push('-');
            replacing = true;
        }
    }
    out
}

/// 32-bit FNV-1a. Part of the run-id format: changing it changes every derived id.
pub(super) fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for &b in bytes {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// `raw` as one part of a run id, at most `max` (>= `HASH_LEN`) characters, never empty: as
/// is when it is already clean and fits; otherwise a readable head (sanitized, cut, with
/// leading/trailing `-` dropped) plus `-<hash of raw>`, or the bare hash if no head fits.
fn token(raw: &str, max: usize) -> String {
    let clean = sanitize(raw);
    if clean == raw && !clean.is_empty() && clean.len() <= max {
        return clean;
    }
    let hash = format!("{:0width$x}", fnv1a32(raw.as_bytes()), width = HASH_LEN);
    let keep = max.saturating_sub(HASH_LEN + 1);
    let head = clean.get(..keep.min(clean.len())).unwrap_or("");
    let head = head.trim_matches('-');
    if head.is_empty() {
        hash
    } else {
        format!("{head}-{hash}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ident::ci_env::testing::{assert_valid, detect, drone, h, info};
    use std::collections::{HashMap, HashSet};

    #[test]
    fn fnv1a_matches_reference_vectors() {
        // Pinned: the hash is part of the run-id format.
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn empty_and_blank_values_are_absent() {
        let ci = detect(&[
            ("DRONE", " true "),
            ("DRONE_REPO", ""),
            ("DRONE_BUILD_NUMBER", "  "),
            ("DRONE_STAGE_NUMBER", ""),
            ("DRONE_STEP_NUMBER", ""),
            ("DRONE_PULL_REQUEST", ""),
            ("DRONE_COMMIT_SHA", ""),
            ("DRONE_BUILD_LINK", "\t"),
            ("DRONE_BRANCH", ""),
        ])
        .expect("drone");
        assert_eq!(ci, info("drone", None, None, None));
        assert_eq!(ci.default_run_id(), "drone-unknown-unknown");
        assert_eq!(ci.default_group(), None);

        // Some("") in a hand-built or deserialized value is absent too.
        let mut odd = info("drone", Some(""), Some(" "), Some(""));
        odd.pr = Some(String::new());
        odd.branch = Some(String::new());
        assert_eq!(odd.default_run_id(), "drone-unknown-unknown");
        assert_eq!(odd.default_group(), None);
    }

    #[test]
    fn values_are_trimmed() {
        let ci = drone(" o/n ", " 12 ", "1", "2");
        assert_eq!(ci.repo.as_deref(), Some("o/n"));
        assert_eq!(ci.build.as_deref(), Some("12"));
    }

    #[test]
    fn missing_build_number_still_gives_a_valid_id() {
        let ci = drone("o/n", "", "1", "2");
        let id = ci.default_run_id();
        assert_eq!(id, format!("drone-o-n-{}-unknown-1.2", h("o/n")));
        assert_valid(&id);
    }

    #[test]
    fn pr_numbers_are_normalised() {
        let pr = |raw: &str| pr_number(Some(raw.to_owned()));
        assert_eq!(pr("42").as_deref(), Some("42"));
        assert_eq!(pr("007").as_deref(), Some("7"));
        assert_eq!(pr("#5").as_deref(), Some("5"));
        assert_eq!(pr("!5").as_deref(), Some("5"));
        assert_eq!(pr("0"), None);
        assert_eq!(pr("false"), None);
        assert_eq!(pr("12a"), None);
        assert_eq!(pr("-3"), None);
        assert_eq!(pr("99999999999999999999999"), None);
        assert_eq!(pr(""), None);
    }

    #[test]
    fn unique_across_stages_steps_and_builds() {
        let mut ids = HashSet::new();
        for build in ["1", "2", "10", "267"] {
            for stage in ["1", "2", "3", "11"] {
                for step in ["1", "2", "3", "11"] {
                    let id = drone("o/n", build, stage, step).default_run_id();
                    assert_valid(&id);
                    assert!(id.contains(build), "{id} lacks build {build}");
                    assert!(ids.insert(id.clone()), "duplicate {id}");
                }
            }
        }
        assert_eq!(ids.len(), 64);
    }

    #[test]
    fn repos_that_look_alike_once_sanitized_get_distinct_ids() {
        let a = drone("a-b/c", "9", "1", "1").default_run_id();
        let b = drone("a/b-c", "9", "1", "1").default_run_id();
        let c = drone("a/b/c", "9", "1", "1").default_run_id();
        let d = drone("a-b-c", "9", "1", "1").default_run_id();
        let set: HashSet<_> = [&a, &b, &c, &d].into_iter().collect();
        assert_eq!(set.len(), 4, "{a} {b} {c} {d}");
        // A clean repo name (no '/') is used as is.
        assert_eq!(d, "drone-a-b-c-9-1.1");
    }

    #[test]
    fn same_build_in_different_systems_differs() {
        let d = info("drone", Some("o/n"), Some("3"), Some("1.1")).default_run_id();
        let w = info("woodpecker", Some("o/n"), Some("3"), Some("1.1")).default_run_id();
        assert_ne!(d, w);
    }

    #[test]
    fn long_repos_are_shortened_keeping_build_and_job() {
        let prefix = "org/".to_owned() + &"very-long-repository-name-".repeat(10);
        let a = drone(&(prefix.clone() + "alpha"), "4242", "3", "7").default_run_id();
        let b = drone(&(prefix.clone() + "beta"), "4242", "3", "7").default_run_id();
        for id in [&a, &b] {
            assert_valid(id);
            assert!(id.len() <= 128);
            assert!(id.starts_with("drone-org-very-long"), "{id}");
            assert!(id.ends_with("-4242-3.7"), "{id}");
        }
        assert_ne!(a, b, "long repos sharing a prefix must not collide");
        assert!(a.contains(&h(&(prefix + "alpha"))));
    }

    #[test]
    fn long_builds_and_jobs_are_capped_but_distinct() {
        let job_a = "j".repeat(200) + "a";
        let job_b = "j".repeat(200) + "b";
        let build = "9".repeat(300);
        let a = info("github", Some("o/r"), Some(&build), Some(&job_a)).default_run_id();
        let b = info("github", Some("o/r"), Some(&build), Some(&job_b)).default_run_id();
        assert_valid(&a);
        assert_valid(&b);
        assert_ne!(a, b);
        // Realistic lengths stay intact.
        let job = "integration-tests-against-postgres-and-redis.12";
        let id = info(
            "github",
            Some(&"x/".repeat(100)),
            Some("12345678901"),
            Some(job),
        )
        .default_run_id();
        assert_valid(&id);
        assert!(id.ends_with(&format!("-12345678901-{job}")), "{id}");
    }

    #[test]
    fn hostile_input_yields_valid_ids() {
        let hostile: Vec<String> = [
            "",
            ".",
            "..",
            ".hidden/repo",
            "../../etc/passwd",
            "/",
            "a b\tc\nd",
            "nul\0byte",
            "ünïcödé/名前",
            "🦀🦀🦀",
            "-leading-dash",
            "trailing/",
        ]
        .into_iter()
        .map(str::to_owned)
        .chain(["x".repeat(5000), "é".repeat(300), "a/".repeat(300)])
        .collect();
        let long_system = "s".repeat(100);
        let systems = ["drone", "", ".", ".evil", "sys/tem", "😀", &long_system];
        for system in systems {
            for repo in &hostile {
                for other in &hostile {
                    let ci = info(system, Some(repo), Some(other), Some(other));
                    assert_valid(&ci.default_run_id());
                    let ci = info(system, Some(repo), None, Some(other));
                    assert_valid(&ci.default_run_id());
                    let ci = info(system, Some(other), Some(repo), None);
                    assert_valid(&ci.default_run_id());
                }
            }
        }
    }

    #[test]
    fn pseudo_random_input_yields_valid_distinct_ids() {
        // A small LCG, so the test needs no crate and is reproducible.
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as u32
        };
        let alphabet: Vec<char> = "aZ09._-/ \\:é名🦀\0\n#@".chars().collect();
        let mut seen = HashMap::new();
        for _ in 0..3000 {
            let len = (next() % 300) as usize;
            let repo: String = (0..len)
                .map(|_| alphabet[(next() as usize) % alphabet.len()])
                .collect();
            let build = (next() % 1000).to_string();
            let job = format!("{}.{}", next() % 5, next() % 5);
            let id = info("woodpecker", Some(&repo), Some(&build), Some(&job)).default_run_id();
            assert_valid(&id);
            assert!(id.ends_with(&format!("-{build}-{job}")), "{id}");
            let key = (repo.trim().to_owned(), build, job);
            if let Some(prev) = seen.insert(id.clone(), key.clone()) {
                assert_eq!(prev, key, "two inputs share run id {id}");
            }
        }
    }

    #[test]
    fn derived_ids_are_deterministic() {
        let a = drone("o/n", "1", "2", "3");
        assert_eq!(a.default_run_id(), a.clone().default_run_id());
        assert_eq!(
            a.default_run_id(),
            drone("o/n", "1", "2", "3").default_run_id()
        );
    }

    #[test]
    fn group_prefers_pr_then_branch() {
        let mut ci = info("drone", Some("o/n"), Some("1"), None);
        assert_eq!(ci.default_group(), None);
        ci.branch = Some("main".into());
        assert_eq!(ci.default_group().as_deref(), Some("o/n@main"));
        ci.pr = Some("9".into());
        assert_eq!(ci.default_group().as_deref(), Some("o/n#pr-9"));
        ci.repo = None;
        assert_eq!(ci.default_group(), None, "no repo, no group");
    }

    #[test]
    fn local_ids() {
        assert_eq!(local_run_id(1_700_000_000, 4242), "local-1700000000-4242");
        assert_valid(&local_run_id(u64::MAX, u32::MAX));
        assert_valid(&local_run_id(0, 0));
    }

    #[test]
    fn serde_round_trip() {
        let ci = drone("o/n", "1", "2", "3");
        let json = serde_json::to_string(&ci).expect("serialize");
        let back: CiInfo = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, ci);
        // Readers tolerate missing optional fields and unknown ones.
        let sparse: CiInfo =
            serde_json::from_str(r#"{"system":"gitlab","future":1}"#).expect("sparse");
        assert_eq!(sparse, info("gitlab", None, None, None));
    }
}
