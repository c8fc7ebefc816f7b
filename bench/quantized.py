"""Adapters over a quantized base (QLoRA) on the default base: what 8 and 4 bits save and cost.

- memory: the resident size of the base alone, float32 / int8 / nf4, each loaded in a child
  process of its own (its RSS after loading minus before), with the peak while loading;
- training: the peak resident size of a whole training process (base, adapter, optimizer,
  activations) over a few steps of a Houlsby (r=64) and a LoRA (r=8, q/v) adapter over each base,
  each in a child process, and the peak bytes of tensors alive in one step (what the bits change;
  the resident peak also holds freed memory that glibc's malloc keeps, 100-400 MiB here, more where
  int8's loading left its heap in pieces); then the optimizer step time of all six, interleaved in one process
  by bench/harness.py;
- decode: one request's greedy decode (our generation loop) over each base, interleaved;
- quality (--quality): the demo's German recipe (examples/demo.py) trained over the float32 and
  the nf4 base, held-out chrF and training seconds of each.

    .venv/bin/python bench/quantized.py [--batch 8] [--length 128] [--repeats 5] [--quality]
    .venv/bin/python bench/quantized.py --memory-only --checkpointing   # activations small: the base's share shows
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import adapterkit as ak
from adapterkit.data import pairs_from_catalogs, split_held_out
from adapterkit.evaluate import generate_batched, score_generations
from adapterkit.train import TrainConfig, Trainer
from harness import print_table, resident_kib, time_interleaved
from training import make_step, tensor_peak

BASES = {"float32": None, "int8": "int8", "nf4": "nf4"}
ADAPTERS = {"houlsby": ak.BottleneckConfig(placement="houlsby", bottleneck_size=64),
            "lora": ak.LoraConfig(r=8, target_modules=["q_proj", "v_proj"])}


def child(args: argparse.Namespace, *extra: str) -> dict:
    command = [sys.executable, __file__, "--batch", str(args.batch), "--length", str(args.length), *extra]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])


def base_memory(quantize: str | None) -> dict:
    """In this process: resident bytes of the loaded base after one forward pass (which reads every
    weight: a float32 base's are mapped from its file until read), and the peak while loading,
    above the start."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM
    before = resident_kib("VmRSS")
    base, _ = ak.load_base(quantize=quantize)
    with torch.no_grad():
        base(torch.tensor([[1, 2, 3, 4]]))
    return {"resident": (resident_kib("VmRSS") - before) * 1024, "peak": (resident_kib("VmHWM") - before) * 1024}


def training_memory(args: argparse.Namespace, quantize: str | None, adapter: str) -> dict:
    """In this process: the peak resident bytes over ``args.steps`` training steps, the loaded base
    included (loading's own peak is the base table's), above the process's size before loading; then
    the peak bytes of tensors alive during one more step."""
    before = resident_kib("VmRSS")
    model, _, step = make_step("float32", "cpu", args.checkpointing, args.batch, args.length, ADAPTERS[adapter],
                               quantize)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM
    for _ in range(args.steps):
        step()
    return {"peak": (resident_kib("VmHWM") - before) * 1024, "tensors": tensor_peak(model, step)}


def memory_tables(args: argparse.Namespace) -> None:
    print("the base alone, resident after loading (each in its own process)")
    rows = {name: child(args, "--child-base", name) for name in BASES}
    print(f"{'base':<10}{'resident MiB':>14}{'peak loading MiB':>18}{'/ float32':>11}")
    for name, row in rows.items():
        print(f"{name:<10}{row['resident'] / 2**20:>14.0f}{row['peak'] / 2**20:>18.0f}"
              f"{row['resident'] / rows['float32']['resident']:>11.3f}")
    checkpointed = ", gradient checkpointing" if args.checkpointing else ""
    print(f"\ntraining, peak resident size of the process over {args.steps} steps, batch {args.batch} x {args.length}"
          f"{checkpointed}")
    print("(tensors: the most bytes of tensors alive at once, weights and optimizer state included; resident: the "
          "process, with the freed memory malloc keeps)")
    print(f"{'adapter':<10}{'peak':<10}" + "".join(f"{name + ' MiB':>14}" for name in BASES)
          + f"{'int8 / float32':>16}{'nf4 / float32':>15}")
    for adapter in ADAPTERS:
        flags = ["--checkpointing"] if args.checkpointing else []
        rows = {name: child(args, "--child-train", name, "--adapter", adapter, *flags) for name in BASES}
        for peak in ("tensors", "peak"):
            sizes = {name: row[peak] for name, row in rows.items()}
            print(f"{adapter:<10}{'resident' if peak == 'peak' else peak:<10}"
                  + "".join(f"{size / 2**20:>14.0f}" for size in sizes.values())
                  + f"{sizes['int8'] / sizes['float32']:>16.3f}{sizes['nf4'] / sizes['float32']:>15.3f}")


def step_table(args: argparse.Namespace) -> None:
    steps = {f"{adapter} {name}": make_step("float32", "cpu", False, args.batch, args.length, config, quantize)[2]
             for adapter, config in ADAPTERS.items() for name, quantize in BASES.items()}
    times = time_interleaved(steps, args.repeats)
    for adapter in ADAPTERS:
        print_table({k: v for k, v in times.items() if k.startswith(adapter)}, f"{adapter} float32",
                    f"\noptimizer step, batch {args.batch} x {args.length}, {adapter} adapter")


def decode_table(args: argparse.Namespace) -> None:
    prompt = "English: Please correct the errors below.\nGerman:"
    decoders = {}
    for name, quantize in BASES.items():
        base, tokenizer = ak.load_base(quantize=quantize)
        model = ak.AdapterModel(base)
        decoders[name] = (lambda m=model, t=tokenizer: generate_batched(m, t, [prompt], args.new_tokens, stop=None))
    times = time_interleaved(decoders, args.repeats)
    print_table(times, "float32", f"\none request, {args.new_tokens} new tokens, greedy (the base)")
    for name, samples in times.items():
        print(f"{name}: {args.new_tokens / sorted(samples)[len(samples) // 2]:.1f} tokens/s")


def quality(args: argparse.Namespace) -> None:
    """The demo's German recipe over the float32 and the nf4 base: held-out chrF and training time."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from demo import ADAPTER, TRAIN, django_catalogs, short_enough

    train, held_out = split_held_out(pairs_from_catalogs(django_catalogs("de"), "de"), 0.10, seed=0)
    print(f"\nthe demo's German recipe, {len(held_out)} held-out strings")
    for name in ("float32", "nf4"):
        base, tokenizer = ak.load_base(quantize=BASES[name])
        model = ak.AdapterModel(base)
        torch.manual_seed(0)
        model.add_adapter("de", ak.LoraConfig(**ADAPTER))
        model.train_adapter("de")
        with tempfile.TemporaryDirectory() as out:
            trainer = Trainer(model, tokenizer, short_enough(train, tokenizer), TrainConfig(**TRAIN, metric="none"),
                              Path(out), adapter_name="de")
            tic = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - tic
        chrf, _ = score_generations(model, tokenizer, held_out, "chrf", max_new_tokens=64)
        print(f"{name:<10} held-out chrF {chrf:.1f}, trained in {seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="steps over which peak training memory is taken")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds of the timing tables")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--quality", action="store_true", help="also train the demo's German recipe over both bases")
    parser.add_argument("--checkpointing", action="store_true",
                        help="train with gradient checkpointing in the memory table (activations shrink, the base "
                             "weighs more)")
    parser.add_argument("--memory-only", action="store_true", help="only the memory tables")
    parser.add_argument("--child-base", choices=BASES, help=argparse.SUPPRESS)
    parser.add_argument("--child-train", choices=BASES, help=argparse.SUPPRESS)
    parser.add_argument("--adapter", choices=ADAPTERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.child_base or args.child_train:
        import bitsandbytes  # noqa: F401  (every variant imports it first, so no row counts the library's own memory)
    if args.child_base:
        print(json.dumps(base_memory(BASES[args.child_base])))
        return
    if args.child_train:
        print(json.dumps(training_memory(args, BASES[args.child_train], args.adapter)))
        return
    memory_tables(args)
    if args.memory_only:
        return
    step_table(args)
    decode_table(args)
    if args.quality:
        quality(args)


if __name__ == "__main__":
    main()
