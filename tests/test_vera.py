"""VeRA: identity at start, peft's checkpoints both ways (with and without the projections),
merging, mixed batches, training, saving, composition."""

import json

import pytest
import torch
from safetensors.torch import load_file

import adapterkit as ak
from conftest import batch, logits, make_base, tiny_tokenizer, train_steps

peft = pytest.importorskip("peft")

# widths differ: slices of the projections
TARGETS = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "down_proj"]}
ARCHS = sorted(TARGETS)


def randomize(model, name, seed=3):
    """Nonzero Λb and Λd, so that the adapter changes the outputs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.adapter_layers[name].parameters():
            parameter.normal_(0.0, 0.5)


def vera_model(arch, name="vera", **kwargs):
    base = make_base(arch)
    model = ak.AdapterModel(base)
    model.add_adapter(name, ak.VeraConfig(**{"r": 8, "target_modules": TARGETS.get(arch), **kwargs}))
    return base, model


def peft_vera(arch, path, **kwargs):
    """A peft VeRA with random nonzero Λb and Λd, saved to ``path``; returns its logits. Saved with its
    projections, they are not the seed's."""
    config = peft.VeraConfig(r=8, target_modules=TARGETS[arch], projection_prng_key=7, **kwargs)
    model = peft.get_peft_model(make_base(arch), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "vera_lambda" in name:
                parameter.normal_(0.0, 0.5)
        if config.save_projection:  # then only the saved projections give these logits, not the seed's
            model.base_model.vera_A["default"].mul_(1.5)
    model.eval()
    model.save_pretrained(path)
    return logits(model)


def test_default_sites_are_peft_defaults(arch):
    wrapped = peft.get_peft_model(make_base(arch), peft.VeraConfig(r=4))
    theirs = {name.removeprefix("base_model.model.") for name, module in wrapped.named_modules()
              if hasattr(module, "vera_lambda_b")}
    _, model = vera_model(arch, target_modules=None)
    assert {site.module_name for site in model.adapter_sites("vera")} == theirs


def test_projections_are_peft_bits_and_each_site_uses_a_slice():
    _, model = vera_model("llama", projection_prng_key=11)
    wrapped = peft.get_peft_model(make_base("llama"), peft.VeraConfig(r=8, target_modules=TARGETS["llama"],
                                                                      projection_prng_key=11))
    state = model.adapter_state_dict("vera")
    assert torch.equal(state["adapter.vera_A"], wrapped.base_model.vera_A["default"])  # [8, 64]: down_proj reads 64
    assert torch.equal(state["adapter.vera_B"], wrapped.base_model.vera_B["default"])  # [32, 8]
    assert state["adapter.vera_A"].shape == (8, 64) and state["adapter.vera_B"].shape == (32, 8)
    assert sum(key.startswith("adapter.") for key in state) == 2  # once per adapter, not per module


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_vera_checkpoint_gives_peft_logits(arch, save_projection, tmp_path):
    expected = peft_vera(arch, tmp_path / "theirs", save_projection=save_projection)
    saved = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert ("base_model.vera_A" in saved) == save_projection
    model = ak.AdapterModel(make_base(arch))
    model.load_adapter(tmp_path / "theirs")
    model.set_active("theirs")
    config = model.adapters["theirs"]
    assert config.method == "vera" and config.projection_prng_key == 7 and config.save_projection == save_projection
    assert (expected - logits(make_base(arch))).abs().max() > 1e-3
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("save_projection", [True, False])
def test_our_vera_loads_in_peft_with_the_same_logits(arch, save_projection, tmp_path):
    _, model = vera_model(arch, layers=[1], save_projection=save_projection, d_initial=0.05)
    randomize(model, "vera")
    model.set_active("vera")
    expected = logits(model)
    model.save_adapter("vera", tmp_path / "ours", format="peft")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(k for k in saved if not k.startswith("base_model.model.")) == (
        ["base_model.vera_A", "base_model.vera_B"] if save_projection else [])
    document = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert document["peft_type"] == "VERA" and document["fan_in_fan_out"] == (arch == "gpt2")
    loaded = peft.PeftModel.from_pretrained(make_base(arch), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=1e-5)


def test_peft_features_we_do_not_reproduce_are_refused_by_name(tmp_path):
    peft_vera("llama", tmp_path / "biased", bias="vera_only")
    with pytest.raises(ak.AdapterFileError, match="bias='vera_only'"):
        ak.AdapterModel(make_base("llama")).load_adapter(tmp_path / "biased")


def test_vera_trains_only_its_vectors():
    base, model = vera_model("llama", dropout=0.1)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    projections = {k: v.clone() for k, v in model.adapter_state_dict("vera").items() if k.startswith("adapter.")}
    lambdas = {k: v.clone() for k, v in model.adapter_state_dict("vera").items() if not k.startswith("adapter.")}
    model.train_adapter("vera")
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2 * ((32 + 8) + (16 + 8) + (32 + 8))  # per layer: q, v, down_proj's Λb (out) and Λd (r)
    losses = train_steps(model, batch(seed=5, rows=4), steps=15, lr=5e-2)
    assert losses[-1] < losses[0]
    after = model.adapter_state_dict("vera")
    assert all(torch.equal(after[k], v) for k, v in projections.items())
    assert all(not torch.equal(after[k], v) for k, v in lambdas.items())
    for key, value in base.state_dict().items():
        assert torch.equal(value, before[key]), key


class Killed(Exception):
    pass


def test_training_resumes_exactly_from_a_checkpoint_without_the_projections(tmp_path):
    from adapterkit.train import TrainConfig, Trainer

    examples = [{"prompt": f"word {w}:", "completion": f" {w[::-1]}"}
                for w in ("cat", "dog", "sun", "moon", "tree", "milk")]

    def run(folder, resume=False, die_at=None):
        _, model = vera_model("llama", save_projection=False, dropout=0.1)
        calls = {"n": 0}

        def die(module, args):
            calls["n"] += 1
            if calls["n"] == die_at:
                raise Killed

        model.base.register_forward_pre_hook(die)
        config = TrainConfig(steps=4, batch_size=3, lr=1e-2, max_length=32, progress=False, metric="none",
                             save_every=2)
        Trainer(model, tiny_tokenizer(), examples, config, folder, adapter_name="vera").train(resume=resume)
        return model.adapter_state_dict("vera")

    whole = run(tmp_path / "whole")
    with pytest.raises(Killed):
        run(tmp_path / "cut", die_at=3)  # in step 3, after the checkpoint of step 2
    resumed = run(tmp_path / "cut", resume=True)
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)


@pytest.mark.parametrize("save_projection", [True, False])
def test_our_format_saves_and_loads(save_projection, tmp_path):
    _, model = vera_model("gpt2", save_projection=save_projection, projection_prng_key=3)
    randomize(model, "vera")
    model.set_active("vera")
    expected = logits(model)
    model.save_adapter("vera", tmp_path / "v")
    on_disk = load_file(tmp_path / "v" / "adapter_model.safetensors")
    assert ("adapter.vera_A" in on_disk) == save_projection
    fresh = ak.AdapterModel(make_base("gpt2"))
    fresh.load_adapter(tmp_path / "v")
    fresh.set_active("vera")
    for key, tensor in model.adapter_state_dict("vera").items():
        assert torch.equal(fresh.adapter_state_dict("vera")[key], tensor), key
    assert torch.equal(logits(fresh), expected)


def test_wrong_projections_are_refused_by_name():
    _, model = vera_model("llama")
    state = dict(model.adapter_state_dict("vera"))
    state["adapter.vera_A"] = torch.zeros(8, 32)
    with pytest.raises(ak.ShapeMismatchError, match=r"adapter\.vera_A has shape \(8, 32\)"):
        model.add_adapter("copy", model.adapters["vera"], state)
    state["adapter.vera_C"] = state.pop("adapter.vera_A")
    with pytest.raises(ak.ShapeMismatchError, match=r"unexpected \['adapter\.vera_C'\]"):
        model.add_adapter("copy", model.adapters["vera"], state)


def test_vera_in_a_stack_with_lora():
    _, model = vera_model("llama")
    model.add_adapter("lora", ak.LoraConfig(r=2, target_modules=["q_proj"]))
    randomize(model, "vera", 1)
    randomize(model, "lora", 2)
    model.set_active(ak.Stack("vera", "lora"))
    stacked = logits(model)
    model.set_active(["vera", "lora"])
    torch.testing.assert_close(stacked, logits(model), rtol=0, atol=1e-6)
    model.set_active("vera")
    alone = logits(model)
    assert (stacked - alone).abs().max() > 1e-4


def test_invalid_vera_configs_are_refused():
    with pytest.raises(ak.ConfigError, match="r must be a positive integer"):
        ak.VeraConfig(r=0)
    with pytest.raises(ak.ConfigError, match="projection_prng_key must be a non-negative integer"):
        ak.VeraConfig(projection_prng_key=-1)
    with pytest.raises(ak.ConfigError, match="save_projection must be true or false"):
        ak.VeraConfig(save_projection="no")
    assert ak.VeraConfig(vera_dropout=0.2, layers_to_transform=1).to_dict()["dropout"] == 0.2
