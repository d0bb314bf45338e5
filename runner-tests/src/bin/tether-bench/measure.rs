//! The measuring loop the figures share: A/B alternation and the time budget.

use std::time::Instant;

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

/// A time budget for one figure (full mode only; quick mode is small anyway).
pub struct Budget {
    pub until: Option<Instant>,
}

impl Budget {
    pub fn over(&self) -> bool {
        self.until.is_some_and(|u| Instant::now() >= u)
    }
}
