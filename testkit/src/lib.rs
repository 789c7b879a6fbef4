//! vrun's test support, a `publish = false` workspace crate that is a dev-dependency of
//! the root package (its integration tests in `tests/it/` and its benches) and never of
//! the product. What lives here is what the tests need and `vrun` does not: code that
//! ships in `src/` is code an operator runs, so fault plans, gates and throttles stay out.
//!
//! - [`serve`]: the fault-injecting loopback HTTP/1.1 server every download test and the
//!   deploy bench run against. (`vrun demo` has its own plain file server,
//!   `src/demo/server.rs`, which only serves.)
//! - [`noise`]: deterministic incompressible bytes (xorshift64) from a seed.
//! - [`ChildGuard`], [`pipe_through`]: child processes that die with the test, and the
//!   real command-line compressors that make test archives.
//! - [`walk`], [`tree`]: the one directory walk of the suites, and a tree as a value two
//!   trees can be compared by.

mod noise;
mod process;
pub mod serve;
mod tree;

pub use noise::{noise, XorShift};
pub use process::{pipe_through, ChildGuard};
pub use tree::{kind_char, tree, walk, walk_except, Found};
