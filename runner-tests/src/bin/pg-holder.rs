//! `pg-holder --ready F`: starts a throwaway PostgreSQL ([`runner_tests::Postgres`]), writes
//! `<postmaster pid> <server dir>` to F (atomically), then waits for ever (until killed; the
//! test removes the dir its killed fixture could not). The fixture's
//! self-test SIGKILLs it to prove that a killed test takes its server down with it.

use runner_tests::helper::Cli;
use runner_tests::Postgres;

fn main() {
    let mut cli = Cli::new("pg-holder", "pg-holder --ready FILE");
    let flag = cli.next().unwrap_or_else(|| cli.usage("missing --ready"));
    if flag != "--ready" {
        cli.unexpected(&flag);
    }
    let ready = cli.path("--ready");
    let pg = Postgres::start();
    cli.write_ready(
        &ready,
        format!("{} {}", pg.pid(), pg.socket_dir().display()),
    );
    loop {
        std::thread::park(); // until killed: nothing to wait for
    }
}
