"""Dtypes and devices: a bfloat16 base trains float32 adapters on CPU, adapters load over any dtype
of the base they were saved from, gradient checkpointing gives the gradients of a plain backward
pass, and bad device or dtype names get our errors."""

import json

import pytest
import torch

import adapterkit as ak
from adapterkit.bases import resolve_device, resolve_dtype
from adapterkit.cli import main
from adapterkit.train import ADAPTER_DIR, METRICS_FILE, TrainConfig, Trainer
from conftest import batch, tiny_llama, tiny_tokenizer
from test_train import EXAMPLES

LORA = dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"])


def configs() -> dict:
    return {
        "bottleneck": ak.BottleneckConfig(bottleneck_size=8, init="bert", dropout=0.1),
        "lora": ak.LoraConfig(**LORA, dropout=0.1),
        "adalora": ak.AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj", "v_proj"], total_step=10,
                                    dropout=0.1),
    }


def test_a_bfloat16_base_trains_float32_adapters_that_reload_and_mix(tmp_path):
    base = tiny_llama().to(torch.bfloat16)
    model = ak.AdapterModel(base)
    torch.manual_seed(0)
    model.add_adapter("de", ak.LoraConfig(**LORA))
    assert {t.dtype for t in model.adapter_state_dict("de").values()} == {torch.float32}
    config = TrainConfig(steps=20, batch_size=4, lr=2e-2, max_length=32, progress=False, metric="none")
    Trainer(model, tiny_tokenizer(), EXAMPLES, config, tmp_path, adapter_name="de").train()
    losses = [json.loads(line)["loss"] for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert len(losses) == 20 and sum(losses[-5:]) < sum(losses[:5]) - 0.25
    saved = json.loads((tmp_path / ADAPTER_DIR / "adapter_config.json").read_text())
    assert saved["dtype"] == "float32" and saved["base"]["dtype"] == "bfloat16"
    model.eval()
    inputs = batch(rows=4)
    with torch.no_grad():
        trained = model(**inputs).logits
    assert trained.dtype == torch.bfloat16
    reloaded = ak.AdapterModel(model.unload())
    reloaded.load_adapter(tmp_path / ADAPTER_DIR, name="de")
    reloaded.load_adapter(tmp_path / ADAPTER_DIR, name="again")
    reloaded.set_active("de")
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, trained)
        rows = ["de", None, "again", "de"]
        mixed = reloaded(**inputs, adapter_names=rows).logits
        for row, name in enumerate(rows):
            reloaded.set_active(name)
            alone = reloaded(**{k: v[row : row + 1] for k, v in inputs.items()}).logits[0]
            assert torch.allclose(mixed[row].float(), alone.float(), rtol=0, atol=0.05)  # bfloat16 keeps 8 bits


def saved_over(tmp_path, dtype: torch.dtype, name: str = "a"):
    model = ak.AdapterModel(tiny_llama().to(dtype))
    torch.manual_seed(0)
    model.add_adapter(name, ak.LoraConfig(**LORA))
    model.save_adapter(name, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("saved, loaded", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                           (torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
def test_an_adapter_loads_over_another_dtype_of_its_base(tmp_path, saved, loaded):
    path = saved_over(tmp_path, saved)
    model = ak.AdapterModel(tiny_llama().to(loaded))
    model.load_adapter(path)
    assert {t.dtype for t in model.adapter_state_dict("a").values()} == {torch.float32}
    model.load_adapter(path, name="half", dtype=torch.bfloat16)
    assert {t.dtype for t in model.adapter_state_dict("half").values()} == {torch.bfloat16}


def test_two_half_copies_are_refused_as_dtype_differs_and_other_weights_as_weights_differ(tmp_path):
    path = saved_over(tmp_path, torch.bfloat16)
    with pytest.raises(ak.BaseMismatchError,
                       match=r"the dtype differs \(bfloat16 there, float16 here\).*float32 base or a bfloat16 copy"):
        ak.AdapterModel(tiny_llama().to(torch.float16)).load_adapter(path)
    other = tiny_llama()
    with torch.no_grad():
        other.lm_head.weight.mul_(2)
    with pytest.raises(ak.BaseMismatchError,
                       match=r"the weights differ \(and the dtype: bfloat16 there, float32 here\)"):
        ak.AdapterModel(other).load_adapter(path)


def test_the_fingerprint_follows_a_base_cast_after_wrapping(tmp_path):
    model = ak.AdapterModel(tiny_llama())
    model.add_adapter("a", ak.LoraConfig(**LORA))
    model.save_adapter("a", tmp_path / "fp32")
    model.to(torch.bfloat16)
    model.save_adapter("a", tmp_path / "bf16")
    records = [json.loads((tmp_path / name / "adapter_config.json").read_text())["base"] for name in ("fp32", "bf16")]
    assert [r["dtype"] for r in records] == ["float32", "bfloat16"]
    assert records[0]["shapes_sha256"] == records[1]["shapes_sha256"]
    assert records[0]["weights_sha256_as"]["bfloat16"] == records[1]["weights_sha256"]


def test_an_adapter_saved_before_dtypes_were_recorded_still_loads_over_float32(tmp_path):
    """Its fingerprint hashed names, shapes and dtypes of a float32 base, and has no "dtype"."""
    import hashlib

    path = saved_over(tmp_path, torch.float32)
    legacy = hashlib.sha256()
    for name, tensor in tiny_llama().state_dict().items():
        legacy.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    document = json.loads((path / "adapter_config.json").read_text())
    for key in ("dtype", "weights_sha256_as"):
        del document["base"][key]
    document["base"]["shapes_sha256"] = legacy.hexdigest()
    (path / "adapter_config.json").write_text(json.dumps(document))
    ak.AdapterModel(tiny_llama()).load_adapter(path)
    with pytest.raises(ak.BaseMismatchError,
                       match=r"the dtype differs \(float32 there, bfloat16 here\).*over the float32 base"):
        # it holds no bfloat16 hash to check against
        ak.AdapterModel(tiny_llama().to(torch.bfloat16)).load_adapter(path)


# ---- gradient checkpointing ------------------------------------------------------------------------
def test_the_trainer_with_checkpointing_trains_the_same_adapter(tmp_path):
    results = []
    for checkpointing in (False, True):
        model = ak.AdapterModel(tiny_llama())
        torch.manual_seed(0)
        model.add_adapter("de", configs()["lora"])
        config = TrainConfig(steps=4, batch_size=4, lr=1e-2, max_length=32, progress=False, metric="none")
        Trainer(model, tiny_tokenizer(), EXAMPLES, config, tmp_path / str(checkpointing), adapter_name="de",
                gradient_checkpointing=checkpointing).train()
        results.append(model.adapter_state_dict("de"))
    for key in results[0]:
        assert torch.allclose(results[0][key], results[1][key], rtol=0, atol=1e-6)


def test_reentrant_checkpointing_is_refused():
    model = ak.AdapterModel(tiny_llama())
    with pytest.raises(ak.ConfigError, match="use_reentrant=False"):
        model.gradient_checkpointing_enable({"use_reentrant": True})


# ---- names -----------------------------------------------------------------------------------------
def test_device_and_dtype_names_are_checked():
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype(None) is torch.float32
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(ak.ConfigError, match=r"dtype must be one of \['float32', 'bfloat16', 'float16'\], got 'int8'"):
        resolve_dtype("int8")
    with pytest.raises(ak.ConfigError, match="device must be one of cpu, cuda, cuda:N, mps, got 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ak.ConfigError, match="torch sees no CUDA device here"):
            resolve_device("cuda:0")


def test_the_cli_trains_in_bfloat16_and_refuses_a_missing_device(tmp_path, capsys):
    folder = tmp_path / "base"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    argv = ["train", "--train", str(data), "--base", str(folder), "-o", str(tmp_path / "out"), "--steps", "2",
            "--batch-size", "4", "--metric", "none", "--no-progress", "--dtype", "bfloat16",
            "--gradient-checkpointing"]
    assert main(argv) == 0
    saved = json.loads((tmp_path / "out" / ADAPTER_DIR / "adapter_config.json").read_text())
    assert saved["base"]["dtype"] == "bfloat16"
    assert main(["eval", str(data), "--adapter", str(tmp_path / "out" / ADAPTER_DIR), "--base", str(folder),
                 "--dtype", "bfloat16", "--metric", "none"]) == 0
    capsys.readouterr()
    assert main([*argv, "--device", "nowhere"]) == 2
    assert "adapterkit: error: device must be one of cpu, cuda, cuda:N, mps" in capsys.readouterr().err
    assert main([*argv, "--fsdp"]) == 2
    assert "launch with torchrun" in capsys.readouterr().err
