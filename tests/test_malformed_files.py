"""AdapterHub and peft folders with malformed config files: the Python API and `adapterkit info`
give our error naming the file and the field, never a raw traceback, and nothing on disk changes."""

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import save_file

import adapterkit as ak
from adapterkit.cli import main
from adapterkit.io import read_adapter
from conftest import make_base

ADAPTERHUB = Path(__file__).parent / "fixtures" / "adapterhub" / "bert"
FUSION_CONFIG = "adapter_fusion_config.json"


def folder_of(kind, tmp_path):
    """A copy of an AdapterHub adapter or fusion, or a peft LoRA folder saved by us."""
    if kind == "peft":
        model = ak.AdapterModel(make_base("llama"))
        model.add_adapter("lora", ak.LoraConfig(r=2, target_modules=["q_proj"]))
        model.save_adapter("lora", tmp_path / "lora", format="peft")
        return tmp_path / "lora"
    source = ADAPTERHUB / {"adapterhub": "seq_bn", "fusion": "fusion/fusion"}[kind]
    return Path(shutil.copytree(source, tmp_path / kind))


def edit_json(file, edit):
    document = json.loads(file.read_text())
    edit(document)
    file.write_text(json.dumps(document))


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_refused(path, file, match, capsys):
    """read_adapter, load_adapter and `adapterkit info` each give our error naming the file."""
    before = snapshot(path)
    with pytest.raises(ak.AdapterFileError, match=match) as caught:
        read_adapter(path)
    assert str(path / file) in str(caught.value)
    model = ak.AdapterModel(make_base("bert"))
    with pytest.raises(ak.AdapterFileError, match=match):
        model.load_adapter(path, name="x")
    assert model.adapters == {}
    capsys.readouterr()
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"adapterkit: error: {path / file}") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert snapshot(path) == before


@pytest.mark.parametrize("kind, file, edit, match", [
    ("adapterhub", "adapter_config.json", lambda d: d["config"].update(dropout="x"),
     r"dropout must be in \[0, 1\), got 'x'"),
    ("fusion", FUSION_CONFIG, lambda d: d.update(hidden_size=[1]),
     r"hidden_size must be a positive integer, got \[1\]"),
    ("adapterhub", "adapter_config.json", lambda d: d["config"].update(reduction_factor=1e-300),
     "reduction_factor must be a number of at least 0.0625, got 1e-300"),
    ("peft", "adapter_config.json", lambda d: d.update(peft_type=["LORA"]),
     r"peft_type must be a string such as 'LORA', got \['LORA'\]"),
    ("peft", "adapter_config.json", lambda d: d.update(target_modules="(["),
     r"target_modules '\(\[' is not a valid regular expression \(unterminated character set"),
], ids=["dropout", "hidden_size", "reduction_factor", "peft_type", "target_modules"])
def test_a_malformed_config_field_gets_our_error_naming_the_field_and_the_file(
    tmp_path, capsys, kind, file, edit, match
):
    path = folder_of(kind, tmp_path)
    edit_json(path / file, edit)
    assert_refused(path, file, match, capsys)


def test_a_string_for_a_true_or_false_adapterhub_option_is_refused_rather_than_read_as_true(tmp_path, capsys):
    path = folder_of("adapterhub", tmp_path)
    edit_json(path / "adapter_config.json", lambda d: d["config"].update(mh_adapter="false"))
    assert_refused(path, "adapter_config.json", "mh_adapter must be true or false, got 'false'", capsys)


def test_a_fusion_without_hidden_size_or_tensors_to_tell_it_gets_our_error_even_in_an_event_loop(tmp_path, capsys):
    path = folder_of("fusion", tmp_path)
    edit_json(path / FUSION_CONFIG, lambda d: d.pop("hidden_size"))
    save_file({}, path / "model_adapter_fusion.safetensors")
    assert_refused(path, FUSION_CONFIG, "lacks 'hidden_size', and its weights hold no query, key or value", capsys)

    async def read_in_a_thread():  # a StopIteration cannot be set on an asyncio future: the await would hang
        return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, read_adapter, path), timeout=20)

    with pytest.raises(ak.AdapterFileError, match="lacks 'hidden_size'"):
        asyncio.run(read_in_a_thread())


def test_a_fusion_without_hidden_size_takes_the_width_from_its_tensors(tmp_path):
    path = folder_of("fusion", tmp_path)
    edit_json(path / FUSION_CONFIG, lambda d: d.pop("hidden_size"))
    assert set(read_adapter(path).config.widths.values()) == {32}
