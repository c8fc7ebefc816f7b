"""Mixed-adapter batches: one adapter per row, computed for all rows together.

At each adapted layer the rows are grouped by kind of adapter (serial bottleneck, parallel
bottleneck, LoRA/AdaLoRA); each kind's rows are packed into equal-sized groups of one adapter
each and run as batched matrix products over the adapters' stacked weights. The base runs once.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AdapterkitError
from .methods.bottleneck import BottleneckAdapter, grouped_bottleneck_delta, stack_bottlenecks

if TYPE_CHECKING:
    from .model import AdapterModel, _Attachment, _Tap

BASE = "base"  # in a mixed batch, the row runs through the bare base


class Kind(NamedTuple):
    """Adapters of one kind at one module are computed together: same maths, same input."""

    method: str  # "bottleneck" or "low_rank"
    reads: str  # "output" (serial bottleneck), "input" (LoRA, parallel on the layer itself) or "tap"
    tap: "_Tap | None" = None
    activation: object = None
    layer_norm: bool = False


def kind_of(module: nn.Module, tap: _Tap | None) -> Kind:
    if isinstance(module, BottleneckAdapter):
        reads = "tap" if tap is not None else "input" if module.parallel else "output"
        return Kind("bottleneck", reads, tap, module.activation, module.ln_weight is not None)
    if hasattr(module, "low_rank_factors"):
        return Kind("low_rank", "input")
    raise AdapterkitError(f"{type(module).__name__} adapters cannot run in a mixed-adapter batch")


@torch.no_grad()
def stack_weights(kind: Kind, modules: list[nn.Module]) -> dict[str, torch.Tensor]:
    if kind.method == "bottleneck":
        return stack_bottlenecks(modules)
    factors = [module.low_rank_factors() for module in modules]
    r = max(a.shape[0] for a, _, _ in factors)
    down = torch.stack([F.pad(a, (0, 0, 0, r - a.shape[0])) for a, _, _ in factors])
    up = torch.stack([F.pad(b * scale, (0, r - b.shape[1])) for _, b, scale in factors])
    return {"down_t": down.transpose(1, 2).contiguous(), "up_t": up.transpose(1, 2).contiguous()}


def grouped_delta(kind: Kind, h: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    if kind.method == "bottleneck":
        return grouped_bottleneck_delta(h, weights, kind.activation, kind.layer_norm)
    return torch.bmm(torch.bmm(h, weights["down_t"]), weights["up_t"])


class Group:
    """The rows one kind of adapter serves at one module, laid out for batched matrix products.

    Rows are packed into equal-sized groups, each group holding rows of one adapter; an adapter
    with many rows takes several groups. With group size ceil(rows / adapters) the padding never
    exceeds one group per adapter, so an uneven mix costs at most twice the adapter FLOPs of an
    even one, and an even one costs the same as a single adapter."""

    def __init__(self, kind: Kind, stacked: dict[str, torch.Tensor], row_adapter: list[int]) -> None:
        self.kind = kind
        device = next(iter(stacked.values())).device
        members = [row for row, adapter in enumerate(row_adapter) if adapter >= 0]
        self.rows = None if len(members) == len(row_adapter) else torch.tensor(members, device=device)
        positions: dict[int, list[int]] = {}
        for position, row in enumerate(members):
            positions.setdefault(row_adapter[row], []).append(position)
        self.size = math.ceil(len(members) / len(positions))
        group_adapter, slot_rows, row_slot = [], [], [0] * len(members)
        for adapter, adapter_positions in positions.items():
            for start in range(0, len(adapter_positions), self.size):
                chunk = adapter_positions[start : start + self.size]
                for offset, position in enumerate(chunk):
                    row_slot[position] = len(slot_rows) + offset
                slot_rows += chunk + [chunk[0]] * (self.size - len(chunk))
                group_adapter.append(adapter)
        self.in_order = slot_rows == list(range(len(members)))
        self.slot_rows = torch.tensor(slot_rows, device=device)
        self.row_slot = torch.tensor(row_slot, device=device)
        if group_adapter == list(range(len(next(iter(stacked.values()))))):
            self.weights = stacked
        else:
            index = torch.tensor(group_adapter, device=device)
            self.weights = {key: tensor.index_select(0, index) for key, tensor in stacked.items()}

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        kind = self.kind
        source = kind.tap.value if kind.reads == "tap" else x if kind.reads == "input" else y
        n = y.shape[0]
        h = source.reshape(n, -1, source.shape[-1])
        if self.rows is not None:
            h = h.index_select(0, self.rows)
        if not self.in_order:
            h = h.index_select(0, self.slot_rows)
        length = h.shape[1]
        delta = grouped_delta(kind, h.reshape(-1, self.size * length, h.shape[-1]), self.weights)
        delta = delta.reshape(-1, length, delta.shape[-1])
        if not self.in_order:
            delta = delta.index_select(0, self.row_slot)
        out = y.reshape(n, -1, y.shape[-1])
        out = out + delta if self.rows is None else out.index_add(0, self.rows, delta)
        return out.reshape(y.shape)


class MixedPlan:
    """One adapter per row for the length of a call (or a ``mixed_adapters`` block).

    Per hooked module, the rows are grouped by kind of adapter once and reused for every forward
    pass of the call, so generation pays for the layout only at the first step."""

    def __init__(self, model: "AdapterModel", rows: list[str | None]) -> None:
        self.model = model
        self.rows = rows
        self.names = frozenset(name for name in rows if name is not None)
        self._groups: dict[tuple[_Attachment, int], list[Group]] = {}

    def apply(self, attachment: "_Attachment", x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        repeat, remainder = divmod(y.shape[0], len(self.rows))
        if remainder or not repeat:
            raise AdapterkitError(f"the batch has {y.shape[0]} rows but adapter_names names {len(self.rows)}")
        key = (attachment, repeat)
        groups = self._groups.get(key)
        if groups is None:
            groups = self._groups[key] = self._layout(attachment, repeat)
        if not groups:
            return None
        for group in groups:
            y = group.apply(x, y)
        for group in groups:
            if group.kind.tap is not None:
                group.kind.tap.value = None
        return y

    def _layout(self, attachment: "_Attachment", repeat: int) -> list[Group]:
        """Rows repeated ``repeat`` times each: generate expands rows for beams and samples."""
        by_kind: dict[Kind, list[str]] = {}
        for name in sorted(self.names & attachment.adapters.keys()):
            module, tap = attachment.adapters[name]
            by_kind.setdefault(kind_of(module, tap), []).append(name)
        groups = []
        for kind, names in by_kind.items():
            index = {name: i for i, name in enumerate(names)}
            row_adapter = [index.get(name, -1) for name in self.rows for _ in range(repeat)]
            groups.append(Group(kind, self.model._stacked(attachment, kind, names), row_adapter))
        return groups
