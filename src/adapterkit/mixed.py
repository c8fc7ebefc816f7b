"""Mixed-adapter batches: one adapter per row, computed for all rows together.

At each adapted module the rows are grouped by kind of adapter (``AdapterModule.mixed_kind``: same
maths, same input). A kind of ``mixed = "delta"`` packs short rows (decoding) into equal-sized
groups of one adapter each and runs them as batched matrix products over the adapters' stacked
weights; long rows (prefill, scoring) run through each adapter's own forward, one adapter's rows
at a time. A kind of ``mixed = "scale"`` multiplies each row by its adapter's vector. The base
runs once.

Why two ways, measured on the default base (32 rows over 8 Houlsby adapters, r=64, 2 cores;
adapter-side operator time over one adapter's batch): at 64 tokens a row the padded products
cost +148 ms a forward pass (their padding, three-dimensional products and the gather into
groups), adapter by adapter +76 ms; at one token a row the padded products cost +6 ms and the
per-adapter calls +25 ms (their operator count). They cross near 32 tokens: ``SEGMENT_MIN_TOKENS``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cached_property

import torch

from .compose import adapter_names
from .errors import AdapterkitError

SEGMENT_MIN_TOKENS = 32  # tokens a row from which delta adapters run adapter by adapter
Stacker = Callable[[object, tuple, list[str]], dict[str, torch.Tensor]]


class RowLayout:
    """Where each row of one kind of delta adapter goes for batched products: rows are packed
    into equal-sized groups, each group holding rows of one adapter.

    When one group per adapter, as big as the busiest adapter's rows, holds at most twice the
    rows, that is the layout: the groups line up with the stacked weights, which are used as they
    are. Otherwise (one adapter has many more rows than the others) the group size is
    ceil(rows / adapters) and a busy adapter takes several groups, so the padding never exceeds
    one group per adapter. Either way an uneven mix costs at most twice the adapter FLOPs of an
    even one, and an even one costs the same as a single adapter. For long rows, which run
    adapter by adapter, it also lists each adapter's batch rows (``adapter_rows``) and the rows of
    no adapter of this kind (``other_rows``). The layout depends on the rows' adapters alone, so
    one serves every module of a plan."""

    def __init__(self, row_adapter: tuple[int, ...], device: torch.device) -> None:
        members = [row for row, adapter in enumerate(row_adapter) if adapter >= 0]
        self.rows = None if len(members) == len(row_adapter) else torch.tensor(members, device=device)
        others = [row for row, adapter in enumerate(row_adapter) if adapter < 0]
        self.other_rows = torch.tensor(others, device=device) if others else None
        positions: dict[int, list[int]] = {}
        for position, row in enumerate(members):
            positions.setdefault(row_adapter[row], []).append(position)
        busiest = max(len(p) for p in positions.values())
        self.size = (busiest if busiest * len(positions) <= 2 * len(members)
                     else math.ceil(len(members) / len(positions)))
        self.group_adapter, slot_rows, row_slot = [], [], [0] * len(members)
        for adapter, adapter_positions in sorted(positions.items()):
            for start in range(0, len(adapter_positions), self.size):
                chunk = adapter_positions[start : start + self.size]
                for offset, position in enumerate(chunk):
                    row_slot[position] = len(slot_rows) + offset
                slot_rows += chunk + [chunk[0]] * (self.size - len(chunk))
                self.group_adapter.append(adapter)
        self.in_order = slot_rows == list(range(len(members)))
        self.adapter_rows = [(adapter, torch.tensor([members[p] for p in adapter_positions], device=device))
                             for adapter, adapter_positions in sorted(positions.items())]
        self.slot_rows = torch.tensor(slot_rows, device=device)
        self.row_slot = torch.tensor(row_slot, device=device)


class Group:
    """The rows one kind of delta adapter serves at one module: a ``RowLayout``, the weights of
    each group's adapter for short rows and the adapters' names for long ones."""

    def __init__(self, kind: tuple, module_class, reads: str, reader, names: list[str],
                 stacked: dict[str, torch.Tensor], layout: RowLayout) -> None:
        self.kind, self.module_class, self.reads, self.reader = kind, module_class, reads, reader
        self.names, self.stacked, self.layout = names, stacked, layout

    @cached_property
    def weights(self) -> dict[str, torch.Tensor]:
        """Each group's adapter weights, made at the first short-row call: a plan whose rows are all
        long (prefill, scoring) never needs them."""
        stacked, layout = self.stacked, self.layout
        if layout.group_adapter == list(range(len(next(iter(stacked.values()))))):
            return stacked
        index = torch.tensor(layout.group_adapter, device=layout.slot_rows.device)
        return {key: tensor.index_select(0, index) for key, tensor in stacked.items()}

    def apply(self, hooks, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y.numel() // (y.shape[0] * y.shape[-1]) >= SEGMENT_MIN_TOKENS:
            return self.apply_per_adapter(hooks, x, y)
        layout = self.layout
        source = y if self.reads == "output" else x if self.reader is None else self.reader(y)
        if self.reads == "input+output":
            source = torch.cat([source, y], dim=-1)
        n = y.shape[0]
        h = source.reshape(n, -1, source.shape[-1])
        if layout.rows is not None:
            h = h.index_select(0, layout.rows)
        if not layout.in_order:
            h = h.index_select(0, layout.slot_rows)
        length = h.shape[1]
        dtype = next(iter(self.weights.values())).dtype  # the adapters' dtype: cast in, and back to the base's
        delta = self.module_class.grouped_delta(self.kind, h.reshape(-1, layout.size * length, h.shape[-1]).to(dtype),
                                                self.weights)
        delta = delta.reshape(-1, length, delta.shape[-1]).to(y.dtype)
        if not layout.in_order:
            delta = delta.index_select(0, layout.row_slot)
        out = y.reshape(n, -1, y.shape[-1])
        out = out + delta if layout.rows is None else out.index_add(0, layout.rows, delta)
        return out.reshape(y.shape)

    def apply_per_adapter(self, hooks, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each adapter's own forward on its rows: no padding, and the products are the plain
        path's two-dimensional ones."""
        out = torch.empty_like(y)
        for adapter, rows in self.layout.adapter_rows:
            out.index_copy_(0, rows, hooks.output_on_rows(self.names[adapter], x, y, rows))
        others = self.layout.other_rows
        if others is not None:  # rows of other adapters or of the bare base: their output as it is
            out.index_copy_(0, others, y.index_select(0, others))
        return out


class ScaleRows:
    """Rows of one kind of scaling adapter: each row times its adapter's vector (ones for rows of
    other adapters or the bare base)."""

    def __init__(self, stacked: dict[str, torch.Tensor], row_adapter: list[int]) -> None:
        vectors = stacked["scale"]
        ones = torch.ones_like(vectors[:1])
        index = torch.tensor(row_adapter, device=vectors.device) + 1
        self.vectors = torch.cat([ones, vectors]).index_select(0, index).unsqueeze(1)  # [rows, 1, d]

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        n = h.shape[0]
        return (h.reshape(n, -1, h.shape[-1]) * self.vectors.to(h.dtype)).reshape(h.shape)


class MixedPlan:
    """One adapter per row for the length of a call (or a ``mixed_adapters`` block).

    Per hooked module, the rows are grouped by kind once and reused for every forward pass while
    the adapters' stacked weights stay the same objects, so generation pays for the layout only at
    the first step. ``stacked(hooks, kind, names)``
    gives the stacked weights of ``names`` at a module (the hook layer keeps them between calls)."""

    def __init__(self, rows: list, stacked: Stacker) -> None:
        """``rows``: per row an adapter name, None (the bare base) or a composition block."""
        self.rows = [row if row is None or isinstance(row, str) else None for row in rows]
        self.names = frozenset(name for name in self.rows if name is not None)
        self.compositions: dict[object, list[int]] = {}
        for i, row in enumerate(rows):
            if row is not None and not isinstance(row, str):
                self.compositions.setdefault(row, []).append(i)
        self.routed = self.names.union(*(adapter_names(block) for block in self.compositions))
        # every row through one adapter: the plain path, with nothing to stack or group
        self.uniform = ((self.rows[0],) if self.rows[0] is not None and self.rows.count(self.rows[0]) == len(rows)
                        else None)
        self._stacked = stacked
        self._layouts: dict[tuple, list] = {}
        self._row_layouts: dict[tuple, RowLayout] = {}

    def apply_output(self, hooks, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        if self.uniform is not None:
            return hooks.apply_outputs(self.uniform, x, y)
        groups = self._groups(hooks, "output", y.shape[0])
        composed = [(block, rows) for block, rows in self.compositions.items() if hooks.acts(block)]
        if not groups and not composed:
            return None
        y0 = y
        for group in groups:
            y = group.apply(hooks, x, y) if isinstance(group, Group) else group.apply(y)
        for block, rows in composed:  # a composition's rows: its tree, on those rows alone
            index = self._expanded(rows, y.shape[0], y.device)
            y = y.index_copy(0, index, hooks.run(block, x.index_select(0, index), y0.index_select(0, index), index))
        hooks.clear_taps()
        return y

    def _expanded(self, rows: list[int], batch_rows: int, device) -> torch.Tensor:
        """Batch indices of ``rows`` when generate repeats every row (beams, samples)."""
        repeat = batch_rows // len(self.rows)
        return torch.tensor([row * repeat + k for row in rows for k in range(repeat)], device=device)

    def apply_input(self, hooks, x: torch.Tensor) -> torch.Tensor:
        if self.uniform is not None:
            return hooks.transform_input(self.uniform, x)
        for group in self._groups(hooks, "input", x.shape[0]):
            x = group.apply(x)
        return x

    def _groups(self, hooks, place: str, batch_rows: int) -> list:
        repeat, remainder = divmod(batch_rows, len(self.rows))
        if remainder or not repeat:
            raise AdapterkitError(f"the batch has {batch_rows} rows but adapter_names names {len(self.rows)}")
        key = (hooks, place, repeat)
        layout = self._layouts.get(key)
        if layout is None or not all(self._stacked(hooks, kind, names) is stacked
                                     for kind, names, stacked in layout[0]):
            layout = self._layouts[key] = self._layout(hooks, place, repeat)
        return layout[1]

    def _layout(self, hooks, place: str, repeat: int) -> tuple[list, list]:
        """(the stacked weights it was made from, the groups) for rows repeated ``repeat`` times
        each: generate expands rows for beams and samples."""
        attached = hooks.inputs if place == "input" else {name: entry[0] for name, entry in hooks.outputs.items()}
        by_kind: dict[tuple, list[str]] = {}
        for name in sorted(self.names & attached.keys()):
            reader = hooks.outputs[name][1] if place == "output" else None
            by_kind.setdefault((attached[name].mixed_kind(), reader), []).append(name)
        sources, groups = [], []
        for (kind, reader), names in by_kind.items():
            first = attached[names[0]]
            index = {name: i for i, name in enumerate(names)}
            row_adapter = tuple(index.get(name, -1) for name in self.rows for _ in range(repeat))
            stacked = self._stacked(hooks, kind, names)
            sources.append((kind, names, stacked))
            if first.mixed == "delta":
                layout = self._row_layouts.get(row_adapter)
                if layout is None:
                    layout = self._row_layouts[row_adapter] = RowLayout(row_adapter,
                                                                        next(iter(stacked.values())).device)
                groups.append(Group(kind, type(first), first.reads, reader, names, stacked, layout))
            elif first.mixed == "scale":
                groups.append(ScaleRows(stacked, row_adapter))
            else:
                raise AdapterkitError(f"{type(first).__name__} adapters cannot run in a mixed-adapter batch")
        return sources, groups
