#!/bin/sh
# Applies a cloud-config with cloud-init itself, then checks the result with kycd; run by
# agent/tests/cloud_init.rs inside `unshare --mount --uts --net --fork` (a private mount,
# hostname and network namespace: nothing here reaches the real host).
#
#   cloud_init_apply.sh WORK KYCD KYCCTL
#
# WORK holds user-data and meta-data (the NoCloud seed) and kycd.toml (the packaged
# configuration); results go to WORK/out. /etc and /var become overlays on a tmpfs (writes
# land in WORK/ns, the real /etc and /var are never written) and /run a fresh tmpfs, so
# cloud-init sees a machine on its first boot: a new instance, no earlier state.
set -eu
work=$1 kycd=$2 kycctl=$3
out=$work/out ns=$work/ns
mkdir -p "$out" "$ns"
mount -t tmpfs kycd-cloud-init-test "$ns"
for d in etc var; do
    mkdir -p "$ns/$d/upper" "$ns/$d/work"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$ns/$d/upper,workdir=$ns/$d/work" "/$d"
done
mount -t tmpfs tmpfs /run
# A first boot, whatever this machine ran before: no cloud-init state, no kycd.
rm -rf /var/lib/cloud /var/log/cloud-init.log /var/log/cloud-init-output.log /etc/kycd /var/lib/kycd
mkdir -p /var/lib/cloud/seed/nocloud
cp "$work/user-data" "$work/meta-data" /var/lib/cloud/seed/nocloud/
# The image's cloud-init configuration: the NoCloud seed only, no network configuration
# (this namespace has none), and of the modules only those that act on kycd's part of the
# cloud-config without a package repository: write_files (init stage) and runcmd (config
# stage: it writes the script that scripts_user runs at the end of boot). apt and packages
# need the repository; the package's part is installed below as it would be.
cat >/etc/cloud/cloud.cfg.d/99-kycd-test.cfg <<'EOF'
datasource_list: [NoCloud]
network: {config: disabled}
cloud_init_modules: [write_files]
cloud_config_modules: [runcmd]
cloud_final_modules: []
EOF
cloud-init init --local >"$out/cloud-init.out" 2>&1
cloud-init init >>"$out/cloud-init.out" 2>&1
cloud-init modules --mode config >>"$out/cloud-init.out" 2>&1
cp /var/log/cloud-init.log "$out/"
cp /run/cloud-init/instance-data.json /var/lib/cloud/instance/scripts/runcmd "$out/"
# Everything cloud-init wrote under /etc/kycd, as written (modes and owners kept).
if [ -d "$ns/etc/upper/kycd" ]; then
    cp -a "$ns/etc/upper/kycd" "$out/etc-kycd"
fi

# What installing the package adds (packaging/deb: a conffile and the state directory).
install -m 0644 "$work/kycd.toml" /etc/kycd/kycd.toml
install -d -m 0700 /var/lib/kycd

rc=0
"$kycd" check-config >"$out/effective.toml" 2>"$out/check-config.err" || rc=$?
echo "$rc" >"$out/check-config.rc"
[ "$rc" -eq 0 ] || exit 0

# The agent on exactly that configuration (audit mode: this test enforces nothing on the
# machine), until it has decided on the host workload.
"$kycd" run --mode audit >/dev/null 2>"$out/kycd.log" &
agent=$!
i=0
while [ $i -lt 300 ]; do
    if "$kycctl" workloads --json >"$out/workloads.json" 2>/dev/null &&
        grep -q '"host:host"' "$out/workloads.json" && grep -q '"verdict"' "$out/workloads.json"; then
        break
    fi
    i=$((i + 1))
    sleep 0.05
done
rc=0
"$kycctl" status --json >"$out/status.json" 2>"$out/status.err" || rc=$?
echo "$rc" >"$out/status.rc"
kill -TERM "$agent"
wait "$agent" || true
