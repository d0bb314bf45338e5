//! The figures B1–B8 of the benchmark issue, B9–B12 (issue 16, across netns hosts: `hosts`
//! sets them up) and B13 (issue 17), one module each: `run` measures the figure
//! against its baseline and adds its rows and notes to the report; `ABOUT` says what it
//! measures.

use crate::report::Report;
use crate::world::Ctx;

pub mod b1;
pub mod b10;
pub mod b11;
pub mod b12;
pub mod b13;
pub mod b2;
pub mod b3;
pub mod b4;
pub mod b5;
pub mod b6;
pub mod b7;
pub mod b8;
pub mod b9;
mod hosts;
mod tree;

pub struct Figure {
    pub id: &'static str,
    pub run: fn(&Ctx, &mut Report) -> Result<(), String>,
    pub about: &'static str,
}

/// Every figure, in the report's order.
pub const ALL: [Figure; 13] = [
    Figure {
        id: "B1",
        run: b1::run,
        about: b1::ABOUT,
    },
    Figure {
        id: "B2",
        run: b2::run,
        about: b2::ABOUT,
    },
    Figure {
        id: "B3",
        run: b3::run,
        about: b3::ABOUT,
    },
    Figure {
        id: "B4",
        run: b4::run,
        about: b4::ABOUT,
    },
    Figure {
        id: "B5",
        run: b5::run,
        about: b5::ABOUT,
    },
    Figure {
        id: "B6",
        run: b6::run,
        about: b6::ABOUT,
    },
    Figure {
        id: "B7",
        run: b7::run,
        about: b7::ABOUT,
    },
    Figure {
        id: "B8",
        run: b8::run,
        about: b8::ABOUT,
    },
    Figure {
        id: "B9",
        run: b9::run,
        about: b9::ABOUT,
    },
    Figure {
        id: "B10",
        run: b10::run,
        about: b10::ABOUT,
    },
    Figure {
        id: "B11",
        run: b11::run,
        about: b11::ABOUT,
    },
    Figure {
        id: "B12",
        run: b12::run,
        about: b12::ABOUT,
    },
    Figure {
        id: "B13",
        run: b13::run,
        about: b13::ABOUT,
    },
];
