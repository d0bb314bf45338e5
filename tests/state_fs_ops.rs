//! A static check (issue 13): nothing in `src/` changes, creates or removes a file by path,
//! where a user could swap what the path names between a check and the use. State is touched
//! through directory fds (`safe_fs`); the few path-based calls that remain (cgroupfs, the
//! operator's own `--summary-json` file, a test-only marker) carry a `// path-ok: <why>` comment
//! on the line before. Test modules (`#[cfg(test)]`, at the end of a file) are not checked.

mod common;
use common::rust_files;
use std::path::Path;

/// Calls that act on a path (std, nix, libc spellings).
const FORBIDDEN: &[&str] = &[
    "fs::set_permissions(",
    "fs::remove_dir_all(",
    "fs::remove_file(",
    "fs::remove_dir(",
    "fs::rename(",
    "fs::create_dir(",
    "fs::create_dir_all(",
    "fs::write(",
    "fs::hard_link(",
    "fs::symlink_metadata(",
    "DirBuilder",
    "File::create(",
    "OpenOptions::new()",
    "fs::chown(",
    "fs::lchown(",
    "unistd::chown(",
    "fchmodat(",
    "fchownat(",
    "libc::chmod(",
    "libc::chown(",
    "libc::lchown(",
    "libc::unlink(",
    "libc::rmdir(",
    "libc::rename(",
    "libc::mkdir(",
];

const MARKER: &str = "// path-ok:";

/// `file:line: text` of every unmarked path-based call in `text`.
fn violations(name: &str, text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        let code = line.split("//").next().unwrap_or_default();
        if !FORBIDDEN.iter().any(|f| code.contains(f)) {
            continue;
        }
        let marked = line.contains(MARKER)
            || lines[i.saturating_sub(3)..i]
                .iter()
                .any(|l| l.trim_start().starts_with(MARKER));
        if !marked {
            out.push(format!("{name}:{}: {}", i + 1, line.trim()));
        }
    }
    out
}

#[test]
fn src_changes_no_file_by_path_without_saying_why() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(
        files.len() > 10,
        "found only {} files under {}",
        files.len(),
        src.display()
    );
    let mut all = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("reading a source file");
        all.extend(violations(&f.display().to_string(), &text));
    }
    assert!(
        all.is_empty(),
        "path-based file system calls in src/ (use safe_fs::Dir, or say why with `{MARKER} …` \
         on the line before):\n{}",
        all.join("\n")
    );
}

/// The check can fail: it finds an unmarked call, accepts a marked one, and ignores tests.
#[test]
fn the_check_finds_what_it_looks_for() {
    let bad = "fn f() {\n    std::fs::set_permissions(p, m).unwrap();\n}\n";
    assert_eq!(violations("x.rs", bad).len(), 1);
    let chown = "nix::unistd::chown(&p, Some(u), None)?;\n";
    assert_eq!(violations("x.rs", chown).len(), 1);
    let marked = "// path-ok: cgroupfs\nstd::fs::remove_dir(&p)?;\n";
    assert!(violations("x.rs", marked).is_empty());
    let in_tests = "#[cfg(test)]\nmod tests {\n    std::fs::remove_file(p);\n}\n";
    assert!(violations("x.rs", in_tests).is_empty());
    let in_comment = "// we never call std::fs::remove_file( here\n";
    assert!(violations("x.rs", in_comment).is_empty());
}
