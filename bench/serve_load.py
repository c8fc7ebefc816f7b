"""Load test of ``adapterkit serve``: N concurrent clients over K adapters vs the same requests one at a time.

Starts the server on 127.0.0.1 (a free port) over the default base. Each request names one of K
saved adapters, has a prompt of mixed length (short, medium or long few-shot) and asks for
--max-tokens greedy tokens, streamed so that the time to first token is seen. The same request
list is sent one at a time, then from N client threads; rounds alternate (bench/harness.py) so
drift hits both alike. Prints throughput, p50/p95 end-to-end latency and time to first token of
each mode, and the ratios: concurrent / one-at-a-time throughput, and p95 time to first token
under load / a lone request's p50 end-to-end latency. Last, a floor under that p95 that no
scheduler beats on this machine: the prefill the burst of the first N requests needs.

With --on-disk N, N small LoRA adapters are written to disk and the server keeps at most
--max-loaded of them resident (LRU), so most requests find their adapter cold.

Full-size figures (on a quiet machine):

    flock /tmp/adapterkit-heavy.lock .venv/bin/python bench/serve_load.py --clients 32 --adapters-count 8 --requests 64 --max-tokens 32
    flock /tmp/adapterkit-heavy.lock .venv/bin/python bench/serve_load.py --clients 32 --on-disk 1000 --max-loaded 16 --requests 64 --max-tokens 32
"""

import argparse
import concurrent.futures
import json
import random
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from harness import median, percentile, time_interleaved

import adapterkit as ak

PHRASES = ["Save and continue editing", "This field is required.", "Enter a valid email address.", "Delete selected items",
           "Change password", "The password is too similar to the username.", "Log out", "Add another item"]


def prompts(count: int, chooser: random.Random) -> list[str]:
    """Short (one line), medium (4 examples) and long (16 examples) few-shot prompts, mixed."""
    examples = [f"English: {p}\nGerman: {p}\n" for p in PHRASES]
    made = []
    for _ in range(count):
        shots = chooser.choice([0, 4, 16])
        made.append("".join(chooser.choice(examples) for _ in range(shots)) + f"English: {chooser.choice(PHRASES)}\nGerman:")
    return made


def write_adapters(model: ak.AdapterModel, folder: Path, names: list[str], small: bool) -> None:
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        config = ak.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]) if small else ak.BottleneckConfig(bottleneck_size=64, init="bert")
        model.add_adapter(name, config)
        if small:  # LoRA's B starts at zero: make each adapter change the answers
            with torch.no_grad():
                for parameter in model.adapter_layers[name].parameters():
                    parameter.normal_(0, 0.02)
        model.save_adapter(name, folder / name)
        model.delete_adapter(name)


def start_server(base, tokenizer, folder: Path, names: list[str], args) -> str:
    import uvicorn

    from adapterkit.serve import ServeConfig, Server, create_app

    model = ak.AdapterModel(base).eval()
    write_adapters(model, folder, names, small=bool(args.on_disk))
    limits = ServeConfig(max_batch_size=args.max_batch_size, max_loaded_adapters=args.max_loaded,
                         max_queue=max(64, args.requests), max_prefill_tokens=args.max_prefill_tokens)
    server = Server(model, tokenizer, folder, "smollm2-135m", config=limits)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    runner = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning"))
    threading.Thread(target=runner.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not runner.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


def send(client: httpx.Client, url: str, request: dict) -> tuple[float, float, int]:
    """(end-to-end seconds, seconds to the first text, completion tokens) of one streamed request."""
    start = time.perf_counter()
    first, tokens = None, 0
    with client.stream("POST", f"{url}/v1/completions", json=request | {"stream": True}, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event["choices"][0]["text"] and first is None:
                first = time.perf_counter()
            tokens = event.get("usage", {}).get("completion_tokens", tokens)
    end = time.perf_counter()
    return end - start, (first or end) - start, tokens


def send_all(client: httpx.Client, url: str, requests: list[dict], clients: int) -> list[tuple[float, float, int]]:
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda request: send(client, url, request), requests))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--adapters-count", type=int, default=8)
    parser.add_argument("--on-disk", type=int, default=0, help="write this many small adapters instead; requests spread over all of them")
    parser.add_argument("--max-loaded", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-prefill-tokens", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(2)
    chooser = random.Random(0)
    names = [f"ad{i:04d}" for i in range(args.on_disk or args.adapters_count)]
    texts = prompts(args.requests, chooser)
    requests = [{"model": chooser.choice(names), "prompt": t, "max_tokens": args.max_tokens, "temperature": 0} for t in texts]
    modes = {"one at a time": 1, f"{args.clients} concurrent clients": args.clients}
    results: dict[str, list] = {label: [] for label in modes}
    base, tokenizer = ak.load_base()
    with tempfile.TemporaryDirectory() as folder:
        url = start_server(base, tokenizer, Path(folder), names, args)
        with httpx.Client(limits=httpx.Limits(max_connections=args.clients + 4)) as client:
            variants = {label: (lambda label=label, n=n: results[label].append(send_all(client, url, requests, n))) for label, n in modes.items()}
            walls = time_interleaved(variants, args.rounds)  # the warm-up round also loads adapters

    kind = f"{args.on_disk} small LoRA adapters on disk, at most {args.max_loaded} resident" if args.on_disk else f"{len(names)} Houlsby adapters"
    print(f"{args.requests} requests over {kind}, {args.max_tokens} tokens each, mixed prompt lengths, "
          f"{args.rounds} alternating rounds; figures are medians over rounds")
    print(f"{'mode':<24}{'req/s':>8}{'tokens/s':>10}{'p50 e2e':>9}{'p95 e2e':>9}{'p50 TTFT':>10}{'p95 TTFT':>10}")
    summary = {}
    for label, seconds in walls.items():
        rounds = results[label][1:]  # [0] is the warm-up round's
        row = {
            "req/s": median([len(requests) / wall for wall in seconds]),
            "tokens/s": median([sum(r[2] for r in samples) / wall for wall, samples in zip(seconds, rounds)]),
            "p50 e2e": median([percentile([r[0] for r in samples], 0.5) for samples in rounds]),
            "p95 e2e": median([percentile([r[0] for r in samples], 0.95) for samples in rounds]),
            "p50 TTFT": median([percentile([r[1] for r in samples], 0.5) for samples in rounds]),
            "p95 TTFT": median([percentile([r[1] for r in samples], 0.95) for samples in rounds]),
        }
        summary[label] = row
        print(f"{label:<24}{row['req/s']:>8.2f}{row['tokens/s']:>10.1f}{row['p50 e2e']:>9.2f}{row['p95 e2e']:>9.2f}"
              f"{row['p50 TTFT']:>10.2f}{row['p95 TTFT']:>10.2f}")
    alone, loaded = summary.values()
    print(f"throughput, concurrent / one at a time: {loaded['req/s'] / alone['req/s']:.2f} (goal >= 4)")
    print(f"p95 TTFT under load / a lone request's p50 end-to-end: {loaded['p95 TTFT'] / alone['p50 e2e']:.2f} (goal <= 2)")
    lengths = [len(tokenizer(text)["input_ids"]) for text in texts]
    print_prefill_floor(lengths, [r[1] for samples in results["one at a time"][1:] for r in samples], args.clients, alone["p50 e2e"])


def print_prefill_floor(lengths: list[int], lone_ttft: list[float], clients: int, lone_e2e: float) -> None:
    """A lower bound on the p95 time to first token that no scheduler can beat on this machine.

    The first ``clients`` requests arrive together, and each needs its prompt prefilled before its
    first token. p95 is the sample of rank round(0.95 (n - 1)), so it is at least the time by
    which all but n - 1 - that rank of those requests could have their first token: the prefill
    of the shortest of their prompts, at the per-token cost that the lone requests' times to first
    token rise by with prompt length (fixed costs per forward pass left out, so the bound is low)."""
    n = len(lengths)
    above = n - 1 - round(0.95 * (n - 1))
    burst = sorted(lengths[:clients])[: max(0, min(clients, n) - above)]
    repeats = len(lone_ttft) // n
    per_token = statistics.linear_regression(lengths * repeats, lone_ttft).slope
    floor = per_token * sum(burst)
    print(f"prefill floor: the first {clients} requests arrive together; prefilling the {len(burst)} shortest of their prompts "
          f"({sum(burst)} tokens) at {1 / per_token:.0f} tokens/s (the lone requests' marginal rate) takes {floor:.2f} s, "
          f"so p95 TTFT >= {floor / lone_e2e:.2f} x a lone request on this machine")


if __name__ == "__main__":
    main()
