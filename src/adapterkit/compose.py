"""Composition blocks: how several adapters combine at every site they share.

- ``Stack(a, b, ...)``: a, then b on a's output (MAD-X: a language adapter under a task adapter).
- ``Average(a, b, ..., weights=...)``: the weighted average of the children's outputs.
- ``Fuse(a, b, ..., name=...)``: AdapterFusion (Pfeiffer et al. 2021): the children's changes of the
  output mixed by attention, the layer's own output as the query; the fusion's parameters are an
  adapter of their own (method "fusion") named ``name``.

Children are adapter names or blocks, nested freely (a Fuse over Stacks, a Stack over a Fuse). A
block is plain data: it names adapters and holds no weights, so one can be defined once
(``AdapterModel.add_composition``) and used by many rows of a mixed batch.
"""

from __future__ import annotations

import math
from typing import Any, Union

from .errors import AdapterkitError, ConfigError
from .names import check_adapter_name

Block = Union[str, "Stack", "Average", "Fuse"]
BLOCK_FIELDS = {"stack": set(), "average": {"weights"}, "fuse": {"name"}}  # each kind's fields beside its children


class Composition:
    """Base of the blocks: an ordered tuple of children."""

    kind: str = ""

    def __init__(self, *children: Block) -> None:
        if len(children) == 1 and isinstance(children[0], (list, tuple)):
            children = tuple(children[0])
        if not children:
            raise ConfigError(f"{type(self).__name__} needs at least one child")
        for child in children:
            if not isinstance(child, (str, Composition)):
                raise ConfigError(f"{type(self).__name__} children are adapter names or blocks, got {child!r}")
        self.children: tuple[Block, ...] = tuple(children)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(repr(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(repr(c) for c in self.children)})"

    def to_json(self) -> dict[str, Any]:
        return {self.kind: [to_json(child) for child in self.children]}


class Stack(Composition):
    kind = "stack"


class Average(Composition):
    kind = "average"

    def __init__(self, *children: Block, weights: list[float] | None = None, normalize: bool = True) -> None:
        super().__init__(*children)
        weights = [1.0] * len(self.children) if weights is None else list(weights)
        if len(weights) != len(self.children) or not all(
                isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
            raise ConfigError(f"Average needs one finite weight per child ({len(self.children)}), got {weights!r}")
        total = sum(weights)
        if normalize and total == 0:
            raise ConfigError("Average weights sum to 0 and cannot be normalised; pass normalize=False")
        self.weights = [w / total for w in weights] if normalize else weights

    def __repr__(self) -> str:
        return f"Average({', '.join(repr(c) for c in self.children)}, weights={self.weights})"

    def to_json(self) -> dict[str, Any]:
        return {"average": [to_json(child) for child in self.children], "weights": self.weights}


class Fuse(Composition):
    kind = "fuse"

    def __init__(self, *children: Block, name: str | None = None) -> None:
        super().__init__(*children)
        self.name = name or "fusion-" + "-".join(n for n in adapter_names(self))

    def __repr__(self) -> str:
        return f"Fuse({', '.join(repr(c) for c in self.children)}, name={self.name!r})"

    def to_json(self) -> dict[str, Any]:
        return {"fuse": [to_json(child) for child in self.children], "name": self.name}


def to_json(block: Block) -> Any:
    return block if isinstance(block, str) else block.to_json()


def from_json(data: Any) -> Block:
    """The block a ``to_json`` value describes (as fusion configs and compositions files store
    them). This is the one parser of blocks: every adapter name and a fuse's name are checked as
    names, children must be a list (a string would become a stack of its letters), and fields a
    block does not have are refused."""
    if isinstance(data, str):
        return check_adapter_name(data)
    kinds = [kind for kind in BLOCK_FIELDS if isinstance(data, dict) and kind in data]
    if len(kinds) != 1:
        raise ConfigError(f"not a composition: {data!r}; a block is {{'stack' | 'average' | 'fuse': [children]}}")
    kind = kinds[0]
    unknown = sorted(set(data) - {kind} - BLOCK_FIELDS[kind])
    if unknown:
        known = sorted({kind} | BLOCK_FIELDS[kind])
        raise ConfigError(f"the {kind} block has no field(s) {unknown}; its fields are {known}")
    children = data[kind]
    if not isinstance(children, list):
        raise ConfigError(
            f"the children of the {kind} block must be a list of adapter names or blocks, got {children!r}"
        )
    blocks = [from_json(child) for child in children]
    if kind == "stack":
        return Stack(*blocks)
    if kind == "average":
        weights = data.get("weights")
        if weights is not None and not isinstance(weights, list):
            raise ConfigError(f"the weights of an average block must be a list of numbers, got {weights!r}")
        return Average(*blocks, weights=weights, normalize=False)
    name = data.get("name")
    return Fuse(*blocks, name=None if name is None else check_adapter_name(name, "fusion"))


def compositions_from_json(document: Any) -> dict[str, Composition]:
    """Named blocks from {name: block} (a compositions file): each name a valid name, each block a
    stack, average or fuse; an error names the composition it is about."""
    if not isinstance(document, dict):
        raise ConfigError(f"expected a table of composition names and blocks, got {type(document).__name__}")
    blocks = {}
    for name, spec in document.items():
        check_adapter_name(name, "composition")
        try:
            block = from_json(spec)
        except AdapterkitError as error:
            raise type(error)(f"composition {name!r}: {error}") from None
        if not isinstance(block, Composition):
            raise ConfigError(
                f"composition {name!r} names the single adapter {block!r}; a composition is a stack, average or fuse"
            )
        blocks[name] = block
    return blocks


def adapter_names(block: Block) -> list[str]:
    """Every adapter a block runs, in order, each once (fusions not included)."""
    if isinstance(block, str):
        return [block]
    names: list[str] = []
    for child in block.children:
        names += [n for n in adapter_names(child) if n not in names]
    return names


def fusions(block: Block) -> list[Fuse]:
    """The Fuse blocks inside ``block`` (itself included)."""
    if isinstance(block, str):
        return []
    found = [block] if isinstance(block, Fuse) else []
    for child in block.children:
        found += fusions(child)
    return found


MAX_NESTING = 32


def check_nesting(block: Block, limit: int = MAX_NESTING) -> None:
    """A ConfigError when blocks nest more than ``limit`` levels deep: running, naming and
    saving a block recurse once per level, and Python's stack ends near a thousand."""
    level, layer = 0, [block]
    while layer := [child for b in layer if isinstance(b, Composition) for child in b.children]:
        level += 1
        if level > limit:
            raise ConfigError(f"blocks nest at most {limit} levels deep; this composition nests deeper")
