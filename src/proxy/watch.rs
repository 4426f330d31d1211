//! `--watch`: reload when the configuration file, or a CA bundle,
//! certificate or key it names, changes.
//!
//! The files are polled every [`INTERVAL`]: each is read and its content
//! hashed, so a change shows whatever made it (an editor's rename, a
//! rewrite in place within the same second and size, a Kubernetes
//! ConfigMap or Secret volume swapping its `..data` symlink, cert-manager,
//! a network file system that sends no events). Polling needs no inotify,
//! kqueue or ReadDirectoryChangesW, works the same on every platform, and
//! costs a few small reads every two seconds. A change is acted on once the
//! files have stopped changing for [`SETTLE`] (a certificate and its key are
//! often written one after the other), and then only once: a reload that
//! is refused is not tried again until a file changes again.
//!
//! The baseline is what the last reload (or the start) saw: the proxy
//! publishes the files and their state as that attempt read them, so a
//! change made while it ran is still caught.

use std::hash::{Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::lifecycle::{Lifecycle, ReloadCause};

/// How often the files are read.
pub(super) const INTERVAL: Duration = Duration::from_secs(2);
/// How long the files must stay the same before a change is acted on.
pub(super) const SETTLE: Duration = Duration::from_millis(500);
/// After this many unsettled looks, act on the change anyway.
const SETTLE_ROUNDS: usize = 10;

/// A file as last read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum FileState {
    /// Its content's length and hash.
    Read { len: u64, hash: u64 },
    /// It could not be read (missing, no permission, a directory).
    Unreadable(io::ErrorKind),
}

/// Reads `path` now. Blocking: call it off the async threads when it
/// matters (see [`observe_all`]).
pub(super) fn observe(path: &Path) -> FileState {
    match std::fs::read(path) {
        Ok(bytes) => {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            bytes.hash(&mut hasher);
            FileState::Read {
                len: bytes.len() as u64,
                hash: hasher.finish(),
            }
        }
        Err(e) => FileState::Unreadable(e.kind()),
    }
}

/// Each of `paths` and its state now.
pub(super) fn observe_all(paths: &[PathBuf]) -> Vec<(PathBuf, FileState)> {
    paths
        .iter()
        .map(|path| (path.clone(), observe(path)))
        .collect()
}

/// What the watcher compares with: the files of the configuration last
/// loaded or tried, and their state then.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Baseline {
    /// `--watch` is on in the running configuration.
    pub(super) enabled: bool,
    pub(super) files: Vec<(PathBuf, FileState)>,
}

/// The files of `now` whose state differs from `before` (a file `before`
/// does not list counts as changed).
pub(super) fn changed(
    before: &[(PathBuf, FileState)],
    now: &[(PathBuf, FileState)],
) -> Vec<PathBuf> {
    now.iter()
        .filter(|(path, state)| !before.iter().any(|(p, s)| p == path && s == state))
        .map(|(path, _)| path.clone())
        .collect()
}

/// Polls the published baseline's files until `stop`, and asks `lifecycle`
/// for a reload when they change.
pub(super) fn spawn(
    lifecycle: Arc<Lifecycle>,
    published: watch::Receiver<Baseline>,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        tokio::select! {
            _ = poll(lifecycle, published) => {}
            _ = stop.cancelled() => {}
        }
    });
}

async fn poll(lifecycle: Arc<Lifecycle>, mut published: watch::Receiver<Baseline>) {
    let mut baseline = published.borrow_and_update().clone();
    loop {
        tokio::time::sleep(INTERVAL).await;
        if published.has_changed().unwrap_or(false) {
            baseline = published.borrow_and_update().clone();
        }
        if !baseline.enabled || baseline.files.is_empty() {
            continue;
        }
        let paths: Vec<PathBuf> = baseline.files.iter().map(|(p, _)| p.clone()).collect();
        let mut now = snapshot(&paths).await;
        if changed(&baseline.files, &now).is_empty() {
            continue;
        }
        for _ in 0..SETTLE_ROUNDS {
            tokio::time::sleep(SETTLE).await;
            let again = snapshot(&paths).await;
            if again == now {
                break;
            }
            now = again;
        }
        let files = changed(&baseline.files, &now);
        // Until the reload publishes what it read, compare with this.
        baseline.files = now;
        if files.is_empty() {
            // Changed and changed back.
            continue;
        }
        lifecycle.request_reload(ReloadCause::Watch(files));
    }
}

/// The files' state now, read off the async threads.
async fn snapshot(paths: &[PathBuf]) -> Vec<(PathBuf, FileState)> {
    let owned = paths.to_vec();
    match tokio::task::spawn_blocking(move || observe_all(&owned)).await {
        Ok(states) => states,
        // The blocking pool is gone (the runtime is shutting down).
        Err(_) => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewrite_with_the_same_size_is_a_change() {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "aaaa").expect("write");
        let first = observe(&path);
        assert_eq!(observe(&path), first);
        std::fs::write(&path, "bbbb").expect("write");
        let second = observe(&path);
        assert_ne!(second, first);
        assert!(matches!(second, FileState::Read { len: 4, .. }));
    }

    #[test]
    fn a_missing_file_is_a_state_of_its_own() {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let path = dir.path().join("ca.pem");
        assert_eq!(
            observe(&path),
            FileState::Unreadable(io::ErrorKind::NotFound)
        );
        std::fs::write(&path, "x").expect("write");
        assert!(matches!(observe(&path), FileState::Read { len: 1, .. }));
    }

    #[test]
    fn only_the_files_that_differ_are_named() {
        let read = |hash| FileState::Read { len: 1, hash };
        let before = vec![
            (PathBuf::from("/k/keyhole.toml"), read(1)),
            (PathBuf::from("/k/ca.pem"), read(2)),
        ];
        assert!(changed(&before, &before).is_empty());
        let now = vec![
            (PathBuf::from("/k/keyhole.toml"), read(1)),
            (PathBuf::from("/k/ca.pem"), read(3)),
            (
                PathBuf::from("/k/new.pem"),
                FileState::Unreadable(io::ErrorKind::NotFound),
            ),
        ];
        assert_eq!(
            changed(&before, &now),
            [PathBuf::from("/k/ca.pem"), PathBuf::from("/k/new.pem")]
        );
    }
}
