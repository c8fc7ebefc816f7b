"""AdapterModel: many named adapters over one frozen base model.

Adapters never replace base modules: each adapted layer gets a forward hook that passes the
layer's output through the active adapters. The base keeps its own structure, parameter names and
weights, so ``disabled()`` is exactly the base, and switching adapters is one attribute write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
from torch import nn

from .errors import AdapterkitError, AdapterNameError, ConfigError, MergeError
from .inject import Site
from .methods import AdapterConfig
from .mixed import BASE, Kind, MixedPlan, stack_weights

if TYPE_CHECKING:
    from .methods.adalora import RankAllocator

_VALID_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,127}")


class _Routing:
    """Which adapters run, shared by every hook so that switching is a single assignment.

    A mixed batch (one adapter per row) is kept per thread and only for the call that set it, so
    two threads running different batches through one model never see each other's rows."""

    __slots__ = ("active", "_local")

    def __init__(self) -> None:
        self.active: tuple[str, ...] = ()
        self._local = threading.local()

    @property
    def mixed(self) -> "MixedPlan | None":
        return getattr(self._local, "plan", None)

    @mixed.setter
    def mixed(self, plan: "MixedPlan | None") -> None:
        self._local.plan = plan


class _Tap:
    """Keeps the input of a base module for parallel adapters that read a sub-layer's input."""

    def __init__(self, module: nn.Module, routing: _Routing) -> None:
        self.routing = routing
        self.readers: set[str] = set()
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple) -> None:
        plan = self.routing.mixed
        if not self.readers.isdisjoint(self.routing.active if plan is None else plan.names):
            self.value = args[0]


class _Attachment:
    """The adapters attached to one base module, applied to its output by a forward hook."""

    def __init__(self, module: nn.Module, routing: _Routing) -> None:
        self.routing = routing
        self.adapters: dict[str, tuple[nn.Module, _Tap | None]] = {}
        self.handle = module.register_forward_hook(self._apply)

    def _apply(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        plan = self.routing.mixed
        if plan is not None:
            return plan.apply(self, args[0], output)
        active = self.routing.active
        if not active:
            return None
        entries = [entry for name in active if (entry := self.adapters.get(name)) is not None]
        if len(entries) > 1:  # adapters that change the layer itself first, then output transforms in order
            entries.sort(key=lambda entry: not getattr(entry[0], "acts_on_input", False))
        x, y, tapped = args[0], output, False
        for adapter, tap in entries:
            if tap is not None:
                y, tapped = adapter(tap.value, y), True
            else:
                y = adapter(x, y)
        if tapped:
            for _, tap in self.adapters.values():
                if tap is not None:
                    tap.value = None
        return y


_STACK_CACHE_ENTRIES = 256  # (module, adapters) stacks kept between calls


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
        self._stacks: OrderedDict[tuple, tuple[tuple, dict[str, torch.Tensor]]] = OrderedDict()
        self._allocators: dict[str, "RankAllocator"] = {}  # AdaLoRA rank allocation, per adapter
        self._merged: str | None = None
        self._unmerged_weights: dict[str, torch.Tensor] = {}  # exact copies of the weights merging changed
        self.train(base.training)  # a base in eval mode stays so: no surprise dropout

    # ---- running -------------------------------------------------------------------------
    def forward(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs):
        """The base's forward; with ``adapter_names``, row i runs through adapter ``adapter_names[i]``."""
        if adapter_names is not None:
            with self.mixed_adapters(adapter_names, _batch_rows(args, kwargs)):
                return self.base(*args, **kwargs)
        training = self._training_allocators()
        for allocator in training:
            allocator.check_stepped()
        outputs = self.base(*args, **kwargs)
        if training and isinstance(getattr(outputs, "loss", None), torch.Tensor):
            outputs.loss = outputs.loss + _orthogonality_penalty(training)
        return outputs

    def regularization_loss(self) -> torch.Tensor | float:
        """What training adds to the task loss: AdaLoRA's orthogonality penalty for the active
        adapters being trained, 0 otherwise. ``forward`` adds it to the loss it returns; a loss
        computed from the logits must add it itself."""
        return _orthogonality_penalty(self._training_allocators())

    def _training_allocators(self) -> list["RankAllocator"]:
        if not self.training:
            return []
        return [self._allocators[n] for n in self.active if n in self._allocators and self._trains(n)]

    def step(self, global_step: int) -> None:
        """Call after every optimizer step (before zero_grad): runs AdaLoRA's rank allocation for the
        adapters being trained. Does nothing for other kinds."""
        for name, allocator in self._allocators.items():
            if self._trains(name):
                pattern = allocator.step(global_step)
                if pattern is not None:  # the final ranks: saving keeps only these
                    self._configs[name] = dataclasses.replace(self._configs[name], rank_pattern=pattern)

    def _trains(self, name: str) -> bool:
        return any(p.requires_grad for p in self.adapter_layers[name].parameters())

    def adapter_ranks(self, name: str) -> dict[str, int]:
        """The rank of each module of a LoRA or AdaLoRA adapter (AdaLoRA: the triplets it keeps)."""
        self._check_known(name)
        ranks = {}
        for site in self._sites[name]:
            module = self.adapter_layers[name][_key(site)]
            if not hasattr(module, "rank"):
                raise ConfigError(f"adapter {name!r} is a {self._configs[name].method} adapter; only LoRA and AdaLoRA adapters have ranks")
            ranks[site.module_name] = module.rank
        return ranks

    def generate(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs):
        """The base's generate; with ``adapter_names``, one adapter per input row (beams and
        returned sequences of a row use that row's adapter)."""
        if adapter_names is None:
            return self.base.generate(*args, **kwargs)
        with self.mixed_adapters(adapter_names, _batch_rows(args, kwargs)):
            return self.base.generate(*args, **kwargs)

    @contextlib.contextmanager
    def mixed_adapters(self, adapter_names: Sequence[str | None], rows: int | None = None) -> Iterator[None]:
        """Inside the block, row i of every batch runs through adapter ``adapter_names[i]`` (None or
        "base": the bare base), whatever ``set_active`` chose. The base runs once for the whole
        batch; at each adapted layer all rows' adapters are computed together.

        Inference only: refused in training mode and while an adapter is merged."""
        plan = self._mixed_plan(adapter_names, rows)
        saved = self._routing.mixed
        self._routing.mixed = plan
        try:
            yield
        finally:
            self._routing.mixed = saved

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
        if config.method == "adalora":
            from .methods.adalora import RankAllocator

            by_module = {site.module_name: modules[_key(site)] for site in sites}
            self._allocators[name] = RankAllocator(name, config, by_module)

    def delete_adapter(self, name: str) -> None:
        self._check_known(name)
        if name == self._merged:
            raise MergeError(f"adapter {name!r} is merged into the base weights; unmerge() it before deleting it")
        self._allocators.pop(name, None)
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
        for key in [key for key in self._stacks if name in key[2]]:
            del self._stacks[key]

    def set_active(self, names: str | Sequence[str] | None) -> None:
        """Choose the adapters that run, by name; None for the base.

        When several adapters act on one layer, those that change the layer itself (LoRA, AdaLoRA:
        a delta computed from the layer's input) apply first, whatever their place in ``names``;
        then adapters that transform the layer's output (bottlenecks) apply in the order given.
        A merged adapter stays active until ``unmerge()``."""
        if names is None:
            names = ()
        elif isinstance(names, str):
            names = (names,)
        names = tuple(names)
        for name in names:
            self._check_known(name)
        if len(set(names)) != len(names):
            raise AdapterNameError(f"an adapter is named twice in {list(names)}")
        if self._merged is not None and self._merged not in names:
            raise MergeError(f"adapter {self._merged!r} is merged into the base weights, so it cannot be switched off; unmerge() first")
        self._routing.active = names

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the pure base model inside the block."""
        if self._merged is not None:
            raise MergeError(f"adapter {self._merged!r} is merged into the base weights; unmerge() before running the bare base")
        saved = self._routing.active
        self._routing.active = ()
        try:
            yield
        finally:
            self._routing.active = saved

    def train_adapter(self, name: str) -> None:
        """Make ``name`` the only trainable part of the model (and active, if it is not already)."""
        self._check_known(name)
        if name == self._merged:
            raise MergeError(f"adapter {name!r} is merged into the base weights and cannot train; unmerge() first")
        for other, modules in self.adapter_layers.items():
            modules.requires_grad_(other == name)
        if name not in self.active:
            self.set_active(name)

    # ---- merging ---------------------------------------------------------------------------
    @property
    def merged(self) -> str | None:
        """The adapter folded into the base weights, if any."""
        return self._merged

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold a LoRA or AdaLoRA adapter into the base weights, W += s * B A (transposed for
        GPT-2's Conv1D). The layers it adapts then run at the bare base's cost, with no hook work.
        It stays active and is frozen; switching it off, deleting or training it is refused until ``unmerge()``,
        which restores the base weights bit for bit."""
        self._check_known(name)
        if self._merged is not None:
            raise MergeError(f"adapter {self._merged!r} is already merged into the base weights; unmerge() it first")
        modules = self.adapter_layers[name]
        if not all(hasattr(module, "low_rank_factors") for module in modules.values()):
            raise MergeError(
                f"adapter {name!r} is a {self._configs[name].method} adapter; only LoRA and AdaLoRA adapters "
                "can be merged into the weights (a bottleneck is not a linear map)"
            )
        from .io import base_fingerprint

        base_fingerprint(self.base)  # taken (and kept) from the unmerged weights
        modules.requires_grad_(False)  # training it now would silently diverge from the merged copy
        for site in self._sites[name]:
            layer = self._base_modules[site.module_name]
            self._unmerged_weights[site.module_name] = layer.weight.detach().clone()
            layer.weight.add_(_weight_update(layer, modules[_key(site)]))
            self._detach(name, site.module_name)
        self._merged = name
        if name not in self.active:
            self._routing.active = self.active + (name,)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact base weights; the merged adapter runs through its hooks again."""
        name = self._merged
        if name is None:
            raise MergeError("no adapter is merged")
        for site in self._sites[name]:
            self._base_modules[site.module_name].weight.copy_(self._unmerged_weights.pop(site.module_name))
            attachment = self._attachments.get(site.module_name)
            if attachment is None:
                attachment = self._attachments[site.module_name] = _Attachment(self._base_modules[site.module_name], self._routing)
            attachment.adapters[name] = (self.adapter_layers[name][_key(site)], None)
        self._merged = None

    def merge_and_unload(self, name: str) -> nn.Module:
        """Merge ``name`` for good and return the plain transformers model, free of every adapter
        and hook (``save_pretrained`` writes it as an ordinary checkpoint). This AdapterModel is
        left empty."""
        self.merge(name)
        self._merged = None
        self._unmerged_weights = {}
        self._sites[name] = []  # its hooks went with the merge
        for other in list(self._configs):
            self.delete_adapter(other)
        from .io import forget_base_fingerprint

        forget_base_fingerprint(self.base)
        return self.base

    def _detach(self, name: str, module_name: str) -> None:
        attachment = self._attachments[module_name]
        del attachment.adapters[name]
        if not attachment.adapters:
            attachment.handle.remove()
            del self._attachments[module_name]

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
    def save_adapter(self, name: str, path: str | Path, format: str = "adapterkit") -> None:
        """Write one adapter to a folder (adapter_config.json + adapter_model.safetensors), atomically.
        format="peft" writes a LoRA or AdaLoRA adapter as peft's ``save_pretrained`` does."""
        from .io import save_adapter

        save_adapter(self, name, path, format=format)

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

    def training_state(self, name: str) -> dict[str, torch.Tensor]:
        """What training ``name`` carries between steps besides its saved tensors (AdaLoRA's rank
        allocation), for checkpoints; empty for methods that keep nothing."""
        self._check_known(name)
        allocator = self._allocators.get(name)
        return {} if allocator is None else allocator.state_dict()

    @torch.no_grad()
    def load_training_state(self, name: str, saved: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
        """Put ``name`` back as a checkpoint left it: ``saved``, its tensors as a saved folder holds
        them, and ``state``, what ``training_state`` gave."""
        self._check_known(name)
        allocator = self._allocators.get(name)
        if allocator is not None:
            saved = allocator.load_state_dict(state, saved)
            if allocator.final_pattern is not None:  # saving keeps only the final ranks, as step() set it
                self._configs[name] = dataclasses.replace(self._configs[name], rank_pattern=allocator.final_pattern)
        for key, tensor in self.adapter_state_dict(name).items():
            tensor.copy_(saved[key])

    # ---- mixed batches ---------------------------------------------------------------------
    def _mixed_plan(self, adapter_names: Sequence[str | None], rows: int | None) -> MixedPlan:
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or not adapter_names:
            raise AdapterNameError(f"adapter_names must be a non-empty list with one name (or None) per row, got {adapter_names!r}")
        if rows is not None and len(adapter_names) != rows:
            raise AdapterNameError(f"adapter_names has {len(adapter_names)} names for a batch of {rows} rows; give one per row")
        if self.training:
            raise AdapterkitError("mixed-adapter batches are for inference: call model.eval() first (train one adapter at a time with train_adapter)")
        if self._merged is not None:
            raise MergeError(f"adapter {self._merged!r} is merged into the base weights, so it would apply to every row; unmerge() it to mix adapters per row")
        names = [None if name in (None, BASE) else name for name in adapter_names]
        for name in set(names) - {None}:
            self._check_known(name)
        return MixedPlan(self, names)

    def _stacked(self, attachment: _Attachment, kind: Kind, names: list[str]) -> dict[str, torch.Tensor]:
        """The weights of ``names`` at one module, stacked; kept between calls until a parameter
        changes (its version counter moves) or one of the adapters is deleted."""
        modules = [attachment.adapters[name][0] for name in names]
        signature = tuple((id(p), p._version, p.data_ptr()) for module in modules for p in module.parameters())
        key = (attachment, kind, tuple(names))
        cached = self._stacks.get(key)
        if cached is not None and cached[0] == signature:
            self._stacks.move_to_end(key)
            return cached[1]
        stacked = stack_weights(kind, modules)
        self._stacks[key] = (signature, stacked)
        if len(self._stacks) > _STACK_CACHE_ENTRIES:
            self._stacks.popitem(last=False)
        return stacked

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


def _orthogonality_penalty(allocators: list["RankAllocator"]) -> torch.Tensor | float:
    return sum((allocator.orthogonality_penalty() for allocator in allocators), 0.0)


def _weight_update(layer: nn.Module, adapter: nn.Module) -> torch.Tensor:
    """s * B A in the layout of ``layer.weight``: [out, in] for nn.Linear, [in, out] for Conv1D."""
    A, B, scale = adapter.low_rank_factors()
    update = (B.float() @ A.float()) * scale
    return (update if isinstance(layer, nn.Linear) else update.T).to(layer.weight.dtype)


def _batch_rows(args: tuple, kwargs: dict) -> int | None:
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value.shape[0]
    return None


def _key(site: Site) -> str:
    """nn.ModuleDict keys cannot hold dots."""
    return site.module_name.replace(".", "-")
