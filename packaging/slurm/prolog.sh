#!/bin/sh
# Slurm prolog example: asks kycd whether the job's user may run on this node.
#
# slurm.conf:  Prolog=/etc/slurm/prolog.d/kycd.sh   (runs as root on each allocated node,
# before the job starts, with SLURM_JOB_ID and SLURM_JOB_UID set)
#
# The workload is the job owner's Unix user (attestations for Slurm tenants bind
# {"kind": "unix_user", "id": "<uid>"}); kycd also sees the job's cgroup under
# slurmstepd.scope once it runs and enforces there. A non-zero exit stops the job. Note
# that Slurm drains a node whose Prolog fails and requeues the job: an operator then sees
# the denial in `scontrol show node` (Reason) and in kycd's audit log.
#
# Fail closed: an unreachable agent (exit 3) fails the prolog too.
set -u
[ -r /etc/default/kycd-hook ] && . /etc/default/kycd-hook
KYCCTL=${KYCCTL:-/usr/bin/kycctl}
KYCD_SOCKET=${KYCD_SOCKET:-/run/kycd/kycd.sock}
KYCD_ADMIT_TIMEOUT=${KYCD_ADMIT_TIMEOUT:-2s}

uid=${SLURM_JOB_UID:?SLURM_JOB_UID not set: run as a Slurm Prolog}
exec "$KYCCTL" admit --workload "unix_user:$uid" --socket "$KYCD_SOCKET" --timeout "$KYCD_ADMIT_TIMEOUT"
