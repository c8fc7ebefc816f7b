"""The embedded default base (SmolLM2-135M-Instruct). Slow: loads 135M parameters."""

import pytest
import torch

import adapterkit as ak

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return ak.load_base("smollm2-135m")


def test_default_base_is_a_float32_llama_with_its_tokenizer(smollm2):
    base, tokenizer = smollm2
    assert type(base).__name__ == "LlamaForCausalLM"
    assert base.dtype == torch.float32 and not base.training
    assert sum(p.numel() for p in base.parameters()) == 134_515_008
    assert tokenizer.decode(tokenizer("Hello world")["input_ids"]) == "Hello world"


def test_houlsby_adapter_counts_and_identity(smollm2, capsys, tmp_path):
    base, tokenizer = smollm2
    model = ak.AdapterModel(base)
    inputs = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        before = model(**inputs).logits
    model.add_adapter("drug", ak.BottleneckConfig(placement="houlsby", bottleneck_size=64))
    model.train_adapter("drug")
    model.print_trainable_parameters()
    assert capsys.readouterr().out == "trainable params: 4,531,200 || all params: 139,046,208 || trainable%: 3.2588\n"
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    model.save_adapter("drug", tmp_path / "drug")
    assert model.load_adapter(tmp_path / "drug", name="drug2") == "drug2"
    model.delete_adapter("drug")
    model.delete_adapter("drug2")
