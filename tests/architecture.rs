//! The shape of `src/`, checked: no import circles among the top-level
//! modules (ARCHITECTURE.md draws the graph this derives), and no source
//! file so large it holds several concerns.
//!
//! A module depends on another when any of its files names
//! `crate::<other>` (in a `use` or a path). Doc comments are skipped: a
//! link is not a dependency.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Largest non-test part of a source file, in lines.
const MAX_LINES: usize = 600;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules of the library: `src/x.rs` or `src/x/`.
fn modules(src: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if matches!(name.as_str(), "lib" | "main" | "bin") {
            continue;
        }
        let mut files = Vec::new();
        if path.is_dir() {
            rust_files(&path, &mut files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        } else {
            continue;
        }
        out.entry(name).or_insert_with(Vec::new).extend(files);
    }
    out
}

/// Code lines without comments, up to the first `#[cfg(test)]`.
fn code(text: &str) -> Vec<&str> {
    text.lines()
        .take_while(|l| !l.trim_start().starts_with("#[cfg(test)]"))
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect()
}

fn dependencies(modules: &BTreeMap<String, Vec<PathBuf>>) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph = BTreeMap::new();
    for (name, files) in modules {
        let mut deps = BTreeSet::new();
        for f in files {
            let text = fs::read_to_string(f).unwrap();
            for line in code(&text) {
                for (i, _) in line.match_indices("crate::") {
                    let rest = &line[i + "crate::".len()..];
                    let target: String = rest
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if target != *name && modules.contains_key(&target) {
                        deps.insert(target);
                    }
                }
                // `use crate::{a, b::c}` groups.
                if let Some(group) = line.trim_start().strip_prefix("use crate::{") {
                    for part in group.split(',') {
                        let target: String = part
                            .trim()
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect();
                        if target != *name && modules.contains_key(&target) {
                            deps.insert(target);
                        }
                    }
                }
            }
        }
        graph.insert(name.clone(), deps);
    }
    graph
}

/// A cycle in `graph`, if there is one (depth-first search).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(node) {
            Some(2) => return None,
            Some(1) => {
                let start = path.iter().position(|n| n == node).unwrap();
                let mut cycle = path[start..].to_vec();
                cycle.push(node.to_owned());
                return Some(cycle);
            }
            _ => {}
        }
        state.insert(node.to_owned(), 1);
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(node.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if let Some(c) = visit(node, graph, &mut state, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let graph = dependencies(&modules(&src()));
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "import circle among src/ modules: {}\ngraph: {graph:#?}",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn the_store_sits_below_everything_but_the_core_and_the_metrics() {
    let graph = dependencies(&modules(&src()));
    let store: Vec<&String> = graph["store"].iter().collect();
    assert_eq!(store, ["idempotency", "metrics"], "{graph:#?}");
    assert!(graph["idempotency"].is_empty(), "{graph:#?}");
    assert!(graph["metrics"].is_empty(), "{graph:#?}");
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let mut g = BTreeMap::new();
    g.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    g.insert("b".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(
        find_cycle(&g),
        Some(vec!["a".into(), "b".into(), "a".into()])
    );
    g.insert("b".to_owned(), BTreeSet::new());
    assert_eq!(find_cycle(&g), None);
}

#[test]
fn no_source_file_is_too_large() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut large = Vec::new();
    for f in files {
        let text = fs::read_to_string(&f).unwrap();
        let n = text
            .lines()
            .take_while(|l| !l.trim_start().starts_with("#[cfg(test)]"))
            .count();
        if n >= MAX_LINES {
            large.push(format!("{}: {n} lines", f.display()));
        }
    }
    assert!(
        large.is_empty(),
        "over {MAX_LINES} lines: {}",
        large.join(", ")
    );
}
