"""VeRA (Kopiczko et al. 2024): LoRA's low-rank update with frozen random factors shared by every
layer, and two trainable vectors per layer, y = W x + Λb B Λd A dropout(x).

One pair of projections, A [r, max in] and B [max out, r], serves the whole adapter: each layer
uses the slices A[:, :in] and B[:out, :]. They are Kaiming-uniform draws from a generator seeded
with ``projection_prng_key``, made exactly as peft makes them, so a checkpoint saved without them
(``save_projection=False``) gets them back bit for bit. Per layer only Λd (r values, d_initial at
start) and Λb (one per output, zero at start: a new adapter is an exact identity) train. The update
is the low-rank matrix (Λb B)(Λd A), so it merges into the weight and stacks with LoRA in mixed
batches.
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
    Method,
    PeftFormat,
    check_bool,
    check_int,
    check_layers,
    check_number,
    check_target_modules,
    is_meta,
    register_method,
    shared_name,
)
from .lora import LowRankAdapter, default_targets


@dataclasses.dataclass
class VeraConfig(AdapterConfig):
    """r: the rank of the shared projections; target_modules: the linear layers to adapt (names or
    a regular expression, peft's rule; default: the attention's query and value projections);
    projection_prng_key: the seed of the projections; save_projection: whether saved folders hold
    them (else they are made again from the seed); dropout: on the layer input; d_initial: Λd's
    starting value; layers: block indices to adapt (default: all); init_weights: start as an
    identity (False: Λb = 1, Λd ~ N(0, 1), for tests)."""

    method = "vera"

    r: int = 256
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    dropout: float = 0.0
    d_initial: float = 0.1
    layers: list[int] | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        check_int("r", self.r)
        self.target_modules = check_target_modules(self.target_modules, required=False)
        check_int("projection_prng_key", self.projection_prng_key, minimum=0)
        check_bool("save_projection", self.save_projection)
        check_number("dropout", self.dropout, 0.0, 1.0)
        check_number("d_initial", self.d_initial)
        self.layers = check_layers(self.layers)
        check_bool("init_weights", self.init_weights)

    def sites(self, model: nn.Module) -> list[Site]:
        return find_sites(model, "linear", self.layers, self.target_modules or default_targets(model, self.method))

    def shared_tensors(self, sites: list[Site], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """vera_A [r, largest in] and vera_B [largest out, r], drawn in that order as peft does."""
        shapes = {"vera_A": (self.r, max(s.in_features for s in sites)),
                  "vera_B": (max(s.out_features for s in sites), self.r)}
        if is_meta(device):
            return {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
        generator = torch.Generator(device="cpu").manual_seed(self.projection_prng_key)
        return {name: kaiming_uniform(shape, generator) for name, shape in shapes.items()}

    def tensors_to_save(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.save_projection:
            return tensors
        return {key: tensor for key, tensor in tensors.items() if shared_name(key) is None}

    def build(self, site: Site, device: torch.device | str | None = None) -> VeraAdapter:
        return VeraAdapter(site.in_features, site.out_features, self.r, self.dropout, self.d_initial,
                           self.init_weights, device)


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """peft's ``_kaiming_init``: U(-b, b), b = sqrt(3) * sqrt(2) / sqrt(fan in), from ``generator``."""
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    with torch.no_grad():
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraAdapter(LowRankAdapter):
    """Λb and Λd of one linear layer; the projections are the adapter's shared ``vera_A`` and
    ``vera_B`` (``self.shared``). ``forward(x, y)`` returns y + delta(x)."""

    def __init__(self, in_features: int, out_features: int, r: int, dropout: float, d_initial: float,
                 init_identity: bool, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.dropout = dropout
        self.vera_lambda_b = nn.Parameter(torch.empty(out_features, device=device))
        self.vera_lambda_d = nn.Parameter(torch.empty(r, device=device))
        if not is_meta(device):
            with torch.no_grad():
                if init_identity:
                    self.vera_lambda_b.zero_()
                    self.vera_lambda_d.fill_(d_initial)
                else:
                    self.vera_lambda_b.fill_(1.0)
                    self.vera_lambda_d.normal_()

    def projections(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices of the shared projections: A [r, in], B [out, r]."""
        return (self.shared.vera_A[:, : self.in_features].to(device),
                self.shared.vera_B[: self.out_features, :].to(device))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self.projections(x.device)
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout)
        return self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, A), B)  # peft's order of operations

    @property
    def rank(self) -> int:
        return self.vera_lambda_d.shape[0]

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        A, B = self.projections(self.vera_lambda_d.device)
        return self.vera_lambda_d.unsqueeze(-1) * A, self.vera_lambda_b.unsqueeze(-1) * B, 1.0


def _vera_to_peft(config: VeraConfig, sites: list[Site], document: dict) -> None:
    """Name the modules exactly, so peft finds the same sites and the same largest widths."""
    document["target_modules"] = [site.module_name for site in sites]
    document["fan_in_fan_out"] = any(site.transposed for site in sites)
    document["bias"] = "none"


register_method(Method(
    "vera", VeraConfig,
    peft=PeftFormat(
        "VERA",
        {"r": "r", "target_modules": "target_modules", "projection_prng_key": "projection_prng_key",
         "save_projection": "save_projection", "vera_dropout": "dropout", "d_initial": "d_initial",
         "layers_to_transform": "layers", "init_weights": "init_weights"},
        to_peft=_vera_to_peft,
    ),
))
