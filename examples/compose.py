"""Composing adapters: two German adapters from two domains, used on a third.

Three PyPI wheels ship human German translations of their UI strings as gettext catalogs: wagtail
(a CMS admin), django-oscar (a shop) and django-allauth (sign-in and accounts). This trains one
Pfeiffer adapter per training domain (CMS, shop) over the frozen default base, then translates the
held-out domain's strings (accounts) with each way of combining them, and scores each by chrF:

- the base zero-shot, and each adapter alone;
- ``ak.Average(cms, shop)``: the mean of their changes of each layer's output;
- ``merge_adapters``: one new adapter whose parameters are the mean of theirs;
- ``ak.Fuse(cms, shop)`` (AdapterFusion): attention over their changes, trained on a little of the
  accounts data while both adapters stay frozen;
- for comparison, a new adapter trained from scratch on the same accounts pairs for the same steps.

Strings that occur in the accounts catalog are left out of the training domains.

    python examples/compose.py            # the full run (docs/composition.md has its figures)
    python examples/compose.py --quick    # a smoke run of a few minutes
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
from pathlib import Path

import torch

import adapterkit as ak
from adapterkit.data import format_prompt, pairs_from_catalogs, split_held_out, write_jsonl
from adapterkit.errors import DataError
from adapterkit.evaluate import score_generations
from adapterkit.train import TrainConfig, Trainer
from demo import MAX_NEW_TOKENS, short_enough, trainer_losses, wheel_catalogs

# domain -> (the wheel that ships its catalogs, the version docs/composition.md was measured with)
DOMAINS = {"cms": ("wagtail", "8.0.1"), "shop": ("django-oscar", "4.2.1"), "accounts": ("django-allauth", "65.22.1")}
TRAINED, HELD_OUT = ("cms", "shop"), "accounts"
LANGUAGE = "de"
TEST_FRACTION = 0.3  # of the accounts pairs, scored; the rest is the accounts training split
FEW_PAIRS = 128  # of the accounts training split: all that the fusion and the from-scratch adapter see

ADAPTER = dict(placement="pfeiffer", bottleneck_size=64, activation="gelu", dropout=0.1)
TRAIN = dict(steps=80, batch_size=8, lr=3e-3, warmup_ratio=0.1, max_length=64, seed=0)
FEW_STEPS = dict(steps=40, batch_size=8, warmup_ratio=0.1, max_length=64, seed=0)
FUSION_LR, SCRATCH_LR = 2e-4, 3e-3
QUICK = dict(steps=6, batch_size=4)
QUICK_TEST = 16
SHOWCASE = "Please confirm your new email address before you sign in."


def build_datasets(out: Path, quick: bool) -> tuple[dict[str, list[dict]], list[dict], list[dict]]:
    """(training pairs per trained domain, accounts pairs for few-shot training, accounts test pairs)."""
    pairs = {}
    for domain, (distribution, measured) in DOMAINS.items():
        found = wheel_catalogs(distribution, measured, LANGUAGE)
        pairs[domain] = pairs_from_catalogs(found, LANGUAGE)
        version = importlib.metadata.version(distribution)
        note = "" if version == measured else f" (docs/composition.md used {measured})"
        print(f"  {domain:8s} {distribution} {version}{note}: {len(found)} catalogs, "
              f"{len(pairs[domain])} unique pairs")
    held_out = {p["prompt"] for p in pairs[HELD_OUT]}
    for domain in TRAINED:
        kept = [p for p in pairs[domain] if p["prompt"] not in held_out]
        print(f"  {domain}: {len(pairs[domain]) - len(kept)} strings that the accounts catalog also has are left out")
        pairs[domain] = kept
    few, test = split_held_out(pairs[HELD_OUT], TEST_FRACTION, seed=0)
    few = few[:FEW_PAIRS]
    if quick:
        few, test = few[:32], test[:QUICK_TEST]
    for domain in TRAINED:
        write_jsonl(out / "data" / f"{domain}.jsonl", pairs[domain])
    write_jsonl(out / "data" / f"{HELD_OUT}.few.jsonl", few)
    write_jsonl(out / "data" / f"{HELD_OUT}.test.jsonl", test)
    print(f"  {HELD_OUT}: {len(few)} pairs for few-shot training, {len(test)} held out for scoring")
    return {d: pairs[d] for d in TRAINED}, few, test


def train(model: ak.AdapterModel, tokenizer, examples: list[dict], options: dict, out: Path,
          adapter: str | None) -> float:
    """Train what requires grad (``adapter``, or a fusion made trainable before); returns seconds."""
    trainer = Trainer(model, tokenizer, examples, TrainConfig(**options, metric="none"), out, adapter_name=adapter)
    tic = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - tic
    first, last, _ = trainer_losses(out / "metrics.jsonl")
    print(f"   {trainer.total_steps} steps of batch {trainer.config.batch_size}: "
          f"loss {first:.2f} -> {last:.2f} in {seconds:.0f} s")
    return seconds


def score(model: ak.AdapterModel, tokenizer, test: list[dict], label: str, rows: list) -> None:
    """chrF of the composition ``set_active`` chose (or of the bare base inside ``disabled()``)."""
    tic = time.perf_counter()
    chrf, predictions = score_generations(model, tokenizer, test, "chrf", max_new_tokens=MAX_NEW_TOKENS)
    seconds = time.perf_counter() - tic
    rows.append({"composition": label, "chrf": chrf, "score_seconds": seconds, "example": predictions[0]})
    print(f"   {label:34s} chrF {chrf:5.1f}   ({seconds:.0f} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny data and a few steps: checks that everything runs")
    parser.add_argument("--out", type=Path, default=Path("runs/compose"), help="where data, adapters and results go")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    started = time.perf_counter()
    quick = QUICK if args.quick else {}

    print("1. Data: German gettext catalogs of three wheels -> English/German pairs")
    domains, few, test = build_datasets(args.out, args.quick)

    print("\n2. The default base, frozen")
    base, tokenizer = ak.load_base("smollm2-135m")
    model = ak.AdapterModel(base)

    seconds = {}
    for domain in TRAINED:
        print(f"\n3. A German adapter for {domain} ({DOMAINS[domain][0]})")
        torch.manual_seed(0)  # one initialisation for both: parameter averaging needs a shared start
        model.add_adapter(domain, ak.BottleneckConfig(**ADAPTER))
        examples = short_enough(domains[domain], tokenizer)
        print(f"   {len(examples)} pairs of at most 64 tokens")
        seconds[domain] = train(model, tokenizer, examples, {**TRAIN, **quick}, args.out / domain, domain)

    cms, shop = TRAINED
    fuse = ak.Fuse(cms, shop, name="fusion")
    print(f"\n4. AdapterFusion over {cms} and {shop}, trained on {len(few)} {HELD_OUT} pairs "
          f"({cms} and {shop} frozen)")
    model.add_fusion(fuse)
    model.train_fusion(fuse)
    fusion_params = sum(p.numel() for p in model.adapter_layers["fusion"].parameters())
    model.print_trainable_parameters()
    seconds["fusion"] = train(model, tokenizer, few, {**FEW_STEPS, "lr": FUSION_LR, **quick}, args.out / "fusion",
                              None)
    model.save_adapter("fusion", args.out / "fusion" / "adapter")

    print(f"\n5. For comparison: a new adapter trained from scratch on the same {len(few)} {HELD_OUT} pairs")
    torch.manual_seed(0)
    model.add_adapter("scratch", ak.BottleneckConfig(**ADAPTER))
    seconds["scratch"] = train(model, tokenizer, few, {**FEW_STEPS, "lr": SCRATCH_LR, **quick}, args.out / "scratch",
                               "scratch")
    adapter_params = sum(p.numel() for p in model.adapter_layers["scratch"].parameters())

    model.merge_adapters("merged", [cms, shop], [0.5, 0.5])
    print(f"\n6. chrF on {len(test)} held-out {HELD_OUT} strings ({DOMAINS[HELD_OUT][0]})")
    rows: list[dict] = []
    with model.disabled():
        score(model, tokenizer, test, "base (zero-shot)", rows)
    for label, active in [
        (f"{cms} alone", cms),
        (f"{shop} alone", shop),
        (f"Average({cms}, {shop})", ak.Average(cms, shop)),
        (f"merge_adapters({cms}, {shop})", "merged"),
        (f"Fuse({cms}, {shop}), trained", fuse),
        (f"new adapter on the {len(few)} pairs", "scratch"),
    ]:
        model.set_active(active)
        score(model, tokenizer, test, label, rows)

    showcase(model, tokenizer, fuse)
    summary = {
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "trainable": {"adapter": adapter_params, "fusion": fusion_params},
        "test_strings": len(test), "few_shot_pairs": len(few), "rows": rows,
        "minutes": round((time.perf_counter() - started) / 60, 1),
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    print_table(rows)
    print(f"   trained: {cms} {seconds[cms]:.0f} s, {shop} {seconds[shop]:.0f} s, fusion {seconds['fusion']:.0f} s "
          f"({fusion_params:,d} parameters), from scratch {seconds['scratch']:.0f} s ({adapter_params:,d} parameters)")
    print(f"   whole demo: {summary['minutes']} minutes; results in {args.out / 'results.json'}")
    return 0


def showcase(model: ak.AdapterModel, tokenizer, fuse: ak.Fuse) -> None:
    """One batch, one row per composition: named compositions work wherever an adapter name does."""
    cms, shop = TRAINED
    model.add_composition("average", ak.Average(cms, shop))
    model.add_composition("fused", fuse)
    names = [None, cms, shop, "average", "merged", "fused"]
    print(f"\n7. One batch, each row its own composition: {SHOWCASE!r}")
    model.eval()  # mixed batches are for inference
    inputs = tokenizer([format_prompt(SHOWCASE, "German")] * len(names), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, adapter_names=names, max_new_tokens=24, do_sample=False)
    for name, row in zip(names, out):
        answer = tokenizer.decode(row[inputs["input_ids"].shape[1]:], skip_special_tokens=True).split("\n")[0].strip()
        print(f"   {name or 'base':8s} {answer}")


def print_table(rows: list[dict]) -> None:
    base = rows[0]["chrf"]
    print("\n8. Summary: chrF on the held-out domain")
    print(f"   {'composition':34s} {'chrF':>6s} {'vs base':>8s}")
    for row in rows:
        print(f"   {row['composition']:34s} {row['chrf']:6.1f} {row['chrf'] - base:+8.1f}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DataError as error:
        sys.exit(f"compose.py: error: {error}")
