//! vrun-cache's integration tests: one test binary, one module per suite
//! (`cargo test -p vrun-cache --test it store::`).

mod store;
