//! The shape of `src/`, checked, and the documents that describe it checked
//! against it:
//!
//! - no import circle between any two files (every `use` or path naming
//!   another file of the crate: `crate::`, `super::` and `self::` alike), so
//!   every folder is a one-way chain;
//! - no circle between the top-level modules either, the store below all but
//!   the core and the metrics, and no backend type named outside its folder;
//! - no source file so large it holds several concerns;
//! - ARCHITECTURE.md's drawing and table, the README's module list and each
//!   folder's module doc say what the code has.
//!
//! A path counts where it is written, not where it leads through a
//! re-export: `crate::proxy::Idempotency` depends on `proxy/mod.rs`.
//! Comments, strings and everything from a file's first `#[cfg(test)]` on
//! are skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Largest non-test part of a source file, in lines.
const MAX_LINES: usize = 600;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

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

/// A crate of this package: its root file's folder. Module `a::b` of a crate
/// rooted in `dir` is `dir/a/b.rs` or `dir/a/b/mod.rs`.
#[derive(Clone)]
struct Crate {
    dir: PathBuf,
    root: PathBuf,
}

impl Crate {
    fn of(file: &Path) -> Crate {
        let src = src();
        let bin = src.join("bin");
        match file.strip_prefix(&bin) {
            // src/bin/<name>/...: a binary crate rooted at its main.rs.
            Ok(rest) => {
                let name = rest.components().next().unwrap();
                let dir = bin.join(name);
                Crate {
                    root: dir.join("main.rs"),
                    dir,
                }
            }
            Err(_) => Crate {
                root: src.join("lib.rs"),
                dir: src,
            },
        }
    }

    /// The module path of a file.
    fn module_of(&self, file: &Path) -> Vec<String> {
        if file == self.root {
            return Vec::new();
        }
        let rel = file.strip_prefix(&self.dir).unwrap();
        let mut parts: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        let last = parts.pop().unwrap();
        if last != "mod.rs" {
            parts.push(last.trim_end_matches(".rs").to_owned());
        }
        parts
    }

    /// The file of a module path, if there is one.
    fn file_of(&self, module: &[String]) -> Option<PathBuf> {
        if module.is_empty() {
            return Some(self.root.clone());
        }
        let base = module
            .iter()
            .fold(self.dir.clone(), |p, segment| p.join(segment));
        let file = base.with_extension("rs");
        if file.is_file() {
            return Some(file);
        }
        let file = base.join("mod.rs");
        file.is_file().then_some(file)
    }
}

/// The code of a file up to its first `#[cfg(test)]`, without comments and
/// with string and char literals emptied.
fn code(text: &str) -> String {
    let end = text.find("#[cfg(test)]").unwrap_or(text.len());
    let text = &text[..end];
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        if rest.starts_with("//") {
            i += rest.find('\n').unwrap_or(rest.len());
        } else if rest.starts_with("/*") {
            i += rest.find("*/").map_or(rest.len(), |e| e + 2);
            out.push(' ');
        } else if rest.starts_with("r#\"") || rest.starts_with("r\"") {
            let hashes = rest[1..].chars().take_while(|&c| c == '#').count();
            let close = format!("\"{}", "#".repeat(hashes));
            let open = 2 + hashes;
            i += rest[open..]
                .find(&close)
                .map_or(rest.len(), |e| open + e + close.len());
            out.push_str("\"\"");
        } else if bytes[i] == b'"' {
            let mut j = i + 1;
            while j < bytes.len() && bytes[j] != b'"' {
                j += if bytes[j] == b'\\' { 2 } else { 1 };
            }
            i = j + 1;
            out.push_str("\"\"");
        } else if bytes[i] == b'\'' && is_char_literal(rest) {
            let len = rest[1..].find('\'').map_or(1, |e| e + 2);
            i += len;
            out.push_str("' '");
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// `'x'` or `'\n'`, as opposed to a lifetime `'a`.
fn is_char_literal(s: &str) -> bool {
    let b = s.as_bytes();
    (b.len() >= 3 && b[1] != b'\\' && s[1..].chars().nth(1) == Some('\''))
        || (b.len() >= 4 && b[1] == b'\\')
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Path,
    Punct(char),
}

fn tokens(code: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut chars = code.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_alphanumeric() || c == '_' {
            let mut s = String::from(c);
            while let Some(&n) = chars.peek() {
                if n.is_alphanumeric() || n == '_' {
                    s.push(n);
                    chars.next();
                } else {
                    break;
                }
            }
            out.push(Token::Ident(s));
        } else if c == ':' && chars.peek() == Some(&':') {
            chars.next();
            out.push(Token::Path);
        } else if !c.is_whitespace() {
            out.push(Token::Punct(c));
        }
    }
    out
}

/// Every path a file names: those of its `use` trees, expanded, and those
/// written inline (`a::b`), whether they lead into the crate or not.
fn paths(code: &str) -> Vec<Vec<String>> {
    let toks = tokens(code);
    let mut out = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        if toks[i] == Token::Ident("use".into()) {
            let end = (i..toks.len())
                .find(|&j| toks[j] == Token::Punct(';'))
                .unwrap_or(toks.len());
            let mut pos = i + 1;
            use_tree(&toks[..end], &mut pos, Vec::new(), &mut out);
            i = end;
            continue;
        }
        if let Token::Ident(first) = &toks[i] {
            let after_path = i > 0 && toks[i - 1] == Token::Path;
            if !after_path && toks.get(i + 1) == Some(&Token::Path) {
                let mut path = vec![first.clone()];
                let mut j = i + 1;
                while toks.get(j) == Some(&Token::Path) {
                    match toks.get(j + 1) {
                        Some(Token::Ident(s)) => path.push(s.clone()),
                        _ => break,
                    }
                    j += 2;
                }
                out.push(path);
                i = j;
                continue;
            }
        }
        i += 1;
    }
    out
}

/// Expands one use tree from `toks[*pos]` on, under `prefix`.
fn use_tree(toks: &[Token], pos: &mut usize, mut prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    loop {
        match toks.get(*pos) {
            Some(Token::Ident(s)) if s == "as" => {
                *pos += 2;
                break;
            }
            Some(Token::Ident(s)) => {
                prefix.push(s.clone());
                *pos += 1;
            }
            Some(Token::Path) => *pos += 1,
            Some(Token::Punct('{')) => {
                *pos += 1;
                while let Some(t) = toks.get(*pos) {
                    match t {
                        Token::Punct('}') => {
                            *pos += 1;
                            break;
                        }
                        Token::Punct(',') => *pos += 1,
                        _ => use_tree(toks, pos, prefix.clone(), out),
                    }
                }
                return;
            }
            Some(Token::Punct('*')) => {
                *pos += 1;
                break;
            }
            _ => break,
        }
    }
    // `a::{self, b}`: `self` names the prefix itself.
    if prefix.last().is_some_and(|s| s == "self") && prefix.len() > 1 {
        prefix.pop();
    }
    if !prefix.is_empty() {
        out.push(prefix);
    }
}

/// The file a path written in `from` leads to, or `None` if it leads
/// outside the crate's files (a dependency, or an item of the file itself).
fn target(krate: &Crate, from: &Path, path: &[String]) -> Option<PathBuf> {
    let here = krate.module_of(from);
    let (mut module, mut rest): (Vec<String>, &[String]) = match path[0].as_str() {
        "crate" => (Vec::new(), &path[1..]),
        "self" => (here.clone(), &path[1..]),
        "super" => (here[..here.len().saturating_sub(1)].to_vec(), &path[1..]),
        // `child::x` names a module of this file's own, if it has one by
        // that name; else it is a dependency's path (`http::Method`).
        child => {
            let mut inner = here.clone();
            inner.push(child.to_owned());
            krate.file_of(&inner)?;
            (here.clone(), path)
        }
    };
    while rest.first().is_some_and(|s| s == "super") {
        module.pop();
        rest = &rest[1..];
    }
    let mut found = krate.file_of(&module);
    for segment in rest {
        module.push(segment.clone());
        match krate.file_of(&module) {
            Some(f) => found = Some(f),
            None => break,
        }
    }
    found.filter(|f| f != from)
}

/// File → the files it names.
fn file_graph() -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut graph = BTreeMap::new();
    for f in files {
        let krate = Crate::of(&f);
        let text = fs::read_to_string(&f).unwrap();
        let deps: BTreeSet<PathBuf> = paths(&code(&text))
            .iter()
            .filter_map(|p| target(&krate, &f, p))
            .collect();
        graph.insert(f, deps);
    }
    graph
}

fn rel(p: &Path) -> String {
    p.strip_prefix(src())
        .unwrap_or(p)
        .to_string_lossy()
        .into_owned()
}

/// The top-level module of a library file (`None` for the crate root and
/// the binaries).
fn top_module(file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src()).ok()?;
    let first = rel.components().next()?.as_os_str().to_string_lossy();
    match first.as_ref() {
        "lib.rs" | "bin" => None,
        f => Some(f.trim_end_matches(".rs").to_owned()),
    }
}

/// Top-level module → the top-level modules it names.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file, deps) in file_graph() {
        let Some(m) = top_module(&file) else { continue };
        let entry = graph.entry(m.clone()).or_default();
        for d in deps {
            if let Some(t) = top_module(&d).filter(|t| *t != m) {
                entry.insert(t);
            }
        }
    }
    graph
}

/// A cycle in `graph`, if there is one (depth-first search).
fn find_cycle<N: Ord + Clone>(graph: &BTreeMap<N, BTreeSet<N>>) -> Option<Vec<N>> {
    fn visit<N: Ord + Clone>(
        node: &N,
        graph: &BTreeMap<N, BTreeSet<N>>,
        state: &mut BTreeMap<N, u8>,
        path: &mut Vec<N>,
    ) -> Option<Vec<N>> {
        match state.get(node) {
            Some(2) => return None,
            Some(1) => {
                let start = path.iter().position(|n| n == node).unwrap();
                let mut cycle = path[start..].to_vec();
                cycle.push(node.clone());
                return Some(cycle);
            }
            _ => {}
        }
        state.insert(node.clone(), 1);
        path.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(node.clone(), 2);
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

/// Every node reachable from each node.
fn closure(graph: &BTreeMap<String, BTreeSet<String>>) -> BTreeMap<String, BTreeSet<String>> {
    graph
        .keys()
        .map(|start| {
            let mut seen = BTreeSet::new();
            let mut todo = vec![start.clone()];
            while let Some(n) = todo.pop() {
                for next in graph.get(&n).into_iter().flatten() {
                    if seen.insert(next.clone()) {
                        todo.push(next.clone());
                    }
                }
            }
            (start.clone(), seen)
        })
        .collect()
}

#[test]
fn no_file_imports_a_file_that_imports_it_back() {
    let graph = file_graph();
    if let Some(cycle) = find_cycle(&graph) {
        let names: Vec<String> = cycle.iter().map(|p| rel(p)).collect();
        panic!("import circle among src/ files: {}", names.join(" -> "));
    }
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let graph = module_graph();
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "import circle among src/ modules: {}\ngraph: {graph:#?}",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn the_store_sits_below_everything_but_the_core_and_the_metrics() {
    let graph = module_graph();
    let store: Vec<&String> = graph["store"].iter().collect();
    assert_eq!(store, ["checker", "idempotency", "metrics"], "{graph:#?}");
    for leaf in ["idempotency", "metrics", "checker"] {
        assert!(graph[leaf].is_empty(), "{leaf}: {graph:#?}");
    }
}

#[test]
fn no_backend_is_named_outside_its_folder() {
    let store = src().join("store");
    let backends: Vec<PathBuf> = fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert!(backends.len() >= 2, "{backends:?}");
    let registry = store.join("registry.rs");
    let mut outside = Vec::new();
    for (file, deps) in file_graph() {
        for d in deps {
            let inside = |dir: &PathBuf| d.starts_with(dir) && !file.starts_with(dir);
            if backends.iter().any(inside) && file != registry {
                outside.push(format!("{} -> {}", rel(&file), rel(&d)));
            }
        }
    }
    assert!(
        outside.is_empty(),
        "only store/registry.rs opens a backend's folder: {outside:#?}"
    );
}

#[test]
fn the_checks_find_what_they_look_for() {
    let mut g = BTreeMap::new();
    g.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    g.insert("b".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(
        find_cycle(&g),
        Some(vec!["a".into(), "b".into(), "a".into()])
    );
    g.insert("b".to_owned(), BTreeSet::new());
    assert_eq!(find_cycle(&g), None);

    let text = "use super::{a::X, b, c::{self, d::Y as Z}};\n\
                // use crate::commented;\n\
                let s = \"crate::in_a_string\";\n\
                fn f<'a>(x: &'a u8) -> char { crate::body::full(); 'x' }\n\
                pub(super) fn g() { self::h::i(); }\n\
                #[cfg(test)]\nuse crate::tests_only;";
    let found: Vec<String> = paths(&code(text))
        .iter()
        .map(|p| p.join("::"))
        .filter(|p| !p.starts_with("std"))
        .collect();
    assert_eq!(
        found,
        [
            "super::a::X",
            "super::b",
            "super::c",
            "super::c::d::Y",
            "crate::body::full",
            "self::h::i"
        ]
    );
    // `super::` from a leaf file is its folder; from a mod.rs, the parent.
    let krate = Crate::of(&src().join("proxy/flow.rs"));
    let p = |s: &str| s.split("::").map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(
        target(&krate, &src().join("proxy/flow.rs"), &p("super::job::Job")),
        Some(src().join("proxy/job.rs"))
    );
    assert_eq!(
        target(
            &krate,
            &src().join("proxy/mod.rs"),
            &p("super::store::Store")
        ),
        Some(src().join("store/mod.rs"))
    );
    assert_eq!(
        target(&krate, &src().join("proxy/flow.rs"), &p("crate::Body")),
        Some(src().join("lib.rs"))
    );
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

fn doc(name: &str) -> String {
    fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(name)).unwrap()
}

/// The `a --> b` edges of ARCHITECTURE.md's mermaid drawing.
fn drawn_edges() -> BTreeMap<String, BTreeSet<String>> {
    let text = doc("ARCHITECTURE.md");
    let start = text.find("```mermaid").expect("a mermaid drawing");
    let end = start + text[start..].find("\n```\n").unwrap();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text[start..end].lines() {
        if let Some((a, b)) = line.split_once("-->") {
            let (a, b) = (a.trim().to_owned(), b.trim().to_owned());
            graph.entry(b.clone()).or_default();
            graph.entry(a).or_default().insert(b);
        }
    }
    graph
}

#[test]
fn the_architecture_drawing_is_the_module_graph() {
    let code = module_graph();
    let drawn = drawn_edges();
    let mut wrong = Vec::new();
    for (a, bs) in &drawn {
        for b in bs {
            if !code.get(a).is_some_and(|d| d.contains(b)) {
                wrong.push(format!("drawn but not in the code: {a} --> {b}"));
            }
        }
    }
    // Edges the drawing leaves out must be reachable through drawn ones.
    let reach = closure(&drawn);
    for (a, bs) in &code {
        for b in bs {
            if !reach.get(a).is_some_and(|r| r.contains(b)) {
                wrong.push(format!(
                    "in the code but not drawn or reachable: {a} --> {b}"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "ARCHITECTURE.md: {wrong:#?}");
}

#[test]
fn the_architecture_table_names_each_module_and_its_dependencies() {
    let code = module_graph();
    let text = doc("ARCHITECTURE.md");
    let mut rows = BTreeMap::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | `name/` or `name.rs` | what | depends on |
        if cells.len() == 5 && cells[1].starts_with('`') {
            let name = cells[1]
                .trim_matches('`')
                .trim_end_matches('/')
                .trim_end_matches(".rs")
                .to_owned();
            if !code.contains_key(&name) {
                continue;
            }
            // Every module named in backticks (a note in parentheses may
            // name what of it is used).
            let deps: BTreeSet<String> = cells[3]
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .filter(|d| code.contains_key(d))
                .collect();
            rows.insert(name, deps);
        }
    }
    let mut wrong = Vec::new();
    for (m, deps) in &code {
        match rows.get(m) {
            None => wrong.push(format!("{m}: no row")),
            Some(d) if d != deps => {
                wrong.push(format!("{m}: the table says {d:?}, the code has {deps:?}"))
            }
            Some(_) => {}
        }
    }
    assert!(wrong.is_empty(), "ARCHITECTURE.md's table: {wrong:#?}");
}

#[test]
fn the_readme_lists_every_top_level_module() {
    let text = doc("README.md");
    let start = text.find("## Development").unwrap();
    // One line per module: `src/name/` or `src/name.rs`, then what it holds.
    let listed: BTreeSet<String> = text[start..]
        .lines()
        .filter_map(|l| l.strip_prefix("src/"))
        .map(|l| {
            let name = l.split_whitespace().next().unwrap();
            name.trim_end_matches('/')
                .trim_end_matches(".rs")
                .to_owned()
        })
        .filter(|name| !name.starts_with("bin") && name != "lib")
        .collect();
    let modules: BTreeSet<String> = module_graph().keys().cloned().collect();
    assert_eq!(listed, modules, "README's Development list");
}

#[test]
fn every_folder_doc_names_its_files() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut wrong = Vec::new();
    for f in files.iter().filter(|f| f.ends_with("mod.rs")) {
        let dir = f.parent().unwrap();
        let text = fs::read_to_string(f).unwrap();
        let docs: String = text
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("//!"))
            .collect::<Vec<_>>()
            .join(" ");
        for entry in fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            let is_module = (p.is_dir() && p.join("mod.rs").is_file())
                || (p.extension().is_some_and(|e| e == "rs") && name != "mod" && name != "tests");
            if is_module
                && !docs.contains(&format!("`{name}`"))
                && !docs.contains(&format!("[`{name}`]"))
            {
                wrong.push(format!("{}: the module doc does not name `{name}`", rel(f)));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}
