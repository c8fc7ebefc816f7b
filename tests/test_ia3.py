"""IA³: identity at start, peft's checkpoints both ways, merging, mixed batches, training."""

import pytest
import torch

import adapterkit as ak
from conftest import batch, logits, make_base, rows_alone, train_steps

peft = pytest.importorskip("peft")


def randomize(model, name, seed=3):
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.adapter_layers[name].parameters():
            parameter.normal_(1.0, 0.3)


def ia3_model(arch, **kwargs):
    base = make_base(arch)
    model = ak.AdapterModel(base)
    model.add_adapter("ia3", ak.IA3Config(**kwargs))
    return base, model


def test_default_sites_are_peft_defaults(arch):
    wrapped = peft.get_peft_model(make_base(arch), peft.IA3Config())
    theirs = {name.removeprefix("base_model.model."): module.is_feedforward
              for name, module in wrapped.named_modules() if hasattr(module, "ia3_l")}
    _, model = ia3_model(arch)
    ours = {site.module_name: site.reads_from is not None for site in model.adapter_sites("ia3")}
    assert ours == theirs


def test_peft_ia3_checkpoint_gives_peft_logits(arch, tmp_path):
    wrapped = peft.get_peft_model(make_base(arch), peft.IA3Config(init_ia3_weights=False)).eval()
    expected = logits(wrapped)
    wrapped.save_pretrained(tmp_path / "theirs")
    model = ak.AdapterModel(make_base(arch))
    model.load_adapter(tmp_path / "theirs")
    model.set_active("theirs")
    assert model.adapters["theirs"].method == "ia3"
    assert (expected - logits(make_base(arch))).abs().max() > 1e-4  # the vectors change the outputs
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)


def test_ia3_rows_in_a_mixed_batch_match_running_each_alone():
    base = make_base("llama")
    model = ak.AdapterModel(base).eval()
    model.add_adapter("i1", ak.IA3Config())
    model.add_adapter("i2", ak.IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    model.add_adapter("lora", ak.LoraConfig(r=2, target_modules=["v_proj", "down_proj"]))
    randomize(model, "i1", seed=1)
    randomize(model, "i2", seed=2)
    with torch.no_grad():
        model.adapter_layers["lora"]["model-layers-0-self_attn-v_proj"].lora_B.normal_(0, 0.5)
    names = ["i1", None, "i2", "lora", "i1"]
    inputs = batch(seed=4, rows=len(names))
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names).logits
    torch.testing.assert_close(mixed, rows_alone(model, inputs, names), rtol=0, atol=1e-5)


def test_ia3_trains_only_its_vectors():
    base, model = ia3_model("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model.train_adapter("ia3")
    model.train()
    # k, v outputs, down_proj inputs; 2 layers
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * (16 + 16 + 64)
    losses = train_steps(model, batch(seed=5, rows=4), steps=15, lr=5e-2)
    assert losses[-1] < losses[0]
    for key, value in base.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_invalid_ia3_configs_are_refused():
    with pytest.raises(ak.ConfigError, match="feedforward_modules needs target_modules"):
        ak.IA3Config(feedforward_modules=["down_proj"])
    with pytest.raises(ak.ConfigError, match="init_ia3_weights must be true or false"):
        ak.IA3Config(init_ia3_weights="yes")
