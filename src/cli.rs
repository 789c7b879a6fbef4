//! The command line: `vrun COMMAND FILE`, exactly as Velociraptor calls it.
//!
//! Velociraptor only ever passes a command and a proc.yaml path, so those two positional
//! arguments alone must always work; everything else (`--root`, per-command flags) is
//! optional. Each command has its own `Args` struct, so a new flag touches one struct and
//! a new command (`cache`, `demo`) is one enum variant plus one dispatch arm in
//! `commands/mod.rs`. Usage errors exit 2 (clap's convention) with one line that lists the
//! commands, because the most common mistake is a mistyped command from a deploy script.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use vrun::paths::DEFAULT_ROOT;

/// Exit status for a command line vrun does not understand (clap's and sysexits' usage code).
pub const USAGE_EXIT: u8 = 2;

const EXAMPLES: &str = "\
Examples:
  vrun setup /home/dave/myproc.yaml
  VR_ROOT=/tmp/vr vrun run myproc.yaml
  vrun --root /tmp/vr teardown myproc.yaml
  sudo vrun demo                     # deploy a sample app end to end, then tear it down";

#[derive(Debug, Parser)]
#[command(
    name = "vrun",
    version,
    about = "Velociraptor runner: set up, run, uptest, shell into and tear down LXC procs",
    after_help = EXAMPLES,
    subcommand_required = true,
    arg_required_else_help = true
)]
pub struct Cli {
    /// Root for vrun's cache and proc directories
    #[arg(long, global = true, env = "VR_ROOT", default_value = DEFAULT_ROOT, value_name = "DIR")]
    pub root: PathBuf,

    #[command(subcommand)]
    pub command: Command,

    /// Whether `--root` or `VR_ROOT` was given (`demo` uses a temp root otherwise).
    #[arg(skip)]
    pub root_given: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Prepare the proc: fetch its build and image, write env.sh, proc.sh, settings.yaml
    #[command(after_help = SETUP_EXAMPLES)]
    Setup(SetupArgs),
    /// Run the proc's command in its container, in the foreground, holding the lock
    #[command(after_help = RUN_EXAMPLES)]
    Run(RunArgs),
    /// Run the proc's uptests and print their results as one JSON array on stdout
    #[command(after_help = UPTEST_EXAMPLES)]
    Uptest(UptestArgs),
    /// Unmount and remove the proc's directory (cached builds and images stay)
    #[command(after_help = TEARDOWN_EXAMPLES)]
    Teardown(ProcFile),
    /// Open /bin/bash (or run CMD) in a container identical to the proc's
    #[command(after_help = SHELL_EXAMPLES)]
    Shell(ShellArgs),
    /// Inspect and maintain the download cache: ls, gc, verify
    #[command(after_help = CACHE_EXAMPLES)]
    Cache {
        #[command(subcommand)]
        command: crate::commands::cache::CacheCommand,
    },
    /// Deploy an embedded sample app end to end: setup, run, uptest, teardown (needs root, LXC)
    #[command(after_help = DEMO_EXAMPLES)]
    Demo(DemoArgs),
}

const SETUP_EXAMPLES: &str = "\
Fetches build_url and image_url at the same time into $VR_ROOT/cache (verified against
build_md5/image_md5), reusing what is cached; locks FILE; safe to run again.

Examples:
  vrun setup /home/dave/myproc.yaml
  vrun setup --timings proc.yaml > timings.json     # deploy-latency breakdown as JSON
  VR_ROOT=/tmp/vr vrun setup proc.yaml";

const RUN_EXAMPLES: &str = "\
Never daemonizes; exits with the app's status (128+n if a signal killed it). SIGTERM,
SIGINT or SIGHUP to vrun send SIGTERM to the app, then SIGKILL after the grace period
(default 7 s: inside supervisord's default stopwaitsecs of 10 s, cleanup included).

Examples:
  vrun run proc.yaml
  vrun run --grace 30 proc.yaml";

const UPTEST_EXAMPLES: &str = "\
Runs every executable in /app/uptests/<proc_name>/ as `SCRIPT HOST PORT` (host and port
from proc.yaml), each in its own container beside the proc. stdout carries only
[{\"Name\":…,\"Output\":…,\"Passed\":…}] and stderr stays empty unless uptests cannot run
(vr.server reads both merged); -v adds progress on stderr. No lock.

Examples:
  vrun uptest proc.yaml
  vrun uptest -v proc.yaml
  vrun uptest --jobs 2 --timeout 10 proc.yaml | python3 -m json.tool";

const TEARDOWN_EXAMPLES: &str = "\
Refuses while the proc or a shell/uptest container of it runs; never deletes through a
mount. Missing proc directory: nothing to do, exit 0.

Examples:
  vrun teardown proc.yaml";

const SHELL_EXAMPLES: &str = "\
Works while `vrun run` is live: same root filesystem, environment (/proc.sh) and user.
No lock.

Examples:
  vrun shell proc.yaml                       # interactive bash, or sh in images without bash
  vrun shell proc.yaml -- id -u
  vrun shell proc.yaml -- sh -c 'cat $APP_SETTINGS_YAML'";

const CACHE_EXAMPLES: &str = "\
Examples:
  vrun cache ls
  vrun cache gc --max-size 20G --dry-run
  vrun cache gc --older-than 14d
  vrun cache verify --deep";

const DEMO_EXAMPLES: &str = "\
Without --root the demo works in a fresh temp dir and removes it at the end.

Examples:
  sudo vrun demo
  sudo vrun demo --keep      # leave the app running; prints how to inspect and stop it";

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Leave the demo proc running and print the commands to inspect, stop and remove it
    #[arg(long)]
    pub keep: bool,
    /// Deploy without an image: the app runs on this host's /bin /usr /lib, read-only
    #[arg(long)]
    pub host_rootfs: bool,
}

/// The proc.yaml every command takes.
#[derive(Debug, Args)]
pub struct ProcFile {
    /// The proc.yaml file (any name)
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct SetupArgs {
    #[command(flatten)]
    pub proc: ProcFile,
    /// Print one JSON object of download/extract timings on stdout at the end
    #[arg(long)]
    pub timings: bool,
    /// Keep only the extracted build/image in the cache, not the downloaded archive: a
    /// third fewer bytes written (gzip), for slow disks. Another user's proc of the same
    /// build then downloads it again
    #[arg(long, env = "VRUN_NO_BLOB", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_blob: bool,
    /// How new layers are stored: `erofs` (one image file per layer, mounted read-only
    /// once per host), `dir` (an extracted tree), or `auto`: EROFS where this host can
    /// mount it, else directories (said once). Default: VRUN_LAYERS, else auto
    #[arg(long, value_name = "erofs|dir|auto")]
    pub layers: Option<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub proc: ProcFile,
    /// Seconds the app gets after SIGTERM before it is killed. Keep it at most
    /// supervisord's stopwaitsecs (default 10) minus 3, or supervisord SIGKILLs vrun
    /// before it has stopped the container and cleaned up
    #[arg(long, value_name = "SECS", env = "VRUN_GRACE", default_value_t = vrun::lxc::DEFAULT_GRACE.as_secs())]
    pub grace: u64,
}

#[derive(Debug, Args)]
pub struct UptestArgs {
    #[command(flatten)]
    pub proc: ProcFile,
    /// Uptests run at the same time
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub jobs: usize,
    /// Seconds each uptest may take
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub timeout: u64,
    /// Progress on stderr (off by default: Velociraptor reads stderr merged with the JSON)
    #[arg(short, long)]
    pub verbose: bool,
}

#[derive(Debug, Args)]
pub struct ShellArgs {
    #[command(flatten)]
    pub proc: ProcFile,
    /// Command to run instead of the shell (after `--`)
    #[arg(last = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

/// Parse argv; on failure, print help/version or one `ERROR:` line and return the exit code.
pub fn parse() -> Result<Cli, ExitCode> {
    parse_from(std::env::args_os()).map_err(report)
}

fn parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = Cli::command().try_get_matches_from(args)?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    // A global flag given after the subcommand is recorded in the subcommand's matches.
    cli.root_given = matches
        .subcommand()
        .map_or(&matches, |(_, sub)| sub)
        .value_source("root")
        .is_some_and(|source| source != ValueSource::DefaultValue);
    Ok(cli)
}

fn command_names() -> String {
    Cli::command()
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .map(|c| c.get_name().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn report(err: clap::Error) -> ExitCode {
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = err.print();
            return ExitCode::from(USAGE_EXIT);
        }
        ErrorKind::InvalidSubcommand => {
            let given = match err.get(ContextKind::InvalidSubcommand) {
                Some(ContextValue::String(s)) => s.clone(),
                _ => String::new(),
            };
            eprintln!(
                "ERROR: unknown command {given:?}; the commands are: {} (see vrun --help)",
                command_names()
            );
        }
        _ => {
            let rendered = err.render().to_string();
            let message: Vec<&str> = rendered
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:"))
                .filter(|l| !l.is_empty())
                .collect();
            let message = message.join(" ");
            let message = message.strip_prefix("error: ").unwrap_or(&message);
            eprintln!("ERROR: {message} (see vrun --help)");
        }
    }
    ExitCode::from(USAGE_EXIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
        assert_eq!(
            command_names(),
            "setup, run, uptest, teardown, shell, cache, demo"
        );
    }

    #[test]
    fn demo_knows_whether_a_root_was_given() {
        // Only meaningful when the test runner has no VR_ROOT of its own.
        if std::env::var_os("VR_ROOT").is_some() {
            return;
        }
        let given = |args: &[&str]| parse_from(args).unwrap().root_given;
        assert!(!given(&["vrun", "demo"]));
        assert!(given(&["vrun", "--root", "/tmp/x", "demo"]));
        assert!(given(&["vrun", "demo", "--root", "/tmp/x"]));
        assert!(given(&["vrun", "demo", "--root", "/apps"]));
    }
}
