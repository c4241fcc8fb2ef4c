//! Who is calling on the operator socket and what it may do: `SO_PEERCRED` for the uid,
//! the socket file's group for reads, the caller's supplementary groups from
//! `/proc/PID/status`, pinned by its start time from `/proc/PID/stat`.

use std::path::Path;

/// The caller, from `SO_PEERCRED`, and what it may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Peer {
    pub(super) uid: Option<u32>,
    pub(super) access: Access,
}

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Access {
    /// Nothing.
    None,
    /// Reads (member of the socket's group).
    Read,
    /// Everything (root).
    Admin,
}

impl Peer {
    /// Who is calling on `stream`, and what it may do.
    pub(super) fn of(stream: &tokio::net::UnixStream) -> Self {
        let cred = stream.peer_cred().ok();
        let uid = cred.map(|c| c.uid());
        let access = match cred {
            Some(c) if c.uid() == 0 => Access::Admin,
            Some(c) => {
                let group = stream.local_addr().ok().and_then(|a| a.as_pathname().map(socket_gid)).flatten();
                match (group, c.pid()) {
                    (Some(gid), Some(pid)) if member_of(pid, c.gid(), gid) => Access::Read,
                    _ => Access::None,
                }
            }
            None => Access::None,
        };
        Peer { uid, access }
    }
}

/// The group owning the socket file: its members may read.
fn socket_gid(path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).ok()?;
    // A root-only socket (mode 0600) grants no group reads, whatever its group.
    (meta.mode() & 0o060 != 0).then_some(meta.gid())
}

/// Whether process `pid` (primary group `gid`) is in group `group`, reading its
/// supplementary groups from /proc and pinning the process by its start time, so a PID
/// reused while we read is not taken for the caller.
///
/// Read from /proc directly rather than through `sysinfo`: its start time is in whole
/// seconds (a PID reused within the same second would pass), while `stat` gives clock ticks,
/// and it does not expose supplementary groups at all.
fn member_of(pid: i32, gid: u32, group: u32) -> bool {
    if gid == group {
        return true;
    }
    let start = || std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().as_deref().and_then(start_time);
    let Some(before) = start() else { return false };
    let groups = std::fs::read_to_string(format!("/proc/{pid}/status")).ok();
    let member = groups.as_deref().and_then(supplementary_groups).is_some_and(|g| g.contains(&group));
    member && start() == Some(before)
}

/// Field 22 of `/proc/PID/stat`: the start time, in clock ticks since boot. Field 2, the
/// command name, is in parentheses and may itself hold spaces and `)` (a process names
/// itself), so fields are counted after the *last* `)`: field 3 is the first one after it.
fn start_time(stat: &str) -> Option<u64> {
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// The `Groups:` line of `/proc/PID/status` (supplementary groups; empty when none).
fn supplementary_groups(status: &str) -> Option<Vec<u32>> {
    let line = status.lines().find_map(|l| l.strip_prefix("Groups:"))?;
    Some(line.split_whitespace().filter_map(|n| n.parse().ok()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `stat` line with fields 3.. numbered by their value (field N holds N), after `comm`.
    fn stat_with_comm(comm: &str) -> String {
        let rest: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
        format!("4242 ({comm}) {}\n", rest.join(" "))
    }

    #[test]
    fn start_time_is_field_22_whatever_the_command_name() {
        for comm in ["kycctl", "a b c", "x) 1 2 (y", ") )", "((", "evil) S 1 2 3 4 5"] {
            assert_eq!(start_time(&stat_with_comm(comm)), Some(22), "{comm:?}");
        }
        assert_eq!(start_time("4242 (short) S 1 2"), None, "truncated");
        assert_eq!(start_time("no parenthesis at all"), None);
    }

    #[test]
    fn start_time_of_this_process_is_stable() {
        let read = || start_time(&std::fs::read_to_string("/proc/self/stat").unwrap());
        assert!(read().is_some());
        assert_eq!(read(), read());
    }

    #[test]
    fn supplementary_groups_from_status() {
        let status = "Name:\tkycctl\nUid:\t1000\t1000\t1000\t1000\nGroups:\t4 24 998 \nNgid:\t0\n";
        assert_eq!(supplementary_groups(status), Some(vec![4, 24, 998]));
        assert_eq!(supplementary_groups("Groups:\n"), Some(vec![]));
        assert_eq!(supplementary_groups("Name:\tx\n"), None);
    }
}
