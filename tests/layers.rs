//! The source tree's shape keeps: imports run only down the layers, and no two files import
//! each other, directly or in a ring.
//!
//! The layers, lowest first, are the folders of `src/` (see the crate map in `src/lib.rs`):
//! `core` → `store` → `plugins` → `audit` → `actor` → the library API at the top of `src/`
//! (`context`, `config`, `error`, `trace`, `alloc`) → `interface` → the programs (`main.rs`,
//! `src/bin/`). A file may name its own layer and the layers below it; naming one above it is
//! an upward import and fails this test with the file, the line and the layer it named.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first. A top-level file of `src/` (other than `lib.rs` and `main.rs`) is
/// in the `api` layer.
const LAYERS: &[&str] = &[
    "core",
    "store",
    "plugins",
    "audit",
    "actor",
    "api",
    "interface",
    "bin",
];

/// The files directly in `src/` that make up the library API layer.
const API_FILES: &[&str] = &["context", "config", "error", "trace", "alloc"];

fn rank(layer: &str) -> usize {
    LAYERS
        .iter()
        .position(|l| *l == layer)
        .unwrap_or_else(|| panic!("unknown layer {layer}"))
}

/// The layer a source file (path relative to `src/`) belongs to, or `None` for `lib.rs`, which
/// declares every layer and so names them all.
fn layer_of_file(rel: &str) -> Option<&'static str> {
    if rel == "lib.rs" {
        return None;
    }
    if rel == "main.rs" || rel.starts_with("bin/") {
        return Some("bin");
    }
    let first = rel.split('/').next().unwrap_or(rel);
    let stem = first.strip_suffix(".rs").unwrap_or(first);
    LAYERS
        .iter()
        .find(|l| **l == stem)
        .copied()
        .or_else(|| API_FILES.contains(&stem).then_some("api"))
}

/// The layer a path `crate::SEG::…` (or `pcx::SEG::…`) names by its first segment.
fn layer_of_segment(seg: &str) -> Option<&'static str> {
    LAYERS
        .iter()
        .find(|l| **l == seg && **l != "api" && **l != "bin")
        .copied()
        .or_else(|| API_FILES.contains(&seg).then_some("api"))
}

/// A source line with its comments and string literals blanked, so prose that mentions a
/// module is not taken for an import.
fn code_of(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    let mut in_str = false;
    while let Some(c) = chars.next() {
        if in_str {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '/' if chars.peek() == Some(&'/') => break,
            _ => out.push(c),
        }
    }
    out
}

/// Every module path a line names through `crate::` (or `pcx::` for the programs), including
/// each path of a `use crate::{a::X, b::Y}` group, as its segments.
fn named_paths(code: &str, root: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let marker = format!("{root}::");
    let mut rest = code;
    while let Some(at) = rest.find(&marker) {
        let before = rest[..at].chars().last();
        rest = &rest[at + marker.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let segs: Vec<String> = item
                    .trim()
                    .split("::")
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                if !segs.is_empty() {
                    paths.push(segs);
                }
            }
            continue;
        }
        let segs: Vec<String> = rest
            .split("::")
            .map(|s| {
                s.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .take_while(|s| !s.is_empty())
            .collect();
        if !segs.is_empty() {
            paths.push(segs);
        }
    }
    paths
}

/// One upward import.
#[derive(Debug, PartialEq, Eq)]
struct Upward {
    file: String,
    line: usize,
    layer: &'static str,
    names: String,
}

/// The source files, by path relative to `src/`, and the module path each one is (`store::journal`).
fn module_of_file(rel: &str) -> Vec<String> {
    let trimmed = rel.strip_suffix(".rs").unwrap_or(rel);
    let mut segs: Vec<String> = trimmed.split('/').map(str::to_string).collect();
    if segs.last().is_some_and(|s| s == "mod") {
        segs.pop();
    }
    segs
}

/// Checks a set of library files (path relative to `src/` → text): the upward imports, and the
/// rings among files (each ring as its files in order).
fn check(files: &BTreeMap<String, String>) -> (Vec<Upward>, Vec<Vec<String>>) {
    let mut upward = Vec::new();
    let modules: BTreeMap<Vec<String>, String> = files
        .keys()
        .map(|rel| (module_of_file(rel), rel.clone()))
        .collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, text) in files {
        let Some(layer) = layer_of_file(rel) else {
            continue;
        };
        let root = if layer == "bin" { "pcx" } else { "crate" };
        let own = module_of_file(rel);
        let mut in_tests = false;
        for (n, line) in text.lines().enumerate() {
            // Unit tests may reach anywhere: they test, they are not the layer's shape.
            if line.trim_start().starts_with("#[cfg(test)]") {
                in_tests = true;
            }
            if in_tests {
                continue;
            }
            let code = code_of(line);
            let mut paths = named_paths(&code, root);
            // `super::x` names a sibling of this file's module.
            for segs in named_paths(&code, "super") {
                let mut full: Vec<String> = own[..own.len().saturating_sub(1)].to_vec();
                full.extend(segs);
                paths.push(full);
            }
            for segs in paths {
                let Some(named) = layer_of_segment(&segs[0]) else {
                    continue;
                };
                if rank(named) > rank(layer) {
                    upward.push(Upward {
                        file: rel.clone(),
                        line: n + 1,
                        layer: named,
                        names: segs.join("::"),
                    });
                }
                // The longest prefix of the path that is a file is the file it imports.
                for len in (1..=segs.len()).rev() {
                    if let Some(target) = modules.get(&segs[..len]) {
                        if target != rel && !own.starts_with(&segs[..len]) {
                            edges.entry(rel.clone()).or_default().insert(target.clone());
                        }
                        break;
                    }
                }
            }
        }
    }
    (upward, rings(&edges))
}

/// The rings in a graph of files: each strongly connected set of two or more files (Tarjan).
fn rings(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Walk<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(w: &mut Walk<'a>, v: &'a str) {
        let i = w.index.len();
        w.index.insert(v, i);
        w.low.insert(v, i);
        w.stack.push(v);
        w.on_stack.insert(v);
        if let Some(next) = w.edges.get(v) {
            for u in next {
                let u = u.as_str();
                if !w.index.contains_key(u) {
                    visit(w, u);
                    let lu = w.low[u];
                    let lv = w.low[v];
                    w.low.insert(v, lv.min(lu));
                } else if w.on_stack.contains(u) {
                    let iu = w.index[u];
                    let lv = w.low[v];
                    w.low.insert(v, lv.min(iu));
                }
            }
        }
        if w.low[v] == w.index[v] {
            let mut ring = Vec::new();
            while let Some(u) = w.stack.pop() {
                w.on_stack.remove(u);
                ring.push(u.to_string());
                if u == v {
                    break;
                }
            }
            if ring.len() > 1 {
                ring.sort();
                w.found.push(ring);
            }
        }
    }
    let mut w = Walk {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in edges.keys() {
        if !w.index.contains_key(v.as_str()) {
            visit(&mut w, v);
        }
    }
    w.found
}

fn source_files(dir: &Path, src: &Path, out: &mut BTreeMap<String, String>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            source_files(&path, src, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path
                .strip_prefix(src)
                .expect("under src")
                .to_string_lossy()
                .replace('\\', "/");
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            out.insert(rel, text);
        }
    }
}

fn the_tree() -> BTreeMap<String, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = BTreeMap::new();
    source_files(&src, &src, &mut files);
    files
}

#[test]
fn imports_only_run_down_the_layers() {
    let (upward, _) = check(&the_tree());
    let listed: Vec<String> = upward
        .iter()
        .map(|u| {
            format!(
                "{}:{} names {} (layer {})",
                u.file, u.line, u.names, u.layer
            )
        })
        .collect();
    assert!(
        listed.is_empty(),
        "upward imports (a layer may name only itself and the layers below it: {LAYERS:?}):\n{}",
        listed.join("\n")
    );
}

#[test]
fn no_two_files_import_each_other_directly_or_in_a_ring() {
    let (_, rings) = check(&the_tree());
    assert!(rings.is_empty(), "files that import each other: {rings:?}");
}

#[test]
fn every_file_of_src_is_in_a_layer() {
    let unplaced: Vec<String> = the_tree()
        .keys()
        .filter(|rel| *rel != "lib.rs" && layer_of_file(rel).is_none())
        .cloned()
        .collect();
    assert!(
        unplaced.is_empty(),
        "files outside every layer (add them to a layer's folder): {unplaced:?}"
    );
}

/// The check itself catches what it is for: an upward import planted in a copy of the tree.
#[test]
fn a_planted_upward_import_is_caught_with_its_file_and_line() {
    let mut files = the_tree();
    let journal = files
        .get_mut("store/journal.rs")
        .expect("the store has a journal");
    journal.push_str("\nuse crate::actor::committer::Committer;\n");
    let lines = journal.lines().count();
    let (upward, _) = check(&files);
    assert!(
        upward.contains(&Upward {
            file: "store/journal.rs".into(),
            line: lines,
            layer: "actor",
            names: "actor::committer::Committer".into(),
        }),
        "the planted import was not reported: {upward:?}"
    );
}

#[test]
fn a_planted_ring_is_caught() {
    let mut files = the_tree();
    files.insert("core/a.rs".into(), "use crate::core::b::X;\n".into());
    files.insert("core/b.rs".into(), "use super::a::Y;\n".into());
    let (_, rings) = check(&files);
    assert!(
        rings.contains(&vec!["core/a.rs".to_string(), "core/b.rs".to_string()]),
        "the planted ring was not reported: {rings:?}"
    );
}

#[test]
fn prose_and_strings_that_mention_a_layer_are_not_imports() {
    let mut files = BTreeMap::new();
    files.insert(
        "core/a.rs".to_string(),
        "// see crate::actor for who calls this\nconst S: &str = \"crate::interface\";\n"
            .to_string(),
    );
    let (upward, _) = check(&files);
    assert!(upward.is_empty(), "{upward:?}");
}
