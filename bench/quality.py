"""Adapters vs full fine-tuning on the demo's German data: quality, speed, memory, size.

Every method trains on the same pairs, in the same batches, for the same number of steps, each in
its own process (so its peak memory is its own), and is scored by chrF on the same held-out
strings. Then the step-time ratio of Houlsby to full fine-tuning is measured again, interleaved in
one process on identical batches, which cancels the drift of a shared machine.

    flock /tmp/adapterkit-heavy.lock .venv/bin/python bench/quality.py       # writes docs/quality.md, docs/quality.png
    .venv/bin/python bench/quality.py --steps 4 --held-out 8 --no-write      # a smoke run
    .venv/bin/python bench/quality.py --steps 40 --only "IA3 k,v,down"       # one method's row, printed
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

import adapterkit as ak
from adapterkit.data import (
    collate,
    length_bucketed_batches,
    pairs_from_catalogs,
    split_held_out,
    tokenize_all,
    tokenize_example,
)
from adapterkit.evaluate import score_generations
from adapterkit.loss import training_loss
from adapterkit.methods import AdapterConfig
from adapterkit.train import TrainConfig, Trainer
from harness import median, time_interleaved

LANGUAGE = "de"
TRAIN_MAX_TOKENS = 64
QUERY_VALUE = ["q_proj", "v_proj"]
ALL_LAYERS = None
UPPER_LAYERS = list(range(10, 30))


def method_configs(steps: int) -> dict[str, tuple[AdapterConfig | None, float]]:
    """name -> (adapter config, or None for full fine-tuning; learning rate)."""
    return {
        "Houlsby r=64": (ak.BottleneckConfig(placement="houlsby", bottleneck_size=64), 2e-3),
        "Houlsby r=64, layers 10-29": (ak.BottleneckConfig(placement="houlsby", bottleneck_size=64,
                                                           layers=UPPER_LAYERS), 3e-3),
        "Pfeiffer r=64": (ak.BottleneckConfig(placement="pfeiffer", bottleneck_size=64), 2e-3),
        "parallel r=64": (ak.BottleneckConfig(placement="parallel", bottleneck_size=64), 2e-3),
        "LoRA r=8 q,v": (ak.LoraConfig(r=8, alpha=16, target_modules=QUERY_VALUE), 2e-3),
        "DoRA r=8 q,v": (ak.LoraConfig(r=8, alpha=16, target_modules=QUERY_VALUE, use_dora=True), 2e-3),
        "AdaLoRA 12→8 q,v": (ak.AdaLoraConfig(init_r=12, target_r=8, alpha=16, target_modules=QUERY_VALUE,
                                              tinit=steps // 10, tfinal=steps // 5, deltaT=max(1, steps // 20),
                                              total_step=steps), 2e-3),
        "IA3 k,v,down": (ak.IA3Config(), 3e-3),
        # VeRA trains two small vectors per layer over frozen random projections: its paper and peft's
        # examples use learning rates several times LoRA's
        "VeRA r=256 q,v": (ak.VeraConfig(r=256, target_modules=QUERY_VALUE), 1e-2),
        "full fine-tuning": (None, 5e-5),
    }


def german_data(held_out_limit: int | None, tokenizer) -> tuple[list[dict], list[dict]]:
    """The demo's split: 10% of the unique pairs held out (seed 0); training pairs of at most
    TRAIN_MAX_TOKENS tokens."""
    import django

    catalogs = sorted(Path(django.__file__).parent.glob(f"**/locale/{LANGUAGE}/LC_MESSAGES/*.po"))
    train, held_out = split_held_out(pairs_from_catalogs(catalogs, LANGUAGE), 0.10, seed=0)
    train = [e for e in train if len(tokenize_example(e, tokenizer, 10_000).input_ids) <= TRAIN_MAX_TOKENS]
    return train, held_out[:held_out_limit]


def run_one(name: str, steps: int, held_out_limit: int | None) -> dict:
    """Train and score one method (in this process); returns its row."""
    torch.set_num_threads(2)
    base, tokenizer = ak.load_base("smollm2-135m")
    train, held_out = german_data(held_out_limit, tokenizer)
    config_for, lr = method_configs(steps)[name]
    torch.manual_seed(0)
    if config_for is None:
        model, adapter_name = base, None
        base.requires_grad_(True)
    else:
        model, adapter_name = ak.AdapterModel(base), "de"
        model.add_adapter(adapter_name, config_for)
        model.train_adapter(adapter_name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    config = TrainConfig(steps=steps, batch_size=16, lr=lr, max_length=TRAIN_MAX_TOKENS, metric="none", progress=False)
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(model, tokenizer, train, config, folder, adapter_name=adapter_name)
        reset_peak_rss()  # loading the base has its own transient peak; measure training alone
        tic = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - tic
        peak = peak_rss_mb()
        records = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
        if adapter_name is None:
            size = trainable * 4  # the float32 weights a full fine-tune has to store
        else:
            size = sum(f.stat().st_size for f in (Path(folder) / "adapter").iterdir())
    step_seconds = [r["seconds"] for r in records if "seconds" in r][2:]  # first steps warm up
    score, _ = score_generations(model, tokenizer, held_out, "chrf", max_new_tokens=64)
    return {
        "method": name, "chrf": score, "trainable": trainable, "trainable_pct": 100 * trainable / total,
        "step_seconds": median(step_seconds), "train_seconds": train_seconds,
        "peak_rss_mb": peak, "size_bytes": size,
        "held_out": len(held_out), "train_pairs": len(train),
    }


def reset_peak_rss() -> None:
    """Linux: restart the process's peak-RSS counter (VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def interleaved_step_ratio(rounds: int) -> dict:
    """Step time (forward, backward, AdamW step) of Houlsby over all layers, Houlsby over the upper
    layers (AdapterDrop) and full fine-tuning, alternating on the same batches in one process;
    medians and the ratios to full fine-tuning."""
    import copy

    torch.set_num_threads(2)
    base, tokenizer = ak.load_base("smollm2-135m")
    train, _ = german_data(None, tokenizer)
    examples = tokenize_all(train, tokenizer, TRAIN_MAX_TOKENS)
    batches = length_bucketed_batches([len(e.input_ids) for e in examples], 16, seed=0, epoch=0)
    full = copy.deepcopy(base).requires_grad_(True).train()
    adapted = ak.AdapterModel(base)
    adapted.add_adapter("houlsby", ak.BottleneckConfig(placement="houlsby", bottleneck_size=64))
    adapted.add_adapter("houlsby_upper", ak.BottleneckConfig(placement="houlsby", bottleneck_size=64,
                                                             layers=UPPER_LAYERS))
    adapted.train()
    optimizers = {name: torch.optim.AdamW(adapted.adapter_layers[name].parameters(), lr=1e-6)
                  for name in adapted.adapters}
    optimizers["full"] = torch.optim.AdamW(full.parameters(), lr=1e-6)
    round_batches = [collate([examples[j] for j in batches[i % len(batches)]], tokenizer.pad_token_id)
                     for i in range(rounds + 1)]

    def training_step(model, optimizer) -> Callable[[], None]:
        remaining = iter(round_batches)  # called once per round (the warm-up first): round i trains on batch i

        def step() -> None:
            training_loss(model, next(remaining)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    times = time_interleaved(
        {name: training_step(full if name == "full" else adapted, optimizer)
         for name, optimizer in optimizers.items()},
        rounds,
        setup={name: partial(adapted.train_adapter, name) for name in adapted.adapters},
    )
    medians = {name: median(values) for name, values in times.items()}
    return {
        "houlsby_s": medians["houlsby"], "houlsby_upper_s": medians["houlsby_upper"], "full_s": medians["full"],
        "ratio": medians["houlsby"] / medians["full"], "upper_ratio": medians["houlsby_upper"] / medians["full"],
        "rounds": rounds,
    }


def write_report(rows: list[dict], timing: dict | None, steps: int, command: str, docs: Path, complete: bool) -> None:
    """docs/quality.md and the chart; rewritten after every method, so an interrupted run leaves
    what it measured (marked as partial)."""
    by_name = {r["method"]: r for r in rows}
    lines = [
        "# Quality: adapters vs full fine-tuning",
        "",
        f"German UI strings from Django's gettext catalogs (the demo's data): {rows[0]['train_pairs']} training pairs "
        f"(at most {TRAIN_MAX_TOKENS} tokens), {rows[0]['held_out']} held-out pairs scored by chrF (sacrebleu) "
        f"of greedy translations. Every method: SmolLM2-135M-Instruct base in float32 on CPU (2 threads), "
        f"the same {steps} steps "
        "of batch 16 (length-bucketed, seed 0), AdamW with 10% warmup and cosine decay, gradient clipping at 1.0, "
        "loss on completion tokens (the LM head runs on those positions only). "
        "Learning rate 2e-3 for adapters (3e-3 for the upper-layer Houlsby, as in the demo), 5e-5 for full "
        "fine-tuning (2e-3 would wreck a full fine-tune). Each method ran in its own process: peak memory is that "
        "process's peak RSS during training (VmHWM, reset after loading), base weights included. Seconds per step "
        "are medians over the run, on a machine shared with other jobs: compare them within this table only.",
        "",
    ]
    if not complete:
        lines += ["**Partial run**: the methods below are those measured before the run was stopped.", ""]
    lines += [
        "| method | held-out chrF | trainable params | trainable % | s/step (median) | peak RSS | on disk |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['chrf']:.1f} | {r['trainable']:,} | {r['trainable_pct']:.2f} | "
            f"{r['step_seconds']:.2f} | "
            f"{r['peak_rss_mb']:,.0f} MB | {r['size_bytes'] / 1e6:.1f} MB |"
        )
    lines.append("")
    houlsby, full = by_name.get("Houlsby r=64"), by_name.get("full fine-tuning")
    if houlsby and full:
        lines += [
            f"- Houlsby r=64 vs full fine-tuning: chrF {houlsby['chrf']:.1f} vs {full['chrf']:.1f} "
            f"({houlsby['chrf'] - full['chrf']:+.1f}) with {houlsby['trainable_pct']:.2f}% of the parameters trained.",
            f"- Peak memory, Houlsby / full fine-tuning: "
            f"{houlsby['peak_rss_mb']:,.0f} / {full['peak_rss_mb']:,.0f} MB = "
            f"**{houlsby['peak_rss_mb'] / full['peak_rss_mb']:.2f}**.",
        ]
    if timing:
        lines.append(
            f"- Step time, Houlsby / full fine-tuning, interleaved on identical batches in one process "
            f"(median of {timing['rounds']}): {timing['houlsby_s']:.2f} / {timing['full_s']:.2f} s = "
            f"**{timing['ratio']:.2f}**; "
            f"Houlsby over layers 10-29 (AdapterDrop: the backward pass stops at layer 10): "
            f"{timing['houlsby_upper_s']:.2f} / {timing['full_s']:.2f} s = **{timing['upper_ratio']:.2f}**."
        )
    lines += [
        "",
        "![chrF and step time per method](quality.png)",
        "",
        "Regenerate (each method trains in its own process; tens of minutes on 2 cores):",
        "",
        "```",
        command,
        "```",
        "",
    ]
    (docs / "quality.md").write_text("\n".join(lines), encoding="utf-8")
    plot(rows, docs / "quality.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    left.barh(names, [r["chrf"] for r in rows], color="#4c72b0")
    left.set_xlabel("held-out chrF (higher is better)")
    right.barh(names, [r["step_seconds"] for r in rows], color="#dd8452")
    right.set_xlabel("seconds per training step (lower is better)")
    for axis in (left, right):
        axis.grid(axis="x", alpha=0.3)
    left.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--held-out", type=int, help="score only the first N held-out pairs")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved timing rounds")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument("--only", action="append", help="run only this method (repeatable); prints, writes nothing")
    parser.add_argument("--method", help=argparse.SUPPRESS)  # the per-method child process
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_one(args.method, args.steps, args.held_out)))
        return 0
    docs = Path(__file__).resolve().parent.parent / "docs"
    command = "flock /tmp/adapterkit-heavy.lock .venv/bin/python bench/quality.py" + (
        "" if args.steps == 60 else f" --steps {args.steps}")
    methods = list(method_configs(args.steps))
    if args.only:
        unknown = sorted(set(args.only) - set(methods))
        if unknown:
            parser.error(f"unknown method(s) {unknown}; methods are {methods}")
        methods, args.no_write = [m for m in methods if m in args.only], True
    rows, timing = [], None
    for name in methods:
        child_command = [sys.executable, __file__, "--method", name, "--steps", str(args.steps)]
        if args.held_out:
            child_command += ["--held-out", str(args.held_out)]
        child = subprocess.run(child_command, capture_output=True, text=True)
        if child.returncode:
            print(child.stderr, file=sys.stderr)
            return child.returncode
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{name:28s} chrF {r['chrf']:5.1f}  trainable {r['trainable_pct']:6.2f}%  "
              f"{r['step_seconds']:.2f} s/step  "
              f"peak {r['peak_rss_mb']:,.0f} MB  {r['size_bytes'] / 1e6:.1f} MB", flush=True)
        if name == "full fine-tuning":
            timing = interleaved_step_ratio(args.rounds)
            print(f"interleaved step time / full FT: Houlsby {timing['ratio']:.2f}, "
                  f"Houlsby layers 10-29 {timing['upper_ratio']:.2f} "
                  f"({timing['houlsby_s']:.2f}, {timing['houlsby_upper_s']:.2f}, {timing['full_s']:.2f} s)",
                  flush=True)
        if not args.no_write:
            docs.mkdir(exist_ok=True)
            write_report(rows, timing, args.steps, command, docs, complete=len(rows) == len(methods))
    if not args.no_write:
        print(f"wrote {docs / 'quality.md'} and {docs / 'quality.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
