//! Finding the command before anything is created (CLI-CONTRACT §19): `execvp`'s rules, so a missing
//! or non-executable command is refused (127 / 126) with nothing left behind.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// How a command name resolves, checked before anything is created (CLI-CONTRACT §19).
pub(crate) enum Resolved {
    Found(PathBuf),
    NotFound(String),
    NotExecutable(String),
}

/// Resolve `program` the way `execvp` will: a name with a `/` is taken as a path, anything
/// else is searched in `path_var`.
pub(crate) fn resolve(program: &OsString, path_var: Option<&OsString>) -> Resolved {
    let name = Path::new(program);
    if program.is_empty() {
        return Resolved::NotFound("empty command".into());
    }
    if program.as_encoded_bytes().contains(&b'/') {
        return check_candidate(name).unwrap_or_else(|| {
            Resolved::NotFound(format!("command not found: {}", name.display()))
        });
    }
    let default_path = OsString::from("/usr/local/bin:/usr/bin:/bin");
    let search = path_var.unwrap_or(&default_path);
    let mut not_exec = None;
    for dir in std::env::split_paths(search) {
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        match check_candidate(&dir.join(name)) {
            Some(Resolved::Found(p)) => return Resolved::Found(p),
            Some(Resolved::NotExecutable(m)) => not_exec = not_exec.or(Some(m)),
            _ => {}
        }
    }
    not_exec
        .map(Resolved::NotExecutable)
        .unwrap_or_else(|| Resolved::NotFound(format!("command not found: {}", name.display())))
}

fn check_candidate(path: &Path) -> Option<Resolved> {
    let md = std::fs::metadata(path).ok()?;
    if md.is_dir() {
        return Some(Resolved::NotExecutable(format!(
            "command is a directory: {}",
            path.display()
        )));
    }
    use nix::unistd::{access, AccessFlags};
    if access(path, AccessFlags::X_OK).is_err() {
        return Some(Resolved::NotExecutable(format!(
            "command is not executable: {}",
            path.display()
        )));
    }
    Some(Resolved::Found(path.to_owned()))
}
