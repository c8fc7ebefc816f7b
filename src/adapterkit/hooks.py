"""The hook layer: adapters attached to a base model's modules, and the routing of each call.

Adapters never replace base modules. An adapted module gets at most one forward hook (for the
adapters that act on its output) and one forward pre-hook (for those that act on its input); a
module whose input a parallel adapter reads elsewhere gets a pre-hook that keeps it (a tap). Which
adapters run is one shared ``Routing`` object, so switching is a single assignment; a mixed batch
(one adapter per row) is kept per thread, only for the call that set it.

One base carries the hooks of one ``HookLayer`` at a time: a second one over the same base would
have both fire on every call, so it is refused until the first is released.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import weakref
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from .compose import Average, Block, Stack, adapter_names
from .errors import AdapterkitError
from .inject import Site
from .methods import AdapterConfig, AdapterModule
from .mixed import MixedPlan

_STACK_CACHE_ENTRIES = 256  # (site, kind, adapters) stacks kept between calls
_PLAN_CACHE_ENTRIES = 4  # mixed plans kept between calls (an engine alternates prefill and decode rows)
_HOLDERS: weakref.WeakKeyDictionary[nn.Module, HookLayer] = weakref.WeakKeyDictionary()


class Routing:
    """Which adapters run, shared by every hook of one base: ``active`` names them all; ``tree``
    is the composition they form, or None for a plain stack of ``active`` in order."""

    __slots__ = ("active", "tree", "_local")

    def __init__(self) -> None:
        self.active: tuple[str, ...] = ()
        self.tree: Block | None = None
        self._local = threading.local()

    @property
    def mixed(self) -> MixedPlan | None:
        return getattr(self._local, "plan", None)

    @mixed.setter
    def mixed(self, plan: MixedPlan | None) -> None:
        self._local.plan = plan

    def routed(self) -> frozenset[str] | tuple[str, ...]:
        """The adapters this thread's call runs: the mixed batch's, or the active ones."""
        plan = self.mixed
        return self.active if plan is None else plan.routed


class Tap:
    """Keeps the input (or output) of a base module for the adapters that read it elsewhere."""

    def __init__(self, module: nn.Module, routing: Routing, output: bool = False) -> None:
        self.routing = routing
        self.readers: set[str] = set()
        self.value: torch.Tensor | None = None
        if output:
            self.handle = module.register_forward_hook(
                lambda m, args, out: self._keep(out[0] if isinstance(out, tuple) else out))
        else:
            self.handle = module.register_forward_pre_hook(lambda m, args: self._keep(args[0]))

    def _keep(self, value: torch.Tensor) -> None:
        if not self.readers.isdisjoint(self.routing.routed()):
            self.value = value


@dataclasses.dataclass(frozen=True)
class Reader:
    """What an adapter reads at its site when that is not the hooked layer's input: a kept
    value (a tap), optionally plus the layer's output, optionally through a base norm module."""

    tap: Tap
    plus_output: bool = False
    norm: nn.Module | None = None

    def __call__(self, y: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        value = self.tap.value if rows is None else self.tap.value.index_select(0, rows)
        if self.plus_output:
            value = y + value
        return value if self.norm is None else self.norm.forward(value)


class SiteHooks:
    """The adapters attached to one base module: ``outputs`` act on its output (forward hook),
    ``inputs`` on its input (pre-hook), ``fusions`` mix other adapters' changes inside a Fuse block.
    Hooks are registered only while something is attached."""

    def __init__(self, module_name: str, module: nn.Module, routing: Routing) -> None:
        self.module_name = module_name
        self.module = module
        self.routing = routing
        self.outputs: dict[str, tuple[AdapterModule, Reader | None]] = {}
        self.inputs: dict[str, AdapterModule] = {}
        self.fusions: dict[str, AdapterModule] = {}
        self._output_handle = self._input_handle = None

    def add(self, name: str, adapter: AdapterModule, reader: Reader | None) -> None:
        if adapter.hook == "input":
            self.inputs[name] = adapter
            if self._input_handle is None:
                self._input_handle = self.module.register_forward_pre_hook(self._apply_input)
        elif adapter.hook == "composition":
            self.fusions[name] = adapter
        else:
            self.outputs[name] = (adapter, reader)
        if self._output_handle is None:  # compositions run every adapter of the site here
            self._output_handle = self.module.register_forward_hook(self._apply_output)

    def remove(self, name: str) -> bool:
        """Take ``name`` off this module; True when nothing is attached any more."""
        self.outputs.pop(name, None)
        self.inputs.pop(name, None)
        self.fusions.pop(name, None)
        empty = not self.outputs and not self.inputs and not self.fusions
        if empty and self._output_handle is not None:
            self._output_handle.remove()
            self._output_handle = None
        if not self.inputs and self._input_handle is not None:
            self._input_handle.remove()
            self._input_handle = None
        return empty

    def adapter(self, name: str) -> AdapterModule:
        if name in self.inputs:
            return self.inputs[name]
        return self.fusions[name] if name in self.fusions else self.outputs[name][0]

    def _apply_input(self, module: nn.Module, args: tuple) -> tuple | None:
        plan = self.routing.mixed
        if plan is not None:
            x = plan.apply_input(self, args[0])
        elif self.routing.tree is not None:
            return None  # a composition runs this site's input adapters in the output hook
        else:
            x = self.transform_input(self.routing.active, args[0])
        return None if x is args[0] else (x.to(args[0].dtype), *args[1:])

    def transform_input(self, names: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
        """``x`` through the input adapters among ``names``, in order (``x`` itself if none)."""
        for name in names:
            adapter = self.inputs.get(name)
            if adapter is not None:
                x = adapter.transform_input(x.to(compute_dtype(adapter)))
        return x

    def _apply_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        plan = self.routing.mixed
        if plan is not None:
            return plan.apply_output(self, args[0], output)
        tree = self.routing.tree
        if tree is not None:
            if not self.acts(tree):
                return None
            y = self.run(tree, args[0], output)
            self.clear_taps()
            return y
        return self.apply_outputs(self.routing.active, args[0], output)

    def apply_outputs(self, names: tuple[str, ...], x: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        """The module's ``output`` (input ``x``) changed by the output adapters among ``names``;
        None if none of them is here."""
        entries = [entry for name in names if (entry := self.outputs.get(name)) is not None]
        if not entries:
            return None
        if len(entries) > 1:  # changes of the layer itself first, then output transforms in order
            entries.sort(key=lambda entry: not entry[0].changes_layer)
        y, tapped = output, False
        for adapter, reader in entries:
            dtype = compute_dtype(adapter)
            if reader is not None:
                y, tapped = adapter(reader(y).to(dtype), y.to(dtype)), True
            else:
                y = adapter(x.to(dtype), y.to(dtype))
        if tapped:
            self.clear_taps()
        return y.to(output.dtype)

    def output_on_rows(self, name: str, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Batch ``rows`` of this module's output ``y`` (input ``x``) changed by output adapter
        ``name``, gathering only what the adapter reads."""
        adapter, reader = self.outputs[name]
        y_rows = y.index_select(0, rows)
        reads_x = reader is None and adapter.reads != "output"
        return self.run(name, x.index_select(0, rows) if reads_x else y_rows, y_rows, rows)  # y_rows: x unread

    # ---- compositions ------------------------------------------------------------------------
    def acts(self, block: Block) -> bool:
        """Whether any adapter of ``block`` is attached here."""
        return any(name in self.outputs or name in self.inputs for name in adapter_names(block))

    def run(self, block: Block, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """This module's output ``y`` (its input ``x``) under ``block``; ``rows`` selects the batch
        rows that ``x`` and ``y`` are, for reading kept inputs (taps) of the whole batch."""
        return self._effect(block, x, y, y, rows)

    def _effect(self, block: Block, x: torch.Tensor, y: torch.Tensor, y0: torch.Tensor, rows) -> torch.Tensor:
        if isinstance(block, str):
            return self._effect_of(block, x, y, y0, rows)
        if isinstance(block, Stack):  # as the plain path runs a list of names
            rescaling = [c for c in block.children if isinstance(c, str) and c in self.inputs]
            if rescaling:  # input adapters first: the layer runs on the changed input
                for name in rescaling:
                    adapter = self.inputs[name]
                    x = adapter.transform_input(x.to(compute_dtype(adapter))).to(x.dtype)
                rerun = self.module.forward(x)
                y, y0 = y + (rerun - y0), rerun
            rest = [c for c in block.children if c not in rescaling]
            for child in sorted(rest, key=lambda c: not (isinstance(c, str) and c in self.outputs
                                                         and self.outputs[c][0].changes_layer)):
                y = self._effect(child, x, y, y0, rows)
            return y
        acting = [(i, child) for i, child in enumerate(block.children) if self.acts(child)]
        if not acting:
            return y
        if isinstance(block, Average):
            return y + sum(block.weights[i] * (self._effect(child, x, y, y0, rows) - y) for i, child in acting)
        fusion = self.fusions.get(block.name)
        if fusion is None:
            raise AdapterkitError(f"fusion {block.name!r} has no layer at {self.module_name}, where its children act; "
                                  "add the fusion again")
        query = y if fusion.query == "output" else self._input_of(acting[-1][1], x, y, rows)
        dtype = compute_dtype(fusion)
        deltas = [(self._effect(child, x, y, y0, rows) - y).to(dtype) for _, child in acting]
        return fusion.fuse(y.to(dtype), deltas, query.to(dtype)).to(y.dtype)

    def _input_of(self, block: Block, x: torch.Tensor, y: torch.Tensor, rows) -> torch.Tensor:
        """What adapter ``block`` reads here (a fusion's query, as AdapterHub takes it)."""
        entry = self.outputs.get(block) if isinstance(block, str) else None
        if entry is None:
            return y
        adapter, reader = entry
        return y if adapter.reads == "output" else x if reader is None else reader(y, rows)

    def _effect_of(self, name: str, x: torch.Tensor, y: torch.Tensor, y0: torch.Tensor, rows) -> torch.Tensor:
        entry = self.outputs.get(name)
        if entry is not None:
            adapter, reader = entry
            dtype = compute_dtype(adapter)
            return adapter((x if reader is None else reader(y, rows)).to(dtype), y.to(dtype)).to(y.dtype)
        adapter = self.inputs.get(name)
        if adapter is not None:  # the layer run again on its changed input; its change adds to y
            return y + (self.module.forward(adapter.transform_input(x.to(compute_dtype(adapter))).to(x.dtype)) - y0)
        return y

    def clear_taps(self) -> None:
        """Let go of kept inputs once read: they hold a whole activation each."""
        for _, reader in self.outputs.values():
            if reader is not None:
                reader.tap.value = None


def compute_dtype(adapter: AdapterModule) -> torch.dtype:
    """An adapter computes in its own dtype (float32 adapters over a bfloat16 base: the inputs
    are cast up, the result back down to the base's dtype), as its optimizer updates it."""
    return next(adapter.parameters()).dtype


class HookLayer:
    """Owns every hook adapterkit puts on one base: attaching and detaching adapters by name, the
    routing, where each adapter sits, and the stacked weights mixed batches compute with."""

    def __init__(self, base: nn.Module, owner: object) -> None:
        holder = _HOLDERS.get(base)
        if holder is not None and holder._owner() is not None:
            raise AdapterkitError(
                "this base model is already wrapped by another AdapterModel, whose hooks would also run; "
                "call unload() (or merge_and_unload()) on that one first, or wrap a fresh copy of the base"
            )
        if holder is not None:  # its AdapterModel is gone: nothing can reach its hooks any more
            holder.release()
        _HOLDERS[base] = self
        self._owner = weakref.ref(owner)
        self._base = weakref.ref(base)  # held weakly: _HOLDERS keeps this layer as long as the base lives
        self.released = False
        self.routing = Routing()
        self._modules: dict[str, nn.Module] = {name: module for name, module in base.named_modules() if name}
        self._sites: dict[str, list[Site]] = {}
        self._hooks: dict[str, SiteHooks] = {}
        self._taps: dict[tuple[str, bool], Tap] = {}
        self._site_cache: dict[str, list[Site]] = {}
        self._stacks: OrderedDict[tuple, tuple[list[nn.Parameter], tuple, dict[str, torch.Tensor]]] = OrderedDict()
        self._plans: OrderedDict[tuple, MixedPlan] = OrderedDict()
        self._attachments = 0  # moves whenever a hook is added or removed: plans made before are stale

    @property
    def base(self) -> nn.Module:
        return self._base()

    # ---- where adapters go ---------------------------------------------------------------------
    def sites_for(self, config: AdapterConfig) -> list[Site]:
        """Where ``config`` attaches on this base; the base never changes shape, so it is kept."""
        key = json.dumps([config.method, config.to_dict()], sort_keys=True, default=str)
        if key not in self._site_cache:
            self._site_cache[key] = config.sites(self.base)
        return self._site_cache[key]

    def sites(self, name: str) -> list[Site]:
        """Where adapter ``name`` is attached (empty for an adapter merged for good)."""
        return list(self._sites[name])

    def base_module(self, module_name: str) -> nn.Module:
        return self._modules[module_name]

    # ---- attaching -----------------------------------------------------------------------------
    def attach(self, name: str, sites: list[Site], modules: dict[str, AdapterModule]) -> None:
        """Hook ``modules`` (by base module name) into the base under ``name``."""
        self._sites[name] = list(sites)
        for site in sites:
            self.attach_site(name, site, modules[site.module_name])

    def attach_site(self, name: str, site: Site, adapter: AdapterModule) -> None:
        if self.released:
            raise AdapterkitError("this AdapterModel let go of its base (unload / merge_and_unload); "
                                  "wrap the base in a new AdapterModel")
        reader = None
        if site.reads_from is not None and (site.reads_from != site.module_name or site.reads_output):
            key = (site.reads_from, site.reads_output)
            tap = self._taps.get(key)
            if tap is None:
                tap = self._taps[key] = Tap(self._modules[site.reads_from], self.routing, output=site.reads_output)
            tap.readers.add(name)
            reader = Reader(tap, site.reads_sum, None if site.norm is None else self._modules[site.norm])
        hooks = self._hooks.get(site.module_name)
        if hooks is None:
            hooks = self._hooks[site.module_name] = SiteHooks(site.module_name, self._modules[site.module_name],
                                                              self.routing)
        adapter.bind(self._modules[site.module_name])
        hooks.add(name, adapter, reader)
        self._attachments += 1

    def detach_site(self, name: str, module_name: str) -> None:
        """Take one adapter off one module (its tap stays: the adapter may come back)."""
        hooks = self._hooks[module_name]
        self._attachments += 1
        if hooks.remove(name):
            del self._hooks[module_name]

    def detach(self, name: str) -> None:
        """Take adapter ``name`` off the base entirely."""
        for site in self._sites.pop(name):
            if site.module_name in self._hooks:
                self.detach_site(name, site.module_name)
        for key, tap in list(self._taps.items()):
            tap.readers.discard(name)
            if not tap.readers:
                tap.handle.remove()
                del self._taps[key]
        for key in [key for key in self._stacks if name in key[2]]:
            del self._stacks[key]

    def forget_sites(self, name: str) -> None:
        """Record that ``name`` is attached nowhere (its sites were merged into the base for good)."""
        self._sites[name] = []

    def release(self) -> None:
        """Remove every hook from the base and let another HookLayer take it."""
        for name in list(self._sites):
            self.detach(name)
        self.released = True
        base = self.base
        if base is not None and _HOLDERS.get(base) is self:
            del _HOLDERS[base]

    # ---- mixed batches -------------------------------------------------------------------------
    def mixed_plan(self, rows: list) -> MixedPlan:
        """The plan for these rows; the same object as last time while no hook was added or
        removed, so a generation loop that enters ``mixed_adapters`` at every step lays the rows
        out once (the plan still checks, per module, that the adapters' weights have not moved)."""
        key = (tuple(rows), self._attachments)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = MixedPlan(rows, self.stacked)
            if len(self._plans) > _PLAN_CACHE_ENTRIES:
                self._plans.popitem(last=False)
        self._plans.move_to_end(key)
        return plan

    def stacked(self, hooks: SiteHooks, kind: tuple, names: list[str]) -> dict[str, torch.Tensor]:
        """The weights of ``names`` at one module, stacked; kept between calls (the same dict)
        until a parameter changes (its version counter or storage moves) or one of the adapters
        is detached."""
        key = (hooks, kind, tuple(names))
        cached = self._stacks.get(key)
        if cached is not None and cached[1] == _weights_signature(cached[0]):
            self._stacks.move_to_end(key)
            return cached[2]
        modules = [hooks.adapter(name) for name in names]
        parameters = [p for module in modules for p in module.parameters()]
        stacked = self._picked_from_stack(hooks, kind, names)
        if stacked is None:
            with torch.no_grad():
                stacked = type(modules[0]).stack(modules)
        self._stacks[key] = (parameters, _weights_signature(parameters), stacked)
        if len(self._stacks) > _STACK_CACHE_ENTRIES:
            self._stacks.popitem(last=False)
        return stacked

    def _picked_from_stack(self, hooks: SiteHooks, kind: tuple, names: list[str]) -> dict[str, torch.Tensor] | None:
        """``names``' slices of a valid stack of more adapters at the same module, if one is kept:
        one contiguous copy, where stacking afresh prepares every adapter's weights again."""
        wanted = set(names)
        for (site, other_kind, others), (parameters, signature, stacked) in reversed(self._stacks.items()):
            if (site is hooks and other_kind == kind and wanted < set(others)
                    and signature == _weights_signature(parameters)):
                index = torch.tensor([others.index(name) for name in names],
                                     device=next(iter(stacked.values())).device)
                return {key: tensor.index_select(0, index) for key, tensor in stacked.items()}
        return None

    def cached_stacks(self) -> list[dict[str, Any]]:
        """What the stack cache holds: module, adapter names and the stacked tensors, oldest first."""
        return [{"module": hooks.module_name, "adapters": names, "tensors": tensors}
                for (hooks, _, names), (_, _, tensors) in self._stacks.items()]


def _weights_signature(parameters: list[nn.Parameter]) -> tuple:
    return tuple((p._version, p.data_ptr()) for p in parameters)
