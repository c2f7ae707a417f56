//! Log files: `log.file` and `log.access_file` on the real binary, SIGUSR1
//! reopening them after logrotate moved them, and a reload that changes the
//! level and the format.

use std::time::Duration;

use crate::support::*;

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_moved_log_files_and_a_reload_applies_a_new_level_and_format() {
    let bot = Backend::start("bot").await;
    let yaml = PoolConfig::new(&[&bot]).on_chosen_port().yaml();
    let log = "log: { level: warn, access: true, file: events.log, access_file: access.log }\n";
    let proxy = ProxyProcess::start(&format!("{log}{yaml}")).await;
    let dir = proxy.path.parent().unwrap().to_owned();
    let (events, access) = (dir.join("events.log"), dir.join("access.log"));
    let client = client();

    assert_eq!(get(&client, &proxy.url("/before-rotation")).await.status, 200);
    wait_until("the access line in access.log", Duration::from_secs(30), || {
        read(&access).contains("path=/before-rotation")
    })
    .await;
    assert!(events.exists(), "events.log is created at start");
    assert!(!read(&events).contains("listening"), "info lines are below `level: warn`");
    assert!(!read(&events).contains("path=/"), "access lines have their own file");

    // logrotate moves the files away, then sends SIGUSR1.
    let (events_moved, access_moved) = (dir.join("events.log.1"), dir.join("access.log.1"));
    std::fs::rename(&events, &events_moved).unwrap();
    std::fs::rename(&access, &access_moved).unwrap();
    proxy.signal(libc::SIGUSR1);
    // Lines may still reach the moved file until the signal is handled: send
    // until one reaches a new file at the old path.
    let mut sent = 0;
    while !read(&access).contains("path=/after-rotation") {
        assert!(sent < 3000, "no new access.log after SIGUSR1");
        assert_eq!(get(&client, &proxy.url("/after-rotation")).await.status, 200);
        sent += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(events.exists(), "events.log is opened again too");
    assert!(read(&access_moved).contains("path=/before-rotation"));
    assert!(!read(&access).contains("path=/before-rotation"), "the new file starts empty");

    // A reload applies `level: info` and `format: json` to both streams.
    let config = read(&proxy.path).edit("level: warn", "level: info, format: json");
    std::fs::write(&proxy.path, config).unwrap();
    proxy.signal(libc::SIGHUP);
    wait_until("the reload's own info line in events.log", Duration::from_secs(30), || {
        read(&events).contains("config reloaded")
    })
    .await;
    let reloaded = read(&events);
    let line = reloaded.lines().find(|l| l.contains("config reloaded")).unwrap();
    let event: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    assert_eq!(event["level"], "INFO");
    assert_eq!(get(&client, &proxy.url("/as-json")).await.status, 200);
    wait_until("a JSON access line", Duration::from_secs(30), || read(&access).contains("\"path\":\"/as-json\"")).await;
    let line = read(&access).lines().find(|l| l.contains("/as-json")).unwrap().to_owned();
    let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(entry["fields"]["status"], "200");
}
