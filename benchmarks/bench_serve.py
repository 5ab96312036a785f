"""Serving latency: `gencls serve` started for real, timed over HTTP with one text and a batch.

    gencls bench serve --dataset trec6 [--alias champion] [--batch 100] [--repeats 5] [--workers 1]

Starts `gencls serve` (mlflow models serve of models:/gencls-<dataset>@<alias>, with the
project's thread policy) on a free 127.0.0.1 port, waits for /health, sends one warm-up
request, then times `--repeats` single-text requests and two requests of `--batch` texts
(the dataset's test texts), and stops the server with its process group. Prints the median
and worst seconds of each. Targets on 2 cores (trec6 champion): one text <= 1 s, 100 <= 10 s.
Not a timed test: run it on an idle machine.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, texts: list[str], timeout: float = 300.0) -> tuple[float, dict]:
    """(seconds, decoded response) of one /invocations request."""
    body = json.dumps({"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts]}}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout) as response:
        payload = json.loads(response.read())
    return time.perf_counter() - start, payload


def run_benchmark(dataset: str = "trec6", alias: str = "champion", batch: int = 100, repeats: int = 5,
                  workers: int = 1, startup_timeout: float = 300.0) -> dict:
    """Start the server, time the requests, stop it; returns the figures."""
    from components.config import wait_healthy
    from components.data.datasets import load_split
    from components.threads import available_cores, thread_budget

    texts = [ex["text"] for ex in load_split(dataset, "test")]
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="gencls-bench-serve-")) / "serve.log"
    cmd = [str(Path(sys.executable).parent / "gencls"), "serve", "--dataset", dataset, "--alias", alias,
           "--port", str(port), "--workers", str(workers)]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if not wait_healthy(f"http://127.0.0.1:{port}/health", startup_timeout, proc):
            raise RuntimeError(f"gencls serve did not come up; see {log}:\n{log.read_text()[-2000:]}")
        url = f"http://127.0.0.1:{port}/invocations"
        post(url, texts[:1])  # warm-up: first request loads lazily-initialised pieces
        single = [post(url, [texts[i % len(texts)]])[0] for i in range(1, repeats + 1)]
        batches = [post(url, texts[i * batch:(i + 1) * batch] or texts[:batch]) for i in range(2)]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    predictions = batches[0][1].get("predictions", [])
    return {"dataset": dataset, "alias": alias, "workers": workers, "cores": available_cores(),
            "threads_per_worker": thread_budget(workers), "single_median_s": statistics.median(single),
            "single_max_s": max(single), "batch": batch, "batch_s": [round(b[0], 2) for b in batches],
            "batch_rows_returned": len(predictions), "log": str(log)}


def format_report(r: dict) -> str:
    """Human-readable lines of a `run_benchmark` result."""
    return "\n".join([
        f"gencls serve models:/gencls-{r['dataset']}@{r['alias']}: {r['workers']} worker(s) x "
        f"{r['threads_per_worker']} torch thread(s) on {r['cores']} cores",
        f"one text:   median {r['single_median_s']:.2f} s, worst {r['single_max_s']:.2f} s (target <= 1 s)",
        f"{r['batch']} texts: {', '.join(f'{s:.2f} s' for s in r['batch_s'])} "
        f"({r['batch_rows_returned']} predictions; target <= 10 s)",
    ])
