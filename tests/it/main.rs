//! vrun's integration tests: one test binary, one module per suite (the ripgrep and uv
//! shape). One binary links tokio, reqwest, rustls and the decoders once instead of once
//! per suite; `cargo test --test it MODULE::` runs one suite, e.g. `cargo test --test it
//! lxc::`.
//!
//! The tests of one binary run in parallel threads of one process, so what used to be
//! kept apart by separate binaries is kept apart here: the LXC suites take
//! [`common::lxc_suite`] (tests of one LXC suite run together as before, two LXC suites
//! never do), and a test that needs the process to itself (the heap count of
//! `decode_bzip2::a_bomb_is_not_buffered`, the proxy variables of `fetch`) re-runs itself
//! in a child process of this binary.

mod common;

mod adversarial;
mod autogc;
mod cache_cmds;
mod compat;
mod crash;
mod decode_bzip2;
mod demo;
mod durability;
mod erofs;
mod extract;
mod fetch;
mod fleet;
mod foundation;
mod lxc;
mod lxc_adversarial;
mod network;
mod proptests;
mod setup_fetch;
mod tar_fidelity;
mod tar_listing;
mod uptest;
mod velociraptor;
