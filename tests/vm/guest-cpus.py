#!/usr/bin/env python3
"""Where a stuck guest's vCPUs are: run-in-guest.sh's stall watchdog runs this before it stops
QEMU. Usage: guest-cpus.py QMP_SOCKET [SAMPLES]

Samples every vCPU's instruction pointer through QMP (HMP "info registers -a"), then prints, for
the addresses seen most, how often each vCPU was there and the bytes and instructions that the
guest's memory holds there. A vCPU seen again and again at one kernel address whose memory is
not an int3 (0xcc), while it keeps entering the int3 handler (asm_exc_int3 and kprobe_int3_handler
in /proc/kallsyms of a guest booted with nokaslr), runs a stale translation of patched kernel
text: a bug of QEMU's TCG (tests/vm/README.md), not of the guest.
"""
import collections
import json
import re
import socket
import sys
import time


def main() -> int:
    path = sys.argv[1]
    samples = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(path)
    stream = sock.makefile("rw")

    def call(execute: str, **arguments: object) -> object:
        stream.write(json.dumps({"execute": execute, "arguments": arguments}) + "\n")
        stream.flush()
        while True:  # skip events
            reply = json.loads(stream.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"{execute}: {reply['error']}")

    def hmp(command: str) -> str:
        return str(call("human-monitor-command", **{"command-line": command}))

    stream.readline()  # the greeting
    call("qmp_capabilities")
    seen: collections.Counter = collections.Counter()
    for _ in range(samples):
        for cpu, rip in enumerate(re.findall(r"RIP=([0-9a-f]+)", hmp("info registers -a"))):
            seen[(rip, cpu)] += 1
        time.sleep(0.1)
    by_address: collections.Counter = collections.Counter()
    for (rip, _), n in seen.items():
        by_address[rip] += n
    print(f"guest-cpus: {samples} samples of each vCPU's instruction pointer")
    for rip, n in by_address.most_common(4):
        there = [(c, k) for (r, c), k in sorted(seen.items()) if r == rip]
        print(f"  {rip}: {n} samples ({', '.join(f'vCPU {c}: {k}' for c, k in there)})")
        hmp(f"cpu {there[0][0]}")  # read through that vCPU's page tables
        print("    bytes " + " ".join(re.findall(r"0x([0-9a-f]{2})", hmp(f"x/8xb 0x{rip}"))))
        for line in hmp(f"x/2i 0x{rip}").splitlines():
            print(f"    {line.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
