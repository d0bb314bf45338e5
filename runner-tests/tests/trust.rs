//! Root-safe state handling (issue 13, PROTOCOL.md "Trust model"), tested the way a hostile
//! local user attacks it: a throw-away user (made with `useradd`, removed after) plants files,
//! squats names and races root's file system work in a loop, while the real `tether` runs as
//! root. Every test here failed against the code before the fix (see TESTPLAN.md).
//!
//! All of it needs root (to make users, to switch to them, to own cgroups); without root each
//! test says `SKIPPED (needs root)` and passes, visibly.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use runner_tests::{
    helper_bin, is_root, log_lines, rid, shell_quote, start_lock_holder, touch, wait_file,
    write_config, KillOnDrop, Sandbox, TempUser, TIMEOUT,
};
use serde_json::json;

fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!("SKIPPED (needs root): {test}");
    true
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {:o} {}: {e}", mode, path.display()));
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .mode()
        & 0o7777
}

/// A run record as a dead run of `app` would leave it, with `teardown` to run.
fn planted_record(id: &str, app: &str, run_dir: &Path, teardown: &str) -> String {
    json!({
        "version": 1, "app": app, "run_id": id, "pid": 999_999, "pid_start": 1,
        "host": "h", "started_at": 1, "state": "running",
        "run_dir": run_dir.display().to_string(), "cgroup": null, "ci": null,
        "token": format!("{id}.999999.1"),
        "command": ["true"], "teardown": teardown,
    })
    .to_string()
}

/// The cgroup2 mount of this host, if any.
fn cgroup2_mount() -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if !post.starts_with("cgroup2 ") {
            return None;
        }
        pre.split_whitespace().nth(4).map(PathBuf::from)
    })
}

// ---------------------------------------------------------------------------------------------
// 1. planted run records

/// Finding 1: a user plants `<runs>/evil/{run.lock,run.json}` with `"state":"running"` and a
/// teardown of their choosing in a world-writable sticky runs dir. Root's janitor and root's
/// next run of that app refuse the runs dir (125, naming it) and never run it.
#[test]
fn planted_run_record_in_a_sticky_runs_dir_is_never_executed() {
    if skip_unless_root("planted_run_record_in_a_sticky_runs_dir_is_never_executed") {
        return;
    }
    let evil = TempUser::create();
    let app = "victim.example.org";

    // A sticky, world-writable runs dir: the user plants their run dir themselves.
    let sb = Sandbox::new();
    chmod(sb.path(), 0o711);
    let runs = sb.runs_dir();
    chmod(&runs, 0o1777);
    let pwned = sb.path().join("pwned");
    let teardown = format!("id > {}", shell_quote(&pwned));
    let record = planted_record("evil", app, &runs.join("evil"), &teardown);
    let plant = format!(
        "mkdir {d} && : > {d}/run.lock && printf '%s' {r} > {d}/run.json",
        d = shell_quote(runs.join("evil")),
        r = shell_quote(&record)
    );
    let status = evil.command("sh").args(["-c", &plant]).status().unwrap();
    assert!(status.success(), "the user could not plant its run dir");
    let f = sb.tether_janitor().run();
    f.assert_code(125)
        .assert_stderr_contains(runs.to_str().unwrap());
    let f = sb.tether_run().app(app).command(["true"]).run();
    f.assert_code(125)
        .assert_stderr_contains(runs.to_str().unwrap());
    assert!(!pwned.exists(), "root ran the planted teardown");
}

/// Finding 1, in depth: in a safe runs dir, a run dir (or only a record) owned by another uid
/// is never executed by a run's reconcile or the janitor: a foreign dir is skipped untouched,
/// a foreign record in tether's dir is named as refused.
#[test]
fn foreign_run_dir_or_record_is_never_executed() {
    if skip_unless_root("foreign_run_dir_or_record_is_never_executed") {
        return;
    }
    let evil = TempUser::create();
    let app = "victim.example.org";
    for what in ["dir", "record"] {
        let sb = Sandbox::new();
        let runs = sb.runs_dir();
        let dir = runs.join("evil");
        let pwned = sb.path().join("pwned");
        let teardown = format!("id > {}", shell_quote(&pwned));
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("run.lock"), "").unwrap();
        fs::write(
            dir.join("run.json"),
            planted_record("evil", app, &dir, &teardown),
        )
        .unwrap();
        chown(&dir.join("run.json"), evil.uid, evil.gid);
        if what == "dir" {
            chown(&dir, evil.uid, evil.gid);
        }
        // The run first: its reconcile must not take the record for one of its app's.
        let f = sb
            .tether_run()
            .app(app)
            .run_id(rid(&sb, "r"))
            .command(["true"])
            .run();
        f.assert_code(0);
        assert!(
            !pwned.exists(),
            "root's run ran a teardown from a {what} owned by uid {}",
            evil.uid
        );
        let f = sb.tether_janitor().run();
        f.assert_code(0);
        assert!(
            !pwned.exists(),
            "root's janitor ran a teardown from a {what} owned by uid {}",
            evil.uid
        );
        if what == "dir" {
            // Not tether's dir: never acted on.
            f.assert_stderr_contains("not touched");
            assert!(
                dir.join("run.json").exists(),
                "the foreign dir was touched\n{f}"
            );
        } else {
            // tether's dir with a record tether did not write: an unknown dead run, whose
            // record is named as refused and never executed.
            f.assert_stderr_contains(&format!("owned by uid {}", evil.uid));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. planted lock metadata

/// Finding 2: a world-writable sticky lock dir (`lock_dir: /run/lock`) is refused outright by
/// run and janitor (125, naming it), so a user cannot plant lock metadata.
#[test]
fn sticky_world_writable_lock_dir_is_refused() {
    if skip_unless_root("sticky_world_writable_lock_dir_is_refused") {
        return;
    }
    let evil = TempUser::create();
    let app = "victim.example.org";
    let sb = Sandbox::new();
    chmod(sb.path(), 0o711);
    chmod(&sb.lock_dir(), 0o1777);
    let planted = sb.lock_path(app);
    let status = evil
        .command("sh")
        .args(["-c", &format!("echo '{{}}' > {}", shell_quote(&planted))])
        .status()
        .unwrap();
    assert!(status.success());
    sb.tether_janitor()
        .run()
        .assert_code(125)
        .assert_stderr_contains(sb.lock_dir().to_str().unwrap());
    sb.tether_run()
        .app(app)
        .command(["true"])
        .run()
        .assert_code(125)
        .assert_stderr_contains(sb.lock_dir().to_str().unwrap());
}

/// Finding 2, in depth: a dead run's recorded `cgroup` is killed only when it is that run's own
/// tether cgroup. A victim process in a cgroup named after the run but outside tether's cgroup
/// dir survives the janitor, which says it ignores the cgroup.
#[test]
fn recorded_cgroup_outside_tethers_is_not_killed() {
    if skip_unless_root("recorded_cgroup_outside_tethers_is_not_killed") {
        return;
    }
    let Some(mount) = cgroup2_mount() else {
        eprintln!("SKIPPED (no cgroup2 mount): recorded_cgroup_outside_tethers_is_not_killed");
        return;
    };
    let app = "victim.example.org";
    let sb = Sandbox::new();
    let id = rid(&sb, "ghost");
    let victim_parent = mount.join(format!("tvictim-{}", runner_tests::suffix(&sb)));
    let victim_cg = victim_parent.join(format!("{id}.999999.1"));
    if let Err(e) = fs::create_dir_all(&victim_cg) {
        eprintln!("SKIPPED (cannot create a cgroup under {}: {e}): recorded_cgroup_outside_tethers_is_not_killed", mount.display());
        return;
    }
    let mut sleeper = Command::new("sleep").arg("1000").spawn().unwrap();
    fs::write(victim_cg.join("cgroup.procs"), sleeper.id().to_string()).unwrap();
    let meta = json!({
        "version": 1, "app": app, "run_id": id, "pid": 999_999, "pid_start": 1,
        "host": "h", "started_at": 1, "state": "running",
        "run_dir": sb.run_dir(&id).display().to_string(),
        "cgroup": victim_cg.display().to_string(), "ci": null,
        "token": format!("{id}.999999.1"),
    });
    fs::write(sb.lock_path(app), meta.to_string()).unwrap();
    let f = sb.tether_janitor().args(["--grace", "1s"]).run();
    let alive = sleeper.try_wait().unwrap().is_none();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let _ = fs::remove_dir(&victim_cg);
    let _ = fs::remove_dir(&victim_parent);
    assert!(
        alive,
        "the janitor killed a process of a cgroup that was not the run's\n{f}"
    );
    f.assert_code(0)
        .assert_stderr_contains("ignoring the cgroup");
}

/// Finding 2, in depth: a live holder whose metadata names a run dir (outside the runs dir)
/// with a FIFO for a record: the janitor reports the live run without opening the FIFO.
#[test]
fn live_holder_whose_metadata_names_a_fifo_does_not_hang_the_janitor() {
    let app = "victim.example.org";
    let sb = Sandbox::new();
    let planted_dir = sb.path().join("planted");
    fs::create_dir(&planted_dir).unwrap();
    nix::unistd::mkfifo(
        &planted_dir.join("run.json"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    let meta = json!({
        "version": 1, "app": app, "run_id": "fifo", "pid": 1, "pid_start": 1, "host": "h",
        "started_at": 1, "state": "running", "run_dir": planted_dir.display().to_string(),
        "cgroup": null, "ci": null,
    });
    fs::write(sb.lock_path(app), meta.to_string()).unwrap();
    let _holder = start_lock_holder(&sb, sb.lock_path(app));
    let f = sb.tether_janitor().timeout(Duration::from_secs(20)).run();
    f.assert_code(0).assert_stderr_contains("live run fifo");
}

/// Finding 2, in depth: a dead run's record (in our runs dir) whose `run_dir` names another
/// place: the reaper settles the record of the dir it locked, never a file elsewhere.
#[test]
fn reaper_writes_only_the_record_of_the_dir_it_locked() {
    let app = "victim.example.org";
    let sb = Sandbox::new();
    let id = rid(&sb, "elsewhere");
    let dir = sb.run_dir(&id);
    let elsewhere = sb.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    fs::write(elsewhere.join("run.json"), "precious\n").unwrap();
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("run.lock"), "").unwrap();
    fs::write(
        dir.join("run.json"),
        planted_record(&id, app, &elsewhere, "true"),
    )
    .unwrap();
    let f = sb.tether_janitor().run();
    f.assert_code(0)
        .assert_stderr_contains(&format!("reaping dead run {id}"));
    assert_eq!(
        fs::read_to_string(elsewhere.join("run.json")).unwrap(),
        "precious\n",
        "the reaper wrote a record outside the dir it locked\n{f}"
    );
    assert!(!dir.exists(), "the reaped run dir stays\n{f}");
}

// ---------------------------------------------------------------------------------------------
// 3. removal races

/// A config that runs the command as `user`.
fn run_as_config(sb: &Sandbox, user: &TempUser) -> PathBuf {
    write_config(
        sb,
        "run-as.yml",
        &format!("run_as:\n  user: {}\n", user.name),
    )
}

/// Finding 3: while root removes a run dir, a process of the `run_as` user outside the run
/// (say, another run of the same CI user) keeps swapping an entry of its `tmp/` between a
/// directory and a symlink to a root-only file and directory, and keeps adding files. Root
/// must never change anything outside the run dir: 200 runs, the victims' modes untouched.
#[test]
fn run_dir_removal_never_chmods_outside_while_a_user_races_it() {
    if skip_unless_root("run_dir_removal_never_chmods_outside_while_a_user_races_it") {
        return;
    }
    let user = TempUser::create();
    let sb = Sandbox::new();
    chmod(sb.path(), 0o711);
    let victim_file = sb.path().join("victim-file");
    fs::write(&victim_file, "root only\n").unwrap();
    chmod(&victim_file, 0o600);
    let victim_dir = sb.path().join("victim-dir");
    fs::create_dir(&victim_dir).unwrap();
    chmod(&victim_dir, 0o750);
    let cfg = run_as_config(&sb, &user);
    let swapper = helper_bin!("swapper");
    for i in 0..200 {
        let id = format!("race-{i}-{}", runner_tests::suffix(&sb));
        let tmp = sb.run_dir(&id).join("tmp");
        let target = if i % 2 == 0 {
            &victim_file
        } else {
            &victim_dir
        };
        let mut run = sb
            .tether_run()
            .app("race.example.org")
            .run_id(&id)
            .arg("--config")
            .arg(&cfg)
            .command([
                "sh",
                "-c",
                &format!(
                    "touch \"$TMPDIR/ready\"; {}",
                    runner_tests::sh_wait_for("\"$TMPDIR/go\"")
                ),
            ])
            .spawn();
        wait_file(tmp.join("ready"), TIMEOUT);
        let stop = sb.mark(&format!("stop-{i}"));
        let mut attacker = user.command(&swapper);
        attacker
            .args([
                "--mode",
                "swap",
                "--go",
                "go",
                "--deadline-ms",
                "5000",
                "--target",
            ])
            .arg(target)
            .arg("--stop")
            .arg(&stop)
            .current_dir(&tmp)
            .stdout(Stdio::null());
        let mut attacker = KillOnDrop::spawn(&mut attacker);
        run.wait_exit(TIMEOUT).assert_code(0);
        touch(&stop);
        attacker.wait_exit(TIMEOUT);
        assert_eq!(
            mode_of(&victim_file),
            0o600,
            "try {i}: root chmodded a file outside"
        );
        assert_eq!(
            mode_of(&victim_dir),
            0o750,
            "try {i}: root chmodded a dir outside"
        );
        assert_eq!(fs::read_to_string(&victim_file).unwrap(), "root only\n");
    }
}

/// Finding 4: a user flips the lock dir's name (missing, in a sticky dir) between absent and
/// a symlink to a root-only directory while root creates the lock dir: 200 tries, the victim
/// directory's mode never changes; each run either makes its own lock dir (0) or refuses (125).
#[test]
fn lock_dir_creation_never_follows_a_racing_symlink() {
    if skip_unless_root("lock_dir_creation_never_follows_a_racing_symlink") {
        return;
    }
    let user = TempUser::create();
    let sb = Sandbox::new();
    chmod(sb.path(), 0o711);
    let sticky = sb.path().join("sticky");
    fs::create_dir(&sticky).unwrap();
    chmod(&sticky, 0o1777);
    let victim = sb.path().join("victim-dir");
    fs::create_dir(&victim).unwrap();
    chmod(&victim, 0o700);
    let stop = sb.mark("stop");
    let go = sticky.join("go");
    let mut flipper = user.command(helper_bin!("swapper"));
    flipper
        .args([
            "--mode",
            "flip",
            "--name",
            "tether",
            "--go",
            "go",
            "--deadline-ms",
            "60000",
        ])
        .arg("--target")
        .arg(&victim)
        .arg("--stop")
        .arg(&stop)
        .current_dir(&sticky);
    let _flipper = KillOnDrop::spawn(&mut flipper);
    wait_file(&go, TIMEOUT);
    let lock_dir = sticky.join("tether");
    let (mut made, mut refused) = (0, 0);
    for i in 0..200 {
        let f = sb
            .tether_run()
            .no_sandbox_dirs()
            .arg("--lock-dir")
            .arg(&lock_dir)
            .arg("--runs-dir")
            .arg(sb.runs_dir())
            .app("flip.example.org")
            .command(["true"])
            .run();
        match f.code {
            Some(0) => made += 1,
            Some(125) => refused += 1,
            _ => panic!("try {i}: neither made its lock dir nor refused\n{f}"),
        }
        assert_eq!(
            mode_of(&victim),
            0o700,
            "try {i}: root chmodded the victim dir\n{f}"
        );
        assert!(
            fs::read_dir(&victim).unwrap().next().is_none(),
            "try {i}: root wrote into the victim dir\n{f}"
        );
        // Root's own lock dir, if it made one: gone again for the next try.
        if fs::symlink_metadata(&lock_dir).is_ok_and(|m| m.is_dir()) {
            fs::remove_dir_all(&lock_dir).unwrap();
        }
    }
    touch(&stop);
    eprintln!("lock dir made {made} times, refused {refused} times");
}

// ---------------------------------------------------------------------------------------------
// 5. setup's and teardown's TMPDIR

/// Finding 5: under `run_as`, the command owns its `tmp/`; root's teardown must not write
/// through a symlink the command planted there. Setup and teardown get a `TMPDIR` owned by
/// root (`tether-tmp/`), the command its own.
#[test]
fn root_teardown_gets_a_tmpdir_the_command_cannot_plant_in() {
    if skip_unless_root("root_teardown_gets_a_tmpdir_the_command_cannot_plant_in") {
        return;
    }
    let user = TempUser::create();
    let sb = Sandbox::new();
    chmod(sb.path(), 0o711);
    let victim = sb.path().join("victim");
    fs::write(&victim, "root only\n").unwrap();
    chmod(&victim, 0o600);
    let log = sb.mark("td.log");
    let cfg = run_as_config(&sb, &user);
    let f = sb
        .tether_run()
        .app("tmp.example.org")
        .run_id(rid(&sb, "tmp"))
        .arg("--config")
        .arg(&cfg)
        .arg("--setup")
        .arg(format!(
            "echo \"setup $(stat -c %u \"$TMPDIR\")\" >> {}",
            shell_quote(&log)
        ))
        .teardown(format!(
            "echo pwned > \"$TMPDIR/x\"; echo \"teardown $(stat -c %u \"$TMPDIR\")\" >> {}",
            shell_quote(&log)
        ))
        .command([
            "sh",
            "-c",
            &format!("ln -s {} \"$TMPDIR/x\"", shell_quote(&victim)),
        ])
        .run();
    f.assert_code(0);
    assert_eq!(fs::read_to_string(&victim).unwrap(), "root only\n", "{f}");
    assert_eq!(log_lines(&log), ["setup 0", "teardown 0"], "{f}");
}

// ---------------------------------------------------------------------------------------------
// 6. squatting

/// Finding 6: another user creating `/run/lock/tether` before root does must not block every
/// run until reboot. In a private mount namespace (tmpfs over `/run/lock` and
/// `/var/lib/tether`): squatted, root's run warns and uses `/var/lib/tether/locks`; with the
/// shipped `ci/tmpfiles.d/tether.conf` applied at "boot", the user cannot squat and root uses
/// `/run/lock/tether`.
#[test]
fn squatted_default_lock_dir_does_not_block_runs() {
    if skip_unless_root("squatted_default_lock_dir_does_not_block_runs") {
        return;
    }
    let user = TempUser::create();
    let sb = Sandbox::new();
    chmod(sb.path(), 0o711);
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ci/tmpfiles.d/tether.conf");
    assert!(conf.is_file(), "ci/tmpfiles.d/tether.conf is missing");
    let tether = runner_tests::tether_bin();
    let out = sb.path().join("out");
    fs::create_dir(&out).unwrap();
    let as_user = format!(
        "setpriv --reuid={} --regid={} --clear-groups --",
        user.uid, user.gid
    );
    let script = format!(
        r#"set -u
mount -t tmpfs -o mode=1777 tmpfs /run/lock
mkdir -p /var/lib/tether && mount -t tmpfs -o mode=755 tmpfs /var/lib/tether
{as_user} mkdir /run/lock/tether && echo squatted > {out}/squat
{tether} run --app squat.example.org -- true 2> {out}/run1.err; echo $? > {out}/run1.code
ls /var/lib/tether/locks > {out}/fallback.ls 2>&1
umount /run/lock
mount -t tmpfs -o mode=1777 tmpfs /run/lock
if command -v systemd-tmpfiles >/dev/null; then
  systemd-tmpfiles --create {conf} > {out}/tmpfiles.log 2>&1
else
  echo "no systemd-tmpfiles" > {out}/tmpfiles.log
fi
{as_user} mkdir /run/lock/tether 2> {out}/squat2.err && echo squatted > {out}/squat2
{tether} run --app squat.example.org -- true 2> {out}/run2.err; echo $? > {out}/run2.code
stat -c '%u %a' /run/lock/tether > {out}/lockdir.stat
ls /run/lock/tether > {out}/lockdir.ls
"#,
        out = shell_quote(&out),
        tether = shell_quote(&tether),
        conf = shell_quote(&conf),
    );
    let status = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env_remove("TETHER_LOCK_DIR")
        .env_remove("TETHER_RUNS_DIR")
        .env_remove("TETHER_CONFIG")
        .status()
        .expect("unshare");
    assert!(status.success(), "the namespace script failed");
    let read = |n: &str| fs::read_to_string(out.join(n)).unwrap_or_default();
    assert_eq!(
        read("squat").trim(),
        "squatted",
        "the user could not squat at all"
    );
    assert_eq!(
        read("run1.code").trim(),
        "0",
        "a squatted lock dir blocked the run: {}",
        read("run1.err")
    );
    assert!(
        read("run1.err").contains("/var/lib/tether/locks"),
        "no warning naming the fallback: {}",
        read("run1.err")
    );
    assert!(
        read("fallback.ls").contains("app-squat.example.org.lock"),
        "{}",
        read("fallback.ls")
    );
    if read("tmpfiles.log").contains("no systemd-tmpfiles") {
        eprintln!("SKIPPED part 2: no systemd-tmpfiles on this machine");
        return;
    }
    assert_eq!(
        read("squat2"),
        "",
        "the user squatted despite tmpfiles.d: {}",
        read("squat2.err")
    );
    assert_eq!(read("run2.code").trim(), "0", "{}", read("run2.err"));
    assert!(
        !read("run2.err").contains("instead"),
        "a fallback was used: {}",
        read("run2.err")
    );
    assert_eq!(read("lockdir.stat").trim(), "0 755");
    assert!(read("lockdir.ls").contains("app-squat.example.org.lock"));
}

// ---------------------------------------------------------------------------------------------
// 7. one user, one lock dir

/// Finding 7: the same non-root user running with and without `XDG_RUNTIME_DIR` (cron, `su`,
/// `sudo -u`) must find the same lock dir: a run of the app with it set waits for the holder
/// that runs without it.
#[test]
fn one_user_with_and_without_xdg_runtime_dir_serializes() {
    if skip_unless_root("one_user_with_and_without_xdg_runtime_dir_serializes") {
        return;
    }
    let user = TempUser::with_home();
    let home = user.home.clone().expect("a home dir");
    let runtime = Path::new("/tmp").join(format!("tether-xdg-{}", user.uid));
    let _ = fs::remove_dir_all(&runtime);
    fs::create_dir(&runtime).unwrap();
    chown(&runtime, user.uid, user.gid);
    chmod(&runtime, 0o700);
    let marks = home.join("marks");
    fs::create_dir(&marks).unwrap();
    chown(&marks, user.uid, user.gid);
    let release = marks.join("release");
    let tether = runner_tests::tether_bin();
    let run = |id: &str, xdg: bool, cmd: &str| {
        let mut c = user.command(&tether);
        c.args([
            "run",
            "--app",
            "xdg.example.org",
            "--run-id",
            id,
            "--",
            "sh",
            "-c",
            cmd,
        ])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", &home)
        .current_dir(&home)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        if xdg {
            c.env("XDG_RUNTIME_DIR", &runtime);
        }
        c
    };
    let holder_started = marks.join("holder-started");
    let mut holder = run(
        "holder",
        false,
        &format!(
            "touch {}; {}",
            shell_quote(&holder_started),
            runner_tests::sh_wait_for(&shell_quote(&release))
        ),
    )
    .spawn()
    .unwrap();
    wait_file(&holder_started, TIMEOUT);
    let overlap = marks.join("overlap");
    let mut waiter = run(
        "waiter",
        true,
        &format!(
            "[ -e {} ] || touch {}",
            shell_quote(&release),
            shell_quote(&overlap)
        ),
    )
    .spawn()
    .unwrap();
    // The waiter must say it waits for the holder; only then is the holder released.
    let mut err = String::new();
    let waited = runner_tests::poll_until(TIMEOUT, || {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        if let Some(e) = waiter.stderr.as_mut() {
            // Non-blocking enough: tether prints the waiting line at once.
            if let Ok(n) = e.read(&mut buf) {
                err.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
        err.contains("held by run holder") || waiter.try_wait().ok().flatten().is_some()
    });
    touch(&release);
    let w = waiter.wait_with_output().unwrap();
    let h = holder.wait().unwrap();
    let _ = fs::remove_dir_all(&runtime);
    err.push_str(&String::from_utf8_lossy(&w.stderr));
    assert!(
        waited && err.contains("held by run holder"),
        "the runs did not share a lock dir:\n{err}"
    );
    assert!(
        !overlap.exists(),
        "the two runs of one app overlapped:\n{err}"
    );
    assert!(h.success() && w.status.success(), "{err}");
}

// ---------------------------------------------------------------------------------------------
// 8. run_as on a layout made from nothing

/// The last point of issue 13: with `run_as`, a runs dir created from nothing (under a umask
/// of 077) leaves every parent traversable, so the command can use its own `TMPDIR`.
#[test]
fn run_as_with_a_runs_dir_created_from_nothing() {
    if skip_unless_root("run_as_with_a_runs_dir_created_from_nothing") {
        return;
    }
    let user = TempUser::create();
    let sb = Sandbox::new();
    chmod(sb.path(), 0o711);
    let runs = sb.path().join("state/tether/runs");
    let cfg = run_as_config(&sb, &user);
    let cmd = sb
        .tether_run()
        .no_sandbox_dirs()
        .arg("--lock-dir")
        .arg(sb.lock_dir())
        .arg("--runs-dir")
        .arg(&runs)
        .arg("--config")
        .arg(&cfg)
        .app("fresh.example.org")
        .command(["sh", "-c", "echo probe > \"$TMPDIR/probe\""]);
    let line = format!("umask 077; exec {}", cmd.to_shell());
    let f = sb.step_shell(&line).spawn().wait_exit(TIMEOUT);
    f.assert_code(0);
    for p in [sb.path().join("state"), sb.path().join("state/tether")] {
        assert_eq!(
            mode_of(&p),
            0o755,
            "{} is not traversable\n{f}",
            p.display()
        );
    }
    assert_eq!(mode_of(&runs), 0o711, "{f}");
}
