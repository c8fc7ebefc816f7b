import logging

import pytest
import torch

import adapterkit as ak
from adapterkit.io import base_fingerprint
from conftest import logits, make_base

# GPT-2 adapts Conv1D layers (weight [in, out]); Llama adapts nn.Linear (weight [out, in]).
TARGETS = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "down_proj"]}
LINEAR_ARCHS = sorted(TARGETS)


def lora_model(arch, r=4, **kwargs):
    base = make_base(arch)
    model = ak.AdapterModel(base)
    model.add_adapter("lora", ak.LoraConfig(r=r, alpha=8, target_modules=TARGETS[arch], **kwargs))
    return base, model


def randomize(model, name, seed=1):
    """Give an adapter non-zero weights, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.adapter_layers[name].parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("arch", LINEAR_ARCHS)
def test_lora_output_is_base_plus_scaled_low_rank_update(arch):
    base, model = lora_model(arch)
    randomize(model, "lora")
    model.set_active("lora")
    name = model.adapter_sites("lora")[0].module_name
    layer = base.get_submodule(name)
    adapter = model.adapter_layers["lora"][name.replace(".", "-")]
    x = torch.randn(3, adapter.lora_A.shape[1])
    with model.disabled(), torch.no_grad():
        plain = layer(x)
    with torch.no_grad():
        adapted = layer(x)
        expected = plain + (x @ adapter.lora_A.T @ adapter.lora_B.T) * (8 / 4)
        A, B, scale = adapter.low_rank_factors()
        assert scale == 2.0
        torch.testing.assert_close(adapted, plain + scale * (x @ A.T) @ B.T, rtol=0, atol=1e-6)
    torch.testing.assert_close(adapted, expected, rtol=0, atol=1e-6)


def test_rslora_scales_by_the_square_root_of_the_rank():
    assert ak.LoraConfig(r=16, alpha=8, target_modules=["q_proj"]).scale == 0.5
    assert ak.LoraConfig(r=16, alpha=8, target_modules=["q_proj"], use_rslora=True).scale == 2.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": 2.5}, "r must be a positive integer"),
        ({"alpha": -1}, "alpha must be a positive number"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"target_modules": []}, "target_modules must name the linear layers"),
        ({"layers": [-2]}, "layers must be non-negative"),
    ],
)
def test_invalid_lora_configs_are_refused(kwargs, message):
    arguments = {"target_modules": ["q_proj"], **kwargs}
    with pytest.raises(ak.ConfigError, match=message):
        ak.LoraConfig(**arguments)


def test_while_merged_conflicting_operations_raise_and_others_work(tmp_path):
    base, model = lora_model("llama")
    randomize(model, "lora")
    model.train_adapter("lora")
    model.add_adapter("other", ak.LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("bottleneck", ak.BottleneckConfig(bottleneck_size=4))
    model.set_active("lora")
    expected = logits(model)
    model.merge("lora")
    with pytest.raises(ak.MergeError, match="'lora' is merged.*unmerge"):
        model.set_active("other")
    with pytest.raises(ak.MergeError, match="unmerge"):
        with model.disabled():
            pass
    with pytest.raises(ak.MergeError, match="unmerge"):
        model.delete_adapter("lora")
    with pytest.raises(ak.MergeError, match="unmerge"):
        model.train_adapter("lora")
    with pytest.raises(ak.MergeError, match="already merged"):
        model.merge("other")
    assert not any(p.requires_grad for p in model.adapter_layers["lora"].parameters())
    assert model.active == ("lora",)
    # Saving the merged adapter writes its own tensors and the true base fingerprint.
    model.save_adapter("lora", tmp_path / "lora")
    fresh = ak.AdapterModel(make_base("llama"))
    fresh.load_adapter(tmp_path / "lora")
    fresh.set_active("lora")
    torch.testing.assert_close(logits(fresh), expected, rtol=0, atol=1e-5)
    # Adding an output adapter on top of the merged one keeps it.
    model.set_active(["lora", "bottleneck"])
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)
    model.unmerge()
    with pytest.raises(ak.MergeError, match="no adapter is merged"):
        model.unmerge()


@pytest.mark.parametrize("arch", LINEAR_ARCHS)
def test_merge_and_unload_gives_a_plain_model_that_round_trips(arch, tmp_path):
    base, model = lora_model(arch)
    randomize(model, "lora")
    model.set_active("lora")
    expected = logits(model)
    plain = model.merge_and_unload("lora")
    assert plain is base and model.adapters == {} and model.active == ()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in plain.modules())
    torch.testing.assert_close(logits(plain), expected, rtol=0, atol=1e-5)
    plain.save_pretrained(tmp_path / "merged")
    reloaded = type(plain).from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(logits(reloaded), logits(plain))
    assert base_fingerprint(plain) != base_fingerprint(make_base(arch))


def test_adapters_that_change_the_layer_apply_before_bottlenecks_in_any_order():
    base = make_base("llama")
    model = ak.AdapterModel(base)
    model.add_adapter("lora", ak.LoraConfig(r=4, target_modules=["o_proj"]))
    model.add_adapter("houlsby", ak.BottleneckConfig(bottleneck_size=8, init="bert"))
    randomize(model, "lora")
    model.set_active(["houlsby", "lora"])
    first = logits(model)
    model.set_active(["lora", "houlsby"])
    assert torch.equal(logits(model), first)
    layer = base.model.layers[0].self_attn.o_proj
    key = "model-layers-0-self_attn-o_proj"
    lora, houlsby = model.adapter_layers["lora"][key], model.adapter_layers["houlsby"][key]
    x = torch.randn(3, 32)
    with torch.no_grad():
        plain = torch.nn.functional.linear(x, layer.weight)
        assert torch.equal(layer(x), houlsby(x, lora(x, plain)))


def test_mixed_kinds_live_on_one_base_and_save_and_load_each(tmp_path):
    base = make_base("llama")
    model = ak.AdapterModel(base)
    model.add_adapter("houlsby", ak.BottleneckConfig(bottleneck_size=8, init="bert"))
    model.add_adapter("lora", ak.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("ada", ak.AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj", "v_proj"], total_step=4))
    randomize(model, "lora", seed=2)
    randomize(model, "ada", seed=3)
    outputs = {}
    for name in ("houlsby", "lora", "ada"):
        model.set_active(name)
        outputs[name] = logits(model)
        model.save_adapter(name, tmp_path / name)
    assert len({tuple(o.flatten()[:5].tolist()) for o in outputs.values()}) == 3
    fresh = ak.AdapterModel(make_base("llama"))
    for name in ("ada", "houlsby", "lora"):
        fresh.load_adapter(tmp_path / name)
    for name, expected in outputs.items():
        fresh.set_active(name)
        assert torch.equal(logits(fresh), expected), name
    assert fresh.adapters["ada"].method == "adalora" and fresh.adapters["lora"].method == "lora"


def test_print_trainable_parameters_counts_lora(capsys):
    base, model = lora_model("llama", r=4)
    model.train_adapter("lora")
    # per layer: q_proj 32->32, v_proj 32->16, down_proj 64->32; two layers
    trainable = 2 * 4 * ((32 + 32) + (32 + 16) + (64 + 32))
    total = sum(p.numel() for p in base.parameters()) + trainable
    model.print_trainable_parameters()
    assert capsys.readouterr().out == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}\n"
    )
    assert model.adapter_ranks("lora") == {s.module_name: 4 for s in model.adapter_sites("lora")}



def test_peft_spellings_work_as_written():
    config = ak.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj"], layers_to_transform=1)
    assert (config.alpha, config.dropout, config.layers) == (16, 0.05, [1])
    assert ak.LoraConfig.from_dict({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}).alpha == 8
    ada = ak.AdaLoraConfig(init_r=6, target_r=3, lora_alpha=12, total_step=10, target_modules=["q_proj"])
    assert ada.alpha == 12
    assert ak.IA3Config(layers_to_transform=[0]).layers == [0]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_lora_without_target_modules_adapts_what_peft_would(arch, tmp_path, caplog):
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(make_base(arch), peft.LoraConfig())
    theirs = sorted(n.removeprefix("base_model.model.") for n, m in wrapped.named_modules()
                    if hasattr(m, "lora_A") and m.lora_A)
    model = ak.AdapterModel(make_base(arch))
    with caplog.at_level(logging.INFO, logger="adapterkit"):
        model.add_adapter("l", ak.LoraConfig())
    assert sorted(s.module_name for s in model.adapter_sites("l")) == theirs
    assert "no target_modules given; adapting the attention's query and value projections" in caplog.text
    randomize(model, "l")
    model.set_active("l")
    expected = logits(model)
    model.save_adapter("l", tmp_path / "l", format="peft")
    loaded = peft.PeftModel.from_pretrained(make_base(arch), tmp_path / "l").eval()
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=1e-5)
