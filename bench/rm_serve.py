"""Reward-service benchmark: requests/s and p50/p99 latency of `troupe rm serve` at 1, 8 and 32 concurrent clients,
against the server it replaced, measured in the same run on the same reward fleet.

- troupe: FastAPI on uvicorn; concurrent requests are merged into fleet batches (cluster/jobs/rm_batcher.py).
- baseline ("one lock"): the previous design, a stdlib ThreadingHTTPServer whose handlers take one global lock
  around the fleet call, so requests reach the fleet one at a time. Rebuilt here from the same parsing and scoring
  code, so only the serving differs.
Each client sends `--requests` requests of `--items` items (prompt, response, reference) back to back, from a
separate process (clients in the server's process would share its interpreter lock); the reward fleet is the demo
recipe's (correctness, format, length, repetition on one shard).
Run: .venv/bin/python -m bench.rm_serve [--requests 40] [--items 4]
Smoke: .venv/bin/python -m bench.rm_serve --smoke [--out FOLDER]: 1 and 8 clients, 3 requests each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

OVERRIDES = [
    "model.policy=builtin:tiny-llama",
    "ray.num_cpus=2",
    "serve.port=0",
    "serve.max_connections=128",
    "run.print_table=false",
]


def _config(out: Path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from troupe.cluster.config.compose import CONF_DIR
    from troupe.cluster.config.schema import register

    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="demo", overrides=[*OVERRIDES, "job=rm_serve", f"run.output_dir={out}"])
        return OmegaConf.to_object(cfg)


def one_lock_server(service) -> ThreadingHTTPServer:
    """The replaced design: one request on the fleet at a time."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            rollouts = service.parse(body)
            with lock:
                values = service.fleet.score(rollouts)
            data = json.dumps(service.results(rollouts, values)).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 128  # the stdlib's 5 resets connections at 32 clients; uvicorn's backlog is 2048

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def body(items: int, k: int) -> bytes:
    rows = [
        {
            "prompt": f"What is {k} + {i}?",
            "response": f"{k} + {i} = {k + i}. The answer is {k + i}.",
            "reference": str(k + i),
        }
        for i in range(items)
    ]
    return json.dumps({"items": rows}).encode()


def load(url: str, clients: int, requests: int, items: int) -> dict:
    """`clients` threads, each sending `requests` requests back to back; requests/s and latency percentiles."""

    def client(c: int) -> list[float]:
        latencies = []
        for r in range(requests):
            req = urllib.request.Request(url + "/score", data=body(items, c * 1000 + r))
            req.add_header("Content-Type", "application/json")
            start = time.perf_counter()
            with urllib.request.urlopen(req, timeout=600) as reply:
                answer = json.loads(reply.read())
            latencies.append(time.perf_counter() - start)
            assert len(answer["results"]) == items and "reward" in answer["results"][0], answer
        return latencies

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(x for part in pool.map(client, range(clients)) for x in part)
    wall = time.perf_counter() - start
    pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    return {
        "requests_per_s": len(latencies) / wall,
        "items_per_s": len(latencies) * items / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * pct(0.99),
        "requests": len(latencies),
    }


def load_elsewhere(url: str, clients: int, requests: int, items: int) -> dict:
    """`load` in a fresh process, so the clients do not share the server's interpreter lock."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(load, (url, clients, requests, items))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--requests", type=int, default=40, help="per client")
    parser.add_argument("--items", type=int, default=4, help="per request")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-rm-serve-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    levels, requests = ((1, 8), 3) if args.smoke else ((1, 8, 32), args.requests)

    import ray

    from troupe.cluster.jobs.rm_serve import start_service
    from troupe.cluster.run.runtime import start_ray

    cfg = _config(out)
    start_ray(cfg.ray)
    served, service = start_service(cfg)
    baseline = one_lock_server(service)
    base_url = f"http://127.0.0.1:{baseline.server_address[1]}"
    results: dict = {"items_per_request": args.items, "requests_per_client": requests, "levels": {}}
    try:
        load(served.url, 2, 2, args.items)  # warm both paths (connections, the shard's first call)
        load(base_url, 2, 2, args.items)
        for clients in levels:
            row = {"troupe": load_elsewhere(served.url, clients, requests, args.items)}
            row["one_lock"] = load_elsewhere(base_url, clients, requests, args.items)
            row["ratio_requests_per_s"] = row["troupe"]["requests_per_s"] / row["one_lock"]["requests_per_s"]
            results["levels"][str(clients)] = row
        results["batches"] = dict(service.batcher.stats)
    finally:
        baseline.shutdown()
        served.shutdown()
        service.fleet.shutdown()
        ray.shutdown()
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"reward service, {args.items} items per request, {requests} requests per client")
    print(
        "| clients | troupe req/s | p50 ms | p99 ms | one-lock req/s | p50 ms | p99 ms | troupe / one-lock |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for clients, row in results["levels"].items():
        t, b = row["troupe"], row["one_lock"]
        print(
            f"| {clients} | {t['requests_per_s']:.1f} | {t['p50_ms']:.0f} | {t['p99_ms']:.0f} | "
            f"{b['requests_per_s']:.1f} | {b['p50_ms']:.0f} | {b['p99_ms']:.0f} | {row['ratio_requests_per_s']:.2f}x |"
        )
    print(f"fleet batches: {results['batches']}")
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
