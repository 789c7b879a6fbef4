//! `vrun uptest FILE`: the uptests of the proc, as one JSON array on stdout.
//!
//! stdout gets exactly the array and a newline, written once at the end; anything else
//! (progress, errors) goes to stderr. When uptests cannot run at all the error is returned
//! before anything was written, so stdout stays empty.

use std::io::Write;

use crate::lxc::LxcProc;
use crate::uptest::{run_uptests, to_json_line, UptestOptions};

/// Run the uptests and print the JSON; returns the exit code (0 whatever the results).
pub async fn uptest(proc: &LxcProc, opts: &UptestOptions) -> anyhow::Result<i32> {
    let results = run_uptests(proc, opts).await?;
    let mut out = std::io::stdout().lock();
    out.write_all(to_json_line(&results).as_bytes())?;
    out.flush()?;
    Ok(0)
}
