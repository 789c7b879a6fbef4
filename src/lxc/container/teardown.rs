//! What runs on a proc (its own container, live temporary ones) and taking it down:
//! teardown's kill-and-remove of every cgroup, and setup's unmount of an overlay whose
//! layers changed, refused on the same grounds (a container still uses the rootfs).

use std::path::Path;
use std::process::Stdio;

use super::run::clean_run_leftovers;
use super::tmp::{is_tmp_of, live_tmp_containers};
use crate::lxc::mount::{self, MountLock};
use crate::lxc::{cgroups, LxcError, LxcProc, LxcTools};
use crate::paths::ProcPaths;
use crate::state::ProcState;

/// What of proc `name` is running right now.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Occupancy {
    /// The proc's own container has a live `lxc-execute` (lxc-info: RUNNING).
    pub run: bool,
    /// Live shell/uptest containers.
    pub tmp: Vec<String>,
}

impl Occupancy {
    pub fn any(&self) -> bool {
        self.run || !self.tmp.is_empty()
    }
}

/// Is any container of proc `name` running: the proc itself (lxc-info, then its monitor
/// cgroup) or a shell/uptest container.
pub fn is_running(paths: &ProcPaths, lxcpath: &Path, name: &str) -> Occupancy {
    let run = lxc_info_running(lxcpath, name) || !cgroups::monitor_pids(name).is_empty();
    Occupancy {
        run,
        tmp: live_tmp_containers(paths, name),
    }
}

fn lxc_info_running(lxcpath: &Path, name: &str) -> bool {
    let Ok(tools) = LxcTools::find() else {
        return false;
    };
    std::process::Command::new(&tools.info)
        .args(["-s", "-H", "-n", name, "-P"])
        .arg(lxcpath)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "RUNNING")
}

/// Setup's half of mounting, under the proc's mount lock and before the new state is
/// saved: when the overlay is mounted on other layers than `proc.state` names (setup
/// again after the build, image or owner changed; `previous` is the state on disk), it
/// is unmounted — refused while any container of the proc runs on it, which leaves the
/// proc as it was. Then save the state and call [`mount::ensure_mounted_locked`]; the
/// overlay stays mounted after setup (see [`mount`]).
pub fn unmount_if_layers_changed(
    _lock: &MountLock,
    proc: &LxcProc,
    previous: Option<&ProcState>,
) -> Result<(), LxcError> {
    let rootfs = proc.paths.rootfs();
    let changed =
        previous.is_some_and(|p| p.build != proc.state.build || p.image != proc.state.image);
    if changed && mount::is_mount_point(&rootfs)?.is_some() {
        let occupancy = is_running(&proc.paths, &proc.lxcpath, &proc.name);
        if occupancy.any() {
            let mut containers = occupancy.tmp;
            if occupancy.run {
                containers.insert(0, proc.name.clone());
            }
            return Err(LxcError::Busy {
                name: proc.name.clone(),
                containers,
            });
        }
        crate::mounts::unmount(&rootfs)?;
    }
    Ok(())
}

/// Teardown's part of the LXC work, called with the proc.yaml lock held (so no `vrun run`
/// is live): refuse while a shell/uptest container runs; else kill what a crashed run or
/// shell left behind and remove every cgroup of the proc. Unmounting and deleting the proc
/// dir come after, in the command.
///
/// Returns the proc's mount lock: hold it until the proc dir is gone, so no shell or
/// uptest can start on the proc meanwhile.
pub fn teardown_containers(paths: &ProcPaths, name: &str) -> Result<MountLock, LxcError> {
    let lock = mount::lock_mount(paths)?;
    let live = live_tmp_containers(paths, name);
    if !live.is_empty() {
        return Err(LxcError::Busy {
            name: name.to_owned(),
            containers: live,
        });
    }
    clean_run_leftovers(name)?;
    remove_cgroups(name)?;
    Ok(lock)
}

/// All of `vrun teardown` below the proc.yaml lock (which the caller holds): refuse while
/// a shell/uptest container runs, kill leftovers, remove cgroups, unmount the rootfs
/// (lazily if a dying container still holds it) and verify, then delete the proc dir
/// without crossing into another filesystem. Cached layers are never touched: they are
/// only ever the overlay's read-only lower dirs.
pub fn teardown(paths: &ProcPaths, name: &str) -> Result<(), LxcError> {
    let _lock = teardown_containers(paths, name)?;
    crate::mounts::unmount(&paths.rootfs())?;
    crate::mounts::remove_dir_on_one_fs(&paths.dir)?;
    Ok(())
}

/// Kill and remove every cgroup of proc `name` and of its temporary containers.
pub fn remove_cgroups(name: &str) -> Result<(), LxcError> {
    for c in cgroups::containers_matching(|c| c == name || is_tmp_of(c, name)) {
        cgroups::kill_all(&c)?;
        cgroups::remove(&c)?;
    }
    Ok(())
}
