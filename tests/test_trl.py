"""TRL's SFTTrainer over an AdapterModel (``AdapterSFTTrainer``), as peft users run it: a JSONL of
prompt/completion pairs read with ``datasets``' json loader, TRL's own preparation and its
completion-only loss, adapter-only checkpoints. Offline: no hub, no telemetry."""

import json

import huggingface_hub
import pytest
import torch
from datasets import load_dataset
from safetensors import safe_open
from trl import SFTConfig

import adapterkit as ak
from adapterkit.errors import ConfigError
from adapterkit.integrations.trl import AdapterSFTTrainer
from conftest import tiny_llama, tiny_tokenizer
from test_hf_trainer import EXAMPLES, snapshot


@pytest.fixture(autouse=True)
def no_telemetry(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)


def pairs(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    return load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "datasets"))


def sft_trainer(tmp_path, model: ak.AdapterModel, **options) -> AdapterSFTTrainer:
    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                     save_steps=2, bf16=False, use_cpu=True, report_to=[], **options)
    return AdapterSFTTrainer(model=model, args=args, train_dataset=pairs(tmp_path), processing_class=tiny_tokenizer())


def lora_model(targets: list[str]) -> ak.AdapterModel:
    model = ak.AdapterModel(tiny_llama())
    torch.manual_seed(0)
    model.add_adapter("de", ak.LoraConfig(r=4, target_modules=targets))
    model.train_adapter("de")
    return model


def test_sft_trainer_trains_the_adapter_alone_and_checkpoints_only_it(tmp_path):
    model = lora_model(["q_proj", "v_proj"])
    base_before, adapter_before = snapshot(model.base.state_dict()), snapshot(model.adapter_state_dict("de"))
    trainer = sft_trainer(tmp_path, model)
    trainer.train()
    trainer.save_model()
    after = model.adapter_state_dict("de")
    assert all(not torch.equal(adapter_before[k], after[k]) for k in after if k.endswith("lora_B"))  # B starts at 0
    assert all(torch.equal(base_before[k], v) for k, v in model.base.state_dict().items())

    adapter_bytes = sum(t.numel() * t.element_size() for t in after.values())
    for folder in (tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-4", tmp_path / "run"):
        assert not (folder / "model.safetensors").exists()
        assert (folder / "adapter_model.safetensors").stat().st_size < 2 * adapter_bytes
        for path in folder.glob("*.safetensors"):
            with safe_open(str(path), "pt") as file:
                assert not set(base_before) & set(file.keys()), path
    loaded = ak.AdapterModel(tiny_llama())
    loaded.load_adapter(tmp_path / "run")
    assert all(torch.equal(after[k], v) for k, v in loaded.adapter_state_dict("de").items())


def test_sft_loss_is_the_completion_tokens_alone(tmp_path):
    """TRL's labels hide exactly the prompt; and changing what the model predicts at every prompt
    token leaves the loss bit for bit as it was, while changing one completion prediction does not."""
    tokenizer = tiny_tokenizer()
    model = lora_model(["q_proj", "v_proj"])
    trainer = sft_trainer(tmp_path, model)
    examples = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator([{key: e[key] for key in ("input_ids", "labels")} for e in examples])  # TRL's
    for ids, labels, example in zip(batch["input_ids"], batch["labels"], examples):
        prompt = len(tokenizer(example["prompt"])["input_ids"])
        completion = tokenizer(example["completion"])["input_ids"]  # TRL appended "</s>"
        assert completion[-1] == tokenizer.eos_token_id
        assert labels[:prompt].eq(-100).all()
        assert labels[prompt:prompt + len(completion)].tolist() == ids[prompt:prompt + len(completion)].tolist()
        assert labels[prompt + len(completion):].eq(-100).all()  # padding

    model.eval()
    predicts_prompt = torch.nn.functional.pad(batch["labels"][:, 1:] == -100, (0, 1), value=True)

    def loss_with_hidden_states_changed_where(where: torch.Tensor) -> torch.Tensor:
        def change(module, args, output):
            return output + 3.0 * where.unsqueeze(-1)
        handle = model.base.model.norm.register_forward_hook(change)
        try:
            with torch.no_grad():
                return trainer.compute_loss(model, dict(batch))
        finally:
            handle.remove()

    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
    assert torch.equal(loss_with_hidden_states_changed_where(predicts_prompt), loss)
    one_completion_token = torch.zeros_like(predicts_prompt)
    one_completion_token[0, (~predicts_prompt[0]).nonzero()[0]] = True
    assert not torch.equal(loss_with_hidden_states_changed_where(one_completion_token), loss)


def test_sft_trainer_refuses_an_adapter_on_the_output_embeddings(tmp_path):
    model = lora_model(["q_proj", "lm_head"])
    with pytest.raises(ConfigError, match="lm_head, the output embeddings"):
        sft_trainer(tmp_path, model)
    assert not (tmp_path / "run").exists()


def test_adalora_under_sft_trainer_allocates_ranks_and_adds_its_penalty_to_trls_loss(tmp_path):
    """TRL's loss never calls the model's forward (its fused LM head), so the penalty comes from
    the trainer: a training-mode loss is the evaluation loss plus the penalty, exactly."""
    model = ak.AdapterModel(tiny_llama())
    torch.manual_seed(0)
    model.add_adapter("ada", ak.AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj", "v_proj"], tinit=1,
                                              tfinal=1, deltaT=1, total_step=4))
    model.train_adapter("ada")
    trainer = sft_trainer(tmp_path, model)
    trainer.train()
    assert model.adapters["ada"].rank_pattern is not None
    assert sum(model.adapter_ranks("ada").values()) == 2 * 4

    batch = trainer.data_collator([{key: e[key] for key in ("input_ids", "labels")} for e in trainer.train_dataset])
    with torch.no_grad():
        model.eval()
        evaluation = trainer.compute_loss(model, dict(batch))
        model.train()
        penalty = model.regularization_loss()
        assert penalty > 0
        assert torch.equal(trainer.compute_loss(model, dict(batch)), evaluation + penalty)
