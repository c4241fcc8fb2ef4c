#!/bin/sh
# Slurm prolog: asks kycd whether the job's user may run on this node.
#
# slurm.conf (see docs/operate.md, "Slurm"):
#   Prolog=/etc/slurm/prolog.d/kycd.sh   (runs as root on each allocated node, before the
#                                         job starts, with SLURM_JOB_ID and SLURM_JOB_UID set)
#
# The workload admitted is the job owner's Unix user (attestations for Slurm tenants bind
# {"kind": "unix_user", "id": "<uid>"}): a denied user's job does not start, and the denial
# with kycd's reasons is appended to the job's output file (written as the job's user, so a
# job cannot point root's write at another file), where Slurm adds "Error running slurm
# prolog". Caveats:
# - With proctrack/linuxproc (no job cgroups), the job's processes stay in slurmd's cgroup;
#   kycd attributes a process there that descends from slurmstepd to unix_user:<its uid>,
#   the workload admitted here. With job cgroups (slurmstepd.scope configured as a root) the
#   job's own cgroup is a separate workload, cgroup:/slurmstepd.scope/job_N, decided by the
#   policy's `unverified` rule unless an attestation binds it.
# - Slurm drains a node whose Prolog fails and requeues the job held, so one denied user can
#   drain nodes; operators see the denial in `scontrol show node` (Reason), in the job's
#   output and in kycd's audit log. Denying at submission (job_submit plugin) avoids this.
#
# Fail closed: an unreachable agent (exit 3) fails the prolog too.
set -u
# slurmd runs the prolog with SLURM_* variables only: no PATH.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
[ -r /etc/default/kycd-hook ] && . /etc/default/kycd-hook
# The package installs this script as a conffile, which stays after `dpkg -r kycd` (until
# purge) while kycctl goes: with the package removed and no KYCCTL override, do nothing
# rather than refuse every start. A KYCCTL that is set but missing still fails closed.
if [ -z "${KYCCTL:-}" ] && [ ! -e /usr/bin/kycctl ]; then
  echo "kycd hook: /usr/bin/kycctl not installed (kycd package removed?): not checking" >&2
  exit 0
fi
KYCCTL=${KYCCTL:-/usr/bin/kycctl}
KYCD_SOCKET=${KYCD_SOCKET:-/run/kycd/kycd.sock}
KYCD_ADMIT_TIMEOUT=${KYCD_ADMIT_TIMEOUT:-2s}

uid=${SLURM_JOB_UID:?SLURM_JOB_UID not set: run as a Slurm Prolog}
answer=$("$KYCCTL" admit --workload "unix_user:$uid" --socket "$KYCD_SOCKET" --timeout "$KYCD_ADMIT_TIMEOUT" 2>&1)
rc=$?
# slurmd logs the prolog's output.
[ -n "$answer" ] && printf '%s\n' "$answer" >&2
[ "$rc" -eq 0 ] && exit 0

# The job's output file: its stderr, else its stdout, else Slurm's default, with the
# patterns the prolog's environment can fill in; any other pattern: not written.
log=${SLURM_JOB_STDERR:-${SLURM_JOB_STDOUT:-slurm-%j.out}}
host=$(hostname -s 2>/dev/null || echo "${SLURMD_NODENAME:-?}")
log=$(printf '%s' "$log" | sed -e "s/%j/${SLURM_JOB_ID:-}/g" -e "s/%u/${SLURM_JOB_USER:-}/g" -e "s/%N/$host/g")
case $log in
  *%*) exit "$rc" ;;
  /*) ;;
  *) log="${SLURM_JOB_WORK_DIR:-/}/$log" ;;
esac
if [ -n "${SLURM_JOB_GID:-}" ] && command -v setpriv >/dev/null; then
  setpriv --reuid="$uid" --regid="$SLURM_JOB_GID" --clear-groups -- \
    sh -c 'printf "%s\n" "$1" >> "$2"' sh \
    "kycd: job ${SLURM_JOB_ID:-?} of ${SLURM_JOB_USER:-uid $uid} refused on $host (kycctl admit exit $rc):
$answer" "$log" 2>/dev/null || true
fi
exit "$rc"
