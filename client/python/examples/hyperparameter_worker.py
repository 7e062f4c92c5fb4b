"""Run by the workers of hyperparameter_master.py: pull a parameter set, fit a small model with
it, post the loss; until the master's queue is empty."""

import json
import os
import random
import urllib.request

master = f"http://{os.environ['CDSW_MASTER_IP']}:{os.environ.get('MASTER_PORT', '6001')}"
me = os.environ["BERTH_WORKER_ID"]

# The data: y = 3x - 2 with noise; the model: y = a x + b, fitted by gradient descent.
rng = random.Random(7)
data = [(x, 3 * x - 2 + rng.gauss(0, 0.1)) for x in (rng.uniform(-1, 1) for _ in range(200))]


def train(learning_rate, steps):
    a = b = 0.0
    for _ in range(steps):
        ga = sum(2 * (a * x + b - y) * x for x, y in data) / len(data)
        gb = sum(2 * (a * x + b - y) for x, y in data) / len(data)
        a, b = a - learning_rate * ga, b - learning_rate * gb
    return sum((a * x + b - y) ** 2 for x, y in data) / len(data)


tried = 0
while True:
    with urllib.request.urlopen(f"{master}/next", timeout=30) as r:
        if r.status == 204:
            break
        p = json.load(r)
    loss = train(**p)
    body = json.dumps({"params": p, "loss": loss, "worker": me}).encode()
    post = urllib.request.Request(
        f"{master}/result", data=body, headers={"Content-Type": "application/json"}
    )
    urllib.request.urlopen(post, timeout=30).close()
    tried += 1
print(f"tried {tried} parameter sets", flush=True)
