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


@pytest.mark.slow
def test_mixed_rows_match_running_alone_to_the_logits_scale():
    """On the real base each row of a mixed batch matches running it alone within 1e-5 of the
    logits' scale: batching itself moves the bare base's logits by as much (a few 1e-6)."""
    torch.manual_seed(0)
    base, tokenizer = ak.load_base()
    model = ak.AdapterModel(base).eval()
    model.add_adapter("h", ak.BottleneckConfig(bottleneck_size=64, init="bert"))
    model.add_adapter("l", ak.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("i", ak.IA3Config(init_ia3_weights=False))
    with torch.no_grad():
        for parameter in model.adapter_layers["l"].parameters():
            parameter.normal_(0, 0.02)
    texts = ["English: Save\nGerman:", "English: Please correct the errors below.\nGerman:", "Hello there", "x",
             "The quick brown fox"]
    names = ["h", "l", None, "i", "h"]
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        mixed = model(**encoded, adapter_names=names).logits
        for row, name in enumerate(names):
            model.set_active(name)
            mask = encoded["attention_mask"][row : row + 1]
            alone = model(input_ids=encoded["input_ids"][row : row + 1], attention_mask=mask).logits[0][mask[0].bool()]
            assert (mixed[row][mask[0].bool()] - alone).abs().max() <= 1e-5 * alone.abs().max()
