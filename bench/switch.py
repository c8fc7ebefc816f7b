"""Switching and loading adapters over the default base, against reloading the base model.

- switch: ``set_active`` between two loaded adapters (and peft's ``set_adapter`` for two LoRA
  adapters, for comparison), median over batches of switches.
- load: a saved Houlsby adapter (r=64 after attention and feed-forward of all 30 layers, 4.5 M
  parameters) loaded again and again under new names, so the time of the first and the last loads
  shows whether loading slows down as more adapters are loaded.
- base: ``load_base()`` of the default base, from its cache.

    flock /tmp/adapterkit-heavy.lock .venv/bin/python bench/switch.py [--loads 60] [--base-loads 3]
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

import adapterkit as ak
from harness import median, time_interleaved


def per_switch_ms(switch, names: list[str], switches: int = 2000, rounds: int = 7) -> float:
    def switch_back_and_forth() -> None:
        for i in range(switches):
            switch(names[i % 2])

    seconds = time_interleaved({"switches": switch_back_and_forth}, rounds)["switches"]
    return median(seconds) / switches * 1000


def peft_switch_ms(base) -> float:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    twin = get_peft_model(base, config, adapter_name="first")
    twin.add_adapter("second", config)
    return per_switch_ms(twin.set_adapter, ["first", "second"], switches=50, rounds=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=60, help="adapters loaded one after another")
    parser.add_argument("--base-loads", type=int, default=3)
    parser.add_argument("--no-peft", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    base, _ = ak.load_base()
    model = ak.AdapterModel(base).eval()
    model.add_adapter("a", ak.BottleneckConfig(bottleneck_size=64, init="bert"))
    model.add_adapter("b", ak.BottleneckConfig(bottleneck_size=64, init="bert"))
    switch_ms = per_switch_ms(model.set_active, ["a", "b"])
    parameters = sum(p.numel() for p in model.adapter_layers["a"].parameters())

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "houlsby"
        model.save_adapter("a", path)
        size_mb = (path / "adapter_model.safetensors").stat().st_size / 1e6
        model.load_adapter(path, "warm-up")  # the base fingerprint is computed once per base
        load_ms = []
        for i in range(args.loads):
            start = time.perf_counter()
            model.load_adapter(path, f"copy{i}")
            load_ms.append((time.perf_counter() - start) * 1000)

    base_s = time_interleaved({"load_base": ak.load_base}, args.base_loads)["load_base"]

    first, last = median(load_ms[:10]), median(load_ms[-10:])
    base_ms = median(base_s) * 1000
    print(f"{torch.get_num_threads()} threads; Houlsby r=64 adapter: {parameters / 1e6:.2f} M parameters, "
          f"{size_mb:.1f} MB")
    print(f"switch active adapter (set_active):      {switch_ms * 1000:9.2f} us")
    if not args.no_peft:
        print(f"switch active adapter (peft set_adapter): {peft_switch_ms(ak.load_base()[0]) * 1000:8.2f} us")
    print(f"load adapter, median of loads 1-10:     {first:9.2f} ms")
    print(f"load adapter, median of loads {args.loads - 9}-{args.loads}:    {last:9.2f} ms   "
          f"(last/first {last / first:.2f})")
    print(f"reload the base model (load_base):      {base_ms:9.2f} ms   "
          f"(adapter load / base load {first / base_ms:.4f})")


if __name__ == "__main__":
    main()
