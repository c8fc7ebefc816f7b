"""LoRA (Hu et al. 2021): a low-rank update of a linear layer, y = W x + s * B A dropout(x).

A is Kaiming-uniform and B zero, so a new adapter is an exact identity. The scale s is alpha / r,
or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023). Because the update is a matrix of the layer's
own shape, it can be folded into the base weight (``AdapterModel.merge``) for zero overhead.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..inject import Site, find_sites
from . import AdapterConfig


def check_target_modules(target_modules) -> list[str] | str:
    """LoRA-like methods adapt named linear layers; there is no structural default."""
    if isinstance(target_modules, str) and target_modules:
        return target_modules
    if isinstance(target_modules, (list, tuple)) and target_modules and all(isinstance(t, str) and t for t in target_modules):
        return list(target_modules)
    raise ConfigError(
        f"target_modules must name the linear layers to adapt (a list such as ['q_proj', 'v_proj'] "
        f"or a regular expression), got {target_modules!r}"
    )


def check_layers(layers) -> list[int] | None:
    if layers is None:
        return None
    layers = list(layers)
    if not all(isinstance(i, int) and i >= 0 for i in layers):
        raise ConfigError(f"layers must be non-negative layer indices, got {layers!r}")
    return layers


def check_dropout(dropout) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")


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
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ConfigError(f"r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}")
        check_dropout(self.dropout)
        self.target_modules = check_target_modules(self.target_modules)
        self.layers = check_layers(self.layers)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def sites(self, model: nn.Module) -> list[Site]:
        return find_sites(model, "linear", self.layers, self.target_modules)

    def build(self, site: Site, device: torch.device | str | None = None) -> "LoraAdapter":
        return LoraAdapter(site.in_features, site.out_features, self.r, self.scale, self.dropout, device)


class LoraAdapter(nn.Module):
    """The update of one linear layer. ``forward(x, y)`` returns y + delta(x), x the layer's input."""

    acts_on_input: ClassVar[bool] = True  # changes the layer itself: runs before output transforms

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

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.delta(x).add_(y)  # into the fresh delta: no third tensor

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A [r, in], B [out, r], scale): delta(x) = scale * (x @ A.T) @ B.T in eval mode."""
        return self.lora_A, self.lora_B, self.scale
