#!/bin/bash
# Runs inside the systemd guest (PID 1 is systemd 252, cgroup v2), as root, in the repository
# root; run-systemd-tier.sh starts it. Installs berth with systemd/install.sh from BIN_DIR,
# then drives berthd.service with real systemctl and checks what README promises. Prints one
# "ok:" line per check, "figure:" lines, and exits non-zero at the first failure.
set -uo pipefail
BIN_DIR=${BIN_DIR:?}
TRIES=${SYSTEMD_TIER_TRIES:-3}
B=/usr/local/bin/berth
CG=/sys/fs/cgroup
SCOPE=$CG/system.slice/berth-workers.scope
SERVICE=$CG/system.slice/berthd.service

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
median() { tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
fail() {
  echo "FAIL: $*"
  systemctl status --no-pager berthd.service berth-workers.scope 2>&1 | tail -n 30
  journalctl -u berthd --no-pager 2>&1 | tail -n 40
  exit 1
}
ok() { echo "ok: $*"; }
main_pid() { systemctl show -p MainPID --value berthd.service; }
# The status of each of the workers $IDS, one word each (empty when berthd does not answer).
statuses() {
  $B --json list 2>/dev/null | jq -r --arg ids "$IDS" \
    '($ids | split(" ")) as $want | [.workers[] | select(.id as $i | $want | index($i))] | sort_by(.id) | map(.status) | join(" ")'
}
all_running() { [ "$(statuses)" = "WORKER_STATUS_RUNNING WORKER_STATUS_RUNNING" ]; }
# Waits (0.1 s steps, at most $1 s) until the command $2... succeeds.
wait_for() {
  local limit=$1 t0
  shift
  t0=$(now)
  until "$@"; do
    awk -v a="$t0" -v b="$(now)" -v l="$limit" 'BEGIN { exit !(b - a > l) }' && return 1
    sleep 0.1
  done
}
# Every worker's output so far is 0, 1, 2, ... with no line lost or repeated.
output_intact() {
  local id out n
  for id in $IDS; do
    out=$($B logs "$id" 2>/dev/null) || fail "logs $id"
    n=$(printf '%s\n' "$out" | grep -c .)
    [ "$n" -ge 1 ] || fail "$id has no output"
    [ "$out" = "$(seq 0 $((n - 1)))" ] || fail "$id output not intact: $(printf '%s' "$out" | tr '\n' ' ' | cut -c1-200)"
  done
}
# A new daemon (not $1) runs and serves, and found both workers running.
readopted_by_new() {
  local pid
  pid=$(main_pid)
  [ "$pid" != 0 ] && [ "$pid" != "$1" ] && all_running
}

echo "== install"
systemd/install.sh --bin-dir "$BIN_DIR" || fail "install.sh"
[ -x /usr/local/bin/berthd ] && [ -f /etc/systemd/system/berthd.service ] && [ -f /etc/berth/berthd.toml ] \
  && getent group berth >/dev/null || fail "install.sh left something out"
ok "installed: binaries, units, /etc/berth, group berth"

echo "== start: returns once gRPC answers"
systemctl enable berthd.service || fail "systemctl enable berthd"
t0=$(now)
systemctl start berthd.service || fail "systemctl start berthd"
start_first=$(since "$t0")
# No retry: Type=notify with READY=1 sent only once the listeners serve.
$B info >/dev/null || fail "berth info right after systemctl start returned"
ok "systemctl start returned in ${start_first}s and berthd answered at once"
status=$(systemctl show -p StatusText --value berthd.service)
case $status in serving:*) ;; *) fail "StatusText is '$status', want 'serving: ...'" ;; esac
ok "systemctl status shows berthd's STATUS= line: $status"
[ -z "$(find "$SERVICE" -mindepth 1 -type d)" ] || fail "berthd.service has child cgroups: $(find "$SERVICE" -mindepth 1 -type d)"
[ "$(systemctl show -p Delegate --value berth-workers.scope)" = yes ] || fail "berth-workers.scope without Delegate=yes"
ok "berthd.service stays a leaf; berth-workers.scope has Delegate=yes"

echo "== workers"
# Bounded: one CI run hung here, silently, until the guest's 15 min ran out; a hang now fails
# at once with berthd's status and journal.
launched=$(timeout 60 $B --json launch -n 2 --cpu 0.1 --memory 0.1 --network host -- \
  /bin/sh -c 'i=0; while :; do echo $i; i=$((i + 1)); sleep 0.2; done') || fail "launch (rc $?, 60 s bound): $launched"
IDS=$(printf '%s' "$launched" | jq -r '[.workers[].id] | join(" ")')
wait_for 30 all_running || fail "workers not RUNNING: $(statuses)"
for id in $IDS; do
  procs=$(cat "$SCOPE"/berth-*/"$id"/cgroup.procs 2>/dev/null) || fail "no cgroup for $id under $SCOPE"
  [ -n "$procs" ] || fail "cgroup of $id under $SCOPE is empty"
done
shims=$(cat "$SCOPE/supervisor/cgroup.procs")
[ "$(echo "$shims" | grep -c .)" -ge 2 ] || fail "shims (and zygotes) not in $SCOPE/supervisor: $shims"
for p in $shims; do
  case $(cat "/proc/$p/comm") in berth-shim | berth-zygote | berth-*) ;; *) fail "process $p ($(cat /proc/$p/comm)) in the shims' leaf" ;; esac
done
ok "workers $IDS RUNNING in $SCOPE/berth-*/<id>, shims in $SCOPE/supervisor"

echo "== systemctl restart keeps the workers"
old=$(main_pid)
systemctl restart berthd.service || fail "systemctl restart berthd"
[ "$(main_pid)" != "$old" ] || fail "restart kept pid $old"
all_running || fail "after restart: $(statuses)"
journalctl -u berthd _PID="$(main_pid)" -o cat --no-pager | grep -q 'adopted=2' || fail "restart: no 'adopted=2' in the new daemon's log"
output_intact
ok "restart: new pid $(main_pid), both workers re-adopted and RUNNING, output intact"

echo "== kill -9: systemd restarts berthd, which re-adopts the workers"
kills=""
for i in $(seq "$TRIES"); do
  old=$(main_pid)
  t0=$(now)
  kill -9 "$old"
  wait_for 60 readopted_by_new "$old" || fail "kill -9 #$i: not back within 60 s ($(statuses))"
  kills="$kills $(since "$t0")"
  sleep 1
done
output_intact
ok "kill -9 x$TRIES: restarted and re-adopted after${kills} s (RestartSec=1 included); output intact"
# The zygotes of a killed daemon end with it (their socket closes): only the new one's remain.
lanes=$(nproc); [ "$lanes" -gt 4 ] && lanes=4
zygotes=$(for p in $(cat "$SCOPE/supervisor/cgroup.procs"); do cat "/proc/$p/comm"; done | grep -c '^berth-zygote$')
[ "$zygotes" = "$lanes" ] || fail "$zygotes zygotes in the scope after $TRIES kills, want $lanes"
ok "no zygote left behind by a killed daemon ($zygotes, one per lane)"

echo "== a hung berthd (SIGSTOP) is restarted by the watchdog"
wd=$(systemctl show -p WatchdogUSec --value berthd.service)
# Pings go out every WatchdogSec/2, so systemd kills a daemon stopped now within WatchdogSec.
old=$(main_pid)
t0=$(now)
kill -STOP "$old"
wait_for 40 sh -c "[ ! -e /proc/$old ]" || fail "SIGSTOP: pid $old not killed within 40 s (WatchdogSec=$wd)"
hung=$(since "$t0")
awk -v h="$hung" 'BEGIN { exit !(h <= 10 + 3) }' || fail "the watchdog killed the hung daemon after ${hung}s (WatchdogSec=$wd)"
journalctl -u berthd --no-pager | grep -q 'Watchdog timeout' || fail "no watchdog timeout in the journal"
wait_for 60 readopted_by_new "$old" || fail "after the watchdog: no new daemon with both workers within 60 s"
hung_back=$(since "$t0")
output_intact
ok "watchdog (WatchdogSec=$wd): hung daemon killed after ${hung}s, workers re-adopted by a new one after ${hung_back}s"

echo "== systemctl stop leaves the workers running; start re-adopts them"
starts=""
for i in $(seq "$TRIES"); do
  systemctl stop berthd.service || fail "systemctl stop berthd"
  for id in $IDS; do
    [ -n "$(cat "$SCOPE"/berth-*/"$id"/cgroup.procs 2>/dev/null)" ] || fail "stop #$i: worker $id ended with berthd"
  done
  t0=$(now)
  systemctl start berthd.service || fail "systemctl start berthd #$i"
  s=$(since "$t0")
  all_running || fail "start #$i: not serving or workers not RUNNING when start returned: $(statuses)"
  starts="$starts $s"
done
output_intact
ok "stop x$TRIES: workers kept running; systemctl start to serving (workers re-adopted):${starts} s"

echo "== journal: berthd's own lines, stamped once"
line=$(journalctl -u berthd -o cat --no-pager | grep -m1 'host ready') || fail "no 'host ready' line in journalctl -u berthd"
case $line in
  [0-9][0-9][0-9][0-9]-[0-9][0-9]-*) fail "berthd stamps its lines under journald too: $line" ;;
esac
echo "   $line"
ok "journalctl -u berthd: structured lines without a second timestamp"

echo "== stopping the scope ends the workers"
systemctl stop berth-workers.scope || fail "systemctl stop berth-workers.scope"
for id in $IDS; do
  [ -z "$(cat "$SCOPE"/berth-*/"$id"/cgroup.procs 2>/dev/null)" ] || fail "worker $id survived the scope's stop"
done
wait_for 20 sh -c "$B --json list | jq -e '[.workers[] | select(.status == \"WORKER_STATUS_RUNNING\")] | length == 0' >/dev/null" \
  || fail "workers still RUNNING after the scope's stop: $(statuses)"
ok "systemctl stop berth-workers.scope: every worker ended ($(statuses))"
# The scope took the zygotes with it: the next daemon starts a new scope.
systemctl restart berthd.service || fail "restart after the scope's stop"
[ "$(systemctl is-active berth-workers.scope)" = active ] || fail "no new berth-workers.scope"
again=$($B --json launch --cpu 0.1 --memory 0.1 --network host -- /bin/sleep 600) || fail "launch in a new scope: $again"
IDS=$(printf '%s' "$again" | jq -r '.workers[0].id')
wait_for 30 sh -c "[ \"\$($B --json list | jq -r '.workers[] | select(.id == \"$IDS\") | .status')\" = WORKER_STATUS_RUNNING ]" \
  || fail "worker $IDS not RUNNING in a new scope"
[ -n "$(cat "$SCOPE"/berth-*/"$IDS"/cgroup.procs 2>/dev/null)" ] || fail "worker $IDS not in the new scope"
ok "after a restart the new scope holds new workers ($IDS)"

echo "== uninstall"
systemd/install.sh --uninstall || fail "uninstall"
[ ! -e /usr/local/bin/berthd ] && [ ! -e /etc/systemd/system/berthd.service ] || fail "uninstall left files"
systemctl is-active --quiet berthd.service && fail "berthd still active after uninstall"
systemctl is-active --quiet berth-workers.scope && fail "workers still running after uninstall"
ok "uninstalled: daemon, workers, binaries and units gone"

echo "== where a start's time goes (journal, monotonic seconds)"
journalctl -o short-monotonic --no-pager -u berthd -u berth-workers.scope \
  | grep -E 'Main process exited|Scheduled restart|Watchdog timeout|Starting berthd|cgroups ready|recovered state|host ready|Started berthd' \
  | sed -e 's/capacity=.*//' | cut -c1-170
echo "figure: systemctl start -> serving: first ${start_first}s; after stop (workers re-adopted): median $(echo "$starts" | median)s of:${starts}"
echo "figure: kill -9 -> restarted and workers re-adopted (seen by berth list): median $(echo "$kills" | median)s of:${kills}"
echo "figure: SIGSTOP -> killed by the watchdog: ${hung}s; -> workers re-adopted by a new daemon: ${hung_back}s (WatchdogSec=$wd)"
echo "systemd-tier: all checks passed"
