//! Partitioning of `records`, which is PostgreSQL's alone
//! ([`crate::store::postgres::partitions`]): a SQLite database is one file for one
//! collector process, far below the fleet sizes monthly partitions are for, so it keeps one
//! `records` table and retention deletes its rows one by one ([`super::records`]). Step 12
//! exists here only so that version N means the same step on both backends.

/// Step 12: nothing on SQLite (on PostgreSQL, `records` becomes a table partitioned by month
/// of the window's end: [`crate::store::postgres::partitions::MIGRATION_PARTITIONS`]). A
/// comment is a valid, empty batch for `execute_batch`.
pub const MIGRATION_PARTITIONS: &str = "-- 12: records are partitioned by month on PostgreSQL only";
