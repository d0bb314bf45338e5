//! The suite's cluster switch (issue 16, DECISIONS D73): with `TETHER_TEST_CLUSTER=1` every
//! tether the fixture starts — directly, in a step shell, in a fake agent's step — runs with a
//! cluster (it takes the cluster lock and gets a fence); without it, none does. Both passes of
//! `.ci/run` run these, each checking its own side, so a switch that silently does nothing
//! fails the second pass.

use runner_tests::{cluster_switch, pid_alive, wait_pid_gone, Sandbox, TIMEOUT};

/// `TETHER_FENCE` as the command saw it (`-` when unset), and `fence` in `run.json`.
fn fence_of(sb: &Sandbox, marker: &std::path::Path, id: &str) -> (String, Option<i64>) {
    let seen = std::fs::read_to_string(marker)
        .unwrap_or_else(|e| panic!("reading {}: {e}", marker.display()))
        .trim()
        .to_owned();
    let recorded = sb.run_record(id).and_then(|r| r["fence"].as_i64());
    (seen, recorded)
}

#[test]
fn cluster_switch_configures_every_tether_the_suite_starts() {
    let sb = Sandbox::new();
    let direct = sb.mark("direct");
    sb.tether_run()
        .app("switch.example.org")
        .run_id("direct")
        .arg("--keep-run-dir")
        .command([
            "sh",
            "-c",
            &format!("echo \"${{TETHER_FENCE:--}}\" > {}", direct.display()),
        ])
        .run()
        .assert_code(0);
    let in_shell = sb.mark("in-shell");
    let run = sb
        .tether_run()
        .app("switch.example.org")
        .run_id("in-shell")
        .arg("--keep-run-dir")
        .command([
            "sh",
            "-c",
            &format!("echo \"${{TETHER_FENCE:--}}\" > {}", in_shell.display()),
        ]);
    sb.step_shell(&run.to_shell())
        .spawn()
        .wait_exit(TIMEOUT)
        .assert_code(0);
    let runs = [
        fence_of(&sb, &direct, "direct"),
        fence_of(&sb, &in_shell, "in-shell"),
    ];
    if cluster_switch() {
        let pg = sb.cluster().expect("the switch's server");
        let fences: Vec<i64> = runs
            .iter()
            .map(|(seen, recorded)| {
                let fence: i64 = seen
                    .parse()
                    .unwrap_or_else(|_| panic!("TETHER_FENCE not a number: {seen:?}"));
                assert_eq!(*recorded, Some(fence), "run.json records the fence");
                fence
            })
            .collect();
        assert!(fences[0] < fences[1], "fences increase: {fences:?}");
        assert_eq!(
            pg.psql("SELECT last_value FROM tether.fence"),
            fences[1].to_string(),
            "the fences came from the switch's server"
        );
    } else {
        assert!(sb.cluster().is_none(), "no server without the switch");
        for (seen, recorded) in runs {
            assert_eq!(seen, "-", "TETHER_FENCE is unset without a cluster");
            assert_eq!(recorded, None, "run.json has no fence without a cluster");
        }
    }
}

#[test]
fn cluster_switch_server_stops_with_the_last_sandbox() {
    let first = Sandbox::new();
    let second = Sandbox::new();
    if !cluster_switch() {
        assert!(first.cluster().is_none() && second.cluster().is_none());
        return;
    }
    let pid = first.cluster().expect("the switch's server").pid();
    assert_eq!(
        second.cluster().map(|pg| pg.pid()),
        Some(pid),
        "sandboxes alive together share one server"
    );
    drop(first);
    assert!(
        pid_alive(pid),
        "the server outlives a sandbox that still has a sibling"
    );
    drop(second);
    wait_pid_gone(pid, TIMEOUT);
}

/// The fixture's one count of the runs waiting for an app (`runner_tests::waiters`, DECISIONS
/// D79) names the waiting runs' cores in queue order in both passes: the host's tickets without
/// the switch, the cluster queue's rows (their live tickets, in order, by their `pid`) with it;
/// `app_waiters` names the head, blocked in the kernel's flock or queued on the server. With
/// the switch, a run of another sandbox sharing the server and queued for the same app is not
/// counted as this sandbox's.
#[test]
fn the_waiters_fixture_names_the_waiting_cores_in_queue_order() {
    use runner_tests::{
        app_queue, app_waiters, rid, start_held_run, touch, wait_app_queue, wait_app_waiters,
        wait_until,
    };
    let sb = Sandbox::new();
    let app = "waiters.example.org";
    let release = sb.mark("release");
    let mut holder = start_held_run(&sb, app, &rid(&sb, "h"), &release, |c| c);
    let start = |name: &str| {
        sb.tether_run()
            .app(app)
            .run_id(rid(&sb, name))
            .command(["true"])
            .spawn()
    };
    let mut w1 = start("w1");
    let core1 = w1.wait_core_pid(TIMEOUT);
    assert_eq!(wait_app_queue(&sb, app, 1, TIMEOUT), [core1]);
    let mut w2 = start("w2");
    let core2 = w2.wait_core_pid(TIMEOUT);
    assert_eq!(
        wait_app_queue(&sb, app, 2, TIMEOUT),
        [core1, core2],
        "queue order"
    );
    let head = wait_app_waiters(&sb, app, 1, TIMEOUT);
    assert_eq!(head.first(), Some(&core1), "the head waits: {head:?}");
    if cluster_switch() {
        // Both queue on the server (D69, D84): the holder's run holds the only flock.
        assert_eq!(wait_app_waiters(&sb, app, 2, TIMEOUT), [core1, core2]);
        let other = Sandbox::new();
        let mut w3 = other
            .tether_run()
            .app(app)
            .run_id(rid(&other, "w3"))
            .command(["true"])
            .spawn();
        let core3 = w3.wait_core_pid(TIMEOUT);
        assert_eq!(wait_app_queue(&other, app, 1, TIMEOUT), [core3]);
        assert_eq!(
            app_queue(&sb, app),
            [core1, core2],
            "not the other sandbox's"
        );
        touch(&release);
        w3.wait_exit(TIMEOUT).assert_code(0);
    } else {
        // Only the head is blocked in the kernel's flock; w2 waits for the head's ticket.
        assert_eq!(app_waiters(&sb, app), [core1]);
        touch(&release);
    }
    holder.run.wait_exit(TIMEOUT).assert_code(0);
    w1.wait_exit(TIMEOUT).assert_code(0);
    w2.wait_exit(TIMEOUT).assert_code(0);
    wait_until("the queue to empty", TIMEOUT, || {
        app_queue(&sb, app).is_empty()
    });
}
