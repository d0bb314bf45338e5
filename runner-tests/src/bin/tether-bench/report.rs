//! The report: its rows and notes, the results table, and the markdown document.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::figures::Figure;
use crate::machine::{fs_type, machine};
use crate::measure::Samples;
use crate::stats::{num, stats, Stats};
use crate::util::first_line;
use crate::world::Ctx;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    Pass,
    Miss,
    Info,
    Error,
    /// The figure could not run here (B9–B12 without root or PostgreSQL); a note says why.
    Skipped,
}

pub struct Row {
    pub id: &'static str,
    pub figure: String,
    pub tether: Option<Stats>,
    pub base_name: String,
    pub base: Option<Stats>,
    pub ratio: Option<f64>,
    pub target: String,
    pub verdict: Verdict,
}

impl Row {
    pub fn new(id: &'static str, figure: impl Into<String>, target: impl Into<String>) -> Row {
        Row {
            id,
            figure: figure.into(),
            tether: None,
            base_name: "—".to_owned(),
            base: None,
            ratio: None,
            target: target.into(),
            verdict: Verdict::Info,
        }
    }

    pub fn with_base(mut self, name: &str, base: &[f64]) -> Row {
        self.base_name = name.to_owned();
        self.base = stats(base);
        self
    }

    pub fn with_tether(mut self, values: &[f64]) -> Row {
        self.tether = stats(values);
        self
    }

    /// The A/B samples of a figure: tether's, and the baseline's (named `base_name`), with
    /// the ratio of their medians.
    pub fn with_ab(self, base_name: &str, samples: &Samples) -> Row {
        self.with_tether(&samples.tether)
            .with_base(base_name, &samples.base)
            .median_ratio()
    }

    /// Ratio of the medians, tether over baseline.
    pub fn median_ratio(mut self) -> Row {
        if let (Some(t), Some(b)) = (self.tether, self.base) {
            self.ratio = Some(t.median / b.median);
        }
        self
    }

    pub fn judge(mut self, pass: bool) -> Row {
        self.verdict = if self.tether.is_none() {
            Verdict::Error
        } else if pass {
            Verdict::Pass
        } else {
            Verdict::Miss
        };
        self
    }
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn note(&mut self, id: &str, text: impl AsRef<str>) {
        self.notes.push(format!("**{id}** {}", text.as_ref()));
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "| # | figure | tether median | p99 | min | max | n | baseline | median | p99 | min | max | n | ratio | target | result |\n\
             |---|---|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|---|---|\n",
        );
        for r in &self.rows {
            let cells = |s: Option<Stats>| match s {
                Some(s) => format!(
                    "{} | {} | {} | {} | {}",
                    num(s.median),
                    num(s.p99),
                    num(s.min),
                    num(s.max),
                    s.n
                ),
                None => "— | — | — | — | 0".to_owned(),
            };
            let verdict = match r.verdict {
                Verdict::Pass => "PASS",
                Verdict::Miss => "**MISS**",
                Verdict::Info => "info",
                Verdict::Error => "**ERROR**",
                Verdict::Skipped => "skipped",
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                r.id,
                r.figure,
                cells(r.tether),
                r.base_name,
                if r.base_name == "—" {
                    "— | — | — | — | —".to_owned()
                } else {
                    cells(r.base)
                },
                r.ratio.map(|x| format!("{x:.2}×")).unwrap_or("—".into()),
                r.target,
                verdict
            );
        }
        out
    }
}

/// Everything after this line of the report is kept when the report is rewritten.
pub const HAND_WRITTEN_MARKER: &str =
    "<!-- Written by hand below this line; ci/bench keeps it when it rewrites the tables above. -->";

/// What the document says about the run itself.
pub struct RunInfo {
    pub command_line: String,
    pub date: String,
    pub elapsed: Duration,
    pub load_start: String,
    pub load_end: String,
    /// Time to create an empty file where the runs dirs go, when the bench started (µs).
    pub calm_create: f64,
}

/// The markdown document: machine, results table, what each figure measures, notes. Without
/// the hand-written part (see [`write`]).
pub fn markdown(ctx: &Ctx, run: &RunInfo, rep: &Report, figures: &[Figure]) -> String {
    let RunInfo {
        command_line,
        date,
        elapsed,
        load_start,
        load_end,
        calm_create,
    } = run;
    let git = first_line("git", &["rev-parse", "--short", "HEAD"]);
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .stderr(Stdio::null())
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    let mut md = String::new();
    md.push_str("# tether benchmarks\n\n");
    if ctx.quick {
        md.push_str(
            "> **QUICK MODE** — a handful of iterations to check that the harness works. These \
             numbers are not the reference figures: run `ci/bench` (full mode) on an idle \
             machine for those.\n\n",
        );
    }
    let _ = writeln!(
        md,
        "Generated by `{command_line}` on {date}, in {:.0} s.\n",
        elapsed.as_secs_f64()
    );
    md.push_str("## Machine\n\n");
    for l in machine() {
        let _ = writeln!(md, "- {l}");
    }
    let _ = writeln!(
        md,
        "- load average (1/5/15 min): {load_start} at start, {load_end} at end"
    );
    let tmp = std::env::temp_dir();
    let shm = Path::new("/dev/shm");
    let _ = writeln!(
        md,
        "- storage, as tether's defaults place it on a normal host: lock dirs {} (like \
         `/run/lock/tether`), runs dirs and markers under {} on {} (like `/var/lib/tether/runs`); \
         `TMPDIR=/dev/shm ci/bench` puts the runs dirs on tmpfs too, to separate tether's own \
         work from the disk's metadata latency; creating an empty file there took {calm_create:.0} µs \
         (median of 20) when the bench started",
        if shm.is_dir() {
            format!("on {} under /dev/shm", fs_type(shm))
        } else {
            "inside the sandbox (no /dev/shm)".to_owned()
        },
        tmp.display(),
        fs_type(&tmp)
    );
    let _ = writeln!(
        md,
        "- tether: `{}` ({}), commit {git}{}; built by `cargo build --release --workspace`, \
         which unifies the runner-tests `fault-injection` feature into it (inert unless its \
         env vars are set)",
        ctx.tether.display(),
        first_line(&ctx.tether.to_string_lossy(), &["--version"]),
        if dirty { " + uncommitted changes" } else { "" }
    );
    let _ = writeln!(
        md,
        "- baselines: {}; {}; python: {}",
        first_line("flock", &["--version"]),
        first_line("timeout", &["--version"]),
        ctx.python
            .as_ref()
            .map(|p| format!(
                "{} ({})",
                p.display(),
                first_line(&p.to_string_lossy(), &["--version"])
            ))
            .unwrap_or_else(|| "not found (B6 python baseline skipped)".to_owned())
    );
    if !ctx.tether_env.is_empty() {
        let _ = writeln!(
            md,
            "- **tether ran with extra environment** (not the default configuration): {}",
            ctx.tether_env
                .iter()
                .map(|(k, v)| format!("`{k}={v}`"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    md.push_str("\n## Results\n\n");
    md.push_str(&rep.table());
    md.push_str(
        "\nTimes in ms unless the figure says otherwise. A/B runs alternate order every pair, \
         in the same run, after warm-up iterations that are dropped; p99 is the nearest rank \
         (with fewer than 100 samples it is the maximum or next to it); ratio = tether median / \
         baseline median. `info` rows have no target.\n\n",
    );
    md.push_str("## What each figure measures\n\n");
    for figure in figures {
        let _ = writeln!(md, "- **{}** {}", figure.id, figure.about);
    }
    if !rep.notes.is_empty() {
        md.push_str("\n## Notes from this run\n\n");
        for n in &rep.notes {
            let _ = writeln!(md, "- {n}");
        }
    }

    md
}

/// Writes `md` to `out`, followed by the marker and what follows the marker in the file
/// there now: what was found by profiling is written by hand below the marker; a re-run
/// keeps it.
pub fn write(out: &Path, mut md: String) -> std::io::Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = fs::create_dir_all(dir);
    }
    md.push('\n');
    md.push_str(HAND_WRITTEN_MARKER);
    if let Some((_, kept)) = fs::read_to_string(out)
        .ok()
        .as_deref()
        .and_then(|old| old.split_once(HAND_WRITTEN_MARKER))
    {
        md.push_str(kept);
    } else {
        md.push('\n');
    }
    fs::write(out, md)
}
