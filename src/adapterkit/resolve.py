"""What a name, a list of names or a composition block stands for, checked against the adapters of
one AdapterModel: every adapter in it loaded, every Fuse block's fusion made for those children,
the nesting bounded. Also the rows of a mixed batch, checked the same way."""

from __future__ import annotations

from collections.abc import Sequence

from .compose import Block, Composition, Fuse, Stack, adapter_names, check_nesting, fusions, to_json
from .errors import AdapterkitError, AdapterNameError, ConfigError, MergeError
from .methods import AdapterConfig
from .names import BASE


def check_known(name: str, configs: dict[str, AdapterConfig]) -> None:
    if not isinstance(name, str) or name not in configs:
        known = ", ".join(configs) or "none"
        raise AdapterNameError(f"no adapter named {name!r}; adapters: {known}")


def resolve(names, configs: dict[str, AdapterConfig], compositions: dict[str, Block]) -> Block | None:
    """The block ``names`` stands for (an adapter or composition name, a list of adapter names, a
    block, or None), every adapter and fusion in it checked."""
    if names is None:
        return None
    if isinstance(names, str):
        block = compositions.get(names, names)
    elif isinstance(names, Composition):
        block = names
    elif isinstance(names, Sequence) and all(isinstance(n, str) for n in names):
        if len(set(names)) != len(names):
            raise AdapterNameError(f"an adapter is named twice in {list(names)}")
        block = Stack(*names) if names else None
    else:
        raise AdapterNameError(f"expected an adapter name, a list of names or a composition, got {names!r}")
    if block is None:
        return None
    check_nesting(block)
    for name in adapter_names(block):
        check_known(name, configs)
        if configs[name].runs_inside_composition:
            raise AdapterNameError(
                f"{name!r} is a {configs[name].method}: it runs inside its Fuse block, "
                f"e.g. set_active(ak.Fuse(..., name={name!r}))"
            )
    for fuse in fusions(block):
        check_fusion(fuse, configs)
    return block


def check_fusion(fuse: Fuse, configs: dict[str, AdapterConfig]) -> None:
    """That the adapter ``fuse`` names runs inside a composition and was made for its children."""
    config = configs.get(fuse.name)
    if config is None or not config.runs_inside_composition:
        raise AdapterNameError(f"no fusion named {fuse.name!r}; add_fusion({fuse!r}) first")
    children = [to_json(child) for child in fuse.children]
    if config.children != children:
        raise ConfigError(f"fusion {fuse.name!r} was made for {config.children}, not {children}")


def mixed_rows(
    rows: Sequence[str | Composition | None], count: int | None, configs: dict[str, AdapterConfig],
    compositions: dict[str, Block], training: bool, merged: str | None,
) -> list[Block | None]:
    """What each row of a mixed batch runs (None: the bare base), each checked; ``count``: the
    batch's rows, when known. Refused in training mode and while an adapter is merged."""
    if isinstance(rows, str) or not isinstance(rows, Sequence) or not rows:
        raise AdapterNameError(f"adapter_names must be a non-empty list with one name (or None) per row, got {rows!r}")
    if count is not None and len(rows) != count:
        raise AdapterNameError(f"adapter_names has {len(rows)} names for a batch of {count} rows; give one per row")
    if training:
        raise AdapterkitError("mixed-adapter batches are for inference: call model.eval() first "
                              "(train one adapter at a time with train_adapter)")
    if merged is not None:
        raise MergeError(f"adapter {merged!r} is merged into the base weights, so it would apply to every row; "
                         "unmerge() it to mix adapters per row")
    blocks = []
    for name in rows:
        if name is None or name == BASE:
            blocks.append(None)
        elif not isinstance(name, (str, Composition)):
            raise AdapterNameError(f"adapter_names holds {name!r}; "
                                   "give adapter or composition names, or composition blocks")
        else:
            blocks.append(resolve(name, configs, compositions))  # an adapter's name, or a composition's block
    return blocks
