//! The kycd host agent and the `kycctl` operator CLI.
//!
//! Modules own one concern each; the binaries in `src/bin/` only parse arguments and call in.

pub mod audit;
pub mod cli;
pub mod config;
pub mod core;
pub mod daemon;
pub mod decision;
pub mod discovery;
pub mod enforce;
pub mod fsutil;
pub mod gpu;
pub mod host;
pub mod net;
pub mod notify;
pub mod policy;
pub mod reconcile;
pub mod reporting;
pub mod tokens;
