//! Child processes of a test: piped through, and never left behind.
//!
//! A test that panics unwinds past its clean-up code, so a child it started (a lock
//! holder, nginx, a re-run of the test binary) must be owned by a guard whose Drop kills
//! it. Tests that start a whole process group (`process_group(0)`: a shell and what it
//! runs, `flock` and its `sleep`) need the group killed and waited for, since a lock is
//! only released when the last process holding the fd is gone.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// Kills and reaps a child on drop: with its whole process group when it leads one
/// (started with `process_group(0)`), waiting until the group is gone; else the child.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let pgid = Pid::from_raw(self.0.id() as i32);
        if killpg(pgid, Signal::SIGKILL).is_err() {
            // Not a group leader: no group of that id exists.
            let _ = self.0.kill();
            let _ = self.0.wait();
            return;
        }
        let _ = self.0.wait();
        // The rest of the group (e.g. flock's `sleep`, which inherits the locked fd) dies
        // asynchronously: wait until the group is gone so its locks are really released.
        let deadline = Instant::now() + Duration::from_secs(10);
        while killpg(pgid, None).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// `input` through the command `argv` (stdin → stdout), which must succeed: the real
/// command-line compressors make the test archives. Fed from a thread, so a compressor
/// that writes before it has read everything cannot deadlock against us.
pub fn pipe_through(argv: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert!(out.status.success(), "{argv:?} failed");
    out.stdout
}
