"""DoRA (LoraConfig(use_dora=True)): peft's maths, checkpoints both ways, merging, mixed rows, training."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import adapterkit as ak
from conftest import batch, biased_base, logits, rows_alone

# GPT-2 adapts Conv1D layers (weight [in, out], with bias); Llama adapts nn.Linear (weight [out, in], no bias).
TARGETS = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "down_proj"]}
ARCHS = sorted(TARGETS)




def dora_model(arch, name="dora", **kwargs):
    base = biased_base(arch)
    model = ak.AdapterModel(base)
    model.add_adapter(name, ak.LoraConfig(r=4, alpha=8, target_modules=TARGETS[arch], use_dora=True, **kwargs))
    return base, model


def randomize(model, name, seed=1):
    """Non-zero B and a magnitude away from its start, as training would leave them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.adapter_layers[name].values():
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.1)
            magnitude = module.lora_magnitude_vector
            magnitude.mul_(1 + 0.2 * torch.randn(magnitude.shape, generator=generator))


def base_weight(layer, arch):
    return layer.weight.T if arch == "gpt2" else layer.weight


@pytest.mark.parametrize("arch", ARCHS)
def test_new_dora_is_an_exact_identity(arch):
    base, model = dora_model(arch)
    before = logits(base)
    model.set_active("dora")
    assert torch.equal(logits(model), before)
    site = model.adapter_sites("dora")[0]
    module = next(iter(model.adapter_layers["dora"].values()))  # the first site's
    weight = base_weight(base.get_submodule(site.module_name), arch)
    assert torch.count_nonzero(module.lora_B) == 0
    assert torch.equal(module.lora_magnitude_vector, torch.linalg.norm(weight, dim=1))


@pytest.mark.parametrize("arch", ARCHS)
def test_dora_layer_is_the_papers_formula_and_peft_dropout_path(arch):
    base, model = dora_model(arch, dropout=0.5)
    randomize(model, "dora")
    site = model.adapter_sites("dora")[0]
    layer = base.get_submodule(site.module_name)
    module = next(iter(model.adapter_layers["dora"].values()))
    W, A, B, m, s = base_weight(layer, arch), module.lora_A, module.lora_B, module.lora_magnitude_vector, module.scale
    bias = layer.bias if layer.bias is not None else 0
    x = torch.randn(3, 5, W.shape[1])
    y = layer(x)
    updated = W + s * B @ A
    norm = torch.linalg.norm(updated, dim=1)
    with torch.no_grad():
        module.eval()  # m * (W + sBA) / ||W + sBA|| x + b: the paper's DoRA
        paper = x @ (m[:, None] * updated / norm[:, None]).T + bias
        torch.testing.assert_close(module(x, y), paper, rtol=0, atol=1e-5)
        module.train()  # peft: dropout on x in both extra terms, (g - 1) W x' + g s B A x'
        torch.manual_seed(7)
        ours = module(x, y)
        torch.manual_seed(7)
        dropped = torch.nn.functional.dropout(x, 0.5)
        g = m / norm
        expected = y + (g - 1) * (dropped @ W.T) + g * s * (dropped @ A.T @ B.T)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def peft_dora(arch, path):
    """A DoRA made by peft, with random B and magnitudes, saved to ``path``; returns its logits."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], use_dora=True,
                             fan_in_fan_out=arch == "gpt2")
    model = peft.get_peft_model(biased_base(arch), config).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
            elif "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.2 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_dora_gives_peft_logits_and_gradients(arch, tmp_path):
    theirs = peft_dora(arch, tmp_path / "peft-dora")
    model = ak.AdapterModel(biased_base(arch))
    name = model.load_adapter(tmp_path / "peft-dora")
    assert model.adapters[name].use_dora
    model.set_active(name)
    torch.testing.assert_close(logits(model), logits(theirs), rtol=0, atol=1e-5)
    # the same gradients: the norm is a constant in both (no gradient reaches A or B through it)
    model.train_adapter(name)
    inputs = batch(1)
    for each in (model, theirs):
        each(**inputs, labels=inputs["input_ids"]).loss.backward()
    peft_grads = {key: p.grad for key, p in theirs.named_parameters() if p.grad is not None}
    for module, site in zip(model.adapter_layers[name].values(), model.adapter_sites(name)):  # both in site order
        for param in ("lora_A", "lora_B", "lora_magnitude_vector"):
            expected = peft_grads[f"base_model.model.{site.module_name}.{param}.default.weight"]
            torch.testing.assert_close(getattr(module, param).grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_our_dora_loads_in_peft_with_the_same_logits_and_key_names(arch, tmp_path):
    _, model = dora_model(arch)
    randomize(model, "dora")
    model.set_active("dora")
    expected = logits(model)
    model.save_adapter("dora", tmp_path / "ours", format="peft")
    loaded = peft.PeftModel.from_pretrained(biased_base(arch), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    loaded.save_pretrained(tmp_path / "again")  # peft's own names for the same adapter
    theirs = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(theirs)
    assert any(key.endswith(".lora_magnitude_vector") for key in theirs)


@pytest.mark.parametrize("arch", ARCHS)
def test_dora_rows_match_alone_beside_lora_bottleneck_and_base(arch):
    _, model = dora_model(arch)
    model.add_adapter("dora2", ak.LoraConfig(r=2, alpha=4, target_modules=TARGETS[arch][:1], use_dora=True))
    model.add_adapter("lora", ak.LoraConfig(r=8, target_modules=TARGETS[arch]))
    model.add_adapter("bottleneck", ak.BottleneckConfig(bottleneck_size=4, init="bert"))
    randomize(model, "dora")
    randomize(model, "dora2", seed=2)
    with torch.no_grad():
        for module in model.adapter_layers["lora"].values():
            module.lora_B.normal_(0, 0.1)
    names = ["dora", "lora", "base", "dora2", "bottleneck", "dora", "lora", "dora2"]
    inputs = batch(seed=4, rows=len(names))
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names).logits
    assert (mixed - rows_alone(model, inputs, names)).abs().max().item() <= 1e-5
    assert not torch.allclose(mixed[0], mixed[1]) and not torch.allclose(mixed[0], mixed[3])


@pytest.mark.parametrize("arch", ARCHS)
def test_training_moves_only_the_dora_parameters(arch):
    base, model = dora_model(arch, dropout=0.1)
    before_base = {name: p.detach().clone() for name, p in base.named_parameters()}
    before = {name: p.detach().clone() for name, p in model.adapter_layers["dora"].named_parameters()}
    model.train_adapter("dora")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        with torch.inference_mode():  # as the generation engine evaluates between steps
            model(**batch(9))
        inputs = batch(step)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        magnitude = next(iter(model.adapter_layers["dora"].values())).lora_magnitude_vector
        assert magnitude.grad is not None and magnitude.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert all(torch.equal(p, before_base[name]) for name, p in base.named_parameters())
    moved = {name.rsplit(".", 1)[-1] for name, p in model.adapter_layers["dora"].named_parameters()
             if not torch.equal(p, before[name])}
    assert moved == {"lora_A", "lora_B", "lora_magnitude_vector"}


def test_dora_saves_loads_and_stacks_with_a_bottleneck(tmp_path):
    _, model = dora_model("llama")
    randomize(model, "dora")
    model.add_adapter("bottleneck", ak.BottleneckConfig(bottleneck_size=4, init="bert"))
    model.set_active("dora")
    expected = logits(model)
    model.save_adapter("dora", tmp_path / "dora")
    again = ak.AdapterModel(biased_base("llama"))
    again.set_active(again.load_adapter(tmp_path / "dora"))
    assert again.adapters["dora"].use_dora
    assert torch.equal(logits(again), expected)
    # the stack against its parts: DoRA merged into the weights, then the bottleneck on top
    model.set_active(ak.Stack("dora", "bottleneck"))
    stacked = logits(model)
    assert not torch.allclose(stacked, expected)
    model.set_active(None)
    model.merge("dora")
    model.set_active(["dora", "bottleneck"])
    torch.testing.assert_close(logits(model), stacked, rtol=0, atol=1e-5)


def test_dora_adapters_are_not_combined():
    _, model = dora_model("llama")
    model.add_adapter("other", ak.LoraConfig(r=4, alpha=8, target_modules=TARGETS["llama"], use_dora=True))
    with pytest.raises(ak.ConfigError, match="DoRA adapters cannot be combined"):
        model.merge_adapters("both", ["dora", "other"], [0.5, 0.5], method="cat")


def test_the_command_line_trains_a_dora(tmp_path, base_dir):
    from adapterkit.cli import main

    data = tmp_path / "de.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"English: {e}\nGerman:", "completion": f" {g}"}) + "\n"
                            for e, g in [("cat", "Katze"), ("dog", "Hund"), ("sun", "Sonne")]))
    out = tmp_path / "run"
    assert main(["train", "--train", str(data), "-o", str(out), "--base", str(base_dir),
                 "--method", "lora", "--use-dora", "true", "--target-modules", "q_proj,v_proj",
                 "--steps", "2", "--batch-size", "3", "--metric", "none", "--no-progress"]) == 0
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["config"]["use_dora"] is True
    assert sum(key.endswith("lora_magnitude_vector") for key in tensors) == 4  # q and v in both layers
