//! The shape of `src/` (issue 15, machine-docs/ARCHITECTURE.md): folders are layers and every
//! `crate::` path points to the same layer or one below; no two modules import each other,
//! directly or round a longer circle; no file is much longer than ~500 lines outside its tests.

mod common;
use common::rust_files;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Layers, bottom first. A module may use its own layer and the ones before it.
const LAYERS: &[&[&str]] = &[
    &["error", "exit", "output"],
    &["config"],
    &["ident"],
    &["sys"],
    &["cluster"],
    &["state"],
    &["reap"],
    &["out"],
    &["run"],
    &["cli", "main", "lib"],
];

/// Longest a file may be before its `#[cfg(test)]` module.
const MAX_LINES: usize = 520;

fn layer_of(top: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&top))
}

/// `src/a/b.rs` → `a::b`; `src/a/mod.rs` → `a`; `src/x.rs` → `x`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap_or(file).with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

/// The code of a file up to its test module, without comments.
fn code_of(text: &str) -> Vec<String> {
    text.lines()
        .take_while(|l| !l.trim_start().starts_with("#[cfg(test)]"))
        .map(|l| l.split("//").next().unwrap_or_default().to_owned())
        .collect()
}

/// The modules `code` refers to with `crate::…` paths, resolved to the longest known module.
fn imports(code: &[String], known: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in code {
        let mut rest = line.as_str();
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let path: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
            let target = (1..=segs.len())
                .rev()
                .map(|n| segs[..n].join("::"))
                .find(|m| known.contains(m));
            if let Some(t) = target {
                out.insert(t);
            }
        }
    }
    out
}

struct Tree {
    /// module → (its code, the modules it imports)
    modules: BTreeMap<String, (usize, BTreeSet<String>)>,
}

fn read_tree() -> Tree {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let texts: Vec<(String, String)> = files
        .iter()
        .map(|f| {
            (
                module_of(&src, f),
                std::fs::read_to_string(f).expect("reading a source file"),
            )
        })
        .collect();
    let known: BTreeSet<String> = texts.iter().map(|(m, _)| m.clone()).collect();
    let modules = texts
        .into_iter()
        .map(|(m, text)| {
            let code = code_of(&text);
            let mut uses = imports(&code, &known);
            uses.remove(&m);
            (m, (code.len(), uses))
        })
        .collect();
    Tree { modules }
}

fn top(module: &str) -> &str {
    module.split("::").next().unwrap_or(module)
}

#[test]
fn imports_only_point_down_the_layers() {
    let tree = read_tree();
    assert!(
        tree.modules.len() > 20,
        "found only {} modules",
        tree.modules.len()
    );
    let mut wrong = Vec::new();
    for (m, (_, uses)) in &tree.modules {
        let Some(mine) = layer_of(top(m)) else {
            wrong.push(format!(
                "{m}: its folder is in no layer (tests/layers.rs LAYERS)"
            ));
            continue;
        };
        for u in uses {
            match layer_of(top(u)) {
                Some(theirs) if theirs <= mine => {}
                _ => wrong.push(format!("{m} uses {u}, a layer above it")),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports pointing up:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_import_circles() {
    let tree = read_tree();
    // Depth-first search for a back edge; report the circle it closes.
    fn visit(
        m: &str,
        tree: &Tree,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        circles: &mut Vec<String>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(i) = stack.iter().position(|s| s == m) {
            circles.push(format!("{} -> {m}", stack[i..].join(" -> ")));
            return;
        }
        stack.push(m.to_owned());
        if let Some((_, uses)) = tree.modules.get(m) {
            for u in uses {
                visit(u, tree, stack, done, circles);
            }
        }
        stack.pop();
        done.insert(m.to_owned());
    }
    let (mut done, mut circles) = (BTreeSet::new(), Vec::new());
    for m in tree.modules.keys() {
        visit(m, &tree, &mut Vec::new(), &mut done, &mut circles);
    }
    // `mod.rs` files that only declare submodules and re-export are fine to "use" them.
    circles.retain(|c| !c.is_empty());
    assert!(
        circles.is_empty(),
        "import circles:\n{}",
        circles.join("\n")
    );
}

#[test]
fn no_file_is_much_longer_than_500_lines_outside_its_tests() {
    let tree = read_tree();
    let long: Vec<String> = tree
        .modules
        .iter()
        .filter(|(_, (lines, _))| *lines > MAX_LINES)
        .map(|(m, (lines, _))| format!("{m}: {lines} lines"))
        .collect();
    assert!(
        long.is_empty(),
        "files over {MAX_LINES} lines:\n{}",
        long.join("\n")
    );
}

/// The checks can fail: a path upward and a circle are found.
#[test]
fn the_checks_find_what_they_look_for() {
    let known: BTreeSet<String> = ["state", "state::lock", "run"].map(String::from).into();
    let code = vec!["use crate::run::app_lock_name; crate::state::lock::x()".to_owned()];
    assert_eq!(
        imports(&code, &known),
        ["run", "state::lock"].map(String::from).into()
    );
    assert!(layer_of("run") > layer_of("state"));
    assert_eq!(module_of(Path::new("/s"), Path::new("/s/a/mod.rs")), "a");
    assert_eq!(module_of(Path::new("/s"), Path::new("/s/a/b.rs")), "a::b");
}
