//! The layer check (docs/architecture.md): every module of `src/` may import only modules
//! below it in the order written there, and every module must have a place in it. A new
//! module, or an import that points up, fails here with the file and line that did it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Top to bottom; the same list as docs/architecture.md.
const ORDER: &[&str] = &[
    "cli", "daemon", "control", "fuse", "fs", "snapshot", "schedule", "policy", "track", "store",
    "config", "ids", "sys",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file of `src/` belongs to (None for lib.rs and main.rs).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()?
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_string();
    (name != "lib" && name != "main").then_some(name)
}

/// The top-level modules a line of code names through `crate::` (including grouped
/// `use crate::{a, b::c}`), ignoring comments.
fn crate_refs(line: &str) -> Vec<String> {
    let code = match line.find("//") {
        Some(i) => &line[..i],
        None => line,
    };
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let inner = group.split('}').next().unwrap_or("");
            out.extend(
                inner
                    .split(',')
                    .map(|p| ident(p.trim()))
                    .filter(|s| !s.is_empty()),
            );
        } else {
            out.push(ident(after));
        }
        rest = after;
    }
    out
}

#[test]
fn every_import_points_down_the_layer_order() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rank: BTreeMap<&str, usize> = ORDER.iter().enumerate().map(|(i, m)| (*m, i)).collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut up = Vec::new();
    let mut unplaced = Vec::new();
    for f in &files {
        let Some(m) = module_of(&src, f) else {
            continue;
        };
        let Some(&mine) = rank.get(m.as_str()) else {
            unplaced.push(f.display().to_string());
            continue;
        };
        let text = std::fs::read_to_string(f).unwrap();
        for (n, line) in text.lines().enumerate() {
            for target in crate_refs(line) {
                if target == m {
                    continue;
                }
                match rank.get(target.as_str()) {
                    Some(&theirs) if theirs > mine => {}
                    Some(_) => up.push(format!(
                        "{}:{}: {m} imports {target}, which is above it",
                        f.strip_prefix(&src).unwrap().display(),
                        n + 1
                    )),
                    None => up.push(format!(
                        "{}:{}: {m} names crate::{target}, which has no place in the layer order",
                        f.strip_prefix(&src).unwrap().display(),
                        n + 1
                    )),
                }
            }
        }
    }
    assert!(
        unplaced.is_empty(),
        "modules with no place in the layer order (add them to docs/architecture.md and ORDER): {unplaced:?}"
    );
    assert!(
        up.is_empty(),
        "imports that point up the layer order:\n{}",
        up.join("\n")
    );
}

#[test]
fn the_check_sees_grouped_imports_and_ignores_comments() {
    assert_eq!(crate_refs("use crate::fs::sys;"), vec!["fs"]);
    assert_eq!(
        crate_refs("use crate::{ids::VolumeId, sys};"),
        vec!["ids", "sys"]
    );
    assert_eq!(
        crate_refs("let x = 1; // see crate::daemon"),
        Vec::<String>::new()
    );
    assert_eq!(
        crate_refs("a(crate::track::now(), crate::store::X)"),
        vec!["track", "store"]
    );
}

#[test]
fn the_documented_order_is_the_checked_one() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md"))
            .unwrap();
    let line = doc
        .lines()
        .find(|l| l.starts_with("Layer order:"))
        .expect("docs/architecture.md has a 'Layer order:' line");
    let listed: Vec<&str> = line["Layer order:".len()..]
        .split('>')
        .map(|s| s.trim().trim_matches('`'))
        .filter(|s| !s.is_empty() && *s != "main")
        .collect();
    assert_eq!(listed, ORDER);
}
