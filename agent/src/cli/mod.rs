//! Command-line definitions (clap) of the `kycd` and `kycctl` binaries.
//!
//! They live in the library, not in `src/bin/`, so that `kycd-gen-docs` (packaging/gen-docs)
//! renders man pages and shell completions from the very definitions the binaries parse
//! with, without the binaries themselves depending on the generators.

pub mod kycctl;
pub mod kycd;
