//! vrun: a Velociraptor runner.
//!
//! The binary (`src/main.rs`) is a thin shell over these modules: the proc.yaml model
//! and the files it produces, the streaming fetch pipeline, the LXC hand-off, and
//! uptests. The content-addressed store lives in its own crate, `vrun-cache`.

pub mod config;
pub mod decode;
pub mod demo;
pub mod envfiles;
pub mod erofs;
pub mod errors;
pub mod extract;
pub mod fetch;
pub mod layers;
pub mod lock;
pub mod lxc;
pub mod mounts;
pub mod notice;
pub mod paths;
pub mod pipeline;
pub mod procfile;
pub mod references;
pub mod sample;
pub mod state;
pub mod tar;
pub mod units;
pub mod uptest;
pub mod writeback;
pub mod yaml;
