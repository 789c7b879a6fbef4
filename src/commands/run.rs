//! `vrun run FILE`: the proc in the foreground; vrun's exit code is the app's.
//!
//! The caller holds the proc.yaml lock for the whole call (the spec: "run locks the
//! proc.yaml while running"); that is what lets [`crate::lxc::run_foreground`] treat any
//! leftover container of this name as an orphan of a crashed run.

use std::time::Duration;

use crate::lxc::{run_foreground, LxcProc};

/// Run the proc; returns the exit code for `std::process::exit`.
pub async fn run(proc: &LxcProc, grace: Duration) -> anyhow::Result<i32> {
    Ok(run_foreground(proc, grace).await?)
}
