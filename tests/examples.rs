//! The CI step examples in `ci/examples/` (issue 18): each one parses in its own language, and
//! each runs tether the way the README says — `tether run` with `--app`, `--deadline`,
//! `--teardown` and `--summary-json`, then `--` and the command — with a janitor step beside it,
//! and with the CI system's grace before SIGKILL (where the example sets one) covering tether's
//! `--grace` plus `--teardown-timeout`.
//!
//! YAML files are loaded with yaml-rust2 (tether's own YAML reader); the Jenkinsfile (Groovy) is
//! checked as text; the Buildbot fragment is compiled with `python3 -m py_compile` and then run
//! against a stand-in for `buildbot.plugins` that records its steps. A missing `python3` fails
//! these tests: it is on every machine the tests run on.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use yaml_rust2::{Yaml, YamlLoader};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("ci/examples")
}

fn read(name: &str) -> String {
    let path = examples_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `20s`, `5m`, `1h30m`, `250ms`: the forms the examples use.
fn duration(text: &str) -> Duration {
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let n: u64 = rest[..digits]
            .parse()
            .unwrap_or_else(|_| panic!("not a duration: {text:?}"));
        rest = &rest[digits..];
        let unit = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        total += match &rest[..unit] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            other => panic!("unit {other:?} in {text:?}"),
        };
        rest = &rest[unit..];
    }
    total
}

/// A `tether run` invocation split into its options and its command.
#[derive(Debug)]
struct Invocation {
    options: BTreeMap<String, String>,
    command: Vec<String>,
}

impl Invocation {
    /// How long tether may take between the CI system's SIGTERM and its own exit: `--grace`
    /// (default 10s) for the command's tree, then `--teardown-timeout` (default 5m).
    fn stop_budget(&self) -> Duration {
        let get = |flag: &str, default: &str| {
            duration(self.options.get(flag).map_or(default, String::as_str))
        };
        get("--grace", "10s") + get("--teardown-timeout", "5m")
    }
}

/// Parses the `tether run …` in `words` (shell words, or an argv list): every option before
/// `--` has a value, the README's options are there, and a command follows `--`.
fn parse_run(words: &[String], whence: &str) -> Invocation {
    let start = words
        .windows(2)
        .position(|w| w[0] == "tether" && w[1] == "run")
        .unwrap_or_else(|| panic!("{whence}: no `tether run` in {words:?}"));
    let rest = &words[start + 2..];
    let dashdash = rest
        .iter()
        .position(|w| w == "--")
        .unwrap_or_else(|| panic!("{whence}: no `--` before the command in {words:?}"));
    let (opts, command) = (&rest[..dashdash], &rest[dashdash + 1..]);
    assert!(
        !command.is_empty(),
        "{whence}: nothing after `--` in {words:?}"
    );
    let mut options = BTreeMap::new();
    let mut it = opts.iter();
    while let Some(flag) = it.next() {
        assert!(flag.starts_with("--"), "{whence}: stray word {flag:?}");
        let value = it
            .next()
            .filter(|v| !v.starts_with("--"))
            .unwrap_or_else(|| panic!("{whence}: {flag} has no value"));
        options.insert(flag.clone(), value.clone());
    }
    for flag in ["--app", "--deadline", "--teardown", "--summary-json"] {
        assert!(
            options.contains_key(flag),
            "{whence}: `tether run` without {flag}: {words:?}"
        );
    }
    Invocation {
        options,
        command: command.to_vec(),
    }
}

/// Shell words, near enough for the examples: split on unquoted white space, quotes removed
/// (`'…'` literal, `"…"` with `$` left as is), a backslash quoting the next character (so a
/// line continuation is white space).
fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = text.chars();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.get_or_insert_with(String::new).push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                word.get_or_insert_with(String::new);
            }
            (None, '\\') => match chars.next() {
                Some('\n') | None => {}
                Some(next) => word.get_or_insert_with(String::new).push(next),
            },
            (None, c) if c.is_whitespace() => out.extend(word.take()),
            (None, c) => word.get_or_insert_with(String::new).push(c),
        }
    }
    assert!(quote.is_none(), "unbalanced quote in {text:?}");
    out.extend(word);
    out
}

/// Every string scalar in a YAML document.
fn strings<'a>(doc: &'a Yaml, out: &mut Vec<&'a str>) {
    match doc {
        Yaml::String(s) => out.push(s),
        Yaml::Array(items) => items.iter().for_each(|i| strings(i, out)),
        Yaml::Hash(map) => map.iter().for_each(|(k, v)| {
            strings(k, out);
            strings(v, out);
        }),
        _ => {}
    }
}

/// The first number after `key` in `text` (a setting quoted in an example's comments).
fn number_after(text: &str, key: &str, whence: &str) -> u64 {
    let at = text
        .find(key)
        .unwrap_or_else(|| panic!("{whence}: no {key:?}"));
    let digits: String = text[at + key.len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("{whence}: no number after {key:?}"))
}

#[test]
fn every_yaml_example_loads_and_runs_tether_as_the_readme_says() {
    let mut seen = BTreeSet::new();
    let dir = examples_dir();
    for entry in std::fs::read_dir(&dir).expect("ci/examples") {
        let path = entry.expect("dir entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("UTF-8 name")
            .to_owned();
        if !(name.ends_with(".yml") || name.ends_with(".yaml")) {
            continue;
        }
        let text = read(&name);
        let docs = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(docs.len(), 1, "{name}: one YAML document");
        let mut scalars = Vec::new();
        strings(&docs[0], &mut scalars);
        let runs: Vec<Invocation> = scalars
            .iter()
            .filter(|s| s.contains("tether run"))
            .map(|s| parse_run(&words(s), &name))
            .collect();
        assert_eq!(runs.len(), 1, "{name}: one `tether run` step");
        assert!(
            scalars.iter().any(|s| s.contains("tether janitor --app")),
            "{name}: a janitor step"
        );
        seen.insert(name);
    }
    let expected: BTreeSet<String> = [
        "buildkite.yml",
        "drone.yml",
        "forgejo-actions.yml",
        "github-actions.yml",
        "gitlab-ci.yml",
        "woodpecker.yml",
    ]
    .map(String::from)
    .into();
    assert_eq!(seen, expected, "the YAML examples");
}

#[test]
fn buildkite_example_gives_tether_the_time_to_tear_down() {
    let text = read("buildkite.yml");
    let docs = YamlLoader::load_from_str(&text).expect("buildkite.yml");
    let mut scalars = Vec::new();
    strings(&docs[0], &mut scalars);
    let run = scalars
        .iter()
        .find(|s| s.contains("tether run"))
        .map(|s| parse_run(&words(s), "buildkite.yml"))
        .expect("a tether run step");
    let budget = run.stop_budget();
    for key in ["cancel-grace-period=", "signal-grace-period="] {
        let secs = number_after(&text, key, "buildkite.yml");
        assert!(
            Duration::from_secs(secs) >= budget,
            "{key}{secs} is shorter than tether's {budget:?}"
        );
    }
    assert!(
        number_after(&text, "cancel-grace-period=", "")
            > number_after(&text, "signal-grace-period=", ""),
        "the agent's cancel grace must outlast the signal grace it contains"
    );
}

#[test]
fn jenkinsfile_runs_tether_as_the_readme_says() {
    let text = read("jenkins.Jenkinsfile");
    // The `sh '''…'''` block that runs tether.
    let start = text.find("tether run").expect("a `tether run`");
    let end = start + text[start..].find("'''").expect("the end of the sh block");
    let run = parse_run(&words(&text[start..end]), "jenkins.Jenkinsfile");
    assert_eq!(run.command, ["./ci/deploy-and-test.sh"]);
    assert!(text.contains("tether janitor --app"), "a janitor step");
    let soft_kill = Duration::from_secs(number_after(
        &text,
        "-DSoftKillWaitSeconds=",
        "jenkins.Jenkinsfile",
    ));
    assert!(
        soft_kill >= run.stop_budget(),
        "SoftKillWaitSeconds {soft_kill:?} < tether's {:?}",
        run.stop_budget()
    );
    // Groovy's brackets balance (the shell's `${…}` included).
    for (open, close) in [('{', '}'), ('(', ')'), ('[', ']')] {
        let count = |c: char| text.chars().filter(|&x| x == c).count();
        assert_eq!(count(open), count(close), "{open}{close} unbalanced");
    }
}

/// `python3` with `args`, its stdout; panics (never passes) when python3 cannot be run.
fn python3(args: &[&str], envs: &[(&str, &Path)]) -> String {
    let mut cmd = Command::new("python3");
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("python3 is needed to check ci/examples/buildbot.py: {e}"));
    assert!(
        out.status.success(),
        "python3 {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 from python3")
}

#[test]
fn buildbot_fragment_compiles() {
    let cache = tempfile::tempdir().expect("tempdir");
    let file = examples_dir().join("buildbot.py");
    // The byte code goes to the temp dir, not beside the example.
    python3(
        &["-m", "py_compile", file.to_str().expect("UTF-8 path")],
        &[("PYTHONPYCACHEPREFIX", cache.path())],
    );
}

/// A stand-in for `buildbot.plugins`: records each step's arguments; `util.Interpolate` is
/// kept as its format string, `@util.renderer` leaves the function callable.
const FAKE_BUILDBOT: &str = r#"
class _Interpolate:
    def __init__(self, fmt):
        self.fmt = fmt
    def __repr__(self):
        return "<Interpolate:%s>" % self.fmt

class _Factory:
    steps = []
    def addStep(self, step):
        _Factory.steps.append(step)

class util:
    Interpolate = _Interpolate
    BuildFactory = _Factory
    @staticmethod
    def renderer(fn):
        return fn

class _Step:
    def __init__(self, **kwargs):
        self.kwargs = kwargs

class steps:
    ShellCommand = _Step
"#;

/// Runs the fragment against [`FAKE_BUILDBOT`]; prints its steps as JSON, and the run ids its
/// renderer makes for a few builder names.
const DRIVER: &str = r#"
import json, runpy, sys

class Props:
    def __init__(self, name, number):
        self.p = {"buildername": name, "buildnumber": number}
    def getProperty(self, key):
        return self.p[key]

ns = runpy.run_path(sys.argv[1])
out = {"steps": [], "ids": {}}
for step in ns["factory"].steps:
    kw = step.kwargs
    out["steps"].append({
        "command": [c if isinstance(c, str) else repr(c) for c in kw["command"]],
        "sigtermTime": kw.get("sigtermTime"),
        "usePTY": kw.get("usePTY"),
        "alwaysRun": kw.get("alwaysRun"),
        "env": sorted(kw.get("env", {})),
    })
for name in ["e2e", "e2e tests / main", "a-b", "a b", ".hidden", "  "]:
    out["ids"][name] = ns["tether_run_id"](Props(name, 17))
print(json.dumps(out))
"#;

#[test]
fn buildbot_fragment_runs_tether_with_an_argv_list_and_a_long_enough_sigterm_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pkg = dir.path().join("buildbot");
    std::fs::create_dir(&pkg).expect("mkdir buildbot");
    std::fs::write(pkg.join("__init__.py"), "").expect("__init__.py");
    std::fs::write(pkg.join("plugins.py"), FAKE_BUILDBOT).expect("plugins.py");
    let file = examples_dir().join("buildbot.py");
    let out = python3(
        &["-c", DRIVER, file.to_str().expect("UTF-8 path")],
        &[
            ("PYTHONPATH", dir.path()),
            ("PYTHONPYCACHEPREFIX", dir.path()),
        ],
    );
    let json: serde_json::Value = serde_json::from_str(&out).expect("the driver's JSON");
    let steps = json["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2, "{json:#}");

    let argv = |step: &serde_json::Value| -> Vec<String> {
        step["command"]
            .as_array()
            .expect("an argv list, not a string")
            .iter()
            .map(|w| w.as_str().expect("string").to_owned())
            .collect()
    };
    let run_step = &steps[0];
    let run = parse_run(&argv(run_step), "buildbot.py");
    assert_eq!(run.command, ["./ci/deploy-and-test.sh"]);
    let sigterm = run_step["sigtermTime"].as_u64().expect("sigtermTime");
    assert!(
        Duration::from_secs(sigterm) >= run.stop_budget(),
        "sigtermTime {sigterm} < tether's {:?}",
        run.stop_budget()
    );
    assert_eq!(run_step["usePTY"], false);
    assert_eq!(run_step["env"], serde_json::json!(["TETHER_RUN_ID"]));

    let janitor = &steps[1];
    assert_eq!(argv(janitor)[..3], ["tether", "janitor", "--app"]);
    assert_eq!(janitor["alwaysRun"], true);

    // The run ids: in tether's alphabet, with the build number, distinct for distinct builders.
    let ids = json["ids"].as_object().expect("ids");
    let mut distinct = BTreeSet::new();
    for (name, id) in ids {
        let id = id.as_str().expect("string");
        assert!(
            !id.is_empty()
                && id.len() <= 128
                && !id.starts_with('.')
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                && id.ends_with("-17"),
            "builder {name:?} gives run id {id:?}"
        );
        distinct.insert(id.to_owned());
    }
    assert_eq!(distinct.len(), ids.len(), "{ids:?}");
    assert_eq!(ids["e2e"], "buildbot-e2e-17", "a clean name is kept as is");
}
