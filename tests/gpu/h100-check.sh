#!/usr/bin/env bash
# GPU-machine check of berth's GPU support, for a machine with a real NVIDIA GPU and root:
# the NVML inventory, GPU claims, the device cgroup (v1 `devices` or the v2 eBPF filter) and
# telemetry, end to end through a real berthd. Prints every step with PASS / FAIL / SKIP and a
# summary; exits non-zero when a step failed. Finishes within about 4 minutes (a build excepted).
#
# Binaries (berthd, berth-shim, berth-gpu-check): $BERTH_BIN_DIR, else target/release of this
# repository, else built there with cargo when cargo exists:
#   cargo build --release -p berth-host -p berth-scheduler -p berth-tests --bins
# Env: BERTH_BIN_DIR, GPUS (default nvml; fake:2 makes a dry run on a machine without GPUs),
#      LOAD_SECONDS (default 25), KEEP=1 keeps the work dir (logs) after the run.
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$ROOT/tests/gpu"
GPUS=${GPUS:-nvml}
LOAD_SECONDS=${LOAD_SECONDS:-25}
PASS=0 FAIL=0 SKIP=0
START=$(date +%s)

say() { printf '%s\n' "$*"; }
step() { printf '\n== %s\n' "$*"; }
pass() { PASS=$((PASS + 1)); say "PASS: $*"; }
fail() { FAIL=$((FAIL + 1)); say "FAIL: $*"; }
skip() { SKIP=$((SKIP + 1)); say "SKIP: $*"; }
field() { # field KEY < lines: value of the first KEY=value
  sed -n "s/.*\\b$1=\\([^ ]*\\).*/\\1/p" | head -1
}

# --- binaries ---------------------------------------------------------------------------
BIN=${BERTH_BIN_DIR:-$ROOT/target/release}
have_bins() { [ -x "$1/berthd" ] && [ -x "$1/berth-shim" ] && [ -x "$1/berth-gpu-check" ]; }
if ! have_bins "$BIN"; then
  if [ -z "${BERTH_BIN_DIR:-}" ] && command -v cargo >/dev/null 2>&1; then
    say "building release binaries (cargo)..."
    (cd "$ROOT" && timeout 1200 cargo build --release -p berth-host -p berth-scheduler -p berth-tests --bins) || {
      say "FAIL: cargo build"; exit 2; }
  fi
fi
have_bins "$BIN" || { say "FAIL: berthd, berth-shim, berth-gpu-check not found in $BIN"; exit 2; }
CHK="$BIN/berth-gpu-check"

WORK=$(mktemp -d /tmp/berth-gpu-check.XXXXXX)
chmod 755 "$WORK"
NAME="gpucheck$$"
SOCK="$WORK/berthd.sock"
ADDR="unix:$SOCK"
DPID=""
cp "$HERE/cuda_probe.py" "$WORK/cuda_probe.py"
chk() { timeout 60 "$CHK" --addr "$ADDR" "$@"; }

cleanup() {
  if [ -n "$DPID" ] && kill -0 "$DPID" 2>/dev/null; then
    timeout 30 "$CHK" --addr "$ADDR" stop --all >/dev/null 2>&1
    kill -TERM "$DPID" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$DPID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$DPID" 2>/dev/null
  fi
  # Whatever is left in this daemon's cgroups (nothing, normally) goes.
  for d in $(find /sys/fs/cgroup -type d -name "berth-$NAME" 2>/dev/null); do
    for p in $(cat $(find "$d" -name cgroup.procs) 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
    sleep 0.2
    find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  if [ "${KEEP:-0}" = 1 ]; then say "work dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the machine ------------------------------------------------------------------------
step "machine"
say "kernel: $(uname -r)  user: $(id -u)  gpus setting: $GPUS"
fstype=$(stat -fc %T /sys/fs/cgroup 2>/dev/null)
case "$fstype" in
  cgroup2fs) say "cgroup: v2 (unified) - enforcement by the eBPF device filter" ;;
  tmpfs) say "cgroup: v1 or hybrid - enforcement by the v1 devices controller" ;;
  *) say "cgroup: unknown ($fstype)" ;;
esac
grep -E ' cgroup2? ' /proc/self/mountinfo | awk '{print "  mount:", $5, $(NF-2), $NF}' | head -20
say "own cgroup: $(tr '\n' ' ' < /proc/self/cgroup)"
[ "$(id -u)" = 0 ] || say "WARNING: not root; berthd needs root for cgroups"
NVSMI=$(command -v nvidia-smi || true)
if [ -n "$NVSMI" ]; then
  timeout 20 "$NVSMI" -L 2>&1 | sed 's/^/  nvidia-smi: /'
  timeout 20 "$NVSMI" --query-gpu=index,uuid,driver_version,memory.used,utilization.gpu --format=csv,noheader 2>&1 | sed 's/^/  nvidia-smi: /'
else
  say "nvidia-smi: not found"
fi
ls -l /dev/nvidia* 2>/dev/null | sed 's/^/  /'
PY=""
# python3 on PATH first (on the GPU image it is the one with PyTorch), unless it is a shim.
for p in "$(command -v python3 2>/dev/null)" /usr/bin/python3 /usr/local/bin/python3; do
  case "$p" in */shims/*) continue ;; esac
  [ -n "$p" ] && [ -x "$p" ] && { PY=$p; break; }
done
say "python3: ${PY:-none}   libcuda: $(ldconfig -p 2>/dev/null | grep -m1 -o '/[^ ]*libcuda.so.1' || echo 'not in ld cache')"
WENV=(--env "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}")

step "NVML straight from berth's backend (no daemon)"
if [ "$GPUS" = nvml ]; then
  out=$(timeout 60 "$CHK" nvml 2>&1); rc=$?
  say "$out" | sed 's/^/  /'
  if [ $rc = 0 ] && [ "$(say "$out" | field gpus)" -ge 1 ] 2>/dev/null; then
    pass "NVML loads and lists $(say "$out" | field gpus) GPU(s)"
  else
    fail "NVML backend (rc=$rc)"
  fi
else
  skip "GPUS=$GPUS (dry run)"
fi

# --- the daemon -------------------------------------------------------------------------
step "start berthd --gpus $GPUS"
MPORT=$((20000 + RANDOM % 20000))
cat > "$WORK/berthd.toml" <<EOF
name = "$NAME"
state_dir = "$WORK/state"
listen = ["$ADDR"]
metrics_listen = "127.0.0.1:$MPORT"
gpu_telemetry_seconds = 1.0
EOF
BERTH_LOG=info,berth_host=debug,berth_server=debug,berth_scheduler=debug,berth_sys=debug "$BIN/berthd" --config "$WORK/berthd.toml" --gpus "$GPUS" \
  >"$WORK/berthd.log" 2>&1 &
DPID=$!
ready=0
for _ in $(seq 1 100); do
  kill -0 "$DPID" 2>/dev/null || break
  if timeout 5 "$CHK" --addr "$ADDR" info >/dev/null 2>&1; then ready=1; break; fi
  sleep 0.2
done
grep -E 'GPUs:|cgroups ready|NVML|error|ERROR' "$WORK/berthd.log" | sed 's/\x1b\[[0-9;]*m//g; s/^/  log: /' | head -20
if [ $ready = 1 ]; then
  pass "berthd answers on $ADDR (pid $DPID)"
else
  fail "berthd did not start; log:"
  sed 's/\x1b\[[0-9;]*m//g; s/^/  /' "$WORK/berthd.log" | tail -30
  DPID=""
  say ""; say "SUMMARY: $PASS passed, $FAIL failed, $SKIP skipped ($(( $(date +%s) - START )) s)"
  exit 1
fi

step "inventory (HostInfo)"
INFO=$(chk info); say "$INFO" | sed 's/^/  /'
NGPU=$(say "$INFO" | head -1 | field gpus)
BACKEND=$(say "$INFO" | head -1 | field backend)
if [ "${NGPU:-0}" -ge 1 ] 2>/dev/null; then
  pass "backend=$BACKEND with $NGPU GPU(s), cgroup v$(say "$INFO" | head -1 | field cgroup_version)"
else
  fail "no GPU in HostInfo (backend=$BACKEND)"
  NGPU=0
fi
if [ -n "$NVSMI" ] && [ "$GPUS" = nvml ]; then
  smi_n=$(timeout 20 "$NVSMI" -L 2>/dev/null | grep -c '^GPU ')
  [ "$smi_n" = "$NGPU" ] && pass "nvidia-smi agrees: $smi_n GPU(s)" || fail "nvidia-smi lists $smi_n GPU(s), berth $NGPU"
fi
minor_of() { say "$INFO" | grep "uuid=$1 " | field minor; }

# --- a worker with one GPU, a worker with none ------------------------------------------
probe_worker() { # probe_worker GPUS -> prints the worker's output; sets PROBE_ID, PROBE_GPUS
  local out
  out=$(chk launch --gpus "$1" --cpu 1 --memory 2 "${WENV[@]}" -- "$PY" "$WORK/cuda_probe.py" probe)
  PROBE_ID=$(say "$out" | field launched)
  PROBE_GPUS=$(say "$out" | field gpus)
  if [ -z "$PROBE_ID" ]; then say "  launch: $out"; return 1; fi
  chk wait "$PROBE_ID" 90 | sed 's/^/  /'
  chk logs "$PROBE_ID" | sed 's/^stdout| //; s/^/  /'
}

if [ -z "$PY" ]; then
  skip "worker probes: no python3 on this machine"
elif [ "$NGPU" -lt 1 ]; then
  skip "worker probes: no GPU"
else
  step "worker with nvidia_gpu=1 sees its GPU"
  OUT=$(probe_worker 1); say "$OUT"
  UUID1=$(say "$OUT" | sed -n 's/^  env_CUDA_VISIBLE_DEVICES=//p')
  GPUS1=$(say "$OUT" | grep -m1 '^  worker=' | field gpus)
  [ -n "$UUID1" ] && [ "$UUID1" = "$GPUS1" ] && pass "CUDA_VISIBLE_DEVICES=$UUID1 is the claimed GPU" \
    || fail "CUDA_VISIBLE_DEVICES='$UUID1', claim '$GPUS1'"
  say "$OUT" | grep -q '^  env_CUDA_DEVICE_ORDER=PCI_BUS_ID' && pass "CUDA_DEVICE_ORDER=PCI_BUS_ID" \
    || fail "CUDA_DEVICE_ORDER"
  own=$(minor_of "$GPUS1")
  if ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
    say "$OUT" | grep -q "^  open /dev/nvidia$own OK" && pass "opens its own /dev/nvidia$own" \
      || fail "cannot open its own /dev/nvidia$own"
    others=$(say "$OUT" | grep '^  open /dev/nvidia[0-9]' | grep -v "/dev/nvidia$own " | grep -vc ' EPERM$')
    [ "$others" = 0 ] && pass "every other /dev/nvidiaN is EPERM" || fail "$others other GPU node(s) not denied"
  else
    skip "no /dev/nvidia* nodes on this machine"
  fi
  if say "$OUT" | grep -q 'cuda=unavailable'; then
    skip "CUDA check: libcuda.so.1 not loadable"
  else
    cu=$(say "$OUT" | field cuda_devices)
    cu_uuid=$(say "$OUT" | grep -m1 'cuda_device=0' | field uuid)
    [ "$cu" = 1 ] && [ "$cu_uuid" = "$GPUS1" ] && pass "CUDA sees exactly its GPU ($cu_uuid)" \
      || fail "CUDA sees $cu device(s), first $cu_uuid, claim $GPUS1"
  fi
  if [ -n "$NVSMI" ]; then
    o=$(chk launch --gpus 1 --cpu 1 --memory 1 "${WENV[@]}" -- "$NVSMI" -L); id=$(say "$o" | field launched)
    chk wait "$id" 60 >/dev/null
    smi=$(chk logs "$id"); say "$smi" | sed 's/^/  /'
    say "$smi" | grep -q "$GPUS1\|UUID: GPU-" && pass "nvidia-smi -L inside a 1-GPU worker lists a GPU" \
      || fail "nvidia-smi -L inside a 1-GPU worker"
  fi

  step "worker with no GPU sees none"
  OUT=$(probe_worker 0); say "$OUT"
  say "$OUT" | grep -q '^  env_CUDA_VISIBLE_DEVICES=$' && say "$OUT" | grep -q '^  env_NVIDIA_VISIBLE_DEVICES=void' \
    && pass "CUDA_VISIBLE_DEVICES='' NVIDIA_VISIBLE_DEVICES=void" || fail "environment of a worker without GPU"
  if [ -e /dev/nvidia0 ]; then
    say "$OUT" | grep -q '^  open /dev/nvidia0 EPERM' && pass "opening /dev/nvidia0 fails with EPERM" \
      || fail "/dev/nvidia0 not denied: $(say "$OUT" | grep 'open /dev/nvidia0 ')"
    say "$OUT" | grep -q '^  open /dev/nvidiactl OK' && pass "/dev/nvidiactl stays open" \
      || fail "/dev/nvidiactl: $(say "$OUT" | grep 'open /dev/nvidiactl')"
  else
    skip "no /dev/nvidia0 on this machine"
  fi
  if ! say "$OUT" | grep -q 'cuda=unavailable'; then
    cu=$(say "$OUT" | field cuda_devices)
    [ "${cu:-0}" = 0 ] && pass "CUDA sees no device" || fail "CUDA sees $cu device(s)"
  fi
  if [ -n "$NVSMI" ]; then
    o=$(chk launch --gpus 0 --cpu 1 --memory 1 "${WENV[@]}" -- "$NVSMI" -L); id=$(say "$o" | field launched)
    chk wait "$id" 60 >/dev/null
    smi=$(chk logs "$id"); say "$smi" | sed 's/^/  /'
    say "$smi" | grep -q 'UUID: GPU-' && fail "nvidia-smi -L inside a GPU-less worker lists a GPU" \
      || pass "nvidia-smi -L inside a GPU-less worker lists none"
  fi
fi

# --- exclusivity and telemetry under load -----------------------------------------------
if [ "$NGPU" -ge 1 ]; then
  step "telemetry before the load"
  BEFORE=$(chk info); say "$BEFORE" | sed 's/^/  /'
  if [ -n "$PY" ] && ! say "${OUT:-}" | grep -q 'cuda=unavailable'; then
    LOADCMD=("$PY" "$WORK/cuda_probe.py" load "$LOAD_SECONDS")
  else
    LOADCMD=(/bin/sleep "$LOAD_SECONDS")
    say "(no CUDA: the holder only sleeps; utilization will not move)"
  fi
  o=$(chk launch --gpus 1 --cpu 1 --memory 4 "${WENV[@]}" -- "${LOADCMD[@]}"); say "$o" | sed 's/^/  /'
  LID=$(say "$o" | field launched); LGPU=$(say "$o" | field gpus)
  chk running "$LID" | sed 's/^/  /'

  step "exclusive claims"
  o=$(chk launch --gpus "$NGPU" --cpu 0.1 --memory 0.5 -- /bin/true); rc=$?
  say "$o" | sed 's/^/  /'
  [ $rc = 3 ] && say "$o" | grep -q 'gpus: ' && pass "a launch of $NGPU GPU(s) while one is held: RESOURCE_EXHAUSTED" \
    || fail "second launch was not refused (rc=$rc)"
  n_alloc=$(chk info | head -1 | field allocated)
  [ "$n_alloc" = 1 ] && pass "the refused launch changed nothing (allocated=1)" || fail "allocated=$n_alloc"

  step "telemetry under load (${LOAD_SECONDS}s)"
  max_util=0 max_mem=0 wmem=0
  base_mem=$(say "$BEFORE" | grep "uuid=$LGPU " | field memory_used)
  for i in $(seq 1 $((LOAD_SECONDS - 5))); do
    sleep 1
    line=$(chk info | grep "uuid=$LGPU ")
    u=$(say "$line" | field utilization); m=$(say "$line" | field memory_used)
    w=$(chk worker "$LID" | field gpu_memory_used)
    [ "${u:-0}" -gt "$max_util" ] && max_util=$u
    [ "${m:-0}" -gt "$max_mem" ] && max_mem=$m
    [ "${w:-0}" -gt "$wmem" ] && wmem=$w
    [ $((i % 5)) = 0 ] && say "  t=${i}s utilization=${u}% memory_used=$m worker_gpu_memory=$w holder=$(say "$line" | field holder)"
  done
  say "  before: memory_used=$base_mem utilization=$(say "$BEFORE" | grep "uuid=$LGPU " | field utilization)%"
  say "  during: max memory_used=$max_mem max utilization=${max_util}% worker gpu_memory_used=$wmem"
  if [ "${LOADCMD[0]}" = /bin/sleep ]; then
    skip "telemetry under load: no CUDA to load the GPU"
  else
    [ "$max_util" -ge 20 ] && pass "utilization rose to ${max_util}%" || fail "utilization stayed at ${max_util}%"
    [ "$max_mem" -gt $(( ${base_mem:-0} + 500000000 )) ] && pass "GPU memory used rose by >= 500 MB" \
      || fail "GPU memory used: $base_mem -> $max_mem"
    [ "$wmem" -gt 0 ] && pass "Worker.gpu_memory_used_bytes=$wmem (NVML process mapped to the worker)" \
      || fail "Worker.gpu_memory_used_bytes stayed 0"
  fi
  if curl --version >/dev/null 2>&1; then
    curl -s --max-time 5 "http://127.0.0.1:$MPORT/metrics" | grep -E '^berth_(gpu|capacity|allocated|worker_gpu)' | sed 's/^/  metrics: /' | head -30
  fi
  chk wait "$LID" $((LOAD_SECONDS + 30)) | sed 's/^/  /'
  chk logs "$LID" | tail -5 | sed 's/^/  /'
fi

# --- the end ----------------------------------------------------------------------------
step "stop everything"
chk stop --all >/dev/null
n_alloc=$(chk info | head -1 | field allocated)
[ "$n_alloc" = 0 ] && pass "every GPU claim freed" || fail "allocated=$n_alloc after stopping all"
if [ -n "$NVSMI" ] && [ "$GPUS" = nvml ]; then
  sleep 2
  apps=$(timeout 20 "$NVSMI" --query-compute-apps=pid,process_name --format=csv,noheader 2>/dev/null)
  [ -z "$apps" ] && pass "no compute process left on the GPU" || fail "compute processes left: $apps"
fi
kill -TERM "$DPID"
for _ in $(seq 1 100); do kill -0 "$DPID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$DPID" 2>/dev/null; then fail "berthd still running after SIGTERM"; else pass "berthd exited"; fi
DPID=""
sleep 0.5
left_cg=$(find /sys/fs/cgroup -type d -name "berth-$NAME" 2>/dev/null)
[ -z "$left_cg" ] && pass "no cgroup left" || fail "cgroups left: $left_cg"
left_p=$(pgrep -f "berth-shim $WORK" || true)
[ -z "$left_p" ] && pass "no shim left" || fail "shims left: $left_p"
grep -E 'WARN|ERROR' "$WORK/berthd.log" | sed 's/\x1b\[[0-9;]*m//g; s/^/  log: /' | head -10

say ""
say "SUMMARY: $PASS passed, $FAIL failed, $SKIP skipped ($(( $(date +%s) - START )) s)"
[ "$FAIL" = 0 ]
