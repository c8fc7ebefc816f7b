"""The default base on CUDA: bfloat16 training on one device, DDP on every visible device through
torchrun, and the serving load test, against the same training on this machine's CPU in float32.

Prints training tokens/s and peak GPU memory, and their ratios to the CPU run; then the output of
bench/serve_load.py against an ``adapterkit serve --device cuda --dtype bfloat16`` server. Where no
CUDA device exists it says so and exits 0.

    .venv/bin/python bench/gpu.py [--steps 300] [--batch-size 16] [--max-length 64] [--cpu-steps 10]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import adapterkit as ak
from adapterkit.train import METRICS_FILE, TrainConfig, Trainer

BENCH = Path(__file__).parent
EXAMPLES = [{"prompt": f"English: item number {i}, shelf {i % 7}\nGerman:",
             "completion": f" Artikel Nummer {i}, Regal {i % 7}"} for i in range(2000)]


def tokens_per_second(folder: Path, skip: int) -> float:
    """Training tokens per second over the steps after the first ``skip`` (warm-up)."""
    records = [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines()]
    steps = [r for r in records if "seconds" in r][skip:]
    return sum(r["tokens"] for r in steps) / sum(r["seconds"] for r in steps)


def train_here(device: str, dtype: str, steps: int, args: argparse.Namespace, folder: Path) -> tuple[float, int]:
    """(tokens/s, peak bytes on the device) of the Trainer with a Houlsby adapter."""
    base, tokenizer = ak.load_base(dtype=dtype, device=device)
    model = ak.AdapterModel(base)
    torch.manual_seed(0)
    model.add_adapter("a", ak.BottleneckConfig(placement="houlsby", bottleneck_size=64))
    config = TrainConfig(steps=steps, batch_size=args.batch_size, max_length=args.max_length, metric="none",
                         progress=False)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    Trainer(model, tokenizer, EXAMPLES, config, folder, adapter_name="a").train()
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
    return tokens_per_second(folder, skip=min(3, steps - 1)), peak


def train_ddp(args: argparse.Namespace, data: Path, folder: Path) -> float:
    devices = torch.cuda.device_count()
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={devices}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "-m", "adapterkit", "train", "--train", str(data), "-o", str(folder),
               "--device", "cuda", "--dtype", "bfloat16", "--steps", str(args.steps),
               "--batch-size", str(args.batch_size * devices), "--max-length", str(args.max_length),
               "--metric", "none", "--no-progress", "--placement", "houlsby", "--bottleneck-size", "64"]
    subprocess.run(command, check=True)
    return tokens_per_second(folder, skip=3)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_load(folder: Path) -> None:
    """bench/serve_load.py against a bfloat16 server on cuda:0 over four saved adapters."""
    base, _ = ak.load_base()
    model = ak.AdapterModel(base)
    names = [f"a{i}" for i in range(4)]
    for name in names:
        model.add_adapter(name, ak.BottleneckConfig(placement="houlsby", bottleneck_size=64))
        model.save_adapter(name, folder / name)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "adapterkit", "serve", "--adapters", str(folder),
                               "--port", str(port), "--device", "cuda", "--dtype", "bfloat16"])
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        subprocess.run([sys.executable, str(BENCH / "serve_load.py"), "--url", url, "--adapters", ",".join(names)],
                       check=True)
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16, help="per device")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--cpu-steps", type=int, default=10, help="steps of the float32 CPU reference")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"bench/gpu.py: skipped: torch {torch.__version__} sees no CUDA device here "
              f"(CUDA build: {torch.version.cuda or 'none'}); run it on a machine with one")
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "train.jsonl"
        data.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
        cpu, _ = train_here("cpu", "float32", args.cpu_steps, args, tmp / "cpu")
        gpu, peak = train_here("cuda", "bfloat16", args.steps, args, tmp / "gpu")
        ddp = train_ddp(args, data, tmp / "ddp")
        devices = torch.cuda.device_count()
        print(f"\ntraining, Houlsby r=64 on the default base, batch {args.batch_size} per device "
              f"x {args.max_length} tokens at most")
        print(f"{'run':<34}{'tokens/s':>10}{'/ cpu':>8}  peak GPU memory")
        print(f"{'cpu float32 (' + str(os.cpu_count()) + ' cores)':<34}{cpu:>10.0f}{1:>8.2f}")
        print(f"{'1 x ' + torch.cuda.get_device_name(0) + ' bf16':<34}{gpu:>10.0f}{gpu / cpu:>8.1f}  "
              f"{peak / 2**30:.2f} GiB")
        print(f"{f'DDP on {devices} device(s) bf16':<34}{ddp:>10.0f}{ddp / cpu:>8.1f}  "
              f"(per-device scaling {ddp / gpu / devices:.2f})")
        print()
        serve_load(tmp / "adapters")


if __name__ == "__main__":
    main()
