import copy
import re

import pytest
import torch

import adapterkit as ak
from adapterkit.inject import find_sites
from conftest import batch, logits, make_base, tiny_llama

EXPECTED_SITES = {
    ("gpt2", "houlsby"): ["transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp.c_proj"],
    ("llama", "houlsby"): ["model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj"],
    ("bert", "houlsby"): ["bert.encoder.layer.{i}.attention.output.dense", "bert.encoder.layer.{i}.output.dense"],
}
EXPECTED_READERS = {
    "gpt2": ["transformer.h.{i}.attn.c_attn", "transformer.h.{i}.mlp.c_fc"],
    "llama": ["model.layers.{i}.self_attn.q_proj", "model.layers.{i}.mlp.gate_proj"],
    "bert": ["bert.encoder.layer.{i}.attention.self.query", "bert.encoder.layer.{i}.intermediate.dense"],
}


def test_structure_is_read_without_per_model_code(arch):
    base = make_base(arch)
    sites = find_sites(base, "houlsby")
    expected = [p.format(i=i) for i in range(2) for p in EXPECTED_SITES[(arch, "houlsby")]]
    assert [s.module_name for s in sites] == expected
    parallel = find_sites(base, "parallel")
    assert [s.reads_from for s in parallel] == [p.format(i=i) for i in range(2) for p in EXPECTED_READERS[arch]]
    assert [s.module_name for s in find_sites(base, "pfeiffer")] == expected[1::2]
    assert [s.module_name for s in find_sites(base, "attention")] == expected[0::2]


def test_switching_restores_outputs_exactly():
    model = ak.AdapterModel(make_base("llama"))
    for name in ("a", "b"):
        model.add_adapter(name, ak.BottleneckConfig(bottleneck_size=8, init="bert"))
    model.set_active("a")
    a_out = logits(model)
    model.set_active("b")
    b_out = logits(model)
    model.set_active("a")
    assert torch.equal(logits(model), a_out)
    assert not torch.equal(a_out, b_out)
    model.set_active(None)
    with model.disabled():
        base_out = logits(model)
    assert torch.equal(logits(model), base_out)


def test_two_active_adapters_compose_in_the_order_given():
    base = make_base("llama")
    model = ak.AdapterModel(base)
    model.add_adapter("a", ak.BottleneckConfig(placement="pfeiffer", bottleneck_size=8, init="bert"))
    model.add_adapter("b", ak.BottleneckConfig(placement="pfeiffer", bottleneck_size=8, init="bert"))
    model.set_active(["a", "b"])
    ab = logits(model)
    site = base.model.layers[0].mlp.down_proj
    x = torch.randn(3, 64)
    a = model.adapter_layers["a"]["model-layers-0-mlp-down_proj"]
    b = model.adapter_layers["b"]["model-layers-0-mlp-down_proj"]
    with torch.no_grad():
        assert torch.equal(site(x), b(x, a(x, site.__class__.forward(site, x))))
    model.set_active(["b", "a"])
    assert not torch.equal(logits(model), ab)


def test_delete_adapter_removes_every_trace():
    base = make_base("gpt2")
    before = logits(base)
    model = ak.AdapterModel(base)
    model.add_adapter("a", ak.BottleneckConfig(placement="parallel", bottleneck_size=8, init="bert"))
    model.set_active("a")
    model.delete_adapter("a")
    assert model.adapters == {} and model.active == ()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())
    assert torch.equal(logits(model), before)


def test_layers_and_target_modules_select_insertion_points():
    model = ak.AdapterModel(make_base("llama"))
    model.add_adapter("top", ak.BottleneckConfig(bottleneck_size=4, layers=[1]))
    assert [s.module_name for s in model.adapter_sites("top")] == ["model.layers.1.self_attn.o_proj",
                                                                   "model.layers.1.mlp.down_proj"]
    model.add_adapter("named", ak.BottleneckConfig(bottleneck_size=4, target_modules=["v_proj"]))
    assert [(s.module_name, s.in_features) for s in model.adapter_sites("named")] == [
        ("model.layers.0.self_attn.v_proj", 16), ("model.layers.1.self_attn.v_proj", 16)]
    model.add_adapter("regex", ak.BottleneckConfig(bottleneck_size=4, target_modules=r".*\.1\.mlp\.(up|gate)_proj"))
    assert [s.module_name for s in model.adapter_sites("regex")] == ["model.layers.1.mlp.gate_proj",
                                                                     "model.layers.1.mlp.up_proj"]
    model.set_active(["top", "named", "regex"])
    logits(model)


def test_model_without_insertion_points_gets_a_clear_error():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    model = ak.AdapterModel(Plain())
    with pytest.raises(ak.InjectionError, match="target_modules.*proj"):
        model.add_adapter("a", ak.BottleneckConfig())
    model.add_adapter("a", ak.BottleneckConfig(target_modules=["proj"], bottleneck_size=2))
    with pytest.raises(ak.InjectionError, match="matched no linear layer"):
        model.add_adapter("b", ak.BottleneckConfig(target_modules=["nothing"]))
    with pytest.raises(ak.InjectionError, match="layers \\[7\\] do not exist"):
        ak.AdapterModel(make_base("gpt2")).add_adapter("c", ak.BottleneckConfig(layers=[7]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"placement": "middle"}, "placement 'middle'"),
        ({"activation": "softmax"}, "activation 'softmax'"),
        ({"bottleneck_size": 0}, "bottleneck_size must be a positive integer"),
        ({"bottleneck_size": 8, "reduction_factor": 4}, "not both"),
        ({"dropout": 1.5}, "dropout must be in"),
        ({"init": "ones"}, "init 'ones'"),
        ({"layers": [-1]}, "layers must be non-negative"),
        ({"target_modules": []}, "target_modules must name"),
    ],
)
def test_invalid_configs_are_refused(kwargs, message):
    with pytest.raises(ak.ConfigError, match=message):
        ak.BottleneckConfig(**kwargs)


def test_names_are_checked():
    model = ak.AdapterModel(make_base("gpt2"))
    model.add_adapter("a", ak.BottleneckConfig(bottleneck_size=4))
    with pytest.raises(ak.AdapterNameError, match="already exists"):
        model.add_adapter("a", ak.BottleneckConfig(bottleneck_size=4))
    with pytest.raises(ak.AdapterNameError, match="no adapter named 'zzz'; adapters: a"):
        model.set_active("zzz")
    with pytest.raises(ak.AdapterNameError, match="invalid adapter name"):
        model.add_adapter("../evil", ak.BottleneckConfig(bottleneck_size=4))
    with pytest.raises(ak.AdapterNameError):
        model.delete_adapter("zzz")
    with pytest.raises(ak.ConfigError, match="expected an adapter config"):
        model.add_adapter("b", {"bottleneck_size": 4})


def test_reduction_factor_sets_the_width():
    model = ak.AdapterModel(make_base("llama"))
    model.add_adapter("a", ak.BottleneckConfig(reduction_factor=8, layer_norm=False))
    module = model.adapter_layers["a"]["model-layers-0-mlp-down_proj"]
    assert module.down_weight.shape == (4, 32) and module.ln_weight is None


def test_print_trainable_parameters_matches_peft_format(capsys):
    base = make_base("llama")
    model = ak.AdapterModel(base)
    model.add_adapter("a", ak.BottleneckConfig(bottleneck_size=8))
    model.add_adapter("b", ak.BottleneckConfig(placement="pfeiffer", bottleneck_size=4, layer_norm=False))
    model.train_adapter("a")
    model.print_trainable_parameters()
    d, sites_a, sites_b = 32, 4, 2
    per_a = 2 * d + (d * 8 + 8) + (8 * d + d)
    per_b = (d * 4 + 4) + (4 * d + d)
    base_count = sum(p.numel() for p in base.parameters())
    trainable, total = sites_a * per_a, base_count + sites_a * per_a + sites_b * per_b
    assert capsys.readouterr().out == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}\n"
    )
    assert model.get_nb_trainable_parameters() == (trainable, total)


def test_forward_and_generate_behave_like_the_base():
    base = make_base("llama")
    reference = copy.deepcopy(base)
    model = ak.AdapterModel(base)
    model.add_adapter("a", ak.BottleneckConfig(bottleneck_size=8))
    model.set_active("a")
    inputs = batch()
    out = model(**inputs, labels=inputs["input_ids"])
    ref = reference(**inputs, labels=inputs["input_ids"])
    assert type(out) is type(ref) and torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, reference.generate(**inputs, max_new_tokens=5, do_sample=False))
    assert model.config is base.config


def test_switching_is_a_constant_time_assignment():
    model = ak.AdapterModel(make_base("gpt2"))
    for i in range(50):
        model.add_adapter(f"a{i}", ak.BottleneckConfig(bottleneck_size=2))
    routing_before = model.hooks.routing
    model.set_active("a49")
    assert model.hooks.routing is routing_before and model.hooks.routing.active == ("a49",)


def test_peft_method_names_point_to_ours():
    """The base's transformers mixin has set_adapter too, and would answer with a peft version error."""
    model = ak.AdapterModel(tiny_llama())
    for name, ours in (("set_adapter", "set_active(name)"), ("disable_adapter_layers", "disabled()")):
        with pytest.raises(AttributeError, match=re.escape(ours)):
            getattr(model, name)
    assert model.config is model.base.config  # everything else still reaches the base
