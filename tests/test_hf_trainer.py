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
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import adapterkit as ak
from adapterkit.data import TokenizedExample, collate, tokenize_all
from adapterkit.errors import AdapterFileError, ConfigError
from adapterkit.integrations.hf import TRAINING_STATE_FILE, AdapterTrainer
from adapterkit.io import read_tensors
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


def test_load_best_model_at_end_puts_back_the_best_checkpoints_adapter(tmp_path):
    """Eval and save every 2 steps, best by eval loss (the default metric): at the end the model
    holds the adapter file of the checkpoint with the lowest eval loss, which is not the last one."""
    model = make_model()
    rows, collator = rows_and_collator()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=2, learning_rate=1e-2,
                             lr_scheduler_type="constant", eval_strategy="steps", eval_steps=2, save_steps=2,
                             load_best_model_at_end=True, report_to=[], use_cpu=True)
    trainer = AdapterTrainer(model=model, args=args, train_dataset=rows[:8], eval_dataset=rows[8:],
                             data_collator=collator)
    trainer.train()
    losses = {entry["step"]: entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry}
    assert sorted(losses) == [2, 4, 6, 8]
    best = min(losses, key=losses.get)
    assert best != 8  # these settings overshoot after step 4
    assert Path(trainer.state.best_model_checkpoint) == tmp_path / f"checkpoint-{best}"
    live = model.adapter_state_dict("de")
    best_file = load_file(tmp_path / f"checkpoint-{best}" / "adapter_model.safetensors")
    last_file = load_file(tmp_path / "checkpoint-8" / "adapter_model.safetensors")
    assert best_file.keys() == live.keys()
    assert all(torch.equal(live[k], best_file[k]) for k in live)
    assert any(not torch.equal(live[k], last_file[k]) for k in live)
    assert trainer.evaluate()["eval_loss"] == losses[best]


def adalora_model() -> ak.AdapterModel:
    """Ranks 4 -> 2 per module over 8 steps: pruning from step 2, the final ranks fixed at step 5."""
    model = ak.AdapterModel(tiny_llama())
    torch.manual_seed(0)
    model.add_adapter("ada", ak.AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj", "v_proj"], tinit=1,
                                              tfinal=3, deltaT=1, total_step=8))
    model.train_adapter("ada")
    return model


def train_adalora(output_dir: Path, resume: bool = False, batch_size: int = 4, accumulation: int = 1):
    model = adalora_model()
    rows, collator = rows_and_collator()
    args = TrainingArguments(output_dir=str(output_dir), max_steps=8, per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, learning_rate=1e-2, save_steps=2, report_to=[],
                             use_cpu=True)
    trainer = AdapterTrainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*without rank allocation.*")  # model.step() was not called
        trainer.train(resume_from_checkpoint=True if resume else None)
    return model


def test_adalora_allocates_its_ranks_under_adapter_trainer_and_its_checkpoints_resume_bit_for_bit(tmp_path):
    """No callback: the rank budget ends at target_r per module. Resuming before the final ranks
    are fixed (importance averages, masks) or after (pruned triplets) ends bit for bit as one run,
    and the finished adapter goes back to an earlier checkpoint (as load_best_model_at_end does)
    with that checkpoint's tensors and no rank pattern yet."""
    whole = train_adalora(tmp_path / "whole")
    config = whole.adapters["ada"]
    assert config.rank_pattern is not None
    assert sum(whole.adapter_ranks("ada").values()) == 2 * 4  # target_r x 4 modules, from 4 x 4
    final = snapshot(whole.adapter_state_dict("ada"))
    for step in (4, 6):
        folder = tmp_path / "whole" / f"checkpoint-{step}"
        assert (folder / TRAINING_STATE_FILE).exists()
        shutil.copytree(folder, tmp_path / f"cut-{step}" / folder.name)
        resumed = train_adalora(tmp_path / f"cut-{step}", resume=True)
        assert resumed.adapters["ada"] == config
        after = resumed.adapter_state_dict("ada")
        assert all(torch.equal(final[k], after[k]) for k in final), step
    kept = load_file(tmp_path / "whole" / "checkpoint-6" / "adapter_model.safetensors")  # only the kept triplets
    assert kept["model.layers.0.self_attn.q_proj.adapter.lora_E"].shape[0] == sum(
        config.rank_pattern["model.layers.0.self_attn.q_proj"])

    earlier = tmp_path / "whole" / "checkpoint-4"
    whole.load_adapter_weights(earlier, "ada", read_tensors(earlier / TRAINING_STATE_FILE))
    assert whole.adapters["ada"].rank_pattern is None
    saved = load_file(earlier / "adapter_model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in whole.adapter_state_dict("ada").items())


def test_adalora_penalty_counts_once_per_optimizer_step_whatever_the_accumulation(tmp_path):
    """Batches of 4 in one pass or in two micro-batches of 2 give the same adapter and ranks, up to
    float32 rounding of sums taken in another order (1e-8 here); adding the orthogonality penalty
    on every micro-batch would double it in the second run (a difference of 3e-4)."""
    one = train_adalora(tmp_path / "one")
    two = train_adalora(tmp_path / "two", batch_size=2, accumulation=2)
    assert one.adapters["ada"] == two.adapters["ada"]
    a, b = one.adapter_state_dict("ada"), two.adapter_state_dict("ada")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def test_resuming_adalora_from_a_checkpoint_without_its_rank_allocation_state_is_refused(tmp_path):
    """save_only_model=True leaves the method's state out with the optimizer's: an AdaLoRA run
    cannot go on exactly from such a checkpoint, and says so rather than train a different adapter."""
    model = adalora_model()
    rows, collator = rows_and_collator()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4, save_steps=2,
                             save_only_model=True, report_to=[], use_cpu=True)
    AdapterTrainer(model=model, args=args, train_dataset=rows, data_collator=collator).train()
    assert not (tmp_path / "checkpoint-4" / TRAINING_STATE_FILE).exists()
    before = snapshot(adalora_model().adapter_state_dict("ada"))
    fresh = adalora_model()
    trainer = AdapterTrainer(model=fresh, args=args, train_dataset=rows, data_collator=collator)
    with pytest.raises(AdapterFileError, match="save_only_model"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert all(torch.equal(before[k], v) for k, v in fresh.adapter_state_dict("ada").items())


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


def test_the_trainers_gradient_checkpointing_is_the_adapter_models(tmp_path):
    """TrainingArguments(activation_checkpointing=True) (gradient_checkpointing, TRL's default) goes
    through AdapterModel's checkpointing: the same adapter as without it (to float32 rounding of the
    recomputation), and the reentrant kind, which gives adapters in blocks with frozen inputs no
    gradients, refused."""
    rows, collator = rows_and_collator()
    adapters = []
    for checkpointing in (False, True):
        model = make_model()
        args = TrainingArguments(output_dir=str(tmp_path / str(checkpointing)), max_steps=2,
                                 per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="no", report_to=[],
                                 use_cpu=True, activation_checkpointing=checkpointing)
        AdapterTrainer(model=model, args=args, train_dataset=rows, data_collator=collator).train()
        assert model.base.is_activation_checkpointing == checkpointing
        adapters.append(model.adapter_state_dict("de"))
    assert all(torch.allclose(adapters[0][k], adapters[1][k], rtol=0, atol=1e-6) for k in adapters[0])
    args = TrainingArguments(output_dir=str(tmp_path / "reentrant"), max_steps=2, report_to=[], use_cpu=True,
                             activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ConfigError, match="reentrant"):
        AdapterTrainer(model=make_model(), args=args, train_dataset=rows, data_collator=collator).train()
