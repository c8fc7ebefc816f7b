"""Batched greedy generation: adapterkit's refilling loop against HF's ``generate`` in fixed batches.

Both answer the demo's 91 held-out German prompts with the bare default base, 32 prompts at a
time, grouped by prompt length, up to 64 new tokens, stopping at a newline. HF's ``generate`` runs
each batch until its last row ends; ``generate_batched`` drops finished rows and lets waiting
prompts take their places. The two run alternately in one process; the script prints the median
of each, their ratio, and how many answers agree.

    .venv/bin/python bench/generate.py [--repeats 3] [--held-out N]
"""

import argparse

import torch

import adapterkit as ak
from adapterkit.data import prompt_and_completion
from adapterkit.evaluate import generate_batched
from harness import print_table, time_interleaved
from quality import german_data

BATCH, NEW_TOKENS = 32, 64


@torch.no_grad()
def hf_generate_in_fixed_batches(model, tokenizer, prompts: list[str]) -> list[str]:
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    answers = [""] * len(prompts)
    for start in range(0, len(order), BATCH):
        rows = order[start : start + BATCH]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(rows):
            ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]) :] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=[tokenizer.eos_token_id, *newline], pad_token_id=tokenizer.pad_token_id)
        for r, i in enumerate(rows):
            answers[i] = tokenizer.decode(out[r, width:], skip_special_tokens=True).split("\n", 1)[0].strip()
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--held-out", type=int, help="answer only the first N held-out prompts")
    args = parser.parse_args()
    torch.set_num_threads(2)
    base, tokenizer = ak.load_base()
    base.eval()
    _, held_out = german_data(args.held_out, tokenizer)
    prompts = [prompt_and_completion(e, tokenizer)[0] for e in held_out]
    answers: dict[str, list[str]] = {}

    def hf_fixed_batches() -> None:
        answers["HF generate, fixed batches"] = hf_generate_in_fixed_batches(base, tokenizer, prompts)

    def batched() -> None:
        answers["generate_batched"] = generate_batched(base, tokenizer, prompts, NEW_TOKENS, BATCH)

    times = time_interleaved({"HF generate, fixed batches": hf_fixed_batches, "generate_batched": batched},
                             args.repeats)
    print_table(times, "HF generate, fixed batches",
                f"{len(prompts)} prompts, {BATCH} at a time, up to {NEW_TOKENS} new tokens")
    same = sum(a == b for a, b in zip(*answers.values()))
    print(f"identical answers: {same} of {len(prompts)}")


if __name__ == "__main__":
    main()
