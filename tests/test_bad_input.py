"""Adapters tried as an attacker or a careless user would: every bad file, name or call gets our
own error naming the problem, and nothing on disk is lost."""

import json
import os

import pytest
import torch

import adapterkit as ak
from adapterkit.cli import main
from conftest import batch, logits, make_base


def saved(tmp_path, name="a"):
    model = ak.AdapterModel(make_base("llama"))
    model.add_adapter(name, ak.BottleneckConfig(bottleneck_size=4, init="bert"))
    model.save_adapter(name, tmp_path / name)
    return model, tmp_path / name


def edit_config(path, edit):
    document = json.loads((path / "adapter_config.json").read_text())
    edit(document)
    (path / "adapter_config.json").write_text(json.dumps(document))


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def assert_refused_everywhere(path, match, base_dir, tmp_path, capsys, commands=("info", "eval")):
    """load_adapter, `adapterkit info` and `adapterkit eval` all give our error naming the file."""
    before = snapshot(path)
    model = ak.AdapterModel(make_base("llama"))
    with pytest.raises(ak.AdapterkitError, match=match) as caught:
        model.load_adapter(path, name="x")
    assert str(path) in str(caught.value)
    assert model.adapters == {} and snapshot(path) == before
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": " b"}) + "\n")
    capsys.readouterr()
    argvs = {"info": ["info", str(path)],
             "eval": ["eval", str(data), "--adapter", str(path), "--base", str(base_dir), "--max-new-tokens", "2"]}
    for argv in (argvs[command] for command in commands):
        assert main(argv) == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # a progress bar of the base's loading may come first
        assert last.startswith("adapterkit: error: ") and str(path) in last and "Traceback" not in err
    assert snapshot(path) == before


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.pop("base"), "'base' should be the base model's fingerprint"),
    (lambda d: d.update(base=[1, 2]), "'base' should be the base model's fingerprint"),
    (lambda d: d.update(base={}), "'base' should be the base model's fingerprint"),
    (lambda d: d["base"].update(weights_sha256="0" * 64), "made for another base model: the weights differ"),
    (lambda d: d.update(config=[1, 2]), "expected a table of fields, got list"),
    (lambda d: d.pop("config"), "lacks the field 'config'"),
    (lambda d: d.update(method=["bottleneck"]), "unknown adapter method"),
    (lambda d: d["config"].update(scaling="x"), "scaling must be a finite number"),
    (lambda d: d["config"].update(scaling=float("nan")), "scaling must be a finite number"),
    (lambda d: d["config"].update(dropout="0.1"), r"dropout must be in \[0, 1\)"),
    (lambda d: d["config"].update(bottleneck_size=1e400), "bottleneck_size must be a positive integer"),
    (lambda d: d.update(weights_crc32="abc"), "weights_crc32 is 'abc'"),
])
def test_bad_configs_get_our_error(tmp_path, base_dir, capsys, edit, match):
    _, path = saved(tmp_path)
    edit_config(path, edit)
    foreign = "another base" in match  # a well-formed adapter of another base: `info` describes it
    assert_refused_everywhere(path, match, base_dir, tmp_path, capsys, ("eval",) if foreign else ("info", "eval"))


@pytest.mark.parametrize("text, match", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_config_files_get_our_error(tmp_path, base_dir, capsys, text, match):
    _, path = saved(tmp_path)
    (path / "adapter_config.json").write_text(text)
    assert_refused_everywhere(path, match, base_dir, tmp_path, capsys)


@pytest.mark.parametrize("cut", ["empty", "truncated", "huge header"])
def test_bad_weights_files_get_our_error(tmp_path, base_dir, capsys, cut):
    _, path = saved(tmp_path)
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                         "huge header": (2**62).to_bytes(8, "little") + data[8:]}[cut])
    edit_config(path, lambda d: d.pop("weights_crc32"))  # the file itself must be found bad, not only its checksum
    assert_refused_everywhere(path, "adapter_model.safetensors is corrupt", base_dir, tmp_path, capsys)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path, base_dir, capsys, value):
    model, path = saved(tmp_path)
    with torch.no_grad():
        next(iter(model.adapter_layers["a"].parameters())).view(-1)[3] = value
    model.save_adapter("a", path)
    assert_refused_everywhere(path, "NaN or infinite values", base_dir, tmp_path, capsys)


def test_symlinked_files_in_an_adapter_folder_are_refused(tmp_path, base_dir, capsys):
    _, path = saved(tmp_path)
    secret = tmp_path / "elsewhere.safetensors"
    os.replace(path / "adapter_model.safetensors", secret)
    os.symlink(secret, path / "adapter_model.safetensors")
    assert_refused_everywhere(path, "is a symbolic link", base_dir, tmp_path, capsys)
    os.replace(path / "adapter_config.json", tmp_path / "elsewhere.json")
    os.symlink(tmp_path / "elsewhere.json", path / "adapter_config.json")
    with pytest.raises(ak.AdapterFileError, match="adapter_config.json is a symbolic link"):
        ak.AdapterModel(make_base("llama")).load_adapter(path)


@pytest.mark.parametrize("name", ["training", "forward", "update", "keys", "to", "items", "state_dict", "base-2"])
def test_adapter_names_that_shadow_methods_work(tmp_path, name):
    model = ak.AdapterModel(make_base("llama"))
    model.add_adapter(name, ak.LoraConfig(r=2, target_modules=["q_proj"]))
    model.train_adapter(name)
    assert model.active == (name,) and model.training is False and callable(model.to)
    model.save_adapter(name, tmp_path / name)
    model.delete_adapter(name)
    assert model.load_adapter(tmp_path / name) == name
    assert model.adapter_layers[name] is not None and name in model.adapters


def test_the_name_base_is_reserved(tmp_path):
    model = ak.AdapterModel(make_base("llama"))
    with pytest.raises(ak.AdapterNameError, match="'base' cannot name an adapter"):
        model.add_adapter("base", ak.LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("a", ak.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_adapter("a", tmp_path / "a")
    with pytest.raises(ak.AdapterNameError, match="'base' cannot name an adapter"):
        model.load_adapter(tmp_path / "a", name="base")


def test_training_into_a_folder_named_like_a_method_works(tmp_path, base_dir):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{w}:", "completion": f" {w}"}) + "\n" for w in ("a", "b", "c")))
    out = tmp_path / "runs" / "update"
    assert main(["train", "--train", str(data), "-o", str(out), "--base", str(base_dir), "--steps", "2",
                 "--batch-size", "2", "--bottleneck-size", "4", "--no-progress"]) == 0
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["name"] == "update"


def test_resaving_keeps_other_files_in_the_folder(tmp_path):
    model, path = saved(tmp_path)
    (path / "NOTES.md").write_text("what this adapter is for")
    (path / "eval").mkdir()
    (path / "eval" / "scores.json").write_text("{}")
    with torch.no_grad():
        for parameter in model.adapter_layers["a"].parameters():
            parameter.add_(1.0)
    model.save_adapter("a", path)
    assert (path / "NOTES.md").read_text() == "what this adapter is for"
    assert (path / "eval" / "scores.json").read_text() == "{}"
    fresh = ak.AdapterModel(make_base("llama"))
    fresh.load_adapter(path)
    for key, value in model.adapter_state_dict("a").items():
        assert torch.equal(fresh.adapter_state_dict("a")[key], value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_a_second_wrapper_over_one_base_is_refused_until_the_first_lets_go():
    base = make_base("llama")
    bare = logits(base)
    first = ak.AdapterModel(base)
    first.add_adapter("a", ak.BottleneckConfig(bottleneck_size=4, init="bert"))
    first.set_active("a")
    with pytest.raises(ak.AdapterkitError, match="already wrapped by another AdapterModel"):
        ak.AdapterModel(base)
    assert first.unload() is base
    second = ak.AdapterModel(base)
    with second.disabled():
        assert torch.equal(logits(second), bare)  # none of the first wrapper's hooks fire
    with pytest.raises(ak.AdapterkitError, match="let go of its base"):
        first.add_adapter("b", ak.BottleneckConfig(bottleneck_size=4))


def test_deep_copying_an_adapter_model_is_refused_with_the_way_to_a_second_one():
    import copy

    model = ak.AdapterModel(make_base("llama"))
    model.add_adapter("a", ak.LoraConfig(r=2))
    with pytest.raises(ak.ConfigError, match=r"cannot be deep-copied: .* load_adapter\(\) the saved adapters"):
        copy.deepcopy(model)
    assert list(model.adapters) == ["a"]


def test_a_dropped_wrapper_frees_its_base():
    base = make_base("llama")
    bare = logits(base)
    first = ak.AdapterModel(base)
    first.add_adapter("a", ak.BottleneckConfig(bottleneck_size=4, init="bert"))
    first.set_active("a")
    del first
    import gc

    gc.collect()
    second = ak.AdapterModel(base)
    assert torch.equal(logits(second), bare)


def test_a_refused_train_adapter_changes_nothing():
    model = ak.AdapterModel(make_base("llama"))
    model.add_adapter("a", ak.LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("b", ak.LoraConfig(r=2, target_modules=["v_proj"]))
    model.set_active("a")
    model.merge("a")
    with pytest.raises(ak.MergeError, match="merged into the base weights"):
        model.train_adapter("b")
    assert not any(p.requires_grad for p in model.parameters())
    assert model.active == ("a",)


def test_a_state_dict_that_does_not_fit_is_refused_by_add_adapter():
    model = ak.AdapterModel(make_base("llama"))
    config = ak.LoraConfig(r=2, target_modules=["q_proj"])
    model.add_adapter("good", config)
    state = {k: v.clone() for k, v in model.adapter_state_dict("good").items()}
    key = next(iter(state))
    for broken, match in [
        ({**state, key: state[key][:1]}, "has shape"),
        ({**state, key: state[key].long()}, "floating-point"),
        ({k: v for k, v in state.items() if k != key}, "missing"),
        ({**state, "extra.adapter.x": state[key]}, "unexpected"),
    ]:
        with pytest.raises(ak.ShapeMismatchError, match=match):
            model.add_adapter("bad", config, broken)
    assert list(model.adapters) == ["good"]
    model.add_adapter("copy", config, state)
    for k, v in model.adapter_state_dict("copy").items():
        assert torch.equal(v, state[k])
    model.set_active("copy")
    assert logits(model, batch(1)).shape[-1] > 0
