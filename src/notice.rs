//! Notes for the operator on stderr, and the one switch that silences them.
//!
//! vr.server runs `vrun uptest` through a sudo that merges stderr into stdout and turns
//! any text before the JSON array into an extra failed result (`remote.py`), so during an
//! uptest nothing but an error may reach stderr. Library code deep in the LXC hand-off
//! (sweeping a dead shell's leftovers, a host without swap accounting) has notes worth
//! printing elsewhere; they go through [`notice!`], which `uptest` turns off unless `-v`
//! is given. Errors are never notices: they are returned and printed once by `main`.
//! A process-wide flag rather than a parameter threaded through every call, because the
//! choice belongs to the command and applies to everything it runs.

use std::sync::atomic::{AtomicBool, Ordering};

static QUIET: AtomicBool = AtomicBool::new(false);

/// Silence (or restore) [`notice!`] output for the rest of the process.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether notices are silenced.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// `eprintln!` unless [`set_quiet`]`(true)` was called.
#[macro_export]
macro_rules! notice {
    ($($arg:tt)*) => {
        if !$crate::notice::quiet() {
            eprintln!($($arg)*);
        }
    };
}
