//! `tether completions SHELL` and `tether man [--dir DIR]` (issue 18, D36): generated from the
//! same clap definitions that parse the command line, so they cannot drift from it.

use crate::sys::safe_fs::Dir;
use clap::Args;
use nix::fcntl::OFlag;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub(crate) struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub(crate) shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub(crate) struct ManArgs {
    /// Write every page (tether.1, tether-run.1, …) into this existing directory, one path a
    /// line on stdout, instead of printing tether(1).
    #[arg(long, value_name = "DIR")]
    pub(crate) dir: Option<PathBuf>,
}

/// Print the completion script for `args.shell` on stdout.
pub(super) fn completions(args: CompletionsArgs, mut cmd: clap::Command) -> i32 {
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "tether", &mut script);
    crate::output::stdout(&String::from_utf8_lossy(&script));
    0
}

/// tether(1) on stdout, or every page into `args.dir`.
pub(super) fn man(args: ManArgs, cmd: clap::Command) -> i32 {
    // `tether help run` works on the command line; as a man page it would only repeat.
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let Some(dir) = args.dir else {
        return match render(&cmd) {
            Ok(page) => {
                crate::output::stdout(&String::from_utf8_lossy(&page));
                0
            }
            Err(e) => fail(&format!("cannot render the man page: {e}")),
        };
    };
    // The operator's own directory, opened once; pages are created in it by name through the
    // fd (O_NOFOLLOW: a symlink at a page's name is refused, not written through).
    let out = match Dir::open_unchecked(&dir) {
        Ok(d) => d,
        Err(e) => return fail(&format!("man --dir {}: {e}", dir.display())),
    };
    let mut written = String::new();
    for page in pages(&cmd) {
        let name = clap_mangen::Man::new(page.clone()).get_filename();
        let done = render(&page).and_then(|text| {
            let mut f = out.open_file(
                &name,
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC,
                0o644,
            )?;
            f.write_all(&text)
        });
        if let Err(e) = done {
            return fail(&format!("man --dir {}: {name}: {e}", dir.display()));
        }
        written.push_str(&format!("{}\n", out.join(&name).display()));
    }
    crate::output::stdout(&written);
    0
}

/// `cmd` and every visible subcommand under it, parents first.
fn pages(cmd: &clap::Command) -> Vec<clap::Command> {
    let mut out = vec![cmd.clone()];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        out.extend(pages(sub));
    }
    out
}

/// What tether(1) says beyond the clap definitions: exit codes, files, where to read more.
const ROOT_SECTIONS: &str = r#".SH "EXIT STATUS"
.TP
\fIthe command's status\fR
the command exited by itself (128+N when a signal N that tether did not send killed it)
.TP
143, 130, 129
tether got SIGTERM (or its parent died, or the CI agent died), SIGINT, SIGHUP and tore down
.TP
142
the deadline passed and tether tore down
.TP
75
\fB\-\-lock\-timeout\fR passed, or \fB\-\-on\-busy fail\fR found the app busy; nothing ran
.TP
125
tether's own failure (a usage error too: one line \fBtether: usage: ...\fR), or the teardown failed after a command that passed
.TP
126, 127
the command is not executable, not found
.SH FILES
.TP
/etc/tether/config.yml, ~/.config/tether/config.yml
the configuration (\fBtether config show\fR prints what applies)
.TP
/run/lock/tether, ~/.local/state/tether/locks
app locks and slots
.TP
/var/lib/tether/runs, ~/.local/state/tether/runs
run dirs and their records
.SH "SEE ALSO"
\fBtether\-run\fR(1), \fBtether\-janitor\fR(1), \fBflock\fR(1), \fBtimeout\fR(1);
/usr/share/doc/tether/README.md when installed from the package
"#;

/// One page; tether(1) gets `ROOT_SECTIONS` after clap's own.
fn render(cmd: &clap::Command) -> std::io::Result<Vec<u8>> {
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    if cmd.get_display_name().is_none_or(|n| n == cmd.get_name()) {
        page.extend_from_slice(ROOT_SECTIONS.as_bytes());
    }
    Ok(page)
}

fn fail(msg: &str) -> i32 {
    crate::output::error(msg);
    crate::exit::TETHER_FAILURE
}
