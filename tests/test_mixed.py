"""Mixed-adapter batches: every row must match running it alone with its adapter active."""

import threading

import pytest
import torch

import adapterkit as ak
from adapterkit.mixed import SEGMENT_MIN_TOKENS
from conftest import VOCAB, batch, logits, make_base, rows_alone

PLACEMENTS = ["houlsby", "pfeiffer", "attention", "parallel"]
TOLERANCE = 1e-5
# short rows (decoding) run as padded batched products, long rows (prefill) adapter by adapter
LENGTHS = [8, SEGMENT_MIN_TOKENS]


def _model(arch: str, configs: dict[str, ak.BottleneckConfig]) -> ak.AdapterModel:
    model = ak.AdapterModel(make_base(arch))
    for seed, (name, config) in enumerate(configs.items()):
        torch.manual_seed(100 + seed)
        model.add_adapter(name, config)
    return model


def _mixed(model: ak.AdapterModel, inputs: dict, names: list) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, adapter_names=names).logits


def _assert_rows_match(model, inputs, names):
    mixed = _mixed(model, inputs, names)
    alone = rows_alone(model, inputs, names)
    assert (mixed - alone).abs().max().item() <= TOLERANCE
    return mixed


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_each_row_matches_its_adapterrows_alone(arch, placement, length):
    model = _model(arch, {
        "wide": ak.BottleneckConfig(placement=placement, bottleneck_size=8, init="bert"),
        "narrow": ak.BottleneckConfig(placement=placement, bottleneck_size=3, activation="relu", init="bert",
                                      scaling=0.5),
        "plain": ak.BottleneckConfig(placement=placement, bottleneck_size=5, activation="silu", layer_norm=False,
                                     init="bert"),
        "top": ak.BottleneckConfig(placement=placement, bottleneck_size=4, activation="tanh", init="bert", layers=[1]),
    })
    names = ["wide", "narrow", "base", "plain", "wide", None, "top", "narrow"]
    inputs = batch(seed=1, rows=len(names), length=length)
    mixed = _assert_rows_match(model, inputs, names)
    assert not torch.allclose(mixed[0], mixed[1])  # the adapters really differ


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_placements_mix_in_one_batch(arch, length):
    model = _model(arch, {
        placement: ak.BottleneckConfig(placement=placement, bottleneck_size=4 + i, init="bert")
        for i, placement in enumerate(PLACEMENTS)
    } | {"named": ak.BottleneckConfig(placement="parallel", bottleneck_size=4, init="bert",
                                      target_modules=r".*\.0\..*(c_fc|up_proj|intermediate\.dense)")})
    names = ["parallel", "houlsby", "named", "base", "pfeiffer", "attention", "houlsby"]
    _assert_rows_match(model, batch(seed=2, rows=len(names), length=length), names)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("names", [["a"] * 5 + ["b"], ["a", "b", "a", "a", "c", "a", "b"], ["b"] * 3,
                                   ["base", "base"]])
def test_uneven_and_degenerate_mixes(names, length):
    model = _model("llama", {n: ak.BottleneckConfig(bottleneck_size=6, init="bert") for n in "abc"})
    _assert_rows_match(model, batch(seed=3, rows=len(names), length=length), names)


def test_all_rows_on_one_adapter_equal_set_active_exactly():
    """Such a batch takes the plain path: the same operations as set_active, so the same bits."""
    model = _model("gpt2", {"a": ak.BottleneckConfig(bottleneck_size=8, init="bert")})
    inputs = batch(seed=4, rows=4)
    model.set_active("a")
    expected = logits(model, inputs)
    model.set_active(None)
    assert torch.equal(_mixed(model, inputs, ["a"] * 4), expected)
    assert not model.hooks.cached_stacks()  # nothing was stacked


def _generaterows_alone(model, inputs, names, **kwargs):
    outputs = []
    for row, name in enumerate(names):
        model.set_active(None if name in (None, "base") else name)
        ids = inputs["input_ids"][row : row + 1]
        mask = inputs["attention_mask"][row : row + 1]
        keep = mask[0].bool()
        outputs.append(model.generate(input_ids=ids[:, keep], attention_mask=mask[:, keep], **kwargs)[:, keep.sum() :])
    model.set_active(None)
    return outputs


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("placement", ["houlsby", "parallel"])
def test_greedy_generate_matches_each_rowrows_alone(arch, placement):
    model = _model(arch, {n: ak.BottleneckConfig(placement=placement, bottleneck_size=8, init="bert") for n in "abc"})
    names = ["a", "b", "base", "c", "a"]
    inputs = batch(seed=5, rows=len(names), length=6)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    mixed = model.generate(**inputs, adapter_names=names, **kwargs)[:, 6:]
    alone = _generaterows_alone(model, inputs, names, **kwargs)
    assert [row.tolist() for row in mixed] == [row[0].tolist() for row in alone]
    assert len({tuple(row.tolist()) for row in mixed[:4]}) > 1


def test_left_padded_generate_with_beams_matches_each_rowrows_alone():
    model = _model("llama", {n: ak.BottleneckConfig(bottleneck_size=8, init="bert") for n in "ab"})
    names = ["a", "b", "base"]
    inputs = batch(seed=6, rows=3, length=7)
    inputs["attention_mask"][1, :3] = 0  # rows 1 and 2 are shorter, padded on the left
    inputs["attention_mask"][2, :1] = 0
    inputs["input_ids"][inputs["attention_mask"] == 0] = 0
    kwargs = dict(max_new_tokens=5, do_sample=False, num_beams=2, num_return_sequences=2, pad_token_id=0)
    mixed = model.generate(**inputs, adapter_names=names, **kwargs)[:, 7:]
    alone = _generaterows_alone(model, inputs, names, **kwargs)
    assert mixed.tolist() == [seq.tolist() for out in alone for seq in out]


def test_unknown_names_and_misuse_are_refused():
    model = _model("gpt2", {"a": ak.BottleneckConfig(bottleneck_size=4)})
    inputs = batch(rows=2)
    with pytest.raises(ak.AdapterNameError, match="no adapter named 'nope'; adapters: a"):
        model(**inputs, adapter_names=["a", "nope"])
    with pytest.raises(ak.AdapterNameError, match="3 names for a batch of 2 rows"):
        model(**inputs, adapter_names=["a", "a", "a"])
    with pytest.raises(ak.AdapterNameError, match="one name"):
        model(**inputs, adapter_names="a")
    model.train()
    with pytest.raises(ak.AdapterkitError, match="inference.*model.eval"):
        model(**inputs, adapter_names=["a", None])
    model.eval()
    assert model.hooks.routing.mixed is None


def test_the_call_leaves_routing_as_it_was():
    model = _model("llama", {n: ak.BottleneckConfig(bottleneck_size=4, init="bert") for n in "ab"})
    inputs = batch(seed=7, rows=2)
    model.set_active("a")
    before = logits(model, inputs)
    _mixed(model, inputs, ["b", "base"])
    assert model.active == ("a",) and model.hooks.routing.mixed is None
    assert torch.equal(logits(model, inputs), before)
    with pytest.raises(IndexError):
        model(input_ids=torch.full((2, 4), VOCAB + 5), adapter_names=["b", "b"])
    assert model.hooks.routing.mixed is None


def test_another_thread_does_not_see_a_mixed_batch():
    model = _model("llama", {"a": ak.BottleneckConfig(bottleneck_size=4, init="bert")})
    inputs = batch(seed=8, rows=2)
    base_out = logits(model, inputs)
    inside, done = threading.Event(), threading.Event()

    def hold_a_mixed_block():
        with model.mixed_adapters(["a", "a"]):
            inside.set()
            done.wait(10)

    thread = threading.Thread(target=hold_a_mixed_block)
    thread.start()
    inside.wait(10)
    try:
        assert torch.equal(logits(model, inputs), base_out)
    finally:
        done.set()
        thread.join()


def test_stacked_weights_are_reused_and_follow_changes():
    model = _model("gpt2", {n: ak.BottleneckConfig(bottleneck_size=4, init="bert") for n in "ab"})
    names = ["a", "b", "a"]
    inputs = batch(seed=9, rows=3)
    first = _mixed(model, inputs, names)
    stacks = [entry["tensors"] for entry in model.hooks.cached_stacks()]
    assert stacks
    _mixed(model, inputs, names)
    assert all(a is b for a, b in zip([entry["tensors"] for entry in model.hooks.cached_stacks()], stacks,
                                      strict=True))

    with torch.no_grad():  # training-like in-place update of one adapter
        for parameter in model.adapter_layers["b"].parameters():
            parameter.mul_(1.5)
    changed = _assert_rows_match(model, inputs, names)
    assert torch.equal(changed[0], first[0]) and not torch.allclose(changed[1], first[1])

    model.delete_adapter("b")
    assert not any("b" in entry["adapters"] for entry in model.hooks.cached_stacks())
    torch.manual_seed(55)
    model.add_adapter("b", ak.BottleneckConfig(bottleneck_size=4, init="bert"))
    _assert_rows_match(model, inputs, names)


LOW_RANK_TARGETS = {"gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "v_proj", "o_proj", "down_proj"]}


def _randomise(model: ak.AdapterModel, name: str, seed: int) -> None:
    """A freshly made LoRA/AdaLoRA adapter is the identity; give it weights a trained one might have."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.adapter_layers[name].parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def _low_rank_model(arch: str) -> ak.AdapterModel:
    targets = LOW_RANK_TARGETS[arch]
    model = _model(arch, {
        "bottleneck": ak.BottleneckConfig(bottleneck_size=8, init="bert"),
        "parallel": ak.BottleneckConfig(placement="parallel", bottleneck_size=4, init="bert"),
        "lora8": ak.LoraConfig(r=8, alpha=16, target_modules=targets),
        "lora2": ak.LoraConfig(r=2, alpha=4, target_modules=targets[:1], use_rslora=True),
        "lora_top": ak.LoraConfig(r=4, target_modules=targets, layers=[1]),
        "adalora": ak.AdaLoraConfig(init_r=6, target_r=4, total_step=10, target_modules=targets),
    })
    for seed, name in enumerate(["lora8", "lora2", "lora_top", "adalora"]):
        _randomise(model, name, seed)
    return model


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_and_adalora_rows_match_alone_beside_bottlenecks(arch, length):
    model = _low_rank_model(arch)
    names = ["lora8", "bottleneck", "lora2", "base", "adalora", "parallel", "lora_top", "lora8", "adalora"]
    mixed = _assert_rows_match(model, batch(seed=10, rows=len(names), length=length), names)
    assert not torch.allclose(mixed[0], mixed[2])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_greedy_generate_matches_each_rowrows_alone(arch):
    model = _low_rank_model(arch)
    names = ["lora8", "adalora", "bottleneck", "lora2", "base"]
    inputs = batch(seed=11, rows=len(names), length=6)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    mixed = model.generate(**inputs, adapter_names=names, **kwargs)[:, 6:]
    assert [row.tolist() for row in mixed] == [row[0].tolist()
                                               for row in _generaterows_alone(model, inputs, names, **kwargs)]


def test_a_merged_adapter_refuses_mixed_batches():
    model = _low_rank_model("llama")
    model.merge("lora8")
    with pytest.raises(ak.AdapterkitError, match="'lora8' is merged.*unmerge"):
        model(**batch(rows=2), adapter_names=["lora2", "base"])
    model.unmerge()
    _assert_rows_match(model, batch(seed=12, rows=2), ["lora8", "lora2"])
