//! The three files that define the app's world inside the container: `env.sh`,
//! `proc.sh`, `settings.yaml` (written into the proc's root, so they appear as `/env.sh`,
//! `/proc.sh`, `/settings.yaml`; on disk they live in the overlay's `upper/`).
//!
//! `env.sh` keeps what apps relied on in the original's `export K="V"` and drops what
//! made it dangerous:
//!
//! - A plain `$NAME` or `${NAME}` inside a value is expanded when env.sh is sourced, as
//!   the double quotes did: `PATH: /app/bin:$PATH` puts `/app/bin` in front of the
//!   container's PATH, `B: $A/x` sees an earlier entry. Everything else stays literal —
//!   `$(…)`, backticks, `"`, `\`, `${X:-…}`, `$1` — so nothing runs at source time (in
//!   the original a `"` or `$(…)` in a value ran as shell on every start). The value is
//!   written as single-quoted literal pieces and `"${NAME}"` references.
//! - A value that is exactly `$NAME` (or `${NAME}`) is the runner spec's substitution: the
//!   variable of *setup's* environment, empty with a warning when unset. (The original
//!   took everything after a leading `$` as the name, so `$HOME/data` became empty; no
//!   proc can have relied on that, so such values get the source-time expansion above.)
//! - Non-string values are Python's `str()` of what PyYAML loaded (`True`, `None`,
//!   `1e+20`, `inf`), as `"%s" % value` wrote them; entries keep proc.yaml's order.
//! - A key that is not a shell name is skipped with a warning: the original's
//!   `export BAD-KEY=…` failed the same way when sourced and the proc still started. Any
//!   shell name is allowed, `LD_*`, `ENV` and `IFS` included: env.sh is only ever
//!   sourced inside the container, for the app, whose command proc.yaml already chooses.
//!
//! Everything is rendered in memory first ([`render`]) so that every error is found
//! before the proc directory exists; only then are the files written, each as a temp
//! sibling + fsync + rename ([`write_files`]), so a crash never leaves half a script.
//! `env.sh` and `settings.yaml` often hold secrets, so they are mode 0640 and owned by
//! the app's user and group; `proc.sh` is root's, 0755, so the app cannot rewrite how it
//! is started.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::config::{EnvValue, Owner, ProcConfig};
use crate::paths::ProcPaths;
use crate::yaml;

/// File names inside `upper/` (= the container's `/`).
pub const ENV_SH: &str = "env.sh";
pub const PROC_SH: &str = "proc.sh";
pub const SETTINGS_YAML: &str = "settings.yaml";

/// `env.sh`/`settings.yaml`: readable by the app's group, not by other users.
const SECRET_MODE: u32 = 0o640;
/// `proc.sh`: executable by everyone, writable by root only.
const SCRIPT_MODE: u32 = 0o755;

#[derive(Debug, thiserror::Error)]
pub enum EnvFilesError {
    #[error("env.{key} contains a NUL byte, which a shell variable cannot hold")]
    NulInValue { key: String },
    #[error("cmd contains a NUL byte, which a shell command cannot hold")]
    NulInCommand,
    #[error("settings")]
    Settings(#[source] yaml::YamlError),
    #[error("{path} is not a directory (a symlink?); refusing to write through it")]
    NotADirectory { path: PathBuf },
    #[error("cannot write {path}")]
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
    let proc_sh = render_proc_sh(command, &config.port)?;
    let settings_yaml = yaml::emit_settings(&config.settings).map_err(EnvFilesError::Settings)?;
    Ok(ProcFiles {
        env_sh,
        proc_sh,
        settings_yaml,
        warnings,
    })
}

/// `[A-Za-z_][A-Za-z0-9_]*`: what a shell accepts as a variable name.
pub fn is_shell_name(key: &str) -> bool {
    let mut bytes = key.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
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

/// One piece of an env value: literal text, or a variable expanded when env.sh is sourced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece<'a> {
    Text(&'a str),
    Var(&'a str),
}

/// Split a value into literal text and plain `$NAME` / `${NAME}` references. Every other
/// `$` (`$(`, `${X:-y}`, `$1`, a lone `$`) is text.
pub fn split_references(value: &str) -> Vec<Piece<'_>> {
    let b = value.as_bytes();
    let name_len = |from: usize| {
        let mut end = from;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        if from < b.len() && (b[from].is_ascii_alphabetic() || b[from] == b'_') {
            end - from
        } else {
            0
        }
    };
    let mut pieces = Vec::new();
    let (mut text_start, mut i) = (0, 0);
    while i < b.len() {
        if b[i] != b'$' {
            i += 1;
            continue;
        }
        let (var, next) = if b.get(i + 1) == Some(&b'{') {
            let n = name_len(i + 2);
            if n > 0 && b.get(i + 2 + n) == Some(&b'}') {
                (Some(&value[i + 2..i + 2 + n]), i + 3 + n)
            } else {
                (None, i + 1)
            }
        } else {
            let n = name_len(i + 1);
            if n > 0 {
                (Some(&value[i + 1..i + 1 + n]), i + 1 + n)
            } else {
                (None, i + 1)
            }
        };
        if let Some(name) = var {
            if text_start < i {
                pieces.push(Piece::Text(&value[text_start..i]));
            }
            pieces.push(Piece::Var(name));
            text_start = next;
        }
        i = next;
    }
    if text_start < b.len() {
        pieces.push(Piece::Text(&value[text_start..]));
    }
    pieces
}

/// A shell word that evaluates to `value` with its plain references expanded: literal
/// pieces single-quoted, references as `"${NAME}"`. `''` for an empty value.
pub fn expanding_word(value: &str) -> Vec<u8> {
    let pieces = split_references(value);
    if pieces.is_empty() {
        return b"''".to_vec();
    }
    let mut out = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Text(t) => out.extend_from_slice(&shell_quote(t.as_bytes())),
            Piece::Var(name) => out.extend_from_slice(format!("\"${{{name}}}\"").as_bytes()),
        }
    }
    out
}

/// The variable name when the whole value is `$NAME` or `${NAME}` (setup's substitution).
fn whole_reference(value: &str) -> Option<&str> {
    match split_references(value).as_slice() {
        [Piece::Var(name)] => Some(name),
        _ => None,
    }
}

/// One `export KEY=…` line per entry, in proc.yaml's order (see the module note).
pub fn render_env_sh(
    env: &[(String, EnvValue)],
    host_env: &dyn Fn(&str) -> Option<OsString>,
    warnings: &mut Vec<String>,
) -> Result<Vec<u8>, EnvFilesError> {
    let mut out = b"# Written by vrun setup from proc.yaml `env`; sourced by /proc.sh.\n".to_vec();
    for (key, value) in env {
        if !is_shell_name(key) {
            warnings.push(format!(
                "env key {key:?} is not a shell variable name ([A-Za-z_][A-Za-z0-9_]*); skipped"
            ));
            continue;
        }
        let word: Vec<u8> = match value {
            EnvValue::Str(s) => match whole_reference(s) {
                Some(var) => {
                    let v = match host_env(var) {
                        Some(v) => v.as_bytes().to_vec(),
                        None => {
                            warnings.push(format!(
                                "env.{key}: ${var} is not set in setup's environment; writing an empty value"
                            ));
                            Vec::new()
                        }
                    };
                    if v.contains(&0) {
                        return Err(EnvFilesError::NulInValue { key: key.clone() });
                    }
                    shell_quote(&v)
                }
                None => {
                    if s.contains('\0') {
                        return Err(EnvFilesError::NulInValue { key: key.clone() });
                    }
                    expanding_word(s)
                }
            },
            EnvValue::Scalar(text) => shell_quote(text.as_bytes()),
        };
        out.extend_from_slice(b"export ");
        out.extend_from_slice(key.as_bytes());
        out.push(b'=');
        out.extend_from_slice(&word);
        out.push(b'\n');
    }
    Ok(out)
}

/// The container's entry point (POSIX sh). `command` is single-quoted into the script and
/// run with `sh -c` at start, so `$PORT` in it expands in the container, not at setup.
pub fn render_proc_sh(command: &str, port: &str) -> Result<String, EnvFilesError> {
    if command.contains('\0') {
        return Err(EnvFilesError::NulInCommand);
    }
    let quoted = String::from_utf8(shell_quote(command.as_bytes())).expect("quoting keeps UTF-8");
    // Exported last, so neither .profile.d nor env.sh can change it; `None` when proc.yaml
    // has no port, as the original's `export PORT=%(port)s` wrote.
    let port_line = format!(
        "export PORT={}\n",
        String::from_utf8(shell_quote(port.as_bytes())).expect("quoting keeps UTF-8")
    );
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
    // A setup killed while writing these leaves its temp sibling behind: sweep it first.
    vrun_cache::remove_stale_temps(upper).map_err(|source| EnvFilesError::Write {
        path: upper.to_owned(),
        source,
    })?;
    let app = Some((owner.uid, owner.gid));
    write(&upper.join(ENV_SH), &files.env_sh, SECRET_MODE, app)?;
    write(
        &upper.join(SETTINGS_YAML),
        files.settings_yaml.as_bytes(),
        SECRET_MODE,
        app,
    )?;
    write(
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

/// [`vrun_cache::write_atomic`] (temp sibling, fsync, rename), the error naming `path`.
fn write(
    path: &Path,
    body: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), EnvFilesError> {
    vrun_cache::write_atomic(path, body, mode, owner).map_err(|source| EnvFilesError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_shell_names() {
        for ok in ["A", "_x", "PATH", "a1_B", "LD_LIBRARY_PATH", "ENV"] {
            assert!(is_shell_name(ok), "{ok}");
        }
        for bad in ["", "1A", "BAD-KEY", "A B", "é", "A=B"] {
            assert!(!is_shell_name(bad), "{bad}");
        }
    }

    #[test]
    fn splits_only_plain_references() {
        use Piece::{Text, Var};
        assert_eq!(
            split_references("/app/bin:$PATH"),
            [Text("/app/bin:"), Var("PATH")]
        );
        assert_eq!(
            split_references("${HOME}/data"),
            [Var("HOME"), Text("/data")]
        );
        assert_eq!(split_references("a$OTHER"), [Text("a"), Var("OTHER")]);
        assert_eq!(split_references("$A$B_1x"), [Var("A"), Var("B_1x")]);
        for literal in [
            "$(id)", "${X:-y}", "$1", "$", "a$", "${}", "${1}", "$$", "`id`",
        ] {
            assert_eq!(split_references(literal), [Text(literal)], "{literal}");
        }
        assert_eq!(split_references(""), []);
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
        assert_eq!(expanding_word("a'$B"), br#"'a'\'''"${B}""#);
        assert_eq!(expanding_word(""), b"''");
    }

    #[test]
    fn substitutes_host_variables_and_warns_when_unset() {
        let env = vec![
            ("H".to_string(), EnvValue::Str("$VRUN_T_SET".into())),
            ("U".to_string(), EnvValue::Str("${VRUN_T_UNSET}".into())),
            ("N".to_string(), EnvValue::Scalar("42".into())),
            ("BAD-KEY".to_string(), EnvValue::Str("x".into())),
            ("P".to_string(), EnvValue::Str("/x:$PATH".into())),
        ];
        let lookup = |k: &str| (k == "VRUN_T_SET").then(|| OsString::from("v'1 $X"));
        let mut warnings = Vec::new();
        let text = render_env_sh(&env, &lookup, &mut warnings).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("export H='v'\\''1 $X'\n"), "{text}");
        assert!(text.contains("export U=''\n"), "{text}");
        assert!(text.contains("export N='42'\n"), "{text}");
        assert!(text.contains("export P='/x:'\"${PATH}\"\n"), "{text}");
        assert!(!text.contains("BAD-KEY"), "{text}");
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("VRUN_T_UNSET"));
        assert!(warnings[1].contains("BAD-KEY") && warnings[1].contains("skipped"));
    }

    #[test]
    fn proc_sh_exports_the_port_text() {
        let with = render_proc_sh("a 'b'", "80").unwrap();
        assert!(with.contains("export PORT='80'\n"));
        assert!(with.contains("exec /bin/sh -c 'a '\\''b'\\'''\n"), "{with}");
        assert!(render_proc_sh("a", "None")
            .unwrap()
            .contains("export PORT='None'\n"));
        assert!(render_proc_sh("a\0", "1").is_err());
    }
}
