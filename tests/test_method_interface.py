"""What the core asks of a method, and says back: placements that cannot be made in full, peft's
spellings taken from the one field map, capabilities declared on the config."""

import dataclasses

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.cli import adapter_options, flag_value
from adapterkit.methods import get_method, registered_methods


class MlpBlock(nn.Module):
    """A block with a feed-forward sub-layer and no attention."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(h)


class AttentionBlock(MlpBlock):
    def __init__(self, width: int) -> None:
        super().__init__(width)
        self.attn = nn.ModuleDict({"q": nn.Linear(width, width), "o": nn.Linear(width, width)})

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn["o"](self.attn["q"](h))
        return super().forward(h)


class MixedBlock(nn.Module):
    """Attention in some blocks only: one block type, as find_blocks needs."""

    def __init__(self, width: int, attention: bool) -> None:
        super().__init__()
        self.inner = AttentionBlock(width) if attention else MlpBlock(width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.inner(h)


class TinyModel(nn.Module):
    def __init__(self, blocks: list[nn.Module], width: int = 16) -> None:
        super().__init__()
        self.config = type("Config", (), {"hidden_size": width})()
        self.embed = nn.Embedding(11, width)
        self.layers = nn.ModuleList(blocks)

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        h = self.embed(input_ids)
        for block in self.layers:
            h = block(h)
        return h


def mlp_only() -> TinyModel:
    torch.manual_seed(0)
    return TinyModel([MlpBlock(16) for _ in range(3)])


@pytest.mark.parametrize("placement", ["houlsby", "parallel"])
def test_a_placement_whose_sub_layer_is_missing_says_so(placement):
    model = ak.AdapterModel(mlp_only())
    with pytest.raises(ak.ConfigError) as error:
        model.add_adapter("a", ak.BottleneckConfig(placement=placement))
    message = str(error.value)
    assert f"placement {placement!r}" in message and "no attention sub-layer" in message
    assert "placement='pfeiffer'" in message  # what would work
    assert "a" not in model.adapters
    model.add_adapter("a", ak.BottleneckConfig(placement="pfeiffer"))
    assert [site.module_name for site in model.adapter_sites("a")] == [f"layers.{i}.mlp.2" for i in range(3)]


def test_blocks_without_the_sub_layer_are_named_and_the_complete_ones_offered():
    torch.manual_seed(0)
    model = ak.AdapterModel(TinyModel([MixedBlock(16, attention=i != 1) for i in range(3)]))
    with pytest.raises(ak.ConfigError,
                       match=r"1 block\(s\) of TinyModel \(layers\.1\) have no attention sub-layer.*layers=\[0, 2\]"):
        model.add_adapter("a", ak.BottleneckConfig(placement="houlsby"))
    model.add_adapter("a", ak.BottleneckConfig(placement="houlsby", layers=[0, 2]))  # only blocks that have both
    assert len(model.adapter_sites("a")) == 4
    model.add_adapter("b", ak.BottleneckConfig(placement="houlsby", target_modules=["mlp.2"]))  # named: no placement
    assert len(model.adapter_sites("b")) == 3


def test_a_model_with_every_sub_layer_places_as_before():
    torch.manual_seed(0)
    model = ak.AdapterModel(TinyModel([AttentionBlock(16) for _ in range(2)]))
    model.add_adapter("a", ak.BottleneckConfig(placement="houlsby"))
    assert sorted(site.sublayer for site in model.adapter_sites("a")) == ["attention", "attention", "ffn", "ffn"]


# ---- peft's spellings ----------------------------------------------------------------------------------
def test_peft_spellings_come_from_the_peft_field_map():
    for method in registered_methods():
        expected = {} if method.peft is None else {t: o for t, o in method.peft.fields.items() if t != o}
        assert method.config_class.peft_names() == expected
        fields = {f.name for f in dataclasses.fields(method.config_class)}
        assert set(expected.values()) <= fields  # every peft name lands on a field of ours
    assert ak.VeraConfig.from_dict({"vera_dropout": 0.25}).dropout == 0.25


def test_a_field_given_in_both_spellings_must_agree():
    assert ak.LoraConfig(alpha=16, lora_alpha=16).alpha == 16
    with pytest.raises(ak.ConfigError, match="lora_alpha is peft's name for alpha: give one of them"):
        ak.LoraConfig(alpha=8, lora_alpha=16)
    with pytest.raises(ak.ConfigError, match="layers_to_transform is peft's name for layers"):
        ak.IA3Config.from_dict({"layers": [0], "layers_to_transform": [1]})
    assert ak.LoraConfig(lora_alpha=None).alpha == 8.0  # None in peft's spelling: not given


# ---- capabilities ---------------------------------------------------------------------------------------
def test_only_the_fusion_runs_inside_a_composition():
    inside = {m.name for m in registered_methods() if m.config_class.runs_inside_composition}
    assert inside == {ak.FusionConfig.method}
    assert get_method(ak.FusionConfig.method).trains_alone is False


def test_run_length_fields_are_declared_by_the_config():
    declared = {m.name: m.config_class.run_length_fields for m in registered_methods()
                if m.config_class.run_length_fields}
    assert declared == {ak.AdaLoraConfig.method: frozenset({"total_step"})}


def test_cli_flags_parse_lists_by_the_field_type():
    options = adapter_options()
    for option in ("target_modules", "feedforward_modules"):
        assert flag_value(option, options[option][1])("q_proj, v_proj") == ["q_proj", "v_proj"]
    assert flag_value("layers", options["layers"][1])("0-2,5") == [0, 1, 2, 5]
    assert flag_value("r", options["r"][1])("4") == 4
