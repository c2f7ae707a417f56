//! The crate's module dependencies point one way. Reads every `crate::` path in
//! `src/` and checks that each top-level module uses only modules of a lower
//! layer, or of its own layer without a cycle; see docs/architecture.md for the
//! layers and why each module sits where it does.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lowest first. A module may use any module of a lower layer, and modules of
/// its own layer as long as no cycle forms. Every module must be listed here.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "foundations",
        &["clock", "text", "path", "body", "metrics", "config", "tls", "error", "logging", "version", "systemd"],
    ),
    ("what the proxy learns about backends", &["breaker", "health", "retry", "queue", "cluster", "backend"]),
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

/// The top-level modules named by `crate::` paths in `source` (comments
/// ignored), `crate::{a, b::c}` groups included.
fn crate_paths(source: &str) -> BTreeSet<String> {
    let code: String = source.lines().map(|line| line.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    let mut used = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
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
            used.insert(first_segment(rest));
        }
    }
    used
}

fn first_segment(path: &str) -> String {
    path.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
}

fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = modules(&src);
    modules
        .iter()
        .map(|(module, files)| {
            let used = files
                .iter()
                .flat_map(|file| crate_paths(&std::fs::read_to_string(file).expect("source is readable")))
                .filter(|used| used != module && modules.contains_key(used))
                .collect();
            (module.clone(), used)
        })
        .collect()
}

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
    let found: Vec<String> = crate_paths(source).into_iter().collect();
    assert_eq!(found, ["alpha", "beta", "gamma"]);
}
