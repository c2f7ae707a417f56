//! The fuzz targets' seed corpora and regression inputs, replayed through the
//! same entries (`switchyard::fuzzing`) on the stable toolchain: every input
//! that ever crashed a target stays a test. `scripts/fuzz-smoke` runs the
//! targets themselves, coverage-guided, where a nightly toolchain exists.

use std::path::PathBuf;

type Entry = fn(&[u8]);

const TARGETS: [(&str, Entry); 5] = [
    ("config_parse", switchyard::fuzzing::config_parse),
    ("route_and_key", switchyard::fuzzing::route_and_key),
    ("header_rewrite", switchyard::fuzzing::header_rewrite),
    ("backend_response", switchyard::fuzzing::backend_response),
    ("client_request", switchyard::fuzzing::client_request),
];

fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(kind).join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

#[test]
fn every_seed_and_regression_input_passes_its_target() {
    let declared = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/Cargo.toml")).unwrap();
    for (target, entry) in TARGETS {
        assert!(declared.contains(&format!("name = \"{target}\"")), "fuzz/Cargo.toml has no target {target}");
        let seeds = inputs("corpus", target);
        assert!(seeds.len() >= 3, "{target} needs a seed corpus in fuzz/corpus/{target}");
        for input in seeds.iter().chain(&inputs("regressions", target)) {
            let data = std::fs::read(input).unwrap();
            if std::panic::catch_unwind(|| entry(&data)).is_err() {
                panic!("{target} fails on {}", input.display());
            }
        }
    }
    let targets = declared.matches("[[bin]]").count();
    assert_eq!(targets, TARGETS.len(), "every fuzz target is replayed here");
}
