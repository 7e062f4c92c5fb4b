#!/bin/bash
# Runs inside the cgroup-v2 guest (run-v2-tier.sh starts it through run-in-guest.sh): every test
# binary given, one after the other, then reports what the tests left behind.
# Usage: guest-tests.sh THREADS EXE...
# Env (set by run-v2-tier.sh): BERTH_BIN_DIR, BERTH_TEST_TIMEOUT_SCALE, V2_TIER_BIN_TIMEOUT,
# V2_TIER_TEST_ARGS (more arguments for every binary, split on spaces).
set -u
threads=$1
shift
# Unix sockets, state dirs and temp files stay on the guest's tmpfs, never on the 9p share.
export TMPDIR=/tmp/berth-v2-tier
mkdir -p "$TMPDIR"
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}
echo "@@V2-TIER cgroup=$(cut -d: -f3- /proc/self/cgroup) kernel=$(uname -r)" \
  "controllers=\"$(cat /sys/fs/cgroup/cgroup.controllers)\" threads=$threads"
fails=0
for exe in "$@"; do
  name=$(basename "$exe")
  echo "@@V2-TIER run ${name%-*}"
  # shellcheck disable=SC2086
  timeout -k 10 "${V2_TIER_BIN_TIMEOUT:-1500}" "$exe" --test-threads="$threads" ${V2_TIER_TEST_ARGS:-}
  rc=$?
  echo "@@V2-TIER done ${name%-*} rc=$rc"
  [ "$rc" = 0 ] || fails=$((fails + 1))
done

# What the tests left: berth cgroups and berthd/berth-shim processes (the harness promises none).
cgroups=$(find /sys/fs/cgroup -mindepth 1 -type d -name 'berth-*' 2>/dev/null)
procs=""
for c in /proc/[0-9]*/comm; do
  case $(cat "$c" 2>/dev/null) in
    berthd | berth-shim) p=${c#/proc/}; procs="$procs ${p%/comm}" ;;
  esac
done
echo "@@V2-TIER leftovers cgroups=$(printf '%s' "$cgroups" | grep -c .) processes=$(echo $procs | wc -w)"
[ -n "$cgroups" ] && printf '  left cgroup %s\n' $cgroups
for p in $procs; do echo "  left process $p $(tr '\0' ' ' < /proc/$p/cmdline 2>/dev/null)"; done
exit "$fails"
