//! Mounting EROFS images read-only: file-backed first, else a loop device we set up.
//!
//! * **File-backed** (Linux ≥ 6.12, `CONFIG_EROFS_FS_BACKED_BY_FILE`): `mount(2)` with the
//!   image's path as the source. No device, nothing to clean up but the mount.
//! * **Loop**: `LOOP_CTL_GET_FREE` on `/dev/loop-control`, then `LOOP_CONFIGURE` on that
//!   device with the image fd, `LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR`, and `mount(2)` of
//!   the device. We close our fd right after the mount: with autoclear the kernel detaches
//!   the device when the last user goes, i.e. at unmount (or at once, if the mount failed),
//!   so a crash can leak no loop device. Another process may take the free device between
//!   the two calls (`EBUSY`): we ask again. util-linux `mount` is never used: it adds a
//!   loop device even where the kernel could read the file itself (containerd's EROFS
//!   snapshotter calls mount(2) directly for the same reason).
//!
//! [`probe`] mounts its test image *detached* (`fsopen`/`fsconfig`/`fsmount`, Linux ≥ 5.2:
//! a mount that is an fd, in no mount table) and reads the test file through the fd, so
//! a probe killed half-way (`kill -9` of a setup) leaves no mount behind — an attached
//! probe mount in the store's ingest dir would have been a stale mount that gc could not
//! delete through. Older kernels get mount(2) and an unmount.
//!
//! Both are mounted `ro,nodev` (and `nosuid` on request). Which mounts of an image exist is
//! read from `/proc/self/mountinfo`: a file-backed mount shows the image path as its
//! source; a loop mount shows `/dev/loopN`, whose backing file is in
//! `/sys/block/loopN/loop/backing_file`. We always mount by canonical path, so comparing
//! canonical paths is exact for mounts we made.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

use super::writer::{ImageWriter, Metadata, WriterOptions};

const LOOP_CONTROL: &str = "/dev/loop-control";
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// Times we ask for a free loop device when another process takes ours first.
const LOOP_RETRIES: usize = 16;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// How an image is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    FileBacked,
    Loop { device: PathBuf },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MountOptions {
    /// Add `nosuid` (builds: setuid bits in an app build grant nothing).
    pub nosuid: bool,
    /// Skip the file-backed attempt (tests, and hosts where it misbehaves).
    pub force_loop: bool,
}

/// An EROFS mount of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErofsMount {
    pub image: PathBuf,
    pub target: PathBuf,
    pub method: Method,
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot open image {image}")]
    Image { image: PathBuf, source: io::Error },
    #[error("cannot mount {image} at {target}: file-backed: {file_backed}; loop device: {looped}")]
    Refused {
        image: PathBuf,
        target: PathBuf,
        file_backed: String,
        looped: String,
    },
    #[error("cannot mount {image} at {target} through a loop device: {reason}")]
    LoopRefused {
        image: PathBuf,
        target: PathBuf,
        reason: String,
    },
    #[error(transparent)]
    Mounts(#[from] crate::mounts::MountError),
}

fn errno_text(e: Errno) -> String {
    format!("{} ({})", e.desc(), e)
}

fn flags(opts: &MountOptions) -> MsFlags {
    let mut f = MsFlags::MS_RDONLY | MsFlags::MS_NODEV;
    if opts.nosuid {
        f |= MsFlags::MS_NOSUID;
    }
    f
}

/// Mounts `image` read-only at `target` (an existing directory).
pub fn mount_image(
    image: &Path,
    target: &Path,
    opts: &MountOptions,
) -> Result<ErofsMount, MountError> {
    let image = image.canonicalize().map_err(|source| MountError::Image {
        image: image.to_owned(),
        source,
    })?;
    let fb = if opts.force_loop {
        "not tried".to_string()
    } else {
        match mount(
            Some(&image),
            target,
            Some("erofs"),
            flags(opts),
            None::<&str>,
        ) {
            Ok(()) => {
                return Ok(ErofsMount {
                    image,
                    target: target.to_owned(),
                    method: Method::FileBacked,
                })
            }
            Err(e) => errno_text(e),
        }
    };
    match mount_loop(&image, target, opts) {
        Ok(device) => Ok(ErofsMount {
            image,
            target: target.to_owned(),
            method: Method::Loop { device },
        }),
        Err(looped) if opts.force_loop => Err(MountError::LoopRefused {
            image,
            target: target.to_owned(),
            reason: looped,
        }),
        Err(looped) => Err(MountError::Refused {
            image,
            target: target.to_owned(),
            file_backed: fb,
            looped,
        }),
    }
}

/// A configured loop device; our fd keeps it alive until dropped (autoclear).
struct LoopDevice {
    path: PathBuf,
    _fd: File,
}

fn attach_loop(image: &Path) -> Result<LoopDevice, String> {
    let backing = File::open(image).map_err(|e| format!("open {}: {e}", image.display()))?;
    let ctl = File::open(LOOP_CONTROL).map_err(|e| format!("open {LOOP_CONTROL}: {e}"))?;
    let mut last = String::new();
    for _ in 0..LOOP_RETRIES {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(format!(
                "{LOOP_CONTROL}: LOOP_CTL_GET_FREE: {}",
                io::Error::last_os_error()
            ));
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = match open_loop(&path) {
            Ok(f) => f,
            Err(e) => {
                last = format!("open {}: {e}", path.display());
                continue;
            }
        };
        let mut cfg = LoopConfig {
            fd: backing.as_raw_fd() as u32,
            block_size: 0,
            info: LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR,
                lo_file_name: [0; 64],
                lo_crypt_name: [0; 64],
                lo_encrypt_key: [0; 32],
                lo_init: [0; 2],
            },
            reserved: [0; 8],
        };
        let name = image.as_os_str().as_bytes();
        let k = name.len().min(63);
        cfg.info.lo_file_name[..k].copy_from_slice(&name[..k]);
        // SAFETY: cfg is a properly laid out `struct loop_config` that outlives the call.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const LoopConfig) };
        if r == 0 {
            return Ok(LoopDevice { path, _fd: dev });
        }
        let e = io::Error::last_os_error();
        last = format!("{}: LOOP_CONFIGURE: {e}", path.display());
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(last);
        }
    }
    Err(format!(
        "no free loop device after {LOOP_RETRIES} tries; last: {last}"
    ))
}

/// Opens a loop device node, waiting briefly for udev/devtmpfs to create it.
fn open_loop(path: &Path) -> io::Result<File> {
    let mut tries = 0;
    loop {
        match File::options().read(true).write(true).open(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

fn mount_loop(image: &Path, target: &Path, opts: &MountOptions) -> Result<PathBuf, String> {
    let dev = attach_loop(image)?;
    mount(
        Some(&dev.path),
        target,
        Some("erofs"),
        flags(opts),
        None::<&str>,
    )
    .map_err(|e| format!("mount {}: {}", dev.path.display(), errno_text(e)))?;
    Ok(dev.path.clone())
    // `dev` drops here: the mount holds the device now, autoclear detaches it at unmount.
}

/// Unmounts an EROFS mount (lazily when busy) and checks it is gone. A loop device goes
/// with it (autoclear).
pub fn unmount(target: &Path) -> Result<(), MountError> {
    Ok(crate::mounts::unmount(target)?)
}

/// The backing file of a loop device, from sysfs.
pub fn loop_backing_file(device: &Path) -> Option<PathBuf> {
    let name = device.file_name()?.to_str()?;
    let text = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    let text = text.trim_end_matches('\n');
    if text.ends_with(" (deleted)") {
        return None;
    }
    Some(PathBuf::from(text))
}

/// Existing EROFS mounts of `image` in this mount namespace, file-backed or loop.
pub fn find_mounts(image: &Path) -> Result<Vec<ErofsMount>, MountError> {
    let Ok(image) = image.canonicalize() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for m in crate::mounts::mounts()? {
        if m.fs_type != "erofs" {
            continue;
        }
        let source = PathBuf::from(&m.source);
        let method = if m.source.starts_with("/dev/loop") {
            if loop_backing_file(&source).as_deref() != Some(image.as_path()) {
                continue;
            }
            Method::Loop { device: source }
        } else if source == image {
            Method::FileBacked
        } else {
            continue;
        };
        out.push(ErofsMount {
            image: image.clone(),
            target: m.mount_point,
            method,
        });
    }
    Ok(out)
}

/// Whether EROFS images can be mounted here, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// `erofs` is in `/proc/filesystems`.
    pub kernel: bool,
    /// A file-backed mount of a test image worked, or why not.
    pub file_backed: Result<(), String>,
    /// A loop-device mount of a test image worked, or why not.
    pub loop_device: Result<(), String>,
}

impl Probe {
    /// The method vrun would use, if any.
    pub fn method(&self) -> Option<&'static str> {
        if self.file_backed.is_ok() {
            Some("file-backed")
        } else if self.loop_device.is_ok() {
            Some("loop")
        } else {
            None
        }
    }

    /// One line for an operator: what works, or why nothing does.
    pub fn summary(&self) -> String {
        let part = |r: &Result<(), String>| match r {
            Ok(()) => "works".to_string(),
            Err(e) => e.clone(),
        };
        if !self.kernel {
            return "EROFS unavailable: the kernel has no erofs filesystem (not in /proc/filesystems)"
                .into();
        }
        format!(
            "EROFS {}: file-backed mount: {}; loop device: {}",
            if self.method().is_some() {
                "usable"
            } else {
                "unavailable"
            },
            part(&self.file_backed),
            part(&self.loop_device)
        )
    }
}

/// Why a detached probe mount did not work.
enum Detached {
    /// The kernel has no `fsopen(2)` (before 5.2).
    NoApi,
    Failed(String),
}

/// `fsconfig(2)` commands and `fsmount(2)` attributes (`linux/mount.h`).
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const MOUNT_ATTR_RDONLY: libc::c_uint = 1;
const MOUNT_ATTR_NOSUID: libc::c_uint = 2;
const MOUNT_ATTR_NODEV: libc::c_uint = 4;

fn owned_fd(r: libc::c_long) -> io::Result<std::os::fd::OwnedFd> {
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd from the kernel, owned by nobody else.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(r as i32) })
}

/// Mounts `image` (or, with `through_loop`, a loop device backed by it) as a detached
/// mount — an fd, attached nowhere — and reads the test file through it.
fn probe_detached(image: &Path, through_loop: bool) -> Result<(), Detached> {
    use std::ffi::CString;
    let failed = |what: &str, e: io::Error| Detached::Failed(format!("{what}: {e}"));
    // SAFETY: fsopen(2) with a NUL-terminated name.
    let fs = owned_fd(unsafe { libc::syscall(libc::SYS_fsopen, c"erofs".as_ptr(), 1u32) })
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOSYS) => Detached::NoApi,
            _ => failed("fsopen erofs", e),
        })?;
    let device = through_loop
        .then(|| attach_loop(image))
        .transpose()
        .map_err(Detached::Failed)?;
    let source = device.as_ref().map_or(image, |d| d.path.as_path());
    let source_c = CString::new(source.as_os_str().as_bytes())
        .map_err(|_| Detached::Failed("NUL in the image path".into()))?;
    // SAFETY: fsconfig(2) on our fs context fd with NUL-terminated key and value.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_SET_STRING,
            c"source".as_ptr(),
            source_c.as_ptr(),
            0,
        )
    };
    if r < 0 {
        return Err(failed("fsconfig source", io::Error::last_os_error()));
    }
    // A read-only superblock: the loop device is read-only, and a writable open of it
    // is refused (EACCES).
    // SAFETY: fsconfig(2) SET_FLAG with a NUL-terminated key and no value.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_SET_FLAG,
            c"ro".as_ptr(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    if r < 0 {
        return Err(failed("fsconfig ro", io::Error::last_os_error()));
    }
    // SAFETY: fsconfig(2) CMD_CREATE takes no key or value.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    if r < 0 {
        let e = errno_text(Errno::last());
        // The same words as a mount(2) that failed (see `mount_image`).
        return Err(Detached::Failed(match through_loop {
            true => format!("mount {}: {e}", source.display()),
            false => e,
        }));
    }
    // SAFETY: fsmount(2) on a created fs context.
    let mnt = owned_fd(unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            fs.as_raw_fd(),
            FSMOUNT_CLOEXEC,
            MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        )
    })
    .map_err(|e| failed("fsmount", e))?;
    let read = nix::fcntl::openat(
        mnt.as_fd(),
        "probe",
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(io::Error::from)
    .and_then(|fd| {
        let mut f = File::from(fd);
        let mut b = Vec::new();
        io::Read::read_to_end(&mut f, &mut b).map(|_| b)
    });
    drop(mnt); // the mount goes with its last reference; then the loop device (autoclear)
    drop(device);
    match read {
        Ok(b) if b == b"erofs\n" => Ok(()),
        Ok(_) => Err(Detached::Failed(
            "mounted, but the test file read back wrong".into(),
        )),
        Err(e) => Err(failed("mounted, but reading the test file failed", e)),
    }
}

/// Tries both mount methods with a tiny image written in `scratch` (a directory on the
/// filesystem that will hold the images: whether a file there can back a mount is part
/// of the question). Leaves nothing behind.
pub fn probe(scratch: &Path) -> Probe {
    probe_with(scratch, true)
}

/// [`probe`] that stops at the first method that works (what setup needs to decide; the
/// loop attempt is then reported as "not tried").
pub fn probe_first(scratch: &Path) -> Probe {
    probe_with(scratch, false)
}

fn probe_with(scratch: &Path, both: bool) -> Probe {
    let kernel = std::fs::read_to_string("/proc/filesystems")
        .map(|t| {
            t.lines()
                .any(|l| l.split_whitespace().last() == Some("erofs"))
        })
        .unwrap_or(false);
    let none = |why: &str| Probe {
        kernel,
        file_backed: Err(why.to_string()),
        loop_device: Err(why.to_string()),
    };
    if !kernel {
        return none("no erofs in /proc/filesystems");
    }
    let dir = scratch.join(format!(".erofs-probe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(dir.join("mnt")) {
        return none(&format!("cannot create {}: {e}", dir.display()));
    }
    let image = dir.join("probe.erofs");
    let written = (|| {
        // Mounted from the page cache and deleted: nothing to make durable.
        let opts = WriterOptions {
            sync: false,
            ..WriterOptions::default()
        };
        let mut w = ImageWriter::create(&image, opts)?;
        let meta = Metadata {
            mode: 0o644,
            ..Metadata::default()
        };
        w.add_file(b"probe", &meta, 6, &mut &b"erofs\n"[..])?;
        w.finish()
    })();
    let result = match written {
        Err(e) => none(&format!("cannot write a test image: {e}")),
        Ok(_) => {
            let mnt = dir.join("mnt");
            let attached = |force_loop: bool| -> Result<(), String> {
                let opts = MountOptions {
                    nosuid: true,
                    force_loop,
                };
                let m = mount_image(&image, &mnt, &opts).map_err(|e| match e {
                    MountError::Refused { file_backed, .. } if !force_loop => file_backed,
                    MountError::LoopRefused { reason, .. } => reason,
                    e => crate::errors::chain(&e),
                })?;
                if !force_loop && m.method != Method::FileBacked {
                    let _ = unmount(&mnt);
                    return Err("mount(2) of the image file was refused".into());
                }
                let read = std::fs::read(mnt.join("probe"));
                let _ = unmount(&mnt);
                match read {
                    Ok(b) if b == b"erofs\n" => Ok(()),
                    Ok(_) => Err("mounted, but the test file read back wrong".into()),
                    Err(e) => Err(format!("mounted, but reading the test file failed: {e}")),
                }
            };
            // A detached mount (fsopen/fsmount) is never in the mount table, so a probe
            // killed half-way leaves no mount behind; kernels before 5.2 get mount(2).
            let try_one = |force_loop: bool| match probe_detached(&image, force_loop) {
                Err(Detached::NoApi) => attached(force_loop),
                Err(Detached::Failed(why)) => Err(why),
                Ok(()) => Ok(()),
            };
            let file_backed = try_one(false);
            let loop_device = match (&file_backed, both) {
                (Ok(()), false) => Err("not tried".to_string()),
                _ => try_one(true),
            };
            Probe {
                kernel,
                file_backed,
                loop_device,
            }
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    result
}
