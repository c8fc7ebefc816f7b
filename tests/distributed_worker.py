"""Trains one tiny adapter per registered method that trains alone (its first case in the
conformance table, test_methods_conformance.ROWS); run by the distributed tests under torchrun
(every rank writes the adapter it ends with) and in the test process itself (the single-process
reference)."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import adapterkit as ak
from adapterkit import distributed
from adapterkit.train import TrainConfig, Trainer
from conftest import tiny_llama, tiny_tokenizer
from test_methods_conformance import distributed_configs

WORDS = ["cat", "dog", "house", "tree", "water", "sun", "moon", "bread", "milk", "book", "door", "car", "red"]
GERMAN = ["Katze", "Hund", "Haus", "Baum", "Wasser", "Sonne", "Mond", "Brot", "Milch", "Buch", "Tuer", "Auto", "rot"]
EXAMPLES = [{"prompt": f"English: {w}\nGerman:", "completion": f" {g}"} for w, g in zip(WORDS, GERMAN)]
STEPS = 8
METHODS = distributed_configs()  # every registered method that trains alone: one small case each, no dropout


def train(method: str, folder: Path, fsdp: bool = False) -> tuple[ak.AdapterModel, int]:
    """13 examples in global batches of 5 (shares of 3 and 2 rows; the last batch of an epoch has
    3), two micro-batches per step; (model, blocks sharded)."""
    model = ak.AdapterModel(tiny_llama())
    torch.manual_seed(0)
    model.add_adapter("de", METHODS[method])
    model.train_adapter("de")
    sharded = distributed.shard_base(model, "cpu") if fsdp else 0
    config = TrainConfig(steps=STEPS, batch_size=5, grad_accum=2, lr=1e-2, max_length=32, progress=False,
                         metric="none", save_every=4)
    Trainer(model, tiny_tokenizer(), EXAMPLES, config, folder, adapter_name="de").train()
    return model, sharded


if __name__ == "__main__":
    out, mode = Path(sys.argv[1]), sys.argv[2]
    distributed.start(torch.device("cpu"))
    rank = distributed.rank()
    for method in METHODS:
        model, sharded = train(method, out / method, fsdp=mode == "fsdp")
        save_file({k: v.contiguous() for k, v in model.adapter_state_dict("de").items()},
                  str(out / f"{method}.rank{rank}.safetensors"))
        shard = next(model.base.model.layers[0].parameters())  # a DTensor when sharded: this rank's rows
        rows = shard.to_local().shape[0] if sharded else shard.shape[0]
        record = {"config": model.adapters["de"].to_dict(), "sharded_blocks": sharded, "local_rows": rows,
                  "full_rows": shard.shape[0]}
        (out / f"{method}.rank{rank}.json").write_text(json.dumps(record))
    distributed.stop()
