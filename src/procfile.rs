//! Procfiles: how a build says which command each proc type runs.
//!
//! When proc.yaml has no `cmd`, the runner looks `proc_name` up in the build's `Procfile`.
//! The grammar is Heroku's: one `name: command` per line, the name made of letters,
//! digits, `_` and `-`; blank lines and `#` comments are ignored, and so is any other line
//! that does not match (Heroku skips them too). A later line for the same name wins.
//! The error for a missing proc names the proc, the Procfile and what it does define,
//! because "web not found" alone sends the operator digging through a tarball.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ProcfileError {
    #[error("cannot read Procfile {path}: {source}")]
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
}

/// Every `(name, command)` in Procfile text, in file order.
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

/// The command of `proc_name` in the Procfile at `procfile_path`.
pub fn resolve(procfile_path: &Path, proc_name: &str) -> Result<String, ProcfileError> {
    let text = std::fs::read_to_string(procfile_path).map_err(|source| ProcfileError::Read {
        path: procfile_path.to_owned(),
        source,
    })?;
    let entries = parse(&text);
    entries
        .iter()
        .rev()
        .find(|(name, _)| name == proc_name)
        .map(|(_, command)| command.clone())
        .ok_or_else(|| {
            let mut names: Vec<&str> = Vec::new();
            for (name, _) in &entries {
                if !names.contains(&name.as_str()) {
                    names.push(name);
                }
            }
            ProcfileError::Missing {
                proc: proc_name.to_string(),
                path: procfile_path.to_owned(),
                defined: if names.is_empty() {
                    "nothing".into()
                } else {
                    names.join(", ")
                },
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
