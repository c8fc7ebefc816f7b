"""Folding adapters into a base's weights, and combining adapters into a new one.

``MergedWeights`` holds the one adapter of an AdapterModel folded into the base's linear layers and
exact copies of the weights it changed, so that unfolding restores them bit for bit. What a module
adds to a weight is the method's to say (``AdapterModule.weight_update`` / ``weight_scale``);
how adapters of one method combine is the method's ``combine``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .errors import ConfigError, MergeError
from .hooks import HookLayer
from .inject import Site
from .io import base_fingerprint
from .methods import AdapterConfig, AdapterModule, get_method
from .quantization import quantization_of


class MergedWeights:
    """The adapter folded into one base's weights, if any (``name``)."""

    def __init__(self, hooks: HookLayer) -> None:
        self.hooks = hooks
        self.name: str | None = None
        self.saved: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # exact weights the merge changed

    @torch.no_grad()
    def fold(self, name: str, method: str, site_modules: list[tuple[Site, AdapterModule]], layers: nn.Module) -> None:
        """Fold adapter ``name`` (its modules by site; ``layers``, all its modules, frozen here) into
        the weights: an additive module adds its update, a multiplicative one scales the weight's
        rows or columns. Its hooks come off the layers it changed, and it becomes active."""
        if self.name is not None:
            raise MergeError(f"adapter {self.name!r} is already merged into the base weights; unmerge() it first")
        quantized = quantization_of(self.hooks.base)
        if quantized is not None:
            raise MergeError(
                f"the base is quantized ({quantized}): the update of adapter {name!r}, folded into {quantized} "
                "weights, would be rounded away or requantized into another model. Merge over the full-precision base "
                "(load_base without quantize), then quantize the merged model if you need to")
        routing = self.hooks.routing
        if routing.tree is not None:
            raise MergeError("a composition is active; set_active(None) or a plain adapter list before merging")
        changes = [(site, module, module.weight_update(site)) for site, module in site_modules]
        changes = [(site, module, update, None if update is not None else module.weight_scale())
                   for site, module, update in changes]
        if not changes or any(update is None and scale is None for _, _, update, scale in changes):
            raise MergeError(
                f"adapter {name!r} is a {method} adapter, which cannot be merged into the weights "
                "(it is not a change of a linear layer's weight)"
            )
        base_fingerprint(self.hooks.base)  # taken (and kept) from the unmerged weights
        layers.requires_grad_(False)  # training it now would silently diverge from the merged copy
        for site, module, update, scale in changes:
            layer = self.hooks.base_module(site.module_name)
            bias = getattr(layer, "bias", None)
            self.saved[site.module_name] = (layer.weight.detach().clone(),
                                            None if bias is None else bias.detach().clone())
            if update is not None:
                layer.weight.add_(update.to(layer.weight.dtype))
            else:
                scale_layer(layer, site, scale, module.scale_dim)
            self.hooks.detach_site(name, site.module_name)
        self.name = name
        if name not in routing.active:
            routing.active = routing.active + (name,)

    @torch.no_grad()
    def unfold(self, site_modules: list[tuple[Site, AdapterModule]]) -> None:
        """Restore the exact base weights; the merged adapter's hooks (its modules by site) go back on."""
        if self.name is None:
            raise MergeError("no adapter is merged")
        for site, module in site_modules:
            layer = self.hooks.base_module(site.module_name)
            weight, bias = self.saved.pop(site.module_name)
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
            self.hooks.attach_site(self.name, site, module)
        self.name = None

    def keep(self) -> None:
        """Make the merge final: the copies of the old weights go, and its hooks are forgotten."""
        self.hooks.forget_sites(self.name)
        self.name = None
        self.saved = {}


def scale_layer(layer: nn.Module, site: Site, scale: torch.Tensor, dim: str) -> None:
    """Multiply a linear layer's weight by ``scale`` per output ("out", bias too) or per input ("in")."""
    vector = scale.reshape(-1).to(layer.weight.dtype)
    along_rows = (dim == "out") != site.transposed  # nn.Linear keeps [out, in], Conv1D [in, out]
    layer.weight.mul_(vector.unsqueeze(1) if along_rows else vector.unsqueeze(0))
    if dim == "out" and getattr(layer, "bias", None) is not None:
        layer.bias.mul_(vector)


def combine_adapters(
    configs: list[AdapterConfig], states: list[dict[str, torch.Tensor]], weights: Sequence[float], how: str, **options,
) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """One adapter (config, tensors) made from several (``configs`` and their ``states``, all of
    one method) weighted by ``weights``, by their method's ``combine``."""
    weights = list(weights)
    if not configs or len(weights) != len(configs) or not all(
            isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise ConfigError(f"give one finite weight per adapter: {len(configs)} adapters, weights {weights!r}")
    kinds = sorted({config.method for config in configs})
    if len(kinds) > 1:
        raise ConfigError(f"merge_adapters combines adapters of one method, got {kinds}")
    combine = get_method(kinds[0]).combine
    if combine is None:
        raise ConfigError(f"{kinds[0]} adapters cannot be combined into a new adapter")
    return combine(configs, states, weights, how, **options)
