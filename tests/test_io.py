import json
import os

import pytest
import torch

import adapterkit as ak
from adapterkit import io
from conftest import logits, make_base


def trained_model(arch="llama", placement="houlsby"):
    model = ak.AdapterModel(make_base(arch))
    model.add_adapter("a", ak.BottleneckConfig(placement=placement, bottleneck_size=8, init="bert", activation="silu"))
    return model


def test_load_under_another_name_and_files_are_plain_safetensors(tmp_path):
    from safetensors.torch import load_file

    model = trained_model()
    model.save_adapter("a", tmp_path / "a")
    assert model.load_adapter(tmp_path / "a", name="copy") == "copy"
    on_disk = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert on_disk.keys() == model.adapter_state_dict("a").keys()
    document = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert document["format"] == "adapterkit" and document["format_version"] == 1
    assert document["method"] == "bottleneck" and document["config"]["activation"] == "silu"
    assert document["base"]["architecture"] == "LlamaForCausalLM"


def test_adapter_for_another_base_is_refused(tmp_path):
    model = trained_model("llama")
    model.save_adapter("a", tmp_path / "a")
    with pytest.raises(ak.BaseMismatchError, match="architecture differ"):
        ak.AdapterModel(make_base("gpt2")).load_adapter(tmp_path / "a")
    other_weights = make_base("llama")
    with torch.no_grad():
        other_weights.lm_head.weight.add_(1e-3)
    with pytest.raises(ak.BaseMismatchError, match="weights differ"):
        ak.AdapterModel(other_weights).load_adapter(tmp_path / "a")


def _saved(tmp_path):
    model = trained_model()
    model.save_adapter("a", tmp_path / "a")
    return model, tmp_path / "a"


def test_missing_files_are_named(tmp_path):
    model, path = _saved(tmp_path)
    with pytest.raises(ak.AdapterFileError, match="no adapter folder"):
        model.load_adapter(tmp_path / "nowhere", name="x")
    with pytest.raises(ak.AdapterFileError, match=f"is a file, and an adapter is a folder: give its folder, {path}$"):
        model.load_adapter(path / "adapter_config.json", name="x")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ak.AdapterFileError,
                       match="notes.txt is a file, and an adapter is a folder: give a folder with adapter_config"):
        model.load_adapter(tmp_path / "notes.txt", name="x")
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(ak.AdapterFileError, match="adapter_model.safetensors is missing"):
        model.load_adapter(path, name="x")
    (path / "adapter_config.json").unlink()
    with pytest.raises(ak.AdapterFileError, match="holds no adapter_config.json"):
        model.load_adapter(path, name="x")


def test_corrupt_files_are_refused(tmp_path):
    model, path = _saved(tmp_path)
    weights = path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ak.AdapterFileError, match="checksum does not match"):
        model.load_adapter(path, name="x")
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ak.AdapterFileError, match="corrupt"):
        model.load_adapter(path, name="x")
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ak.AdapterFileError, match="not valid JSON"):
        model.load_adapter(path, name="x")
    assert list(model.adapters) == ["a"]


def test_hostile_safetensors_headers_get_our_error(tmp_path):
    model, path = _saved(tmp_path)
    _edit_config(path, lambda d: d.pop("weights_crc32"))  # so the header itself is what gets checked
    weights = path / "adapter_model.safetensors"
    bad_offsets = json.dumps({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 100]}}).encode()
    huge_shape = json.dumps({"t": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}).encode()
    negative = json.dumps({"t": {"dtype": "F32", "shape": [0, -1], "data_offsets": [0, 0]}}).encode()
    for data in (
        len(bad_offsets).to_bytes(8, "little") + bad_offsets + bytes(16),
        len(huge_shape).to_bytes(8, "little") + huge_shape + bytes(4),
        len(negative).to_bytes(8, "little") + negative,
        (10**12).to_bytes(8, "little") + b"{}",  # a header claiming a terabyte
        b"abc",
        b"",
    ):
        weights.write_bytes(data)
        with pytest.raises(ak.AdapterFileError, match=r"adapter_model\.safetensors is corrupt"):
            model.load_adapter(path, name="x")
    assert list(model.adapters) == ["a"]


def _edit_config(path, edit):
    document = json.loads((path / "adapter_config.json").read_text())
    edit(document)
    (path / "adapter_config.json").write_text(json.dumps(document))


def test_unknown_fields_and_versions_are_named(tmp_path):
    model, path = _saved(tmp_path)
    _edit_config(path, lambda d: d["config"].update(gate=True))
    with pytest.raises(ak.AdapterFileError, match=r"unknown BottleneckConfig field\(s\) \['gate'\]"):
        model.load_adapter(path, name="x")
    _edit_config(path, lambda d: (d["config"].pop("gate"), d.update(format_version=2)))
    with pytest.raises(ak.AdapterFileError, match="format version 2"):
        model.load_adapter(path, name="x")
    _edit_config(path, lambda d: d.update(format_version=1, method="prefix"))
    with pytest.raises(ak.AdapterFileError, match="unknown adapter method 'prefix'"):
        model.load_adapter(path, name="x")


def test_tensor_of_wrong_shape_is_refused(tmp_path):
    model, path = _saved(tmp_path)
    _edit_config(path, lambda d: d["config"].update(bottleneck_size=16))
    with pytest.raises(ak.ShapeMismatchError, match=r"has shape \(8, 32\); this config on this base needs \(16, 32\)"):
        model.load_adapter(path, name="x")
    _edit_config(path, lambda d: d["config"].update(bottleneck_size=8, layers=[0]))
    with pytest.raises(ak.ShapeMismatchError, match="unexpected"):
        model.load_adapter(path, name="x")


def test_interrupted_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    model, path = _saved(tmp_path)
    model.set_active("a")
    before = logits(model)
    with torch.no_grad():
        model.adapter_layers["a"]["model-layers-0-mlp-down_proj"].up_bias.add_(1.0)

    calls = []

    def crash_on_second_file(fd):
        calls.append(fd)
        if len(calls) == 2:  # the weights are written and synced; the config is not
            raise KeyboardInterrupt("killed mid-save")
        real_fsync(fd)

    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", crash_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        model.save_adapter("a", path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["a"]  # no half-written folder left behind
    fresh = ak.AdapterModel(make_base("llama"))
    fresh.load_adapter(path)
    fresh.set_active("a")
    assert torch.equal(logits(fresh), before)


def test_save_replaces_an_existing_adapter_and_never_clobbers_other_folders(tmp_path):
    model, path = _saved(tmp_path)
    with torch.no_grad():
        model.adapter_layers["a"]["model-layers-0-mlp-down_proj"].up_bias.add_(1.0)
    model.save_adapter("a", path)
    fresh = ak.AdapterModel(make_base("llama"))
    fresh.load_adapter(path)
    assert torch.equal(fresh.adapter_state_dict("a")["model.layers.0.mlp.down_proj.adapter.up_bias"],
                       model.adapter_state_dict("a")["model.layers.0.mlp.down_proj.adapter.up_bias"])
    assert sorted(os.listdir(tmp_path)) == ["a"]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ak.AdapterFileError, match="holds no adapter; save into a new"):
        model.save_adapter("a", precious)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_loaded_adapter_can_be_trained_further_without_touching_the_file(tmp_path):
    model, path = _saved(tmp_path)
    on_disk = (path / "adapter_model.safetensors").read_bytes()
    fresh = ak.AdapterModel(make_base("llama"))
    fresh.load_adapter(path)
    fresh.train_adapter("a")
    with torch.no_grad():
        for p in fresh.adapter_layers["a"].parameters():
            p.add_(1.0)
    assert (path / "adapter_model.safetensors").read_bytes() == on_disk


def test_the_config_records_the_base_name_and_an_optional_prompt_template(tmp_path):
    model = trained_model()
    model.base.config._name_or_path = "models/tiny-llama"
    files = model.adapter_files("a")
    document = json.loads(files["adapter_config.json"])
    assert document["base_model_name_or_path"] == "models/tiny-llama" and "prompt_template" not in document
    io.write_folder_atomically(tmp_path / "a", io.with_prompt_template(files, "English: {prompt}\nGerman:"))
    saved = io.read_adapter(tmp_path / "a")
    assert (saved.base_name, saved.prompt_template) == ("models/tiny-llama", "English: {prompt}\nGerman:")
    info = io.describe_adapter(tmp_path / "a")
    assert (info["prompt_template"] == "English: {prompt}\nGerman:"
            and info["base"]["name_or_path"] == "models/tiny-llama")
    with pytest.raises(ak.ConfigError, match="must be text holding {prompt}"):
        io.with_prompt_template(files, "German:")


def test_files_written_before_the_optional_fields_still_read(tmp_path):
    model = trained_model()
    model.save_adapter("a", tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    document = json.loads(path.read_text())
    del document["base_model_name_or_path"]
    path.write_text(json.dumps(document))
    saved = io.read_adapter(tmp_path / "a")
    assert (saved.name, saved.base_name, saved.prompt_template) == ("a", None, None)
    document["prompt_template"] = 3
    path.write_text(json.dumps(document))
    with pytest.raises(ak.AdapterFileError,
                       match=r"adapter_config.json: prompt_template must be text holding \{prompt\}"):
        io.read_adapter(tmp_path / "a")
