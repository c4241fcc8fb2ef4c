//! The kycd host agent and the `kycctl` operator CLI.
//!
//! Modules own one concern each; the binaries in `src/bin/` only parse arguments and call in.

pub mod tokens;
