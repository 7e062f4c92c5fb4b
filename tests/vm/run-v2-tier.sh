#!/usr/bin/env bash
# The cgroup-v2 test tier (CI runs it after the v1 tests; see tests/vm/README.md).
#
# Builds the e2e test binaries of berth-tests (tests/e2e/*.rs) and the berth binaries here, then
# runs every e2e test binary on a cgroup-v2-only kernel under QEMU (run-in-guest.sh), twice:
#   root       tests and berthd start in the guest's root cgroup
#   delegated  they start in /system.slice/berthd.service with controllers enabled on every
#              ancestor, as systemd's Delegate=yes gives berthd
# Exits non-zero when a test fails (or a pass does not finish) and ends with a summary line.
#
# Env: V2_TIER_PASSES ("root delegated")   V2_TIER_THREADS (2: --test-threads)
#      BERTH_TEST_TIMEOUT_SCALE (8: the harness's timeouts; emulation runs ~6.5x slower)
#      V2_TIER_BIN_TIMEOUT (1500 s per test binary)   GUEST_TIMEOUT (3600 s per pass)
#      GUEST_STALL (180 s: a guest whose heartbeat stops that long is stuck; the binaries it had
#                   not finished run again, once per pass, in a fresh guest: see tests/vm/README.md)
#      V2_TIER_LEAKS=report only report berth cgroups or processes the tests left (default: fail)
#      V2_TIER_TEST_ARGS    more arguments for every test binary, e.g. a name filter or --nocapture
#      V2_TIER_BINS         only these e2e test binaries (names of tests/e2e/*.rs, e.g. "containment")
#      V2_TIER_SKIP         e2e test binaries left out unless V2_TIER_BINS names them (default
#                           "cli cluster ha load operations retry scheduler": the CLI, cluster
#                           networking, replicas, load limits and
#                           followers, operations, retries and the scheduler touch no cgroup
#                           code; the v1 tier runs them, and twice under emulation they cost
#                           ~13 of CI's minutes)
#      GUEST_MEM (4096 MiB: the daemon's allocatable memory is the guest's less 0.5 GiB)
#      GUEST_CPUS (this machine's CPUs, 2 to 4)
#      and run-in-guest.sh's: QEMU_ACCEL, BERTH_VM_CACHE, VERBOSE
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
cd "$ROOT"
t_start=$(date +%s)
PASSES=${V2_TIER_PASSES:-root delegated}
THREADS=${V2_TIER_THREADS:-2}
SCALE=${BERTH_TEST_TIMEOUT_SCALE:-8}
DELEGATED=/system.slice/berthd.service
cpus=$(nproc)
export GUEST_TIMEOUT=${GUEST_TIMEOUT:-3600} GUEST_MEM=${GUEST_MEM:-4096} GUEST_STALL=${GUEST_STALL:-180}
export GUEST_CPUS=${GUEST_CPUS:-$((cpus < 2 ? 2 : cpus > 4 ? 4 : cpus))}

log() { echo "v2-tier: $*" >&2; }

# --- what the guest needs on this machine --------------------------------------------------
missing=()
if ! command -v qemu-system-x86_64 >/dev/null 2>&1 || [ ! -f /usr/share/qemu/qboot.rom ]; then
  missing+=(qemu-system-x86)
fi
bb=$(command -v busybox 2>/dev/null || true)
if [ -z "$bb" ] || ldd "$bb" >/dev/null 2>&1; then # ldd fails on a static binary
  missing+=(busybox-static)
fi
if [ ${#missing[@]} -gt 0 ]; then
  sudo=()
  [ "$(id -u)" = 0 ] || sudo=(sudo)
  log "installing ${missing[*]}"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

# --- build here (never cargo inside the guest) ---------------------------------------------
work=$(mktemp -d -t berth-v2-tier.XXXXXX)
trap 'rm -rf "$work"' EXIT
log "building"
cargo build --bins -p berth-host -p berth-scheduler -p berth-client --message-format=json >"$work/bins.json"
cargo test --workspace --no-run --message-format=json >"$work/tests.json"
# berthd's directory (target/debug, wherever CARGO_TARGET_DIR puts it) and the executables of
# the test targets whose source is tests/e2e/*.rs.
python3 - "$ROOT" "$work" "${V2_TIER_BINS:-}" "${V2_TIER_SKIP-cli cluster ha load operations retry scheduler}" <<'EOF'
import json, os, sys
root, work, only, skip = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4].split()
def artifacts(name):
    for line in open(os.path.join(work, name)):
        try:
            m = json.loads(line)
        except ValueError:
            continue
        if m.get("reason") == "compiler-artifact" and m.get("executable"):
            yield m
bin_dir = next(os.path.dirname(m["executable"]) for m in artifacts("bins.json")
               if m["target"]["name"] == "berthd")
e2e = os.path.join(root, "tests", "e2e") + os.sep
tests = [m for m in artifacts("tests.json") if m["profile"]["test"]]
exes = sorted({m["executable"] for m in tests
               if "test" in m["target"]["kind"] and m["target"]["src_path"].startswith(e2e)
               and (m["target"]["name"] in only if only else m["target"]["name"] not in skip)})
open(os.path.join(work, "bin_dir"), "w").write(bin_dir + "\n")
open(os.path.join(work, "exes"), "w").write("".join(e + "\n" for e in exes))
# every test executable of the workspace: what the v1 tier (cargo test --workspace) runs
open(os.path.join(work, "all_exes"), "w").write("".join(sorted({m["executable"] + "\n" for m in tests})))
EOF
BIN_DIR=$(cat "$work/bin_dir")
mapfile -t EXES <"$work/exes"
[ ${#EXES[@]} -gt 0 ] || { log "no e2e test binaries found under tests/e2e"; exit 1; }
mapfile -t ALL_EXES <"$work/all_exes"
count_tests() { # EXE... -> number of tests they list
  local n=0 e
  for e in "$@"; do n=$((n + $("$e" --list --format terse 2>/dev/null | grep -c ': test$' || true))); done
  echo "$n"
}
listed=$(count_tests "${EXES[@]}")
v1_listed=$(count_tests "${ALL_EXES[@]}")
bin_name() { # EXE -> the name of its tests/e2e file, as guest-tests.sh prints it
  local b
  b=$(basename "$1")
  printf '%s' "${b%-*}"
}
names=$(for e in "${EXES[@]}"; do printf '%s ' "$(bin_name "$e")"; done)
log "$listed e2e tests in ${#EXES[@]} binaries (${names% }); berth binaries from $BIN_DIR"
t_built=$(date +%s)

# --- the passes -----------------------------------------------------------------------------
snippet() { # EXE... -> the guest's command: guest-tests.sh on these binaries
  local s
  s="export BERTH_BIN_DIR=$(printf %q "$BIN_DIR") BERTH_TEST_TIMEOUT_SCALE=$SCALE"
  s+=" V2_TIER_BIN_TIMEOUT=${V2_TIER_BIN_TIMEOUT:-1500}"
  s+=" V2_TIER_TEST_ARGS=$(printf %q "${V2_TIER_TEST_ARGS:-}")"
  s+=$'\n'"exec bash $(printf %q "$HERE/guest-tests.sh") $THREADS $(printf '%q ' "$@")"
  printf '%s' "$s"
}
status=0
summary=()
for pass in $PASSES; do
  case $pass in
    root) cg="" ;;
    delegated) cg=$DELEGATED ;;
    *) log "unknown pass $pass (root, delegated)"; exit 2 ;;
  esac
  log "pass $pass: cgroup ${cg:-/}, --test-threads=$THREADS, $GUEST_CPUS vCPUs, $GUEST_MEM MiB"
  t0=$(date +%s)
  set +e
  GUEST_CGROUP=$cg "$HERE/run-in-guest.sh" "$(snippet "${EXES[@]}")" 2>&1 | tee "$work/$pass.log"
  rc=${PIPESTATUS[0]}
  stalled=""
  failed_stuck=0
  left=()
  if [ "$rc" = 253 ]; then
    for e in "${EXES[@]}"; do
      grep -q "^@@V2-TIER done $(bin_name "$e") rc=" "$work/$pass.log" || left+=("$e")
    done
  fi
  if [ ${#left[@]} -gt 0 ]; then
    # The guest's kernel got stuck (run-in-guest.sh said where its vCPUs were): the binaries
    # it did not finish run again in a fresh guest, once. Their tests count once: a binary cut
    # off has no result line, but a test it saw fail fails the pass. (Stuck after the last
    # binary: the leftover check is lost, and the pass fails.)
    grep -q '^test .* \.\.\. FAILED$' "$work/$pass.log" && failed_stuck=1
    stalled=$(bin_name "${left[0]}")
    log "pass $pass: the guest got stuck in $stalled; running the ${#left[@]} binaries it did not finish in a fresh guest"
    GUEST_CGROUP=$cg "$HERE/run-in-guest.sh" "$(snippet "${left[@]}")" 2>&1 | tee -a "$work/$pass.log"
    rc=${PIPESTATUS[0]}
  fi
  set -e
  secs=$(($(date +%s) - t0))
  # libtest's "test result: ok. 3 passed; 1 failed; 0 ignored; ..." lines, one per binary
  read -r passed failed ignored results < <(awk '
    /test result: / { for (i = 1; i <= NF; i++) { v = $(i - 1) + 0
        if ($i ~ /^passed;/) p += v; if ($i ~ /^failed;/) f += v; if ($i ~ /^ignored;/) g += v }
      r++ }
    END { print p + 0, f + 0, g + 0, r + 0 }' "$work/$pass.log")
  leaks=$(sed -n 's/.*@@V2-TIER leftovers cgroups=\([0-9]*\) processes=\([0-9]*\).*/\1 \2/p' "$work/$pass.log" | tail -1)
  ok=1
  if [ "$rc" != 0 ] || [ "$failed" != 0 ] || [ "$results" != ${#EXES[@]} ]; then ok=0; fi
  [ "$failed_stuck" = 0 ] || ok=0
  if [ "${V2_TIER_LEAKS:-fail}" != report ] && [ "$leaks" != "0 0" ]; then ok=0; fi
  [ "$ok" = 1 ] || status=1
  word=$([ "$ok" = 1 ] && echo ok || echo FAILED)
  line="$pass $word: $((passed + failed)) run ($passed passed, $failed failed, $ignored ignored"
  line+=", $results/${#EXES[@]} binaries finished, leftover cgroups/processes ${leaks:-?}) in ${secs}s"
  [ -n "$stalled" ] && line+=" (the guest got stuck once, in $stalled; what it left ran again)"
  [ "$failed_stuck" = 0 ] || line+=" (a test failed before the guest got stuck)"
  summary+=("$line")
  log "$line (guest rc=$rc)"
done
total=$(($(date +%s) - t_start))
all=""
for l in "${summary[@]}"; do all+="$l; "; done
echo "v2-tier summary: ${all}the tier runs the $listed e2e tests of ${#EXES[@]} binaries per pass" \
  "(the v1 tier, cargo test --workspace, runs $v1_listed tests of ${#ALL_EXES[@]} binaries, doctests aside);" \
  "wall ${total}s (build $((t_built - t_start))s)"
exit "$status"
