//! Acceptance tests of the runner contract, running the real `vrun` binary: the CLI, the
//! proc.yaml checks, the lock (against util-linux `flock`), the files setup writes
//! (checked with a real `sh`, a busybox chroot and the real PyYAML), and teardown.

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{ChildGuard, MountGuard, TestDir};

const NAME: &str = "web-v1-prod-abc123-http-5000";

/// The container-name keys of [`NAME`], plus `user: root`.
const NAME_KEYS: &str = "app_name: web\nversion: v1\nconfig_name: prod\nrelease_hash: abc123\n\
                         proc_name: http\nport: 5000\nuser: root\n";

fn proc_yaml(extra: &str) -> String {
    format!("{NAME_KEYS}cmd: \"python3 -m http.server $PORT\"\n{extra}")
}

/// The settings of the acceptance test: every string YAML 1.1 could re-type, and every
/// type that must survive.
const SETTINGS: &str = r#"settings:
  s_yes: 'yes'
  s_no: 'no'
  s_on: 'on'
  s_off: 'off'
  s_null: 'null'
  s_Null: 'Null'
  s_tilde: '~'
  s_empty: ''
  s_sexagesimal: '1:20'
  s_sexagesimal3: '190:20:30'
  s_equals: '='
  s_octal: '0123'
  s_date: '2001-12-14'
  s_underscore: '1_000'
  s_at: '@How''s it going?'
  s_y: 'y'
  s_n: 'n'
  s_True: 'True'
  s_inf: '.inf'
  s_1e3: '1e3'
  s_hex: '0x1F'
  s_bin: '0b101'
  s_plus: '+1'
  s_dash: '-'
  s_float: '1.0'
  s_float_exp: '1.0e+3'
  s_merge: '<<'
  s_newlines: "two\nlines\n"
  s_tab: "\tx\ty"
  s_spaces: "  lead and trail  "
  s_hash: '# not a comment'
  s_colon: 'a: b'
  s_unicode: "h\u00e9llo \u2713 \U0001F600 \u2028 \x85 \u00a0 \ufeff"
  s_quotes: 'it''s "q" \ `x` $(y)'
  s_flow: '[a, {b: c}]'
  s_alias: '*a'
  s_anchor: '&a'
  s_tag: '!a'
  s_question: '? x'
  s_pipe: '|'
  s_control: "\x01\x1b\x7f"
  i: 42
  i_neg: -7
  i_octal: 0123
  i_sexagesimal: 1:20
  i_underscore: 1_000
  i_hex: 0x1F
  i_big: 123456789012345678901234567890
  f: 1.5
  f_exp: 1.0e+100
  f_small: -2.5e-7
  f_inf: .inf
  f_ninf: -.inf
  f_nan: .nan
  b_yes: yes
  b_true: true
  b_off: off
  n_tilde: ~
  n_empty:
  d_date: 2001-12-14
  d_time: 2001-12-14t21:59:43.10-05:00
  l_empty: []
  m_empty: {}
  nested: {a: [1, [2, 'x'], {b: 'yes'}], c: {d: {e: null}}}
  2: int key
  yes: bool key
"#;

/// Compare proc.yaml's `settings` and settings.yaml as PyYAML reads them, types included.
const PYYAML_COMPARE: &str = r#"
import math, sys, yaml
want = yaml.safe_load(open(sys.argv[1], 'rb'))['settings']
got = yaml.safe_load(open(sys.argv[2], 'rb'))
def same(a, b, path):
    if type(a) is not type(b):
        sys.exit('%s: want %r (%s), got %r (%s)' % (path, a, type(a).__name__, b, type(b).__name__))
    if isinstance(a, dict):
        ka = [(type(k).__name__, k) for k in a]
        kb = [(type(k).__name__, k) for k in b]
        if ka != kb:
            sys.exit('%s: keys %r != %r' % (path, ka, kb))
        for k in a:
            same(a[k], b[k], '%s.%s' % (path, k))
    elif isinstance(a, list):
        if len(a) != len(b):
            sys.exit('%s: lengths %d != %d' % (path, len(a), len(b)))
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, '%s[%d]' % (path, i))
    elif isinstance(a, float) and math.isnan(a):
        if not math.isnan(b):
            sys.exit('%s: want nan, got %r' % (path, b))
    elif a != b:
        sys.exit('%s: want %r, got %r' % (path, a, b))
same(want, got, 'settings')
strings = [k for k in want if isinstance(k, str) and k.startswith('s_')]
assert all(type(want[k]) is str for k in strings), 'proc.yaml strings'
assert want['s_yes'] == 'yes' and want['b_yes'] is True and want['i_octal'] == 83
assert want['s_at'] == "@How's it going?" and want[True] == 'bool key'
print(len(want), len(strings))
"#;

#[test]
fn help_lists_the_five_commands_and_an_example() {
    let t = TestDir::new();
    let run = t.vrun(["--help"]).run();
    run.assert_ok();
    for command in ["setup", "run", "uptest", "teardown", "shell"] {
        assert!(
            run.stdout
                .lines()
                .any(|l| l.trim_start().starts_with(command)),
            "{command} missing from help:\n{}",
            run.stdout
        );
    }
    assert!(run.stdout.contains("vrun setup /home/dave/myproc.yaml"));
    let version = t.vrun(["--version"]).run();
    version.assert_ok();
    assert!(version.stdout.starts_with("vrun "), "{version:?}");
}

#[test]
fn unknown_command_exits_2_listing_the_commands() {
    let t = TestDir::new();
    let run = t.vrun(["frobnicate", "proc.yaml"]).run();
    assert_eq!(run.code, Some(2), "{run:?}");
    assert_eq!(
        run.stderr,
        "ERROR: unknown command \"frobnicate\"; the commands are: setup, run, uptest, \
         teardown, shell, cache, demo (see vrun --help)\n"
    );
    let missing_file = t.vrun(["setup"]).run();
    assert_eq!(missing_file.code, Some(2), "{missing_file:?}");
    assert!(missing_file.stderr.contains("<FILE>"), "{missing_file:?}");
    assert!(t.root_entries().is_empty());
}

#[test]
fn setup_writes_env_sh_that_no_value_can_escape_and_exact_settings() {
    let t = TestDir::new();
    let pwned = t.path().join("pwned");
    let home = "/home/vrun test 'home'";
    let yaml = proc_yaml(&format!(
        "env:\n  A: \"it's \\\"q\\\" $(touch {p}) `touch {p}` \\\\ end\"\n  B: \"$HOME\"\n  \
         C: \"two\\nlines\"\n  D: \"$VRUN_TEST_SURELY_UNSET\"\n  N: 5\n  T: yes\n{SETTINGS}",
        p = pwned.display()
    ));
    let file = t.write("proc.yaml", &yaml);
    let run = t
        .vrun(["setup".as_ref(), file.as_os_str()])
        .env("HOME", home)
        .env_remove("VRUN_TEST_SURELY_UNSET")
        .run();
    run.assert_ok();
    assert!(
        run.stderr
            .contains("WARNING: env.D: $VRUN_TEST_SURELY_UNSET is not set"),
        "{run:?}"
    );

    let upper = t.proc_dir(NAME).join("upper");
    for dir in ["upper", "work", "rootfs"] {
        assert!(t.proc_dir(NAME).join(dir).is_dir(), "{dir}");
    }
    let value = |var: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(". ./env.sh; printf %s \"${var}\""))
            .current_dir(&upper)
            .env_clear()
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let want_a = format!(
        "it's \"q\" $(touch {p}) `touch {p}` \\ end",
        p = pwned.display()
    );
    assert_eq!(value("A"), want_a);
    assert!(!pwned.exists(), "an env value ran a command");
    assert_eq!(value("B"), home);
    assert_eq!(value("C"), "two\nlines");
    assert_eq!(value("D"), "");
    assert_eq!(value("N"), "5");
    // vr.runners wrote `"%s" % value`: Python's str(True).
    assert_eq!(value("T"), "True");

    let proc_sh = upper.join("proc.sh");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&proc_sh).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o755);
    let text = std::fs::read_to_string(&proc_sh).unwrap();
    assert!(
        text.contains("exec /bin/sh -c 'python3 -m http.server $PORT'"),
        "{text}"
    );

    let compare = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(PYYAML_COMPARE)
        .arg(&file)
        .arg(upper.join("settings.yaml"))
        .output()
        .unwrap();
    assert!(
        compare.status.success(),
        "PyYAML disagrees: {}{}",
        String::from_utf8_lossy(&compare.stdout),
        String::from_utf8_lossy(&compare.stderr)
    );
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.proc_dir(NAME).join("state.json")).unwrap())
            .unwrap();
    assert_eq!(state["uid"], 0);
    // State version 2 records layers by key (vr.runners kept no state file).
    assert_eq!(state["version"], 2);
    assert_eq!(state["build"], serde_json::Value::Null);
}

/// Run `/proc.sh ARGS` in a busybox chroot of `upper/`, as the container would.
fn chroot_proc_sh(upper: &Path, args: &[&str]) -> std::process::Output {
    // Absolute: the child's PATH (/bin, inside the chroot) is also used to find it.
    Command::new("/usr/sbin/chroot")
        .arg(upper)
        .arg("/bin/sh")
        .arg("/proc.sh")
        .args(args)
        .env_clear()
        .env("PATH", "/bin")
        .output()
        .unwrap()
}

#[test]
fn proc_sh_sources_profile_then_env_then_sets_settings_and_port() {
    let t = TestDir::new();
    let cmd =
        r#"printf '%s|' "$PORT" "$A" "$ORDER" "$FROM" "$HOME" "$TMPDIR" "$APP_SETTINGS_YAML""#;
    let yaml = format!(
        "{NAME_KEYS}cmd: '{}'\nenv: {{A: \"it's $(x)\", PORT: '2', FROM: env}}\n",
        cmd.replace('\'', "''")
    );
    let file = t.write("proc.yaml", &yaml);
    t.vrun(["setup".as_ref(), file.as_os_str()])
        .run()
        .assert_ok();

    // A minimal root with the three files setup wrote (into the overlay's upper dir).
    let written = t.proc_dir(NAME).join("upper");
    let upper = t.path().join("chroot");
    std::fs::create_dir_all(upper.join("bin")).unwrap();
    for f in ["env.sh", "proc.sh", "settings.yaml"] {
        std::fs::copy(written.join(f), upper.join(f)).unwrap();
    }
    std::fs::copy("/bin/busybox", upper.join("bin/busybox")).unwrap();
    for applet in ["sh", "printf", "echo"] {
        std::os::unix::fs::symlink("busybox", upper.join("bin").join(applet)).unwrap();
    }
    let profile = upper.join("app/.profile.d");
    std::fs::create_dir_all(&profile).unwrap();
    for (name, letter) in [("20-b.sh", "b"), ("05-c.sh", "c"), ("10-a.sh", "a")] {
        std::fs::write(
            profile.join(name),
            format!("export ORDER=\"${{ORDER}}{letter}\" FROM=profile PORT=1\n"),
        )
        .unwrap();
    }

    let out = chroot_proc_sh(&upper, &["run"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "5000|it's $(x)|cab|env|/app|/tmp|/settings.yaml|"
    );
    let out = chroot_proc_sh(&upper, &["echo", "any", "command"]);
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "any command\n");
    let out = chroot_proc_sh(&upper, &[]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
}

#[test]
fn env_keys_that_are_not_shell_names_are_skipped_with_one_warning_each() {
    // vr.runners wrote `export BAD-KEY="x"`; sourcing it failed for that line only
    // ("not a valid identifier") and the proc started with the rest. LD_*, BASH_ENV and
    // ENV (a common app setting) were exported like any other key: env.sh is sourced only
    // inside the container, for the app whose command proc.yaml already chooses.
    let t = TestDir::new();
    let file = t.write(
        "proc.yaml",
        &proc_yaml(
            "env:\n  BAD-KEY: x\n  1X: y\n  LD_LIBRARY_PATH: /app/lib\n  BASH_ENV: /app/b\n  \
             ENV: production\n  OK: z\n",
        ),
    );
    let run = t.vrun(["setup".as_ref(), file.as_os_str()]).run();
    run.assert_ok();
    let warnings: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("WARNING: "))
        .collect();
    assert_eq!(warnings.len(), 2, "{run:?}");
    assert!(warnings[0].contains("\"BAD-KEY\"") && warnings[0].contains("skipped"));
    assert!(warnings[1].contains("\"1X\""));
    let env = std::fs::read_to_string(t.proc_dir(NAME).join("upper/env.sh")).unwrap();
    assert!(!env.contains("BAD-KEY") && !env.contains("1X"), "{env}");
    for line in [
        "export LD_LIBRARY_PATH='/app/lib'\n",
        "export BASH_ENV='/app/b'\n",
        "export ENV='production'\n",
        "export OK='z'\n",
    ] {
        assert!(env.contains(line), "{line} in {env}");
    }
}

#[test]
fn bad_proc_files_fail_with_one_line_and_create_nothing() {
    let cases: &[(&str, Option<&str>, &[&str])] = &[
        ("empty", Some(""), &["empty"]),
        ("list", Some("- a\n- b\n"), &["expected a mapping", "found a list"]),
        ("port", Some("port: [x]\n"), &["key port"]),
        (
            "traversal",
            Some("app_name: ../../etc\nversion: v1\nconfig_name: c\nrelease_hash: h\nproc_name: p\nport: 1\ncmd: x\n"),
            &["key app_name", "'/'"],
        ),
        ("invalid", Some("a: [1, 2\nb: {\n"), &["invalid YAML", "line"]),
        ("missing", None, &["No such file"]),
        ("no_user", Some(&*proc_yaml("user: no-such-user-vrun\n").replace("user: root\n", "")), &["no-such-user-vrun"]),
        ("build", Some(&*proc_yaml("build_url: http://127.0.0.1:9/b.tgz\n")), &["cannot connect", "http://127.0.0.1:9/b.tgz"]),
        ("no_cmd", Some(NAME_KEYS), &["no cmd"]),
        ("tab_in_name", Some(&*proc_yaml("").replace("version: v1", "version: \"v\\t1\"")), &["key version"]),
    ];
    for (what, text, needles) in cases {
        let t = TestDir::new();
        let file = match text {
            Some(text) => t.write("proc.yaml", text),
            None => t.path().join("proc.yaml"),
        };
        for command in ["setup", "teardown"] {
            let setup_only = ["build", "no_cmd", "no_user"].contains(what);
            if setup_only && command == "teardown" {
                continue; // teardown needs only the name
            }
            let run = t.vrun([command.as_ref(), file.as_os_str()]).run();
            run.assert_error(needles);
            // An unreachable build server is found out only after the store is opened: its
            // empty skeleton may exist, but nothing is published and no proc dir made.
            let left: Vec<_> = t
                .root_entries()
                .into_iter()
                .filter(|p| !(*what == "build" && is_empty_cache_skeleton(p)))
                .collect();
            assert!(left.is_empty(), "{what}: {left:?}");
        }
    }
}

/// Part of an empty store: a directory, a lock file, or the store's markers — nothing
/// that was published.
fn is_empty_cache_skeleton(p: &Path) -> bool {
    let s = p.to_string_lossy();
    s.contains("/cache")
        && (p.is_dir()
            || s.contains("/locks-v1/")
            || s.ends_with("/CACHEDIR.TAG")
            || s.ends_with("/VERSION"))
}

/// Hold FILE with util-linux `flock FILE sleep 5` until the guard drops.
fn hold_lock(t: &TestDir, file: &Path) -> ChildGuard {
    use std::os::unix::process::CommandExt;
    // Own process group: `sleep` inherits the locked fd, so the guard kills both.
    let child = Command::new("flock")
        .arg(file)
        .args(["sleep", "5"])
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let guard = ChildGuard(child);
    // Wait until the lock is really held (flock -n fails with 1 then).
    loop {
        let probe = Command::new("flock")
            .args(["-n", "-E", "99"])
            .arg(file)
            .arg("true")
            .current_dir(t.path())
            .status()
            .unwrap();
        if probe.code() == Some(99) {
            return guard;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn a_locked_file_stops_setup_and_teardown_at_once_but_not_uptest() {
    let t = TestDir::new();
    let file = t.write("proc.yaml", &proc_yaml(""));
    let mut holder = hold_lock(&t, &file);
    for command in ["setup", "teardown"] {
        // FILE exactly as given: relative, from the test dir.
        let run = t.vrun([command, "proc.yaml"]).run();
        assert_eq!(run.code, Some(1), "{run:?}");
        assert_eq!(
            run.stderr,
            "ERROR: proc.yaml is locked by another process.\n"
        );
        let absolute = t.vrun([command.as_ref(), file.as_os_str()]).run();
        assert_eq!(
            absolute.stderr,
            format!("ERROR: {} is locked by another process.\n", file.display())
        );
    }
    assert!(t.root_entries().is_empty());
    for command in ["uptest", "shell"] {
        let run = t.vrun([command, "proc.yaml"]).run();
        assert!(!run.stderr.contains("locked"), "{command}: {run:?}");
    }
    // The holder still holds the lock, so none of the above waited for it.
    assert!(holder.0.try_wait().unwrap().is_none(), "flock ended early");
    drop(holder);
    t.vrun(["setup", "proc.yaml"]).run().assert_ok();
}

#[test]
fn run_takes_the_lock() {
    let t = TestDir::new();
    let file = t.write("proc.yaml", &proc_yaml(""));
    let _holder = hold_lock(&t, &file);
    let run = t.vrun(["run", "proc.yaml"]).run();
    assert_eq!(
        run.stderr,
        "ERROR: proc.yaml is locked by another process.\n"
    );
}

#[test]
fn setup_twice_keeps_upper_and_rewrites_the_files() {
    let t = TestDir::new();
    let file = t.write("proc.yaml", &proc_yaml("env: {V: one}\n"));
    t.vrun(["setup", "proc.yaml"]).run().assert_ok();
    let upper = t.proc_dir(NAME).join("upper");
    let rootfs = t.proc_dir(NAME).join("rootfs");
    // Written through the mounted root, as the app (or vr.builder's copy) would.
    std::fs::write(rootfs.join("app-wrote-this"), "x").unwrap();
    std::fs::write(&file, proc_yaml("env: {V: two}\n")).unwrap();
    t.vrun(["setup", "proc.yaml"]).run().assert_ok();
    assert!(upper.join("app-wrote-this").exists());
    assert!(rootfs.join("app-wrote-this").exists());
    // The second setup's env.sh is what the mounted root shows, not a stale dentry.
    let seen = std::fs::read_to_string(rootfs.join("env.sh")).unwrap();
    assert!(seen.contains("export V='two'\n"), "{seen}");
    let env = std::fs::read_to_string(upper.join("env.sh")).unwrap();
    assert!(env.contains("export V='two'\n"), "{env}");
    let leftovers: Vec<_> = std::fs::read_dir(&upper)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn teardown_twice_succeeds_and_removes_the_proc() {
    let t = TestDir::new();
    t.write("proc.yaml", &proc_yaml(""));
    t.vrun(["setup", "proc.yaml"]).run().assert_ok();
    assert!(t.proc_dir(NAME).is_dir());
    t.vrun(["teardown", "proc.yaml"]).run().assert_ok();
    assert!(!t.proc_dir(NAME).exists());
    t.vrun(["teardown", "proc.yaml"]).run().assert_ok();
}

#[test]
fn teardown_unmounts_rootfs_first() {
    let t = TestDir::new();
    t.write("proc.yaml", &proc_yaml(""));
    t.vrun(["setup", "proc.yaml"]).run().assert_ok();
    let rootfs = t.proc_dir(NAME).join("rootfs");
    let _mount = MountGuard::tmpfs(&rootfs);
    std::fs::write(rootfs.join("inside-the-mount"), "x").unwrap();
    t.vrun(["teardown", "proc.yaml"]).run().assert_ok();
    assert!(!vrun::mounts::is_mount_point(&rootfs).unwrap());
    assert!(!t.proc_dir(NAME).exists());
}

#[test]
fn teardown_never_deletes_through_another_mount() {
    let t = TestDir::new();
    t.write("proc.yaml", &proc_yaml(""));
    t.vrun(["setup", "proc.yaml"]).run().assert_ok();
    let volume = t.proc_dir(NAME).join("upper/volume");
    let _mount = MountGuard::tmpfs(&volume);
    std::fs::write(volume.join("precious"), "x").unwrap();
    // A bind mount of the same filesystem has the same st_dev: mountinfo must catch it.
    let outside = t.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("precious"), "x").unwrap();
    let bind = t.proc_dir(NAME).join("upper/bind");
    std::fs::create_dir(&bind).unwrap();
    nix::mount::mount(
        Some(&outside),
        &bind,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    let _bind = MountGuard(bind.clone());

    let run = t.vrun(["teardown", "proc.yaml"]).run();
    run.assert_error(&["on another filesystem", "upper/volume", "upper/bind"]);
    assert!(volume.join("precious").exists());
    assert!(outside.join("precious").exists());
    assert!(!t.proc_dir(NAME).join("upper/env.sh").exists());
}

/// Resolve + construct each plain scalar with PyYAML's own SafeLoader machinery.
const PYYAML_RESOLVE: &str = r#"
import sys, yaml
from yaml.constructor import SafeConstructor
c = SafeConstructor()
for line in sys.stdin.read().split('\0'):
    if not line:
        continue
    tag = yaml.resolver.Resolver().resolve(yaml.ScalarNode, line, (True, False))
    kind = tag.rsplit(':', 1)[1]
    try:
        v = c.construct_object(yaml.ScalarNode(tag, line))
        text = repr(v) if kind in ('float', 'int', 'bool') else ''
    except Exception:
        text = 'ERROR'
    print('%s\t%s' % (kind, text))
"#;

#[test]
fn plain_scalars_resolve_exactly_like_pyyaml() {
    use vrun::yaml::{resolve_plain, Value};
    // Every string of up to 4 characters over the characters that matter to the
    // resolvers, plus the words.
    let alphabet = ["0", "1", "7", "9", "_", ":", ".", "+", "-", "e", "x", "b"];
    let mut candidates: Vec<String> = alphabet.iter().map(|s| s.to_string()).collect();
    for _ in 0..3 {
        let longer: Vec<String> = candidates
            .iter()
            .filter(|c| c.len() == candidates.last().unwrap().len())
            .flat_map(|c| alphabet.iter().map(move |a| format!("{c}{a}")))
            .collect();
        candidates.extend(longer);
    }
    for word in [
        "",
        "~",
        "null",
        "NULL",
        "nUll",
        "yes",
        "Yes",
        "yES",
        "y",
        "on",
        "oN",
        "true",
        "TRUE",
        "off",
        "No",
        ".inf",
        "-.Inf",
        "+.INF",
        ".nan",
        ".NaN",
        "-.nan",
        "0x1F",
        "0x_",
        "0b101",
        "0o17",
        "1:20",
        "1:60",
        "190:20:30",
        "1:20.5",
        "-1:20",
        "1.0e+3",
        "1.0e3",
        "1e+3",
        ".5",
        ".5e-3",
        "+.5",
        "1_000.5_5",
        "0123",
        "0128",
        "00",
        "-0",
        "+0",
        "2001-12-14",
        "2001-1-14",
        "2001-12-14t21:59:43.10-05:00",
        "2001-12-14 21:59:43.10 -5",
        "2001-12-14 21:59:43 Z",
        "2001-12-14T21:59:43",
        "2001-12-14  1:59:43.",
        "20011-12-14",
        "123456789012345678901234567890",
        "@x",
        "=",
    ] {
        candidates.push(word.to_string());
    }
    let mut child = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(PYYAML_RESOLVE)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        for c in &candidates {
            write!(stdin, "{c}\0").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let lines: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let non_empty: Vec<&String> = candidates.iter().filter(|c| !c.is_empty()).collect();
    assert_eq!(lines.len(), non_empty.len());
    let mut checked = 0;
    for (candidate, line) in non_empty.into_iter().zip(&lines) {
        let (kind, text) = line.split_once('\t').unwrap();
        let ours = resolve_plain(candidate.clone());
        let agree = match (&ours, kind) {
            // PyYAML resolves these but safe_load cannot construct them (so it cannot load
            // such a document at all); we keep a string.
            (Value::Str(_), "value" | "merge") => true,
            (Value::Str(_), _) if text == "ERROR" => true,
            (Value::Str(s), "str") => s == candidate,
            (Value::Null, "null") => true,
            (Value::Bool(b), "bool") => text == if *b { "True" } else { "False" },
            (Value::Int(i), "int") => text == i.to_string(),
            (Value::Float(f), "float") => {
                let py: f64 = text.parse().unwrap();
                (f.is_nan() && py.is_nan()) || *f == py
            }
            (Value::Timestamp(_), "timestamp") => true,
            _ => false,
        };
        assert!(agree, "{candidate:?}: PyYAML {kind} {text}, vrun {ours:?}");
        checked += 1;
    }
    assert!(checked > 22_000, "{checked}");
}

#[test]
fn any_string_survives_settings_yaml_through_pyyaml() {
    use vrun::yaml::{emit_settings, Value};
    let mut strings: Vec<String> = (0u32..0x800)
        .chain([0x2028, 0x2029, 0xfeff, 0xfffe, 0xffff, 0x1f600, 0x10ffff])
        .filter_map(char::from_u32)
        .map(|c| format!("{c}"))
        .collect();
    for s in [
        "",
        " ",
        "  x",
        "x  ",
        "a\nb",
        "a\r\nb",
        "\n",
        "- a",
        "? a",
        ": a",
        "a:",
        "a #b",
        "#",
        "'",
        "\"",
        "\\",
        "\\n",
        "{",
        "}",
        "[]",
        "*x",
        "&x",
        "!x",
        "%x",
        "@x",
        "`x",
        "|",
        ">",
        "yes",
        "No",
        "~",
        "null",
        "1:20",
        "=",
        "<<",
        "0123",
        "1_000",
        "2001-12-14",
        ".inf",
        "1e3",
        "0x1F",
        "+1",
        "-",
        "---",
        "...",
        "--- a",
        "@How's it going?",
    ] {
        strings.push(s.to_string());
    }
    let map = Value::Map(
        strings
            .iter()
            .enumerate()
            .map(|(i, s)| (Value::Str(format!("k{i}")), Value::Str(s.clone())))
            .chain(
                strings
                    .iter()
                    .map(|s| (Value::Str(s.clone()), Value::Int(1))),
            )
            .collect(),
    );
    let text = emit_settings(&map).unwrap();
    assert!(text.is_ascii());
    let t = TestDir::new();
    let file = t.write("settings.yaml", &text);
    let out = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(
            "import json, sys, yaml\n\
             d = yaml.safe_load(open(sys.argv[1], 'rb'))\n\
             assert all(type(k) is str for k in d)\n\
             print(json.dumps(d))",
        )
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&out.stdout).unwrap();
    for (i, s) in strings.iter().enumerate() {
        assert_eq!(
            got[&format!("k{i}")],
            serde_json::Value::from(s.as_str()),
            "{s:?}"
        );
        assert_eq!(got[s], serde_json::Value::from(1), "key {s:?}");
    }
}
