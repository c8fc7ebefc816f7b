"""AdapterModel: many named adapters over one frozen base model.

Adapters never replace base modules: each adapted layer gets a forward hook that passes the
layer's output through the active adapters. The base keeps its own structure, parameter names and
weights, so ``disabled()`` is exactly the base, and switching adapters is one attribute write.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from .errors import AdapterNameError, ConfigError
from .inject import Site
from .methods import AdapterConfig

_VALID_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,127}")


class _Routing:
    """Which adapters run, shared by every hook so that switching is a single assignment."""

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active: tuple[str, ...] = ()


class _Tap:
    """Keeps the input of a base module for parallel adapters that read a sub-layer's input."""

    def __init__(self, module: nn.Module, routing: _Routing) -> None:
        self.routing = routing
        self.readers: set[str] = set()
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple) -> None:
        if not self.readers.isdisjoint(self.routing.active):
            self.value = args[0]


class _Attachment:
    """The adapters attached to one base module, applied to its output by a forward hook."""

    def __init__(self, module: nn.Module, routing: _Routing) -> None:
        self.routing = routing
        self.adapters: dict[str, tuple[nn.Module, _Tap | None]] = {}
        self.handle = module.register_forward_hook(self._apply)

    def _apply(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        active = self.routing.active
        if not active:
            return None
        x, y, tapped = args[0], output, False
        for name in active:
            entry = self.adapters.get(name)
            if entry is None:
                continue
            adapter, tap = entry
            if tap is not None:
                y, tapped = adapter(tap.value, y), True
            else:
                y = adapter(x, y)
        if tapped:
            for _, tap in self.adapters.values():
                if tap is not None:
                    tap.value = None
        return y


class AdapterModel(nn.Module):
    """A frozen transformers model with named adapters that can be added, switched, trained,
    saved and loaded without touching the base or each other.

    Calls, ``generate`` and attribute look-ups go to the base model, so an AdapterModel is used
    like the model it wraps.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        self.adapter_layers = nn.ModuleDict()
        self._configs: dict[str, AdapterConfig] = {}
        self._sites: dict[str, list[Site]] = {}
        self._routing = _Routing()
        self._attachments: dict[str, _Attachment] = {}
        self._taps: dict[str, _Tap] = {}
        self._base_modules: dict[str, nn.Module] = dict(base.named_modules())
        self._site_cache: dict[str, list[Site]] = {}
        self.train(base.training)  # a base in eval mode stays so: no surprise dropout

    # ---- running -------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.base(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base.generate(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self.base, name)

    # ---- managing adapters -----------------------------------------------------------------
    @property
    def adapters(self) -> dict[str, AdapterConfig]:
        """The adapters by name, with their configs, in the order they were added."""
        return dict(self._configs)

    @property
    def active(self) -> tuple[str, ...]:
        return self._routing.active

    def add_adapter(self, name: str, config: AdapterConfig) -> None:
        """Attach a new adapter. It is inactive and frozen until ``set_active``/``train_adapter``."""
        self._check_new_name(name)
        if not isinstance(config, AdapterConfig):
            raise ConfigError(f"expected an adapter config such as BottleneckConfig, got {type(config).__name__}")
        sites = self._sites_for(config)
        modules = nn.ModuleDict()
        for site in sites:
            weight = self._base_weight(site.module_name)
            module = config.build(site).to(device=weight.device, dtype=weight.dtype)
            modules[_key(site)] = module.requires_grad_(False)
        self._install(name, config, sites, modules)

    def _install(self, name: str, config: AdapterConfig, sites: list[Site], modules: nn.ModuleDict) -> None:
        """Register built modules under ``name`` and hook them into the base."""
        modules.train(self.training)
        self.adapter_layers[name] = modules
        self._configs[name] = config
        self._sites[name] = sites
        base_modules = self._base_modules
        for site in sites:
            tap = None
            if site.reads_from is not None and site.reads_from != site.module_name:
                tap = self._taps.get(site.reads_from)
                if tap is None:
                    tap = self._taps[site.reads_from] = _Tap(base_modules[site.reads_from], self._routing)
                tap.readers.add(name)
            attachment = self._attachments.get(site.module_name)
            if attachment is None:
                attachment = self._attachments[site.module_name] = _Attachment(base_modules[site.module_name], self._routing)
            attachment.adapters[name] = (modules[_key(site)], tap)

    def delete_adapter(self, name: str) -> None:
        self._check_known(name)
        self.set_active(tuple(a for a in self.active if a != name))
        for site in self._sites.pop(name):
            attachment = self._attachments[site.module_name]
            del attachment.adapters[name]
            if not attachment.adapters:
                attachment.handle.remove()
                del self._attachments[site.module_name]
        for module_name, tap in list(self._taps.items()):
            tap.readers.discard(name)
            if not tap.readers:
                tap.handle.remove()
                del self._taps[module_name]
        del self.adapter_layers[name]
        del self._configs[name]

    def set_active(self, names: str | Sequence[str] | None) -> None:
        """Choose the adapters that run, by name; several run in the order given; None for the base."""
        if names is None:
            names = ()
        elif isinstance(names, str):
            names = (names,)
        names = tuple(names)
        for name in names:
            self._check_known(name)
        if len(set(names)) != len(names):
            raise AdapterNameError(f"an adapter is named twice in {list(names)}")
        self._routing.active = names

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the pure base model inside the block."""
        saved = self._routing.active
        self._routing.active = ()
        try:
            yield
        finally:
            self._routing.active = saved

    def train_adapter(self, name: str) -> None:
        """Make ``name`` the only trainable part of the model (and active, if it is not already)."""
        self._check_known(name)
        for other, modules in self.adapter_layers.items():
            modules.requires_grad_(other == name)
        if name not in self.active:
            self.set_active(name)

    # ---- counting --------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, each shared tensor counted once."""
        trainable = total = 0
        for parameter in self.parameters():
            total += parameter.numel()
            if parameter.requires_grad:
                trainable += parameter.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ---- files -----------------------------------------------------------------------------
    def save_adapter(self, name: str, path: str | Path) -> None:
        """Write one adapter to a folder (adapter_config.json + adapter_model.safetensors), atomically."""
        from .io import save_adapter

        save_adapter(self, name, path)

    def load_adapter(self, path: str | Path, name: str | None = None) -> str:
        """Load a saved adapter under ``name`` (default: the name it was saved with); returns the name."""
        from .io import load_adapter

        return load_adapter(self, path, name)

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """One adapter's tensors, keyed by the base module they attach to."""
        self._check_known(name)
        modules = self.adapter_layers[name]
        return {
            f"{site.module_name}.adapter.{param}": tensor
            for site in self._sites[name]
            for param, tensor in modules[_key(site)].state_dict().items()
        }

    # ---- checks ----------------------------------------------------------------------------
    def _check_known(self, name: str) -> None:
        if name not in self._configs:
            known = ", ".join(self._configs) or "none"
            raise AdapterNameError(f"no adapter named {name!r}; adapters: {known}")

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not _VALID_NAME.fullmatch(name):
            raise AdapterNameError(
                f"invalid adapter name {name!r}: use 1-128 letters, digits, '_' or '-', starting with a letter or digit"
            )
        if name in self._configs:
            raise AdapterNameError(f"an adapter named {name!r} already exists; delete_adapter it first or pick another name")

    def _sites_for(self, config: AdapterConfig) -> list[Site]:
        """Where ``config`` attaches on this base; the base never changes shape, so it is kept."""
        key = json.dumps([config.method, config.to_dict()], sort_keys=True)
        if key not in self._site_cache:
            self._site_cache[key] = config.sites(self.base)
        return self._site_cache[key]

    def _base_weight(self, module_name: str) -> torch.Tensor:
        return self._base_modules[module_name].weight


def _key(site: Site) -> str:
    """nn.ModuleDict keys cannot hold dots."""
    return site.module_name.replace(".", "-")
