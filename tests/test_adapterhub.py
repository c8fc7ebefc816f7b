"""AdapterHub checkpoints made by AdapterHub's own library (tests/fixtures/adapterhub, written by
make_fixtures.py in a transformers-4 environment) load with one load_adapter call and give
AdapterHub's outputs to 1e-5, on BERT (post-LN), GPT-2 and Llama (pre-LN)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import adapterkit as ak

FIXTURES = Path(__file__).parent / "fixtures" / "adapterhub"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
BASES = {b["architecture"]: b for b in MANIFEST["bases"]}
ADAPTERS = [f for f in MANIFEST["fixtures"] if f["kind"] == "adapter"]
FUSIONS = [f for f in MANIFEST["fixtures"] if f["kind"] != "adapter"]


def base_model(arch):
    spec = BASES[arch]
    model = getattr(transformers, spec["model_class"]).from_pretrained(FIXTURES / spec["folder"],
                                                                       attn_implementation="eager")
    return model.eval(), spec["output"]


def outputs(model, output, expected):
    with torch.no_grad():
        return getattr(model(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]), output)


def expected_of(folder):
    return load_file(FIXTURES / folder / "expected.safetensors")


@pytest.mark.parametrize("fixture", ADAPTERS, ids=lambda f: f["folder"])
def test_adapterhub_adapters_give_adapterhubs_outputs(fixture):
    base, output = base_model(fixture["architecture"])
    expected = expected_of(fixture["folder"])
    model = ak.AdapterModel(base)
    name = model.load_adapter(FIXTURES / fixture["folder"])
    model.set_active(name)
    reference = expected[output] if output in expected else next(
        iter(v for k, v in expected.items() if k not in ("input_ids", "attention_mask")))
    torch.testing.assert_close(outputs(model, output, expected), reference, rtol=0, atol=1e-5)
    with model.disabled():
        assert (outputs(model, output, expected) - reference).abs().max() > 1e-3  # the adapter matters


@pytest.mark.parametrize("fixture", FUSIONS, ids=lambda f: f["folder"])
def test_adapterhub_fusions_give_adapterhubs_outputs(fixture):
    base, output = base_model(fixture["architecture"])
    folder = FIXTURES / fixture["folder"]
    expected = expected_of(fixture["folder"])
    model = ak.AdapterModel(base)
    with pytest.raises(ak.AdapterNameError, match="needs the adapters"):
        model.load_adapter(folder / "fusion")
    members = [model.load_adapter(folder / member) for member in ("a", "b")]
    fusion = model.load_adapter(folder / "fusion")
    model.set_active(ak.Fuse(*members))
    assert fusion == ak.Fuse(*members).name
    reference = next(v for k, v in expected.items() if k not in ("input_ids", "attention_mask"))
    torch.testing.assert_close(outputs(model, output, expected), reference, rtol=0, atol=1e-5)


def test_features_we_do_not_reproduce_are_refused_by_name(tmp_path):
    folder = shutil.copytree(FIXTURES / "llama" / "seq_bn", tmp_path / "x")
    document = json.loads((folder / "adapter_config.json").read_text())
    document["config"]["phm_layer"] = True
    document["config"]["use_gating"] = True
    (folder / "adapter_config.json").write_text(json.dumps(document))
    model = ak.AdapterModel(base_model("llama")[0])
    with pytest.raises(ak.AdapterFileError, match=r"does not reproduce: phm_layer=True, use_gating=True"):
        model.load_adapter(folder)


def test_pickled_weights_load_only_as_plain_tensors(tmp_path):
    folder = shutil.copytree(FIXTURES / "gpt2" / "seq_bn", tmp_path / "x")
    tensors = load_file(folder / "adapter.safetensors")
    (folder / "adapter.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_adapter.bin")
    base, output = base_model("gpt2")
    model = ak.AdapterModel(base)
    model.set_active(model.load_adapter(folder))
    expected = expected_of("gpt2/seq_bn")
    torch.testing.assert_close(outputs(model, output, expected), expected[output], rtol=0, atol=1e-5)

    class Hostile:
        def __reduce__(self):
            return (print, ("ran code",))

    torch.save({"x": Hostile()}, folder / "pytorch_adapter.bin")
    with pytest.raises(ak.AdapterFileError, match="corrupt or not a plain tensor file"):
        ak.AdapterModel(base_model("gpt2")[0]).load_adapter(folder)


def test_an_imported_adapter_saves_in_our_format_and_trains(tmp_path):
    base, output = base_model("bert")
    model = ak.AdapterModel(base)
    name = model.load_adapter(FIXTURES / "bert" / "seq_bn")
    model.set_active(name)
    expected = expected_of("bert/seq_bn")
    model.save_adapter(name, tmp_path / "ours")
    again = ak.AdapterModel(model.unload())
    again.set_active(again.load_adapter(tmp_path / "ours"))
    torch.testing.assert_close(outputs(again, output, expected), expected[output], rtol=0, atol=1e-5)
    assert again.adapters[name].reads == "output+residual" and again.adapters[name].layer_norm is False
