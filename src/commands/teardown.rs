//! `vrun teardown FILE`: unmount the proc's rootfs, then remove its directory without
//! crossing into any other filesystem. A proc that is not there is already torn down.

use std::path::Path;
use std::process::ExitCode;

use vrun::mounts;
use vrun::paths::Root;

pub fn teardown(root: &Root, file: &Path) -> anyhow::Result<ExitCode> {
    let _lock = super::lock(file)?;
    let (_config, name) = super::load(file)?;
    let proc = root.proc(&name);
    if let Err(e) = std::fs::symlink_metadata(&proc.dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            anyhow::bail!("cannot inspect {}: {e}", proc.dir.display());
        }
        eprintln!("vrun: {name} is not set up; nothing to tear down");
        return Ok(ExitCode::SUCCESS);
    }
    let rootfs = proc.rootfs();
    if mounts::is_mount_point(&rootfs)? {
        mounts::unmount(&rootfs)?;
    }
    mounts::remove_dir_on_one_fs(&proc.dir)?;
    eprintln!("vrun: {name} is torn down");
    Ok(ExitCode::SUCCESS)
}
