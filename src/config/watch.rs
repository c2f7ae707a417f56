//! Watches the config file for changes the way editors and Kubernetes make them.
//!
//! Editors often write a temporary file and rename it over the config, and
//! Kubernetes ConfigMap volumes swap a `..data` symlink to a new directory; in
//! both cases a watch on the file itself would be lost with the old inode. So the
//! *directory* is watched (and, if the config path is a symlink into another
//! directory, that one too), events are debounced, and one notification is sent
//! per burst. The receiver decides whether the content really changed.
//!
//! The directories of the listeners' certificate and key files are watched
//! the same way (a Kubernetes Secret volume swaps a `..data` symlink too), so a
//! renewed certificate triggers a reload; they are the files named by the
//! config the proxy started with.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Quiet period after the last event before notifying: editors and `kubectl`
/// produce several events per save.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// Keeps the OS watch alive; dropping it stops watching.
pub struct ConfigWatch {
    _watcher: RecommendedWatcher,
}

/// Starts watching `path` and the `also` files; each burst of changes around
/// them sends one `()`. Must be called inside a tokio runtime.
pub fn watch(path: &Path, also: &[PathBuf]) -> notify::Result<(ConfigWatch, mpsc::Receiver<()>)> {
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Access events (reads, including our own) are not changes.
        if event.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
            let _ = raw_tx.send(());
        }
    })?;
    let mut directories: Vec<PathBuf> = Vec::new();
    for file in std::iter::once(path).chain(also.iter().map(PathBuf::as_path)) {
        for directory in directories_to_watch(file) {
            let key = std::fs::canonicalize(&directory).unwrap_or_else(|_| directory.clone());
            if !directories.contains(&key) {
                directories.push(key);
                watcher.watch(&directory, RecursiveMode::NonRecursive)?;
            }
        }
    }
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        while raw_rx.recv().await.is_some() {
            // Swallow the rest of the burst.
            while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, raw_rx.recv()).await {}
            // A full channel already holds a pending notification; that is enough.
            if let Err(mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
                return;
            }
        }
    });
    Ok((ConfigWatch { _watcher: watcher }, rx))
}

fn directories_to_watch(path: &Path) -> Vec<PathBuf> {
    let parent = |p: &Path| match p.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut directories = vec![parent(path)];
    if let Ok(resolved) = std::fs::canonicalize(path) {
        let resolved_parent = parent(&resolved);
        let same = std::fs::canonicalize(&directories[0]).is_ok_and(|d| d == resolved_parent);
        if !same {
            directories.push(resolved_parent);
        }
    }
    directories
}
