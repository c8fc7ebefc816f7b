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

With --arrivals poisson the load is open-loop, as serving papers measure it: requests arrive at
random (Poisson) at a given rate, whether or not earlier ones have finished, with prompts from the
demo's German catalog (Django's), each to one of the adapters (uniform, or Zipf-skewed with
--zipf S). Rates sweep from 0.25x to 3x (or --rates) the one-at-a-time capacity, measured first;
each rate runs about --duration seconds of arrivals. Per rate it prints throughput, p50/p95 time to
first token, p50/p95 time per output token and the share of requests meeting the SLO (TTFT <=
--slo-ttft and TPOT <= --slo-tpot), then the goodput: the highest rate at which 90% meet it.

With --ray the same adapters are also served by the Ray Serve application (``serve --ray``) with
--replicas replicas on a local Ray cluster, and two things are measured. Placement: the same
--requests requests (each to one of the adapters, uniform or --zipf) are sent straight to the
replicas, once placed by their model through Ray's multiplexing and once anywhere (Ray's default
routing), and the adapters the replicas read from disk are counted (their
adapterkit_adapter_loads_total): cold loads per 1,000 requests, after a warm-up pass that asks for
each adapter once. Overhead: --overhead-requests lone requests (one at a time, alternating rounds)
to the single server and through Ray's proxy, ingress and replica: p50 end-to-end latency of each,
both servers with one torch thread (Ray gives each replica one CPU).

Full-size figures (on a quiet machine):

    flock /tmp/adapterkit-heavy.lock .venv/bin/python bench/serve_load.py --clients 32 --adapters-count 8 \\
        --requests 64 --max-tokens 32
    flock /tmp/adapterkit-heavy.lock .venv/bin/python bench/serve_load.py --clients 32 --on-disk 1000 \\
        --max-loaded 16 --requests 64 --max-tokens 32
    flock /tmp/adapterkit-heavy.lock .venv/bin/python bench/serve_load.py --arrivals poisson --adapters-count 8
    flock /tmp/adapterkit-heavy.lock .venv/bin/python bench/serve_load.py --arrivals poisson --on-disk 1000 \\
        --max-loaded 16 --zipf 1.1
    flock /tmp/adapterkit-heavy.lock .venv/bin/python bench/serve_load.py --ray --replicas 2 --on-disk 16 \\
        --max-loaded 8 --requests 1000 --max-tokens 4 --clients 8
"""

import argparse
import concurrent.futures
import functools
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

import adapterkit as ak
from harness import median, percentile, time_interleaved

PHRASES = ["Save and continue editing", "This field is required.", "Enter a valid email address.",
           "Delete selected items", "Change password", "The password is too similar to the username.", "Log out",
           "Add another item"]


def prompts(count: int, chooser: random.Random) -> list[str]:
    """Short (one line), medium (4 examples) and long (16 examples) few-shot prompts, mixed."""
    examples = [f"English: {p}\nGerman: {p}\n" for p in PHRASES]
    made = []
    for _ in range(count):
        shots = chooser.choice([0, 4, 16])
        made.append("".join(chooser.choice(examples) for _ in range(shots))
                    + f"English: {chooser.choice(PHRASES)}\nGerman:")
    return made


def write_adapters(model: ak.AdapterModel, folder: Path, names: list[str], small: bool) -> None:
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        config = (ak.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]) if small
                  else ak.BottleneckConfig(bottleneck_size=64, init="bert"))
        model.add_adapter(name, config)
        if small:  # LoRA's B starts at zero: make each adapter change the answers
            with torch.no_grad():
                for parameter in model.adapter_layers[name].parameters():
                    parameter.normal_(0, 0.02)
        model.save_adapter(name, folder / name)
        model.delete_adapter(name)


def limits(args):
    from adapterkit.serve import ServeConfig

    return ServeConfig(max_batch_size=args.max_batch_size, max_loaded_adapters=args.max_loaded,
                       max_queue=max(256, args.requests), max_prefill_tokens=args.max_prefill_tokens)


def start_server(base, tokenizer, folder: Path, names: list[str], args) -> str:
    import uvicorn

    from adapterkit.serve import Server, create_app

    model = ak.AdapterModel(base).eval()
    write_adapters(model, folder, names, small=bool(args.on_disk))
    server = Server(model, tokenizer, folder, "smollm2-135m", config=limits(args))
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


def catalog_prompts(count: int, chooser: random.Random) -> list[str]:
    """Translation prompts from Django's German catalog, as the demo's adapters are asked."""
    from adapterkit.data import package_catalogs, pairs_from_catalogs

    pairs = pairs_from_catalogs(package_catalogs("django", "de"), "de")
    return [chooser.choice(pairs)["prompt"] for _ in range(count)]


def adapter_chooser(names: list[str], zipf: float, chooser: random.Random):
    """A function picking an adapter per request: uniform, or the k-th most popular with weight 1/k^zipf."""
    weights = [1.0 / (rank + 1) ** zipf for rank in range(len(names))]
    return lambda: chooser.choices(names, weights)[0]


def send_open_loop(client: httpx.Client, url: str, requests: list[dict], rate: float, seed: int) -> tuple[list, float]:
    """Send each request at its Poisson arrival time (rate per second), never waiting for earlier
    answers; ([(e2e, TTFT, tokens)], seconds from the first arrival to the last answer)."""
    gaps = random.Random(seed)
    arrivals, at = [], 0.0
    for _ in requests:
        arrivals.append(at)
        at += gaps.expovariate(rate)
    start = time.perf_counter()

    def at_its_time(index: int):
        time.sleep(max(0.0, start + arrivals[index] - time.perf_counter()))
        return send(client, url, requests[index])

    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(at_its_time, range(len(requests))))
    return results, time.perf_counter() - start


def open_loop(args, url: str, client: httpx.Client, names: list[str]) -> None:
    chooser = random.Random(0)
    pick = adapter_chooser(names, args.zipf, chooser)

    def requests(count: int) -> list[dict]:
        return [{"model": pick(), "prompt": p, "max_tokens": args.max_tokens, "temperature": 0}
                for p in catalog_prompts(count, chooser)]

    send_all(client, url, requests(4), 1)  # warm-up
    lone = send_all(client, url, requests(args.capacity_requests), 1)
    capacity = 1 / statistics.mean(r[0] for r in lone)
    kind = (f"{args.on_disk} small LoRA adapters on disk, at most {args.max_loaded} idle resident" if args.on_disk
            else f"{len(names)} Houlsby adapters")
    spread = f"Zipf {args.zipf}" if args.zipf else "uniform"
    print(f"open loop, Poisson arrivals; {kind}, {spread}; {args.max_tokens} tokens each; catalog prompts; "
          f"one-at-a-time capacity {capacity:.2f} req/s (mean e2e {1 / capacity:.2f} s over {len(lone)} requests); "
          f"SLO: TTFT <= {args.slo_ttft} s and TPOT <= {args.slo_tpot} s")
    print(f"{'rate x':>7}{'req/s in':>9}{'req/s out':>10}{'p50 TTFT':>9}{'p95 TTFT':>9}{'p50 TPOT':>9}"
          f"{'p95 TPOT':>9}{'SLO met':>8}")
    goodput = 0.0
    for multiple in args.rates:
        rate = multiple * capacity
        batch = requests(max(16, round(rate * args.duration)))
        results, wall = send_open_loop(client, url, batch, rate, seed=round(multiple * 1000))
        ttft = [r[1] for r in results]
        tpot = [(r[0] - r[1]) / max(1, r[2] - 1) for r in results]
        met = sum(t <= args.slo_ttft and p <= args.slo_tpot for t, p in zip(ttft, tpot)) / len(results)
        if met >= 0.9:
            goodput = max(goodput, multiple)
        print(f"{multiple:>7.2f}{rate:>9.2f}{len(results) / wall:>10.2f}{percentile(ttft, 0.5):>9.2f}"
              f"{percentile(ttft, 0.95):>9.2f}{percentile(tpot, 0.5):>9.3f}{percentile(tpot, 0.95):>9.3f}{met:>8.0%}")
    print(f"goodput: the highest rate with >= 90% of requests within the SLO is {goodput:.2f} x the one-at-a-time "
          f"capacity ({goodput * capacity:.2f} req/s)")


# ---- --ray: placement by Ray's multiplexing against anywhere, and the Ray path's overhead -----------
def start_ray(folder: Path, args):
    """The Ray Serve application over ``folder`` on a local Ray cluster: (its URL, a handle on its replicas)."""
    import ray
    from ray import serve

    from adapterkit.bases import default_base
    from adapterkit.serve.ray import APP_NAME, application

    ray.init(address="local", num_cpus=args.replicas, include_dashboard=False, log_to_driver=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(application(default_base(), folder, args.replicas, config=limits(args)), name=APP_NAME)
    return f"http://127.0.0.1:{port}", serve.get_deployment_handle("Replica", APP_NAME)


def send_placed(replicas, request: dict, multiplexed: bool) -> None:
    """One completions request straight to the replicas: placed by its model, or anywhere."""
    from adapterkit.serve.ray import Forwarded

    forwarded = Forwarded("POST", "/v1/completions", b"", [(b"content-type", b"application/json")],
                          json.dumps(request).encode())
    handle = replicas.options(stream=True, multiplexed_model_id=request["model"] if multiplexed else "")
    messages = list(handle.answer.remote(forwarded))
    if messages[0]["status"] != 200:
        raise RuntimeError(b"".join(m.get("body", b"") for m in messages[1:]).decode())


def adapter_loads(client: httpx.Client, url: str, replicas: int) -> float:
    """Adapters read from disk so far by all replicas, from each one's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    from adapterkit.serve.ray import REPLICA_HEADER

    found: dict[str, float] = {}
    while len(found) < replicas:
        response = client.get(f"{url}/metrics")
        families = text_string_to_metric_families(response.text)
        found[response.headers[REPLICA_HEADER]] = next(
            s.value for f in families for s in f.samples if s.name == "adapterkit_adapter_loads_total")
    return sum(found.values())


def placement(args, client: httpx.Client, url: str, replicas, names: list[str]) -> None:
    chooser = random.Random(1)
    pick = adapter_chooser(names, args.zipf, chooser)
    requests = [{"model": pick(), "prompt": text, "max_tokens": args.max_tokens, "temperature": 0}
                for text in prompts(args.requests, chooser)]
    warm_up = [{"model": name, "prompt": "English: Log out\nGerman:", "max_tokens": 1, "temperature": 0}
               for name in names]
    spread = f"Zipf {args.zipf}" if args.zipf else "uniform"
    print(f"{args.requests} requests over {len(names)} adapters ({spread}), at most {args.max_loaded} idle resident "
          f"per replica, {args.replicas} replicas, {args.clients} clients")
    print(f"{'placement':<14}{'cold loads':>11}{'per 1,000 requests':>20}")
    for label, multiplexed in (("multiplexed", True), ("anywhere", False)):
        place = functools.partial(send_placed, replicas, multiplexed=multiplexed)
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(place, warm_up))
            before = adapter_loads(client, url, args.replicas)
            list(pool.map(place, requests))
        loads = adapter_loads(client, url, args.replicas) - before
        print(f"{label:<14}{loads:>11.0f}{1000 * loads / len(requests):>20.1f}")


def overhead(args, client: httpx.Client, direct: str, through_ray: str, names: list[str]) -> None:
    chooser = random.Random(2)
    requests = [{"model": chooser.choice(names), "prompt": text, "max_tokens": args.max_tokens, "temperature": 0}
                for text in prompts(args.overhead_requests, chooser)]
    results: dict[str, list] = {"direct": [], "Ray": []}
    variants = {label: (lambda label=label, url=url: results[label].append(send_all(client, url, requests, 1)))
                for label, url in (("direct", direct), ("Ray", through_ray))}
    time_interleaved(variants, args.rounds)
    p50 = {label: median([percentile([r[0] for r in samples], 0.5) for samples in rounds[1:]])
           for label, rounds in results.items()}
    print(f"{len(requests)} lone requests, {args.max_tokens} tokens each, {args.rounds} alternating rounds: p50 "
          f"end-to-end direct {p50['direct']:.3f} s, through Ray {p50['Ray']:.3f} s: Ray / direct "
          f"{p50['Ray'] / p50['direct']:.3f}, {1000 * (p50['Ray'] - p50['direct']):+.0f} ms per request")


def ray_figures(args) -> None:
    torch.set_num_threads(1)  # as each replica has (one CPU each)
    names = [f"ad{i:04d}" for i in range(args.on_disk or args.adapters_count)]
    base, tokenizer = ak.load_base()
    with tempfile.TemporaryDirectory() as folder:
        direct = start_server(base, tokenizer, Path(folder), names, args)
        through_ray, replicas = start_ray(Path(folder), args)
        with httpx.Client(limits=httpx.Limits(max_connections=args.clients + 4), timeout=600) as client:
            placement(args, client, through_ray, replicas, names)
            overhead(args, client, direct, through_ray, names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--adapters-count", type=int, default=8)
    parser.add_argument("--on-disk", type=int, default=0,
                        help="write this many small adapters instead; requests spread over all of them")
    parser.add_argument("--max-loaded", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-prefill-tokens", type=int, default=512)
    parser.add_argument("--arrivals", choices=["closed", "poisson"], default="closed",
                        help="closed: N clients, each sending its next request when the last is answered")
    parser.add_argument("--rates", type=lambda text: [float(r) for r in text.split(",")],
                        default=[0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0], help="Poisson rates, x one-at-a-time capacity")
    parser.add_argument("--duration", type=float, default=40.0,
                        help="seconds of arrivals per rate (at least 16 requests)")
    parser.add_argument("--capacity-requests", type=int, default=12, help="lone requests measuring the capacity")
    parser.add_argument("--zipf", type=float, default=0.0, help="adapter popularity skew (0: uniform)")
    parser.add_argument("--slo-ttft", type=float, default=1.0)
    parser.add_argument("--slo-tpot", type=float, default=0.2)
    parser.add_argument("--ray", action="store_true",
                        help="also serve through Ray Serve: cold loads by placement, and the Ray path's overhead")
    parser.add_argument("--replicas", type=int, default=2, help="with --ray")
    parser.add_argument("--overhead-requests", type=int, default=16, help="with --ray: lone requests per round")
    args = parser.parse_args()
    if args.ray:
        ray_figures(args)
        return
    torch.set_num_threads(2)
    if args.arrivals == "poisson":
        names = [f"ad{i:04d}" for i in range(args.on_disk or args.adapters_count)]
        base, tokenizer = ak.load_base()
        with tempfile.TemporaryDirectory() as folder:
            url = start_server(base, tokenizer, Path(folder), names, args)
            with httpx.Client(limits=httpx.Limits(max_connections=256)) as client:
                open_loop(args, url, client, names)
        return
    chooser = random.Random(0)
    names = [f"ad{i:04d}" for i in range(args.on_disk or args.adapters_count)]
    texts = prompts(args.requests, chooser)
    requests = [{"model": chooser.choice(names), "prompt": t, "max_tokens": args.max_tokens, "temperature": 0}
                for t in texts]
    modes = {"one at a time": 1, f"{args.clients} concurrent clients": args.clients}
    results: dict[str, list] = {label: [] for label in modes}
    base, tokenizer = ak.load_base()
    with tempfile.TemporaryDirectory() as folder:
        url = start_server(base, tokenizer, Path(folder), names, args)
        with httpx.Client(limits=httpx.Limits(max_connections=args.clients + 4)) as client:
            variants = {label: (lambda label=label, n=n: results[label].append(send_all(client, url, requests, n)))
                        for label, n in modes.items()}
            walls = time_interleaved(variants, args.rounds)  # the warm-up round also loads adapters

    kind = (f"{args.on_disk} small LoRA adapters on disk, at most {args.max_loaded} resident" if args.on_disk
            else f"{len(names)} Houlsby adapters")
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
    print(f"p95 TTFT under load / a lone request's p50 end-to-end: {loaded['p95 TTFT'] / alone['p50 e2e']:.2f} "
          "(goal <= 2)")
    lengths = [len(tokenizer(text)["input_ids"]) for text in texts]
    print_prefill_floor(lengths, [r[1] for samples in results["one at a time"][1:] for r in samples], args.clients,
                        alone["p50 e2e"])


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
    print(f"prefill floor: the first {clients} requests arrive together; "
          f"prefilling the {len(burst)} shortest of their prompts "
          f"({sum(burst)} tokens) at {1 / per_token:.0f} tokens/s (the lone requests' marginal rate) "
          f"takes {floor:.2f} s, "
          f"so p95 TTFT >= {floor / lone_e2e:.2f} x a lone request on this machine")


if __name__ == "__main__":
    main()
