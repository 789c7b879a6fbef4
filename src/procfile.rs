//! Procfiles: how a build says which command each proc type runs.
//!
//! When proc.yaml has no `cmd`, the runner looks `proc_name` up in the build's `Procfile`.
//! The original runner read the Procfile with `yaml.safe_load` and took
//! `procs[proc_name]`, so a Procfile that is a YAML mapping is read exactly as PyYAML
//! reads it ([`crate::yaml`]): `web: 'echo "a: b"'` runs `echo "a: b"`, a folded scalar
//! runs folded, `#` starts a comment. Only when the text is not a YAML mapping (invalid
//! YAML such as `web: echo a: b`, or a single `web:cmd` line, which YAML reads as one
//! string) — where the original failed — is it read with Heroku's line grammar: one
//! `name: command` per line, the name made of letters, digits, `_` and `-`; blank lines,
//! `#` comments and any other line are ignored, and a later line for the same name wins.
//! The error for a missing proc names the proc, the Procfile and what it does define,
//! because "web not found" alone sends the operator digging through a tarball.

use std::path::{Path, PathBuf};

use crate::yaml::{self, Value};

#[derive(Debug, thiserror::Error)]
pub enum ProcfileError {
    #[error("cannot read Procfile {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("proc {proc:?} is not defined in {path} (it defines: {defined})")]
    Missing {
        proc: String,
        path: PathBuf,
        defined: String,
    },
    #[error("proc {proc:?} in {path}: {reason}")]
    BadCommand {
        proc: String,
        path: PathBuf,
        reason: String,
    },
}

/// Every `(name, command)` in Procfile text by Heroku's line grammar, in file order.
pub fn parse(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            let (name, command) = line.split_once(':')?;
            let valid_name = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            let command = command.trim();
            (valid_name && !command.is_empty()).then(|| (name.to_string(), command.to_string()))
        })
        .collect()
}

/// How the Procfile text was read.
enum Procfile {
    /// A YAML mapping, as PyYAML loads it.
    Yaml(Vec<(Value, Value)>),
    /// Heroku's line grammar (not a YAML mapping).
    Lines(Vec<(String, String)>),
}

fn read(text: &str) -> Procfile {
    match yaml::parse(text) {
        Ok(Some(Value::Map(entries))) => Procfile::Yaml(entries),
        _ => Procfile::Lines(parse(text)),
    }
}

/// The command of `proc_name` in the Procfile at `procfile_path`.
pub fn resolve(procfile_path: &Path, proc_name: &str) -> Result<String, ProcfileError> {
    let text = std::fs::read_to_string(procfile_path).map_err(|source| ProcfileError::Read {
        path: procfile_path.to_owned(),
        source,
    })?;
    let (found, names) = match read(&text) {
        Procfile::Yaml(entries) => {
            let found = entries
                .iter()
                .find(|(k, _)| matches!(k, Value::Str(s) if s == proc_name))
                .map(|(_, v)| match v {
                    Value::Str(s) => Ok(s.clone()),
                    Value::Null => Err("has no command".to_string()),
                    Value::Seq(_) | Value::Map(_) => {
                        Err(format!("the command is {}, not a string", v.kind()))
                    }
                    // `exec %s` of the value in the original: its str().
                    scalar => yaml::python_str(scalar),
                });
            let names: Vec<String> = entries
                .iter()
                .map(|(k, _)| yaml::python_str(k).unwrap_or_default())
                .collect();
            (found, names)
        }
        Procfile::Lines(entries) => {
            let found = entries
                .iter()
                .rev()
                .find(|(name, _)| name == proc_name)
                .map(|(_, command)| Ok(command.clone()));
            (found, entries.into_iter().map(|(name, _)| name).collect())
        }
    };
    match found {
        Some(Ok(command)) => Ok(command),
        Some(Err(reason)) => Err(ProcfileError::BadCommand {
            proc: proc_name.to_string(),
            path: procfile_path.to_owned(),
            reason,
        }),
        None => {
            let mut unique: Vec<String> = Vec::new();
            for name in names {
                if !unique.contains(&name) {
                    unique.push(name);
                }
            }
            Err(ProcfileError::Missing {
                proc: proc_name.to_string(),
                path: procfile_path.to_owned(),
                defined: if unique.is_empty() {
                    "nothing".into()
                } else {
                    unique.join(", ")
                },
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Not YAML (`bad name: x` after a mapping line, `empty:` … and `no colon here` make
    /// PyYAML fail), so the line grammar applies.
    const PROCFILE: &str = "# comment\n\nweb: gunicorn app:app -b 0.0.0.0:$PORT\n\
        worker:python worker.py  \n  bad name: x\nclock-2: sh -c 'a: b'\nweb: later wins\n\
        no colon here\nempty:\n";

    #[test]
    fn parses_heroku_grammar() {
        assert_eq!(
            parse(PROCFILE),
            vec![
                ("web".into(), "gunicorn app:app -b 0.0.0.0:$PORT".into()),
                ("worker".into(), "python worker.py".into()),
                ("clock-2".into(), "sh -c 'a: b'".into()),
                ("web".into(), "later wins".into()),
            ]
        );
    }

    fn resolve_text(text: &str, proc: &str) -> Result<String, ProcfileError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("Procfile");
        std::fs::write(&path, text).unwrap();
        resolve(&path, proc)
    }

    #[test]
    fn resolves_and_names_proc_and_file_when_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("Procfile");
        std::fs::write(&path, PROCFILE).unwrap();
        assert_eq!(resolve(&path, "web").unwrap(), "later wins");
        assert_eq!(resolve(&path, "clock-2").unwrap(), "sh -c 'a: b'");
        let err = resolve(&path, "api").unwrap_err().to_string();
        assert!(
            err.contains("\"api\"") && err.contains(&path.display().to_string()),
            "{err}"
        );
        assert!(err.contains("web, worker, clock-2"), "{err}");
        let err = resolve(&dir.path().join("nope"), "web")
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn a_yaml_mapping_is_read_as_pyyaml_reads_it() {
        // What `yaml.safe_load(Procfile)[proc]` gave vr.runners 4.0 for each text.
        for (text, want) in [
            ("web: 'echo \"a: b\"'\n", "echo \"a: b\""),
            ("web: \"printf '%s\\\\n' x\"\n", "printf '%s\\n' x"),
            ("web: >\n  python\n  app.py\n", "python app.py\n"),
            ("web: |\n  a\n  b\n", "a\nb\n"),
            ("web: gunicorn app:app  # served\n", "gunicorn app:app"),
            ("web: first\nweb: second\n", "second"),
            ("web: true\n", "True"),
        ] {
            assert_eq!(resolve_text(text, "web").unwrap(), want, "{text:?}");
        }
        let err = resolve_text("web: ~\nworker: x\n", "web").unwrap_err();
        assert!(err.to_string().contains("has no command"), "{err}");
        let err = resolve_text("worker: x\n", "web").unwrap_err();
        assert!(err.to_string().contains("it defines: worker"), "{err}");
        // One `name:cmd` line is a YAML string, not a mapping: the original failed; the
        // line grammar reads it.
        assert_eq!(resolve_text("web:serve\n", "web").unwrap(), "serve");
    }
}
