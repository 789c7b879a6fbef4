//! The error-message convention, and the one function that shows an error whole.
//!
//! vrun follows uv: an error type's `Display` says what failed at its own level (the
//! path, URL, key, expected and actual values) and never embeds its cause; the cause is
//! exposed through `source()` (`#[source]`, a field named `source`, or `#[from]`), and
//! whoever shows the error to a person joins the chain with `": "`. An error without a
//! source (a String reason, an `fs-err` io error, which puts its own cause in its
//! message and exposes none) keeps the detail in its message; `#[error(transparent)]`
//! forwards both message and source and so adds no link of its own.
//!
//! The rule matters because of who reads the chain: with causes in both places the
//! printer saw every cause twice and had to guess which to drop by substring, and a
//! Display shown alone (`to_string()`, `{e}`) could not tell whether it was complete.
//! Now the Display is never complete when there is a source, so every place that turns
//! an error into text for the operator (the `ERROR:` line, a warning, an uptest result)
//! goes through [`chain`] — the binary's `commands::one_line` is the same join.

use std::error::Error;

/// `err` and every cause under it, joined with `": "` (outermost first).
pub fn chain(err: &(dyn Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read {path}")]
    struct Outer {
        path: &'static str,
        source: std::io::Error,
    }

    #[test]
    fn joins_every_cause_once() {
        let e = Outer {
            path: "/x",
            source: std::io::Error::other("disk on fire"),
        };
        assert_eq!(e.to_string(), "cannot read /x");
        assert_eq!(chain(&e), "cannot read /x: disk on fire");
    }
}
