//! `tether-bench`: the benchmark harness behind `ci/bench` (not part of the test command).
//!
//! ```text
//! tether-bench [--quick] [--tether PATH] [--out FILE] [--only B1,B3,...] [--command-line TEXT]
//!              [--tether-env KEY=VALUE]...
//! ```
//!
//! Measures the figures B1–B8 of the benchmark issue (and B9–B13 of issues 16 and 17) side by
//! side with the standard tools (flock(1), timeout(1), a minimal python3 harness; for B9–B12,
//! bare `psql` sessions on netns hosts) in the same run: A/B runs are interleaved
//! (the order alternates every pair), warm-up iterations are dropped, and every figure reports
//! median, p99 (nearest rank), min and max over its samples. It prints a markdown table and
//! writes it, with a description of the machine, to `--out` (default
//! `machine-docs/BENCHMARKS.md`; `target/bench/BENCHMARKS-quick.md` with `--quick`).
//!
//! Every tether run uses `--lock-dir`/`--runs-dir` of a fresh world per figure (see `World`):
//! the lock dir on tmpfs (`/dev/shm`, as `/run/lock` is on a normal host), the runs dir in a
//! `runner_tests::Sandbox` under `$TMPDIR` (disk, as `/var/lib` is), whose drop kills whatever
//! still mentions it. The baselines' lockfiles sit in the same lock dir. The
//! harness is a child subreaper, so orphans of the baselines (timeout(1) does not wait for
//! grandchildren) are reaped here instead of piling up as zombies under a non-reaping PID 1.
//!
//! Full mode keeps every figure inside a time budget (about 4.5 minutes in all); a figure that
//! hits its budget stops early and the report says how many samples it got. A missed target is
//! reported as MISS, never hidden: the harness's exit status is 0 unless it could not run.
//!
//! Layout: `measure` (the A/B loop every figure runs: warm-up, alternation, time budget),
//! `stats`, `report` (rows, table and the markdown document), `world` (the context and a
//! figure's private world), `machine` (the machine's description, the disk's state), `util`
//! (bounded waits, processes, /proc) and `figures/` (one module per figure).

mod figures;
mod machine;
mod measure;
mod report;
mod stats;
mod util;
mod world;

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use figures::ALL;
use machine::{create_latency_us, settle_disk};
use report::{Report, Row, RunInfo, Verdict};
use util::{loadavg, reap_orphans, utc};
use world::Ctx;

struct Opts {
    quick: bool,
    tether: Option<PathBuf>,
    out: Option<PathBuf>,
    only: Option<Vec<String>>,
    command_line: Option<String>,
    tether_env: Vec<(String, String)>,
}

fn usage(msg: &str) -> ! {
    eprintln!("tether-bench: {msg}");
    eprintln!(
        "usage: tether-bench [--quick] [--tether PATH] [--out FILE] [--only B1,B2,...] \
         [--command-line TEXT] [--tether-env K=V]..."
    );
    std::process::exit(2)
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        quick: false,
        tether: None,
        out: None,
        only: None,
        command_line: None,
        tether_env: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--quick" => o.quick = true,
            "--tether" => o.tether = Some(value().into()),
            "--out" => o.out = Some(value().into()),
            "--only" => {
                o.only = Some(
                    value()
                        .split(',')
                        .map(|s| s.trim().to_ascii_uppercase())
                        .collect(),
                )
            }
            "--command-line" => o.command_line = Some(value()),
            "--tether-env" => {
                let kv = value();
                let (k, v) = kv
                    .split_once('=')
                    .unwrap_or_else(|| usage("--tether-env takes KEY=VALUE"));
                o.tether_env.push((k.to_owned(), v.to_owned()));
            }
            "-h" | "--help" => usage("help"),
            _ => usage(&format!("unexpected argument {a:?}")),
        }
    }
    o
}

fn main() {
    let opts = parse_opts();
    let started = Instant::now();
    let date = utc(SystemTime::now());
    let load_start = loadavg();

    let exe = std::env::current_exe().unwrap_or_else(|e| usage(&format!("current_exe: {e}")));
    let bin_dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let tether = opts
        .tether
        .clone()
        .unwrap_or_else(|| bin_dir.join("tether"));
    let stamp = bin_dir.join("stamp");
    let tree = bin_dir.join("tree-helper");
    for (what, p) in [
        ("tether", &tether),
        ("stamp", &stamp),
        ("tree-helper", &tree),
    ] {
        if !p.is_file() {
            usage(&format!(
                "{what} binary missing at {} (run ci/bench, which builds it)",
                p.display()
            ));
        }
    }
    // The real interpreter, not a version-manager shim script in front of it.
    let python = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    let ctx = Ctx {
        quick: opts.quick,
        tether,
        stamp,
        tree,
        python,
        scrub: runner_tests::ci_vars(),
        tether_env: opts.tether_env.clone(),
    };

    // Orphans of the baselines' trees come to us, not to a PID 1 that may never reap.
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only flags this process.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };

    let mut rep = Report::default();
    let calm_create = create_latency_us();
    for figure in &ALL {
        let id = figure.id;
        if opts
            .only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|x| x == id))
        {
            continue;
        }
        if !ctx.quick {
            settle_disk(id, calm_create, &mut rep);
        }
        let t0 = Instant::now();
        eprintln!("tether-bench: {id} ...");
        if let Err(e) = (figure.run)(&ctx, &mut rep) {
            eprintln!("tether-bench: {id} failed: {e}");
            rep.note(id, format!("ERROR, figure not measured: {e}"));
            let mut row = Row::new(id, "(see notes)", "—");
            row.verdict = Verdict::Error;
            rep.rows.push(row);
        }
        reap_orphans();
        eprintln!(
            "tether-bench: {id} done in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    }
    let elapsed = started.elapsed();
    let load_end = loadavg();

    let command_line = opts
        .command_line
        .clone()
        .unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" "));
    let run = RunInfo {
        command_line,
        date,
        elapsed,
        load_start,
        load_end,
        calm_create,
    };
    let md = report::markdown(&ctx, &run, &rep, &ALL);

    println!("{}", rep.table());
    for n in &rep.notes {
        println!("- {n}");
    }
    let out = opts.out.clone().unwrap_or_else(|| {
        if ctx.quick {
            PathBuf::from("target/bench/BENCHMARKS-quick.md")
        } else {
            PathBuf::from("machine-docs/BENCHMARKS.md")
        }
    });
    match report::write(&out, md) {
        Ok(()) => eprintln!(
            "tether-bench: wrote {} ({:.0} s in all)",
            out.display(),
            elapsed.as_secs_f64()
        ),
        Err(e) => {
            eprintln!("tether-bench: writing {}: {e}", out.display());
            std::process::exit(1);
        }
    }
}
