#!/usr/bin/env bash
# The systemd tier (CI runs it once, after the v2 tier): berth installed with
# systemd/install.sh on a throw-away guest whose PID 1 is systemd 252 (cgroup v2), driven with
# real systemctl — start returns once gRPC answers; restart, kill -9, a hung daemon
# (watchdog) and stop/start all keep the workers running and re-adopted with their output
# intact; worker cgroups sit in berth's Delegate=yes scope, never in berthd.service; the journal
# gets berthd's lines stamped once; the scope's stop ends the workers; uninstall. Prints the
# figures (start to serving, kill -9 to re-adopted, watchdog) and a summary line.
#
# Env: SYSTEMD_TIER_TRIES (3: tries behind each median)   GUEST_MEM (2048 MiB)   GUEST_CPUS (2)
#      and run-in-guest.sh's: GUEST_TIMEOUT, QEMU_ACCEL, V2GUEST_CACHE, VERBOSE
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
cd "$ROOT"
t_start=$(date +%s)
log() { echo "systemd-tier: $*" >&2; }

missing=()
if ! command -v qemu-system-x86_64 >/dev/null 2>&1 || [ ! -f /usr/share/qemu/qboot.rom ]; then
  missing+=(qemu-system-x86)
fi
bb=$(command -v busybox 2>/dev/null || true)
if [ -z "$bb" ] || ldd "$bb" >/dev/null 2>&1; then # ldd fails on a static binary
  missing+=(busybox-static)
fi
command -v jq >/dev/null 2>&1 || missing+=(jq)
# The guest boots this machine's own systemd and D-Bus (berthd asks systemd for its workers' scope
# over the system bus).
[ -x /lib/systemd/systemd ] || missing+=(systemd)
command -v dbus-daemon >/dev/null 2>&1 || missing+=(dbus)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

log "building"
work=$(mktemp -d -t berth-systemd-tier.XXXXXX)
trap 'rm -rf "$work"' EXIT
cargo build --bins -p berth-host -p berth-scheduler -p berth-client --message-format=json >"$work/bins.json"
bin_dir=$(jq -r 'select(.reason == "compiler-artifact" and .target.name == "berthd") | .executable' "$work/bins.json" | head -1)
bin_dir=$(dirname "$bin_dir")
[ -x "$bin_dir/berthd" ] || { log "berthd not built"; exit 1; }

log "booting the guest (systemd 252, cgroup v2)"
export GUEST_TIMEOUT=${GUEST_TIMEOUT:-900} GUEST_MEM=${GUEST_MEM:-2048} GUEST_CPUS=${GUEST_CPUS:-2}
rc=0
"$HERE/run-in-guest.sh" "BIN_DIR=$bin_dir SYSTEMD_TIER_TRIES=${SYSTEMD_TIER_TRIES:-3} bash tests/systemd/guest-checks.sh" \
  | tee "$work/out.log" || rc=$?
checks=$(grep -c '^ok: ' "$work/out.log" || true)
log "$([ "$rc" = 0 ] && echo passed || echo FAILED): $checks checks, $(($(date +%s) - t_start)) s in all"
exit "$rc"
