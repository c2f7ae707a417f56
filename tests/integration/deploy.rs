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
fn the_kubernetes_example_is_scraped_without_the_token_and_runs_locked_down() {
    let switchyard = manifests("kubernetes/switchyard.yaml");
    let yaml = find(&switchyard, "ConfigMap", "switchyard")["data"]["switchyard.yaml"].as_str().unwrap().to_owned();
    let config = validate(&yaml, &[("../admin/token", "a-token-from-the-secret-0123456789\n")]);
    let template = &find(&switchyard, "Deployment", "switchyard")["spec"]["template"];

    // The annotations' scrape (GET path on port, no credentials) is what
    // the admin API serves without the token (tests/integration/prometheus.rs
    // has a real Prometheus do it).
    let annotations = &template["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], config.admin.bind.port().to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    assert!(config.admin.token.is_some() && config.admin.metrics_without_token, "a token, and /metrics without it");
    // ... and only the monitoring namespace reaches the admin port.
    let policy = &find(&switchyard, "NetworkPolicy", "switchyard")["spec"];
    assert_eq!(policy["podSelector"]["matchLabels"], template["metadata"]["labels"]);
    let rules = policy["ingress"].as_array().unwrap();
    let admin_rules: Vec<_> = rules.iter().filter(|r| r["ports"][0]["port"] == "admin").collect();
    assert_eq!(admin_rules.len(), 1);
    assert!(
        admin_rules[0]["from"].as_array().is_some_and(|from| !from.is_empty()),
        "the admin port is not open to all"
    );

    // Every pod of the example: the runtime's seccomp profile, no privilege
    // escalation, no capabilities, a read-only root, an explicit pull policy.
    for name in ["switchyard", "redis"] {
        let pod = &find(&switchyard, "Deployment", name)["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault", "{name}");
        for container in pod["containers"].as_array().unwrap() {
            let security = &container["securityContext"];
            assert_eq!(security["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(security["readOnlyRootFilesystem"], true, "{name}");
            assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]), "{name}");
            assert!(
                ["IfNotPresent", "Always"].contains(&container["imagePullPolicy"].as_str().unwrap_or("")),
                "{name}"
            );
        }
    }

    // On the read-only root the upgrade socket's directory (the temp dir:
    // the pod sets no XDG_RUNTIME_DIR or TMPDIR) is a writable volume, so
    // `run` listens for upgrades instead of warning at every start.
    let pod = &template["spec"];
    let container = &pod["containers"][0];
    assert!(container["env"]
        .as_array()
        .is_none_or(|env| env.iter().all(|e| e["name"] != "XDG_RUNTIME_DIR" && e["name"] != "TMPDIR")));
    let tmp =
        container["volumeMounts"].as_array().unwrap().iter().find(|m| m["mountPath"] == "/tmp").expect("/tmp mounted");
    let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == tmp["name"]).unwrap();
    assert!(volume.get("emptyDir").is_some() && tmp.get("readOnly").is_none_or(|r| r == false));

    // `workers` is left to follow the CPU limit, which the container has.
    assert!(!yaml.contains("workers:"), "workers follows the CPU limit");
    assert!(container["resources"]["limits"]["cpu"].is_string(), "a CPU limit for workers to follow");
}

#[test]
fn the_image_config_listens_on_every_address_and_validates() {
    let yaml = deploy_file("docker/switchyard.yaml");
    let config = validate(&yaml, &[]);
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    for listener in &config.listeners {
        assert!(
            listener.bind.ip().is_unspecified(),
            "{} binds {}: unreachable through -p",
            listener.name,
            listener.bind
        );
    }
    let dockerfile = deploy_file("../Dockerfile");
    let image_config = "/etc/switchyard/switchyard.yaml";
    assert!(dockerfile.contains(&format!("COPY deploy/docker/switchyard.yaml {image_config}")));
    assert!(dockerfile.contains(&format!("CMD [\"run\", \"-c\", \"{image_config}\"]")));
    let exposed = dockerfile.lines().find_map(|l| l.strip_prefix("EXPOSE ")).expect("EXPOSE");
    for listener in &config.listeners {
        assert!(exposed.split_whitespace().any(|p| p == listener.bind.port().to_string()), "EXPOSE {exposed}");
    }
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
    let output = crate::support::python()
        .args(["-m", "kubernetes_validate", "--strict", "--kubernetes-version", "1.33.0"])
        .args(&files)
        .output()
        .expect("python3 runs");
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the manifests do not validate:\n{report}");
    assert!(report.matches("passed").count() >= 8, "every resource was checked:\n{report}");
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

/// `KEY=value` lines of a unit file's `[Service]` section.
fn unit_settings(unit: &str) -> Vec<(&str, &str)> {
    unit.lines()
        .skip_while(|l| l.trim() != "[Service]")
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .collect()
}

#[test]
fn the_systemd_unit_is_what_systemd_accepts_and_waits_for_the_drain() {
    let unit = deploy_file("systemd/switchyard.service");
    let settings = unit_settings(&unit);
    let setting = |key: &str| settings.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    assert_eq!(setting("Type"), Some("notify"), "READY=1 is what systemd waits for");
    assert_eq!(setting("NotifyAccess"), Some("all"), "an upgrade's successor sends MAINPID= before it is main");
    assert_eq!(setting("ExecReload"), Some("/bin/kill -HUP $MAINPID"));
    // The upgrade socket is in the unit's own runtime directory.
    let start = setting("ExecStart").unwrap();
    let runtime_directory = setting("RuntimeDirectory").unwrap();
    assert!(start.contains(&format!("--upgrade-socket /run/{runtime_directory}/")), "{start}");
    // systemd's SIGKILL comes after the drain: longer than the default grace.
    let stop = setting("TimeoutStopSec").unwrap().trim_end_matches('s').parse::<u64>().unwrap();
    let grace =
        switchyard::config::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/switchyard.yaml")))
            .unwrap()
            .limits
            .shutdown_grace;
    assert!(stop > grace.as_secs() + 5, "TimeoutStopSec={stop}s vs shutdown_grace {grace:?}");

    // systemd's own parser, on the unit with this build's binary where the
    // installed one would be: it warns about any key or value it ignores.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/switchyard", env!("CARGO_BIN_EXE_switchyard"))).unwrap();
    let output = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is installed (scripts/install-test-deps)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success() && !stderr.contains("switchyard.service"), "systemd-analyze verify:\n{stderr}");
    // The check can fail: a value systemd cannot parse is reported.
    std::fs::write(&path, std::fs::read_to_string(&path).unwrap().replace("NotifyAccess=all", "NotifyAccess=every"))
        .unwrap();
    let output = std::process::Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("notify access"), "a bad value went unnoticed");

    // The ExecStart command line is one the binary accepts.
    let args: Vec<&str> = start.split_whitespace().skip(1).collect();
    let output =
        std::process::Command::new(env!("CARGO_BIN_EXE_switchyard")).args(&args).arg("--help").output().unwrap();
    assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
}
