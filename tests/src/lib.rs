//! Shared helpers for kycd end-to-end tests.
