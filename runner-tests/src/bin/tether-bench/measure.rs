//! The measuring loop every figure runs: warm-up iterations that are dropped, A/B sides in an
//! order that alternates every pair, and (full mode) a time budget that stops the loop early.

use std::time::{Duration, Instant};

use crate::report::Report;
use crate::util::reap_orphans;
use crate::world::Ctx;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Side {
    Tether,
    Base,
}

/// The two sides of pair `i`, in alternating order.
pub fn pair_order(i: usize) -> [Side; 2] {
    if i.is_multiple_of(2) {
        [Side::Tether, Side::Base]
    } else {
        [Side::Base, Side::Tether]
    }
}

/// How one figure's loop runs.
pub struct Plan {
    /// The figure, for the note saying the budget stopped it.
    pub id: &'static str,
    /// Warm-up iterations (run first, their samples dropped).
    pub warm: usize,
    /// Measured iterations.
    pub n: usize,
    /// Full mode only (quick mode is small anyway): the loop stops once this time has passed
    /// since it started ...
    pub budget: Duration,
    /// ... and the tether side has at least this many samples.
    pub min_samples: usize,
    /// What an iteration is called in that note: `pairs`, `handoffs`, `runs`, `trials`, ...
    pub unit: &'static str,
    /// Reap orphans (of the baselines' trees) after every iteration. Only for figures none of
    /// whose own children outlive an iteration: reaping would steal their status.
    pub reap: bool,
}

/// One iteration of the loop.
pub struct Iteration {
    pub index: usize,
    /// A warm-up iteration: [`Samples::record`] drops what it measures.
    pub warm_up: bool,
}

impl Iteration {
    /// The two sides in this iteration's order (alternating from one iteration to the next).
    pub fn order(&self) -> [Side; 2] {
        pair_order(self.index)
    }
}

/// A figure's measured values, per side.
#[derive(Default)]
pub struct Samples {
    pub tether: Vec<f64>,
    pub base: Vec<f64>,
}

impl Samples {
    /// Keeps `value` for `side`, unless it was measured in a warm-up iteration.
    pub fn record(&mut self, it: &Iteration, side: Side, value: f64) {
        if it.warm_up {
            return;
        }
        match side {
            Side::Tether => self.tether.push(value),
            Side::Base => self.base.push(value),
        }
    }
}

/// Runs `body` for `plan.warm + plan.n` iterations, the warm-up ones first; stops early (with
/// a note in the report) when the budget is spent and the tether side has `min_samples`.
pub fn measure(
    ctx: &Ctx,
    rep: &mut Report,
    plan: &Plan,
    mut body: impl FnMut(&Iteration, &mut Samples) -> Result<(), String>,
) -> Result<Samples, String> {
    let until = (!ctx.quick).then(|| Instant::now() + plan.budget);
    let mut samples = Samples::default();
    for index in 0..plan.warm + plan.n {
        let over = until.is_some_and(|u| Instant::now() >= u);
        if over && samples.tether.len() >= plan.min_samples {
            rep.note(
                plan.id,
                format!(
                    "stopped by its time budget after {} {}",
                    samples.tether.len(),
                    plan.unit
                ),
            );
            break;
        }
        let it = Iteration {
            index,
            warm_up: index < plan.warm,
        };
        body(&it, &mut samples)?;
        if plan.reap {
            reap_orphans();
        }
    }
    Ok(samples)
}

/// [`measure`] where an iteration is one A/B pair: `one(side, iteration)` measures one side
/// and returns its value, or `None` for a failure it has noted itself.
pub fn measure_pairs(
    ctx: &Ctx,
    rep: &mut Report,
    plan: &Plan,
    mut one: impl FnMut(Side, &Iteration) -> Result<Option<f64>, String>,
) -> Result<Samples, String> {
    measure(ctx, rep, plan, |it, samples| {
        for side in it.order() {
            if let Some(value) = one(side, it)? {
                samples.record(it, side, value);
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(quick: bool) -> Ctx {
        Ctx {
            quick,
            tether: "tether".into(),
            stamp: "stamp".into(),
            tree: "tree-helper".into(),
            python: None,
            scrub: Vec::new(),
            tether_env: Vec::new(),
        }
    }

    fn plan(budget: Duration, min_samples: usize) -> Plan {
        Plan {
            id: "BX",
            warm: 2,
            n: 5,
            budget,
            min_samples,
            unit: "pairs",
            reap: false,
        }
    }

    #[test]
    fn warm_up_is_dropped_and_the_order_alternates() {
        let (mut rep, mut seen) = (Report::default(), Vec::new());
        let plan = plan(Duration::from_secs(3600), 1);
        let samples = measure_pairs(&ctx(false), &mut rep, &plan, |side, it| {
            seen.push((it.index, it.warm_up, side));
            Ok(Some(it.index as f64))
        })
        .expect("no error");
        let mut want = Vec::new();
        for i in 0..7 {
            let pair = if i % 2 == 0 {
                [Side::Tether, Side::Base]
            } else {
                [Side::Base, Side::Tether]
            };
            want.extend(pair.map(|side| (i, i < 2, side)));
        }
        assert_eq!(seen, want);
        assert_eq!(samples.tether, [2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(samples.base, [2.0, 3.0, 4.0, 5.0, 6.0]);
        assert!(rep.notes.is_empty(), "{:?}", rep.notes);
    }

    #[test]
    fn a_spent_budget_stops_the_loop_once_tether_has_its_minimum() {
        let mut rep = Report::default();
        let plan = plan(Duration::ZERO, 2);
        // A failed tether side (None) does not count towards the minimum.
        let samples = measure_pairs(&ctx(false), &mut rep, &plan, |side, it| {
            Ok((side == Side::Base || it.index != 3).then_some(1.0))
        })
        .expect("no error");
        assert_eq!(samples.tether.len(), 2, "iterations 2 and 4");
        assert_eq!(samples.base.len(), 3, "iterations 2, 3 and 4");
        assert_eq!(
            rep.notes,
            ["**BX** stopped by its time budget after 2 pairs"]
        );
    }

    #[test]
    fn quick_mode_has_no_budget_and_errors_end_the_loop() {
        let mut rep = Report::default();
        let plan = plan(Duration::ZERO, 0);
        let samples = measure(&ctx(true), &mut rep, &plan, |it, samples| {
            samples.record(it, Side::Tether, 1.0);
            Ok(())
        })
        .expect("no error");
        assert_eq!(samples.tether.len(), 5);
        assert!(rep.notes.is_empty(), "{:?}", rep.notes);
        let mut calls = 0;
        let err = measure(&ctx(true), &mut rep, &plan, |it, _| {
            calls += 1;
            if it.index == 1 {
                Err("boom".to_owned())
            } else {
                Ok(())
            }
        });
        assert_eq!(err.err().as_deref(), Some("boom"));
        assert_eq!(calls, 2);
    }
}
