"""The checks a row's adapter passes before it joins a batch: ``AdapterModel.check_adapter``
raises what a mixed batch would, and blocks nested too deeply are refused with a ConfigError
instead of exhausting Python's stack."""

import pytest
import torch

import adapterkit as ak
from conftest import batch, logits, make_base


def nested(block, levels: int):
    for _ in range(levels):
        block = ak.Stack(block)
    return block


@pytest.fixture
def model():
    model = ak.AdapterModel(make_base("llama")).eval()
    for name in "ab":
        model.add_adapter(name, ak.BottleneckConfig(bottleneck_size=4))
    model.add_fusion(ak.Fuse("a", "b", name="ab"))
    model.add_composition("fused", ak.Fuse("a", "b", name="ab"))
    return model


@pytest.mark.parametrize("adapter", ["a", None, "base", "fused", ak.Stack(ak.Fuse("a", "b", name="ab"), "b"),
                                     nested("a", 32)])
def test_an_adapter_a_mixed_batch_runs_passes_the_check(model, adapter):
    model.check_adapter(adapter)
    with torch.no_grad(), model.mixed_adapters([adapter, None]):
        assert torch.isfinite(model(**batch()).logits).all()


@pytest.mark.parametrize("adapter, error, message", [
    (ak.Fuse("b", "a", name="ab"), ak.ConfigError, r"fusion 'ab' was made for \['a', 'b'\], not \['b', 'a'\]"),
    ("zz", ak.AdapterNameError, "no adapter named 'zz'"),
    ("ab", ak.AdapterNameError, "'ab' is a fusion"),
    (nested("a", 33), ak.ConfigError, "blocks nest at most 32 levels deep"),
    (7, ak.AdapterNameError, "adapter_names holds 7"),
])
def test_the_check_raises_what_a_mixed_batch_raises(model, adapter, error, message):
    with pytest.raises(error, match=message):
        model.check_adapter(adapter)
    with pytest.raises(error, match=message), model.mixed_adapters([adapter, None]):
        model(**batch())


def test_the_check_refuses_named_rows_while_training(model):
    model.train()
    with pytest.raises(ak.AdapterkitError, match="call model.eval"):
        model.check_adapter("a")


def test_nesting_past_the_limit_is_a_config_error_everywhere(model):
    deep = nested("a", 300)
    reference = logits(model)
    with pytest.raises(ak.ConfigError, match="nest at most 32"):
        model.set_active(deep)
    with pytest.raises(ak.ConfigError, match="nest at most 32"):
        model.add_composition("deep", deep)
    with pytest.raises(ak.ConfigError, match="nest at most 32"):
        model.add_fusion(ak.Fuse(nested("a", 40), "b", name="deep"))
    assert "deep" not in model.compositions and "deep" not in model.adapters
    torch.testing.assert_close(logits(model), reference)
