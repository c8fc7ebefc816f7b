"""An AdapterModel under ``transformers.Trainer`` with its default arguments: the Trainer keeps
the dataset columns the forward names (the base's), trains only the adapter, and (through
``AdapterTrainer``) checkpoints only the adapter and resumes from it."""

import inspect
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import Trainer, TrainingArguments

import adapterkit as ak
from adapterkit.data import TokenizedExample, collate, tokenize_all
from adapterkit.integrations.hf import AdapterTrainer
from conftest import tiny_llama, tiny_tokenizer

WORDS = ["cat", "dog", "house", "tree", "water", "sun", "moon", "bread", "milk", "book", "door", "car"]
GERMAN = ["Katze", "Hund", "Haus", "Baum", "Wasser", "Sonne", "Mond", "Brot", "Milch", "Buch", "Tuer", "Auto"]
EXAMPLES = [{"prompt": f"English: {w}\nGerman:", "completion": f" {g}"} for w, g in zip(WORDS, GERMAN)]


def make_model(seed: int = 0) -> ak.AdapterModel:
    torch.manual_seed(seed)
    model = ak.AdapterModel(tiny_llama())
    model.add_adapter("de", ak.BottleneckConfig(bottleneck_size=8, init="bert"))
    model.train_adapter("de")
    return model


def rows_and_collator():
    tokenizer = tiny_tokenizer()
    rows = [{"input_ids": e.input_ids, "labels": e.labels, "text": "unused"}
            for e in tokenize_all(EXAMPLES, tokenizer, 32)]

    def collator(batch):  # dicts with input_ids, attention_mask, labels
        return collate([TokenizedExample(r["input_ids"], r["labels"]) for r in batch], tokenizer.pad_token_id)

    return rows, collator


def snapshot(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}


def test_forward_shows_the_base_signature_and_adapter_names():
    model = make_model()
    names = list(inspect.signature(model.forward).parameters)
    assert names[:2] == ["input_ids", "attention_mask"]
    assert "labels" in names and "adapter_names" in names
    model.eval()
    inputs = {"input_ids": torch.tensor([[5, 6, 7]])}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, model.forward(inputs["input_ids"]).logits)


def test_trainer_with_default_arguments_trains_the_adapter(tmp_path):
    model = make_model()
    base_before = snapshot(model.base.state_dict())
    adapter_before = snapshot(model.adapter_state_dict("de"))
    rows, collator = rows_and_collator()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    Trainer(model=model, args=args, train_dataset=rows, data_collator=collator).train()
    after = model.adapter_state_dict("de")
    assert any(not torch.equal(adapter_before[k], after[k]) for k in after)
    base_after = model.base.state_dict()
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)


def train_with_checkpoints(output_dir: Path, resume: bool = False) -> ak.AdapterModel:
    model = make_model()
    rows, collator = rows_and_collator()
    args = TrainingArguments(output_dir=str(output_dir), max_steps=6, per_device_train_batch_size=4,
                             learning_rate=1e-2, save_steps=2, report_to=[], use_cpu=True)
    trainer = AdapterTrainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    trainer.train(resume_from_checkpoint=True if resume else None)
    trainer.save_model()
    return model


def test_checkpoints_hold_only_the_adapter_and_resume_bit_for_bit(tmp_path):
    whole = train_with_checkpoints(tmp_path / "whole")
    base_keys = set(whole.base.state_dict())
    adapter_bytes = sum(t.numel() * t.element_size() for t in whole.adapter_state_dict("de").values())
    folders = [tmp_path / "whole" / f"checkpoint-{n}" for n in (2, 4, 6)] + [tmp_path / "whole"]
    for folder in folders:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}, folder
        assert not (folder / "model.safetensors").exists()
        weights = list(folder.glob("*.safetensors"))
        assert sum(p.stat().st_size for p in weights) < 2 * adapter_bytes
        for path in weights:
            with safe_open(str(path), "pt") as file:
                assert not base_keys & set(file.keys()), path
    for folder in folders[:3]:
        assert {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= {p.name for p in folder.iterdir()}

    loaded = ak.AdapterModel(tiny_llama())
    assert loaded.load_adapter(tmp_path / "whole") == "de"
    final = whole.adapter_state_dict("de")
    assert all(torch.equal(final[k], v) for k, v in loaded.adapter_state_dict("de").items())

    shutil.copytree(tmp_path / "whole" / "checkpoint-4", tmp_path / "cut" / "checkpoint-4")  # stopped after step 4
    resumed = train_with_checkpoints(tmp_path / "cut", resume=True)
    after = resumed.adapter_state_dict("de")
    assert final.keys() == after.keys()
    assert all(torch.equal(final[k], after[k]) for k in final)
    checkpoint_4 = ak.AdapterModel(tiny_llama())
    checkpoint_4.load_adapter(tmp_path / "whole" / "checkpoint-4")
    assert any(not torch.equal(final[k], v) for k, v in checkpoint_4.adapter_state_dict("de").items())


def test_the_eval_mode_warning_is_said_once_and_the_trained_adapter_stays_known():
    model = make_model()
    model.eval()
    inputs = {"input_ids": torch.tensor([[5, 6, 7]])}
    with pytest.warns(UserWarning, match="trainable but in eval mode"):
        model(**inputs)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*trainable but in eval mode")
        model(**inputs)
    assert model.trained_adapter == "de"  # save_pretrained still writes it alone
