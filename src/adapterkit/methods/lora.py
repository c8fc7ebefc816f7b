"""LoRA (Hu et al. 2021): a low-rank update of a linear layer, y = W x + s * B A dropout(x).

A is Kaiming-uniform and B zero, so a new adapter is an exact identity. The scale s is alpha / r,
or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023). Because the update is a matrix of the layer's
own shape, it can be folded into the base weight (``AdapterModel.merge``) for zero overhead.

With ``use_dora`` (DoRA, Liu et al. 2024, as peft's ``LoraConfig(use_dora=True)``), the updated
weight W + s B A is split into its direction and a learned magnitude per output feature.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterkitError, ConfigError
from ..inject import Site, find_sites, query_and_value
from ..quantization import dense_weight
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
    is_meta,
    register_method,
    weighted_sum,
)


@dataclasses.dataclass
class LoraConfig(AdapterConfig):
    """r: the rank; alpha: the scale numerator (s = alpha / r); dropout: on the layer input before A;
    target_modules: the linear layers to adapt (names or a regular expression, peft's rule);
    use_rslora: s = alpha / sqrt(r); layers: block indices to adapt (default: all);
    use_dora: DoRA, a learned magnitude per output feature of the updated weight (``DoraAdapter``)."""

    method = "lora"

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    layers: list[int] | None = None
    use_dora: bool = False

    def __post_init__(self) -> None:
        check_int("r", self.r)
        check_number("alpha", self.alpha, positive=True)
        check_number("dropout", self.dropout, 0.0, 1.0)
        self.target_modules = check_target_modules(self.target_modules, required=False)
        check_bool("use_rslora", self.use_rslora)
        self.layers = check_layers(self.layers)
        check_bool("use_dora", self.use_dora)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def sites(self, model: nn.Module) -> list[Site]:
        return find_sites(model, "linear", self.layers, self.target_modules or default_targets(model, self.method))

    def build(self, site: Site, device: torch.device | str | None = None) -> LoraAdapter:
        if self.use_dora:
            return DoraAdapter(site.in_features, site.out_features, self.r, self.scale, self.dropout,
                               site.transposed, device)
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
    def stack(modules: list[LowRankAdapter]) -> dict[str, torch.Tensor]:
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
        if not is_meta(device):
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


class DoraAdapter(LoraAdapter):
    """DoRA at one linear layer: W' = W + s B A, used as m * W' / ||W'||, where ||W'|| is the L2
    norm of each output feature's row of W' and m a learned vector (``lora_magnitude_vector``).
    The norm is a constant: it gets no gradient (the paper's section 4.3, and peft).

    Computed as peft computes it, on top of the base output y = W x + b, with g = m / ||W'||:
        y + (g - 1) * (y - b) + g * s B A x
    While training with dropout, peft applies the dropout to x in both terms; the middle one is
    then (g - 1) * W dropout(x), which costs a product with W.

    m starts as ||W + s B A|| (B = 0: ||W||), so g is 1 exactly and a new adapter is an exact
    identity. The module reads the base layer's weight (and bias), which ``bind`` gives it when it
    is hooked on; it keeps the layer by a weak reference, never as a submodule."""

    reads = "input+output"  # a mixed batch gives grouped_delta the layer's input and output side by side

    def __init__(self, in_features: int, out_features: int, r: int, scale: float, dropout: float, transposed: bool,
                 device=None):
        super().__init__(in_features, out_features, r, scale, dropout, device)
        self.transposed = transposed  # the layer keeps its weight as [in, out] (GPT-2's Conv1D)
        self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features, device=device))
        self._magnitude_unset = not is_meta(device)  # loading fills a meta module
        self._layer = None
        self._norm = None  # (weights' signature, norm): the norm is recomputed only when A, B or W change

    def bind(self, layer: nn.Module) -> None:
        self._layer = weakref.ref(layer)
        if self._magnitude_unset:
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(self.weight_norm())
            self._magnitude_unset = False

    def base_layer(self) -> nn.Module:
        layer = None if self._layer is None else self._layer()
        if layer is None:
            raise AdapterkitError("this DoRA module is not attached to a base layer; it runs only in its AdapterModel")
        return layer

    def base_weight(self) -> torch.Tensor:
        """The layer's weight as [out, in] (dequantized where the base is quantized)."""
        weight = dense_weight(self.base_layer())
        return weight.T if self.transposed else weight

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W + s B A|| per output feature, in the adapter's dtype, without gradient."""
        weight = self.base_layer().weight
        signature = tuple((id(t), t.data_ptr(), t._version, t.dtype) for t in (self.lora_A, self.lora_B, weight))
        # a norm made under inference_mode (the generation engine) cannot take part in training
        if (self._norm is None or self._norm[0] != signature
                or (self._norm[1].is_inference() and not torch.is_inference_mode_enabled())):
            A, B = self.lora_A, self.lora_B
            updated = self.base_weight().to(A.dtype) + self.scale * (B @ A)
            self._norm = (signature, torch.linalg.norm(updated, dim=1))
        return self._norm[1]

    def gain(self) -> torch.Tensor:
        """g = m / ||W + s B A||: the factor of each output feature (the gradient reaches m only)."""
        return self.lora_magnitude_vector / self.weight_norm()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gain = self.gain()
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout)
            base = F.linear(x, self.base_weight().to(x.dtype))
        else:
            bias = getattr(self.base_layer(), "bias", None)
            base = y if bias is None else y - bias.to(y.dtype)
        low_rank = F.linear(F.linear(x, self.lora_A) * self.scale, self.lora_B)
        return y + (gain - 1) * base + gain * low_rank

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise AdapterkitError("a DoRA module's change depends on the layer's output too; call it as module(x, y)")

    @torch.no_grad()
    def weight_update(self, site: Site) -> torch.Tensor:
        """g * (W + s B A) - W, in the layout of the layer's weight: the bias is not rescaled."""
        weight = self.base_weight().float()
        updated = weight + (self.lora_B.float() @ self.lora_A.float()) * self.scale
        update = self.gain().float()[:, None] * updated - weight
        return update.T if site.transposed else update

    def mixed_kind(self) -> tuple:
        return (DoraAdapter,)

    @staticmethod
    @torch.no_grad()
    def stack(modules: list[DoraAdapter]) -> dict[str, torch.Tensor]:
        """LoRA's stacked factors with g folded into B, and per adapter g - 1 and (g - 1) * b."""
        stacked = LowRankAdapter.stack(modules)
        gains = torch.stack([module.gain() for module in modules])  # [adapters, out]
        up = stacked["up_t"] * gains[:, None, :]  # column j of (s B)^T times g_j
        bias = getattr(modules[0].base_layer(), "bias", None)
        offset = torch.zeros_like(gains) if bias is None else (gains - 1) * bias.to(gains.dtype)
        return {"down_t": stacked["down_t"], "up_t": up, "gain": (gains - 1)[:, None, :], "offset": offset[:, None, :]}

    @staticmethod
    def grouped_delta(kind: tuple, h: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """h is the layer's input and output side by side (``reads = "input+output"``)."""
        width = weights["down_t"].shape[1]
        x, y = h[..., :width], h[..., width:]
        low_rank = torch.bmm(torch.bmm(x, weights["down_t"]), weights["up_t"])
        return low_rank.addcmul_(y, weights["gain"]).sub_(weights["offset"])


def default_targets(model: nn.Module, method: str) -> list[str]:
    """peft's default for LoRA-like methods, the attention's query and value projections, said
    out loud: the user did not choose them."""
    names = query_and_value(model)
    logger.info(f"{method}: no target_modules given; adapting the attention's query and value projections "
                f"({', '.join(sorted({n.rsplit('.', 1)[-1] for n in names}))}) in {len(names)} places")
    return names


# peft's other inits (pissa, olora, loftq, ...) change the base
FRESH_INITS = {"init_lora_weights": (True, False, "gaussian")}


def _lora_to_peft(config: AdapterConfig, sites: list[Site], document: dict) -> None:
    if config.target_modules is None:
        document["target_modules"] = [site.module_name for site in sites]
    document["fan_in_fan_out"] = any(site.transposed for site in sites)
    document["bias"] = "none"


def combine_loras(
    configs: list[LoraConfig], states: list[dict[str, torch.Tensor]], weights: list[float], how: str,
    svd_rank: int | None = None, density: float | None = None, majority_sign_method: str = "total",
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """peft's ``add_weighted_adapter`` for LoRA, module by module (adapters missing at a module
    are left out there). The new adapter has alpha = r, so its scale is 1 (as in peft):
    - "cat": A = [w_i s_i A_i], B = [B_i] stacked along the rank: exactly sum_i w_i s_i B_i A_i;
    - "svd": the best rank-``svd_rank`` (default: the largest r) approximation of that sum;
    - "linear": A = sum sign(w_i) sqrt(|w_i s_i|) A_i, B = sum sqrt(|w_i s_i|) B_i (same r only);
    - "ties": as "linear", with each factor TIES-merged (``density``, ``majority_sign_method``)."""
    if any(config.use_dora for config in configs):
        raise ConfigError("DoRA adapters cannot be combined: a sum of their factors says nothing about the magnitudes")
    if how not in ("linear", "cat", "svd", "ties"):
        raise ConfigError(f"LoRA adapters combine by 'linear', 'cat', 'svd' or 'ties', not {how!r}")
    ranks = [config.r for config in configs]
    if how in ("linear", "ties") and len(set(ranks)) > 1:
        raise ConfigError(f"'{how}' needs adapters of one rank, got r = {ranks}; use 'cat' or 'svd'")
    if how == "ties" and (density is None or not 0 < density <= 1):
        raise ConfigError(f"'ties' needs a density in (0, 1], got {density!r}")
    new_rank = {"cat": sum(ranks), "svd": svd_rank or max(ranks)}.get(how, ranks[0])
    modules = list(dict.fromkeys(key.partition(".adapter.")[0] for state in states for key in state))
    merged = {}
    for module in modules:
        parts = [(state[f"{module}.adapter.lora_A"], state[f"{module}.adapter.lora_B"], w * config.scale)
                 for state, config, w in zip(states, configs, weights) if f"{module}.adapter.lora_A" in state]
        A, B = _combine_module(parts, how, new_rank, density, majority_sign_method)
        merged[f"{module}.adapter.lora_A"], merged[f"{module}.adapter.lora_B"] = A.contiguous(), B.contiguous()
    config = LoraConfig(r=new_rank, alpha=new_rank, dropout=configs[0].dropout, target_modules=modules,
                        use_rslora=configs[0].use_rslora)
    return config, merged


@torch.no_grad()
def _combine_module(parts, how: str, rank: int, density, majority_sign_method) -> tuple[torch.Tensor, torch.Tensor]:
    if how == "cat":
        A = torch.cat([a * ws for a, _, ws in parts])
        B = torch.cat([b for _, b, _ in parts], dim=1)
        return F.pad(A, (0, 0, 0, rank - A.shape[0])), F.pad(B, (0, rank - B.shape[1]))
    if how == "svd":
        delta = weighted_sum([b @ a for a, b, _ in parts], [ws for _, _, ws in parts])
        U, S, Vh = torch.linalg.svd(delta, full_matrices=True)
        return Vh[:rank], U[:, :rank] @ torch.diag(S[:rank])
    roots = [math.sqrt(abs(ws)) for _, _, ws in parts]
    signs = [1.0 if ws >= 0 else -1.0 for _, _, ws in parts]
    weights_A, weights_B = [s * r for s, r in zip(signs, roots)], roots
    factors_A, factors_B = [a for a, _, _ in parts], [b for _, b, _ in parts]
    if how == "linear":
        return weighted_sum(factors_A, weights_A), weighted_sum(factors_B, weights_B)
    return (ties_merge(factors_A, weights_A, density, majority_sign_method),
            ties_merge(factors_B, weights_B, density, majority_sign_method))


def ties_merge(tensors: list[torch.Tensor], weights: list[float], density: float,
               majority_sign_method: str = "total") -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): keep each tensor's ``density`` largest magnitudes, elect
    each entry's sign (by the summed values, "total", or by count, "frequency"), and average the
    weighted entries that agree with it."""
    if majority_sign_method not in ("total", "frequency"):
        raise ConfigError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    trimmed = torch.stack([_keep_largest(t, density) for t in tensors])
    votes = trimmed.sum(0) if majority_sign_method == "total" else trimmed.sign().sum(0)
    agrees = trimmed.sign() == torch.where(votes >= 0, 1.0, -1.0)
    weighted = trimmed * torch.tensor(weights, dtype=trimmed.dtype).view(-1, *[1] * (trimmed.dim() - 1))
    return (weighted * agrees).sum(0) / agrees.sum(0).clamp(min=1)


def _keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return tensor
    keep = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    keep[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel())).indices] = 1
    return tensor * keep.view(tensor.shape)


logger = logging.getLogger(__name__)


register_method(Method(
    "lora", LoraConfig,
    peft=PeftFormat(
        "LORA",
        {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "target_modules",
         "use_rslora": "use_rslora", "layers_to_transform": "layers", "use_dora": "use_dora"},
        tensor_suffix=".weight", unsuffixed=frozenset({"lora_magnitude_vector"}), fresh_init=FRESH_INITS,
        to_peft=_lora_to_peft,
    ),
    combine=combine_loras,
))
