#!/bin/sh
# Slurm prolog example: asks kycd whether the job's user may run on this node.
#
# slurm.conf:  Prolog=/etc/slurm/prolog.d/kycd.sh   (runs as root on each allocated node,
# before the job starts, with SLURM_JOB_ID and SLURM_JOB_UID set)
#
# The workload admitted is the job owner's Unix user (attestations for Slurm tenants bind
# {"kind": "unix_user", "id": "<uid>"}): a denied user's job does not start. Caveats:
# - Once running, the job's own cgroup (under slurmstepd.scope, when that root is
#   configured) is a separate workload, cgroup:/slurmstepd.scope/job_N, decided by the
#   policy's `unverified` rule unless an attestation binds it; kycd does not (yet) link a
#   job cgroup to its owner's uid.
# - Slurm drains a node whose Prolog fails and requeues the job, so one denied user can
#   drain nodes; operators see the denial in `scontrol show node` (Reason) and in kycd's
#   audit log. Denying at submission (job_submit plugin) avoids this.
#
# Fail closed: an unreachable agent (exit 3) fails the prolog too.
set -u
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
exec "$KYCCTL" admit --workload "unix_user:$uid" --socket "$KYCD_SOCKET" --timeout "$KYCD_ADMIT_TIMEOUT"
