"""LoRA (Hu et al. 2021): a low-rank update of a linear layer, y = W x + s * B A dropout(x).

A is Kaiming-uniform and B zero, so a new adapter is an exact identity. The scale s is alpha / r,
or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023). Because the update is a matrix of the layer's
own shape, it can be folded into the base weight (``AdapterModel.merge``) for zero overhead.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..inject import Site, find_sites
from .base import (
    AdapterConfig,
    AdapterModule,
    Method,
    PeftFormat,
    check_bool,
    check_int,
    check_layers,
    check_number,
    check_target_modules,
    register_method,
)


@dataclasses.dataclass
class LoraConfig(AdapterConfig):
    """r: the rank; alpha: the scale numerator (s = alpha / r); dropout: on the layer input before A;
    target_modules: the linear layers to adapt (names or a regular expression, peft's rule);
    use_rslora: s = alpha / sqrt(r); layers: block indices to adapt (default: all)."""

    method = "lora"

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    layers: list[int] | None = None

    def __post_init__(self) -> None:
        check_int("r", self.r)
        check_number("alpha", self.alpha, positive=True)
        check_number("dropout", self.dropout, 0.0, 1.0)
        self.target_modules = check_target_modules(self.target_modules, required=True)
        check_bool("use_rslora", self.use_rslora)
        self.layers = check_layers(self.layers)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def sites(self, model: nn.Module) -> list[Site]:
        return find_sites(model, "linear", self.layers, self.target_modules)

    def build(self, site: Site, device: torch.device | str | None = None) -> "LoraAdapter":
        return LoraAdapter(site.in_features, site.out_features, self.r, self.scale, self.dropout, device)


class LowRankAdapter(AdapterModule):
    """What LoRA and AdaLoRA share: a low-rank change of the layer's own map, y + s B A x, which
    merges into the weight and stacks with any other low-rank adapter in a mixed batch."""

    changes_layer = True
    mixed = "delta"

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A [r, in], B [out, r], scale): delta(x) = scale * (x @ A.T) @ B.T in eval mode."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.delta(x).add_(y)  # into the fresh delta: no third tensor

    def weight_update(self, site: Site) -> torch.Tensor:
        """s B A in the layout of the layer's weight: [out, in], transposed for GPT-2's Conv1D."""
        A, B, scale = self.low_rank_factors()
        update = (B.float() @ A.float()) * scale
        return update.T if site.transposed else update

    def mixed_kind(self) -> tuple:
        return (LowRankAdapter,)

    @staticmethod
    @torch.no_grad()
    def stack(modules: list["LowRankAdapter"]) -> dict[str, torch.Tensor]:
        """A and s*B of each adapter, zero-padded to the largest rank (exact: a zero row adds nothing)."""
        factors = [module.low_rank_factors() for module in modules]
        r = max(a.shape[0] for a, _, _ in factors)
        down = torch.stack([F.pad(a, (0, 0, 0, r - a.shape[0])) for a, _, _ in factors])
        up = torch.stack([F.pad(b * scale, (0, r - b.shape[1])) for _, b, scale in factors])
        return {"down_t": down.transpose(1, 2).contiguous(), "up_t": up.transpose(1, 2).contiguous()}

    @staticmethod
    def grouped_delta(kind: tuple, h: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.bmm(torch.bmm(h, weights["down_t"]), weights["up_t"])


class LoraAdapter(LowRankAdapter):
    """The update of one linear layer. ``forward(x, y)`` returns y + delta(x), x the layer's input."""

    def __init__(self, in_features: int, out_features: int, r: int, scale: float, dropout: float, device=None):
        super().__init__()
        self.scale = scale
        self.dropout = dropout
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device))
        if device is None or torch.device(device).type != "meta":
            self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B.zero_()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout)
        return F.linear(F.linear(x, self.lora_A) * self.scale, self.lora_B)  # scaled at width r: cheapest

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_A, self.lora_B, self.scale


def layers_from_peft(values: dict) -> dict:
    """peft writes ``layers_to_transform`` as one int or a list."""
    if isinstance(values.get("layers"), int):
        values["layers"] = [values["layers"]]
    return values


def _lora_to_peft(config: AdapterConfig, sites: list[Site], document: dict) -> None:
    document["fan_in_fan_out"] = any(site.transposed for site in sites)
    document["bias"] = "none"


register_method(Method(
    "lora", LoraConfig,
    peft=PeftFormat(
        "LORA",
        {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "target_modules",
         "use_rslora": "use_rslora", "layers_to_transform": "layers"},
        tensor_suffix=".weight", from_peft=layers_from_peft, to_peft=_lora_to_peft,
    ),
))
