//! `vrun uptest FILE [--jobs N] [--timeout SECS]`: the proc's uptests, as one JSON array
//! on stdout.
//!
//! stdout gets exactly the array and a newline, written once at the end. stderr stays
//! empty unless uptests cannot run at all (no proc_name, not set up, LXC missing): then
//! the error is returned before anything was written, stdout stays empty and `main`
//! prints the one `ERROR:` line. vr.server merges stderr into what it parses, and any
//! text before the `[` becomes a failed `uptester` result, so progress notes appear only
//! with `-v` (`dispatch` installs the stderr notice sink only then). No lock: uptests
//! run beside `run`.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use vrun::lxc::LxcProc;
use vrun::paths::Root;
use vrun::uptest::{run_uptests, to_json_line, UptestOptions};

use super::run::block_on;
use crate::cli::UptestArgs;

pub fn uptest(root: &Root, args: &UptestArgs) -> anyhow::Result<ExitCode> {
    let file = &args.proc.file;
    let (config, name) = super::load(file)?;
    let Some(proc_name) = config.proc_name.clone() else {
        bail!(
            "{}: uptest needs proc_name (uptests live in /app/uptests/<proc_name>/)",
            file.display()
        );
    };
    let proc = LxcProc::from_config(root, &name, &config, &config.owner()?)?;
    let opts = UptestOptions {
        proc_name,
        host: config.host.clone(),
        // As the original: str() of the port, `None` for a proc without one.
        port: config.port.clone(),
        jobs: args.jobs,
        timeout: Duration::from_secs(args.timeout),
    };
    let results = block_on(run_uptests(&proc, &opts))??;
    let mut out = std::io::stdout().lock();
    out.write_all(to_json_line(&results).as_bytes())?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
