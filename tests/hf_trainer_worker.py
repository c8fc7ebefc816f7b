"""Trains a bottleneck adapter and an AdaLoRA one with ``AdapterTrainer``, 6 steps of 4 rows a step;
run by test_accelerate.py under ``accelerate launch`` (two processes of 2 rows each) and in the test
process itself (one process of 4 rows). Every process writes the adapters it ends with."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import TrainingArguments

import adapterkit as ak
from adapterkit.integrations.hf import AdapterTrainer
from conftest import tiny_llama
from test_hf_trainer import adalora_model, rows_and_collator

STEPS = 6


def bottleneck_model() -> ak.AdapterModel:
    """Without dropout, whose random draws differ from process to process."""
    model = ak.AdapterModel(tiny_llama())
    torch.manual_seed(0)
    model.add_adapter("de", ak.BottleneckConfig(bottleneck_size=8, init="bert", dropout=0.0))
    model.train_adapter("de")
    return model


MODELS = {"bottleneck": ("de", bottleneck_model), "adalora": ("ada", adalora_model)}


def train(method: str, output_dir: Path, batch_size: int) -> AdapterTrainer:
    name, build = MODELS[method]
    model = build()
    rows, collator = rows_and_collator()
    args = TrainingArguments(output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=batch_size,
                             learning_rate=1e-2, save_steps=3, report_to=[], use_cpu=True)
    trainer = AdapterTrainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    trainer.train()
    return trainer


if __name__ == "__main__":
    out, batch_size = Path(sys.argv[1]), int(sys.argv[2])
    for method, (name, _) in MODELS.items():
        trainer = train(method, out / method, batch_size)
        rank, model = trainer.args.process_index, trainer.model
        save_file({k: v.contiguous() for k, v in model.adapter_state_dict(name).items()},
                  str(out / f"{method}.rank{rank}.safetensors"))
        record = {"world": trainer.args.world_size, "backend": trainer.accelerator.state.backend,
                  "config": model.adapters[name].to_dict()}
        (out / f"{method}.rank{rank}.json").write_text(json.dumps(record))
