"""Load test of ``adapterkit serve``: N concurrent clients over K adapters vs the same requests one at a time.

Starts the server on 127.0.0.1 (a free port) over the default base with K saved Houlsby adapters,
or uses a running one given by --url (its adapters named by --adapters). Sends a fixed list of
requests (greedy, --max-tokens each) first one at a time, then from N client threads; rounds
alternate so drift hits both alike. Prints throughput and p50/p95 latency of each and the ratios.

    flock /tmp/adapterkit-heavy.lock .venv/bin/python bench/serve_load.py [--clients 8] [--adapters-count 4] [--requests 32]
"""

import argparse
import concurrent.futures
import random
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

import adapterkit as ak

PROMPTS = [
    "English: Save and continue editing\nGerman:",
    "English: This field is required.\nGerman:",
    "English: Enter a valid email address.\nGerman:",
    "English: Delete selected items\nGerman:",
]


def start_server(folder: Path, names: list[str], max_batch_size: int, window_ms: float) -> str:
    import uvicorn

    from adapterkit.serve import Server, create_app

    base, tokenizer = ak.load_base()
    model = ak.AdapterModel(base).eval()
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        model.add_adapter(name, ak.BottleneckConfig(bottleneck_size=64, init="bert"))
        model.save_adapter(name, folder / name)
        model.delete_adapter(name)
    server = Server(model, tokenizer, folder, "smollm2-135m", max_batch_size=max_batch_size, batch_window_ms=window_ms)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    runner = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning"))
    threading.Thread(target=runner.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not runner.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


def send(client: httpx.Client, url: str, request: dict) -> tuple[float, int]:
    start = time.perf_counter()
    response = client.post(f"{url}/v1/completions", json=request, timeout=600)
    response.raise_for_status()
    return time.perf_counter() - start, response.json()["usage"]["completion_tokens"]


def run(url: str, requests: list[dict], clients: int) -> tuple[float, list[float], int]:
    """(wall seconds, latencies, completion tokens) for all requests over ``clients`` threads."""
    with httpx.Client() as client, concurrent.futures.ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        results = list(pool.map(lambda request: send(client, url, request), requests))
        wall = time.perf_counter() - start
    return wall, [latency for latency, _ in results], sum(tokens for _, tokens in results)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start one here)")
    parser.add_argument("--adapters", help="comma-separated adapter names on --url")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--adapters-count", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-window-ms", type=float, default=10.0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as folder:
        if args.url:
            url, names = args.url.rstrip("/"), args.adapters.split(",")
        else:
            names = [f"lang{i}" for i in range(args.adapters_count)]
            url = start_server(Path(folder), names, args.max_batch_size, args.batch_window_ms)
        chooser = random.Random(0)
        requests = [
            {"model": chooser.choice(names), "prompt": chooser.choice(PROMPTS), "max_tokens": args.max_tokens, "temperature": 0}
            for _ in range(args.requests)
        ]
        run(url, requests[: len(names)], 1)  # warm-up: every adapter loaded once
        results = {"one at a time": [], f"{args.clients} concurrent clients": []}
        for _ in range(args.rounds):
            for label, clients in zip(results, (1, args.clients)):
                results[label].append(run(url, requests, clients))

    print(f"{args.requests} requests over {len(names)} adapters, {args.max_tokens} tokens each, "
          f"{args.rounds} alternating rounds; figures are medians over rounds")
    print(f"{'mode':<24}{'req/s':>8}{'tokens/s':>10}{'p50 s':>8}{'p95 s':>8}")
    summary = {}
    for label, rounds in results.items():
        throughput = statistics.median(len(requests) / wall for wall, _, _ in rounds)
        tokens = statistics.median(count / wall for wall, _, count in rounds)
        p50 = statistics.median(percentile(lat, 0.5) for _, lat, _ in rounds)
        p95 = statistics.median(percentile(lat, 0.95) for _, lat, _ in rounds)
        summary[label] = throughput
        print(f"{label:<24}{throughput:>8.2f}{tokens:>10.1f}{p50:>8.2f}{p95:>8.2f}")
    sequential, concurrent_ = summary.values()
    print(f"throughput, concurrent / one at a time: {concurrent_ / sequential:.2f}")


if __name__ == "__main__":
    main()
