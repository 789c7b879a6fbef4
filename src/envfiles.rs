//! The three files that define the app's world inside the container: `env.sh`,
//! `proc.sh`, `settings.yaml` (written into the overlay's `upper/`, so they appear as
//! `/env.sh`, `/proc.sh`, `/settings.yaml`).
//!
//! The original runner wrote `export K="V"`, so an env value holding `"`, `$(…)` or a
//! backtick ran as a shell command on every deploy. Here every value is single-quoted
//! (the one shell quoting with no expansions; `'` becomes `'\''`), keys must be shell
//! names, and the variables that change how a shell or the dynamic loader behaves
//! (`LD_*`, `BASH_ENV`, `ENV`, `IFS`, `PS4`, `SHELLOPTS`, `PROMPT_COMMAND`) are refused:
//! proc.yaml configures the app, not the runner's shell.
//!
//! Everything is rendered in memory first ([`render`]) so that every error is found
//! before the proc directory exists; only then are the files written, each as a temp
//! sibling + fsync + rename ([`write_files`]), so a crash never leaves half a script.
//! `env.sh` and `settings.yaml` often hold secrets, so they are mode 0640 and owned by
//! the app's user and group; `proc.sh` is root's, 0755, so the app cannot rewrite how it
//! is started.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::{EnvValue, Owner, ProcConfig};
use crate::paths::ProcPaths;
use crate::yaml;

/// File names inside `upper/` (= the container's `/`).
pub const ENV_SH: &str = "env.sh";
pub const PROC_SH: &str = "proc.sh";
pub const SETTINGS_YAML: &str = "settings.yaml";

/// Variables that change how `sh`, `bash` or `ld.so` behave rather than configure the app.
pub const REFUSED_ENV: &[&str] = &[
    "BASH_ENV",
    "ENV",
    "IFS",
    "PS4",
    "SHELLOPTS",
    "PROMPT_COMMAND",
];

/// `env.sh`/`settings.yaml`: readable by the app's group, not by other users.
const SECRET_MODE: u32 = 0o640;
/// `proc.sh`: executable by everyone, writable by root only.
const SCRIPT_MODE: u32 = 0o755;

#[derive(Debug, thiserror::Error)]
pub enum EnvFilesError {
    #[error("env key {key:?} is not a shell variable name ([A-Za-z_][A-Za-z0-9_]*)")]
    BadKey { key: String },
    #[error(
        "env key {key} is refused: it changes how the shell or the loader behaves, not the app"
    )]
    RefusedKey { key: String },
    #[error("env.{key} contains a NUL byte, which a shell variable cannot hold")]
    NulInValue { key: String },
    #[error("cmd contains a NUL byte, which a shell command cannot hold")]
    NulInCommand,
    #[error("settings: {0}")]
    Settings(yaml::YamlError),
    #[error("{path} is not a directory (a symlink?); refusing to write through it")]
    NotADirectory { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The rendered files, plus warnings for the operator (unset `$VAR`s).
#[derive(Debug, Clone, PartialEq)]
pub struct ProcFiles {
    pub env_sh: Vec<u8>,
    pub proc_sh: String,
    pub settings_yaml: String,
    pub warnings: Vec<String>,
}

/// Render all three files for `config` starting `command`; `host_env` looks up setup's
/// environment for `$VAR` values.
pub fn render(
    config: &ProcConfig,
    command: &str,
    host_env: &dyn Fn(&str) -> Option<OsString>,
) -> Result<ProcFiles, EnvFilesError> {
    let mut warnings = Vec::new();
    let env_sh = render_env_sh(&config.env, host_env, &mut warnings)?;
    let proc_sh = render_proc_sh(command, config.port)?;
    let settings_yaml = yaml::emit_settings(&config.settings).map_err(EnvFilesError::Settings)?;
    Ok(ProcFiles {
        env_sh,
        proc_sh,
        settings_yaml,
        warnings,
    })
}

/// Refuse keys that are not shell names or that steer the shell/loader.
pub fn check_env_key(key: &str) -> Result<(), EnvFilesError> {
    let mut bytes = key.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if !first_ok || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(EnvFilesError::BadKey {
            key: key.to_string(),
        });
    }
    if key.starts_with("LD_") || REFUSED_ENV.contains(&key) {
        return Err(EnvFilesError::RefusedKey {
            key: key.to_string(),
        });
    }
    Ok(())
}

/// `'…'` with each `'` as `'\''`: the shell expands nothing inside.
pub fn shell_quote(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 2);
    out.push(b'\'');
    for &b in value {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    out
}

/// One `export KEY='value'` line per entry, keys in sorted order.
pub fn render_env_sh(
    env: &BTreeMap<String, EnvValue>,
    host_env: &dyn Fn(&str) -> Option<OsString>,
    warnings: &mut Vec<String>,
) -> Result<Vec<u8>, EnvFilesError> {
    let mut out = b"# Written by vrun setup from proc.yaml `env`; sourced by /proc.sh.\n".to_vec();
    for (key, value) in env {
        check_env_key(key)?;
        let bytes: Vec<u8> = match value {
            EnvValue::Str(s) => match s.strip_prefix('$') {
                Some(var) => match host_env(var) {
                    Some(v) => v.as_bytes().to_vec(),
                    None => {
                        warnings.push(format!(
                            "env.{key}: ${var} is not set in setup's environment; writing an empty value"
                        ));
                        Vec::new()
                    }
                },
                None => s.as_bytes().to_vec(),
            },
            EnvValue::Scalar(text) => text.as_bytes().to_vec(),
        };
        if bytes.contains(&0) {
            return Err(EnvFilesError::NulInValue { key: key.clone() });
        }
        out.extend_from_slice(b"export ");
        out.extend_from_slice(key.as_bytes());
        out.push(b'=');
        out.extend_from_slice(&shell_quote(&bytes));
        out.push(b'\n');
    }
    Ok(out)
}

/// The container's entry point (POSIX sh). `command` is single-quoted into the script and
/// run with `sh -c` at start, so `$PORT` in it expands in the container, not at setup.
pub fn render_proc_sh(command: &str, port: Option<u16>) -> Result<String, EnvFilesError> {
    if command.contains('\0') {
        return Err(EnvFilesError::NulInCommand);
    }
    let quoted = String::from_utf8(shell_quote(command.as_bytes())).expect("quoting keeps UTF-8");
    let port_line = match port {
        Some(p) => format!("export PORT={p}\n"),
        None => String::new(),
    };
    Ok(format!(
        r#"#!/bin/sh
# Written by vrun setup. `/proc.sh run` starts the proc's command; `/proc.sh CMD ARGS...`
# runs CMD instead (shell, uptests), in the same environment.
export TMPDIR=/tmp
export HOME=/app
for vrun_profile in "$HOME"/.profile.d/*; do
    if [ -f "$vrun_profile" ]; then . "$vrun_profile"; fi
done
unset vrun_profile
. /env.sh
export APP_SETTINGS_YAML=/settings.yaml
{port_line}if [ "$#" -eq 0 ]; then
    echo "usage: /proc.sh run | /proc.sh CMD [ARGS...]" >&2
    exit 64
fi
if [ "$1" = run ]; then
    exec /bin/sh -c {quoted}
fi
exec "$@"
"#
    ))
}

/// Create the proc directory with `upper/`, `work/`, `rootfs/` (existing ones are kept).
/// A symlink in place of any of them is refused: setup would write through it.
pub fn create_proc_dirs(proc: &ProcPaths) -> Result<(), EnvFilesError> {
    for dir in [proc.upper(), proc.work(), proc.rootfs()] {
        std::fs::create_dir_all(&dir).map_err(|source| EnvFilesError::Write {
            path: dir.clone(),
            source,
        })?;
    }
    for dir in [proc.dir.clone(), proc.upper(), proc.work(), proc.rootfs()] {
        let meta = std::fs::symlink_metadata(&dir).map_err(|source| EnvFilesError::Write {
            path: dir.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(EnvFilesError::NotADirectory { path: dir });
        }
    }
    // upper/ is the container's `/` (an overlay's root takes its owner and mode from the
    // upper dir): 0755 whatever the caller's umask, or the app user cannot enter `/`.
    let upper = proc.upper();
    std::fs::set_permissions(&upper, std::fs::Permissions::from_mode(0o755)).map_err(|source| {
        EnvFilesError::Write {
            path: upper,
            source,
        }
    })?;
    // The overlay's work dir must not be readable by the app.
    let work = proc.work();
    std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o700))
        .map_err(|source| EnvFilesError::Write { path: work, source })
}

/// Write the three files into `upper` (temp sibling, fsync, rename; then fsync `upper`).
pub fn write_files(upper: &Path, files: &ProcFiles, owner: &Owner) -> Result<(), EnvFilesError> {
    let app = Some((owner.uid, owner.gid));
    write_atomic(&upper.join(ENV_SH), &files.env_sh, SECRET_MODE, app)?;
    write_atomic(
        &upper.join(SETTINGS_YAML),
        files.settings_yaml.as_bytes(),
        SECRET_MODE,
        app,
    )?;
    write_atomic(
        &upper.join(PROC_SH),
        files.proc_sh.as_bytes(),
        SCRIPT_MODE,
        None,
    )?;
    let dir = std::fs::File::open(upper).map_err(|source| EnvFilesError::Write {
        path: upper.to_owned(),
        source,
    })?;
    dir.sync_all().map_err(|source| EnvFilesError::Write {
        path: upper.to_owned(),
        source,
    })
}

/// Replace `path` with `body` atomically; `owner` = (uid, gid) to chown to.
pub fn write_atomic(
    path: &Path,
    body: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), EnvFilesError> {
    let name = path.file_name().expect("a file path").to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.vrun-tmp"));
    let err = |source| EnvFilesError::Write {
        path: path.to_owned(),
        source,
    };
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(err)?;
    let result = (|| {
        f.write_all(body)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        }
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_env_keys() {
        for ok in ["A", "_x", "PATH", "a1_B"] {
            check_env_key(ok).unwrap();
        }
        for bad in ["", "1A", "BAD-KEY", "A B", "é", "A=B"] {
            assert!(
                matches!(check_env_key(bad), Err(EnvFilesError::BadKey { .. })),
                "{bad}"
            );
        }
        for refused in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "BASH_ENV",
            "ENV",
            "IFS",
            "PS4",
        ] {
            let err = check_env_key(refused).unwrap_err();
            assert!(err.to_string().contains(refused), "{err}");
        }
    }

    #[test]
    fn refuses_a_symlinked_proc_dir() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::create_dir(&target).unwrap();
        let proc = ProcPaths {
            dir: dir.path().join("proc"),
        };
        std::os::unix::fs::symlink(&target, &proc.dir).unwrap();
        let err = create_proc_dirs(&proc).unwrap_err();
        assert!(matches!(err, EnvFilesError::NotADirectory { .. }), "{err}");
        let real = ProcPaths {
            dir: dir.path().join("real"),
        };
        create_proc_dirs(&real).unwrap();
        create_proc_dirs(&real).unwrap();
    }

    #[test]
    fn quotes_for_the_shell() {
        assert_eq!(shell_quote(b"it's"), b"'it'\\''s'");
        assert_eq!(shell_quote(b""), b"''");
    }

    #[test]
    fn substitutes_host_variables_and_warns_when_unset() {
        let env = BTreeMap::from([
            ("H".to_string(), EnvValue::Str("$VRUN_T_SET".into())),
            ("U".to_string(), EnvValue::Str("$VRUN_T_UNSET".into())),
            ("N".to_string(), EnvValue::Scalar("42".into())),
        ]);
        let lookup = |k: &str| (k == "VRUN_T_SET").then(|| OsString::from("v'1"));
        let mut warnings = Vec::new();
        let text = render_env_sh(&env, &lookup, &mut warnings).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("export H='v'\\''1'\n"), "{text}");
        assert!(text.contains("export U=''\n"), "{text}");
        assert!(text.contains("export N='42'\n"), "{text}");
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("VRUN_T_UNSET"));
    }

    #[test]
    fn proc_sh_sets_port_only_when_given() {
        let with = render_proc_sh("a 'b'", Some(80)).unwrap();
        assert!(with.contains("export PORT=80\n"));
        assert!(with.contains("exec /bin/sh -c 'a '\\''b'\\'''\n"), "{with}");
        assert!(!render_proc_sh("a", None).unwrap().contains("PORT="));
        assert!(render_proc_sh("a\0", None).is_err());
    }
}
