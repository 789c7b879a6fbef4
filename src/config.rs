//! The proc.yaml model: every key of the runner contract, typed and checked.
//!
//! Velociraptor writes proc.yaml with PyYAML; [`crate::yaml`] reads it with the same YAML 1.1
//! rules, and this module turns the document into a [`ProcConfig`]. All keys are optional
//! to the parser — each command checks what it needs (setup needs the container name,
//! uptest needs `proc_name`) — but a key that is present with the wrong type is an error
//! naming the key, the file, and what was expected. Unknown keys are ignored, as in the
//! original runner, so newer Velociraptor versions can add keys.
//!
//! The container name becomes a directory name under `$VR_ROOT/procs/` and an LXC name,
//! so each of its six parts is validated here, once, before anything touches the disk —
//! but only against what would break it ([`check_name_part`]): vr.common builds the name
//! whatever the parts hold, and the host has already made that directory, so vrun must
//! arrive at the same name, `port` included as Python's `str()` of the loaded value
//! (`05000`, `None`, `0` for vr.builder's build procs, whose `release_hash` is empty).
//! Blank memory limits (`''`, null, `0`) mean no limit, as the original's `if mem_limit:`.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use crate::yaml::{self, Value};

/// Longest allowed container-name part. Six parts plus dashes stay well under the 255-byte
/// file-name limit, and nobody names an app or a release with more than 64 bytes.
pub const MAX_NAME_PART: usize = 64;

/// Default uptest target, as in the original runner.
pub const DEFAULT_HOST: &str = "localhost";

/// An `env` value: strings get `$VAR` substitution (see [`crate::envfiles`]); other
/// scalars are written as Python's `str()` of the value PyYAML loads (`True`, `None`,
/// `1e+20`), which is what the original runner wrote.
#[derive(Debug, Clone, PartialEq)]
pub enum EnvValue {
    Str(String),
    Scalar(String),
}

/// The container-name text of a proc.yaml without `port` (or `port: null`): vr.common
/// joins `str(None)`, so that is the directory name the host already made.
pub const NO_PORT: &str = "None";

#[derive(Debug, Clone, PartialEq)]
pub struct ProcConfig {
    /// The file this came from, for error messages.
    pub path: PathBuf,
    pub app_name: Option<String>,
    pub version: Option<String>,
    pub config_name: Option<String>,
    pub release_hash: Option<String>,
    pub proc_name: Option<String>,
    /// `port` as the original used it everywhere (container name, `PORT`, the uptests'
    /// argument): Python's `str()` of the value PyYAML loads — `5000`, `05000` for the
    /// string `"05000"`, `0` for vr.builder's build procs, [`NO_PORT`] when null or absent.
    pub port: String,
    pub host: String,
    pub user: Option<String>,
    pub group: Option<String>,
    /// In file order (the order PyYAML's dict, hence the original's env.sh, had).
    pub env: Vec<(String, EnvValue)>,
    /// Always a mapping (empty when absent).
    pub settings: Value,
    pub cmd: Option<String>,
    pub build_url: Option<String>,
    pub build_md5: Option<String>,
    pub image_name: Option<String>,
    pub image_url: Option<String>,
    pub image_md5: Option<String>,
    pub volumes: Vec<(String, String)>,
    pub mem_limit: Option<u64>,
    pub memsw_limit: Option<u64>,
    pub app_folder: Option<String>,
}

/// Who the app runs as, resolved on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    /// The user name (or the number, for a uid without a passwd entry).
    pub user: String,
    /// Every group the user is in (primary first), from the host's group database.
    pub groups: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}")]
    Yaml {
        path: PathBuf,
        source: yaml::YamlError,
    },
    #[error("{path} is empty; expected a proc.yaml mapping")]
    Empty { path: PathBuf },
    #[error("{path}: expected a mapping of proc.yaml keys, found {found}")]
    NotMapping { path: PathBuf, found: &'static str },
    #[error("{path}: key {key}: expected {expected}, found {found}")]
    Type {
        path: PathBuf,
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("{path}: key {key}: {reason}")]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("{path}: missing key {key}, needed for the container name")]
    Missing { path: PathBuf, key: &'static str },
    #[error("{path}: user {user:?} does not exist on this host")]
    UnknownUser { path: PathBuf, user: String },
    #[error("{path}: group {group:?} does not exist on this host")]
    UnknownGroup { path: PathBuf, group: String },
    #[error("cannot look up {what}")]
    Lookup {
        what: String,
        source: nix::errno::Errno,
    },
}

/// Typed access to the top-level mapping, producing errors that name the key.
struct Keys<'a> {
    path: &'a Path,
    doc: &'a Value,
}

impl Keys<'_> {
    fn type_error(&self, key: &str, expected: &'static str, v: &Value) -> ConfigError {
        ConfigError::Type {
            path: self.path.to_owned(),
            key: key.to_string(),
            expected,
            found: describe(v),
        }
    }

    fn invalid(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    /// Present and not null.
    fn get(&self, key: &str) -> Option<&Value> {
        self.doc.get(key).filter(|v| **v != Value::Null)
    }

    /// A string; integers are accepted for name-like keys (`version: 3`).
    fn string(&self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Str(s)) => Ok(Some(s.clone())),
            Some(Value::Int(i)) => Ok(Some(i.to_string())),
            Some(v) => Err(self.type_error(key, "a string", v)),
        }
    }

    /// A port number (0–65535: vr.builder's build procs have `port: 0`) as an integer or
    /// a numeric string, kept as the text `str()` gives; null or absent is [`NO_PORT`].
    fn port(&self, key: &str) -> Result<String, ConfigError> {
        let (n, text) = match self.get(key) {
            None => return Ok(NO_PORT.to_string()),
            Some(Value::Int(i)) => (*i, i.to_string()),
            Some(Value::Str(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                (s.parse::<i128>().unwrap_or(i128::MAX), s.clone())
            }
            Some(v) => return Err(self.type_error(key, "a port number (0-65535)", v)),
        };
        match u16::try_from(n) {
            Ok(_) => Ok(text),
            Err(_) => Err(self.invalid(key, format!("port {n} is outside 0-65535"))),
        }
    }

    /// A memory limit. Null, `''` and `0` mean no limit: the original wrote a limit only
    /// `if mem_limit:` (a blank form field in Velociraptor gives `''` or null).
    fn bytes(&self, key: &str) -> Result<Option<u64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Int(0)) => Ok(None),
            Some(Value::Int(i)) => u64::try_from(*i)
                .map(Some)
                .map_err(|_| self.invalid(key, format!("{i} is not a byte count"))),
            Some(Value::Str(s)) if s.trim().is_empty() => Ok(None),
            Some(Value::Str(s)) => match crate::units::parse_size(s) {
                Ok(0) => Ok(None),
                Ok(n) => Ok(Some(n)),
                Err(_) => Err(self.invalid(
                    key,
                    format!("{s:?} is not a size (bytes, or a number with k, M, G or T)"),
                )),
            },
            Some(v) => Err(self.type_error(key, "a size like 268435456 or \"256M\"", v)),
        }
    }

    fn env(&self) -> Result<Vec<(String, EnvValue)>, ConfigError> {
        let entries = match self.get("env") {
            None => return Ok(Vec::new()),
            Some(Value::Map(entries)) => entries,
            Some(v) => return Err(self.type_error("env", "a mapping", v)),
        };
        let mut env = Vec::new();
        for (k, v) in entries {
            let name = match k {
                Value::Str(s) => s.clone(),
                other => {
                    let text = other.scalar_text().unwrap_or_default();
                    return Err(self.invalid(
                        &format!("env.{text}"),
                        format!("the variable name is {} (quote it)", other.kind()),
                    ));
                }
            };
            let value = match v {
                Value::Str(s) => EnvValue::Str(s.clone()),
                Value::Seq(_) | Value::Map(_) => {
                    return Err(self.type_error(&format!("env.{name}"), "a scalar", v))
                }
                scalar => EnvValue::Scalar(
                    yaml::python_str(scalar)
                        .map_err(|reason| self.invalid(&format!("env.{name}"), reason))?,
                ),
            };
            // The yaml module already let a later duplicate win, in the first one's place.
            env.push((name, value));
        }
        Ok(env)
    }

    fn volumes(&self) -> Result<Vec<(String, String)>, ConfigError> {
        let items = match self.get("volumes") {
            None => return Ok(Vec::new()),
            Some(Value::Seq(items)) => items,
            Some(v) => {
                return Err(self.type_error("volumes", "a list of [host_dir, container_dir]", v))
            }
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::Seq(pair) => match pair.as_slice() {
                    // Both paths land in proc.lxc, one setting per line.
                    [Value::Str(host), Value::Str(inside)]
                        if [host, inside]
                            .iter()
                            .any(|p| p.contains(['\n', '\r', '\0'])) =>
                    {
                        Err(self.invalid(
                            &format!("volumes[{i}]"),
                            "paths must not contain newlines or NUL bytes",
                        ))
                    }
                    [Value::Str(host), Value::Str(inside)] => Ok((host.clone(), inside.clone())),
                    _ => Err(self.type_error(
                        &format!("volumes[{i}]"),
                        "two strings [host_dir, container_dir]",
                        item,
                    )),
                },
                other => Err(self.type_error(
                    &format!("volumes[{i}]"),
                    "a list [host_dir, container_dir]",
                    other,
                )),
            })
            .collect()
    }
}

/// A value for an error message: its type, plus its text when it is a short scalar.
fn describe(v: &Value) -> String {
    match v {
        Value::Str(s) => format!("the string {s:?}"),
        Value::Seq(_) | Value::Map(_) => v.kind().to_string(),
        other => format!(
            "{} {}",
            other.kind(),
            other.scalar_text().unwrap_or_default()
        ),
    }
}

/// Why `part` cannot be one component of a container name, if it cannot.
///
/// vr.common joins the six parts with `-` whatever they hold, and the host has already
/// made a directory of that name, so only what would make the name unusable is refused:
/// `/` (a path, not a name), whitespace and control characters (they would split or
/// break a proc.lxc line or a supervisord section), a part that is just `.` or `..`,
/// and more than [`MAX_NAME_PART`] bytes (Velociraptor's own fields are at most 50).
/// Empty parts are fine: vr.builder's build procs have `release_hash: ''`.
pub fn check_name_part(part: &str) -> Result<(), String> {
    if part.len() > MAX_NAME_PART {
        return Err(format!(
            "is {} bytes long, at most {MAX_NAME_PART} allowed",
            part.len()
        ));
    }
    if part.contains('/') {
        return Err(format!("{part:?} must not contain '/'"));
    }
    if part == "." || part == ".." {
        return Err(format!("{part:?} is not a name"));
    }
    if part.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{part:?} must not contain whitespace or control characters"
        ));
    }
    Ok(())
}

impl ProcConfig {
    /// Read and check a proc.yaml.
    pub fn load(path: &Path) -> Result<ProcConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Check proc.yaml text; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<ProcConfig, ConfigError> {
        let doc = yaml::parse(text)
            .map_err(|source| ConfigError::Yaml {
                path: path.to_owned(),
                source,
            })?
            .ok_or_else(|| ConfigError::Empty {
                path: path.to_owned(),
            })?;
        if !matches!(doc, Value::Map(_)) {
            return Err(ConfigError::NotMapping {
                path: path.to_owned(),
                found: doc.kind(),
            });
        }
        let keys = Keys { path, doc: &doc };

        let proc_name = keys.string("proc_name")?;
        let legacy_proc = keys.string("proc")?;
        let proc_name = match (proc_name, legacy_proc) {
            (Some(a), Some(b)) if a != b => {
                return Err(keys.invalid(
                    "proc",
                    format!("legacy alias {b:?} disagrees with proc_name {a:?}"),
                ))
            }
            (a, b) => a.or(b),
        };
        let settings = match keys.get("settings") {
            None => Value::Map(Vec::new()),
            Some(v @ Value::Map(_)) => v.clone(),
            Some(v) => return Err(keys.type_error("settings", "a mapping", v)),
        };
        let cmd = match keys.get("cmd") {
            None => None,
            Some(Value::Str(s)) => Some(s.clone()),
            Some(v) => return Err(keys.type_error("cmd", "a string", v)),
        };

        // Only informative here: the cache is addressed by content, not by image_name
        // (the original used it as a directory under /apps/images), so any string goes.
        let image_name = keys.string("image_name")?;

        Ok(ProcConfig {
            path: path.to_owned(),
            app_name: keys.string("app_name")?,
            version: keys.string("version")?,
            config_name: keys.string("config_name")?,
            release_hash: keys.string("release_hash")?,
            proc_name,
            port: keys.port("port")?,
            host: keys
                .string("host")?
                .unwrap_or_else(|| DEFAULT_HOST.to_string()),
            user: keys.string("user")?,
            group: keys.string("group")?,
            env: keys.env()?,
            settings,
            cmd,
            build_url: keys.string("build_url")?,
            build_md5: keys.string("build_md5")?,
            image_name,
            image_url: keys.string("image_url")?,
            image_md5: keys.string("image_md5")?,
            volumes: keys.volumes()?,
            mem_limit: keys.bytes("mem_limit")?,
            memsw_limit: keys.bytes("memsw_limit")?,
            app_folder: keys.string("app_folder")?,
        })
    }

    /// `app_name-version-config_name-release_hash-proc_name-port`, as in vr.common (the
    /// port as [`ProcConfig::port`] says); each part checked by [`check_name_part`].
    pub fn container_name(&self) -> Result<String, ConfigError> {
        let parts: [(&'static str, Option<&String>); 6] = [
            ("app_name", self.app_name.as_ref()),
            ("version", self.version.as_ref()),
            ("config_name", self.config_name.as_ref()),
            ("release_hash", self.release_hash.as_ref()),
            ("proc_name", self.proc_name.as_ref()),
            ("port", Some(&self.port)),
        ];
        let mut name = Vec::with_capacity(parts.len());
        for (key, value) in parts {
            let value = value.ok_or_else(|| ConfigError::Missing {
                path: self.path.clone(),
                key,
            })?;
            check_name_part(value).map_err(|reason| ConfigError::Invalid {
                path: self.path.clone(),
                key: key.to_string(),
                reason,
            })?;
            name.push(value.as_str());
        }
        Ok(name.join("-"))
    }

    /// Resolve `user`/`group` on this host. Without `user`, the app runs as whoever runs
    /// vrun; without `group`, as the user's primary group. Numeric ids need no entry.
    pub fn owner(&self) -> Result<Owner, ConfigError> {
        use nix::unistd::{Gid, Group, Uid, User};
        let lookup = |what: String| move |source| ConfigError::Lookup { what, source };

        let user_spec = self
            .user
            .clone()
            .unwrap_or_else(|| Uid::effective().as_raw().to_string());
        let entry = if let Ok(n) = user_spec.parse::<u32>() {
            User::from_uid(Uid::from_raw(n)).map_err(lookup(format!("uid {n}")))?
        } else {
            Some(
                User::from_name(&user_spec)
                    .map_err(lookup(format!("user {user_spec:?}")))?
                    .ok_or_else(|| ConfigError::UnknownUser {
                        path: self.path.clone(),
                        user: user_spec.clone(),
                    })?,
            )
        };
        let (uid, name, primary_gid) = match &entry {
            Some(u) => (u.uid.as_raw(), u.name.clone(), Some(u.gid.as_raw())),
            None => {
                let n: u32 = user_spec.parse().expect("numeric above");
                (n, user_spec.clone(), None)
            }
        };
        let gid = match &self.group {
            None => primary_gid.unwrap_or(uid),
            Some(g) => match g.parse::<u32>() {
                Ok(n) => n,
                Err(_) => Group::from_name(g)
                    .map_err(lookup(format!("group {g:?}")))?
                    .ok_or_else(|| ConfigError::UnknownGroup {
                        path: self.path.clone(),
                        group: g.clone(),
                    })?
                    .gid
                    .as_raw(),
            },
        };
        let mut groups = vec![gid];
        if entry.is_some() {
            let cname = CString::new(name.clone()).map_err(|_| ConfigError::Invalid {
                path: self.path.clone(),
                key: "user".into(),
                reason: "contains a NUL byte".into(),
            })?;
            let list = nix::unistd::getgrouplist(&cname, Gid::from_raw(gid))
                .map_err(lookup(format!("groups of {name:?}")))?;
            for g in list {
                if !groups.contains(&g.as_raw()) {
                    groups.push(g.as_raw());
                }
            }
        }
        Ok(Owner {
            uid,
            gid,
            user: name,
            groups,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ProcConfig, ConfigError> {
        ProcConfig::parse(Path::new("p.yaml"), text)
    }

    const NAMED: &str = "app_name: web\nversion: v1\nconfig_name: prod\nrelease_hash: abc\n\
                         proc_name: http\nport: 5000\n";

    #[test]
    fn builds_the_container_name() {
        assert_eq!(
            parse(NAMED).unwrap().container_name().unwrap(),
            "web-v1-prod-abc-http-5000"
        );
        let legacy = NAMED
            .replace("proc_name:", "proc:")
            .replace("5000", "'5001'");
        assert_eq!(
            parse(&legacy).unwrap().container_name().unwrap(),
            "web-v1-prod-abc-http-5001"
        );
        // vr.common's name is '-'.join(...) with str(port) of what PyYAML loaded: a port
        // string keeps its leading zero, null or no port is `None`, and vr.builder's
        // buildproc.yaml (`release_hash: ''`, `port: 0`) has an empty part.
        for (port, want) in [
            ("'05000'", "05000"),
            ("05000", "2560"),
            ("~", "None"),
            ("0", "0"),
            ("0x10", "16"),
        ] {
            let text = NAMED.replace("port: 5000", &format!("port: {port}"));
            let name = parse(&text).unwrap().container_name().unwrap();
            assert_eq!(name, format!("web-v1-prod-abc-http-{want}"), "{port}");
        }
        let no_port = NAMED.replace("port: 5000\n", "");
        assert_eq!(
            parse(&no_port).unwrap().container_name().unwrap(),
            "web-v1-prod-abc-http-None"
        );
        let build = NAMED
            .replace("release_hash: abc", "release_hash: ''")
            .replace("port: 5000", "port: 0");
        assert_eq!(
            parse(&build).unwrap().container_name().unwrap(),
            "web-v1-prod--http-0"
        );
    }

    #[test]
    fn refuses_bad_name_parts() {
        for bad in [
            "../../etc",
            "a/b",
            "a b",
            "a\tb",
            r#""x\ny""#,
            r#""x\0""#,
            "..",
            "'.'",
        ] {
            let text = NAMED.replace("app_name: web", &format!("app_name: {bad}"));
            let err = parse(&text)
                .unwrap()
                .container_name()
                .unwrap_err()
                .to_string();
            assert!(err.contains("key app_name"), "{bad}: {err}");
        }
        let long = "x".repeat(MAX_NAME_PART + 1);
        let text = NAMED.replace("version: v1", &format!("version: {long}"));
        let err = parse(&text)
            .unwrap()
            .container_name()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("key version") && err.contains("65 bytes"),
            "{err}"
        );
        let ok = "x".repeat(MAX_NAME_PART);
        let text = NAMED.replace("version: v1", &format!("version: {ok}"));
        assert!(parse(&text).unwrap().container_name().is_ok());
        let dots = NAMED.replace("version: v1", "version: 1..2");
        assert!(parse(&dots).unwrap().container_name().is_ok());
        let err = parse("app_name: a\n")
            .unwrap()
            .container_name()
            .unwrap_err();
        assert!(err.to_string().contains("missing key version"), "{err}");
    }

    #[test]
    fn type_errors_name_the_key() {
        for (text, key) in [
            ("port: [x]\n", "key port"),
            ("port: 70000\n", "key port"),
            ("port: -1\n", "key port"),
            ("port: 'x1'\n", "key port"),
            ("port: 1.5\n", "key port"),
            ("env: [a]\n", "key env"),
            ("env: {A: [1]}\n", "key env.A"),
            ("settings: 3\n", "key settings"),
            ("cmd: {a: 1}\n", "key cmd"),
            ("volumes: [[a]]\n", "key volumes[0]"),
            ("volumes: [[a, \"b\\nc\"]]\n", "key volumes[0]"),
            ("mem_limit: lots\n", "key mem_limit"),
            ("version: 1.5\n", "key version"),
            ("proc: a\nproc_name: b\n", "key proc"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?}: {err}");
        }
    }

    #[test]
    fn reads_every_key() {
        let c = parse(
            "port: '80'\nmem_limit: 256M\nmemsw_limit: 1073741824\nvolumes: [[/a, /b]]\n\
             env: {N: 5, T: yes, E: ~, S: 'x', F: 1.0e+20, I: .inf}\nunknown_key: [whatever]\n\
             host: db1\nimage_name: any name at all, even with spaces\n",
        )
        .unwrap();
        assert_eq!(c.port, "80");
        assert_eq!(c.mem_limit, Some(256 << 20));
        assert_eq!(c.memsw_limit, Some(1 << 30));
        assert_eq!(c.volumes, vec![("/a".into(), "/b".into())]);
        // In file order, with Python's str() of the loaded values (what the original's
        // `'export %s="%s"' % (key, value)` wrote).
        let scalar = |s: &str| EnvValue::Scalar(s.into());
        assert_eq!(
            c.env,
            vec![
                ("N".into(), scalar("5")),
                ("T".into(), scalar("True")),
                ("E".into(), scalar("None")),
                ("S".into(), EnvValue::Str("x".into())),
                ("F".into(), scalar("1e+20")),
                ("I".into(), scalar("inf")),
            ]
        );
        assert_eq!(c.host, "db1");
        assert_eq!(parse("{}\n").unwrap().host, DEFAULT_HOST);
    }

    #[test]
    fn blank_or_zero_memory_limits_mean_no_limit() {
        // The original wrote a limit only `if mem_limit:`: '', null and 0 are no limit.
        for blank in ["''", "~", "0", "' '", "'0'"] {
            let c = parse(&format!("mem_limit: {blank}\nmemsw_limit: {blank}\n")).unwrap();
            assert_eq!((c.mem_limit, c.memsw_limit), (None, None), "{blank}");
        }
    }

    #[test]
    fn memory_limits_use_the_one_size_grammar() {
        // The same grammar as `vrun cache gc --max-size` (`crate::units`): 1.5G included.
        let c = parse("mem_limit: 1.5G\nmemsw_limit: 256MB\n").unwrap();
        assert_eq!(
            (c.mem_limit, c.memsw_limit),
            (Some(3 << 29), Some(256 << 20))
        );
        for bad in ["-1", "M", "5Q"] {
            let e = parse(&format!("mem_limit: '{bad}'\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("mem_limit") && e.contains("is not a size"),
                "{e}"
            );
        }
    }

    #[test]
    fn resolves_owners_on_the_host() {
        let root = parse("user: root\n").unwrap().owner().unwrap();
        assert_eq!((root.uid, root.gid, root.user.as_str()), (0, 0, "root"));
        assert_eq!(root.groups[0], 0);
        let numeric = parse("user: 4242\ngroup: 4343\n").unwrap().owner().unwrap();
        assert_eq!((numeric.uid, numeric.gid), (4242, 4343));
        let err = parse("user: no-such-user-vrun\n")
            .unwrap()
            .owner()
            .unwrap_err();
        assert!(err.to_string().contains("no-such-user-vrun"), "{err}");
        let err = parse("user: root\ngroup: no-such-group-vrun\n")
            .unwrap()
            .owner()
            .unwrap_err();
        assert!(err.to_string().contains("no-such-group-vrun"), "{err}");
    }
}
