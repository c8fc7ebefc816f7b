"""AdapterFusion's parameters (Pfeiffer et al. 2021), kept as an adapter of their own.

A ``Fuse(a, b, ..., name=...)`` block mixes, at each site, the changes its children make to the
layer's output: with y the layer's output and d_i child i's change, q = W_q y + b_q,
k_i = W_k d_i + b_k, a = softmax(q . k_i / temperature) over the children, and the output becomes
y + W_v sum_i a_i d_i. W_v starts as the identity and W_q, W_k as N(0, 0.02), so a new fusion
averages its children. Only these parameters train; the children stay frozen. Because the
fusion is registered as a method, it saves, loads, fingerprints and trains like any adapter;
loading it needs its children to be there.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..compose import adapter_names, from_json, fusions
from ..errors import ConfigError
from ..inject import Site
from .base import AdapterConfig, AdapterModule, Method, check_choice, check_number, is_meta, register_method


@dataclasses.dataclass
class FusionConfig(AdapterConfig):
    """children: the fused blocks, as ``compose.to_json`` writes them; widths: the output width at
    each base module where a child acts; temperature: of the softmax over children; query:
    "output" (the layer's output y) or "adapter_input" (what the last child reads, as AdapterHub
    takes it)."""

    method = "fusion"
    runs_inside_composition = True

    children: list[Any] = dataclasses.field(default_factory=list)
    widths: dict[str, int] = dataclasses.field(default_factory=dict)
    temperature: float = 1.0
    query: str = "output"

    def __post_init__(self) -> None:
        if not isinstance(self.children, list) or not self.children:
            raise ConfigError(f"a fusion needs the blocks it fuses, got {self.children!r}")
        if not isinstance(self.widths, dict) or not self.widths or not all(
            isinstance(k, str) and isinstance(v, int) and v > 0 for k, v in self.widths.items()
        ):
            raise ConfigError(f"a fusion needs the width of each module it acts at, got {self.widths!r}")
        check_number("temperature", self.temperature, positive=True)
        check_choice("query", self.query, ("output", "adapter_input"))

    def depends_on(self) -> list[str]:
        blocks = [from_json(child) for child in self.children]
        return ([name for block in blocks for name in adapter_names(block)]
                + [f.name for block in blocks for f in fusions(block)])

    def sites(self, model: nn.Module) -> list[Site]:
        modules = dict(model.named_modules())
        missing = sorted(set(self.widths) - set(modules))
        if missing:
            raise ConfigError(f"the fusion acts at modules this base does not have: {missing[:3]}")
        return [Site(module_name=name, in_features=width, out_features=width) for name, width in self.widths.items()]

    def build(self, site: Site, device: torch.device | str | None = None) -> FusionLayer:
        return FusionLayer(site.out_features, self.temperature, self.query, device)


class FusionLayer(AdapterModule):
    """The fusion at one site; the hook layer calls ``fuse`` while it runs a Fuse block."""

    hook = "composition"

    def __init__(self, width: int, temperature: float, query: str = "output", device=None) -> None:
        super().__init__()
        self.temperature = temperature
        self.query = query
        empty = lambda *shape: nn.Parameter(torch.empty(*shape, device=device))
        self.query_weight, self.query_bias = empty(width, width), empty(width)
        self.key_weight, self.key_bias = empty(width, width), empty(width)
        self.value_weight = empty(width, width)
        if not is_meta(device):
            with torch.no_grad():
                self.query_weight.normal_(0.0, 0.02)
                self.key_weight.normal_(0.0, 0.02)
                self.query_bias.zero_()
                self.key_bias.zero_()
                self.value_weight.copy_(torch.eye(width))

    def fuse(self, y: torch.Tensor, deltas: list[torch.Tensor], query: torch.Tensor) -> torch.Tensor:
        """y plus the children's changes ``deltas`` mixed by attention from ``query``."""
        changes = torch.stack(deltas, dim=-2)  # [..., children, d]
        query = F.linear(query, self.query_weight, self.query_bias)
        keys = F.linear(changes, self.key_weight, self.key_bias)
        weights = torch.softmax((keys * query.unsqueeze(-2)).sum(-1) / self.temperature, dim=-1)
        return y + F.linear((weights.unsqueeze(-1) * changes).sum(-2), self.value_weight)


register_method(Method("fusion", FusionConfig, trains_alone=False))
