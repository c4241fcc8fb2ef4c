#!/usr/bin/env bash
# GPU sampling cost: the agent's sampling pipeline on 8 fake GPUs at 1 Hz for 60 s, measured
# side by side with prometheus-node-exporter (scraped at the same 1 Hz) over the same 60 s.
#
#   bench/gpu_sampling.sh [SECONDS]
#
# "Agent" = target/release/examples/gpu_sampler: NvmlBackend (nvml-wrapper, dedicated thread)
# loading the fake libnvidia-ml.so (tests/fake-nvml) → GpuSampler thread (per-GPU utilization,
# memory, clocks, power, processes, per-process samples, every GPM pipe, MIG; /proc
# attribution; clock-scaled lower/point/upper estimate; 60 s windows) → bounded window channel. Figures from /proc: VmHWM/VmRSS from
# status, CPU from the sum of every thread's schedstat run time (ns), taken after a 2 s
# warm-up and again SECONDS later.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
node_exporter=${NODE_EXPORTER:-/usr/bin/prometheus-node-exporter}
port=${NODE_EXPORTER_PORT:-19177}
# Where cargo builds (CARGO_TARGET_DIR, as cargo itself honours it).
target=${CARGO_TARGET_DIR:-target}

cargo build --release --quiet -p kycd --example gpu_sampler
cargo build --release --quiet -p kycd-fake-nvml

work=$(mktemp -d)
agent_pid=""; ne_pid=""; sleepers=()
cleanup() {
  [[ -n $agent_pid ]] && kill "$agent_pid" 2>/dev/null || true
  [[ -n $ne_pid ]] && kill "$ne_pid" 2>/dev/null || true
  for p in "${sleepers[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

cp "$target/release/libkycd_fake_nvml.so" "$work/libnvidia-ml.so.1"
# 8 H100s, GPM and per-process samples on, activity varying by tick. Each GPU runs one real
# process (a `sleep`, like one rank of a data-parallel job), so /proc attribution does real
# reads; GPU 7 also lists init (a second, host-level process).
sleepers=()
for i in 0 1 2 3 4 5 6 7; do sleep $((secs + 30)) & sleepers+=($!); done
python3 - "$work/scenario.json" "${sleepers[@]}" <<'PY'
import json, sys
path, pids = sys.argv[1], [int(p) for p in sys.argv[2:]]
gpus = []
for i, pid in enumerate(pids):
    procs = [{"pid": pid, "used_mib": 20000, "sm_util": 60}] + ([{"pid": 1, "used_mib": 500, "sm_util": 5}] if i == 7 else [])
    # Every GPM pipe the agent reads (11 metrics per GPU per tick), clock and power varying.
    gpm = lambda k: {"SM_UTIL": 90.0 - k, "SM_OCCUPANCY": 14.0, "ANY_TENSOR_UTIL": 50.0 + k,
                     "HMMA_TENSOR_UTIL": 50.0 + k, "IMMA_TENSOR_UTIL": 0.0, "DFMA_TENSOR_UTIL": 0.0,
                     "FP64_UTIL": 0.0, "FP32_UTIL": 5.0, "FP16_UTIL": 0.0, "INTEGER_UTIL": 1.5,
                     "DRAM_BW_UTIL": 17.0 + k}
    ticks = [{"util": 90 - k, "mem_util": 40, "tensor": 50.0 + k, "sm_clock_mhz": 1460 + 10 * k,
              "power_mw": 690000 - 1000 * k, "gpm": gpm(k), "processes": procs} for k in range(10)]
    gpus.append({"name": "NVIDIA H100 80GB HBM3", "uuid": f"GPU-bench-{i}", "ticks": ticks})
json.dump({"gpus": gpus}, open(path, "w"))
PY

cpu_ns() { # total run time of all live threads of $1, ns
  local t sum=0
  for t in /proc/"$1"/task/*/schedstat; do read -r run _ < "$t" && sum=$((sum + run)); done
  echo "$sum"
}
kib() { awk -v k="$2:" '$1 == k { print $2 }' /proc/"$1"/status; }

"$node_exporter" --web.listen-address="127.0.0.1:$port" > "$work/node_exporter.log" 2>&1 &
ne_pid=$!
"$target/release/examples/gpu_sampler" --nvml-library "$work/libnvidia-ml.so.1" --seconds $((secs + 5)) \
  > "$work/windows.jsonl" 2> "$work/agent.log" &
agent_pid=$!
sleep 2
curl -sf "http://127.0.0.1:$port/metrics" > /dev/null || { echo "node_exporter not answering" >&2; exit 1; }

a0=$(cpu_ns "$agent_pid"); n0=$(cpu_ns "$ne_pid"); t0=$(date +%s%N)
for ((i = 0; i < secs; i++)); do
  sleep 1
  curl -sf "http://127.0.0.1:$port/metrics" > /dev/null
done
a1=$(cpu_ns "$agent_pid"); n1=$(cpu_ns "$ne_pid"); t1=$(date +%s%N)

wall=$(( (t1 - t0) / 1000000 ))
printf '\n%-28s %10s %10s %14s %12s\n' process VmHWM_KiB VmRSS_KiB cpu_ms_in_run cpu_%_core
for p in "agent:$agent_pid:$a0:$a1" "node_exporter:$ne_pid:$n0:$n1"; do
  IFS=: read -r name pid c0 c1 <<< "$p"
  ms=$(( (c1 - c0) / 1000000 ))
  printf '%-28s %10s %10s %14s %12s\n' "$name" "$(kib "$pid" VmHWM)" "$(kib "$pid" VmRSS)" "$ms" \
    "$(awk -v c="$((c1 - c0))" -v w="$wall" 'BEGIN { printf "%.4f", c / (w * 1e6) * 100 }')"
done
ahwm=$(kib "$agent_pid" VmHWM); nhwm=$(kib "$ne_pid" VmHWM)
printf '\nwall %d ms; agent/node_exporter VmHWM ratio %.3f (target <= 0.5); agent CPU target <= 0.1%% of one core\n' \
  "$wall" "$(awk -v a="$ahwm" -v n="$nhwm" 'BEGIN { print a / n }')"
printf 'node_exporter %s\n' "$("$node_exporter" --version 2>&1 | head -1)"
printf 'agent windows emitted during the run: %s (60 s windows; GPUs listed per tick: 8, GPU processes: 9)\n' \
  "$(wc -l < "$work/windows.jsonl")"
