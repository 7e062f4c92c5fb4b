#!/bin/bash
# run-in-guest.sh CMD [ARGS...]
#   Boots a throw-away Linux guest (Debian 6.1 kernel, cgroup v2 only) whose root is the
#   host's own / (read-only 9p + tmpfs overlay, so writes are discarded), runs CMD as root
#   in the current directory, streams its output, powers off, and exits with CMD's status.
#   One argument  => treated as a shell script snippet:  run-in-guest.sh 'ls /; echo hi'
#   Several       => exec'd as argv:                     run-in-guest.sh ./target/debug/foo --x
# Env:
#   SHARE_DIR        host dir mounted READ-WRITE at the same path in the guest (default: $PWD;
#                    "" = none). Everything else on the host is visible read-only anyway.
#   QEMU_ACCEL       tcg (default) | kvm. Nested KVM hangs the guest kernel on some machines
#                    that have /dev/kvm, so there is no auto-detection: set QEMU_ACCEL=kvm where it works
#   GUEST_CPUS (2)  GUEST_MEM in MiB (2048)  GUEST_TIMEOUT in s (600)
#   PRELOAD_MODULES  modules loaded before CMD (default "veth bridge"); others autoload
#   GUEST_CGROUP     e.g. /system.slice/test.service: run CMD in that cgroup with cpu/memory/
#                    pids/io enabled on all ancestors (like a systemd Delegate=yes unit)
#   VERBOSE=1        show the whole console (kernel log, init messages)
#   GUEST_APPEND     more kernel arguments, e.g. "loglevel=7" (with VERBOSE=1) to see warnings
#   GUEST_QMP        a path: QEMU listens there for QMP (e.g. "human-monitor-command" to see
#                    where a stuck guest's CPUs are)
#   GUEST_STALL      seconds (0: off): when the guest's heartbeat (a task of its root cgroup that
#                    counts every 5 s) stops that long, its kernel is stuck: say where its vCPUs
#                    are (guest-cpus.py), stop QEMU and exit 253 (tests/vm/README.md)
#   BERTH_VM_CACHE   where build-guest.sh keeps the kernel and initramfs (default
#                    ~/.cache/berth-v2-guest; outside the repository)
# Needs: apt-get install --no-install-recommends qemu-system-x86 busybox-static
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${BERTH_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/berth-v2-guest}
[ $# -ge 1 ] || { sed -n '2,20p' "$0"; exit 2; }
# (Re)build when the kernel is missing or guest/init, guest/stage2 changed since the last build.
if [ ! -f "$CACHE/initramfs.cpio.gz" ] || [ ! -e "$CACHE/kpkg/vmlinuz" ] \
   || [ "$(cat "$HERE/guest/init" "$HERE/guest/stage2" | cksum)" != "$(cat "$CACHE/initramfs.stamp" 2>/dev/null)" ]; then
  "$HERE/build-guest.sh" >&2 || exit 2
fi
KVER=$(ls "$CACHE/kpkg/lib/modules" | head -1)
ACCEL=${QEMU_ACCEL:-tcg}
case $ACCEL in kvm) ACCEL_ARGS=(-accel kvm -cpu host) ;; *) ACCEL_ARGS=(-accel tcg,thread=multi,tb-size=256 -cpu max) ;; esac
SHARE_DIR=${SHARE_DIR-$PWD}
ctl=$(mktemp -d -t qemu-guest-ctl.XXXXXX)
trap 'rm -rf "$ctl"' EXIT
if [ $# -eq 1 ]; then printf '%s\n' "$1" > "$ctl/cmd.sh"; else printf '%q ' "$@" > "$ctl/cmd.sh"; echo >> "$ctl/cmd.sh"; fi
{ printf 'SHARE_DIR=%q\n' "$SHARE_DIR"; printf 'WORK_DIR=%q\n' "$PWD"
  printf 'PRELOAD_MODULES=%q\n' "${PRELOAD_MODULES-veth bridge}"
  printf 'GUEST_CGROUP=%q\n' "${GUEST_CGROUP-}"; } > "$ctl/env"
fs() { # id path tag extra-opts
  echo "-fsdev local,id=$1,path=$2,$4 -device virtio-9p-pci,fsdev=$1,mount_tag=$3"; }
STALL=${GUEST_STALL:-0}
QMP=${GUEST_QMP:-}
[ "$STALL" -gt 0 ] && [ -z "$QMP" ] && QMP=$ctl/qmp.sock
qmp=""; [ -n "$QMP" ] && qmp="-qmp unix:$QMP,server=on,wait=off"
watchdog() { # stops QEMU once the guest's heartbeat has not changed for $STALL s
  local last="" since now beat
  since=$(date +%s)
  while sleep 5; do
    beat=$(cat "$ctl/heartbeat" 2>/dev/null) || continue # still booting: GUEST_TIMEOUT's part
    now=$(date +%s)
    if [ "$beat" != "$last" ]; then last=$beat; since=$now; continue; fi
    [ $((now - since)) -ge "$STALL" ] || continue
    { echo "run-in-guest: the guest's heartbeat stopped $((now - since)) s ago: its kernel is stuck (GUEST_STALL=$STALL); stopping it"
      python3 "$HERE/guest-cpus.py" "$QMP" 20 2>&1; } > "$ctl/stalled.new"
    mv "$ctl/stalled.new" "$ctl/stalled"
    kill "$(cat "$ctl/qemu.pid")" 2>/dev/null
    return
  done
}
share=""; [ -n "$SHARE_DIR" ] && share=$(fs fsshare "$SHARE_DIR" share security_model=passthrough)
[ "$(id -u)" = 0 ] || share=${share/passthrough/none}
t0=$(date +%s.%N)
wpid=""
if [ "$STALL" -gt 0 ]; then watchdog & wpid=$!; fi
# shellcheck disable=SC2046
timeout -k 5 "${GUEST_TIMEOUT:-600}" qemu-system-x86_64 -nodefaults -no-user-config -no-reboot \
  -pidfile "$ctl/qemu.pid" "${ACCEL_ARGS[@]}" -smp "${GUEST_CPUS:-2}" -m "${GUEST_MEM:-2048}" \
  -bios /usr/share/qemu/qboot.rom -display none -monitor none -serial stdio \
  -kernel "$CACHE/kpkg/vmlinuz" -initrd "$CACHE/initramfs.cpio.gz" \
  -append "console=ttyS0 quiet loglevel=3 panic=-1 cgroup_no_v1=all systemd.unified_cgroup_hierarchy=1 ${GUEST_APPEND:-}" \
  $(fs fsroot / hostroot security_model=none,readonly=on,multidevs=remap) \
  $(fs fskm "$CACHE/kpkg/lib/modules/$KVER" kmods security_model=none,readonly=on) \
  $(fs fsctl "$ctl" ctl security_model=none) $share $qmp </dev/null 2>&1 \
| { on=0; v=${VERBOSE:-0}
    while IFS= read -r line || [ -n "$line" ]; do
      line=${line%$'\r'}; printf '%s\n' "$line" >> "$ctl/console.log"
      case $line in
        *@@GUEST-START@@*) on=1; date +%s.%N > "$ctl/t_start"; [ "$v" = 1 ] || continue ;;
        *@@GUEST-RC=*)     on=0; pre=${line%%@@GUEST-RC=*}; [ -n "$pre" ] && printf '%s\n' "$pre"; [ "$v" = 1 ] || continue ;;
      esac
      if [ "$on" = 1 ] || [ "$v" = 1 ]; then printf '%s\n' "$line"
      else case $line in *GUEST-INIT:*|*"Kernel panic"*|*qemu-system*) printf '%s\n' "$line" >&2 ;; esac; fi
    done; }
t2=$(date +%s.%N)
[ -n "$wpid" ] && { kill "$wpid" 2>/dev/null; wait "$wpid" 2>/dev/null; }
console_tail() { echo "run-in-guest: $1; console tail:" >&2; tail -n 40 "$ctl/console.log" | tr -d '\r' >&2; }
if [ -f "$ctl/stalled" ]; then
  cat "$ctl/stalled" >&2; console_tail "the guest was stuck"; rc=253
else
  rc=$(cat "$ctl/rc" 2>/dev/null) || { console_tail "no exit status from guest"; rc=255; }
fi
ts=$(cat "$ctl/t_start" 2>/dev/null || echo "$t2")
awk -v a="$ACCEL" -v t0="$t0" -v ts="$ts" -v t2="$t2" -v rc="$rc" 'BEGIN { printf "run-in-guest: accel=%s boot=%.1fs total=%.1fs rc=%s\n", a, ts-t0, t2-t0, rc > "/dev/stderr" }'
exit "$rc"
