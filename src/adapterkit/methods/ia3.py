"""IA³ (Liu et al. 2022): learned vectors that rescale a few activations, and nothing else.

The outputs of attention's key and value projections are multiplied by a vector (one factor per
output channel), and so is the input of the feed-forward output projection (one factor per input
channel). The vectors start at 1, an exact identity. A per-channel scale of a linear layer folds
into its weight: rows (and bias) for outputs, columns for inputs.

Defaults follow peft's table for Llama (k_proj, v_proj; down_proj), GPT-2 (c_attn; mlp.c_proj) and
BERT (key, value; output.dense), found from structure instead: in each block, the attention's input
projections after the query (a fused one: itself) and the feed-forward output projection, each
named by its last two name parts and matched by peft's rule (the name or its dotted ending).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import ConfigError
from ..inject import Site, find_blocks, find_sites, hidden_size, linear_features, matches_target, sub_layers
from .base import (
    AdapterConfig,
    AdapterModule,
    Method,
    PeftFormat,
    average_parameters,
    check_bool,
    check_layers,
    check_target_modules,
    is_meta,
    register_method,
)


@dataclasses.dataclass
class IA3Config(AdapterConfig):
    """target_modules: the linear layers to rescale (names or a regular expression, peft's rule);
    feedforward_modules: those among them whose input, not output, is rescaled; with neither, the
    structural default above. layers: block indices to adapt (default: all).
    init_ia3_weights: start at 1 (identity); False draws N(1, 0.02), for tests."""

    method = "ia3"

    target_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    layers: list[int] | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        self.target_modules = check_target_modules(self.target_modules, required=False)
        if self.feedforward_modules is not None:
            if self.target_modules is None:
                raise ConfigError("feedforward_modules needs target_modules: name the layers to rescale as well")
            self.feedforward_modules = check_target_modules(self.feedforward_modules, required=True)
        self.layers = check_layers(self.layers)
        check_bool("init_ia3_weights", self.init_ia3_weights)

    def sites(self, model: nn.Module) -> list[Site]:
        """Feed-forward sites read the layer's input (``reads_from``); the others its output."""
        targets, feedforward = (self.target_modules, self.feedforward_modules or [])
        if targets is None:
            targets, feedforward = default_modules(model)
        sites = []
        for site in find_sites(model, "linear", self.layers, targets):
            if not matches_target(site.module_name, feedforward):
                site = dataclasses.replace(site, reads_from=None, in_features=site.out_features)
            sites.append(site)
        return sites

    def build(self, site: Site, device: torch.device | str | None = None) -> IA3Adapter:
        return IA3Adapter(site.in_features, site.reads_from is not None, self.init_ia3_weights, device)


def default_modules(model: nn.Module) -> tuple[list[str], list[str]]:
    """(target_modules, feedforward_modules) as peft would name them for this model."""
    d_model = hidden_size(model)
    attention, feedforward = set(), set()
    for _list_name, blocks in find_blocks(model):
        for block in blocks:
            groups, ffn = sub_layers(block, d_model)
            for group in groups:
                readers = [name for name, m in group[:-1]
                           if linear_features(m)[0] == (d_model or linear_features(m)[0])]
                attention.update(readers if len(readers) == 1 else readers[1:])
            if ffn:
                feedforward.add(ffn[-1][0])
    if not attention and not feedforward:
        raise ConfigError(f"found no attention or feed-forward layers in {type(model).__name__}; "
                          "name them with target_modules")
    short = lambda names: sorted({".".join(name.split(".")[-2:]) for name in names})
    return short(attention | feedforward), short(feedforward)


class IA3Adapter(AdapterModule):
    """One learned vector: multiplies the layer's output (``hook = "output"``) or its input
    (``hook = "input"``, feed-forward layers). Shaped as peft keeps it, [out, 1] or [1, in]."""

    mixed = "scale"

    def __init__(self, width: int, feedforward: bool, init_identity: bool, device=None) -> None:
        super().__init__()
        self.hook = "input" if feedforward else "output"
        self.scale_dim = "in" if feedforward else "out"
        self.ia3_l = nn.Parameter(torch.empty((1, width) if feedforward else (width, 1), device=device))
        if not is_meta(device):
            with torch.no_grad():
                self.ia3_l.fill_(1.0) if init_identity else self.ia3_l.normal_(1.0, 0.02)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y * self.ia3_l.view(-1)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.ia3_l.view(-1)

    def scale_vector(self) -> torch.Tensor:
        return self.ia3_l.view(-1)

    def weight_scale(self) -> torch.Tensor:
        return self.ia3_l.view(-1)

    def mixed_kind(self) -> tuple:
        return (IA3Adapter, self.hook)


def _ia3_to_peft(config: IA3Config, sites: list[Site], document: dict) -> None:
    """Name the modules exactly, whatever the config said, so peft rebuilds the same sites."""
    document["target_modules"] = [site.module_name for site in sites]
    document["feedforward_modules"] = [site.module_name for site in sites if site.reads_from is not None]
    document["fan_in_fan_out"] = any(site.transposed for site in sites)


register_method(Method(
    "ia3", IA3Config,
    peft=PeftFormat(
        "IA3",
        {"target_modules": "target_modules", "feedforward_modules": "feedforward_modules",
         "layers_to_transform": "layers", "init_ia3_weights": "init_ia3_weights"},
        to_peft=_ia3_to_peft,
    ),
    combine=average_parameters,
))
