//! The `tether` binary: parse, run, exit with the code the library decided.
fn main() {
    std::process::exit(tether::cli::main_with_args(std::env::args_os()));
}
