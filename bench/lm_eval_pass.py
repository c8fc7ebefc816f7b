"""lm-eval over N adapters: one mixed pass (evaluate_adapters) vs N separate runs, same requests.

The task is the 200-item multiple-choice task from Django's German catalog
(lm_eval_catalog_task.py): 800 loglikelihood requests per adapter. Both variants run lm-eval's
simple_evaluate once per adapter over the same TaskManager, so they differ only in how the
requests reach the model: each run through an engine of its own, or all adapters' requests through
one engine, rows of different adapters in the same batches. Variants run interleaved (harness.py);
prints the medians, their ratio, and checks that both variants give the same scores.

    flock /tmp/adapterkit-heavy.lock .venv/bin/python bench/lm_eval_pass.py   # 8 adapters, 200 items
    .venv/bin/python bench/lm_eval_pass.py --smoke                            # under a minute: tiny model, 2 adapters
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the task's data is a local file: nothing to download
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval  # noqa: E402
import torch  # noqa: E402

import adapterkit as ak  # noqa: E402
from adapterkit.integrations.lm_eval import AdapterkitLM, evaluate_adapters, task_manager  # noqa: E402
from harness import median, print_table, time_interleaved  # noqa: E402
from lm_eval_catalog_task import catalog_items, write_task  # noqa: E402


def randomise(model: ak.AdapterModel, name: str, seed: int) -> None:
    """Trained-looking weights (a new LoRA adapter is exactly zero, a new bottleneck nearly)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.adapter_layers[name].parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)


def adapters_over(model: ak.AdapterModel, count: int) -> list[str]:
    """``count`` adapters, LoRA r=8 on q,v and Houlsby r=64 taking turns (the served kinds)."""
    names = []
    for i in range(count):
        name = f"lora{i}" if i % 2 == 0 else f"houlsby{i}"
        config = ak.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]) if i % 2 == 0 else \
            ak.BottleneckConfig(bottleneck_size=64)
        model.add_adapter(name, config)
        randomise(model, name, i)
        names.append(name)
    return names


def tiny_base():
    """A 2-layer random Llama with the default base's tokenizer (German text tokenises as it would)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = ak.load_base()
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer


def choice_scores(results: dict, task: str) -> list[float]:
    docs = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [choice[0][0] for doc in docs for choice in doc["resps"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--items", type=int, default=200, help="multiple-choice items (4 requests each)")
    parser.add_argument("--batch-size", type=int, default=32, help="engine rows in flight, both variants")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--base", help="base model (default: the default base)")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model, 2 adapters, 8 items, 1 repeat")
    args = parser.parse_args()
    if args.smoke:
        args.adapters, args.items, args.repeats = 2, 8, 1
    torch.set_num_threads(2)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    base, tokenizer = tiny_base() if args.smoke else ak.load_base(args.base)
    model = ak.AdapterModel(base).eval()
    names = adapters_over(model, args.adapters)
    with tempfile.TemporaryDirectory() as folder:
        task = write_task(folder, catalog_items(args.items)).stem
        manager = task_manager([task], folder)
        options = dict(tasks=[task], task_manager=manager, bootstrap_iters=0)
        rows, last = args.batch_size, {}  # each variant's latest results, to compare the scores

        def separate():
            models = {name: AdapterkitLM(model, tokenizer, name, batch_size=rows) for name in names}
            last["separate"] = {name: lm_eval.simple_evaluate(model=lm, **options) for name, lm in models.items()}

        def mixed():
            last["mixed"] = evaluate_adapters(model, tokenizer, names, batch_size=rows, **options)

        samples = time_interleaved({"mixed": mixed, "separate": separate}, args.repeats)
    alone, together = last["separate"], last["mixed"]
    title = f"lm-eval, {args.adapters} adapters x {args.items} items x 4 choices, batch {args.batch_size}"
    print_table(samples, "mixed", title)
    print(f"separate / mixed: {median(samples['separate']) / median(samples['mixed']):.2f}x")
    gap = max(abs(a - b) for name in names
              for a, b in zip(choice_scores(alone[name], task), choice_scores(together[name], task), strict=True))
    same = all(alone[name]["results"][task] == together[name]["results"][task] for name in names)
    print(f"same accuracies: {same}; largest loglikelihood difference: {gap:.2e}")


if __name__ == "__main__":
    main()
