"""Run by the workers of master.py: connect to the master, greet it, print its answer."""

import os
import socket
import time

master_ip = os.environ["CDSW_MASTER_IP"]
port = int(os.environ.get("MASTER_PORT", "6000"))
print("CDSW_MASTER_IP:", master_ip, flush=True)

for attempt in range(50):  # the master may still be starting
    try:
        sock = socket.create_connection((master_ip, port), timeout=10)
        break
    except ConnectionRefusedError:
        time.sleep(0.2)
else:
    raise SystemExit(f"cannot reach the master at {master_ip}:{port}")

with sock:
    sock.sendall(b"Hello From Worker!")
    data = sock.recv(1024)
print("Worker received:", data.decode(), flush=True)
