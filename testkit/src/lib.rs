//! vrun's test support, a `publish = false` workspace crate that is a dev-dependency of
//! the root package (its integration tests in `tests/it/` and its benches) and never of
//! the product. What lives here is what the tests need and `vrun` does not: code that
//! ships in `src/` is code an operator runs, so fault plans, gates and throttles stay out.
//!
//! - [`serve`]: the fault-injecting loopback HTTP/1.1 server every download test and the
//!   deploy bench run against. (`vrun demo` has its own plain file server,
//!   `vrun::demo::server`, which only serves.)

pub mod serve;
