"""A local lm-eval multiple-choice task from Django's German gettext catalog: each item is an
English UI string in the demo's prompt format ("English: <text>\\nGerman:") and four German
translations from the catalog, one of them its own. Writes <name>.jsonl and <name>.yaml into a
folder that lm-eval reads with --include_path (adapterkit eval --include-path).

Distractors are other catalog translations of about the answer's length, so length alone does not
give the answer away. --exclude drops items whose prompt is in a training file, for a held-out
figure (the demo's 10% split leaves 91 such pairs).

    .venv/bin/python bench/lm_eval_catalog_task.py -o tasks/                  # 200 items, seed 0
    .venv/bin/python bench/lm_eval_catalog_task.py -o tasks/ --items 8        # a smoke-sized task
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from adapterkit.data import package_catalogs, pairs_from_catalogs, read_jsonl, write_jsonl

NAME = "django_de_choice"
CHOICES = 4
NEAREST = 12  # distractors are drawn from the translations closest in length to the answer
YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def catalog_items(count: int, seed: int = 0, exclude: list[Path] | None = None) -> list[dict]:
    """``count`` items {"prompt", "choices", "answer"} from Django's German catalogs, drawn with
    ``seed``, none of whose prompts is in the ``exclude`` JSONL files."""
    excluded = {example["prompt"] for path in exclude or [] for example in read_jsonl(path)}
    pairs = [p for p in pairs_from_catalogs(package_catalogs("django", "de"), "de") if p["prompt"] not in excluded]
    if count > len(pairs):
        raise SystemExit(f"asked for {count} items, but only {len(pairs)} catalog pairs are left")
    rng = random.Random(seed)
    translations = sorted({p["completion"].strip() for p in pairs})
    items = []
    for pair in rng.sample(pairs, count):
        answer = pair["completion"].strip()
        others = sorted((t for t in translations if t.lower() != answer.lower()),
                        key=lambda t: (abs(len(t) - len(answer)), t))
        choices = rng.sample(others[:NEAREST], CHOICES - 1)
        position = rng.randrange(CHOICES)
        choices.insert(position, answer)
        items.append({"prompt": pair["prompt"], "choices": choices, "answer": position})
    return items


def write_task(folder: str | Path, items: list[dict], name: str = NAME) -> Path:
    """<folder>/<name>.jsonl and <folder>/<name>.yaml (the data's absolute path inside); the YAML's path."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    write_jsonl(data, items)
    task = folder / f"{name}.yaml"
    task.write_text(YAML.format(name=name, data=json.dumps(str(data))), encoding="utf-8")
    return task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for the task's YAML and JSONL")
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exclude", type=Path, action="append", default=[],
                        help="training JSONL whose prompts to leave out (repeat for several)")
    parser.add_argument("--name", default=NAME, help="the task's name (what --tasks / --harness take)")
    args = parser.parse_args()
    task = write_task(args.output, catalog_items(args.items, args.seed, args.exclude), args.name)
    print(f"wrote {args.items} items: {task} (task {args.name})")


if __name__ == "__main__":
    main()
