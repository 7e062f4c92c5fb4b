"""A hyperparameter search: the master holds a queue of parameter sets and serves it over HTTP;
workers pull a set, train with it, post the result, and pull again until the queue is empty.

    cd client/python/examples && python hyperparameter_master.py

GET /next answers a parameter set as JSON (204: the queue is empty); POST /result takes
{"params": ..., "loss": ..., "worker": ...}. The master listens on all addresses (port
MASTER_PORT, default 6001; 0: any free one) and the workers find it at CDSW_MASTER_IP.
"""

import itertools
import json
import os
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import berth as cdsw

params = queue.Queue()
for lr, steps in itertools.product([0.001, 0.01, 0.05, 0.1], [10, 50, 200]):
    params.put({"learning_rate": lr, "steps": steps})
total = params.qsize()
results = []
lock = threading.Lock()


class Queue(BaseHTTPRequestHandler):
    def do_GET(self):
        try:
            body = json.dumps(params.get_nowait()).encode()
        except queue.Empty:
            self.send_response(204)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        result = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with lock:
            results.append(result)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass  # quiet


server = ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("MASTER_PORT", "6001"))), Queue)
threading.Thread(target=server.serve_forever, daemon=True).start()
port = server.server_address[1]

workers = cdsw.launch_workers(
    n=2, cpu=0.2, memory=0.5, script="hyperparameter_worker.py", env={"MASTER_PORT": str(port)}
)
done = cdsw.await_workers(workers, wait_for_completion=True, timeout_seconds=120)
server.shutdown()

for r in sorted(results, key=lambda r: r["loss"]):
    print(f"loss {r['loss']:.6f}  {r['params']}  (worker {r['worker']})")
print(
    f"{len(results)}/{total} parameter sets tried by {len({r['worker'] for r in results})} workers"
)
best = min(results, key=lambda r: r["loss"])
print("best:", best["params"])
if done["failures"] or len(results) != total:
    raise SystemExit("the search did not finish")
