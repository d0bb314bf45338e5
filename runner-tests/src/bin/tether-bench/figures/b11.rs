//! B11 (issue 16): a partition → the holder's command killed (self-fence) and → the waiter's
//! command start. Needs self-fencing (the `fence` part of issue 16), which this tether does
//! not have yet: the figure says so instead of measuring.

use crate::report::{Report, Row, Verdict};
use crate::world::Ctx;

/// What the figure measures, for the report.
pub const ABOUT: &str = "\
    (not measured yet: needs self-fencing) on B9's hosts, 20 trials: a holder on host-a, a \
    waiter on host-b; host-a is partitioned silently (IP dropped both ways); the distributions \
    of partition → holder's command killed and partition → waiter's command start, and the \
    overlaps (a waiter's start before the holder's command died), which must be 0.";

const FIGURE: &str = "partition → holder's command killed / → waiter's command start (ms)";

pub fn run(_ctx: &Ctx, rep: &mut Report) -> Result<(), String> {
    let why = "needs self-fencing (issue 16, the `fence` part), not in this tether yet";
    eprintln!("tether-bench: B11 skipped: {why}");
    rep.note("B11", format!("skipped: {why}"));
    let mut row = Row::new("B11", FIGURE, "0 overlaps in 20 trials");
    row.verdict = Verdict::Skipped;
    rep.rows.push(row);
    Ok(())
}
