//! The LXC hand-off: from a set-up proc directory to a running container.
//!
//! vrun drives LXC 5 through its command-line tools only (`lxc-execute`, `lxc-info`): no
//! `lxc-create`, no daemon, no liblxc binding. Every fact this module relies on was measured
//! on LXC 5.0.2 (the LXC tests in `tests/` check them); the ones that shaped the code:
//!
//! - **One overlay, mounted by vrun.** LXC 5 refuses an overlay mount entry over the rootfs
//!   (`Rootfs overmounted`), and two containers stacking their own overlays on one upper dir
//!   is undefined behaviour for the kernel. So vrun mounts `lowerdir=<build>:<image>,
//!   upperdir=upper, workdir=work` on `<proc>/rootfs` itself ([`mount`]), idempotently and
//!   under a lock, and every container of the proc (`run`, `shell`, each uptest) uses that
//!   directory as a plain rootfs: one filesystem, writes visible both ways. `setup`
//!   mounts it and leaves it mounted, because a Velociraptor host works in `rootfs/`
//!   between setup and run (supervisord's `directory=`, vr.server's uptest check,
//!   vr.builder's copies); run, shell and uptest mount it again after a reboot.
//! - **`lxc-execute`, not `lxc-start -F`.** `lxc-start -F` exits 0 whatever the app did; a
//!   crashing app would look healthy to the supervisor. `lxc-execute` returns the workload's
//!   status (`exit 7` → 7, SIGKILL → 137). Its own init forwards SIGTERM but kills
//!   everything one second later, so for a real grace period vrun signals the workload
//!   itself (the child of the container's init) and kills later ([`container`]).
//! - **No sudo inside the image.** `lxc.init.uid/gid/groups/cwd` start the workload as the
//!   proc user in `/app`; `lxc.no_new_privs` keeps it there ([`config`]).
//! - **Cleanup is by cgroup.** A container whose `lxc-execute` died keeps running with its
//!   cgroups `lxc.payload.NAME` / `lxc.monitor.NAME` at the root of every hierarchy; those
//!   cgroups are the only reliable inventory of what is left ([`cgroups`]). vrun also sets a
//!   parent-death signal on every `lxc-execute` it starts, so a `kill -9` of vrun itself
//!   makes LXC stop the container (SIGTERM, then its one-second kill) instead of orphaning it.
//! - **Temporary containers leave no directory.** Measured: `lxc-execute -P DIR -f FILE`
//!   does not create `DIR/<name>/` for `shell`/uptest containers (`<name>-TMP<id>`); it only
//!   creates the empty lock directory `/run/lxc/lock/<DIR>/`, which is shared by every
//!   container under that lxcpath and harmless. The per-container scratch dir
//!   (`<proc>/tmp-<id>/`, holding that container's config) is vrun's own and removed after.

pub mod cgroups;
pub mod config;
pub mod container;
pub mod mount;

use std::path::{Path, PathBuf};

use crate::config::{Owner, ProcConfig};
use crate::paths::{ProcPaths, Root};
use crate::state::{ProcState, StateError};

/// Unmounting lives with the other mount-aware operations; re-exported for callers that
/// used it from here.
pub use crate::mounts::unmount;
pub use config::{render_config, render_setup_config, ContainerSpec, Volume};
pub use container::{
    clean_run_leftovers, exec_tmp, is_running, remove_cgroups, run_foreground, shell, teardown,
    teardown_containers, unmount_if_layers_changed, write_proc_config, Occupancy, TmpCommand,
    TmpContainer, TmpIo, TmpOutput, DEFAULT_GRACE,
};
pub use mount::{ensure_mounted, ensure_mounted_locked, is_mount_point, lock_mount, MountLock};

/// Where `lxc-execute` is looked up unless `VRUN_LXC_EXECUTE` says otherwise.
///
/// Overridable so that a host with LXC elsewhere works, and so that tests can prove the
/// "LXC is not installed" error without uninstalling LXC.
pub const DEFAULT_LXC_EXECUTE: &str = "/usr/bin/lxc-execute";

/// Environment variable overriding [`DEFAULT_LXC_EXECUTE`]; `lxc-info` is taken from the
/// same directory.
pub const LXC_EXECUTE_ENV: &str = "VRUN_LXC_EXECUTE";

#[derive(Debug, thiserror::Error)]
pub enum LxcError {
    #[error("LXC is not installed: {} not found (apt-get install lxc)", path.display())]
    NotInstalled { path: PathBuf },
    #[error("refusing {key} for proc.lxc: value {value:?} contains a control character")]
    ControlChar { key: String, value: String },
    #[error("invalid volume {host} -> {container}: {reason}")]
    BadVolume {
        host: String,
        container: String,
        reason: String,
    },
    #[error("volume {host} -> {container}: the host dir does not exist or is not a directory")]
    MissingVolumeDir { host: String, container: String },
    #[error("invalid layer path {}: {reason}", path.display())]
    BadLayer { path: PathBuf, reason: &'static str },
    #[error("proc is not set up")]
    NotSetUp {
        #[source]
        source: StateError,
    },
    #[error("proc is not set up: {} is missing (run vrun setup)", dir.display())]
    Gone { dir: PathBuf },
    #[error("cannot mount overlay on {}", target.display())]
    Mount {
        target: PathBuf,
        source: nix::errno::Errno,
    },
    #[error(transparent)]
    Mounts(#[from] crate::mounts::MountError),
    #[error("{} is already mounted but as {fstype}, not the proc's overlay", target.display())]
    ForeignMount { target: PathBuf, fstype: String },
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {}", program.display())]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "container {name} is already running (lxc-info says RUNNING and its lxc-execute is alive)"
    )]
    AlreadyRunning { name: String },
    #[error("cannot remove cgroup {}", path.display())]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("proc {name} is in use by {}; stop them first", containers.join(", "))]
    Busy {
        name: String,
        containers: Vec<String>,
    },
    #[error("invalid memory limits: {reason}")]
    BadLimit { reason: String },
    /// An EROFS layer could not be mounted on its root (see `crate::layers`).
    #[error(transparent)]
    Layer(#[from] crate::layers::LayersError),
    #[error("processes of container {name} survived SIGKILL: {pids:?}")]
    Unkillable { name: String, pids: Vec<i32> },
}

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> LxcError {
    let path = path.into();
    move |source| LxcError::Io { path, source }
}

/// The numeric identity the workload runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (from the host's group database); empty is fine.
    pub groups: Vec<u32>,
    /// `user: root` in proc.yaml: the only case without `lxc.no_new_privs`.
    pub is_root: bool,
}

/// Everything the LXC hand-off needs to know about one proc.
///
/// A plain struct rather than the proc.yaml model itself, so this module does not depend on
/// how proc.yaml is parsed: the command layer builds it from `ProcConfig` (+ `Owner`) and
/// the proc's `state.json`.
#[derive(Debug, Clone)]
pub struct LxcProc {
    /// Container name (`app-version-config-hash-proc-port`), also the proc dir's name.
    pub name: String,
    /// Parent of the proc dirs: `lxc-execute -P`.
    pub lxcpath: PathBuf,
    pub paths: ProcPaths,
    pub state: ProcState,
    pub user: ProcUser,
    /// `[host_dir, container_dir]` pairs from proc.yaml.
    pub volumes: Vec<Volume>,
    /// Bytes.
    pub mem_limit: Option<u64>,
    /// Bytes (memory + swap, cgroup v1 meaning).
    pub memsw_limit: Option<u64>,
}

impl LxcProc {
    /// Build from the root, container name and the proc's saved state (`state.json`).
    pub fn load(
        root: &Root,
        name: &str,
        user: ProcUser,
        volumes: Vec<Volume>,
        mem_limit: Option<u64>,
        memsw_limit: Option<u64>,
    ) -> Result<Self, LxcError> {
        let paths = root.proc(name);
        let state = ProcState::load(&paths.state(), &root.cache_dir())
            .map_err(|source| LxcError::NotSetUp { source })?;
        let proc = Self::with_state(root, name, user, volumes, mem_limit, memsw_limit, state);
        proc.warn_about_limits();
        Ok(proc)
    }

    /// A note when memsw_limit cannot be applied the cgroup v1 way on this host.
    fn warn_about_limits(&self) {
        if self.memsw_limit.is_some() && !config::v1_memsw_supported() {
            crate::notice::emit(
                "warning: this host's memory cgroup has no swap accounting; \
                 memsw_limit is applied on cgroup2 only",
            );
        }
    }

    /// Like [`LxcProc::load`] with a state not (yet) on disk: setup renders proc.lxc from
    /// it before it creates anything.
    pub fn with_state(
        root: &Root,
        name: &str,
        user: ProcUser,
        volumes: Vec<Volume>,
        mem_limit: Option<u64>,
        memsw_limit: Option<u64>,
        state: ProcState,
    ) -> Self {
        Self {
            name: name.to_owned(),
            lxcpath: root.procs_dir(),
            paths: root.proc(name),
            state,
            user,
            volumes,
            mem_limit,
            memsw_limit,
        }
    }

    /// Build from proc.yaml (already loaded, with its container name and resolved owner)
    /// and the proc's `state.json`.
    pub fn from_config(
        root: &Root,
        name: &str,
        config: &ProcConfig,
        owner: &Owner,
    ) -> Result<Self, LxcError> {
        let paths = root.proc(name);
        let state = ProcState::load(&paths.state(), &root.cache_dir())
            .map_err(|source| LxcError::NotSetUp { source })?;
        let proc = Self::from_config_with_state(root, name, config, owner, state);
        proc.warn_about_limits();
        Ok(proc)
    }

    /// [`LxcProc::from_config`] with the given state instead of `state.json`.
    pub fn from_config_with_state(
        root: &Root,
        name: &str,
        config: &ProcConfig,
        owner: &Owner,
        state: ProcState,
    ) -> Self {
        let user = ProcUser {
            uid: owner.uid,
            gid: owner.gid,
            groups: owner.groups.clone(),
            is_root: owner.uid == 0,
        };
        let volumes = config
            .volumes
            .iter()
            .map(|(host, container)| Volume::new(host, container.clone()))
            .collect();
        Self::with_state(
            root,
            name,
            user,
            volumes,
            config.mem_limit,
            config.memsw_limit,
            state,
        )
    }

    /// The container spec shared by all containers of this proc (`run`, and the
    /// `<name>-TMP<id>` ones of shell and uptest): same root, user, volumes, limits.
    pub fn spec(&self) -> ContainerSpec<'_> {
        ContainerSpec {
            hostname: &self.name,
            rootfs: self.paths.rootfs(),
            host_system_dirs: if self.state.image_layer.is_none() {
                config::host_system_dirs()
            } else {
                Vec::new()
            },
            user: &self.user,
            volumes: &self.volumes,
            mem_limit: self.mem_limit,
            memsw_limit: self.memsw_limit,
            v1_memsw: self.memsw_limit.is_none() || config::v1_memsw_supported(),
        }
    }
}

/// Paths of the LXC tools, resolved once.
#[derive(Debug, Clone)]
pub struct LxcTools {
    pub execute: PathBuf,
    pub info: PathBuf,
}

impl LxcTools {
    /// `lxc-execute` from [`LXC_EXECUTE_ENV`] or [`DEFAULT_LXC_EXECUTE`]; `lxc-info` beside it.
    /// Fails with [`LxcError::NotInstalled`] when `lxc-execute` is missing.
    pub fn find() -> Result<Self, LxcError> {
        let execute = std::env::var_os(LXC_EXECUTE_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_LXC_EXECUTE));
        if !execute.is_file() {
            return Err(LxcError::NotInstalled { path: execute });
        }
        let info = execute.parent().unwrap_or(Path::new("/")).join("lxc-info");
        Ok(Self { execute, info })
    }
}

/// Refuse values that would break a `key = value` line of proc.lxc (or smuggle in another).
pub(crate) fn check_value(key: &str, value: &str) -> Result<(), LxcError> {
    if value.chars().any(|c| c.is_control()) {
        return Err(LxcError::ControlChar {
            key: key.to_owned(),
            value: value.to_owned(),
        });
    }
    Ok(())
}
