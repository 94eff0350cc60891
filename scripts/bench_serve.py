"""``raylora serve`` against one merged model per process: requests/s, p50/p95 latency and memory.

    python scripts/bench_serve.py [--requests 32] [--adapters 4]

On the demo's base: ``--adapters`` LoRA adapters (random, different seeds) and their merged copies
(``raylora.merge --no-verify``). Side A: one ``raylora serve`` application (one replica, 1 CPU)
holding the base model and every adapter. Side B: each merged model in a process of its own, serving
the same API (the same replica code with the merged checkpoint as its base and no adapter; threads,
one request at a time per model, as ``mlflow models serve`` runs it). Both sides get the same
requests through the ``openai`` client: one adapter, then all of them mixed, with 1 and 16
concurrent clients; every request is one real COCO fixture image and greedy decoding of 30 tokens.
Memory: the resident set of side A's replica process against the sum of side B's processes.

The last line printed is one JSON object: every figure, ``mixed_vs_single`` (side A's requests/s
with the adapters mixed over one adapter, 16 clients) and ``memory_ratio_4_adapters`` (side B's
memory over side A's).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
IMAGE = REPO / "tests" / "fixtures" / "coco" / "train2014" / "COCO_train2014_000000034181.jpg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    import torch

    from raylora.config import load_config
    from raylora.demo import demo_image_settings
    from raylora.model import apply_lora, load_base_model
    from raylora.sources import complete_adapter_dir

    torch.manual_seed(seed)
    model = apply_lora(load_base_model(base), load_config("demo"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.save_pretrained(out)
    complete_adapter_dir(out, base, demo_image_settings(base))
    return out


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(clients: dict[str, Any], models: list[str], concurrency: int, requests: int) -> dict[str, float]:
    """requests/s and latency percentiles of ``requests`` chat completions, ``concurrency`` at a time,
    cycling through ``models`` (``clients[model]`` answers it)."""
    url = f"data:image/jpeg;base64,{base64.b64encode(IMAGE.read_bytes()).decode()}"

    def one(i: int) -> float:
        model = models[i % len(models)]
        t0 = time.perf_counter()
        clients[model].chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
            max_tokens=30,
            temperature=0,
        )
        return time.perf_counter() - t0

    one(0)  # warm: each side loads what the first request needs
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = sorted(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    return {
        "requests_per_s": round(requests / wall, 2),
        "p50_ms": round(statistics.median(latencies) * 1000),
        "p95_ms": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] * 1000),
    }


WORKER = """
import json, sys, threading
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
sys.path.insert(0, {repo!r})
from raylora.config import ServeConfig
from raylora.serve_api import APIError, CaptionReplica, completion, parse_chat_request
replica = CaptionReplica({base!r}, {{}}, ServeConfig(dtype="fp32"))
name, lock = {name!r}, threading.Lock()

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        body["model"], asked = replica.base_name, body.get("model")
        try:
            req = parse_chat_request(body, replica.cfg, replica.models())
            with lock:
                (out,) = replica.caption([req])
            if isinstance(out, APIError):
                raise out
            req.model = asked
            status, payload = 200, completion(req, *out)
        except APIError as e:
            status, payload = e.status, e.body()
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

print("ready", flush=True)
ThreadingHTTPServer(("127.0.0.1", {port}), Handler).serve_forever()
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=32, help="requests per measurement (default 32)")
    p.add_argument("--adapters", type=int, default=4, help="adapters served (default 4)")
    args = p.parse_args(argv)
    import ray
    from openai import OpenAI
    from ray import serve

    from raylora.config import Config
    from raylora.demo import ensure_demo
    from raylora.serve import start

    base = ensure_demo() / "base"
    work = Path(tempfile.mkdtemp(prefix="raylora-bench-serve-"))
    names = [f"adapter{i}" for i in range(args.adapters)]
    adapters = {n: str(make_adapter(base, work / n, seed=i + 1)) for i, n in enumerate(names)}
    merged = {}
    for n, path in adapters.items():
        out = work / f"{n}-merged"
        cmd = [sys.executable, "-m", "raylora.merge", "--adapter", path, "--output", str(out), "--no-verify"]
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
        merged[n] = out
    print(f"[bench] {len(adapters)} adapters and their merged copies in {work}", flush=True)

    # side B: one process per merged model
    procs, side_b = {}, {}
    for n, path in merged.items():
        port = free_port()
        code = WORKER.format(repo=str(REPO), base=str(path), name=n, port=port)
        procs[n] = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert procs[n].stdout.readline().strip() == "ready", f"{n}'s process did not start"
        side_b[n] = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
    # side A: raylora serve, every adapter on one base
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = Config()
    cfg.serve.port, cfg.serve.cpus_per_replica, cfg.serve.dtype = free_port(), 1.0, "fp32"
    url = start(cfg, adapters, str(base), log=lambda *_: None)
    client = OpenAI(base_url=url, api_key="x", max_retries=0, timeout=600)
    side_a = dict.fromkeys(names, client)
    results: dict[str, Any] = {}
    try:
        for side, clients in (("serve", side_a), ("merged_processes", side_b)):
            for mix, models in (("one_adapter", names[:1]), (f"{len(names)}_adapters_mixed", names)):
                for concurrency in (1, 16):
                    key = f"{side}_{mix}_{concurrency}_clients"
                    results[key] = measure(clients, models, concurrency, args.requests)
                    print(f"[bench] {key}: {results[key]}", flush=True)
        ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
        replica_pids = [
            int(line.split()[0]) for line in ps if "ServeReplica" in line and "CaptionServer" in line
        ]
        assert replica_pids, "no serve replica process found"
        memory_a = sum(rss_mib(pid) for pid in replica_pids)
        memory_b = sum(rss_mib(proc.pid) for proc in procs.values())
    finally:
        serve.shutdown()
        ray.shutdown()
        for proc in procs.values():
            proc.kill()
    mixed = f"{len(names)}_adapters_mixed"
    summary = {
        **results,
        "adapters": len(names),
        "requests": args.requests,
        "cpus": os.cpu_count(),
        "serve_replica_rss_mib": round(memory_a),
        "merged_processes_rss_mib": round(memory_b),
        "mixed_vs_single": round(
            results[f"serve_{mixed}_16_clients"]["requests_per_s"]
            / results["serve_one_adapter_16_clients"]["requests_per_s"],
            3,
        ),
        f"memory_ratio_{len(names)}_adapters": round(memory_b / memory_a, 2) if memory_a else None,
        "serve_vs_merged_mixed_16_clients": round(
            results[f"serve_{mixed}_16_clients"]["requests_per_s"]
            / results[f"merged_processes_{mixed}_16_clients"]["requests_per_s"],
            3,
        ),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
