"""AdapterModel: many named adapters over one frozen base model.

Adapters never replace base modules: the hook layer (``hooks.py``) passes each adapted layer's
input or output through the active adapters. The base keeps its own structure, parameter names and
weights, so ``disabled()`` is exactly the base, and switching adapters is one attribute write.
What differs per method (where it attaches, its maths, merging, training state, file mapping) comes
from the method registry; this module never names a method.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import types
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from .compose import Block, Composition, Fuse, Stack, check_nesting, fusions, to_json
from .compose import adapter_names as names_in
from .errors import AdapterFileError, AdapterNameError, ConfigError, MergeError, ShapeMismatchError
from .hooks import HookLayer
from .inject import Site
from .io import CONFIG_FILE, adapter_files, check_base, forget_base_fingerprint, read_adapter, write_folder_atomically
from .merging import MergedWeights, combine_adapters
from .methods import AdapterConfig, AdapterModule, MethodTraining, get_method, shared_key, shared_name
from .names import check_adapter_name
from .quantization import prepare_quantized
from .resolve import check_fusion, check_known, mixed_rows, resolve

SHARED = "~shared"  # an adapter's shared tensors among its modules; no module name gives this key


class AdapterLayers(nn.ModuleDict):
    """The adapters' modules by adapter name. Unlike nn.ModuleDict it takes every valid adapter
    name as a key, names of nn.Module attributes such as "training", "to" or "forward" included."""

    def __setitem__(self, key: str, module: nn.Module) -> None:
        self._modules[key] = module


# peft's (and transformers' adapter mixin's) methods a peft user reaches for, and ours
PEFT_METHODS = {
    "set_adapter": "set_active(name)",
    "enable_adapter_layers": "set_active(name)",
    "disable_adapter_layers": "set_active(None), or the disabled() context manager",
    "enable_adapters": "set_active(name)",
    "disable_adapters": "set_active(None), or the disabled() context manager",
}


class _signed_as_base:  # noqa: N801 (a decorator)
    """Gives ``AdapterModel.forward`` the signature of the base's forward plus ``adapter_names``,
    so tools that pick inputs by the forward's parameters (``transformers.Trainer`` drops the
    dataset columns it does not name) see ``input_ids``, ``labels``... The call itself is unchanged."""

    def __init__(self, function) -> None:
        self.function = function
        functools.update_wrapper(self, function)

    def __get__(self, instance, owner=None):
        if instance is None:
            return self.function
        base = instance.__dict__.get("_modules", {}).get("base")
        if base is None:
            return types.MethodType(self.function, instance)
        return types.MethodType(_forward_signed_as(self.function, type(base)), instance)


@functools.cache
def _forward_signed_as(function, base_type: type):
    """A copy of ``function`` whose ``__signature__`` is ``base_type.forward``'s with ``adapter_names``."""
    signed = types.FunctionType(function.__code__, function.__globals__, function.__name__, function.__defaults__,
                                function.__closure__)
    functools.update_wrapper(signed, function)
    del signed.__wrapped__  # inspect would follow it back to (*args, **kwargs)
    signed.__kwdefaults__ = function.__kwdefaults__
    try:
        parameters = list(inspect.signature(base_type.forward).parameters.values())
    except (TypeError, ValueError):
        return function
    if "adapter_names" not in [p.name for p in parameters]:
        ours = inspect.signature(function).parameters["adapter_names"]
        at = next((i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD), len(parameters))
        parameters.insert(at, ours.replace(kind=inspect.Parameter.KEYWORD_ONLY))
    try:
        signed.__signature__ = inspect.Signature(parameters)
    except ValueError:
        return function
    return signed


class AdapterModel(nn.Module):
    """A frozen transformers model with named adapters that can be added, switched, trained,
    saved and loaded without touching the base or each other.

    Calls, ``generate`` and attribute look-ups go to the base model, so an AdapterModel is used
    like the model it wraps. One base takes one AdapterModel at a time (``unload()`` frees it).
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.hooks = HookLayer(base, self)
        self.base = base
        base.requires_grad_(False)
        prepare_quantized(base)
        self.adapter_layers = AdapterLayers()
        self._configs: dict[str, AdapterConfig] = {}
        self._compositions: dict[str, Block] = {}  # named compositions, usable wherever an adapter name is
        self._training: dict[str, MethodTraining] = {}  # per adapter, for methods that carry training state
        self._trained: str | None = None  # what train_adapter / train_fusion made trainable
        self._warned_eval_mode = False
        self._adds_regularization = True  # forward adds regularization_loss() to the loss (see task_loss_only)
        self._merging = MergedWeights(self.hooks)
        self.train(base.training)  # a base in eval mode stays so: no surprise dropout

    def __deepcopy__(self, memo) -> AdapterModel:
        """Refused: a copy's hooks would still be wired to this base and its routing."""
        raise ConfigError("an AdapterModel cannot be deep-copied: its adapters are hooks on this base. For a second "
                          "model, wrap another base (ak.AdapterModel(ak.load_base(...)[0])) and load_adapter() the "
                          "saved adapters; for the bare base as a reference, run inside model.disabled()")

    # ---- running -------------------------------------------------------------------------
    @_signed_as_base
    def forward(self, *args, adapter_names: Sequence[str | Composition | None] | None = None, **kwargs):
        """The base's forward; with ``adapter_names``, row i runs through ``adapter_names[i]``: an
        adapter or composition name, a composition block, or None for the bare base."""
        if adapter_names is not None:
            with self.mixed_adapters(adapter_names, _batch_rows(args, kwargs)):
                return self.base(*args, **kwargs)
        training = self._in_training()
        for state in training:
            state.before_forward()
        if self._trained is not None and not self._warned_eval_mode and torch.is_grad_enabled():
            self._warn_if_training_in_eval_mode()
        outputs = self.base(*args, **kwargs)
        if training and self._adds_regularization and isinstance(getattr(outputs, "loss", None), torch.Tensor):
            outputs.loss = outputs.loss + _regularization(training)
        return outputs

    def regularization_loss(self) -> torch.Tensor | float:
        """What training adds to the task loss (AdaLoRA's orthogonality penalty) for the active
        adapters being trained, 0 otherwise. ``forward`` adds it to the loss it returns; a loss
        computed from the logits must add it itself."""
        return _regularization(self._in_training())

    @contextlib.contextmanager
    def task_loss_only(self) -> Iterator[None]:
        """Inside the block ``forward``'s loss is the base's alone, without ``regularization_loss()``:
        for a trainer that rescales the model's loss (by its token count across gradient-accumulation
        steps and processes) and must add the regularization once per optimizer step itself."""
        saved = self._adds_regularization
        self._adds_regularization = False
        try:
            yield
        finally:
            self._adds_regularization = saved

    def _in_training(self) -> list[MethodTraining]:
        if not self._training:
            return []
        return [self._training[n] for n in self.active
                if n in self._training and self.adapter_layers[n].training and self._trains(n)]

    def _warn_if_training_in_eval_mode(self) -> None:
        """A forward that builds a graph for a trainable adapter left in eval mode is almost always
        a training loop that forgot ``model.train()``: dropout would be off. Said once."""
        modules = self.adapter_layers[self._trained] if self._trained in self.adapter_layers else None
        if modules is not None and not modules.training and self._trains(self._trained):
            warnings.warn(
                f"adapter {self._trained!r} is trainable but in eval mode, so its dropout is off; call "
                "model.train() in a training loop (model.eval() for evaluation, inside torch.no_grad())",
                stacklevel=3,
            )
            self._warned_eval_mode = True

    def step(self, global_step: int) -> None:
        """Call after every optimizer step (before zero_grad): runs the training-time work of the
        adapters being trained (AdaLoRA's rank allocation). Does nothing for other methods."""
        for name, state in self._training.items():
            if self._trains(name):
                changed = state.after_step(global_step)
                if changed is not None:
                    self._configs[name] = changed

    @property
    def trained_adapter(self) -> str | None:
        """The adapter ``train_adapter`` (or ``train_fusion``) made trainable, None before either."""
        return self._trained if self._trained in self._configs else None

    @property
    def _hf_peft_config_loaded(self) -> bool:
        """transformers' flag for "adapters are attached": its Trainer refuses to train a quantized
        model (``is_quantized``, read from the base) unless it is set or the model is peft's."""
        return bool(self._configs)

    def _trains(self, name: str) -> bool:
        return any(p.requires_grad for p in self.adapter_layers[name].parameters())

    def adapter_ranks(self, name: str) -> dict[str, int]:
        """The rank of each module of a low-rank adapter (AdaLoRA: the triplets it keeps)."""
        ranks = {}
        for site, module in self._site_modules(name):
            if not hasattr(module, "rank"):
                raise ConfigError(f"adapter {name!r} is a {self._configs[name].method} adapter, which has no rank")
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
        plan = self.hooks.mixed_plan(self._mixed_rows(adapter_names, rows))
        routing = self.hooks.routing
        saved = routing.mixed
        routing.mixed = plan
        try:
            yield
        finally:
            routing.mixed = saved

    def check_adapter(self, adapter: str | Composition | None) -> None:
        """Raise what ``mixed_adapters`` would raise for one row through ``adapter`` (an adapter or
        composition name, a block, or None / "base" for the bare base), so that whoever batches
        independent rows can refuse the bad one alone rather than fail the whole batch's forward."""
        self._mixed_rows([adapter], None)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Keep only each block's input in the forward pass and recompute the block in the backward
        pass (less activation memory, about a third more compute). The recomputation runs with the
        routing of the forward it repeats (active adapters, mixed-batch plan), whatever was set in
        between or on whichever thread autograd runs it. Non-reentrant checkpointing only: the
        reentrant kind gives frozen-input blocks no gradients."""
        kwargs = dict(gradient_checkpointing_kwargs or {})
        if kwargs.pop("use_reentrant", False):
            raise ConfigError("reentrant checkpointing leaves adapters in blocks with frozen inputs "
                              "without gradients; "
                              "use use_reentrant=False")
        if (not getattr(self.base, "supports_gradient_checkpointing", False)
                or not hasattr(self.base, "activation_checkpointing_enable")):
            raise ConfigError(f"{type(self.base).__name__} does not support gradient checkpointing")
        self.base.activation_checkpointing_enable(
            {**kwargs, "use_reentrant": False, "context_fn": self._recompute_contexts})
        self.base.disable_input_require_grads()  # non-reentrant checkpoints need no grad on the embeddings

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """transformers' newer name for ``gradient_checkpointing_enable``, the one its Trainer calls
        (``gradient_checkpointing=True``, TRL's default), so that the Trainer's checkpointing is ours,
        not the base's (which would take ``use_reentrant=True``). Every block, kept in memory."""
        if every_n_layers != 1 or offload:
            raise ConfigError(f"adapterkit checkpoints every block and keeps its input in memory; drop "
                              f"every_n_layers={every_n_layers!r} and offload={offload!r}")
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs)

    def _recompute_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """(for the forward, for its recomputation): the second restores this forward's routing."""
        routing = self.hooks.routing
        return contextlib.nullcontext(), self._routed(routing.active, routing.mixed, routing.tree)

    @contextlib.contextmanager
    def _routed(self, active: tuple[str, ...], plan, tree: Block | None) -> Iterator[None]:
        """Run with this routing (active adapters, mixed plan, composition), then put back the one before."""
        routing = self.hooks.routing
        saved = routing.active, routing.mixed, routing.tree
        routing.active, routing.mixed, routing.tree = active, plan, tree
        try:
            yield
        finally:
            routing.active, routing.mixed, routing.tree = saved

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base", "_modules", "_parameters", "_buffers"):
                raise
            if name in PEFT_METHODS:  # else the base's transformers mixin answers with an unrelated error
                raise AttributeError(f"AdapterModel has no {name}(); in adapterkit use {PEFT_METHODS[name]}") from None
            return getattr(self.base, name)

    # ---- managing adapters -----------------------------------------------------------------
    @property
    def adapters(self) -> dict[str, AdapterConfig]:
        """The adapters by name, with their configs, in the order they were added."""
        return dict(self._configs)

    @property
    def active(self) -> tuple[str, ...]:
        return self.hooks.routing.active

    def adapter_sites(self, name: str) -> list[Site]:
        """Where adapter ``name`` is attached in the base."""
        self._check_known(name)
        return self.hooks.sites(name)

    def add_adapter(
        self, name: str, config: AdapterConfig, state_dict: dict[str, torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Attach a new adapter, inactive and frozen until ``set_active``/``train_adapter``.

        With ``state_dict`` (keyed as ``adapter_state_dict`` gives it), the modules are built
        without initialising them and take those tensors, after checks of names, shapes, dtypes
        and values; this is how every format loads. Shared tensors it leaves out (a method's
        ``shared_tensors``, such as VeRA's projections saved without them) are made from the config.

        The modules go on the device of the layer each one adapts, in ``dtype``; by default
        float32 over a bfloat16 or float16 base (else the base's dtype), because an optimizer's
        small updates vanish when rounded to 8 bits of mantissa. They compute in their own dtype;
        the hook layer casts their inputs and results."""
        self._check_new_name(name)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ConfigError(f"dtype must be a floating-point torch dtype such as torch.float32, got {dtype!r}")
        if not isinstance(config, AdapterConfig):
            raise ConfigError(f"expected an adapter config such as BottleneckConfig, got {type(config).__name__}")
        method = get_method(config.method)
        missing = [n for n in config.depends_on() if n not in self._configs]
        if missing:
            raise AdapterNameError(f"{config.method} {name!r} needs the adapters {missing}, which are not loaded; "
                                   "load them first")
        sites = self.hooks.sites_for(config)
        if state_dict is None:
            modules = {site.module_name: self._fresh_module(config, site, dtype) for site in sites}
        else:
            modules = self._modules_from_state(config, sites, state_dict, dtype)
        shared = self._shared_tensors(config, sites, state_dict, dtype)
        layers = nn.ModuleDict({_key(site): modules[site.module_name] for site in sites})
        if shared is not None:
            layers[SHARED] = shared
            for module in modules.values():
                module.use_shared(shared)
        layers.requires_grad_(False)
        layers.train(self.training)
        self.adapter_layers[name] = layers
        self._configs[name] = config
        self.hooks.attach(name, sites, modules)
        if method.training is not None:
            self._training[name] = method.training(name, config, modules)

    def _fresh_module(self, config: AdapterConfig, site: Site, dtype: torch.dtype | None) -> AdapterModule:
        weight = self.hooks.base_module(site.module_name).weight
        return config.build(site).to(device=weight.device, dtype=dtype or _adapter_dtype(weight))

    def _modules_from_state(
        self, config: AdapterConfig, sites: list[Site], state_dict: dict, dtype: torch.dtype | None
    ) -> dict[str, AdapterModule]:
        """Modules built on the meta device (no initialisation) that take ``state_dict``'s tensors."""
        if not isinstance(state_dict, dict):
            raise ShapeMismatchError(f"state_dict must map tensor names to tensors, got {type(state_dict).__name__}")
        built = {site.module_name: config.build(site, device="meta") for site in sites}
        expected = {
            f"{module_name}.adapter.{param}": (module_name, param, tensor.shape)
            for module_name, module in built.items() for param, tensor in module.state_dict().items()
        }
        shared = set(map(shared_key, config.shared_tensors(sites, device="meta")))
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected) - shared)
        if missing or unexpected:
            raise ShapeMismatchError(
                f"the tensors do not fit this {config.method} config on this base: missing {_few(missing)}, "
                f"unexpected {_few(unexpected)}"
            )
        given: dict[str, dict[str, torch.Tensor]] = {module_name: {} for module_name in built}
        for key, (module_name, param, shape) in expected.items():
            tensor = _checked(key, state_dict[key], shape)
            weight = self.hooks.base_module(module_name).weight
            given[module_name][param] = tensor.detach().to(device=weight.device, dtype=dtype or _adapter_dtype(weight))
        for module_name, module in built.items():
            module.load_state_dict(given[module_name], assign=True)  # the tensors replace the meta ones
        return built

    def _shared_tensors(
        self, config: AdapterConfig, sites: list[Site], state_dict: dict | None, dtype: torch.dtype | None
    ) -> nn.Module | None:
        """The adapter's shared tensors (``AdapterConfig.shared_tensors``) as the frozen buffers of
        one module on the first site's device: those ``state_dict`` holds (checked), the others made
        from the config. None for a method without any."""
        shapes = config.shared_tensors(sites, device="meta")
        if not shapes:
            return None
        given = {} if state_dict is None else {
            name: state_dict[key] for name in shapes if (key := shared_key(name)) in state_dict
        }
        fresh = config.shared_tensors(sites) if len(given) < len(shapes) else {}
        weight = self.hooks.base_module(sites[0].module_name).weight
        holder = nn.Module()
        for name, meta in shapes.items():
            tensor = _checked(shared_key(name), given[name], meta.shape) if name in given else fresh[name]
            holder.register_buffer(name, tensor.detach().to(device=weight.device,
                                                             dtype=dtype or _adapter_dtype(weight)))
        return holder

    def delete_adapter(self, name: str) -> None:
        self._check_known(name)
        if name == self.merged:
            raise MergeError(f"adapter {name!r} is merged into the base weights; unmerge() it before deleting it")
        users = [n for n, c in self._configs.items() if name in c.depends_on()] + [
            n for n, block in self._compositions.items()
            if name in names_in(block) or name in [f.name for f in fusions(block)]
        ]
        if users:
            raise AdapterNameError(f"adapter {name!r} is part of {users}; delete those first")
        self._training.pop(name, None)
        if (self.hooks.routing.tree is not None
                and name in self.active + tuple(f.name for f in fusions(self.hooks.routing.tree))):
            self.set_active(None)
        else:
            self.set_active(tuple(a for a in self.active if a != name))
        self.hooks.detach(name)
        del self.adapter_layers[name]
        del self._configs[name]

    def set_active(self, names: str | Sequence[str] | Composition | None) -> None:
        """Choose what runs: an adapter or composition name, a list of adapter names (a plain
        stack), a composition block (``Stack``, ``Fuse``, ``Average``), or None for the base.

        When several adapters act on one layer, those that change the layer itself (LoRA, AdaLoRA:
        a delta computed from the layer's input) apply first, whatever their place in ``names``;
        then adapters that transform the layer's output (bottlenecks) apply in the order given.
        A merged adapter stays active until ``unmerge()``."""
        block = resolve(names, self._configs, self._compositions)
        routing = self.hooks.routing
        plain = block is None or isinstance(block, str) or (
            isinstance(block, Stack) and all(isinstance(c, str) for c in block.children))
        flat = () if block is None else tuple(names_in(block))
        if self.merged is not None and (not plain or self.merged not in flat):
            raise MergeError(f"adapter {self.merged!r} is merged into the base weights, so it cannot be switched off; "
                             "unmerge() first")
        routing.tree = None
        routing.active = flat
        if not plain:
            routing.tree = block

    @property
    def active_composition(self) -> Block | None:
        """The composition that runs, when one was set (None: the plain stack ``active``)."""
        return self.hooks.routing.tree

    def add_composition(self, name: str, block: Composition) -> None:
        """Name a composition, so that it can be used wherever an adapter name can: set_active,
        mixed batches (``adapter_names``), the server's ``model`` field."""
        self._check_new_name(name)
        if not isinstance(block, Composition):
            raise ConfigError(f"expected a Stack, Fuse or Average, got {type(block).__name__}")
        resolve(block, self._configs, self._compositions)
        self._compositions[name] = block

    @property
    def compositions(self) -> dict[str, Block]:
        return dict(self._compositions)

    def add_fusion(self, fuse: Fuse, temperature: float = 1.0) -> None:
        """Add the parameters of ``fuse`` (an adapter named ``fuse.name``, method "fusion"), with a
        layer at every module where one of its children acts. Frozen until ``train_fusion``."""
        from .methods import FusionConfig

        if not isinstance(fuse, Fuse):
            raise ConfigError(f"expected a Fuse block, got {type(fuse).__name__}")
        check_nesting(fuse)
        for name in names_in(fuse):
            self._check_known(name)
        for inner in fusions(fuse)[1:]:
            check_fusion(inner, self._configs)
        widths = {site.module_name: site.out_features for name in names_in(fuse) for site in self.hooks.sites(name)}
        self.add_adapter(fuse.name, FusionConfig(children=[to_json(c) for c in fuse.children], widths=widths,
                                                 temperature=temperature))

    def train_fusion(self, fuse: Fuse) -> None:
        """Train only the fusion's parameters (its children stay frozen) and run ``fuse``."""
        check_fusion(fuse, self._configs)
        self.set_active(fuse)
        for other, modules in self.adapter_layers.items():
            modules.requires_grad_(other == fuse.name)
        self.adapter_layers[fuse.name].train()
        self._trained, self._warned_eval_mode = fuse.name, False

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the pure base model inside the block."""
        if self.merged is not None:
            raise MergeError(f"adapter {self.merged!r} is merged into the base weights; "
                             "unmerge() before running the bare base")
        routing = self.hooks.routing
        saved = routing.active, routing.tree
        routing.tree, routing.active = None, ()
        try:
            yield
        finally:
            routing.active, routing.tree = saved

    def train_adapter(self, name: str) -> None:
        """Make ``name`` the only trainable part of the model (and active, if it is not already).
        A refused call changes nothing."""
        self._check_known(name)
        config = self._configs[name]
        if config.runs_inside_composition:
            raise ConfigError(f"{name!r} is a {config.method}: "
                              f"train it with train_fusion(ak.Fuse(..., name={name!r}))")
        if name == self.merged:
            raise MergeError(f"adapter {name!r} is merged into the base weights and cannot train; unmerge() first")
        if self.merged is not None and name not in self.active:
            raise MergeError(f"adapter {self.merged!r} is merged into the base weights, "
                             f"so {name!r} cannot become the active adapter; unmerge() first")
        for other, modules in self.adapter_layers.items():
            modules.requires_grad_(other == name)
        self.adapter_layers[name].train()  # dropout and training-time work on, whatever mode the base is in
        self._trained, self._warned_eval_mode = name, False
        if name not in self.active:
            self.set_active(name)

    # ---- merging (merging.py) ----------------------------------------------------------------
    @property
    def merged(self) -> str | None:
        """The adapter folded into the base weights, if any."""
        return self._merging.name

    def merge(self, name: str) -> None:
        """Fold an adapter into the base weights: an additive one (LoRA, AdaLoRA) adds its update,
        a multiplicative one (IA³) scales the weight's rows or columns. The layers it adapts then
        run at the bare base's cost, with no hook work. It stays active and is frozen; switching it
        off, deleting or training it is refused until ``unmerge()``, which restores the base
        weights bit for bit."""
        self._check_known(name)
        self._merging.fold(name, self._configs[name].method, self._site_modules(name), self.adapter_layers[name])

    def unmerge(self) -> None:
        """Restore the exact base weights; the merged adapter runs through its hooks again."""
        if self.merged is None:
            raise MergeError("no adapter is merged")
        self._merging.unfold(self._site_modules(self.merged))

    def merge_and_unload(self, name: str) -> nn.Module:
        """Merge ``name`` for good and return the plain transformers model, free of every adapter
        and hook (``save_pretrained`` writes it as an ordinary checkpoint). This AdapterModel is
        left empty and lets go of the base."""
        self.merge(name)
        self._merging.keep()  # its hooks went with the merge
        self._release()
        forget_base_fingerprint(self.base)
        return self.base

    def unload(self) -> nn.Module:
        """Remove every adapter and hook and return the bare base, weights as they were (a merged
        adapter is unmerged first). This AdapterModel is left empty and lets go of the base, which
        another AdapterModel may then wrap."""
        if self.merged is not None:
            self.unmerge()
        self._release()
        return self.base

    def _release(self) -> None:
        for other in list(self._configs):
            self.delete_adapter(other)
        self.hooks.release()

    # ---- combining -------------------------------------------------------------------------
    def merge_adapters(self, new_name: str, names: Sequence[str], weights: Sequence[float], method: str = "linear",
                       **options) -> None:
        """Add ``new_name``, made from the adapters ``names`` (all of one method) weighted by
        ``weights``. LoRA: peft's ``add_weighted_adapter`` ("linear", "cat", "svd", "ties"; options
        svd_rank, density, majority_sign_method). Bottleneck and IA³ adapters of one config:
        "linear", the weighted sum of their parameters. The new adapter is frozen and inactive."""
        self._check_new_name(new_name)
        names = list(names)
        for name in names:
            self._check_known(name)
        configs, states = [self._configs[n] for n in names], [self.adapter_state_dict(n) for n in names]
        self.add_adapter(new_name, *combine_adapters(configs, states, weights, method, **options))

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
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # ---- files -----------------------------------------------------------------------------
    def adapter_files(self, name: str, format: str = "adapterkit") -> dict[str, bytes]:
        """The files a saved folder of ``name`` holds, by file name (the config file last)."""
        self._check_known(name)
        return adapter_files(format, name, self._configs[name], self.adapter_state_dict(name), self.base,
                             self.hooks.sites(name))

    def save_adapter(self, name: str | Fuse, path: str | Path, format: str = "adapterkit") -> None:
        """Write one adapter (or a ``Fuse`` block's fusion) to a folder (adapter_config.json +
        adapter_model.safetensors), atomically; other files in the folder are left alone.
        format="peft" writes it as peft's ``save_pretrained`` does (for methods with a peft format)."""
        if isinstance(name, Fuse):
            check_fusion(name, self._configs)
            name = name.name
        path = Path(path)
        if path.is_dir() and any(path.iterdir()) and not (path / CONFIG_FILE).exists():
            raise AdapterFileError(f"{path} is a non-empty folder that holds no adapter; "
                                   "save into a new or adapter folder")
        write_folder_atomically(path, self.adapter_files(name, format))

    def load_adapter(self, path: str | Path, name: str | None = None, dtype: torch.dtype | None = None) -> str:
        """Load a saved adapter (adapterkit's, peft's or AdapterHub's format; an AdapterFusion
        folder too, after its members) under ``name`` (default: the name it was saved with, or a
        peft folder's name); returns the name. It loads onto this base's device and over any dtype
        of the base it was saved from; ``dtype`` as in ``add_adapter``."""
        saved = read_adapter(path, self.base)
        name = name if name is not None else saved.name
        if name is None:
            raise AdapterNameError(f"{path} carries no adapter name and its folder name is not a valid one; "
                                   "pass name=")
        self._check_new_name(name)
        if saved.base is not None:
            check_base(saved.base, self.base, Path(path))
        try:
            self.add_adapter(name, saved.config, saved.tensors, dtype)
        except ShapeMismatchError as error:
            raise ShapeMismatchError(f"{path}: {error}") from None
        return name

    def save_pretrained(self, save_directory: str | Path, is_main_process: bool = True, **kwargs) -> None:
        """Write the adapter being trained (``train_adapter`` / ``train_fusion``) at the top of
        ``save_directory`` as ``save_adapter`` writes it (adapter_config.json +
        adapter_model.safetensors), so ``load_adapter(save_directory)`` reads it back; with nothing
        in training, every adapter in a subfolder of its name. Other files in the folder (a
        Trainer's optimizer and trainer state) are left alone and the base is never written.
        ``state_dict``, ``safe_serialization`` and transformers' other arguments are ignored: the
        tensors are always the live adapter's, in safetensors."""
        if not is_main_process:
            return
        folder = Path(save_directory)
        trained = [self._trained] if self._trained is not None else []
        for name in trained or list(self._configs):
            target = folder if trained else folder / name
            target.mkdir(parents=True, exist_ok=True)
            for file_name, data in self.adapter_files(name).items():  # the config, which marks it whole, last
                (target / file_name).write_bytes(data)

    def load_adapter_weights(
        self, path: str | Path, name: str | None = None, training_state: dict[str, torch.Tensor] | None = None
    ) -> str:
        """Put the existing adapter ``name`` (default: the name it was saved with) back as the saved
        folder holds it, in place, so that an optimizer holding its parameters keeps them: its tensors
        and the config fields training sets (AdaLoRA's rank_pattern). With ``training_state``, what
        ``training_state(name)`` gave when the folder was written, what its method carries between
        steps comes back too (AdaLoRA's importance averages, and the pruned triplets a folder leaves
        out), as an exact resume needs. Resumes a ``save_pretrained`` checkpoint; returns the name."""
        saved = read_adapter(path, self.base)
        name = name if name is not None else saved.name
        if name is None:
            raise AdapterNameError(f"{path} carries no adapter name; pass name=")
        self._check_known(name)
        config = self._configs[name]
        if saved.config.method != config.method:
            raise ShapeMismatchError(f"{path} holds a {saved.config.method} adapter; "
                                     f"{name!r} is a {config.method} one")
        config = dataclasses.replace(config, **{f: getattr(saved.config, f) for f in config.set_by_training})
        tensors, training = saved.tensors, self._training.get(name)
        if training is not None and training_state is not None:
            tensors, fixed = training.load_state_dict(training_state, tensors)
            config = fixed or config
        live = self.adapter_state_dict(name)
        if set(tensors) != set(live):
            missing, extra = sorted(set(live) - set(tensors)), sorted(set(tensors) - set(live))
            raise ShapeMismatchError(f"{path} does not hold adapter {name!r}'s tensors "
                                     f"(missing: {_few(missing)}; unexpected: {_few(extra)})")
        with torch.no_grad():
            for key, tensor in live.items():
                tensor.copy_(_checked(key, tensors[key], tensor.shape))
        self._configs[name] = config
        return name

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """One adapter's tensors, keyed "<base module>.adapter.<parameter>", and its shared ones
        (``AdapterConfig.shared_tensors``) keyed "adapter.<name>" (the live tensors)."""
        tensors = {
            f"{site.module_name}.adapter.{param}": tensor
            for site, module in self._site_modules(name)
            for param, tensor in module.state_dict().items()
        }
        layers = self.adapter_layers[name]
        if SHARED in layers:
            tensors.update({shared_key(key): tensor for key, tensor in layers[SHARED].state_dict().items()})
        return tensors

    def method_training(self, name: str) -> MethodTraining | None:
        """The training-time state its method keeps for ``name`` (AdaLoRA's rank allocation), if any."""
        self._check_known(name)
        return self._training.get(name)

    def training_state(self, name: str) -> dict[str, torch.Tensor]:
        """What training ``name`` carries between steps besides its saved tensors (AdaLoRA's rank
        allocation), for checkpoints; empty for methods that keep nothing."""
        self._check_known(name)
        state = self._training.get(name)
        return {} if state is None else state.state_dict()

    @torch.no_grad()
    def load_training_state(self, name: str, saved: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
        """Put ``name`` back as a checkpoint left it: ``saved``, its tensors as a saved folder holds
        them, and ``state``, what ``training_state`` gave."""
        self._check_known(name)
        training = self._training.get(name)
        if training is not None:
            saved, changed = training.load_state_dict(state, saved)
            if changed is not None:
                self._configs[name] = changed
        for key, tensor in self.adapter_state_dict(name).items():
            if key in saved or shared_name(key) is None:  # shared tensors a folder leaves out are made as they were
                tensor.copy_(saved[key])

    # ---- helpers ---------------------------------------------------------------------------
    def _site_modules(self, name: str) -> list[tuple[Site, AdapterModule]]:
        self._check_known(name)
        layers = self.adapter_layers[name]
        return [(site, layers[_key(site)]) for site in self.hooks.sites(name) if _key(site) in layers]

    def _mixed_rows(self, adapter_names: Sequence[str | Composition | None], rows: int | None) -> list[Block | None]:
        return mixed_rows(adapter_names, rows, self._configs, self._compositions, self.training, self.merged)

    def _check_known(self, name: str) -> None:
        check_known(name, self._configs)

    def _check_new_name(self, name: str) -> None:
        check_adapter_name(name)
        if name in self._configs or name in self._compositions:
            kind = "an adapter" if name in self._configs else "a composition"
            raise AdapterNameError(f"{kind} named {name!r} already exists; delete it first or pick another name")


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """float32 over a half-precision base, else the base's own dtype."""
    return torch.promote_types(weight.dtype, torch.float32)


def _regularization(states: list[MethodTraining]) -> torch.Tensor | float:
    terms = [term for state in states if (term := state.regularization()) is not None]
    return sum(terms, 0.0)


def _checked(key: str, tensor, shape: torch.Size) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise ShapeMismatchError(f"tensor {key} must be a floating-point tensor, "
                                 f"got {getattr(tensor, 'dtype', type(tensor).__name__)}")
    if tensor.shape != shape:
        raise ShapeMismatchError(f"tensor {key} has shape {tuple(tensor.shape)}; "
                                 f"this config on this base needs {tuple(shape)}")
    return tensor


def _few(keys: list[str]) -> str:
    return f"{keys[:3]}{'…' if len(keys) > 3 else ''}"


def _batch_rows(args: tuple, kwargs: dict) -> int | None:
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value.shape[0]
    return None


def _key(site: Site) -> str:
    """nn.ModuleDict keys cannot hold dots."""
    return site.module_name.replace(".", "-")
