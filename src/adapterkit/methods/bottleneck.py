"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020; the parallel form of He et al. 2021).

LayerNorm -> down-projection d->r -> activation -> dropout -> up-projection r->d -> residual add.
The up-projection starts at zero, so a new adapter is an exact identity.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..inject import Site, find_sites, reading_the_residual
from .base import (
    AdapterConfig,
    AdapterModule,
    Method,
    average_parameters,
    check_bool,
    check_choice,
    check_int,
    check_layers,
    check_number,
    check_target_modules,
    is_meta,
    register_method,
)

PLACEMENTS = ("houlsby", "pfeiffer", "attention", "parallel")
READS = ("output", "sublayer_input", "residual", "output+residual")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh}
ACTIVATION_GRADIENTS = {  # (gradient of the output, the input) -> gradient of the input: autograd's own kernels
    "relu": lambda grad, x: torch.ops.aten.threshold_backward(grad, x, 0),
    "gelu": torch.ops.aten.gelu_backward,
    "silu": torch.ops.aten.silu_backward,
    "swish": torch.ops.aten.silu_backward,
    "tanh": lambda grad, x: torch.ops.aten.tanh_backward(grad, torch.tanh(x)),
}
LAYER_NORM_EPS = 1e-5  # F.layer_norm's default
INITS = ("zeros", "bert")
DEFAULT_BOTTLENECK_SIZE = 64
MIN_REDUCTION_FACTOR = 1 / 16  # a bottleneck at most 16 times the hidden size; smaller factors overflow memory


@dataclasses.dataclass
class BottleneckConfig(AdapterConfig):
    """Where and how big the bottleneck adapters are.

    placement: "houlsby" (after attention and after feed-forward), "pfeiffer" (after feed-forward),
      "attention" (after attention), "parallel" (beside both sub-layers: reads each sub-layer's
      input, adds to its output).
    bottleneck_size / reduction_factor: the width r, given directly or as hidden size / r
      (64 when neither is given); reduction_factor may map layer indices to factors, with a
      "default" entry: {"default": 16, "3": 8}.
    reads: what the adapter's down-projection reads, s being the sub-layer's output and x the
      residual stream entering the sub-layer: "output" (s; the default), "sublayer_input" (the
      sub-layer's normed input; the default of "parallel"), "residual" (x: a parallel adapter
      as AdapterHub's par_bn), "output+residual" (s + x, through the model's own LayerNorm in
      post-LN models: AdapterHub's Pfeiffer). The output is always s + scaling * f(what it reads).
    init: "zeros" (up-projection zero: exact identity at start) or "bert" (all weights N(0, 0.02)).
    layers: block indices to adapt (default: all). target_modules: explicit module names or a
      regular expression, replacing the automatic insertion points.
    """

    method = "bottleneck"

    placement: str = "houlsby"
    bottleneck_size: int | None = None
    reduction_factor: float | dict[str, float] | None = None
    reads: str | None = None
    activation: str = "gelu"
    dropout: float = 0.1
    layer_norm: bool = True
    scaling: float = 1.0
    init: str = "zeros"
    layers: list[int] | None = None
    target_modules: list[str] | str | None = None

    def __post_init__(self) -> None:
        check_choice("placement", self.placement, PLACEMENTS)
        if self.bottleneck_size is not None and self.reduction_factor is not None:
            raise ConfigError("give bottleneck_size or reduction_factor, not both")
        if self.bottleneck_size is not None:
            check_int("bottleneck_size", self.bottleneck_size)
        if isinstance(self.reduction_factor, dict):
            if "default" not in self.reduction_factor:
                raise ConfigError(f"a reduction_factor map needs a 'default' entry, got {self.reduction_factor!r}")
            for layer, factor in self.reduction_factor.items():
                check_number(f"reduction_factor[{layer!r}]", factor, low=MIN_REDUCTION_FACTOR)
        elif self.reduction_factor is not None:
            check_number("reduction_factor", self.reduction_factor, low=MIN_REDUCTION_FACTOR)
        if self.reads is not None:
            check_choice("reads", self.reads, READS)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_number("dropout", self.dropout, 0.0, 1.0)
        check_bool("layer_norm", self.layer_norm)
        check_number("scaling", self.scaling)
        check_choice("init", self.init, INITS)
        self.layers = check_layers(self.layers)
        self.target_modules = check_target_modules(self.target_modules, required=False)

    def width(self, hidden: int, layer: int | None = None) -> int:
        factor = self.reduction_factor
        if isinstance(factor, dict):
            factor = factor.get(str(layer), factor["default"])
        if factor is not None:
            return max(1, int(hidden // factor))
        return self.bottleneck_size or DEFAULT_BOTTLENECK_SIZE

    @property
    def reading(self) -> str:
        return self.reads or ("sublayer_input" if self.placement == "parallel" else "output")

    def sites(self, model: nn.Module) -> list[Site]:
        placement = "houlsby" if self.placement == "parallel" and self.reading != "sublayer_input" else self.placement
        sites = find_sites(model, placement, self.layers, self.target_modules)
        if self.reading in ("residual", "output+residual"):
            sites = reading_the_residual(model, sites, with_output=self.reading == "output+residual")
        return sites

    def build(self, site: Site, device: torch.device | str | None = None) -> BottleneckAdapter:
        return BottleneckAdapter(site.in_features, site.out_features, self, device,
                                 self.width(site.in_features, site.layer))


class BottleneckAdapter(AdapterModule):
    """The lesson's adapter layer. Serial: reads the layer's output y and returns y + f(y).
    Parallel: reads the sub-layer's input x and returns y + f(x).

    The weights are plain parameters rather than nn.Linear/nn.LayerNorm/nn.Dropout children: a
    module is then cheap to build (loading dozens of them stays fast) and its tensors are easy to
    stack across adapters.
    """

    mixed = "delta"

    def __init__(self, in_features: int, out_features: int, config: BottleneckConfig, device=None,
                 width: int | None = None):
        super().__init__()
        r = width or config.width(in_features)
        self.reads = "output" if config.reading == "output" else "input"  # "input": what the site's reader gives
        self.scaling = config.scaling
        self.activation_name = config.activation
        self.activation = ACTIVATIONS[config.activation]
        self.dropout = config.dropout
        empty = lambda *shape: nn.Parameter(torch.empty(*shape, device=device))
        if config.layer_norm:
            self.ln_weight, self.ln_bias = empty(in_features), empty(in_features)
        else:
            self.ln_weight = self.ln_bias = None
        self.down_weight, self.down_bias = empty(r, in_features), empty(r)
        self.up_weight, self.up_bias = empty(out_features, r), empty(out_features)
        if not is_meta(device):
            self._init_weights(config.init)

    @torch.no_grad()
    def _init_weights(self, init: str) -> None:
        if self.ln_weight is not None:
            self.ln_weight.fill_(1.0)
            self.ln_bias.zero_()
        if init == "bert":
            self.down_weight.normal_(0.0, 0.02)
            self.up_weight.normal_(0.0, 0.02)
            self.down_bias.zero_()
        else:  # nn.Linear's default for the down-projection, zeros for the up-projection
            nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(self.down_weight.shape[1])
            nn.init.uniform_(self.down_bias, -bound, bound)
            self.up_weight.zero_()
        self.up_bias.zero_()

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (h.requires_grad or self.down_weight.requires_grad):
            return BottleneckDelta.apply(h, self.ln_weight, self.ln_bias, self.down_weight, self.down_bias,
                                         self.up_weight, self.up_bias, self.activation_name,
                                         self.dropout if self.training else 0.0)
        if self.ln_weight is not None:
            h = F.layer_norm(h, h.shape[-1:], self.ln_weight, self.ln_bias)
        h = self.activation(F.linear(h, self.down_weight, self.down_bias))
        if self.dropout and self.training:
            h = F.dropout(h, self.dropout)
        return F.linear(h, self.up_weight, self.up_bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        delta = self.delta(y if self.reads == "output" else x)  # a fresh tensor: safe to add into in place
        if self.scaling != 1.0:
            delta.mul_(self.scaling)
        return delta.add_(y)

    def mixed_kind(self) -> tuple:
        """Adapters compute together when they read the same input the same way."""
        return (type(self), self.reads, self.activation, self.ln_weight is not None)

    @staticmethod
    def stack(modules: list[BottleneckAdapter]) -> dict[str, torch.Tensor]:
        return stack_bottlenecks(modules)

    @staticmethod
    def grouped_delta(kind: tuple, h: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        _, _, activation, layer_norm = kind
        return grouped_bottleneck_delta(h, weights, activation, layer_norm)


class BottleneckDelta(torch.autograd.Function):
    """The bottleneck's delta (LayerNorm, down-projection, activation, dropout, up-projection) for
    training, keeping only what is cheap to keep and, on the CPU, with the LayerNorm folded into
    the down-projection.

    Autograd would keep, per site, the LayerNorm's input and output (each as wide as the model),
    the activation's input and output and the dropout's output and mask: 5.5 MiB a site at 8 x 128
    tokens on the default base. This keeps the input, its mean and reciprocal deviation, the
    bottleneck's pre-activation, the up-projection's input and the dropout mask, and recomputes
    nothing: the down-projection's and the LayerNorm's weight gradients come from the input and the
    statistics (``layer_norm_weight_gradients``).

    Folded (``folding_statistics``): with LayerNorm(h) = rstd (h - mean) g + b, the pre-activation
    is rstd (h (W g)^T - mean W g 1) + W b + b_down, one product with h and per-token scalars, so the
    normalised input is never written; in the backward pass the LayerNorm's input gradient becomes
    one product and one pass (``folded_input_gradient``). The lesson's layer then costs what
    AdapterHub's costs but for its dropout mask (docs/training.md has the figures). The sums are
    reordered, so outputs and gradients are autograd's within 1e-6 (tests). Elsewhere the
    LayerNorm is torch's and the outputs are autograd's bit for bit.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None,
                down_weight: torch.Tensor, down_bias: torch.Tensor, up_weight: torch.Tensor, up_bias: torch.Tensor,
                activation: str, dropout: float) -> torch.Tensor:
        rows = h.reshape(-1, h.shape[-1])
        mean = rstd = projected = None
        if ln_weight is None:
            pre_activation = F.linear(rows, down_weight, down_bias)
        elif (statistics := folding_statistics(rows)) is not None:
            mean, rstd = statistics
            folded_weight, folded_bias = fold_layer_norm(down_weight, down_bias, ln_weight, ln_bias)
            projected = rows @ folded_weight.t()  # h (W g)^T, which the input gradient needs again
            pre_activation = torch.addr(projected, mean, folded_weight.sum(1), alpha=-1)
            pre_activation.mul_(rstd.unsqueeze(1)).add_(folded_bias)
        else:
            normed, mean, rstd = torch.native_layer_norm(rows, rows.shape[-1:], ln_weight, ln_bias, LAYER_NORM_EPS)
            pre_activation = F.linear(normed, down_weight, down_bias)
            mean, rstd = mean.squeeze(1), rstd.squeeze(1)
        hidden = ACTIVATIONS[activation](pre_activation)
        mask = None
        if dropout:
            hidden, mask = torch.native_dropout(hidden, dropout, True)
        ctx.save_for_backward(rows, mean, rstd, projected, pre_activation, hidden, mask, ln_weight, ln_bias,
                              down_weight, up_weight)
        ctx.activation, ctx.dropout = activation, dropout
        out = hidden.new_empty((*h.shape[:-1], up_weight.shape[0]))  # not a view: callers add into it in place
        torch.addmm(up_bias, hidden, up_weight.t(), out=out.view(-1, out.shape[-1]))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (rows, mean, rstd, projected, pre_activation, hidden, mask, ln_weight, ln_bias, down_weight,
         up_weight) = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_rows = grad.reshape(-1, grad.shape[-1])
        grad_up_weight = grad_rows.t() @ hidden if needs[5] else None
        grad_up_bias = grad_rows.sum(0) if needs[6] else None
        grad_hidden = grad_rows @ up_weight
        if mask is not None:
            grad_hidden = torch.ops.aten.native_dropout_backward(grad_hidden, mask, 1.0 / (1.0 - ctx.dropout))
        grad_pre = ACTIVATION_GRADIENTS[ctx.activation](grad_hidden, pre_activation)
        grad_down_bias = grad_pre.sum(0) if any(needs[1:5]) else None
        if ln_weight is None:
            grad_h = grad_pre @ down_weight if needs[0] else None
            grad_down_weight = grad_pre.t() @ rows if needs[3] else None
            grad_ln_weight = grad_ln_bias = None
        else:
            scaled = grad_pre * rstd.unsqueeze(1)
            grad_ln_weight, grad_ln_bias, grad_down_weight = layer_norm_weight_gradients(
                scaled, grad_down_bias, rows, mean, ln_weight, ln_bias, down_weight, needs[1:4],
                centre_first=projected is None)
            grad_h = None
            if needs[0] and projected is not None:
                grad_h = folded_input_gradient(rows, mean, rstd, projected, grad_pre, scaled,
                                               down_weight * ln_weight)
            elif needs[0]:
                grad_h = torch.ops.aten.native_layer_norm_backward(
                    grad_pre @ down_weight, rows, rows.shape[-1:], mean.unsqueeze(1), rstd.unsqueeze(1), ln_weight,
                    ln_bias, [True, False, False])[0]
        return (None if grad_h is None else grad_h.view_as(grad), grad_ln_weight, grad_ln_bias, grad_down_weight,
                grad_down_bias if needs[4] else None, grad_up_weight, grad_up_bias, None, None)


def folding_statistics(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each row's mean and reciprocal deviation, when the LayerNorm is to be folded: on the CPU,
    where the fold saves a model-wide write and read per site and torch's var_mean is slow (1.9 ms
    for 1024 x 576, against 0.1 ms for these two reductions), and only for rows whose mean is
    within one deviation of zero. Beyond that the folded product subtracts a share larger than
    what is left, and its rounding grows with the ratio (7 times autograd's at 50 deviations); the
    default base's sites stay within 0.16 deviations. Half-precision rows keep torch's LayerNorm,
    which takes its statistics in float32."""
    if rows.device.type != "cpu" or rows.dtype != torch.float32:
        return None
    mean = rows.mean(-1)
    squared_mean = mean.square()
    variance = torch.linalg.vector_norm(rows, dim=-1).square_().div_(rows.shape[-1]).sub_(squared_mean)
    if bool((squared_mean > variance).any()):
        return None
    return mean, variance.add_(LAYER_NORM_EPS).rsqrt_()


def fold_layer_norm(down_weight: torch.Tensor, down_bias: torch.Tensor, ln_weight: torch.Tensor,
                    ln_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The LayerNorm's scale and shift moved into the down-projection:
    W (n g + b) + b_down = (W g) n + (W b + b_down)."""
    return down_weight * ln_weight, torch.addmv(down_bias, down_weight, ln_bias)


def layer_norm_weight_gradients(scaled: torch.Tensor, grad_pre_sum: torch.Tensor | None, rows: torch.Tensor,
                                mean: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                                down_weight: torch.Tensor, needs: tuple[bool, bool, bool], centre_first: bool
                                ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The gradients of the LayerNorm's scale and shift and of the down-projection's weight, without
    normalising h again. All three come from grad_pre^T x_hat = (rstd grad_pre)^T (h - mean), a
    bottleneck-by-model matrix C: the down-projection's is C * g + (sum_t grad_pre_t)^T b, the
    scale's sum_k W_k * C_k and the shift's (sum_t grad_pre_t) W. ``scaled`` is rstd * grad_pre.
    C is taken as (rstd grad_pre)^T h minus the mean's share where the LayerNorm was folded (rows
    near zero mean); elsewhere (``centre_first``) h - mean is formed first, because for rows far
    from zero mean that difference would cancel most digits."""
    needs_scale, needs_shift, needs_down = needs
    centred = None
    if (needs_scale or needs_down) and centre_first:
        centred = scaled.t() @ (rows - mean.unsqueeze(1))
    elif needs_scale or needs_down:
        centred = torch.addr(scaled.t() @ rows, scaled.t() @ mean, torch.ones_like(ln_weight), alpha=-1)
    return ((down_weight * centred).sum(0) if needs_scale else None,
            grad_pre_sum @ down_weight if needs_shift else None,
            torch.addcmul(torch.outer(grad_pre_sum, ln_bias), centred, ln_weight) if needs_down else None)


def folded_input_gradient(rows: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, projected: torch.Tensor,
                          grad_pre: torch.Tensor, scaled: torch.Tensor, folded_weight: torch.Tensor) -> torch.Tensor:
    """The input gradient through LayerNorm and down-projection as one product and one pass:
    with G = grad_pre (W g), mean_j G = grad_pre . W g 1 / d and mean_j(G h) = grad_pre . h (W g)^T / d,
    so rstd (G - mean_j G - x_hat mean_j(G x_hat)) = scaled (W g) + alpha h + beta, token by token."""
    width = rows.shape[-1]
    mean_g = grad_pre @ folded_weight.sum(1) / width
    mean_gh = (grad_pre * projected).sum(1) / width
    alpha = rstd.pow(3).mul_(mean_gh - mean * mean_g).neg_()  # -rstd^2 mean_j(G x_hat)
    beta = -alpha * mean - rstd * mean_g
    grad_h = torch.addmm(beta.unsqueeze(1), scaled, folded_weight)
    return grad_h.addcmul_(rows, alpha.unsqueeze(1))


# ---- many adapters at one site, for mixed-adapter batches -----------------------------------------
@torch.no_grad()
def stack_bottlenecks(adapters: list[BottleneckAdapter]) -> dict[str, torch.Tensor]:
    """The weights of several adapters at one site as [adapters, ...] tensors, transposed for bmm.

    Widths are zero-padded to the largest: a zero down-row gives act(0) = 0 for every supported
    activation and a zero up-column adds nothing, so padding is exact. The LayerNorm's scale and
    shift are folded into the down-projection (W (n * g + b) = (W g) n + W b) and ``scaling`` into
    the up-projection, which saves two passes over the activations. All adapters must agree on
    layer_norm (callers group them by it)."""
    r = max(adapter.down_weight.shape[0] for adapter in adapters)

    def pad(tensor: torch.Tensor, dim: int) -> torch.Tensor:
        missing = r - tensor.shape[dim]
        return F.pad(tensor, (0, missing) if dim == -1 else (0, 0, 0, missing)) if missing else tensor

    def down(a: BottleneckAdapter) -> tuple[torch.Tensor, torch.Tensor]:
        if a.ln_weight is None:
            return a.down_weight, a.down_bias
        return fold_layer_norm(a.down_weight, a.down_bias, a.ln_weight, a.ln_bias)

    downs = [down(a) for a in adapters]
    stacked = {
        "down_t": torch.stack([pad(weight, 0).t() for weight, _ in downs]),
        "down_bias": torch.stack([pad(bias, -1) for _, bias in downs]).unsqueeze(1),
        "up_t": torch.stack([(pad(a.up_weight, -1) * a.scaling).t() for a in adapters]),
        "up_bias": torch.stack([a.up_bias * a.scaling for a in adapters]).unsqueeze(1),
    }
    return {key: tensor.contiguous() for key, tensor in stacked.items()}


def grouped_bottleneck_delta(h: torch.Tensor, weights: dict[str, torch.Tensor], activation,
                             layer_norm: bool) -> torch.Tensor:
    """Each group's adapter applied to its slice of ``h`` [groups, tokens, d], as batched products;
    ``weights`` come from ``stack_bottlenecks`` with one entry per group."""
    if layer_norm:
        h = F.layer_norm(h, h.shape[-1:])
    hidden = activation(torch.baddbmm(weights["down_bias"], h, weights["down_t"]))
    return torch.baddbmm(weights["up_bias"], hidden, weights["up_t"])


register_method(Method("bottleneck", BottleneckConfig, combine=average_parameters))
