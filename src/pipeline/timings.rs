//! `vrun setup --timings`: one artifact's line, and the one builder every path fills.
//!
//! A layer hit, an extraction from a cached blob and a download report different subsets
//! of the same fields; [`TimingsBuilder`] sets each subset in one place, so a new field
//! is added once and the three paths cannot drift apart.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::CacheUse;
use crate::decode;
use crate::extract::ExtractStats;

/// One artifact's line in `vrun setup --timings`.
#[derive(Debug, Clone, Serialize)]
pub struct ArtifactTimings {
    pub url: String,
    pub cache: CacheUse,
    /// How the layer is stored: `dir` or `erofs` (`vrun setup --layers`).
    pub layers: &'static str,
    /// Size of the tarball as downloaded (or as cached).
    pub compressed_bytes: u64,
    /// Bytes of file content in the extracted tree.
    pub bytes: u64,
    /// Regular files in the extracted tree, every path counted (a hard link is a file),
    /// as the layer's manifest counts them: a `"layer"` hit reports the same number.
    pub files: u64,
    /// Time to the first body byte; null when nothing was downloaded.
    pub ttfb_s: Option<f64>,
    /// From the start of this artifact to its published layer.
    pub wall_s: f64,
    /// Archive format detected from its magic bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<&'static str>,
    /// When the first extracted file was complete (streaming: long before the download ends).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_file_s: Option<f64>,
    /// Download (network + everything it waited on) finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub download_s: Option<f64>,
    /// Every entry written (to the page cache) and the stream drained, since the start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extracted_s: Option<f64>,
    /// After that, waiting for the background flush that was writing the tree to disk
    /// during the download to finish (long on a slow disk: the disk is the bottleneck).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flush_wait_s: Option<f64>,
    /// Making blob and layer durable and visible (fsync + rename).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish_s: Option<f64>,
    /// Device nodes and fifos an image carried that were skipped (LXC's autodev makes /dev).
    #[serde(skip_serializing_if = "is_zero")]
    pub skipped_devices: u64,
    /// Extended attributes the archive carried that were not set: all of them in a build
    /// (images set them, `security.capability` included).
    #[serde(skip_serializing_if = "is_zero")]
    pub dropped_xattrs: u64,
    /// POSIX ACLs the archive carried (`SCHILY.acl.*`, `system.posix_acl_*`), not set.
    #[serde(skip_serializing_if = "is_zero")]
    pub dropped_acls: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Fills an [`ArtifactTimings`]: what every path knows at the start, then what each
/// stage it went through adds; `wall_s` is taken when it is built.
pub(super) struct TimingsBuilder {
    started: Instant,
    t: ArtifactTimings,
}

impl TimingsBuilder {
    pub(super) fn new(url: &str, cache: CacheUse, compressed_bytes: u64, started: Instant) -> Self {
        TimingsBuilder {
            started,
            t: ArtifactTimings {
                url: url.to_owned(),
                cache,
                layers: "dir",
                compressed_bytes,
                bytes: 0,
                files: 0,
                ttfb_s: None,
                wall_s: 0.0,
                format: None,
                first_file_s: None,
                download_s: None,
                extracted_s: None,
                flush_wait_s: None,
                publish_s: None,
                skipped_devices: 0,
                dropped_xattrs: 0,
                dropped_acls: 0,
            },
        }
    }

    /// The layer's storage.
    pub(super) fn stored(mut self, storage: vrun_cache::LayerStorage) -> Self {
        self.t.layers = storage.as_str();
        self
    }

    /// Content of a tree extracted earlier (a layer hit: its manifest's counts).
    pub(super) fn content(mut self, bytes: u64, files: u64) -> Self {
        self.t.bytes = bytes;
        self.t.files = files;
        self
    }

    /// Extracted now: every entry written at `extracted`, the background flush done at
    /// `flushed`.
    pub(super) fn extracted(
        mut self,
        format: decode::Format,
        stats: &ExtractStats,
        extracted: Instant,
        flushed: Instant,
    ) -> Self {
        let since = |t: Instant| t.duration_since(self.started).as_secs_f64();
        self.t.bytes = stats.bytes;
        self.t.files = stats.files + stats.hardlinks;
        self.t.format = Some(format.name());
        self.t.first_file_s = stats.first_file_done.map(since);
        self.t.extracted_s = Some(since(extracted));
        self.t.flush_wait_s = Some(flushed.duration_since(extracted).as_secs_f64());
        self.t.skipped_devices = stats.skipped_devices;
        self.t.dropped_xattrs = stats.dropped_xattrs;
        self.t.dropped_acls = stats.dropped_acls;
        self
    }

    /// Downloaded now: first body byte after `ttfb`, body complete `download_s` after the
    /// start.
    pub(super) fn downloaded(mut self, ttfb: Duration, download_s: f64) -> Self {
        self.t.ttfb_s = Some(ttfb.as_secs_f64());
        self.t.download_s = Some(download_s);
        self
    }

    /// Published, having started to at `publish_started`.
    pub(super) fn published(mut self, publish_started: Instant) -> Self {
        self.t.publish_s = Some(publish_started.elapsed().as_secs_f64());
        self
    }

    pub(super) fn build(mut self) -> ArtifactTimings {
        self.t.wall_s = self.started.elapsed().as_secs_f64();
        self.t
    }
}
