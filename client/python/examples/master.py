"""The workbench's first example, on berth: a master launches two workers that run worker.py;
each worker connects back to the master (CDSW_MASTER_IP, port 6000) and they exchange a greeting.

    cd client/python/examples && python master.py

The master listens on all addresses (0.0.0.0): workers on the host's worker network reach it
through CDSW_MASTER_IP, the network's gateway address. MASTER_PORT picks another port than 6000
(0: any free one); the workers are told which.
"""

import os
import socket

import berth as cdsw

# Listen before the workers start, so that none of them finds the port closed.
server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", int(os.environ.get("MASTER_PORT", "6000"))))
server.listen(2)
port = server.getsockname()[1]

workers = cdsw.launch_workers(
    n=2, cpu=0.2, memory=0.5, script="worker.py", env={"MASTER_PORT": str(port)}
)

# One connection per worker: read its greeting, answer, close.
for _ in workers:
    conn, _addr = server.accept()
    with conn:
        data = conn.recv(1024)
        print("Master received:", data.decode(), flush=True)
        conn.sendall(b"Hello From Server!")
server.close()

# Until the workers have printed their answers (their lines appear here, "[id] ...").
result = cdsw.await_workers(workers, wait_for_completion=True, timeout_seconds=60)
if result["failures"]:
    raise SystemExit(f"workers failed: {[(w['id'], w['reason']) for w in result['failures']]}")
