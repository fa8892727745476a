//! The internals of `shardlease-worker`, a library so that its benchmarks and tests can call
//! them directly. Not a stable API: embed the `shardlease` crate instead.

pub mod cli;
pub mod db;
pub mod demo;
pub mod first_run;
pub mod http;
pub mod items;
pub mod printer;
pub mod status;
pub mod worker;
