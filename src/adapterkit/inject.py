"""Finding where adapters go in an arbitrary transformers model, by reading its structure.

A model is a stack of identical blocks (an ``nn.ModuleList``). Inside a block, the linear layers
under a child whose name mentions attention form an attention sub-layer; the others form the
feed-forward sub-layer. A sub-layer's output projection is its last linear layer that writes the
hidden size; its input projection is its first linear layer that reads the hidden size. This covers
GPT-2 (``Conv1D``), Llama-style (``o_proj``/``down_proj``) and BERT-style (``output.dense``) models
without a table of architectures; anything else is reached through ``target_modules``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError, InjectionError

_ATTENTION_NAME = re.compile(r"attn|attention", re.IGNORECASE)


@dataclass(frozen=True)
class Site:
    """One place an adapter attaches: the module whose output it changes, and what it reads."""

    module_name: str  # the hooked module: the adapter sees its output
    in_features: int  # width of what the adapter reads
    out_features: int  # width of the hooked module's output
    reads_from: str | None = None  # module whose *input* the adapter reads (parallel adapters)
    layer: int | None = None  # index of the block holding it, when inside one
    transposed: bool = False  # the hooked module keeps its weight as [in, out] (GPT-2's Conv1D)
    sublayer: str | None = None  # "attention" or "ffn", for sites found from the block structure
    reads_output: bool = False  # read the *output* of ``reads_from`` (post-LN models' residual stream)
    reads_sum: bool = False  # read the hooked module's output plus what ``reads_from`` gives
    norm: str | None = None  # a base module (the model's own LayerNorm) applied to what is read


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2's Conv1D (a linear layer with a transposed weight)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        in_features, out_features = module.weight.shape
        return in_features, out_features
    raise InjectionError(f"{type(module).__name__} is not a linear layer (nn.Linear or Conv1D)")


def hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model", "dim"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def find_blocks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The module lists of identical blocks that make up the model's depth, outermost first."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue  # a list inside a block (experts, sub-layers), not a stack of blocks
        if len({type(block) for block in module}) != 1:
            continue
        if not any(is_linear(m) for m in module[0].modules()):
            continue
        found.append((name, module))
    return found


def find_sites(
    model: nn.Module,
    placement: str,
    layers: Iterable[int] | None = None,
    target_modules: str | list[str] | None = None,
) -> list[Site]:
    """Sites for one adapter.

    ``placement`` is one of "houlsby", "pfeiffer", "attention", "parallel" (see BottleneckConfig)
    or "linear" (every matched linear layer itself, as LoRA uses them).
    """
    parallel = placement == "parallel"
    if target_modules is not None:
        sites = _named_sites(model, target_modules, parallel or placement == "linear")
    else:
        if placement == "linear":
            raise InjectionError("this method needs target_modules: "
                                 "name the linear layers to adapt, e.g. ['q_proj', 'v_proj']")
        sites, blocks = _structural_sites(model, placement)
    if layers is not None:
        sites = _filter_layers(model, sites, layers)
    if target_modules is None:
        _check_placed(model, placement, [block for block in blocks if layers is None or block[1] in set(layers)])
    if not sites:
        raise InjectionError("the layers selected hold no insertion point")
    return sites


PLACED = {
    "houlsby": ("attention", "ffn"), "parallel": ("attention", "ffn"),
    "attention": ("attention",), "pfeiffer": ("ffn",),
}
SUB_LAYER = {"attention": "attention sub-layer", "ffn": "feed-forward sub-layer"}
FOUND_AS = {
    "attention": "a child named like 'attn' or 'attention' that holds linear layers",
    "ffn": "linear layers outside the attention",
}


def _structural_sites(model: nn.Module, placement: str) -> tuple[list[Site], list[tuple[str, int, set[str]]]]:
    """The sites ``placement`` finds, and each block as (name, index, the sub-layers it has)."""
    want_attention = placement in ("houlsby", "attention", "parallel")
    want_ffn = placement in ("houlsby", "pfeiffer", "parallel")
    d_model = hidden_size(model)
    blocks = find_blocks(model)
    sites: list[Site] = []
    found: list[tuple[str, int, set[str]]] = []
    for list_name, blocks_list in blocks:
        for index, block in enumerate(blocks_list):
            prefix = f"{list_name}.{index}."
            attention, ffn = sub_layers(block, d_model)
            kinds = {kind for kind, group in (("attention", attention), ("ffn", ffn)) if group}
            found.append((prefix[:-1], index, kinds))
            groups = ([(g, "attention") for g in (attention if want_attention else [])]
                      + ([(ffn, "ffn")] if want_ffn and ffn else []))
            for group, kind in groups:
                site = _site_for_sub_layer(group, prefix, d_model, index, placement == "parallel",
                                           type(model).__name__)
                sites.append(dataclasses.replace(site, sublayer=kind))
    if not sites:
        names = [n for n, m in model.named_modules() if is_linear(m)][:8]
        raise InjectionError(
            f"found no insertion point in {type(model).__name__}: searched for an nn.ModuleList of identical "
            f"blocks whose linear layers (nn.Linear or Conv1D) write the hidden size ({d_model}), "
            f"grouped into attention (a child named like 'attn'/'attention') and feed-forward. "
            f"Name the modules instead, e.g. target_modules=['o_proj', 'down_proj']; "
            f"linear layers here include {names}"
        )
    return sites, found


def _check_placed(model: nn.Module, placement: str, blocks: list[tuple[str, int, set[str]]]) -> None:
    """A ConfigError when a selected block lacks a sub-layer that ``placement`` puts an adapter
    after: placing only the others would silently be another placement. It names the missing
    sub-layer and what would work."""
    wanted = PLACED[placement]
    for kind in wanted:
        lacking = [name for name, _, kinds in blocks if kind not in kinds]
        if not lacking:
            continue
        everywhere = set.intersection(*(kinds for _, _, kinds in blocks))
        advice = [
            f"placement={other!r} (at the {' and the '.join(SUB_LAYER[k] for k in kinds)} only)"
            for other, kinds in PLACED.items() if other != "parallel" and set(kinds) == everywhere
        ]
        complete = [index for _, index, kinds in blocks if set(wanted) <= kinds]
        if complete:
            advice.append(f"layers={complete} (the blocks that have one)")
        advice.append("target_modules naming the layers to adapt")
        shown = ", ".join(lacking[:3]) + (", ..." if len(lacking) > 3 else "")
        raise ConfigError(
            f"placement {placement!r} places adapters at the {' and the '.join(SUB_LAYER[k] for k in wanted)} "
            f"of each block, "
            f"but {len(lacking)} block(s) of {type(model).__name__} ({shown}) have no {SUB_LAYER[kind]} "
            f"({FOUND_AS[kind]}); use {', or '.join(advice)}"
        )


def sub_layers(
    block: nn.Module, d_model: int | None
) -> tuple[list[list[tuple[str, nn.Module]]], list[tuple[str, nn.Module]]]:
    """The linear layers of a block, as attention groups (one per attention child) and the feed-forward rest."""
    attention: dict[str, list[tuple[str, nn.Module]]] = {}
    ffn: list[tuple[str, nn.Module]] = []
    for name, module in block.named_modules():
        if not is_linear(module):
            continue
        parts = name.split(".")
        owner = next((i for i, part in enumerate(parts[:-1]) if _ATTENTION_NAME.search(part)), None)
        if owner is None:
            ffn.append((name, module))
        else:
            attention.setdefault(".".join(parts[: owner + 1]), []).append((name, module))
    return list(attention.values()), ffn


def _site_for_sub_layer(group, prefix: str, d_model: int | None, layer: int, parallel: bool, model_name: str) -> Site:
    if d_model is None:
        d_model = linear_features(group[-1][1])[1]
    writers = [name for name, m in group if linear_features(m)[1] == d_model]
    readers = [name for name, m in group if linear_features(m)[0] == d_model]
    widening = [name for name, m in group if linear_features(m)[1] == d_model and linear_features(m)[0] != d_model]
    if not writers or not readers or len(widening) > 1:
        raise InjectionError(
            f"cannot tell the output projection of the sub-layer {[n for n, _ in group]} in block {prefix[:-1]} "
            f"of {model_name}; name the modules with target_modules"
        )
    output = writers[-1]
    return Site(
        module_name=prefix + output,
        in_features=d_model,
        out_features=d_model,
        reads_from=prefix + readers[0] if parallel else None,
        layer=layer,
        transposed=is_conv1d(dict(group)[output]),
    )


def _named_sites(model: nn.Module, target_modules: str | list[str], reads_input: bool) -> list[Site]:
    blocks = [name for name, _ in find_blocks(model)]
    sites = []
    for name, module in model.named_modules():
        if not name or not matches_target(name, target_modules):
            continue
        if not is_linear(module):
            if isinstance(target_modules, str):
                continue  # a pattern may also catch containers; only linear layers take adapters
            raise InjectionError(f"target module {name!r} is a {type(module).__name__}; "
                                 "adapters attach to nn.Linear or Conv1D layers")
        in_features, out_features = linear_features(module)
        sites.append(
            Site(
                module_name=name,
                in_features=in_features if reads_input else out_features,
                out_features=out_features,
                reads_from=name if reads_input else None,
                layer=_layer_of(blocks, name),
                transposed=is_conv1d(module),
            )
        )
    if not sites:
        examples = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear(m)})
        raise InjectionError(
            f"target_modules={target_modules!r} matched no linear layer of {type(model).__name__}; "
            f"its linear layers are named {examples}"
        )
    return sites


def query_and_value(model: nn.Module) -> list[str]:
    """The attention's query and value projections of every block (a fused one: itself), peft's
    default LoRA targets, found from structure: the attention's input projections, first and last."""
    d_model = hidden_size(model)
    names = []
    for list_name, blocks in find_blocks(model):
        for index, block in enumerate(blocks):
            for group in sub_layers(block, d_model)[0]:
                readers = [name for name, m in group[:-1] if d_model is None or linear_features(m)[0] == d_model]
                chosen = readers if len(readers) == 1 else readers[:1] + readers[-1:]
                names += [f"{list_name}.{index}.{name}" for name in chosen]
    if not names:
        raise InjectionError(f"found no attention projections in {type(model).__name__}; "
                             "name the layers with target_modules")
    return names


def matches_target(name: str, target_modules: str | list[str]) -> bool:
    """peft's rule: a string is a regular expression matched against the whole name; a list entry
    matches the name itself or its last dotted parts."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _layer_of(block_lists: list[str], module_name: str) -> int | None:
    for list_name in block_lists:
        if module_name.startswith(list_name + "."):
            return int(module_name[len(list_name) + 1 :].split(".", 1)[0])
    return None


def _filter_layers(model: nn.Module, sites: list[Site], layers: Iterable[int]) -> list[Site]:
    wanted = set(layers)
    depth = max((len(blocks) for _, blocks in find_blocks(model)), default=0)
    out_of_range = sorted(i for i in wanted if not 0 <= i < depth)
    if out_of_range:
        raise InjectionError(f"layers {out_of_range} do not exist: "
                             f"{type(model).__name__} has {depth} layers (0..{depth - 1})")
    return [site for site in sites if site.layer in wanted]


# ---- the residual stream -------------------------------------------------------------------------
def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


@torch.no_grad()
def reading_the_residual(model: nn.Module, sites: list[Site], with_output: bool) -> list[Site]:
    """``sites`` (output projections of sub-layers) re-aimed at the residual stream x entering each
    sub-layer, or at the sub-layer's output s plus x (``with_output``), as AdapterHub's adapters
    read them. Found by running the model once on two tokens and watching the order modules run:

    - x is the residual stream around the last norm that runs before the sub-layer's first linear
      layer. In a pre-LN block (Llama, GPT-2) that norm's input; in a post-LN block (BERT) its
      output. A block is post-LN when its output is its last norm's output.
    - In a post-LN block the sum s + x is read through the norm that runs right after the
      sub-layer's output projection (the model's own LayerNorm)."""
    order, outputs = _trace(model)
    post_ln = _is_post_ln(model, order, outputs)
    first_linear = {}
    for list_name, blocks in find_blocks(model):
        d_model = hidden_size(model)
        for index, block in enumerate(blocks):
            attention, ffn = sub_layers(block, d_model)
            for group in attention + ([ffn] if ffn else []):
                names = [f"{list_name}.{index}.{name}" for name, _ in group]
                called = [n for n in order if n in names]
                for name in names:
                    first_linear[name] = called[0] if called else names[0]
    position = {name: i for i, name in enumerate(order)}
    located = []
    for site in sites:
        start = first_linear.get(site.module_name)
        if start not in position or site.module_name not in position:
            raise InjectionError(f"cannot tell where the residual stream enters the sub-layer of {site.module_name}; "
                                 "this model's layout is not supported for residual-reading adapters")
        before = [n for n in order[: position[start]] if _is_norm(model.get_submodule(n))]
        after = [n for n in order[position[site.module_name] + 1 :] if _is_norm(model.get_submodule(n))]
        if not before or (post_ln and not after):
            raise InjectionError(f"found no norm around the sub-layer of {site.module_name}; "
                                 "this model's layout is not supported for residual-reading adapters")
        located.append(dataclasses.replace(
            site, reads_from=before[-1], reads_output=post_ln, reads_sum=with_output,
            norm=after[0] if post_ln and with_output else None, in_features=site.out_features,
        ))
    return located


def _trace(model: nn.Module) -> tuple[list[str], dict[str, object]]:
    """The names of the modules in the order they start running, and each one's last output."""
    order: list[str] = []
    outputs: dict[str, object] = {}
    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(lambda m, a, name=name: order.append(name)))
            handles.append(module.register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out)))
    try:
        device = next(model.parameters()).device
        model(input_ids=torch.tensor([[1, 2]], device=device))
    finally:
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(order)), outputs


def _is_post_ln(model: nn.Module, order: list[str], outputs: dict[str, object]) -> bool:
    list_name, blocks = find_blocks(model)[0]
    block = f"{list_name}.0"
    norms = [n for n in order if n.startswith(block + ".") and _is_norm(model.get_submodule(n))]
    first = lambda value: value[0] if isinstance(value, (tuple, list)) else value
    return bool(norms) and torch.equal(first(outputs[block]), first(outputs[norms[-1]]))
