//! One downloader per URL across processes: the URL's key lock, waited for without
//! blocking a thread, and a description of whoever holds it for the notice (and for
//! `vrun cache`), so a user waiting on another setup is told which one.

use std::path::Path;
use std::time::{Duration, Instant};

use vrun_cache::Store;

use super::Artifact;
use crate::fetch::{self, HttpClient};

/// How often a wait for a lock looks again.
pub(super) const LOCK_POLL: Duration = Duration::from_millis(100);

/// The URL's key lock, waiting for whoever holds it (another setup downloading the same
/// URL) without blocking a thread, so that a failing sibling artifact or a signal can
/// cancel the wait; after [`fetch::HttpOptions::notice_after`] the wait is announced with
/// the holder's pid and command line.
pub(super) async fn lock_url(
    store: &Store,
    http: &HttpClient,
    art: &Artifact,
) -> Result<vrun_cache::KeyLock, vrun_cache::StoreError> {
    let key = vrun_cache::url_lock_key(&art.url);
    let began = Instant::now();
    let mut noticed = false;
    loop {
        if let Some(lock) = store.try_lock(&key)? {
            return Ok(lock);
        }
        if !noticed && began.elapsed() >= http.options().notice_after {
            noticed = true;
            let path = store.lock_path(&key);
            http.notice(&format!(
                "waiting for {} to finish with {} (lock {})",
                describe_holders(&path),
                art.shown_url(),
                path.display()
            ));
        }
        tokio::time::sleep(LOCK_POLL).await;
    }
}

/// "pid 1234 (vrun setup proc.yaml)" for the processes holding a lock file.
pub fn describe_holders(lock: &Path) -> String {
    let pids = vrun_cache::lock_holders(lock);
    if pids.is_empty() {
        return "another process".to_string();
    }
    let described: Vec<String> = pids
        .iter()
        .map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| {
                    b.split(|&c| c == 0)
                        .filter(|a| !a.is_empty())
                        .map(|a| fetch::redact_url(&String::from_utf8_lossy(a)))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            if cmd.is_empty() {
                format!("pid {pid}")
            } else {
                format!("pid {pid} ({cmd})")
            }
        })
        .collect();
    described.join(", ")
}
