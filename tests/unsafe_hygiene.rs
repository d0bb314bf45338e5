//! Unsafe code to the standard of tini and catatonit (issue 15): every `unsafe` block says why
//! it is sound (`// SAFETY:` just above or on the same line), every `unsafe fn` documents its
//! contract (`# Safety`), and the crate denies unsafe operations in unsafe fns that are not in
//! a block of their own (`unsafe_op_in_unsafe_fn`).

mod common;
use common::rust_files;
use std::path::Path;

/// `file:line` of every `unsafe` block without a SAFETY comment and every `unsafe fn` without
/// a `# Safety` section in `text`.
fn findings(name: &str, text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let code = line.split("//").next().unwrap_or_default();
        let above = &lines[i.saturating_sub(4)..i];
        if code.contains("unsafe fn ") {
            // The doc comment right above (attributes may sit between).
            let doc_has_safety = lines[..i]
                .iter()
                .rev()
                .take_while(|l| {
                    let t = l.trim_start();
                    t.starts_with("///") || t.starts_with("#[")
                })
                .any(|l| l.contains("# Safety"));
            if !doc_has_safety {
                out.push(format!("{name}:{}: unsafe fn without `# Safety`", i + 1));
            }
        } else if code.contains("unsafe {") || code.trim_end().ends_with("unsafe") {
            let said = line.contains("SAFETY:") || above.iter().any(|l| l.contains("SAFETY:"));
            if !said {
                out.push(format!(
                    "{name}:{}: unsafe block without `// SAFETY:`",
                    i + 1
                ));
            }
        }
    }
    out
}

#[test]
fn every_unsafe_says_why() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let all: Vec<String> = files
        .iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(f).expect("reading a source file");
            findings(&f.display().to_string(), &text)
        })
        .collect();
    assert!(
        all.is_empty(),
        "unsafe code that does not say why:\n{}",
        all.join("\n")
    );
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("reading lib.rs");
    assert!(lib.contains("#![deny(unsafe_op_in_unsafe_fn)]"));
}

/// The check can fail.
#[test]
fn the_check_finds_what_it_looks_for() {
    assert_eq!(findings("x.rs", "let n = unsafe { f() };\n").len(), 1);
    assert!(findings(
        "x.rs",
        "// SAFETY: f has no contract.\nlet n = unsafe { f() };\n"
    )
    .is_empty());
    assert_eq!(
        findings("x.rs", "/// Does a thing.\nunsafe fn g() {}\n").len(),
        1
    );
    assert!(findings(
        "x.rs",
        "/// # Safety\n/// none\n#[inline]\nunsafe fn g() {}\n"
    )
    .is_empty());
}
