//! Rendering `proc.lxc`: the LXC 5 configuration of a proc's containers.
//!
//! The original runner's template used keys LXC 5 rejects outright (`lxc.rootfs`,
//! `lxc.utsname`, `lxc.network.type`, …), so this is written from scratch with LXC 5 names
//! only. Each line is there for a measured reason:
//!
//! - `lxc.rootfs.path = dir:<proc>/rootfs` — the overlay vrun mounted itself (see
//!   [`super::mount`]); LXC just pivots into it.
//! - `lxc.net.0.type = none` shares the host network, so the app's port is reachable on
//!   127.0.0.1 as with the original runner (a private netns would have only `lo`).
//! - `lxc.mount.auto = proc:mixed sys:ro` — without it there is no `/proc` at all.
//! - Mount targets are RELATIVE (`app/data`): LXC 5 silently ignores absolute ones.
//! - Memory limits are written for both cgroup versions: on a hybrid host only
//!   `lxc.cgroup.memory.*` takes effect, on a pure cgroup2 host only `lxc.cgroup2.memory.*`;
//!   LXC warns about and skips the one that does not apply.
//! - `lxc.init.uid/gid/groups/cwd` replace the sudo the original needed inside the image;
//!   `lxc.no_new_privs = 1` stops setuid binaries from undoing that, except for procs that
//!   run as root on purpose (they would gain nothing from it and some tools expect to
//!   re-exec setuid helpers).
//!
//! Every value comes from proc.yaml or the filesystem, so every value is checked: a control
//! character (newline above all) would let a proc.yaml value add its own config lines,
//! e.g. an `lxc.mount.entry` of `/`. Such values are refused, naming the key.

use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};

use super::{check_value, LxcError, ProcUser};

/// The original runner's capability drop list (kept as is: apps were written against it).
pub const CAP_DROP: &str = "mac_admin mac_override mknod setpcap sys_admin sys_boot \
sys_module sys_nice sys_pacct sys_rawio sys_resource sys_time sys_tty_config";

/// Devices a container may use: null, zero, full, random, urandom, tty, console, ptmx and
/// the pty slaves. Everything else is denied.
const DEVICE_ALLOW: &[&str] = &[
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 5:0 rwm",
    "c 5:1 rwm",
    "c 5:2 rwm",
    "c 136:* rwm",
];

/// The host directories a proc without an image runs on, read-only (the original
/// `precise` style), in mount order.
pub const HOST_SYSTEM_DIRS: &[&str] = &["bin", "sbin", "usr", "lib", "lib64", "etc", "opt"];

/// Linux limits a hostname to 64 bytes; `sethostname` fails beyond that and container
/// names can be longer.
const HOSTNAME_MAX: usize = 63;

/// How one of [`HOST_SYSTEM_DIRS`] exists on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SystemDir {
    /// A real directory: bound read-only.
    Dir(&'static str),
    /// A symlink (merged-/usr hosts: `bin -> usr/bin`): recreated as the same symlink in
    /// the rootfs, so the container sees the host's layout through the `usr` bind.
    Symlink(&'static str, PathBuf),
}

/// Which of [`HOST_SYSTEM_DIRS`] this host has, and how. Missing ones are skipped.
pub fn host_system_dirs() -> Vec<SystemDir> {
    HOST_SYSTEM_DIRS
        .iter()
        .filter_map(|name| {
            let host = Path::new("/").join(name);
            let meta = std::fs::symlink_metadata(&host).ok()?;
            if meta.file_type().is_symlink() {
                Some(SystemDir::Symlink(name, std::fs::read_link(&host).ok()?))
            } else if meta.is_dir() {
                Some(SystemDir::Dir(name))
            } else {
                None
            }
        })
        .collect()
}

/// A bind mount from the host into the container (`volumes` in proc.yaml).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub host: PathBuf,
    /// Absolute path inside the container.
    pub container: String,
}

impl Volume {
    pub fn new(host: impl Into<PathBuf>, container: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            container: container.into(),
        }
    }

    /// The mount entry source and its relative target, validated. `require_host`: a
    /// missing host dir is an error (else the caller learns of it from [`Volume::exists`]).
    fn entry(&self, require_host: bool) -> Result<(String, String), LxcError> {
        let host = self.host.to_string_lossy().into_owned();
        let bad = |reason: &str| LxcError::BadVolume {
            host: host.clone(),
            container: self.container.clone(),
            reason: reason.to_owned(),
        };
        check_value("volumes", &host)?;
        check_value("volumes", &self.container)?;
        // An fstab-style line: whitespace would split the entry.
        if host.contains(char::is_whitespace) || self.container.contains(char::is_whitespace) {
            return Err(bad("paths must not contain whitespace"));
        }
        if !self.host.is_absolute() {
            return Err(bad("the host dir must be an absolute path"));
        }
        let target = Path::new(&self.container);
        if !target.is_absolute() {
            return Err(bad("the container dir must be an absolute path"));
        }
        let mut rel = PathBuf::new();
        for c in target.components() {
            match c {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(p) => rel.push(p),
                Component::ParentDir | Component::Prefix(_) => {
                    return Err(bad("the container dir must not contain '..'"))
                }
            }
        }
        if rel.as_os_str().is_empty() {
            return Err(bad("the container dir must not be '/'"));
        }
        if require_host && !self.exists() {
            return Err(LxcError::MissingVolumeDir {
                host,
                container: self.container.clone(),
            });
        }
        Ok((host, rel.to_string_lossy().into_owned()))
    }

    /// Whether the host dir exists (as a directory).
    pub fn exists(&self) -> bool {
        self.host.is_dir()
    }
}

/// What one container of a proc looks like.
#[derive(Debug, Clone)]
pub struct ContainerSpec<'a> {
    /// `lxc.uts.name`; truncated to what the kernel accepts.
    pub hostname: &'a str,
    /// The mounted overlay.
    pub rootfs: PathBuf,
    /// Non-empty only for procs without an image.
    pub host_system_dirs: Vec<SystemDir>,
    pub user: &'a ProcUser,
    pub volumes: &'a [Volume],
    pub mem_limit: Option<u64>,
    pub memsw_limit: Option<u64>,
    /// Whether a cgroup v1 memsw limit can be set here ([`v1_memsw_supported`]).
    pub v1_memsw: bool,
}

/// False on a host with a cgroup v1 memory hierarchy but no swap accounting (no
/// `memory.memsw.limit_in_bytes`); true otherwise (LXC skips v1 keys where v1 is absent).
pub fn v1_memsw_supported() -> bool {
    super::cgroups::hierarchies()
        .iter()
        .filter(|h| h.join("memory.limit_in_bytes").exists())
        .all(|h| h.join("memory.memsw.limit_in_bytes").exists())
}

/// Render the config. Pure: only volume host dirs are looked at (they must exist).
pub fn render_config(spec: &ContainerSpec<'_>) -> Result<String, LxcError> {
    render(spec, true)
}

/// What setup writes: the same config, but a volume whose host dir does not exist yet is
/// not an error (the original's setup did not look; `run` refuses to start until it
/// exists). Those volumes are returned beside the text, for a warning.
pub fn render_setup_config(spec: &ContainerSpec<'_>) -> Result<(String, Vec<Volume>), LxcError> {
    let text = render(spec, false)?;
    let missing = spec
        .volumes
        .iter()
        .filter(|v| !v.exists())
        .cloned()
        .collect();
    Ok((text, missing))
}

fn render(spec: &ContainerSpec<'_>, require_host_dirs: bool) -> Result<String, LxcError> {
    let rootfs = spec.rootfs.to_string_lossy();
    check_value("lxc.rootfs.path", &rootfs)?;
    check_value("lxc.uts.name", spec.hostname)?;
    let mut hostname = spec.hostname;
    while hostname.len() > HOSTNAME_MAX {
        let mut cut = HOSTNAME_MAX.min(hostname.len() - 1);
        while !hostname.is_char_boundary(cut) {
            cut -= 1;
        }
        hostname = &hostname[..cut];
    }

    let mut c = String::new();
    let mut line = |k: &str, v: &str| {
        let _ = writeln!(c, "{k} = {v}");
    };
    line("lxc.uts.name", hostname);
    line("lxc.rootfs.path", &format!("dir:{rootfs}"));
    line("lxc.net.0.type", "none");
    line("lxc.apparmor.profile", "unconfined");
    line("lxc.console.path", "none");
    line("lxc.tty.max", "0");
    line("lxc.pty.max", "16");
    line("lxc.autodev", "1");
    line("lxc.mount.auto", "proc:mixed sys:ro");
    for dir in &spec.host_system_dirs {
        if let SystemDir::Dir(name) = dir {
            line(
                "lxc.mount.entry",
                &format!("/{name} {name} none bind,ro,create=dir 0 0"),
            );
        }
    }
    for f in ["hostname", "hosts", "resolv.conf"] {
        line(
            "lxc.mount.entry",
            &format!("/etc/{f} etc/{f} none bind,ro,create=file 0 0"),
        );
    }
    line(
        "lxc.mount.entry",
        "tmpfs dev/shm tmpfs rw,nosuid,nodev,create=dir 0 0",
    );
    line("lxc.cap.drop", CAP_DROP);
    // Both cgroup versions, like memory: v1 device cgroup on hybrid hosts, the BPF
    // device program on cgroup2 (verified harmless together on a hybrid host).
    for prefix in ["lxc.cgroup", "lxc.cgroup2"] {
        line(&format!("{prefix}.devices.deny"), "a");
        for d in DEVICE_ALLOW {
            line(&format!("{prefix}.devices.allow"), d);
        }
    }
    if let (Some(mem), Some(memsw)) = (spec.mem_limit, spec.memsw_limit) {
        if memsw < mem {
            return Err(LxcError::BadLimit {
                reason: format!("memsw_limit ({memsw}) is below mem_limit ({mem})"),
            });
        }
    }
    if let Some(mem) = spec.mem_limit {
        line("lxc.cgroup.memory.limit_in_bytes", &mem.to_string());
        line("lxc.cgroup2.memory.max", &mem.to_string());
    }
    if let Some(memsw) = spec.memsw_limit {
        // v1 counts memory + swap together; v2 limits swap alone. A v1 host booted without
        // swap accounting has no memsw file, and LXC would refuse to start at all.
        if spec.v1_memsw {
            line("lxc.cgroup.memory.memsw.limit_in_bytes", &memsw.to_string());
        }
        let swap = memsw.saturating_sub(spec.mem_limit.unwrap_or(0));
        line("lxc.cgroup2.memory.swap.max", &swap.to_string());
    }
    line("lxc.init.uid", &spec.user.uid.to_string());
    line("lxc.init.gid", &spec.user.gid.to_string());
    if !spec.user.groups.is_empty() {
        let groups: Vec<String> = spec.user.groups.iter().map(u32::to_string).collect();
        line("lxc.init.groups", &groups.join(","));
    }
    line("lxc.init.cwd", "/app");
    if !spec.user.is_root {
        line("lxc.no_new_privs", "1");
    }
    for v in spec.volumes {
        let (host, target) = v.entry(require_host_dirs)?;
        line(
            "lxc.mount.entry",
            &format!("{host} {target} none bind,create=dir 0 0"),
        );
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> ProcUser {
        ProcUser {
            uid: 1000,
            gid: 1000,
            groups: vec![2000, 1000],
            is_root: false,
        }
    }

    fn spec<'a>(u: &'a ProcUser, vols: &'a [Volume]) -> ContainerSpec<'a> {
        ContainerSpec {
            hostname: "app-1-cfg-abc-web-5000",
            rootfs: PathBuf::from("/apps/procs/app-1-cfg-abc-web-5000/rootfs"),
            host_system_dirs: vec![],
            user: u,
            volumes: vols,
            mem_limit: Some(64 << 20),
            memsw_limit: Some(128 << 20),
            v1_memsw: true,
        }
    }

    #[test]
    fn renders_lxc5_keys_with_relative_volume_targets() {
        let u = user();
        let vols = [Volume::new("/tmp", "/data/x")];
        let c = render_config(&spec(&u, &vols)).unwrap();
        assert!(c.contains("lxc.rootfs.path = dir:/apps/procs/app-1-cfg-abc-web-5000/rootfs\n"));
        assert!(c.contains("lxc.mount.entry = /tmp data/x none bind,create=dir 0 0\n"));
        assert!(c.contains("lxc.init.groups = 2000,1000\n"));
        assert!(c.contains("lxc.cgroup.memory.limit_in_bytes = 67108864\n"));
        assert!(c.contains("lxc.cgroup2.memory.max = 67108864\n"));
        assert!(c.contains("lxc.cgroup2.memory.swap.max = 67108864\n"));
        assert!(c.contains("lxc.no_new_privs = 1\n"));
        assert!(c.contains("lxc.cgroup.memory.memsw.limit_in_bytes = 134217728\n"));
        assert!(c.contains("lxc.cgroup2.devices.deny = a\n"));
        assert!(c.contains("lxc.cgroup.devices.allow = c 136:* rwm\n"));
        for legacy in [
            "lxc.rootfs =",
            "lxc.utsname",
            "lxc.network",
            "lxc.aa_profile",
        ] {
            assert!(!c.contains(legacy), "{legacy} in\n{c}");
        }
    }

    #[test]
    fn root_user_has_no_no_new_privs() {
        let u = ProcUser {
            is_root: true,
            ..user()
        };
        let c = render_config(&spec(&u, &[])).unwrap();
        assert!(!c.contains("no_new_privs"));
    }

    #[test]
    fn refuses_newlines_naming_the_key() {
        let u = user();
        let vols = [Volume::new("/tmp", "/data\nlxc.mount.entry = / x")];
        let e = render_config(&spec(&u, &vols)).unwrap_err().to_string();
        assert!(
            e.contains("volumes") && e.contains("control character"),
            "{e}"
        );
        let mut s = spec(&u, &[]);
        s.rootfs = PathBuf::from("/x\ry");
        let e = render_config(&s).unwrap_err().to_string();
        assert!(e.contains("lxc.rootfs.path"), "{e}");
    }

    #[test]
    fn refuses_bad_volumes() {
        let u = user();
        for (h, c) in [
            ("tmp", "/data"),
            ("/tmp", "data"),
            ("/tmp", "/a/../etc"),
            ("/tmp", "/"),
            ("/tmp", "/a b"),
        ] {
            let vols = [Volume::new(h, c)];
            assert!(
                matches!(
                    render_config(&spec(&u, &vols)),
                    Err(LxcError::BadVolume { .. })
                ),
                "{h} {c}"
            );
        }
    }

    #[test]
    fn a_missing_host_dir_is_its_own_error() {
        let u = user();
        let vols = [Volume::new("/nonexistent-vrun-dir", "/data")];
        assert!(matches!(
            render_config(&spec(&u, &vols)),
            Err(LxcError::MissingVolumeDir { .. })
        ));
    }

    #[test]
    fn long_hostnames_are_truncated() {
        let u = user();
        let long = "x".repeat(200);
        let mut s = spec(&u, &[]);
        s.hostname = &long;
        let c = render_config(&s).unwrap();
        assert!(c.contains(&format!("lxc.uts.name = {}\n", "x".repeat(63))));
    }

    #[test]
    fn no_v1_memsw_key_without_swap_accounting() {
        let u = user();
        let mut s = spec(&u, &[]);
        s.v1_memsw = false;
        let c = render_config(&s).unwrap();
        assert!(!c.contains("memsw"), "{c}");
        assert!(c.contains("lxc.cgroup2.memory.swap.max = 67108864\n"));
    }

    #[test]
    fn memsw_below_mem_is_refused() {
        let u = user();
        let mut s = spec(&u, &[]);
        s.memsw_limit = Some(1 << 20);
        assert!(matches!(render_config(&s), Err(LxcError::BadLimit { .. })));
    }
}
