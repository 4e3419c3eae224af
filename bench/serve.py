"""Policy server latency and throughput: the tiny OpenVLA served by ``python -m rlplat.serve``,
1 / 4 / 16 concurrent openpi clients, batching on (``batching.max_batch=16``) and off (``1``).

    python bench/serve.py                          # writes bench/results/serve.json, prints a table
    python bench/serve.py --clients 1 4 --seconds 5

Each setting starts its own server process on a free port; clients are threads of this process,
each with its own ``openpi_client.WebsocketClientPolicy``, sending a 224x224 camera image (resized
on the server to the policy's 32x32) and a prompt in a closed loop for ``--seconds``. Latency is
measured in the client (p50 / p99 over every request), throughput as requests per second over the
window, and the mean batch from the server's ``/healthz`` forward-pass count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from openpi_client.websocket_client_policy import WebsocketClientPolicy

SETTINGS = {"batching on": ["batching.max_batch=16", "batching.wait_ms=2"],
            "batching off": ["batching.max_batch=1"]}


def start_server(overrides: list[str], threads: int) -> tuple[subprocess.Popen, int]:
    args = [sys.executable, "-m", "rlplat.serve", "policy=openvla_tiny", "policy.value_head=false", "port=0",
            f"torch_threads={threads}", *overrides]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "RLPLAT_API_KEY": ""})
    line = process.stdout.readline()
    if not line.startswith("serving"):
        process.kill()
        raise RuntimeError(f"the server did not start: {line}{process.stdout.read()}")
    return process, int(line.split(" on ws://127.0.0.1:")[1].split()[0])


def run_clients(port: int, clients: int, seconds: float) -> dict:
    policies = [WebsocketClientPolicy(host="127.0.0.1", port=port) for _ in range(clients)]
    image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    obs = {"observation/image": image, "prompt": "reach the blue square"}
    for policy in policies:
        policy.infer(obs)  # warm-up
    latencies: list[list[float]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def loop(i: int) -> None:
        barrier.wait()
        while time.perf_counter() < stop_at[0]:
            start = time.perf_counter()
            policies[i].infer(obs)
            latencies[i].append((time.perf_counter() - start) * 1e3)

    health = f"http://127.0.0.1:{port}/healthz"
    passes_before = httpx.get(health).json()["forward_passes"]
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    began = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    passes = httpx.get(health).json()["forward_passes"] - passes_before
    flat = np.concatenate([np.asarray(x) for x in latencies])
    return {"clients": clients, "requests": int(flat.size), "p50_ms": float(np.percentile(flat, 50)),
            "p99_ms": float(np.percentile(flat, 99)), "requests_per_s": flat.size / wall,
            "mean_batch": flat.size / max(passes, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement window per row")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve.json")
    args = parser.parse_args()
    rows = []
    for name, overrides in SETTINGS.items():
        process, port = start_server(overrides, args.threads)
        try:
            for clients in args.clients:
                rows.append({"setting": name, **run_clients(port, clients, args.seconds)})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            process.terminate()
            process.wait(timeout=30)
    result = {"model": "untrained tiny OpenVLA (policy=openvla_tiny), greedy, 224x224 images resized to 32x32",
              "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end",
              "torch_threads": args.threads, "seconds_per_row": args.seconds, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\n{'setting':<13} {'clients':>7} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7} {'batch':>6}")
    for r in rows:
        print(f"{r['setting']:<13} {r['clients']:>7} {r['requests']:>8} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
              f"{r['requests_per_s']:>7.1f} {r['mean_batch']:>6.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
