//! The crate's module dependencies point one way. Reads every `crate::` path
//! (and every `super::` path that climbs to the crate root) in the code of
//! `src/`, comments and string literals left out, and checks that each
//! top-level module uses only modules of a lower layer, or of its own layer
//! without a cycle; see docs/architecture.md for the layers and why each
//! module sits where it does.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lowest first. A module may use any module of a lower layer, and modules of
/// its own layer as long as no cycle forms. Every module must be listed here.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "foundations",
        &[
            "clock", "text", "path", "body", "h1", "metrics", "config", "tls", "error", "logging", "version",
            "systemd", "trace",
        ],
    ),
    (
        "what the proxy learns about backends",
        &["breaker", "health", "retry", "ratelimit", "auth", "queue", "cluster", "backend"],
    ),
    ("choosing a backend", &["balance", "upstream", "route"]),
    ("the compiled snapshot", &["state"]),
    (
        "the request path and views of the snapshot",
        &["conn", "stream_timeout", "notes", "client", "observe", "proxy", "explain", "gauges", "probe", "discovery"],
    ),
    ("listeners", &["server", "admin"]),
    ("the running process", &["runtime", "upgrade"]),
    ("entry points", &["app", "demo", "fuzzing"]),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, modules)| modules.contains(&module))
}

/// Top-level modules of `src/` and the files each is made of.
fn modules(src: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut modules = BTreeMap::new();
    for entry in std::fs::read_dir(src).expect("src/ is readable") {
        let path = entry.expect("src/ entry").path();
        let name = path.file_stem().expect("a file name").to_string_lossy().into_owned();
        if path.is_dir() {
            let mut files = Vec::new();
            collect_rust_files(&path, &mut files);
            modules.insert(name, files);
        } else if path.extension().is_some_and(|e| e == "rs") && name != "lib" && name != "main" {
            modules.insert(name, vec![path]);
        }
    }
    modules
}

fn collect_rust_files(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("a module directory is readable") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            collect_rust_files(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// `source` with comments and the contents of string and character
/// literals blanked out (so that neither `// crate::x` nor `"crate::x"` nor
/// the `//` of `"http://"` is read as code). Line structure is kept.
fn code_only(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            // Block comments nest in Rust.
            let mut depth = 0;
            loop {
                if i >= chars.len() {
                    break;
                }
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && !is_ident(chars.get(i.wrapping_sub(1))) {
            // A raw string: r"..." or r#"..."#, no escapes.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            out.push('"');
            i = j + 1;
            while i < chars.len() {
                if chars[i] == '"' && (0..hashes).all(|h| chars.get(i + 1 + h) == Some(&'#')) {
                    i += 1 + hashes;
                    break;
                }
                out.push(blank(chars[i]));
                i += 1;
            }
            out.push('"');
        } else if c == '"' {
            out.push('"');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < chars.len() {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
            out.push('"');
            i += 1;
        } else if c == '\'' && char_literal_end(&chars, i).is_some() {
            let end = char_literal_end(&chars, i).unwrap();
            out.push_str(&" ".repeat(end - i + 1));
            i = end + 1;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn is_ident(c: Option<&char>) -> bool {
    c.is_some_and(|c| c.is_alphanumeric() || *c == '_')
}

/// Where the character literal starting at `at` ends (its closing quote), or
/// `None` for a lifetime (`'a`, `'static`).
fn char_literal_end(chars: &[char], at: usize) -> Option<usize> {
    match chars.get(at + 1)? {
        '\\' => (at + 3..chars.len().min(at + 12)).find(|&j| chars[j] == '\''),
        _ => (chars.get(at + 2) == Some(&'\'')).then_some(at + 2),
    }
}

/// The module path of a file under `src/` (`src/runtime/reload.rs` is
/// `runtime::reload`, `src/runtime/mod.rs` is `runtime`).
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src).expect("a file under src/");
    let mut path: Vec<String> = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = path.pop().expect("a file name");
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        path.push(stem.to_owned());
    }
    path
}

/// The top-level modules that `source`, the file at `module` (its module
/// path), names: `crate::` paths, `crate::{a, b::c}` groups included, and
/// `super::` paths that climb to the crate root.
fn crate_paths(source: &str, module: &[String]) -> BTreeSet<String> {
    let code = code_only(source);
    let mut used = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find(['c', 's']) {
        let before = &code[..code.len() - rest.len() + at];
        rest = &rest[at..];
        if is_ident(before.chars().last().as_ref()) {
            rest = &rest[1..];
            continue;
        }
        let path = if let Some(after) = rest.strip_prefix("crate::") {
            rest = after;
            Some(rest)
        } else if rest.starts_with("super::") {
            let mut climbs = 0;
            while let Some(after) = rest.strip_prefix("super::") {
                climbs += 1;
                rest = after.trim_start();
            }
            // Only a climb to the crate root names a top-level module.
            (climbs >= module.len()).then_some(rest)
        } else {
            rest = &rest[1..];
            None
        };
        let Some(path) = path else { continue };
        if let Some(group) = path.strip_prefix('{') {
            // Split the group at depth-0 commas; each item's first segment is a module.
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        used.insert(first_segment(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            used.insert(first_segment(&item));
        } else {
            used.insert(first_segment(path));
        }
    }
    used.remove("");
    used
}

fn first_segment(path: &str) -> String {
    path.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
}

fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = modules(&src);
    let graph: BTreeMap<String, BTreeSet<String>> = modules
        .iter()
        .map(|(module, files)| {
            let used = files
                .iter()
                .flat_map(|file| {
                    let source = std::fs::read_to_string(file).expect("source is readable");
                    crate_paths(&source, &module_path(&src, file))
                })
                .filter(|used| used != module && modules.contains_key(used))
                .collect();
            (module.clone(), used)
        })
        .collect();
    // A reader that found nothing would pass every check below.
    assert!(graph.len() >= 30, "only {} modules found in src/", graph.len());
    for (from, to) in KNOWN_EDGES {
        assert!(graph.get(*from).is_some_and(|used| used.contains(*to)), "the reader missed {from} -> {to}");
    }
    graph
}

/// Dependencies the code certainly has: if the reader misses one, it is broken.
const KNOWN_EDGES: &[(&str, &str)] =
    &[("app", "runtime"), ("runtime", "state"), ("proxy", "balance"), ("state", "config"), ("server", "conn")];

/// A cycle through `from`, if there is one (depth-first search).
fn cycle_through(graph: &BTreeMap<String, BTreeSet<String>>, from: &str) -> Option<Vec<String>> {
    fn walk(
        graph: &BTreeMap<String, BTreeSet<String>>,
        target: &str,
        at: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in graph.get(at).into_iter().flatten() {
            if next == target {
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(graph, target, next, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![from.to_owned()];
    walk(graph, from, from, &mut path, &mut BTreeSet::new()).then(|| {
        path.push(from.to_owned());
        path
    })
}

#[test]
fn every_module_has_a_layer() {
    let unplaced: Vec<String> = dependencies().into_keys().filter(|module| layer_of(module).is_none()).collect();
    assert!(unplaced.is_empty(), "modules missing from LAYERS (and docs/architecture.md): {unplaced:?}");
}

#[test]
fn dependencies_point_down_the_layers() {
    let mut upward = Vec::new();
    for (module, used) in dependencies() {
        let Some(own) = layer_of(&module) else { continue };
        for dependency in used {
            if layer_of(&dependency).is_some_and(|layer| layer > own) {
                upward.push(format!(
                    "{module} ({}) uses {dependency} ({})",
                    LAYERS[own].0,
                    LAYERS[layer_of(&dependency).unwrap()].0
                ));
            }
        }
    }
    assert!(upward.is_empty(), "dependencies that point up a layer:\n{}", upward.join("\n"));
}

/// Edges the layers would allow but the design does not: the admin listener
/// serves the runtime's views and shares nothing with the proxy listeners'
/// request path.
const FORBIDDEN_EDGES: &[(&str, &str)] = &[("admin", "server")];

#[test]
fn forbidden_edges_are_absent() {
    let graph = dependencies();
    let present: Vec<String> = FORBIDDEN_EDGES
        .iter()
        .filter(|(from, to)| graph.get(*from).is_some_and(|used| used.contains(*to)))
        .map(|(from, to)| format!("{from} -> {to}"))
        .collect();
    assert!(present.is_empty(), "forbidden dependencies: {present:?}");
}

#[test]
fn no_module_cycles() {
    let graph = dependencies();
    let cycles: Vec<String> =
        graph.keys().filter_map(|module| cycle_through(&graph, module)).map(|c| c.join(" -> ")).collect();
    assert!(cycles.is_empty(), "module cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_reader_finds_grouped_and_nested_paths() {
    let source = "use crate::{alpha::A, beta::{B, C}};\n// crate::commented\nlet x = crate::gamma::f();\n";
    let found: Vec<String> = crate_paths(source, &["m".into()]).into_iter().collect();
    assert_eq!(found, ["alpha", "beta", "gamma"]);
}

#[test]
fn the_reader_skips_strings_and_comments_and_climbs_super() {
    let source = r##"
        let url = "http://example"; use crate::after_a_url::X;
        let text = "crate::in_a_string"; let raw = r#"crate::in_a_raw "string""#;
        /* crate::in_a_block /* nested */ crate::still_in_it */
        let c = '"'; fn f<'a>(x: &'a str) {} use crate::after_quotes::Y;
        use super::from_the_root::Z; use super::super::too_far;
        let q = '\''; let not_crate = mycrate::x; use self::own::W;
    "##;
    // A top-level file (`src/top.rs`): one `super::` reaches the root.
    let found: Vec<String> = crate_paths(source, &["top".into()]).into_iter().collect();
    assert_eq!(found, ["after_a_url", "after_quotes", "from_the_root", "too_far"]);
    // In `src/runtime/reload.rs`, `super::` is `runtime`; `super::super::` the root.
    let found: Vec<String> = crate_paths(source, &["runtime".into(), "reload".into()]).into_iter().collect();
    assert_eq!(found, ["after_a_url", "after_quotes", "too_far"]);
}

#[test]
fn the_docs_table_lists_the_same_layers() {
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/architecture.md")).unwrap();
    let rows: Vec<(String, BTreeSet<String>)> = docs
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let (number, name) = cells.get(1)?.split_once(". ")?;
            number.parse::<usize>().ok()?;
            let modules = cells.get(2)?.split(',').map(|m| m.trim().trim_matches('`').to_owned()).collect();
            Some((name.to_owned(), modules))
        })
        .collect();
    let listed: Vec<(String, BTreeSet<String>)> = LAYERS
        .iter()
        .map(|(name, modules)| (name.to_string(), modules.iter().map(|m| m.to_string()).collect()))
        .collect();
    assert_eq!(rows, listed, "docs/architecture.md's layer table and LAYERS differ");
}
