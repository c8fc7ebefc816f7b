"""Training cost against AdapterHub and peft, side by side: each library's adapter step time and
peak memory as a ratio to its own full fine-tuning, on the same base and the same batch.

AdapterHub (``adapters`` 1.3, which pins transformers 4.x) and peft run in throwaway virtual
environments of their own, never in the project's::

    python3 -m venv /tmp/hubvenv && /tmp/hubvenv/bin/pip install torch==2.13.0 'adapters==1.3.*' safetensors
    python3 -m venv /tmp/peftvenv && /tmp/peftvenv/bin/pip install torch==2.13.0 peft safetensors
    .venv/bin/python bench/peers.py --hub-python /tmp/hubvenv/bin/python --peft-python /tmp/peftvenv/bin/python

The default base is saved once as a safetensors folder that every library loads. Each (library,
variant) trains in a child process of its own: AdamW over the trainable weights, all-token loss on
a fixed random batch (8 x 128 by default), one warm-up step, then ``--steps`` timed steps (their
median) and the process's peak resident size over them (VmHWM, reset after loading: the base,
optimizer state and activations, as a user's training process holds them). The children run
round after round, alternating libraries and variants, so a machine's drift spreads over all of
them; the table gives medians over rounds. Each library computes its loss its own way (peers:
transformers' ``labels=`` loss; adapterkit: its trainer's loss).

The variants: full fine-tuning in each library; AdapterHub's Houlsby (``double_seq_bn``, reduction
factor 9: r=64; its defaults: no LayerNorm, no dropout, swish); adapterkit's Houlsby with the
lesson's full layer (LayerNorm, dropout 0.1, gelu), with AdapterHub's layer, and over the upper
20 blocks only (AdapterDrop: the backward pass stops at block 10); LoRA r=8 on q and v in peft and
in adapterkit; and adapterkit's "frozen base", one trainable scale on the embeddings' output, which
makes every block compute its input gradient and trains nothing else: the floor under any adapter
placed in every block. The run refuses to start while the machine's load average is above its
core count (busy machines make such ratios meaningless): it waits up to ``--wait`` seconds, then
exits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import resident_kib

VARIANTS = {
    "adapterkit": ["full", "frozen base", "houlsby", "houlsby, AdapterHub's layer", "houlsby, layers 10-29", "lora"],
    "AdapterHub": ["full", "houlsby"],
    "peft": ["full", "lora"],
}


# ---- children: run in the library's own environment, so they import only torch, transformers and it ----
def build(library: str, variant: str, base: str):
    """(model, loss function of the batch) for one variant, trainable weights set."""
    import torch
    from transformers import AutoModelForCausalLM

    if library == "adapterkit":
        import adapterkit as ak
        from adapterkit.loss import training_loss

        model, _ = ak.load_base(base)
        if variant == "frozen base":  # the floor: every block's input gradient, one number trained
            model.requires_grad_(False)
            model.register_parameter("scale", torch.nn.Parameter(torch.ones(())))
            model.get_input_embeddings().register_forward_hook(lambda module, args, out: out * model.scale)
        elif variant != "full":
            configs = {
                "houlsby": ak.BottleneckConfig(placement="houlsby", bottleneck_size=64),
                "houlsby, AdapterHub's layer": ak.BottleneckConfig(placement="houlsby", bottleneck_size=64,
                                                                   layer_norm=False, dropout=0.0, activation="silu"),
                "houlsby, layers 10-29": ak.BottleneckConfig(placement="houlsby", bottleneck_size=64,
                                                             layers=list(range(10, 30))),
                "lora": ak.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]),
            }
            model = ak.AdapterModel(model)
            torch.manual_seed(0)
            model.add_adapter("a", configs[variant])
            model.train_adapter("a")
        model.train()
        return model, lambda batch: training_loss(model, batch)
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    torch.manual_seed(0)
    if library == "AdapterHub" and variant == "houlsby":
        import adapters

        adapters.init(model)
        model.add_adapter("a", config=adapters.DoubleSeqBnConfig(reduction_factor=9))
        model.train_adapter("a")
    if library == "peft" and variant == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model.train()
    return model, lambda batch: model(**batch).loss


def child(library: str, variant: str, base: str, batch_file: str, steps: int) -> dict:
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(2)
    batch = load_file(batch_file)
    model, loss_of = build(library, variant, base)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: loading's own peak is not training's
    seconds = []
    for step in range(steps + 1):
        start = time.perf_counter()
        loss_of(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step warms up
            seconds.append(time.perf_counter() - start)
    return {"step": statistics.median(seconds), "peak": resident_kib("VmHWM") * 1024,
            "trainable": sum(p.numel() for p in parameters)}


# ---- the parent, in the project's environment --------------------------------------------------
def wait_for_quiet(limit: float) -> None:
    cores = os.cpu_count() or 1
    deadline = time.monotonic() + limit
    while os.getloadavg()[0] > cores:
        if time.monotonic() > deadline:
            sys.exit(f"load average {os.getloadavg()[0]:.1f} above {cores} cores for {limit:.0f} s: "
                     "ratios measured on a busy machine mean nothing; run again when it is quiet")
        print(f"load average {os.getloadavg()[0]:.1f} above {cores} cores: waiting", file=sys.stderr)
        time.sleep(15)


def prepare(folder: Path, batch: int, length: int) -> Path:
    """The default base saved where every library can load it, and the batch every variant trains on."""
    import torch
    from safetensors.torch import save_file

    import adapterkit as ak

    model, tokenizer = ak.load_base()
    model.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=generator)
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()},
              folder / "batch.safetensors")
    return folder


def run_child(python: str, library: str, variant: str, folder: Path, steps: int) -> dict:
    command = [python, __file__, "--child", library, variant, "--base", str(folder / "base"),
               "--batch-file", str(folder / "batch.safetensors"), "--steps", str(steps)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")} \
        if library == "adapterkit" else dict(os.environ)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{library} {variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def report(results: dict[tuple[str, str], list[dict]]) -> None:
    print(f"\n{'library':<12}{'variant':<30}{'trainable':>12}{'step s':>9}{'/ full':>8}{'peak MiB':>10}{'/ full':>8}")
    for library, variants in VARIANTS.items():
        if (library, "full") not in results:
            continue
        full = {key: statistics.median(run[key] for run in results[library, "full"]) for key in ("step", "peak")}
        for variant in variants:
            runs = results[library, variant]
            step, peak = (statistics.median(run[key] for run in runs) for key in ("step", "peak"))
            print(f"{library:<12}{variant:<30}{runs[0]['trainable']:>12,}{step:>9.3f}{step / full['step']:>8.3f}"
                  f"{peak / 2**20:>10.0f}{peak / full['peak']:>8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hub-python", help="python of a virtual environment with AdapterHub's adapters 1.3")
    parser.add_argument("--peft-python", help="python of a virtual environment with peft")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per child, after one warm-up step")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--wait", type=float, default=600, help="seconds to wait for a quiet machine")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--batch-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.base, args.batch_file, args.steps)))
        return
    pythons = {"adapterkit": sys.executable, "AdapterHub": args.hub_python, "peft": args.peft_python}
    pythons = {library: python for library, python in pythons.items() if python}
    wait_for_quiet(args.wait)
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = prepare(Path(tmp), args.batch, args.length)
        for round_number in range(args.rounds):
            for library, python in pythons.items():
                for variant in VARIANTS[library]:
                    wait_for_quiet(args.wait)
                    run = run_child(python, library, variant, folder, args.steps)
                    results.setdefault((library, variant), []).append(run)
                    print(f"round {round_number + 1}: {library} {variant}: {run['step']:.3f} s/step, "
                          f"peak {run['peak'] / 2**20:.0f} MiB", file=sys.stderr)
    print(f"training step on {os.cpu_count()} cores, batch {args.batch} x {args.length}, all-token loss, "
          f"medians over {args.rounds} rounds of {args.steps} steps; ratios to each library's own full fine-tuning")
    report(results)


if __name__ == "__main__":
    main()
