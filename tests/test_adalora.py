import logging
import warnings

import pytest
import torch

import adapterkit as ak
from adapterkit.methods.adalora import RANKNUM_EPSILON
from conftest import batch, logits, make_base

TARGETS = {"gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "v_proj"]}


def ada_model(arch="llama", **kwargs):
    settings = dict(init_r=6, target_r=3, tinit=2, tfinal=2, deltaT=2, total_step=12, target_modules=TARGETS[arch])
    settings.update(kwargs)
    base = make_base(arch)
    model = ak.AdapterModel(base)
    model.add_adapter("ada", ak.AdaLoraConfig(**settings))
    return base, model


def train(model, steps, call_step=True, on_step=None):
    model.train_adapter("ada")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        inputs = batch(step)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        if call_step:
            model.step(step)
        optimizer.zero_grad()
        if on_step:
            on_step(step)
    model.eval()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"total_step": None}, "needs total_step"),
        ({"total_step": 0}, "total_step must be a positive integer"),
        ({"tinit": 10, "tfinal": 2, "total_step": 12}, r"tinit \(10\) must be below total_step - tfinal"),
        ({"tinit": 0, "tfinal": 12, "total_step": 12}, "leaves no steps to prune"),
        ({"target_r": 8, "init_r": 4}, "must not exceed init_r"),
        ({"init_r": 0}, "init_r must be a positive integer"),
        ({"deltaT": 0}, "deltaT must be a positive integer"),
        ({"beta1": 1.0}, r"beta1 must be in \[0, 1\)"),
        ({"tinit": -1}, "tinit must be a non-negative integer"),
        ({"orth_reg_weight": -0.1}, "orth_reg_weight must be a non-negative"),
        ({"target_modules": []}, "target_modules must name"),
        ({"rank_pattern": {"m": [True]}}, "must be a list of 12 booleans"),
    ],
)
def test_invalid_adalora_configs_are_refused(kwargs, message):
    arguments = {"target_modules": ["q_proj"], "total_step": 100, **kwargs}
    with pytest.raises(ak.ConfigError, match=message):
        ak.AdaLoraConfig(**arguments)


def test_budget_falls_on_a_cubic_schedule():
    _, model = ada_model(init_r=6, target_r=3, tinit=10, tfinal=10, total_step=110)
    allocator = model.method_training("ada")
    modules = 4
    assert allocator.budget(0) == (6 * modules, False) and allocator.budget(10) == (6 * modules, False)
    assert allocator.budget(100) == (3 * modules, True) and allocator.budget(105) == (3 * modules, True)
    assert allocator.budget(60)[0] == int((24 - 12) * 0.5**3 + 12)
    budgets = [allocator.budget(step)[0] for step in range(0, 111)]
    assert budgets == sorted(budgets, reverse=True)


@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_rank_budget_after_the_schedule_is_target_r_per_module(arch, capsys, caplog):
    _, model = ada_model(arch)
    with caplog.at_level(logging.INFO, logger="adapterkit"):
        train(model, 14)
    ranks = model.adapter_ranks("ada")
    modules = {"gpt2": 6, "llama": 4}[arch]  # GPT-2's "c_proj" names both attention and MLP projections
    assert len(ranks) == modules and sum(ranks.values()) == 3 * modules
    assert capsys.readouterr().out == ""  # library code does not print
    logged = caplog.text
    assert (f"final ranks, {3 * modules} in all "
            f"(target {3 * modules} = 3 x {modules} modules, from {6 * modules})") in logged
    for module_name, rank in ranks.items():
        assert f"{module_name}: {rank}" in logged
        module = model.adapter_layers["ada"][module_name.replace(".", "-")]
        assert int(torch.count_nonzero(module.lora_E)) == rank


def test_masks_are_applied_at_the_deltaT_cadence_and_fixed_after(monkeypatch):
    _, model = ada_model(tinit=2, tfinal=2, deltaT=3, total_step=14)
    allocator = model.method_training("ada")
    mask_to_budget = allocator.mask_to_budget
    masked_at, zero_values = [], []  # zero_values gets one entry per finished step

    def recording_mask(budget):
        masked_at.append(len(zero_values))
        return mask_to_budget(budget)

    monkeypatch.setattr(allocator, "mask_to_budget", recording_mask)

    def record(step):
        zero_values.append(sum(int((m.lora_E == 0).sum()) for m in model.adapter_layers["ada"].values()))

    train(model, 16, on_step=record)
    # pruning starts after tinit, every deltaT steps, and the final mask comes at total_step - tfinal
    assert masked_at == [3, 6, 9, 12]
    assert zero_values[12:] == [24 - 12] * 4  # the final mask holds while training goes on
    assert zero_values[:3] == [0, 0, 0]


def test_orthogonality_penalty_is_added_to_the_training_loss():
    _, model = ada_model(orth_reg_weight=0.7)
    model.train_adapter("ada")
    inputs = batch()
    model.eval()
    plain = model(**inputs, labels=inputs["input_ids"]).loss
    model.train()
    penalised = model(**inputs, labels=inputs["input_ids"]).loss
    modules = list(model.adapter_layers["ada"].values())
    norms = []
    for module in modules:
        A, B = module.lora_A.detach(), module.lora_B.detach()
        norms.append(torch.linalg.norm(A @ A.T - torch.eye(A.shape[0])))
        norms.append(torch.linalg.norm(B.T @ B - torch.eye(B.shape[1])))
    expected = 0.7 * torch.stack(norms).mean()
    assert expected > 0.1
    torch.testing.assert_close(penalised - plain, expected, rtol=1e-5, atol=1e-5)
    penalised.backward()
    assert modules[0].lora_A.grad is not None and torch.count_nonzero(modules[0].lora_A.grad) > 0


def test_training_without_step_warns_loudly():
    _, model = ada_model()
    with pytest.warns(UserWarning, match=r"call model\.step\(global_step\) after each optimizer step"):
        train(model, 3, call_step=False)


def test_training_with_step_does_not_warn():
    _, model = ada_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, 4)


def test_step_without_gradients_warns():
    _, model = ada_model()
    model.train_adapter("ada")
    with pytest.warns(UserWarning, match="before optimizer.zero_grad"):
        model.step(0)


def test_saved_adapter_keeps_only_the_kept_ranks_and_loads_back_the_same(tmp_path):
    _, model = ada_model()
    train(model, 13)
    model.set_active("ada")
    expected = logits(model)
    ranks = model.adapter_ranks("ada")
    model.save_adapter("ada", tmp_path / "ada")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "ada" / "adapter_model.safetensors")
    for module_name, rank in ranks.items():
        assert saved[f"{module_name}.adapter.lora_A"].shape[0] == rank
        assert saved[f"{module_name}.adapter.lora_E"].shape == (rank, 1)
        assert saved[f"{module_name}.adapter.lora_B"].shape[1] == rank
    fresh = ak.AdapterModel(make_base("llama"))
    fresh.load_adapter(tmp_path / "ada")
    fresh.set_active("ada")
    torch.testing.assert_close(logits(fresh), expected, rtol=0, atol=1e-6)
    assert fresh.adapter_ranks("ada") == ranks
    # a loaded adapter has finished its schedule: stepping it changes nothing
    fresh.train_adapter("ada")
    fresh.step(20)
    assert fresh.adapter_ranks("ada") == ranks


def test_scale_is_alpha_over_init_r_and_merging_works():
    _, model = ada_model(alpha=16)
    train(model, 13)
    module = next(iter(model.adapter_layers["ada"].values()))
    assert module.scale == 16 / (6 + RANKNUM_EPSILON)
    model.set_active("ada")
    expected = logits(model)
    model.merge("ada")
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)
    model.unmerge()
    assert torch.equal(logits(model), expected)


def test_print_trainable_parameters_counts_adalora(capsys):
    base, model = ada_model(init_r=6)
    model.train_adapter("ada")
    trainable = 2 * ((6 * 32 + 32 * 6 + 6) + (6 * 32 + 16 * 6 + 6))  # q_proj 32->32, v_proj 32->16
    total = sum(p.numel() for p in base.parameters()) + trainable
    model.print_trainable_parameters()
    assert capsys.readouterr().out == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}\n"
    )


def test_ranks_are_only_for_low_rank_adapters():
    model = ak.AdapterModel(make_base("llama"))
    model.add_adapter("b", ak.BottleneckConfig(bottleneck_size=4))
    with pytest.raises(ak.ConfigError, match="bottleneck adapter, which has no rank"):
        model.adapter_ranks("b")


def test_the_final_budget_is_exact_even_when_scores_tie():
    _, model = ada_model()
    model.train_adapter("ada")
    model.step(10)  # at total_step - tfinal, with no importance gathered: every score is zero
    assert sum(model.adapter_ranks("ada").values()) == 3 * 4


def test_an_adapter_saved_mid_schedule_keeps_every_triplet_and_can_go_on(tmp_path):
    _, model = ada_model()
    train(model, 5)  # pruned at steps 3 and 4 (deltaT 2: step 4), final ranks not fixed yet
    assert model.adapters["ada"].rank_pattern is None
    assert any(int((m.lora_E == 0).sum()) for m in model.adapter_layers["ada"].values())
    model.set_active("ada")
    expected = logits(model)
    model.save_adapter("ada", tmp_path / "ada")
    fresh = ak.AdapterModel(make_base("llama"))
    fresh.load_adapter(tmp_path / "ada")
    fresh.set_active("ada")
    assert torch.equal(logits(fresh), expected)
    assert not fresh.method_training("ada").finished


def test_only_adalora_keeps_training_state_and_a_checkpoint_without_it_is_refused():
    model = ak.AdapterModel(make_base("llama"))
    model.add_adapter("b", ak.BottleneckConfig(bottleneck_size=4))
    assert model.training_state("b") == {}  # checkpoints of other methods hold nothing more
    _, model = ada_model()
    train(model, 3)
    assert set(model.training_state("ada")) >= {"final", "model.layers.0.self_attn.q_proj.lora_E.sensitivity"}
    with pytest.raises(ak.AdapterFileError, match="holds no rank-allocation state"):
        model.load_training_state("ada", model.adapter_state_dict("ada"), {})


@pytest.mark.slow
def test_the_lessons_adalora_example_on_the_default_base(capsys):
    base, _ = ak.load_base("smollm2-135m")
    model = ak.AdapterModel(base)
    model.add_adapter("ada", ak.AdaLoraConfig(
        init_r=12, target_r=8, beta1=0.85, beta2=0.85, tinit=200, tfinal=1000, deltaT=10,
        target_modules=["q_proj", "v_proj"], total_step=1500,
    ))
    model.train_adapter("ada")
    model.print_trainable_parameters()
    # 30 layers; q_proj 576->576, v_proj 576->192: 12 * (576 + 576) + 12 + 12 * (576 + 192) + 12 per layer
    assert capsys.readouterr().out == "trainable params: 691,920 || all params: 135,206,928 || trainable%: 0.5117\n"
