"""Quality against compute on the demo's data: how far each method goes with more epochs.

Each (method, epochs) is a whole recipe of its own (warmup and cosine decay over its own length),
trained with the demo's settings (batch 8, length-bucketed, pairs of at most 64 tokens, seed 0) in a
child process, then scored by chrF of greedy answers on three sets: the held-out strings (the
demo's 10% split), the first 200 training pairs (does the adapter reproduce what it was taught?)
and 150 out-of-domain strings (other packages' catalogs; German only: examples/demo.py's
``out_of_domain_pairs``). Training seconds are the trainer's wall time on this machine: run alone.

    .venv/bin/python bench/quality_compute.py --language de --epochs 1 3 6            # every method
    .venv/bin/python bench/quality_compute.py --method "Houlsby r=64" --epochs 1 3 --plot docs/quality_compute.png

Each row is printed as it finishes and appended to ``--results`` (JSONL), so a long study can be
stopped and resumed: rows already there are not run again. The plot draws every row of the file.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import adapterkit as ak
from adapterkit.data import pairs_from_catalogs, split_held_out
from adapterkit.evaluate import score_generations
from adapterkit.train import TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from demo import (  # noqa: E402
    LANGUAGES,
    MAX_NEW_TOKENS,
    MEMORISED,
    OUT_OF_DOMAIN,
    TRAIN,
    django_catalogs,
    out_of_domain_pairs,
    short_enough,
)

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {  # name -> (adapter config, or None for full fine-tuning; learning rate)
    "Houlsby r=64": (ak.BottleneckConfig(placement="houlsby", bottleneck_size=64), 3e-3),
    "Houlsby r=128": (ak.BottleneckConfig(placement="houlsby", bottleneck_size=128), 3e-3),
    "LoRA r=16, all linear": (ak.LoraConfig(r=16, alpha=32, target_modules=ALL_LINEAR), 2e-3),
    "LoRA r=64, all linear": (ak.LoraConfig(r=64, alpha=128, target_modules=ALL_LINEAR), 1e-3),
    "full fine-tuning": (None, 5e-5),
}


def machine() -> str:
    """The CPU a row is timed on: training minutes compare only between rows of one machine."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(re.findall(r"^(model name|cpu family|model|flags)\s*:\s*(.*)$", info, re.MULTILINE))
    if not fields:
        return platform.processor() or platform.machine()
    flags = fields["flags"].split()
    vectors = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else ""
    return f"{fields['model name']} (family {fields['cpu family']}, model {fields['model']}, {vectors})"


def run_one(method: str, epochs: float, language: str) -> dict:
    """Train one recipe in this process and score it on the three sets."""
    torch.set_num_threads(2)
    base, tokenizer = ak.load_base()
    train, held_out = split_held_out(pairs_from_catalogs(django_catalogs(language), language), 0.10, seed=0)
    examples = short_enough(train, tokenizer)
    config, lr = METHODS[method]
    torch.manual_seed(0)
    if config is None:
        model, adapter = base, None
        base.requires_grad_(True)
    else:
        model, adapter = ak.AdapterModel(base), language
        model.add_adapter(adapter, config)
        model.train_adapter(adapter)
    settings = {**TRAIN, "lr": lr, "epochs": epochs}
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(model, tokenizer, examples, TrainConfig(**settings, metric="none", progress=False), folder,
                          adapter_name=adapter)
        tic = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - tic
    row = {"method": method, "epochs": epochs, "language": language, "machine": machine(), "train_seconds": seconds,
           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    sets = {"held_out": held_out, "trained": examples[:MEMORISED]}
    if language == "de":
        sets["out_of_domain"] = out_of_domain_pairs(language, OUT_OF_DOMAIN)
    for name, pairs in sets.items():
        row[name], _ = score_generations(model, tokenizer, pairs, "chrf", max_new_tokens=MAX_NEW_TOKENS)
    return row


def plot(rows: list[dict], path: Path) -> None:
    """One panel per language: held-out chrF against training minutes, one line per method (one
    colour per method; dashed for rows of a machine not recorded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    languages = list(dict.fromkeys(row["language"] for row in rows))
    figure, axes = plt.subplots(1, len(languages), figsize=(6 * len(languages), 4.5), sharey=True, squeeze=False)
    for axis, language in zip(axes[0], languages):
        ours = [row for row in rows if row["language"] == language]
        machines = {row.get("machine") for row in ours}
        for method, cpu in dict.fromkeys((row["method"], row.get("machine")) for row in ours):
            points = sorted((row["train_seconds"] / 60, row["held_out"]) for row in ours
                            if (row["method"], row.get("machine")) == (method, cpu))
            label = method if len(machines) == 1 else f"{method} ({cpu or 'an earlier machine'})"
            axis.plot(*zip(*points), marker="o", label=label, color=f"C{list(METHODS).index(method)}",
                      linestyle="-" if cpu else "--")
        axis.set_xlabel("training minutes (2 CPU cores; compare rows of one machine)")
        axis.set_title(f"{LANGUAGES[language]} UI strings, SmolLM2-135M")
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right", fontsize="small")
    axes[0][0].set_ylabel("held-out chrF")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--language", default="de", choices=["de", "fr", "es"])
    parser.add_argument("--method", action="append", choices=list(METHODS), help="default: every method")
    parser.add_argument("--epochs", type=float, nargs="+", default=[1, 3, 6])
    parser.add_argument("--results", type=Path, default=Path("docs/quality_compute.jsonl"),
                        help="the study's rows, committed so that the table and the plot can be rebuilt")
    parser.add_argument("--plot", type=Path, help="write the chart of held-out chrF against training minutes here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child[0], float(args.child[1]), args.language)))
        return
    args.results.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in args.results.read_text().splitlines()] if args.results.exists() else []
    print(f"{'method':<24}{'epochs':>7}{'train min':>10}{'held-out':>10}{'trained':>9}{'out of domain':>15}")
    for method in args.method or list(METHODS):
        for epochs in args.epochs:
            key = (method, epochs, args.language)
            row = next((r for r in done if (r["method"], r["epochs"], r["language"]) == key), None)
            if row is None:
                command = [sys.executable, __file__, "--language", args.language, "--child", method, str(epochs)]
                child = subprocess.run(command, capture_output=True, text=True, check=True)
                row = json.loads(child.stdout.splitlines()[-1])
                with args.results.open("a") as results:
                    results.write(json.dumps(row) + "\n")
                done.append(row)
            print(f"{method:<24}{epochs:>7g}{row['train_seconds'] / 60:>10.1f}{row['held_out']:>10.1f}"
                  f"{row['trained']:>9.1f}{row.get('out_of_domain', float('nan')):>15.1f}", flush=True)
    if args.plot:
        plot(done, args.plot)


if __name__ == "__main__":
    main()
