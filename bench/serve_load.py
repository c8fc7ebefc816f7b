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
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch
from harness import median, percentile, time_interleaved

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


def send_all(client: httpx.Client, url: str, requests: list[dict], clients: int) -> tuple[list[float], int]:
    """(latencies, completion tokens) for all requests over ``clients`` threads."""
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda request: send(client, url, request), requests))
    return [latency for latency, _ in results], sum(tokens for _, tokens in results)


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
        modes = {"one at a time": 1, f"{args.clients} concurrent clients": args.clients}
        results: dict[str, list[tuple[list[float], int]]] = {label: [] for label in modes}
        with httpx.Client() as client:

            def mode(label: str, clients: int) -> Callable[[], None]:
                return lambda: results[label].append(send_all(client, url, requests, clients))

            # the warm-up round also loads every adapter the requests name
            walls = time_interleaved({label: mode(label, clients) for label, clients in modes.items()}, args.rounds)

    print(f"{args.requests} requests over {len(names)} adapters, {args.max_tokens} tokens each, "
          f"{args.rounds} alternating rounds; figures are medians over rounds")
    print(f"{'mode':<24}{'req/s':>8}{'tokens/s':>10}{'p50 s':>8}{'p95 s':>8}")
    summary = {}
    for label, seconds in walls.items():
        rounds = results[label][1:]  # [0] is the warm-up round's
        throughput = median([len(requests) / wall for wall in seconds])
        tokens = median([count / wall for wall, (_, count) in zip(seconds, rounds)])
        p50 = median([percentile(latencies, 0.5) for latencies, _ in rounds])
        p95 = median([percentile(latencies, 0.95) for latencies, _ in rounds])
        summary[label] = throughput
        print(f"{label:<24}{throughput:>8.2f}{tokens:>10.1f}{p50:>8.2f}{p95:>8.2f}")
    sequential, concurrent_ = summary.values()
    print(f"throughput, concurrent / one at a time: {concurrent_ / sequential:.2f}")


if __name__ == "__main__":
    main()
