//! A history `x` times the raw tail's length, built directly as roll-up rows (the aggregation
//! benchmark's 1-billion-window case; see its module doc): what the roll-ups would hold had
//! the windows before the tail been ingested, at the tail's rate, in daily runs.
//!
//! - `rollup_subjects`, `rollup_methods`, `rollup_hosts`: sums ×`x`, first seen moved back
//!   by the history's length;
//! - `rollup_days`, `rollup_day_methods`, `rollup_day_hosts`: one copy of the tail's first
//!   day per history day;
//! - `rollup_segments` (+ hosts): per tenant and history day one busy segment of 22 h (the
//!   tail segment's figures at its rate) and a 2 h pause, so each day is a run of its own,
//!   marked changed when it ended (long ago).

const DAY: i64 = 86_400;
const BUSY: i64 = DAY - 7_200;

/// The statements, for a dialect's placeholders already substituted.
fn statements(base: i64, tail_s: i64, x: i64) -> (Vec<String>, i64) {
    let history = (x - 1) * tail_s;
    let days = (history + DAY - 1) / DAY;
    let first_day = base.div_euclid(DAY);
    let rate = BUSY as f64 / tail_s as f64;
    let half = DAY / 2;
    let sums = |f: &str| {
        format!(
            "windows = windows * {x}, ops_lower = ops_lower * {x}, estimated_ops = estimated_ops * {x},
             ops_upper = ops_upper * {x}, gpu_seconds = gpu_seconds * {x},
             shared_gpu_seconds = shared_gpu_seconds * {x}, guest_gap_gpu_seconds = guest_gap_gpu_seconds * {x}{f}"
        )
    };
    let sql = vec![
        format!("UPDATE rollup_subjects SET {}", sums(&format!(", first_start = first_start - {history}"))),
        format!("UPDATE rollup_methods SET estimated_ops = estimated_ops * {x}"),
        format!(
            "UPDATE rollup_hosts SET shared_gpu_seconds = shared_gpu_seconds * {x},
             guest_gap_gpu_seconds = guest_gap_gpu_seconds * {x}"
        ),
        format!(
            "INSERT INTO rollup_days SELECT tenant, subject_host, subject_workload, day - k.n, windows, ops_lower,
                 estimated_ops, ops_upper, gpu_seconds, shared_gpu_seconds, guest_gap_gpu_seconds,
                 first_start - k.n * {DAY}, last_end - k.n * {DAY}, foreign_person
             FROM rollup_days, {{days}} WHERE day = {first_day}"
        ),
        format!(
            "INSERT INTO rollup_day_methods SELECT tenant, subject_host, subject_workload, day - k.n, method,
                 estimated_ops FROM rollup_day_methods, {{days}} WHERE day = {first_day}"
        ),
        format!(
            "INSERT INTO rollup_day_hosts SELECT tenant, day - k.n, host FROM rollup_day_hosts, {{days}}
             WHERE day = {first_day}"
        ),
        format!(
            r#"INSERT INTO rollup_segments SELECT tenant, {base} - k.n * {DAY}, {base} - k.n * {DAY} + {BUSY},
                 CAST(windows * {rate} AS BIGINT), ops_lower * {rate}, estimated_ops * {rate}, ops_upper * {rate},
                 gpu_seconds * {rate}, ops_by_method, peak_flops, {base} - k.n * {DAY} + {half},
                 {base} - k.n * {DAY} + {BUSY}
             FROM rollup_segments, {{days}} WHERE start >= {base}"#
        ),
        format!(
            "INSERT INTO rollup_segment_hosts SELECT tenant, {base} - k.n * {DAY}, host
             FROM rollup_segment_hosts, {{days}} WHERE start >= {base}"
        ),
    ];
    (sql, days)
}

/// Builds the history in the SQLite database `conn`.
pub fn sqlite(conn: &rusqlite::Connection, base: i64, tail_s: i64, x: i64) {
    let (sql, days) = statements(base, tail_s, x);
    conn.execute_batch("BEGIN").unwrap();
    for statement in sql {
        let statement = statement.replace(
            "{days}",
            &format!("(WITH RECURSIVE d(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM d WHERE n < {days}) SELECT n FROM d) k"),
        );
        conn.execute_batch(&statement).unwrap();
    }
    conn.execute_batch("COMMIT; ANALYZE").unwrap();
}

/// Builds the history in the PostgreSQL database of `client`.
pub fn postgres(client: &mut postgres::Client, base: i64, tail_s: i64, x: i64) {
    let (sql, days) = statements(base, tail_s, x);
    let mut tx = client.transaction().unwrap();
    for statement in sql {
        tx.batch_execute(&statement.replace("{days}", &format!("generate_series(1, {days}) AS k(n)")))
            .unwrap();
    }
    tx.commit().unwrap();
    client.batch_execute("VACUUM ANALYZE").unwrap();
}
