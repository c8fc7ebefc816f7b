"""Does lm-evaluation-harness score an adapter the same through ``adapterkit serve`` as in process?

Runs one multiple-choice task (by default the 200-item German catalog task of
bench/lm_eval_catalog_task.py) twice over one adapter trained by ``adapterkit train``:

1. lm-eval's ``hf`` backend with ``peft=``: the adapter exported to peft's format by
   ``adapterkit export``, loaded by peft over the base's folder;
2. lm-eval's ``local-completions`` backend against ``adapterkit serve``, with lm-eval's defaults
   (token-id prompts, the server's tokenizer endpoints, no ``tokenizer=`` argument).

Prints each run's accuracy and the largest difference between their per-choice loglikelihoods.
Nothing is downloaded: the base is the embedded default (or --base), the data are local files.

    .venv/bin/python -m adapterkit data po2jsonl --from-package django --lang de -o /tmp/de.jsonl
    .venv/bin/python -m adapterkit train --train /tmp/de.jsonl --method lora \\
        --steps 60 --batch-size 8 -o /tmp/runs/de-lora
    HF_HUB_OFFLINE=1 .venv/bin/python bench/lm_eval_agreement.py /tmp/runs/de-lora/adapter
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lm_eval_catalog_task import NAME, catalog_items, write_task

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def loglikelihoods(results: dict) -> tuple[float, list[list[float]]]:
    """(accuracy, each document's per-choice loglikelihoods, in document order)."""
    samples = sorted(results["samples"][NAME], key=lambda sample: sample["doc_id"])
    scores = [[float(response[0][0]) for response in sample["resps"]] for sample in samples]
    return results["results"][NAME]["acc,none"], scores


def evaluate(model: str, model_args: str, include: Path, batch_size: int) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[NAME], batch_size=batch_size,
                                   task_manager=TaskManager(include_path=str(include)), log_samples=True)


def start_server(base: str, adapters: Path) -> tuple[subprocess.Popen, str]:
    """``adapterkit serve`` on a free port; (the process, its address) once it listens."""
    command = [sys.executable, "-m", "adapterkit", "serve", "--base", base, "--adapters", str(adapters), "--port", "0"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    for line in server.stderr:
        found = re.search(r"at (http://\S+)/v1", line)
        if found:
            return server, found.group(1)
    raise SystemExit(f"adapterkit serve ended without listening (exit code {server.wait()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", type=Path, help="adapter folder written by adapterkit train (its run's adapter/)")
    parser.add_argument("--name", default="de", help="the adapter's name in the server")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    from adapterkit.bases import pretrained_path

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        write_task(scratch / "task", catalog_items(args.items))
        peft_dir = scratch / "peft"
        subprocess.run([sys.executable, "-m", "adapterkit", "export", str(args.adapter), "--format", "peft",
                        "-o", str(peft_dir), "--base", args.base], check=True)
        in_process = evaluate("hf",
                              f"pretrained={pretrained_path(args.base)},peft={peft_dir},dtype=float32,device=cpu",
                              scratch / "task", args.batch_size)
        (scratch / "adapters").mkdir()
        shutil.copytree(args.adapter, scratch / "adapters" / args.name)  # the server reads no links out of its folder
        server, address = start_server(args.base, scratch / "adapters")
        try:
            served = evaluate("local-completions", f"model={args.name},base_url={address}/v1/completions",
                              scratch / "task", 1)
        finally:
            server.terminate()
            server.wait()
    (accuracy_hf, hf), (accuracy_served, via_server) = loglikelihoods(in_process), loglikelihoods(served)
    worst = max(abs(a - b) for x, y in zip(hf, via_server) for a, b in zip(x, y))
    choices = sum(len(x) for x in hf)
    print(f"{args.items} items, {choices} choices, adapter {args.adapter}")
    print(f"accuracy: lm-eval hf + peft {accuracy_hf:.4f}; lm-eval local-completions through adapterkit serve "
          f"{accuracy_served:.4f}")
    print(f"largest per-choice loglikelihood difference: {worst:.2e} nats")


if __name__ == "__main__":
    main()
