//! Download progress bars on stderr — only when stderr is a terminal, so logs and CI
//! output stay clean and stdout (where `--timings` JSON goes) is never touched.
//!
//! The fetcher publishes byte counts in atomics ([`Progress`]); a ticker task copies
//! them into indicatif bars ten times a second, so the hot path never formats text.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use vrun::fetch::Progress;

/// How often the bars are redrawn from the byte counters.
const TICK: Duration = Duration::from_millis(100);

type Entries = Arc<Mutex<Vec<(ProgressBar, Arc<Progress>)>>>;

pub struct Bars {
    multi: Option<MultiProgress>,
    entries: Entries,
}

impl Bars {
    /// Bars when stderr is a terminal, else a no-op. Call inside the runtime.
    pub fn new() -> Self {
        if !std::io::stderr().is_terminal() {
            return Bars {
                multi: None,
                entries: Entries::default(),
            };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let entries = Entries::default();
        let ticker = entries.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(TICK);
            loop {
                interval.tick().await;
                for (bar, p) in ticker.lock().expect("bars lock").iter() {
                    if let Some(total) = p.total() {
                        bar.set_length(total);
                    }
                    bar.set_position(p.received());
                }
            }
        });
        Bars {
            multi: Some(multi),
            entries,
        }
    }

    /// A counter for one download, with its bar.
    pub fn add(&self, what: &str, url: &str) -> Option<Arc<Progress>> {
        let multi = self.multi.as_ref()?;
        let bar = multi.add(ProgressBar::new(0));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>6} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {wide_msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(what.to_string());
        bar.set_message(url.to_string());
        let progress = Arc::new(Progress::new());
        self.entries
            .lock()
            .expect("bars lock")
            .push((bar, progress.clone()));
        Some(progress)
    }

    /// Final redraw of a finished download's bar.
    pub fn finish(&self, progress: &Option<Arc<Progress>>) {
        let Some(progress) = progress else { return };
        for (bar, p) in self.entries.lock().expect("bars lock").iter() {
            if Arc::ptr_eq(p, progress) {
                bar.set_position(p.received());
                bar.finish();
            }
        }
    }
}
