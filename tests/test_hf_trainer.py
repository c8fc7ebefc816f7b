"""An AdapterModel under ``transformers.Trainer`` with its default arguments: the Trainer keeps
the dataset columns the forward names (the base's), trains only the adapter, and (through
``AdapterTrainer``) checkpoints only the adapter and resumes from it."""

import inspect

import torch
from transformers import Trainer, TrainingArguments

import adapterkit as ak
from adapterkit.data import TokenizedExample, collate, tokenize_all
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
