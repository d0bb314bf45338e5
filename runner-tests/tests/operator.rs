//! The operator's knobs against the real kernel (CLI-CONTRACT §3, PROTOCOL §12, CLI-CONTRACT §8, CLI-CONTRACT §10; issue 5): host
//! slots, the config file and its errors, precedence, the command's environment, `run_as` and
//! `limits`.
//!
//! Every test drives the real `tether` binary. Concurrency claims are checked by replaying an
//! `O_APPEND` log the commands write themselves (`+slot NN id` when the command starts,
//! `-slot NN id` just before it ends — one `write` per line, so lines never interleave): the
//! command runs strictly inside the time its run holds the slot, so the replay is a faithful
//! picture of who held which slot when. Orderings are never hoped for: holders wait for
//! release markers the test creates (bounded shell loops that give up with status 99), and a
//! waiting run is proven to be waiting by its own `all N slots busy — waiting` lines.
//!
//! Run ids are unique per sandbox: tether names a run's cgroup after the run id, which is
//! host-wide, and tests run in parallel.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use runner_tests::is_root;
use runner_tests::{
    count_lines, flock_holders, log_lines, names, rid, run_dirs, sh_wait_for, shell_quote,
    tether_bin, touch, wait_count, wait_file, wait_line, wait_until, write_config, Finished,
    RunningTether, Sandbox, TempUser, TIMEOUT,
};

// ---------------------------------------------------------------------------------------------
// helpers

/// The `pid` (the core's) of run `id`'s record once its state is `running`.
fn wait_running_pid(sb: &Sandbox, id: &str) -> i32 {
    let mut pid = None;
    wait_until(
        &format!("run.json of {id} in state running"),
        TIMEOUT,
        || {
            pid = sb
                .run_record(id)
                .and_then(|r| (r["state"] == "running").then(|| r["pid"].as_i64())?);
            pid.is_some()
        },
    );
    pid.unwrap_or_default() as i32
}

/// `KEY=VALUE` lines of an `env` dump in `text`, as a map (other lines ignored).
fn env_map(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The script of a slot user: log `+slot $TETHER_SLOT $TETHER_RUN_ID`, wait for `release`,
/// hold a little longer, log `-slot …`. Each `echo >>` is one `write` on an `O_APPEND` fd.
fn slot_script(log: &Path, release: &Path) -> String {
    let log = shell_quote(log);
    format!(
        r#"echo "+slot $TETHER_SLOT $TETHER_RUN_ID" >> {log}; {}; sleep 0.05; echo "-slot $TETHER_SLOT $TETHER_RUN_ID" >> {log}"#,
        sh_wait_for(&shell_quote(release))
    )
}

/// Replays a slot log: panics if a slot ever has two holders, if more than `cap` runs hold
/// slots at once, if a slot number is `>= cap`, or if a run releases a slot it does not hold.
/// Returns the highest concurrency seen.
fn replay_slots(lines: &[String], cap: usize) -> usize {
    let mut held: BTreeMap<String, String> = BTreeMap::new();
    let mut max = 0;
    for (n, line) in lines.iter().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["+slot", slot, id] => {
                let number: usize = slot
                    .parse()
                    .unwrap_or_else(|_| panic!("line {n}: TETHER_SLOT {slot:?} is not a number"));
                assert_eq!(slot.len(), 2, "line {n}: TETHER_SLOT is two digits: {line}");
                assert!(number < cap, "line {n}: slot {slot} >= {cap}\n{lines:#?}");
                if let Some(other) = held.get(*slot) {
                    panic!("line {n}: {id} took slot {slot} held by {other}\n{lines:#?}");
                }
                held.insert(slot.to_string(), id.to_string());
                max = max.max(held.len());
                assert!(
                    held.len() <= cap,
                    "line {n}: {} runs hold slots at once (cap {cap}): {held:?}\n{lines:#?}",
                    held.len()
                );
            }
            ["-slot", slot, id] => {
                assert_eq!(
                    held.remove(*slot).as_deref(),
                    Some(*id),
                    "line {n}: {id} released slot {slot} it did not hold\n{lines:#?}"
                );
            }
            _ => panic!("line {n}: not a slot line: {line:?}\n{lines:#?}"),
        }
    }
    assert!(held.is_empty(), "slots never released: {held:?}");
    max
}

/// Waits until one of `runs` printed a stderr line containing `pattern`; returns its index.
fn wait_any_line(runs: &[RunningTether], pattern: &str) -> usize {
    let mut found = None;
    wait_until(&format!("a run printing {pattern:?}"), TIMEOUT, || {
        found = runs.iter().position(|r| r.stderr().contains(pattern));
        found.is_some()
    });
    found.unwrap_or_default()
}

/// `n` runs of `n` different apps under `--slots cap`: the first `cap` take every slot and wait
/// for a release marker; only once another run is seen waiting for a slot is the marker
/// created. Then the log replay proves the cap and the slot uniqueness held throughout.
fn slots_are_capped_and_unique(n: usize, cap: usize) {
    let sb = Sandbox::new();
    let log = sb.mark("slots.log");
    let release = sb.mark("release");
    let script = slot_script(&log, &release);
    let mut runs: Vec<RunningTether> = (0..n)
        .map(|k| {
            sb.tether_run()
                .app(format!("slot{k}.example.org"))
                .run_id(rid(&sb, &format!("s{k}")))
                .args(["--slots", &cap.to_string()])
                .command(["sh", "-c", &script])
                .spawn()
        })
        .collect();

    wait_count(&log, "+slot ", cap, TIMEOUT);
    let busy = format!("tether: all {cap} slots busy — waiting");
    wait_any_line(&runs, &busy);
    // Every slot is taken and someone is waiting: nobody else may have started.
    assert_eq!(
        count_lines(&log, "+slot "),
        cap,
        "a run started beyond the cap: {:#?}",
        log_lines(&log)
    );
    touch(&release);

    let finished: Vec<Finished> = runs.iter_mut().map(|r| r.wait_exit(TIMEOUT)).collect();
    for f in &finished {
        f.assert_code(0).assert_stderr_contains("result=passed");
    }
    let lines = log_lines(&log);
    assert_eq!(lines.len(), 2 * n, "every run logged twice: {lines:#?}");
    let max = replay_slots(&lines, cap);
    assert_eq!(
        max, cap,
        "the cap was reached while the first holders waited"
    );
    assert!(
        finished.iter().any(|f| f.stderr.contains(&busy)),
        "at least one run said {busy:?}"
    );
    for s in 0..cap as u32 {
        assert!(
            flock_holders(sb.slot_lock_path(s)).is_empty(),
            "slot {s} is free after every run ended"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 1. slots

/// PROTOCOL §12: six runs of six apps under `--slots 2` never run more than two commands at once,
/// never share a slot, and the ones that wait say `all 2 slots busy — waiting`.
#[test]
fn slots_cap_concurrent_runs_across_apps() {
    slots_are_capped_and_unique(6, 2);
}

/// PROTOCOL §12: sixteen concurrent runs under `--slots 4`: slot ids are unique at every moment.
#[test]
fn sixteen_runs_under_four_slots_never_share_a_slot() {
    slots_are_capped_and_unique(16, 4);
}

/// PROTOCOL §12: a slot is freed by the kernel when its holder dies: with the holder's core
/// SIGKILLed, a run waiting for a slot takes that very slot.
#[test]
fn sigkilled_slot_holder_frees_its_slot_for_a_waiter() {
    let sb = Sandbox::new();
    let log = sb.mark("slots.log");
    let never = sb.mark("never");
    let (x, y) = (rid(&sb, "holder"), rid(&sb, "waiter"));
    let logq = shell_quote(&log);
    let hold = format!(
        r#"echo "+slot $TETHER_SLOT $TETHER_RUN_ID" >> {logq}; {}"#,
        sh_wait_for(&shell_quote(&never))
    );
    let mut holder = sb
        .tether_run()
        .app("slot-x.example.org")
        .run_id(&x)
        .args(["--slots", "1"])
        .command(["sh", "-c", &hold])
        .spawn();
    wait_line(&log, &format!("+slot 00 {x}"), TIMEOUT);
    let core = wait_running_pid(&sb, &x);
    assert_eq!(
        flock_holders(sb.slot_lock_path(0)),
        [core],
        "the holder's core holds slot 00"
    );

    let take = format!(r#"echo "+slot $TETHER_SLOT $TETHER_RUN_ID" >> {logq}"#);
    let summary_json = sb.mark("waiter-summary.json");
    let mut waiter = sb
        .tether_run()
        .app("slot-y.example.org")
        .run_id(&y)
        .args(["--slots", "1", "--summary-json"])
        .arg(&summary_json)
        .env("TETHER_WAIT_PROGRESS_INTERVAL", "100ms")
        .command(["sh", "-c", &take])
        .spawn();
    let busy = "tether: the 1 slot is busy — waiting";
    waiter.wait_line(busy, TIMEOUT);
    let first_busy = Instant::now();
    // Two more progress lines: the waiter has spent a measurable time on the slot alone.
    waiter.wait_count(busy, 3, TIMEOUT);
    assert_eq!(count_lines(&log, &y), 0, "the waiter did not start");
    let waited_at_least = first_busy.elapsed();

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(core),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL the holder's core");
    wait_line(&log, &format!("+slot 00 {y}"), TIMEOUT);
    let done = waiter.wait_exit(TIMEOUT);
    done.assert_code(0)
        .assert_stderr_contains("tether: slot 00 of 1 taken after ");
    // The summary counts the slot wait: `lock_wait` is not the app lock's 0ms alone.
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&summary_json).expect("the waiter's summary JSON"),
    )
    .expect("summary JSON parses");
    let slot_wait = summary["slot_wait_ms"].as_u64().expect("slot_wait_ms");
    let lock_wait = summary["lock_wait_ms"].as_u64().expect("lock_wait_ms");
    assert!(
        slot_wait >= waited_at_least.as_millis() as u64,
        "slot_wait_ms {slot_wait} < the {waited_at_least:?} seen waiting\n{done}"
    );
    assert!(
        lock_wait >= slot_wait,
        "lock_wait_ms {lock_wait} leaves out the slot wait {slot_wait}\n{done}"
    );
    assert!(
        done.summary_field("slot_wait").is_some(),
        "the summary line shows slot_wait\n{done}"
    );
    let _ = holder.try_wait_exit(TIMEOUT);
    // Leave nothing of the dead holder behind (run dir, cgroup): the janitor reaps it.
    let janitor = sb.tether_janitor().run();
    janitor.assert_code(0);
    assert!(
        !sb.run_dir(&x).exists(),
        "the dead holder was reaped\n{janitor}"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. lowering N

/// PROTOCOL §12 (slots.rs): lowering N is safe — with slots 00 and 01 held under `--slots 2`, a
/// run under `--slots 1` waits; it keeps waiting after slot 01 frees (it never takes a slot
/// `>= N`) and takes slot 00 once that frees.
#[test]
fn lowering_the_slot_count_never_hands_out_a_slot_above_it() {
    let sb = Sandbox::new();
    let log = sb.mark("slots.log");
    let (release_a, release_b) = (sb.mark("release-a"), sb.mark("release-b"));
    let (a, b, c) = (rid(&sb, "a"), rid(&sb, "b"), rid(&sb, "c"));
    let run = |app: &str, id: &str, slots: &str, script: &str| {
        sb.tether_run()
            .app(app)
            .run_id(id)
            .args(["--slots", slots])
            .env("TETHER_WAIT_PROGRESS_INTERVAL", "100ms")
            .command(["sh", "-c", script])
            .spawn()
    };
    let mut ra = run("low-a.example.org", &a, "2", &slot_script(&log, &release_a));
    wait_line(&log, &format!("+slot 00 {a}"), TIMEOUT);
    let mut rb = run("low-b.example.org", &b, "2", &slot_script(&log, &release_b));
    wait_line(&log, &format!("+slot 01 {b}"), TIMEOUT);

    let logq = shell_quote(&log);
    let take = format!(
        r#"echo "+slot $TETHER_SLOT $TETHER_RUN_ID" >> {logq}; echo "-slot $TETHER_SLOT $TETHER_RUN_ID" >> {logq}"#
    );
    let mut rc = run("low-c.example.org", &c, "1", &take);
    let busy = "tether: the 1 slot is busy — waiting";
    rc.wait_line(busy, TIMEOUT);

    // Slot 01 frees; C must still wait for slot 00.
    touch(&release_b);
    rb.wait_exit(TIMEOUT).assert_code(0);
    assert!(
        flock_holders(sb.slot_lock_path(1)).is_empty(),
        "slot 01 is free"
    );
    let seen = count_lines(&rc.stderr_path, busy);
    // Two more progress lines: at least one whole look at the slots after slot 01 was free.
    rc.wait_count(busy, seen + 2, TIMEOUT);
    assert_eq!(
        count_lines(&log, &c),
        0,
        "C started although only slot 01 was free: {:#?}",
        log_lines(&log)
    );
    assert!(rc.is_running(), "C is still waiting");

    touch(&release_a);
    ra.wait_exit(TIMEOUT).assert_code(0);
    wait_line(&log, &format!("+slot 00 {c}"), TIMEOUT);
    rc.wait_exit(TIMEOUT).assert_code(0);
    replay_slots(&log_lines(&log), 2);
    assert_eq!(count_lines(&log, &format!("+slot 01 {c}")), 0);
}

// ---------------------------------------------------------------------------------------------
// 3. environment

/// CLI-CONTRACT §8, CLI-CONTRACT: with `env.allow`, the command sees only allowed names (KEEP_ME,
/// not SECRET_TOKEN) plus `env.set` and `run_env`, while the teardown (tether's side) sees the
/// full environment; `run_env: {ABRA_DIR: "{run_dir}/abra"}` gives two concurrent runs distinct
/// dirs under their own run dirs, existing while the command runs.
#[test]
fn env_allow_list_set_and_run_env_shape_the_commands_environment() {
    let sb = Sandbox::new();
    let cfg = write_config(
        &sb,
        "env.yml",
        "env:\n  allow: [PATH, \"KEEP_*\"]\n  set:\n    SET_ME: from-config\nrun_env:\n  ABRA_DIR: \"{run_dir}/abra\"\n",
    );
    let td_log = sb.mark("td.log");
    let teardown = format!(
        r#"echo "td $TETHER_RUN_ID SECRET_TOKEN=${{SECRET_TOKEN-unset}} KEEP_ME=${{KEEP_ME-unset}}" >> {}"#,
        shell_quote(&td_log)
    );
    let (ida, idb) = (rid(&sb, "env-a"), rid(&sb, "env-b"));
    let (mark_a, mark_b) = (sb.mark("a.started"), sb.mark("b.started"));
    let script = |mine: &Path, other: &Path| {
        format!(
            r#"env; if [ -d "$ABRA_DIR" ]; then echo "ABRA_EXISTS=yes"; fi; touch {}; {}"#,
            shell_quote(mine),
            sh_wait_for(&shell_quote(other))
        )
    };
    let spawn = |app: &str, id: &str, script: &str| {
        sb.tether_run()
            .app(app)
            .run_id(id)
            .teardown(&teardown)
            .arg("--config")
            .arg(&cfg)
            .env("KEEP_ME", "kept")
            .env("SECRET_TOKEN", "s3cret")
            .command(["sh", "-c", script])
            .spawn()
    };
    let mut ra = spawn("env-a.example.org", &ida, &script(&mark_a, &mark_b));
    let mut rb = spawn("env-b.example.org", &idb, &script(&mark_b, &mark_a));
    let fa = ra.wait_exit(TIMEOUT);
    let fb = rb.wait_exit(TIMEOUT);

    let mut abra_dirs = Vec::new();
    for (id, f) in [(&ida, &fa), (&idb, &fb)] {
        f.assert_code(0);
        let env = env_map(&f.stdout);
        assert_eq!(env.get("KEEP_ME").map(String::as_str), Some("kept"), "{f}");
        assert!(
            !env.contains_key("SECRET_TOKEN"),
            "SECRET_TOKEN leaked\n{f}"
        );
        assert!(
            !f.stdout.contains("s3cret"),
            "the secret's value leaked\n{f}"
        );
        assert_eq!(
            env.get("SET_ME").map(String::as_str),
            Some("from-config"),
            "{f}"
        );
        let run_dir = sb.run_dir(id);
        let abra = run_dir.join("abra");
        assert_eq!(
            env.get("ABRA_DIR").map(PathBuf::from),
            Some(abra.clone()),
            "{f}"
        );
        assert_eq!(
            env.get("ABRA_EXISTS").map(String::as_str),
            Some("yes"),
            "ABRA_DIR existed while the command ran\n{f}"
        );
        assert_eq!(
            env.get("TETHER_RUN_DIR").map(PathBuf::from),
            Some(run_dir),
            "{f}"
        );
        abra_dirs.push(abra);
        assert_eq!(
            count_lines(
                &td_log,
                &format!("td {id} SECRET_TOKEN=s3cret KEEP_ME=kept")
            ),
            1,
            "the teardown sees the full environment: {:#?}",
            log_lines(&td_log)
        );
    }
    assert_ne!(abra_dirs[0], abra_dirs[1], "each run has its own ABRA_DIR");
}

/// CLI-CONTRACT §8, CLI-CONTRACT §14: the report token's variable (`report.comment.token_env`) never reaches the
/// command, even without `env.allow` (everything else passes); the teardown still sees it.
#[test]
fn report_token_is_hidden_from_the_command_without_an_allow_list() {
    let sb = Sandbox::new();
    let cfg = write_config(
        &sb,
        "report.yml",
        "report:\n  comment:\n    api: gitea\n    url: \"http://127.0.0.1:9\"\n    token_env: FORGE_TOKEN\n",
    );
    let td_log = sb.mark("td.log");
    let f = sb
        .tether_run()
        .app("token.example.org")
        .run_id(rid(&sb, "token"))
        .teardown(format!(
            r#"echo "td FORGE_TOKEN=${{FORGE_TOKEN-unset}}" >> {}"#,
            shell_quote(&td_log)
        ))
        .arg("--config")
        .arg(&cfg)
        .env("FORGE_TOKEN", "tok-123")
        .env("OTHER_VISIBLE", "yes")
        .command(["env"])
        .run();
    f.assert_code(0);
    let env = env_map(&f.stdout);
    assert!(!env.contains_key("FORGE_TOKEN"), "token leaked\n{f}");
    assert!(!f.stdout.contains("tok-123"), "token value leaked\n{f}");
    assert_eq!(env.get("OTHER_VISIBLE").map(String::as_str), Some("yes"));
    assert_eq!(
        log_lines(&td_log),
        ["td FORGE_TOKEN=tok-123"],
        "the teardown is tether's side"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. run_as

/// CLI-CONTRACT §10, CLI-CONTRACT: `run_as: {user, group}` runs the command as that user and group
/// (its `id -u` / `id -g`), the teardown as the invoker (uid 0), and the command can write its
/// `$TMPDIR` and its `run_env` dir under the run dir.
#[test]
fn run_as_drops_the_command_but_not_the_teardown() {
    if !is_root() {
        eprintln!("SKIPPED (needs root): run_as_drops_the_command_but_not_the_teardown");
        return;
    }
    // Created before the sandbox, so it is removed after the sandbox killed its processes.
    let user = TempUser::create();
    let sb = Sandbox::new();
    let uid = user.uid;
    // The user must be able to traverse from / to its tmp/ (tether makes the runs dir and the
    // run dir 0711; the sandbox root is the test's and is 0700 by default).
    fs::set_permissions(sb.path(), fs::Permissions::from_mode(0o711)).expect("chmod sandbox");
    let group = nix::unistd::Group::from_name("nogroup")
        .ok()
        .flatten()
        .or_else(|| nix::unistd::Group::from_name("daemon").ok().flatten())
        .expect("a nogroup or daemon group");
    let cfg = write_config(
        &sb,
        "run-as.yml",
        &format!(
            "run_as:\n  user: {}\n  group: {}\nrun_env:\n  ABRA_DIR: \"{{run_dir}}/abra\"\n",
            user.name, group.name
        ),
    );
    let td_log = sb.mark("td.log");
    let f = sb
        .tether_run()
        .app("run-as.example.org")
        .run_id(rid(&sb, "run-as"))
        .teardown(format!(r#"echo "td-uid=$(id -u)" >> {}"#, shell_quote(&td_log)))
        .arg("--config")
        .arg(&cfg)
        .command([
            "sh",
            "-c",
            r#"echo "uid=$(id -u)"; echo "gid=$(id -g)"; echo probe > "$TMPDIR/probe" && echo "tmp=writable"; echo probe > "$ABRA_DIR/probe" && echo "abra=writable""#,
        ])
        .run();
    f.assert_code(0);
    let env = env_map(&f.stdout);
    assert_eq!(
        env.get("uid").map(String::as_str),
        Some(uid.to_string().as_str()),
        "the command runs as {} (uid {uid})\n{f}",
        user.name
    );
    assert_eq!(
        env.get("gid").map(String::as_str),
        Some(group.gid.to_string().as_str()),
        "the command runs with group {}\n{f}",
        group.name
    );
    assert_eq!(
        env.get("tmp").map(String::as_str),
        Some("writable"),
        "$TMPDIR is writable by the command\n{f}"
    );
    assert_eq!(
        env.get("abra").map(String::as_str),
        Some("writable"),
        "the run_env dir is writable by the command\n{f}"
    );
    assert_eq!(
        log_lines(&td_log),
        ["td-uid=0"],
        "the teardown runs as root"
    );
}

/// CLI-CONTRACT §19: an unknown `run_as` user is refused with exit 125 naming it, before anything is
/// created: no run dir, no lockfile, no command.
#[test]
fn run_as_unknown_user_is_refused_and_leaves_nothing() {
    if !is_root() {
        eprintln!("SKIPPED (needs root): run_as_unknown_user_is_refused_and_leaves_nothing");
        return;
    }
    let sb = Sandbox::new();
    let ghost = format!("tether-nosuch-{}", rid(&sb, "u").to_lowercase());
    let ghost: String = ghost.chars().take(32).collect();
    let cfg = write_config(&sb, "ghost.yml", &format!("run_as:\n  user: {ghost}\n"));
    let marker = sb.mark("ran");
    let f = sb
        .tether_run()
        .app("ghost.example.org")
        .run_id(rid(&sb, "ghost"))
        .arg("--config")
        .arg(&cfg)
        .command(["touch", marker.to_str().unwrap()])
        .run();
    f.assert_code(125).assert_stderr_contains(&ghost);
    assert!(!marker.exists(), "the command ran\n{f}");
    assert!(
        run_dirs(&sb.runs_dir()).is_empty(),
        "a run dir was left\n{f}"
    );
    assert!(names(&sb.lock_dir()).is_empty(), "a lockfile was left\n{f}");
}

// ---------------------------------------------------------------------------------------------
// 5. config errors

/// CLI-CONTRACT §10, CLI-CONTRACT §19: each config error exits 125 with one message naming file, line and key
/// (snapshot), runs nothing and leaves nothing behind; `tether config check` agrees.
#[test]
fn config_errors_name_file_line_and_key_and_leave_nothing() {
    let sb = Sandbox::new();
    // A lock dir named by a bad file must not be created either.
    let never = sb.path().join("never-created");
    let cases: &[(&str, &str, &str, String)] = &[
        (
            "unknown key",
            r#""teardwon""#,
            "bad-typo.yml",
            format!(
                "lock_dir: {}\ndeadline: 10m\nteardwon: ./undeploy.sh\n",
                never.display()
            ),
        ),
        (
            "unknown nested key",
            r#""alow""#,
            "bad-nested.yml",
            "env:\n  alow: [PATH]\n".into(),
        ),
        (
            "wrong type",
            r#""slots""#,
            "bad-type.yml",
            "deadline: 10m\nslots: many\n".into(),
        ),
        (
            "wrong shape",
            r#""allow""#,
            "bad-shape.yml",
            "env:\n  allow: PATH\n".into(),
        ),
        (
            "bad duration",
            r#""deadline""#,
            "bad-duration.yml",
            "grace: 10s\ndeadline: 10x\n".into(),
        ),
        (
            "unknown template variable",
            r#""CACHE""#,
            "bad-template.yml",
            "run_env:\n  ABRA_DIR: \"{run_dir}/abra\"\n  CACHE: \"{rundir}/cache\"\n".into(),
        ),
        (
            "invalid YAML",
            r#"invalid YAML"#,
            "bad-yaml.yml",
            "deadline: 10m\nenv: {allow: [PATH}\n".into(),
        ),
        (
            // The parser itself blames line 1 (the scalar `10m` runs on); the tab is on 2.
            "a tab",
            "bad-tab.yml:2: invalid YAML: a tab at column 1",
            "bad-tab.yml",
            "deadline: 10m\n\tgrace: 5s\n".into(),
        ),
    ];
    let marker = sb.mark("ran");
    let mut report = String::new();
    for (what, key, file, text) in cases {
        write_config(&sb, file, text);
        // Relative path, run from the sandbox root: messages carry no temp path.
        let f = sb
            .tether_run()
            .app("config.example.org")
            .run_id(rid(&sb, "cfg"))
            .args(["--config", file])
            .command(["touch", marker.to_str().unwrap()])
            .run();
        f.assert_code(125);
        let errors = f.stderr_lines("tether: error: ");
        assert_eq!(errors.len(), 1, "{what}: one error line\n{f}");
        assert!(
            errors[0].starts_with(&format!("tether: error: config {file}:")),
            "{what}: the message names the file and line\n{f}"
        );
        let line_no = errors[0]
            .trim_start_matches(&format!("tether: error: config {file}:"))
            .split(':')
            .next()
            .and_then(|n| n.parse::<usize>().ok());
        assert!(
            line_no.is_some_and(|n| n >= 1),
            "{what}: a line number\n{f}"
        );
        assert!(
            errors[0].contains(key),
            "{what}: the message names {key}\n{f}"
        );
        assert!(!marker.exists(), "{what}: the command ran\n{f}");

        let check = config_check(&sb, file);
        check.assert_code(125);
        assert_eq!(
            check.stderr_lines("tether: error: "),
            errors,
            "{what}: `config check` reports the same error\n{check}"
        );
        report.push_str(&format!("== {what} ({file}) ==\n{}", f.stderr));
    }
    insta::assert_snapshot!("config_errors", report);

    assert!(run_dirs(&sb.runs_dir()).is_empty(), "no run dir was left");
    assert!(names(&sb.lock_dir()).is_empty(), "no lockfile was left");
    assert!(!never.exists(), "the bad file's lock_dir was not created");

    write_config(
        &sb,
        "good.yml",
        "deadline: 45m\nslots: 2\nenv:\n  allow: [PATH]\nrun_env:\n  ABRA_DIR: \"{run_dir}/abra\"\n",
    );
    let good = config_check(&sb, "good.yml");
    good.assert_code(0);
    assert_eq!(good.stdout.trim(), "config good.yml: ok", "{good}");
}

/// Issue 18: a config file that is not UTF-8 is named with its line and byte offset; one that
/// is not a regular file (a FIFO nobody writes to) is refused at once instead of hanging.
#[test]
fn config_not_utf8_or_not_a_file_is_named_and_never_hangs() {
    let sb = Sandbox::new();
    let latin1 = sb.path().join("latin1.yml");
    fs::write(&latin1, b"deadline: 10m\nteardown: \"caf\xe9\"\n").expect("write latin1.yml");
    let fifo = sb.path().join("fifo.yml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    for (file, says) in [
        (
            "latin1.yml",
            "config latin1.yml:2: not UTF-8: byte 0xe9 at offset 28 (save the file as UTF-8)",
        ),
        (
            "fifo.yml",
            "config fifo.yml: cannot read: not a regular file",
        ),
    ] {
        let check = config_check(&sb, file);
        check.assert_code(125);
        assert_eq!(
            check.stderr_lines("tether: error: "),
            [format!("tether: error: {says}")],
            "{check}"
        );
    }
}

/// `tether config check FILE`, run from the sandbox root (a relative FILE names no temp path).
/// Bounded: a config read that blocked would fail the test, not hang it.
fn config_check(sb: &Sandbox, file: &str) -> Finished {
    sb.tether("config")
        .no_sandbox_dirs()
        .args(["check", file])
        .timeout(Duration::from_secs(20))
        .run()
}

// ---------------------------------------------------------------------------------------------
// 6. precedence

/// CLI-CONTRACT §3: flag > file > default for `deadline`: `--deadline 30s` beats the file's `1s` (a
/// 2 s command passes); the file's `1s` alone beats the default 60m (exit 142).
#[test]
fn deadline_flag_beats_file_and_file_beats_default() {
    let sb = Sandbox::new();
    let cfg = write_config(&sb, "deadline.yml", "deadline: 1s\n");
    let f = sb
        .tether_run()
        .app("prec-flag.example.org")
        .run_id(rid(&sb, "flag"))
        .arg("--config")
        .arg(&cfg)
        .args(["--deadline", "30s"])
        .command(["sleep", "2"])
        .run();
    f.assert_code(0).assert_stderr_contains("result=passed");

    let f = sb
        .tether_run()
        .app("prec-file.example.org")
        .run_id(rid(&sb, "file"))
        .arg("--config")
        .arg(&cfg)
        .command(["sleep", "5"])
        .run();
    f.assert_code(142)
        .assert_stderr_contains("tether: deadline 1s reached — tearing down")
        .assert_stderr_contains("result=deadline");
}

/// CLI-CONTRACT §3: `TETHER_LOCK_DIR` beats the file's `lock_dir`, `--lock-dir` beats
/// `TETHER_LOCK_DIR`, and the file beats the default: the lockfile appears in the winner's dir.
#[test]
fn lock_dir_flag_beats_env_beats_file() {
    let sb = Sandbox::new();
    let (cfg_dir, env_dir, flag_dir) = (
        sb.path().join("cfg-locks"),
        sb.path().join("env-locks"),
        sb.path().join("flag-locks"),
    );
    let cfg = write_config(
        &sb,
        "dirs.yml",
        &format!("lock_dir: {}\n", cfg_dir.display()),
    );
    let run = |app: &str, id: &str| {
        sb.tether_run()
            .no_sandbox_dirs()
            .app(app)
            .run_id(rid(&sb, id))
            .arg("--runs-dir")
            .arg(sb.runs_dir())
            .arg("--config")
            .arg(&cfg)
            .command(["true"])
    };

    let f = run("by-env.example.org", "env")
        .env("TETHER_LOCK_DIR", &env_dir)
        .run();
    f.assert_code(0);
    assert_eq!(names(&env_dir), ["app-by-env.example.org.lock"], "{f}");
    assert!(!cfg_dir.exists(), "the file's lock_dir was not used\n{f}");

    let f = run("by-flag.example.org", "flag")
        .env("TETHER_LOCK_DIR", &env_dir)
        .arg("--lock-dir")
        .arg(&flag_dir)
        .run();
    f.assert_code(0);
    assert_eq!(names(&flag_dir), ["app-by-flag.example.org.lock"], "{f}");
    assert_eq!(
        names(&env_dir),
        ["app-by-env.example.org.lock"],
        "the env's lock dir was not used\n{f}"
    );

    let f = run("by-file.example.org", "file").run();
    f.assert_code(0);
    assert_eq!(names(&cfg_dir), ["app-by-file.example.org.lock"], "{f}");
}

/// `tether config show --config F` names the file as the source of a key it sets, the
/// environment for `TETHER_LOCK_DIR`, and `default` for the rest.
#[test]
fn config_show_names_the_source_of_each_value() {
    let sb = Sandbox::new();
    let cfg = write_config(&sb, "show.yml", "deadline: 1s\nslots: 3\n");
    let env_dir = sb.path().join("env-locks");
    let f = sb
        .tether("config")
        .no_sandbox_dirs()
        .arg("show")
        .arg("--config")
        .arg(&cfg)
        .env("TETHER_LOCK_DIR", &env_dir)
        .run();
    f.assert_code(0);
    let line = |key: &str| {
        f.stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(key))
            .unwrap_or_else(|| panic!("no {key} line\n{f}"))
            .to_owned()
    };
    let from_file = format!("(file {})", cfg.display());
    let deadline = line("deadline");
    assert!(
        deadline.contains(" 1s ") && deadline.ends_with(&from_file),
        "{deadline:?}\n{f}"
    );
    assert!(line("slots").ends_with(&from_file), "{f}");
    assert!(line("grace").ends_with("(default)"), "{f}");
    assert!(line("teardown").ends_with("(default)"), "{f}");
    let lock_dir = line("lock_dir");
    assert!(
        lock_dir.contains(env_dir.to_str().unwrap()) && lock_dir.ends_with("(env TETHER_LOCK_DIR)"),
        "{lock_dir:?}\n{f}"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. limits

/// CLI-CONTRACT `limits`: `nofile: 64` is the command's `ulimit -n`.
#[test]
fn limits_nofile_is_the_commands_rlimit() {
    let sb = Sandbox::new();
    let cfg = write_config(&sb, "nofile.yml", "limits:\n  nofile: 64\n");
    let f = sb
        .tether_run()
        .app("nofile.example.org")
        .run_id(rid(&sb, "nofile"))
        .arg("--config")
        .arg(&cfg)
        .command(["sh", "-c", "echo \"nofile=$(ulimit -n)\""])
        .run();
    f.assert_code(0);
    assert_eq!(
        env_map(&f.stdout).get("nofile").map(String::as_str),
        Some("64"),
        "{f}"
    );
}

/// CLI-CONTRACT `limits`: `memory: 64M` is either applied (`memory.max` of the run's cgroup is
/// 64 MiB while the command runs) or reported by exactly one warning line — never silently
/// dropped.
#[test]
fn limits_memory_is_applied_or_warned_about_once() {
    let sb = Sandbox::new();
    let cfg = write_config(&sb, "memory.yml", "limits:\n  memory: 64M\n");
    let (started, release) = (sb.mark("started"), sb.mark("release"));
    let id = rid(&sb, "memory");
    let mut run = sb
        .tether_run()
        .app("memory.example.org")
        .run_id(&id)
        .arg("--config")
        .arg(&cfg)
        .command([
            "sh",
            "-c",
            &format!(
                "touch {}; {}",
                shell_quote(&started),
                sh_wait_for(&shell_quote(&release))
            ),
        ])
        .spawn();
    wait_file(&started, TIMEOUT);
    let record = sb.run_record(&id).expect("run.json while the command runs");
    let memory_max = record["cgroup"]
        .as_str()
        .and_then(|cg| fs::read_to_string(Path::new(cg).join("memory.max")).ok())
        .map(|s| s.trim().to_owned());
    touch(&release);
    let f = run.wait_exit(TIMEOUT);
    f.assert_code(0);
    let applied = memory_max.as_deref() == Some("67108864");
    let warnings = f.stderr_lines("limits.memory not applied: ");
    if applied {
        assert!(warnings.is_empty(), "applied, yet warned\n{f}");
    } else {
        assert_eq!(
            warnings.len(),
            1,
            "not applied (memory.max {memory_max:?}): exactly one warning line\n{f}"
        );
        assert!(
            warnings[0].starts_with("tether: warning: limits.memory not applied: "),
            "{f}"
        );
    }
}

/// Issue 5: `run_as` needs tether to run as root; a non-root tether refuses it (125) with a
/// message saying so, before anything is created or started. Dropped to `nobody` with
/// setpriv(1); the config and dirs live in a world-traversable temp dir so the refusal cannot
/// come from an unreadable file instead.
#[test]
fn run_as_under_a_non_root_tether_is_refused() {
    if !is_root() {
        eprintln!(
            "SKIPPED (needs root to drop to nobody): run_as_under_a_non_root_tether_is_refused"
        );
        return;
    }
    let Ok(setpriv) = which("setpriv") else {
        eprintln!(
            "SKIPPED (no setpriv(1) on this machine): run_as_under_a_non_root_tether_is_refused"
        );
        return;
    };
    let dir = tempfile::Builder::new()
        .prefix("tether-nonroot-")
        .tempdir_in("/tmp")
        .expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
        .expect("chmod temp dir");
    let cfg = dir.path().join("c.yml");
    std::fs::write(&cfg, "run_as: {user: root}\n").expect("config");
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let marker = dir.path().join("ran");
    let out = std::process::Command::new(setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(tether_bin())
        .arg("run")
        .arg("--config")
        .arg(&cfg)
        .arg("--lock-dir")
        .arg(dir.path().join("locks"))
        .arg("--runs-dir")
        .arg(dir.path().join("runs"))
        .args(["--app", "nonroot.example.org", "--", "touch"])
        .arg(&marker)
        .env_remove("TETHER_APP")
        .env_remove("TETHER_RUN_ID")
        .output()
        .expect("running setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("run_as user \"root\" needs tether to run as root"),
        "{stderr}"
    );
    assert!(!marker.exists(), "the command ran");
    assert!(!dir.path().join("locks").exists(), "a lock dir was created");
    assert!(!dir.path().join("runs").exists(), "a runs dir was created");

    // Issue 18: `config check` by the same non-root user says so ahead of time, as a warning
    // (the file itself is fine; it is this user that cannot use it).
    let out = std::process::Command::new(which("setpriv").expect("setpriv"))
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(tether_bin())
        .args(["config", "check"])
        .arg(&cfg)
        .output()
        .expect("running setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [format!(
            "tether: warning: config {}: run_as user \"root\" needs tether to run as root (it runs as uid 65534)",
            cfg.display()
        )],
    );
}

/// Issue 18: `config check` validates `run_as` as far as it can without running: a user or
/// group that does not exist on this host is the error `tether run` would give (125).
#[test]
fn config_check_refuses_a_run_as_user_or_group_that_does_not_exist() {
    let sb = Sandbox::new();
    for (file, text, culprit) in [
        (
            "no-user.yml",
            "run_as: {user: tether-no-such-user}\n",
            "run_as user \"tether-no-such-user\" does not exist",
        ),
        (
            "no-group.yml",
            "run_as: {user: root, group: tether-no-such-group}\n",
            "run_as group \"tether-no-such-group\" does not exist",
        ),
    ] {
        write_config(&sb, file, text);
        let check = config_check(&sb, file);
        check.assert_code(125);
        assert_eq!(
            check.stderr_lines("tether: "),
            [format!("tether: error: config {file}: {culprit}")],
            "{check}"
        );
    }
    write_config(&sb, "ok.yml", "run_as: {user: root}\n");
    let check = config_check(&sb, "ok.yml");
    check.assert_code(0);
    if is_root() {
        assert_eq!(check.stderr, "", "root may use run_as: no warning\n{check}");
    }
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}
