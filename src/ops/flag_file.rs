//! The flag file source: maintenance is on while the file exists.
//!
//! A background task owned by [`super::Maintenance`]: inotify on the parent directory
//! (so atomic renames and ConfigMap symlink swaps are seen) plus a 1 s poll that also
//! covers a directory that does not exist yet or was removed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::Notify;

/// How often the file is looked at when inotify says nothing.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Whether the flag file is there (a broken symlink or an unreadable directory is "not").
pub fn exists(path: &Path) -> bool {
    path.try_exists().unwrap_or(false)
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// Watches `path` until `report` answers false (its owner is gone) or the task is
/// aborted; calls `report` at start and on every change of existence.
pub(crate) async fn run(
    path: PathBuf,
    poll_interval: Duration,
    mut report: impl FnMut(bool) -> bool + Send,
) {
    // Notify wakes this task from the watcher's thread; a stored permit means a wake-up that
    // arrives while the task is busy is not lost, and bursts collapse into one look.
    let wake = Arc::new(Notify::new());
    let dir = parent_dir(&path).to_path_buf();
    let mut watcher: Option<RecommendedWatcher> = None;
    let mut poll = tokio::time::interval(poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = exists(&path);
    if !report(last) {
        return;
    }
    loop {
        // inotify loses its watch when the directory goes away; the poll re-arms it.
        if watcher.is_some() && !dir.is_dir() {
            watcher = None;
        }
        if watcher.is_none() {
            watcher = watch_dir(&dir, &path, &wake);
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = poll.tick() => {}
        }
        let now = exists(&path);
        if now != last {
            last = now;
            if !report(now) {
                return;
            }
        }
    }
}

/// Sets up inotify on `dir`; `None` when that is not possible now (the poll covers it).
fn watch_dir(dir: &Path, path: &Path, wake: &Arc<Notify>) -> Option<RecommendedWatcher> {
    if !dir.is_dir() {
        return None;
    }
    let name = path.file_name()?.to_owned();
    let wake = wake.clone();
    let handler = move |event: notify::Result<notify::Event>| match event {
        Ok(event) => {
            let ours = event.need_rescan()
                || matches!(event.kind, EventKind::Other)
                || event.paths.iter().any(|p| p.file_name() == Some(&name));
            if ours {
                wake.notify_one();
            }
        }
        // Something went wrong in the watcher: look at the file now.
        Err(_) => wake.notify_one(),
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(watcher) => watcher,
        Err(error) => {
            tracing::debug!(%error, "flag file watcher unavailable, polling");
            return None;
        }
    };
    match watcher.watch(dir, RecursiveMode::NonRecursive) {
        Ok(()) => Some(watcher),
        Err(error) => {
            tracing::debug!(%error, dir = %dir.display(), "cannot watch flag file directory, polling");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_of_a_bare_name_is_the_working_directory() {
        assert_eq!(parent_dir(Path::new("flag")), Path::new("."));
        assert_eq!(
            parent_dir(Path::new("/etc/opsgate/flag")),
            Path::new("/etc/opsgate")
        );
    }

    /// With the poll out of the way, only inotify can see these changes.
    #[tokio::test]
    async fn inotify_sees_create_rename_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("flag");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(run(flag.clone(), Duration::from_secs(3600), move |on| {
            tx.send(on).is_ok()
        }));
        let mut next = async || {
            tokio::time::timeout(Duration::from_secs(1), rx.recv())
                .await
                .expect("inotify noticed within 1 s")
                .unwrap()
        };
        assert!(!next().await);
        std::fs::write(&flag, b"").unwrap();
        assert!(next().await);
        std::fs::remove_file(&flag).unwrap();
        assert!(!next().await);
        let tmp = dir.path().join(".flag.tmp");
        std::fs::write(&tmp, b"").unwrap();
        std::fs::rename(&tmp, &flag).unwrap();
        assert!(next().await);
        task.abort();
    }
}
