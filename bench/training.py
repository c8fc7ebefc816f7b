"""Training on the default base: peak memory with and without gradient checkpointing, and the
step time of a bfloat16 base against a float32 one.

Memory: each variant trains in a child process of its own (so one cannot inherit another's freed
pages). After loading, the child resets its peak resident memory (Linux /proc/self/clear_refs) and
reports the peak over the steps above its resident memory at rest, and the bytes autograd keeps
for one backward pass (the activations checkpointing drops; the weights left out), summed with
torch.autograd.graph.saved_tensors_hooks. On CUDA it reports torch.cuda.max_memory_allocated.

Step time: one optimizer step (forward, backward, AdamW) of a float32 Houlsby adapter over the
float32 base and over its bfloat16 copy, alternated in one process by bench/harness.py.

    .venv/bin/python bench/training.py [--batch 8] [--length 128] [--steps 3] [--repeats 7] [--device cpu]

``--layer-cost`` prints only the step time of the lesson's adapter layer (LayerNorm, dropout,
gelu) against AdapterHub's default layer (none of them, silu), interleaved in one process.
"""

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import adapterkit as ak
from adapterkit.data import TokenizedExample, collate
from adapterkit.loss import training_loss
from adapterkit.methods import AdapterConfig
from harness import print_table, resident_kib, time_interleaved

ADAPTER = ak.BottleneckConfig(placement="houlsby", bottleneck_size=64)


def make_step(dtype: str, device: str, checkpointing: bool, batch: int, length: int,
              adapter: AdapterConfig = ADAPTER, quantize: str | None = None):
    """A model and a function that runs one optimizer step on a fixed random batch."""
    base, _ = ak.load_base(dtype=dtype, device=device, quantize=quantize)
    model = ak.AdapterModel(base)
    torch.manual_seed(0)
    model.add_adapter("a", adapter)
    model.train_adapter("a")
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, base.config.vocab_size, (length,), generator=generator).tolist() for _ in range(batch)]
    inputs = collate([TokenizedExample(ids, ids) for ids in rows], 0)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)

    def step() -> None:
        training_loss(model, inputs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return model, inputs, step


def tensor_peak(model: torch.nn.Module, step: Callable[[], None]) -> int:
    """The most bytes of tensors alive at once during one more ``step``: the model's weights, the
    optimizer's state (two AdamW moments per trainable weight) and the peak of what the step itself
    allocates (torch's profiler). Unlike the resident size, this leaves out the freed memory that
    glibc's malloc keeps, which varies with the order of allocations, not with the bytes in use."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    alive = peak = 0
    for event in sorted(profiler.events(), key=lambda event: event.time_range.start):
        alive += event.self_cpu_memory_usage
        peak = max(peak, alive)
    tensors = list(model.parameters()) + list(model.buffers())
    weights = sum(t.numel() * t.element_size() for t in tensors)
    moments = sum(2 * t.numel() * t.element_size() for t in model.parameters() if t.requires_grad)
    return weights + moments + peak


def measure_memory(args: argparse.Namespace, checkpointing: bool) -> dict:
    """In this process: peak memory above the loaded model over ``args.steps`` steps (the first
    included: optimizer state and gradients count alike in both variants), then the bytes autograd
    saves for one backward pass, the weights (held anyway) left out."""
    model, inputs, step = make_step(args.dtype, args.device, checkpointing, args.batch, args.length)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        rest = torch.cuda.memory_allocated()
        for _ in range(args.steps):
            step()
        peak = torch.cuda.max_memory_allocated() - rest
    else:
        rest = resident_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident size
        for _ in range(args.steps):
            step()
        peak = resident_kib("VmHWM") * 1024 - rest
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        if tensor.untyped_storage().data_ptr() not in weights:
            saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        training_loss(model, inputs).backward()
    model.zero_grad(set_to_none=True)
    return {"peak_above_rest": peak, "saved_for_backward": saved}


def memory_table(args: argparse.Namespace) -> None:
    rows = {}
    for checkpointing in (False, True):
        command = [sys.executable, __file__, "--child-memory", "--batch", str(args.batch),
                   "--length", str(args.length), "--steps", str(args.steps), "--dtype", args.dtype,
                   "--device", args.device]
        if checkpointing:
            command.append("--checkpointing")
        child = subprocess.run(command, capture_output=True, text=True, check=True)
        rows["checkpointing" if checkpointing else "plain"] = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"training memory, {args.dtype} base on {args.device}, batch {args.batch} x {args.length}, Houlsby r=64, "
          f"peak over {args.steps} steps above the loaded model")
    print(f"{'variant':<16}{'peak MiB':>10}{'saved for backward MiB':>24}")
    for name, row in rows.items():
        print(f"{name:<16}{row['peak_above_rest'] / 2**20:>10.0f}{row['saved_for_backward'] / 2**20:>24.0f}")
    ratio = rows["checkpointing"]["peak_above_rest"] / max(1, rows["plain"]["peak_above_rest"])
    print(f"checkpointing / plain peak: {ratio:.3f}")


def step_time_table(args: argparse.Namespace) -> None:
    steps = {}
    for dtype in ("float32", "bfloat16"):
        _, _, steps[dtype] = make_step(dtype, args.device, False, args.batch, args.length)
    _, _, steps["float32 checkpointed"] = make_step("float32", args.device, True, args.batch, args.length)
    times = time_interleaved(steps, args.repeats)
    print_table(times, "float32",
                f"optimizer step on {args.device}, batch {args.batch} x {args.length}, Houlsby r=64 (float32 adapter)")


HUB_LAYER = ak.BottleneckConfig(placement="houlsby", bottleneck_size=64, layer_norm=False, dropout=0.0,
                                activation="silu")


def layer_cost_table(args: argparse.Namespace) -> None:
    """The lesson's adapter layer (LayerNorm, dropout 0.1, gelu) against AdapterHub's default one
    (none of them, silu), same sites and width: what the extras cost as a share of a step."""
    steps = {
        "AdapterHub's layer": make_step("float32", args.device, False, args.batch, args.length, adapter=HUB_LAYER)[2],
        "the lesson's layer": make_step("float32", args.device, False, args.batch, args.length)[2],
    }
    times = time_interleaved(steps, args.repeats)
    print_table(times, "AdapterHub's layer",
                f"optimizer step on {args.device}, batch {args.batch} x {args.length}, Houlsby r=64")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="steps over which peak memory is taken")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds of the step-time table")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="the base's dtype in the memory table")
    parser.add_argument("--layer-cost", action="store_true",
                        help="only the table of the lesson's adapter layer against AdapterHub's")
    parser.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        print(json.dumps(measure_memory(args, args.checkpointing)))
        return
    if args.layer_cost:
        layer_cost_table(args)
        return
    memory_table(args)
    print()
    step_time_table(args)


if __name__ == "__main__":
    main()
