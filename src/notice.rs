//! Notes for the operator, and the one place that decides where they go: the command.
//!
//! Library code deep in the LXC hand-off and the uptest runner has things worth saying
//! that are not errors: a dead shell's leftovers were swept, the workload did not stop
//! within its grace and is being killed, the host has no swap accounting, an uptest
//! passed. It never prints them itself (ARCHITECTURE.md "Who may print"): it calls
//! [`emit`], and the text goes to the sink the command [`install`]ed, or nowhere when
//! none was installed (library callers such as tests and benches stay silent).
//! Errors are never notices: they are returned and printed once by `main`.
//!
//! Why a process-wide sink rather than a callback like `fetch::Notify`: the notes come
//! from the bottom of call chains (the kill loop of a foreground run, the leftover sweep
//! every temporary container and teardown start with, rendering proc.lxc) that many
//! commands reach through `LxcProc`; a parameter would be threaded through each of those
//! signatures only to reach a handful of lines, and the choice it carries is the
//! command's, for everything the process runs. The command sets it once: every command
//! sends notes to stderr, except `vrun uptest` without `-v` — vr.server runs it through
//! a sudo that merges stderr into stdout, and any text before the JSON array becomes an
//! extra failed result (`remote.py`). The HTTP client keeps its own `fetch::Notify`
//! (it is a reusable client configured per instance); `setup` points it at [`emit`] so
//! every note takes the same road.
//!
//! Texts are given without the `vrun: ` prefix; the sink adds what its output needs.

use std::sync::RwLock;

/// Where notes go: one call per note, the text without a trailing newline.
pub type Sink = Box<dyn Fn(&str) + Send + Sync>;

static SINK: RwLock<Option<Sink>> = RwLock::new(None);

/// Send every later [`emit`] of this process to `sink` (replacing an earlier one).
pub fn install(sink: Sink) {
    *SINK.write().unwrap_or_else(|e| e.into_inner()) = Some(sink);
}

/// Drop every later note (the state before any [`install`]).
pub fn uninstall() {
    *SINK.write().unwrap_or_else(|e| e.into_inner()) = None;
}

/// Hand `text` to the installed sink; without one it is dropped.
pub fn emit(text: &str) {
    if let Some(sink) = SINK.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        sink(text);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn notes_reach_the_installed_sink_only() {
        emit("before any sink: dropped");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let into = seen.clone();
        install(Box::new(move |t| into.lock().unwrap().push(t.to_string())));
        emit("swept a leftover");
        uninstall();
        emit("after uninstall: dropped");
        // Other tests of this binary may emit meanwhile: look for ours only.
        let seen = seen.lock().unwrap();
        assert!(seen.iter().any(|t| t == "swept a leftover"), "{seen:?}");
        assert!(!seen.iter().any(|t| t.ends_with(": dropped")), "{seen:?}");
    }
}
