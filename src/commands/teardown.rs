//! `vrun teardown FILE`: refuse while any container of the proc runs, clean what a
//! crashed run left (processes, cgroups), unmount the proc's rootfs, then remove its
//! directory without crossing into any other filesystem. A proc that is not there is
//! already torn down. The proc's cached layers stay (other procs may share them); they
//! are marked used now, and then the cache's automatic policy runs ([`super::autogc`]).
//! vr.server `rm -rf`s the proc dir afterwards: it is already gone, which is harmless.
//!
//! A live `vrun run` holds the proc.yaml lock, so teardown is refused by the lock
//! itself; live shell/uptest containers are refused by [`vrun::lxc::teardown`], which holds
//! the proc's mount lock until the directory is gone so none can start meanwhile.

use std::path::Path;
use std::process::ExitCode;

use vrun::paths::Root;
use vrun::state::ProcState;

pub fn teardown(root: &Root, file: &Path) -> anyhow::Result<ExitCode> {
    let _lock = super::lock(file)?;
    let (_config, name) = super::load(file)?;
    let cache_policy = super::autogc::policy()?;
    let proc = root.proc(&name);
    if let Err(e) = std::fs::symlink_metadata(&proc.dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            anyhow::bail!("cannot inspect {}: {e}", proc.dir.display());
        }
        eprintln!("vrun: {name} is not set up; nothing to tear down");
        return Ok(ExitCode::SUCCESS);
    }
    let used = ProcState::load(&proc.state(), &root.cache_dir()).ok();
    vrun::lxc::teardown(&proc, &name)?;
    eprintln!("vrun: {name} is torn down");
    super::autogc::after_teardown(root, &cache_policy, used.as_ref());
    Ok(ExitCode::SUCCESS)
}
