"""Composition (Stack, Average, Fuse), per-row compositions, fusion training and files, and
weighted merges against peft's add_weighted_adapter."""

import json

import pytest
import torch

import adapterkit as ak
from adapterkit.cli import main, read_compositions
from adapterkit.compose import compositions_from_json, to_json
from conftest import batch, logits, make_base, rows_alone, train_steps

SITE = "model.layers.1.mlp.down_proj"  # one site, so a layer's output can be checked by hand


def randomize(model, name, seed, std=0.2):
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.adapter_layers[name].parameters():
            parameter.add_(torch.randn_like(parameter) * std)


def site_model(**extra):
    """Llama with bottlenecks a, b and a LoRA c, all at one site (and IA3 d on its input)."""
    model = ak.AdapterModel(make_base("llama")).eval()
    for i, name in enumerate("ab"):
        model.add_adapter(name, ak.BottleneckConfig(bottleneck_size=4, target_modules=[SITE]))
        randomize(model, name, i)
    model.add_adapter("c", ak.LoraConfig(r=2, target_modules=[SITE]))
    randomize(model, "c", 2)
    model.add_adapter("d", ak.IA3Config(target_modules=[SITE], feedforward_modules=[SITE]))
    randomize(model, "d", 3)
    return model


def site_output(model, block, inputs=None):
    captured = {}
    handle = model.base.get_submodule(SITE).register_forward_hook(lambda m, a, out: captured.update(y=out),
                                                                  prepend=False)
    model.set_active(block)
    with torch.no_grad():
        model(**(inputs or batch(seed=5)))
    handle.remove()
    return captured["y"]


def test_a_stack_of_names_is_the_plain_active_list():
    model = site_model()
    model.set_active(["a", "b"])
    expected = logits(model)
    model.set_active(ak.Stack("a", "b"))
    assert model.active == ("a", "b") and model.active_composition is None
    assert torch.equal(logits(model), expected)


def test_average_is_the_weighted_average_of_the_childrens_outputs():
    model = site_model()
    plain, a, c, d = (site_output(model, name) for name in (None, "a", "c", "d"))
    mixed = site_output(model, ak.Average("a", "c", "d", weights=[1, 2, 1]))
    torch.testing.assert_close(mixed, plain + 0.25 * (a - plain) + 0.5 * (c - plain) + 0.25 * (d - plain),
                               rtol=0, atol=1e-5)


def test_fuse_mixes_the_childrens_changes_by_attention():
    model = site_model()
    fuse = ak.Fuse("a", ak.Stack("b", "c"), name="abc")
    model.add_fusion(fuse, temperature=2.0)
    randomize(model, "abc", 9, std=0.3)
    plain, a, bc = site_output(model, None), site_output(model, "a"), site_output(model, ak.Stack("b", "c"))
    layer = model.adapter_layers["abc"][SITE.replace(".", "-")]
    deltas = torch.stack([a - plain, bc - plain], dim=-2)
    query = plain @ layer.query_weight.T + layer.query_bias
    keys = deltas @ layer.key_weight.T + layer.key_bias
    weights = torch.softmax((keys * query.unsqueeze(-2)).sum(-1) / 2.0, dim=-1)
    expected = plain + (weights.unsqueeze(-1) * deltas).sum(-2) @ layer.value_weight.T
    torch.testing.assert_close(site_output(model, fuse), expected, rtol=0, atol=1e-5)


def test_a_new_fusion_with_flat_attention_is_the_average():
    model = site_model()
    fuse = ak.Fuse("a", "c", "d", name="f")
    model.add_fusion(fuse)
    with torch.no_grad():
        layer = model.adapter_layers["f"][SITE.replace(".", "-")]
        layer.query_weight.zero_()  # equal scores: the softmax is uniform, the value is the identity
    torch.testing.assert_close(site_output(model, fuse), site_output(model, ak.Average("a", "c", "d")),
                               rtol=0, atol=1e-6)


def test_training_a_fusion_over_stacks_moves_only_the_fusion():
    model = ak.AdapterModel(make_base("llama"))
    for name in ["lang", "task", "other"]:
        model.add_adapter(name, ak.BottleneckConfig(bottleneck_size=4, init="bert"))
    model.add_adapter("lora", ak.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize(model, "lora", 4)
    fuse = ak.Fuse(ak.Stack("lang", "task"), ak.Stack("lang", "other"), "lora", name="mix")
    model.add_fusion(fuse)
    children = {n: {k: v.clone() for k, v in model.adapter_state_dict(n).items()}
                for n in ("lang", "task", "other", "lora")}
    model.train_fusion(fuse)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == sum(p.numel() for p in model.adapter_layers["mix"].parameters())
    losses = train_steps(model, batch(seed=6, rows=4), steps=10, lr=1e-2)
    assert losses[-1] < losses[0]
    for name, tensors in children.items():
        for key, value in model.adapter_state_dict(name).items():
            assert torch.equal(value, tensors[key]), key


def test_fusions_save_and_load_with_their_children(tmp_path):
    model = site_model()
    fuse = ak.Fuse("a", "c", name="ac")
    model.add_fusion(fuse)
    randomize(model, "ac", 7)
    model.set_active(fuse)
    expected = logits(model)
    for name in ("a", "c"):
        model.save_adapter(name, tmp_path / name)
    model.save_adapter(fuse, tmp_path / "ac")  # a Fuse block saves its fusion
    fresh = ak.AdapterModel(make_base("llama"))
    with pytest.raises(ak.AdapterNameError, match=r"needs the adapters \['a', 'c'\], which are not loaded"):
        fresh.load_adapter(tmp_path / "ac")
    fresh.load_adapter(tmp_path / "a")
    fresh.load_adapter(tmp_path / "c")
    fresh.load_adapter(tmp_path / "ac")
    fresh.set_active(ak.Fuse("a", "c", name="ac"))
    assert torch.equal(logits(fresh), expected)
    with pytest.raises(ak.ConfigError, match="was made for"):
        fresh.set_active(ak.Fuse("c", "a", name="ac"))
    with pytest.raises(ak.AdapterNameError, match="is part of"):
        fresh.delete_adapter("a")
    with pytest.raises(ak.AdapterNameError, match="is a fusion"):
        fresh.set_active("ac")


def test_per_row_compositions_match_running_each_row_alone():
    model = site_model()
    model.add_fusion(ak.Fuse("a", "c", name="ac"))
    randomize(model, "ac", 8)
    model.add_composition("stacked", ak.Stack("d", "a", "c"))
    model.add_composition("fused", ak.Fuse("a", "c", name="ac"))
    model.add_composition("avg", ak.Average("b", ak.Stack("a", "c"), weights=[0.3, 0.7]))
    names = ["stacked", "a", None, "fused", "avg", "c", "fused", "d"]
    inputs = batch(seed=11, rows=len(names))
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names).logits
    torch.testing.assert_close(mixed, rows_alone(model, inputs, names), rtol=0, atol=1e-5)


def test_generate_with_per_row_compositions():
    model = site_model()
    model.add_composition("stacked", ak.Stack("a", "c"))
    inputs = batch(seed=12, rows=3)
    out = model.generate(**inputs, adapter_names=["stacked", None, "b"], max_new_tokens=4, do_sample=False)
    for row, name in enumerate(["stacked", None, "b"]):
        model.set_active(name)
        alone = model.generate(input_ids=inputs["input_ids"][row : row + 1],
                               attention_mask=inputs["attention_mask"][row : row + 1],
                               max_new_tokens=4, do_sample=False)
        assert torch.equal(out[row : row + 1], alone)


def test_composition_names_are_checked():
    model = site_model()
    with pytest.raises(ak.AdapterNameError, match="no adapter named 'zz'"):
        model.add_composition("s", ak.Stack("a", "zz"))
    with pytest.raises(ak.AdapterNameError, match="no fusion named 'nf'"):
        model.set_active(ak.Fuse("a", "b", name="nf"))
    model.add_composition("s", ak.Stack("a", "b"))
    with pytest.raises(ak.AdapterNameError, match="already exists"):
        model.add_adapter("s", ak.BottleneckConfig(bottleneck_size=2))
    with pytest.raises(ak.ConfigError, match="one finite weight per child"):
        ak.Average("a", "b", weights=[1.0])


@pytest.mark.parametrize("document, match", [
    ({"x": {"stack": "ab"}},
     "composition 'x': the children of the stack block must be a list of adapter names or blocks, got 'ab'"),
    ({"x": {"weights": [1, 1], "average": "ab"}}, "composition 'x': the children of the average block must be a list"),
    ({"x": {"fuse": ["a", "b"], "name": 5}}, "composition 'x': invalid fusion name 5: use 1-128 letters"),
    ({"x": {"fuse": ["a", "b"], "name": "../../etc"}}, r"composition 'x': invalid fusion name '\.\./\.\./etc'"),
    ({"x": {"stack": ["a", "../b"]}}, r"composition 'x': invalid adapter name '\.\./b'"),
    ({"../x": {"stack": ["a", "b"]}}, r"invalid composition name '\.\./x'"),
    ({"base": {"stack": ["a", "b"]}}, "'base' cannot name a composition"),
    ({"x": {"stack": ["a", "b"], "name": "n"}}, r"composition 'x': the stack block has no field\(s\) \['name'\]"),
    ({"x": {"average": ["a", "b"], "weights": 5}}, "the weights of an average block must be a list of numbers, got 5"),
    ({"x": "a"}, "composition 'x' names the single adapter 'a'"),
], ids=["string-stack", "string-average", "fuse-name-number", "fuse-name-path", "child-path", "composition-path",
        "composition-base", "unknown-field", "weights-number", "single-adapter"])
def test_a_compositions_file_with_a_bad_block_or_name_is_refused_naming_the_file(tmp_path, capsys, document, match):
    with pytest.raises(ak.AdapterkitError, match=match):
        compositions_from_json(document)
    path = tmp_path / "compositions.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ak.ConfigError, match=match) as caught:
        read_compositions(path)
    assert str(caught.value).startswith(f"{path}: ")
    capsys.readouterr()
    assert main(["serve", "--base", str(tmp_path), "--adapters", str(tmp_path), "--compositions", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"adapterkit: error: {path}: ") and len(err.splitlines()) == 1


def test_blocks_read_back_from_json_are_the_blocks_written():
    blocks = {"s": ak.Stack("a", ak.Fuse("b", "c", name="f")),
              "m": ak.Average("a", ak.Stack("b", "c"), weights=[0.3, 0.7])}
    assert compositions_from_json({name: to_json(block) for name, block in blocks.items()}) == blocks


# ---- weighted merges ------------------------------------------------------------------------------
peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "v_proj"]


def two_loras(r=(4, 4)):
    base = make_base("llama")
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=r[0], lora_alpha=8, target_modules=TARGETS,
                                                        init_lora_weights=False), adapter_name="x")
    wrapped.add_adapter("y", peft.LoraConfig(r=r[1], lora_alpha=4, target_modules=TARGETS[:1],
                                             init_lora_weights=False))
    return wrapped


@pytest.mark.parametrize("how, options, ranks", [
    ("linear", {}, (4, 4)), ("cat", {}, (4, 2)), ("svd", {"svd_rank": 3}, (4, 2)), ("ties", {"density": 0.5}, (4, 4)),
])
def test_lora_merges_equal_peft_add_weighted_adapter(tmp_path, how, options, ranks):
    wrapped = two_loras(ranks).eval()
    wrapped.save_pretrained(tmp_path / "p", selected_adapters=["x", "y"])  # writes p/x and p/y
    peft_options = {"svd_rank": options.get("svd_rank"), "density": options.get("density")}
    wrapped.add_weighted_adapter(["x", "y"], [0.7, -0.4], "m", combination_type=how,
                                 **{k: v for k, v in peft_options.items() if v is not None})
    wrapped.set_adapter("m")
    expected = logits(wrapped)

    model = ak.AdapterModel(make_base("llama"))
    model.load_adapter(tmp_path / "p" / "x")
    model.load_adapter(tmp_path / "p" / "y")
    model.merge_adapters("m", ["x", "y"], [0.7, -0.4], method=how, **options)
    model.set_active("m")
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)
    if how == "cat":  # exact: the merged update is the weighted sum of the updates, layer by layer
        layer = "model.layers.0.self_attn.q_proj"

        def update(name):
            site = next(s for s in model.adapter_sites(name) if s.module_name == layer)
            return model.adapter_layers[name][layer.replace(".", "-")].weight_update(site)

        torch.testing.assert_close(update("m"), 0.7 * update("x") - 0.4 * update("y"), rtol=0, atol=1e-6)


def test_bottleneck_merge_averages_parameters_of_one_config():
    model = ak.AdapterModel(make_base("gpt2"))
    config = ak.BottleneckConfig(bottleneck_size=4, init="bert")
    model.add_adapter("a", config)
    model.add_adapter("b", config)
    model.merge_adapters("ab", ["a", "b"], [0.25, 0.75])
    for key, value in model.adapter_state_dict("ab").items():
        torch.testing.assert_close(value, 0.25 * model.adapter_state_dict("a")[key]
                                   + 0.75 * model.adapter_state_dict("b")[key], rtol=0, atol=0)
    model.add_adapter("c", ak.BottleneckConfig(bottleneck_size=8))
    with pytest.raises(ak.ConfigError, match="share one config"):
        model.merge_adapters("ac", ["a", "c"], [0.5, 0.5])
    with pytest.raises(ak.ConfigError, match="by 'linear'"):
        model.merge_adapters("ab2", ["a", "b"], [0.5, 0.5], method="svd")


def test_a_lora_stacks_over_a_merged_one():
    model = ak.AdapterModel(make_base("llama")).eval()
    for i, name in enumerate("xy"):
        model.add_adapter(name, ak.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        randomize(model, name, 20 + i)
    model.set_active(["x", "y"])
    expected = logits(model)
    model.merge("x")
    model.set_active(["x", "y"])  # x now lives in the weights, y still runs through its hooks
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)
