//! Cargo build script of the `tether` package (Cargo.toml `build`): hands the linker the
//! script that lays the run path's functions out together, `ci/link/hot-text.ld`
//! (DECISIONS D87). A run's two processes then map a fraction of the text they mapped with
//! the code spread over the whole binary (BENCHMARKS "B6"). Only for Linux targets: the
//! script uses `INSERT BEFORE .text`, which GNU ld and LLD read. An operator whose linker
//! does not read linker scripts sets `TETHER_NO_HOT_TEXT=1`.

use std::path::Path;

fn main() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("ci/link/hot-text.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-env-changed=TETHER_NO_HOT_TEXT");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux");
    let opted_out = std::env::var_os("TETHER_NO_HOT_TEXT").is_some_and(|v| !v.is_empty());
    if linux && !opted_out && script.is_file() {
        println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
    }
}
