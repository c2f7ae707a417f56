//! The deployment examples in `deploy/` stay true: the Switchyard configs they
//! carry validate as `switchyard check` would, and the Kubernetes manifests
//! keep what docs/discovery.md promises of them (a headless Service for the
//! bots, two or more replicas, probes on `/readyz` and `/healthz`, the config
//! from a ConfigMap and the admin token from a Secret), the manifests validate
//! against the Kubernetes API schemas, and the Dockerfile builds from what its
//! context holds.

use serde_json::Value;

fn deploy_file(path: &str) -> String {
    std::fs::read_to_string(format!("{}/deploy/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn manifests(path: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(&deploy_file(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn find<'a>(documents: &'a [Value], kind: &str, name: &str) -> &'a Value {
    documents
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// Validates `yaml` as `switchyard check` would, with `files` (path relative
/// to the config's directory, content) beside it.
fn validate(yaml: &str, files: &[(&str, &str)]) -> switchyard::config::Config {
    let dir = tempfile::tempdir().unwrap();
    let config_dir = dir.path().join("config");
    std::fs::create_dir_all(&config_dir).unwrap();
    for (path, content) in files {
        let full = config_dir.join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, content).unwrap();
    }
    let path = config_dir.join("switchyard.yaml");
    std::fs::write(&path, yaml).unwrap();
    switchyard::config::load(&path).unwrap_or_else(|e| panic!("the example config does not validate:\n{e}"))
}

#[test]
fn the_kubernetes_example_fronts_a_headless_service_with_two_replicas() {
    let bots = manifests("kubernetes/bots.yaml");
    let service = find(&bots, "Service", "robots");
    assert_eq!(service["spec"]["clusterIP"], "None", "a headless Service: DNS names the pods");
    let port = &service["spec"]["ports"][0];
    assert_eq!((port["name"].as_str(), port["port"].as_u64()), (Some("robot"), Some(8270)));

    let switchyard = manifests("kubernetes/switchyard.yaml");
    let deployment = find(&switchyard, "Deployment", "switchyard");
    assert!(deployment["spec"]["replicas"].as_u64().unwrap() >= 2);
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    let config_path = container["args"][2].as_str().unwrap();
    let mounts = container["volumeMounts"].as_array().unwrap();
    let mounted_at = |volume: &str| mounts.iter().find(|m| m["name"] == volume).unwrap()["mountPath"].clone();
    assert_eq!(format!("{}/switchyard.yaml", mounted_at("config").as_str().unwrap()), config_path);
    let volumes = pod["volumes"].as_array().unwrap();
    let config_map = volumes.iter().find(|v| v["name"] == "config").unwrap()["configMap"]["name"].clone();
    assert_eq!(config_map, "switchyard");

    // The config in the ConfigMap validates, with the Secret's token where the pod mounts it.
    let yaml = find(&switchyard, "ConfigMap", "switchyard")["data"]["switchyard.yaml"].as_str().unwrap().to_owned();
    let config = validate(&yaml, &[("../admin/token", "a-token-from-the-secret-0123456789\n")]);
    assert_eq!(mounted_at("admin-token"), "/etc/switchyard/admin", "token_file: ../admin/token must find it");
    let robots = config.upstreams.iter().find(|u| u.name == "robots").unwrap();
    let discovery = robots.discovery.as_ref().expect("the bots come from DNS");
    assert_eq!(
        discovery.source.to_string(),
        "dns robots.bots.svc.cluster.local:8270",
        "the headless Service's name in the bots' namespace, on its port"
    );
    assert!(matches!(robots.policy, switchyard::config::PolicyConfig::ConsistentHash { .. }));

    // Both replicas share the one-job bots' slots through the example's Redis.
    assert_eq!(robots.max_concurrency_scope, switchyard::config::ConcurrencyScope::Cluster);
    let redis = config.cluster.as_ref().expect("a cluster section").redis_shown();
    let service = find(&switchyard, "Service", "redis");
    let port = service["spec"]["ports"][0]["port"].as_u64().unwrap();
    assert_eq!(redis, format!("redis://redis.bots.svc.cluster.local:{port}/0"), "the example's Redis Service");
    let redis_pod = &find(&switchyard, "Deployment", "redis")["spec"]["template"];
    assert_eq!(redis_pod["metadata"]["labels"], service["spec"]["selector"]);

    // The drain fits in the pod's grace period, and lets the longest job finish.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(grace > config.limits.shutdown_grace.as_secs() + 5, "{grace} s");
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    let longest = config.routes.iter().map(|r| r.timeout).max().unwrap();
    assert!(config.limits.shutdown_grace >= longest, "a rollout would cut jobs longer than shutdown_grace");
}

#[test]
fn the_consul_example_asks_the_agent_for_srv_records() {
    let config = validate(&deploy_file("consul/switchyard.yaml"), &[]);
    assert_eq!(config.resolver.servers, ["127.0.0.1:8600".parse().unwrap()]);
    let robots = config.upstreams.iter().find(|u| u.name == "robots").unwrap();
    let discovery = robots.discovery.as_ref().unwrap();
    assert_eq!(discovery.source.to_string(), "srv _robot._tcp.service.consul");
    assert!(deploy_file("consul/robot.hcl").contains("name = \"robot\""), "the registered service is `robot`");
}

#[test]
fn the_kubernetes_manifests_validate_against_the_api_schemas() {
    // kubernetes-validate (PyPI, installed by scripts/install-test-deps) holds
    // the API's JSON schemas; --strict refuses unknown fields, so a typo fails.
    let dir = format!("{}/deploy/kubernetes", env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 2);
    let output = std::process::Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "--kubernetes-version", "1.33.0"])
        .args(&files)
        .output()
        .expect("python3 runs");
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the manifests do not validate:\n{report}");
    assert!(report.matches("passed").count() >= 7, "every resource was checked:\n{report}");
}

/// What `.dockerignore` lets into the build context: it ignores everything,
/// then lets back in the paths it names with `!`.
fn in_build_context(path: &str) -> bool {
    let ignore = deploy_file("../.dockerignore");
    let allowed: Vec<&str> =
        ignore.lines().filter_map(|line| line.trim().strip_prefix('!')).map(|p| p.trim_end_matches('/')).collect();
    assert!(ignore.lines().any(|line| line.trim() == "*"), ".dockerignore starts from nothing");
    let path = path.trim_end_matches('/');
    allowed.iter().any(|allowed| path == *allowed || path.starts_with(&format!("{allowed}/")))
}

#[test]
fn the_image_builds_from_the_locked_sources_alone_and_runs_as_non_root() {
    // No container engine runs here, so `docker build` itself cannot be
    // tried: this checks what the build depends on instead.
    let dockerfile = deploy_file("../Dockerfile");
    let root = env!("CARGO_MANIFEST_DIR");
    for line in dockerfile.lines().filter(|l| l.starts_with("COPY ") && !l.contains("--from=")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        for source in &words[1..words.len() - 1] {
            assert!(std::path::Path::new(root).join(source).exists(), "COPY {source}: no such file");
            assert!(in_build_context(source), "COPY {source}: .dockerignore leaves it out of the context");
        }
    }
    for needless in ["target", ".git", "tests", "benches", "fuzz", "docs"] {
        assert!(!in_build_context(needless), "{needless} is sent to the Docker daemon for nothing");
    }
    assert!(dockerfile.contains("cargo build --release --locked"), "built from Cargo.lock");
    let user = dockerfile.lines().rev().find_map(|l| l.strip_prefix("USER ")).expect("a USER for the final stage");
    assert!(user.split(':').next().unwrap().parse::<u32>().is_ok_and(|uid| uid != 0), "non-root, numeric: {user}");
    let kubernetes = manifests("kubernetes/switchyard.yaml");
    let pod = &find(&kubernetes, "Deployment", "switchyard")["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsUser"].to_string(), user.split(':').next().unwrap());

    // The build drops the test and bench targets, whose files are not in the
    // context; what is left must be a manifest that still matches Cargo.lock.
    let trim = dockerfile.lines().find(|l| l.contains("sed -i")).expect("the manifest trim");
    assert!(trim.contains(r"'/^\[\[test\]\]/,$d' Cargo.toml"), "{trim}");
    let manifest = deploy_file("../Cargo.toml");
    let cut = manifest.find("\n[[test]]").expect("the targets are last in Cargo.toml") + 1;
    let (kept, dropped) = manifest.split_at(cut);
    assert!(
        dropped.lines().filter(|l| l.starts_with('[')).all(|l| l == "[[test]]" || l == "[[bench]]"),
        "the trim drops only test and bench targets"
    );
    let matches_lock = |manifest: &str| {
        let context = tempfile::tempdir().unwrap();
        std::fs::write(context.path().join("Cargo.toml"), manifest).unwrap();
        std::fs::copy(format!("{root}/Cargo.lock"), context.path().join("Cargo.lock")).unwrap();
        std::fs::create_dir(context.path().join("src")).unwrap();
        std::fs::write(context.path().join("src/main.rs"), "fn main() {}").unwrap();
        std::fs::write(context.path().join("src/lib.rs"), "").unwrap();
        // Resolved for this host only: a plain `cargo metadata` downloads the
        // crates of every platform in Cargo.lock (Windows, wasm, Android),
        // which a Linux build never fetches, so `--offline` would pass or fail
        // by what the cargo cache happens to hold. `--locked` still compares
        // the whole resolution, every platform's entries included, with
        // Cargo.lock; only the download is limited to the host's crates, which
        // building this test already fetched.
        let output = std::process::Command::new(env!("CARGO"))
            .args(["metadata", "--locked", "--offline", "--format-version", "1", "--filter-platform", host_triple()])
            .current_dir(context.path())
            .output()
            .unwrap();
        (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    let (matches, why) = matches_lock(kept);
    assert!(matches, "the trimmed manifest does not match Cargo.lock:\n{why}");
    // The check can fail: a trim that also dropped a dev-dependency leaves
    // Cargo.lock with packages the manifest no longer needs.
    let overtrimmed: String = kept.lines().filter(|l| !l.starts_with("criterion ")).map(|l| format!("{l}\n")).collect();
    assert_ne!(overtrimmed, kept, "criterion is a dev-dependency of Cargo.toml");
    let (matches, why) = matches_lock(&overtrimmed);
    assert!(!matches && why.contains("--locked"), "a manifest that no longer matches Cargo.lock passed:\n{why}");
}

/// The target triple this test was built for, as `rustc -vV` names it.
fn host_triple() -> &'static str {
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        // The rustc beside the cargo running this test: the same toolchain.
        let rustc = std::path::Path::new(env!("CARGO")).with_file_name("rustc");
        let output = std::process::Command::new(rustc).arg("-vV").output().expect("rustc runs");
        let version = String::from_utf8(output.stdout).unwrap();
        version.lines().find_map(|l| l.strip_prefix("host: ")).expect("rustc -vV names the host").to_owned()
    })
}
