"""What a fork server's refill of the warm pool would cost (issue 19's design note; a probe, not
berth's code). Needs root.

A server (this process) imports the preload list, then per pooled worker-to-be:
  server forks X; X forks Y and execs berth-shim (standing in for `berth-shim --adopt`: here it
  finds no worker directory and exits, which costs what its start costs); Y joins a cgroup
  (`0` to its join files), enters a network namespace (setns), keeps only CAP_SETGID,
  CAP_SETUID and CAP_SETPCAP (bounding set, capset), sets no_new_privs and nice 19, points
  stdout at a pipe and says it is ready: what a pooled interpreter is before its claim.
Prints the median time from the request to Y's readiness, and the CPU the whole refill took
(server, X and its exec, Y), against starting an interpreter that imports the same list.

usage: fork_server_probe.py SHIM [N] [MODULE,...]
"""
import ctypes
import os
import statistics
import subprocess
import sys
import time

SHIM = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 40
PRELOAD = [m for m in (sys.argv[3] if len(sys.argv) > 3 else '').split(',') if m]

libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 24, 38, 36
SYS_CAPSET = 126  # x86-64
KEEP = (6, 7, 8)


class CapHeader(ctypes.Structure):
    _fields_ = [('version', ctypes.c_uint32), ('pid', ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [('effective', ctypes.c_uint32), ('permitted', ctypes.c_uint32),
                ('inheritable', ctypes.c_uint32)]


def join_files():
    """One cgroup per hierarchy (v1) or the unified one (v2), made for the probe."""
    base = '/sys/fs/cgroup'
    if os.path.exists(base + '/cgroup.controllers'):
        dirs = [base + '/berth-probe']
    else:
        dirs = [base + '/' + c + '/berth-probe' for c in ('memory', 'cpu,cpuacct', 'pids')
                if os.path.isdir(base + '/' + c)]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    return dirs


def become_pooled(procs, netns, out):
    """Y's side: what the shim's child_exec does for a pooled interpreter, in Python."""
    for p in procs:
        with open(p + '/cgroup.procs', 'w') as f:
            f.write('0')
    fd = os.open(netns, os.O_RDONLY)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), 'setns')
    os.close(fd)
    last = int(open('/proc/sys/kernel/cap_last_cap').read())
    for cap in range(last + 1):
        if cap not in KEEP and libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), 'bounding set')
    mask = sum(1 << c for c in KEEP)
    hdr = CapHeader(0x20080522, 0)
    data = (CapData * 2)(CapData(mask, mask, 0), CapData(0, 0, 0))
    if libc.syscall(SYS_CAPSET, ctypes.byref(hdr), ctypes.byref(data)) != 0:
        raise OSError(ctypes.get_errno(), 'capset')
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), 'no_new_privs')
    os.setpriority(os.PRIO_PROCESS, 0, 19)
    os.dup2(out, 1)


def refill(procs, netns):
    """One worker-to-be; returns when Y is ready."""
    ready_r, ready_w = os.pipe()
    x = os.fork()
    if x == 0:
        try:
            os.setsid()
            out_r, out_w = os.pipe()
            y = os.fork()
            if y == 0:
                t = time.perf_counter()
                become_pooled(procs, netns, out_w)
                os.write(ready_w, b'r%d' % round((time.perf_counter() - t) * 1e6))
                os._exit(0)
            os.close(out_w)
            os.close(ready_w)
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.execv(SHIM, [SHIM, '/nonexistent/berth-probe'])
        finally:
            os._exit(127)
    os.close(ready_w)
    got = os.read(ready_r, 32)
    os.close(ready_r)
    if not got.startswith(b'r'):
        raise RuntimeError('Y never became ready')
    return int(got[1:])


def main():
    for m in PRELOAD:
        __import__(m)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    procs = join_files()
    subprocess.run(['ip', 'netns', 'add', 'berth-probe'], check=False)
    netns = '/run/netns/berth-probe'
    lat, setup = [], []
    r0 = os.times()
    c0 = (r0.user + r0.system, r0.children_user + r0.children_system)
    for _ in range(N):
        t = time.perf_counter()
        setup.append(refill(procs, netns) / 1e3)
        lat.append((time.perf_counter() - t) * 1e3)
    # Reap X (its shim's exec ends at once) and Y (an orphan, ours as subreaper).
    while True:
        try:
            os.wait()
        except ChildProcessError:
            break
    r1 = os.times()
    own = (r1.user + r1.system) - c0[0]
    kids = (r1.children_user + r1.children_system) - c0[1]
    print('fork server refill, preload %r: request -> Y ready p50 %.2f ms (of which Y joins, setns,'
          ' drops: %.2f); CPU %.2f ms per refill (server %.2f, X+shim exec+Y %.2f)' % (
              PRELOAD, statistics.median(lat), statistics.median(setup),
                                                  (own + kids) * 1e3 / N, own * 1e3 / N,
                                                  kids * 1e3 / N))
    t = time.perf_counter()
    r = os.times()
    for _ in range(min(N, 20)):
        subprocess.run([sys.executable, '-c', ';'.join(['import ' + m for m in PRELOAD]) or 'pass'],
                       check=True)
    r2 = os.times()
    n = min(N, 20)
    print('interpreter start, preload %r: %.2f ms wall, CPU %.2f ms each' % (
        PRELOAD, (time.perf_counter() - t) * 1e3 / n,
        ((r2.children_user + r2.children_system) - (r.children_user + r.children_system)) * 1e3 / n))
    subprocess.run(['ip', 'netns', 'del', 'berth-probe'], check=False)
    for d in procs:
        try:
            os.rmdir(d)
        except OSError as e:
            print('cgroup %s left: %s' % (d, e))


if __name__ == '__main__':
    main()
