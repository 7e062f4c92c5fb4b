#!/bin/sh
# Installs berth as systemd services, or removes it. As root, from the repository root:
#
#   cargo build --release && systemd/install.sh            # then: systemctl enable --now berthd
#   systemd/install.sh --uninstall [--purge]
#
# Puts berthd, berth-shim, berth and berth-scheduler in PREFIX/bin (default /usr/local), the
# units in /etc/systemd/system (ExecStart pointed at PREFIX/bin), the example configurations in
# /etc/berth (an existing one is kept), and makes the system group `berth` (its members may use
# the Unix socket). Options:
#   --bin-dir DIR   where the built binaries are (default target/release)
#   --prefix DIR    install root of the binaries (default /usr/local)
#   --uninstall     stop and disable both services, stop the workers (berth-workers.scope),
#                   remove binaries and units; keeps /etc/berth, /var/lib/berth and the group
#   --purge         with --uninstall: remove those too
set -eu
here=$(cd "$(dirname "$0")" && pwd)
bin_dir=target/release
prefix=/usr/local
action=install
purge=0
units=/etc/systemd/system
while [ $# -gt 0 ]; do
  case $1 in
    --bin-dir) bin_dir=$2; shift 2 ;;
    --prefix) prefix=$2; shift 2 ;;
    --uninstall) action=uninstall; shift ;;
    --purge) purge=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root" >&2; exit 1; }
binaries="berthd berth-shim berth berth-scheduler"
systemd_up() { [ -d /run/systemd/system ]; }

if [ "$action" = uninstall ]; then
  if systemd_up; then
    systemctl disable --now berthd.service berth-scheduler.service 2>/dev/null || true
    # The workers outlive berthd by design; uninstalling ends them.
    systemctl stop berth-workers.scope 2>/dev/null || true
  fi
  for b in $binaries; do rm -f "$prefix/bin/$b"; done
  rm -f "$units/berthd.service" "$units/berth-scheduler.service"
  if [ "$purge" = 1 ]; then
    rm -rf /etc/berth /var/lib/berth /var/lib/private/berth-scheduler /run/berth
    getent group berth >/dev/null && groupdel berth
  fi
  systemd_up && systemctl daemon-reload
  echo "berth removed"
  exit 0
fi

for b in $binaries; do
  [ -x "$bin_dir/$b" ] || { echo "install.sh: $bin_dir/$b missing: cargo build --release first (or --bin-dir)" >&2; exit 1; }
done
install -d -m 0755 "$prefix/bin" /etc/berth "$units"
for b in $binaries; do
  # Into a temporary name, then renamed: a running berthd's binary is replaced, not rewritten.
  install -m 0755 "$bin_dir/$b" "$prefix/bin/.$b.new"
  mv -f "$prefix/bin/.$b.new" "$prefix/bin/$b"
done
for u in berthd.service berth-scheduler.service; do
  sed "s|/usr/local/bin/|$prefix/bin/|g" "$here/$u" > "$units/$u"
  chmod 0644 "$units/$u"
done
for c in berthd.toml berth-scheduler.toml; do
  [ -e "/etc/berth/$c" ] || install -m 0644 "$here/$c" "/etc/berth/$c"
done
getent group berth >/dev/null || groupadd --system berth
if systemd_up; then
  systemctl daemon-reload
  echo "berth installed: systemctl enable --now berthd"
else
  echo "berth installed (systemd is not running here: start $prefix/bin/berthd --config /etc/berth/berthd.toml)"
fi
