"""Checkpoints made by peft itself on tiny random models, read by adapterkit, and the reverse."""

import json

import pytest
import torch

import adapterkit as ak
from conftest import batch, logits, make_base

peft = pytest.importorskip("peft")

TARGETS = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj"]}
ARCHS = sorted(TARGETS)


def peft_lora(arch, path, **kwargs):
    """A peft LoRA with random (non-identity) weights, saved to ``path``; returns its logits."""
    model = peft.get_peft_model(make_base(arch), peft.LoraConfig(target_modules=TARGETS[arch], init_lora_weights=False,
                                                                 **kwargs))
    model.eval()
    model.save_pretrained(path)
    return logits(model)


def peft_adalora(arch, path, steps=8):
    """A peft AdaLoRA trained through its schedule (calling update_and_allocate), saved to ``path``."""
    config = peft.AdaLoraConfig(init_r=6, target_r=3, tinit=1, tfinal=2, deltaT=1, total_step=6,
                                target_modules=TARGETS[arch])
    model = peft.get_peft_model(make_base(arch), config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for step in range(steps):
        inputs = batch(step)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(path)
    return logits(model)


def ours(arch, path, name=None):
    model = ak.AdapterModel(make_base(arch))
    name = model.load_adapter(path, name)
    model.set_active(name)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_adalora_with_rank_pattern_gives_peft_logits(arch, tmp_path):
    expected = peft_adalora(arch, tmp_path / "ada")
    document = json.loads((tmp_path / "ada" / "adapter_config.json").read_text())
    assert document["rank_pattern"]  # peft pruned some ranks
    model = ours(arch, tmp_path / "ada", name="ada")
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)
    kept = {key.removesuffix(".lora_E"): sum(keep) for key, keep in document["rank_pattern"].items()}
    assert model.adapter_ranks("ada") == kept
    assert sum(kept.values()) == 3 * len(kept)


@pytest.mark.parametrize("arch", ARCHS)
def test_our_trained_adalora_loads_in_peft_with_the_same_logits(arch, tmp_path):
    model = ak.AdapterModel(make_base(arch))
    model.add_adapter("ada", ak.AdaLoraConfig(init_r=6, target_r=3, tinit=1, tfinal=2, total_step=6,
                                              target_modules=TARGETS[arch]))
    model.train_adapter("ada")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for step in range(7):
        inputs = batch(step)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        model.step(step)
        optimizer.zero_grad()
    model.eval()
    expected = logits(model)
    model.save_adapter("ada", tmp_path / "ada", format="peft")
    loaded = peft.PeftModel.from_pretrained(make_base(arch), tmp_path / "ada").eval()
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=1e-5)
    document = json.loads((tmp_path / "ada" / "adapter_config.json").read_text())
    assert ({key.removesuffix(".lora_E"): sum(keep) for key, keep in document["rank_pattern"].items()}
            == model.adapter_ranks("ada"))


@pytest.mark.parametrize(
    "change, named",
    [
        ({"lora_bias": True}, "lora_bias=True"),
        ({"bias": "all"}, "bias='all'"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save=['lm_head']"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
        ({"alpha_pattern": {"q_proj": 4}}, "alpha_pattern"),
        ({"some_future_option": 3}, "some_future_option=3"),
    ],
)
def test_unsupported_peft_fields_are_named(change, named, tmp_path):
    peft_lora("llama", tmp_path / "a", r=2)
    config_path = tmp_path / "a" / "adapter_config.json"
    document = json.loads(config_path.read_text())
    document.update(change)
    config_path.write_text(json.dumps(document))
    with pytest.raises(ak.AdapterFileError,
                       match=f"does not reproduce: .*{named.replace('[', '.').replace(']', '.')}"):
        ours("llama", tmp_path / "a")


def test_unset_unknown_peft_fields_are_accepted(tmp_path):
    expected = peft_lora("llama", tmp_path / "a", r=2)
    config_path = tmp_path / "a" / "adapter_config.json"
    document = json.loads(config_path.read_text())
    document.update(some_future_option=None, another_one=False)
    config_path.write_text(json.dumps(document))
    torch.testing.assert_close(logits(ours("llama", tmp_path / "a")), expected, rtol=0, atol=1e-5)


def test_peft_adapter_for_another_base_is_refused_by_shape(tmp_path):
    peft_lora("llama", tmp_path / "a", r=2)
    other = make_base("llama")
    other_config = other.config
    other_config.hidden_size, other_config.head_dim = 48, 12
    wider = type(other)(other_config).eval()
    with pytest.raises(ak.ShapeMismatchError, match=r"q_proj.*has shape \(2, 32\).*needs \(2, 48\)"):
        ak.AdapterModel(wider).load_adapter(tmp_path / "a")


def test_pickled_peft_weights_are_refused(tmp_path):
    peft_lora("llama", tmp_path / "a", r=2)
    (tmp_path / "a" / "adapter_model.safetensors").rename(tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(ak.AdapterFileError, match="pickle"):
        ours("llama", tmp_path / "a")


def test_other_peft_methods_and_bottlenecks_are_refused(tmp_path):
    peft_lora("llama", tmp_path / "a", r=2)
    config_path = tmp_path / "a" / "adapter_config.json"
    document = json.loads(config_path.read_text())
    document["peft_type"] = "LOHA"
    config_path.write_text(json.dumps(document))
    with pytest.raises(ak.AdapterFileError,
                       match=r"peft LOHA adapter; adapterkit reads peft's \['ADALORA', 'IA3', 'LORA'"):
        ours("llama", tmp_path / "a")
    model = ak.AdapterModel(make_base("llama"))
    model.add_adapter("b", ak.BottleneckConfig(bottleneck_size=4))
    with pytest.raises(ak.ConfigError,
                       match=r"a bottleneck adapter has no peft format; "
                             r"peft's format holds \['adalora', 'ia3', 'lora'"):
        model.save_adapter("b", tmp_path / "b", format="peft")
    with pytest.raises(ak.ConfigError, match="format must be"):
        model.save_adapter("b", tmp_path / "b", format="pickle")


def test_a_peft_folder_is_named_after_its_folder_or_by_the_caller(tmp_path):
    peft_lora("llama", tmp_path / "my adapter", r=2)
    model = ak.AdapterModel(make_base("llama"))
    with pytest.raises(ak.AdapterNameError,
                       match="my adapter carries no adapter name and its folder name is not a valid one; pass name="):
        model.load_adapter(tmp_path / "my adapter")
    assert model.load_adapter(tmp_path / "my adapter", "mine") == "mine"
