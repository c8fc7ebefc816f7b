"""AdapterHub's (``adapters`` 1.x, and the older adapter-transformers) bottleneck adapters and
AdapterFusion layers, read into our configs and tensors.

An AdapterHub folder holds ``adapter_config.json`` ({"config": {...}, "hidden_size", "model_type",
"name", "version", ...}) and ``adapter.safetensors`` or ``pytorch_adapter.bin`` (loaded with
``torch.load(weights_only=True)`` only), keyed by where the adapter sits:
"<prefix>.<layer>.<location>.adapters.<name>.adapter_{down.0,up}.{weight,bias}", the location
being the attention output ("attention.output", "attention_adapters") or the feed-forward output
("output", "output_adapters"). A fusion folder holds ``adapter_fusion_config.json`` and
``model_adapter_fusion.safetensors`` ("...adapter_fusion_layer.<a,b>.{query,key,value}...").

Their maths maps onto ``BottleneckConfig``: Houlsby (double_seq_bn) reads the sub-layer output,
Pfeiffer (seq_bn, ``original_ln_before``) reads the output plus the residual stream (through the
model's own LayerNorm in post-LN models), the parallel adapter (par_bn, ``is_parallel``) reads the
residual stream; none has a LayerNorm of its own. Keys are placed on the base's sub-layers by
(layer, location), so the same file loads into BERT-, GPT-2- and Llama-style models alike.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compose import Fuse
from ..errors import AdapterFileError, ConfigError
from ..inject import find_sites
from ..methods import BottleneckConfig, FusionConfig
from ..methods.base import check_bool, check_int
from .folders import read_json, read_regular_file
from .tensors import first_non_finite, read_tensors

FUSION_CONFIG_FILE = "adapter_fusion_config.json"
WEIGHT_FILES = ("adapter.safetensors", "pytorch_adapter.bin")
FUSION_WEIGHT_FILES = ("model_adapter_fusion.safetensors", "pytorch_model_adapter_fusion.bin")
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "swish": "silu", "silu": "silu", "tanh": "tanh"}
PARAMETERS = {"adapter_down.0.weight": "down_weight", "adapter_down.0.bias": "down_bias",
              "adapter_up.weight": "up_weight", "adapter_up.bias": "up_bias",
              "query.weight": "query_weight", "query.bias": "query_bias", "key.weight": "key_weight",
              "key.bias": "key_bias", "value.weight": "value_weight"}
FUSION_PARAMETERS = ("query_weight", "query_bias", "key_weight", "key_bias", "value_weight")
KEY = re.compile(r"(?:^|\.)(\d+)\.(attention\.output|attention_adapters|output_adapters|output)"
                 r"\.(?:adapters|adapter_fusion_layer)\.[^.]+\.(.+)$")
# Fields AdapterHub always writes; these values switch on something we do not reproduce.
UNSUPPORTED = {
    "phm_layer": lambda v: v, "inv_adapter": lambda v: v is not None, "use_gating": lambda v: v,
    "cross_adapter": lambda v: v, "ln_before": lambda v: v, "ln_after": lambda v: v,
    "residual_before_ln": lambda v: v is not True, "original_ln_after": lambda v: v is not True,
    "scaling": lambda v: not isinstance(v, (int, float)),
}


def is_adapterhub_config(document: dict[str, Any]) -> bool:
    return "format" not in document and "peft_type" not in document and isinstance(document.get("config"), dict) and (
        str(document.get("version", "")).startswith("adapters.") or "model_type" in document
        or "hidden_size" in document
    )


def adapterhub_adapter(
    document: dict[str, Any], path: Path, base: nn.Module | None
) -> tuple[BottleneckConfig, dict[str, torch.Tensor]]:
    """Our bottleneck config and tensors for an AdapterHub adapter folder; with ``base``, the
    tensors are keyed by its module names, else by "@<layer>.<sublayer>"."""
    source = path / "adapter_config.json"
    options = document["config"]
    switched_on = sorted(key for key, is_on in UNSUPPORTED.items() if key in options and is_on(options[key]))
    if switched_on:
        details = ", ".join(f"{key}={options[key]!r}" for key in switched_on)
        raise AdapterFileError(f"{source} uses AdapterHub features adapterkit does not reproduce: {details}")
    try:
        flags = _flags(options, ("mh_adapter", "output_adapter", "is_parallel", "original_ln_before"), False)
    except ConfigError as error:
        raise AdapterFileError(f"{source} is corrupt: {error}") from None
    activation = str(options.get("non_linearity", "relu")).lower()
    if activation not in ACTIVATIONS:
        raise AdapterFileError(f"{source}: activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
    placement = {(True, True): "houlsby", (False, True): "pfeiffer", (True, False): "attention"}.get(
        (flags["mh_adapter"], flags["output_adapter"]))
    if placement is None:
        raise AdapterFileError(f"{source} places the adapter nowhere (mh_adapter and output_adapter are both false)")
    tensors = _located(_read_weights(path, WEIGHT_FILES), path)
    factor = options.get("reduction_factor", 16)
    reads = "residual" if flags["is_parallel"] else "output+residual" if flags["original_ln_before"] else "output"
    try:  # values go to the config as written: its own checks name a field of the wrong type or range
        config = BottleneckConfig(
            placement=placement,
            reads=reads,
            reduction_factor={str(k): v for k, v in factor.items()} if isinstance(factor, dict) else factor,
            activation=ACTIVATIONS[activation], dropout=0.0 if options.get("dropout") is None else options["dropout"],
            layer_norm=False, scaling=options.get("scaling", 1.0),
            layers=sorted({int(key[1:].split(".")[0]) for key in tensors}),
        )
    except ConfigError as error:
        raise AdapterFileError(f"{source} holds an adapter config adapterkit cannot use: {error}") from None
    return config, _placed(tensors, base, path) if base is not None else tensors


def adapterhub_fusion(path: Path, base: nn.Module | None) -> tuple[str, FusionConfig, dict[str, torch.Tensor]]:
    """(name, config, tensors) of an AdapterFusion folder; the name is ``Fuse(*members).name``."""
    source = path / FUSION_CONFIG_FILE
    document = read_json(source)
    members, options = document.get("adapter_names"), document.get("config")
    if (not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members)
            or not isinstance(options, dict)):
        raise AdapterFileError(f"{source} is corrupt: it needs 'adapter_names' (a list of names) and 'config'")
    try:
        flags = _flags(options, ("residual_before", "query_before_ln"), False)
        flags |= _flags(options, ("query", "key", "value"), True)
        if document.get("hidden_size") is not None:
            check_int("hidden_size", document["hidden_size"])
    except ConfigError as error:
        raise AdapterFileError(f"{source} is corrupt: {error}") from None
    if flags["residual_before"] or not (flags["query"] and flags["key"] and flags["value"]):
        raise AdapterFileError(f"{source} uses AdapterHub fusion options adapterkit does not reproduce: "
                               "residual_before, or a fusion without query, key or value")
    tensors = _located(_read_weights(path, FUSION_WEIGHT_FILES), path)
    hidden = document.get("hidden_size") or _fusion_width(tensors, source)
    widths = {key.partition(".adapter.")[0]: hidden for key in tensors}
    if base is not None:
        locations = _locations(base)
        widths = {locations.get(key, key): width for key, width in widths.items()}
        tensors = _placed(tensors, base, path)
    try:
        query = "output" if flags["query_before_ln"] else "adapter_input"
        config = FusionConfig(children=list(members), widths=widths, query=query)
    except ConfigError as error:
        raise AdapterFileError(f"{source} holds a fusion adapterkit cannot use: {error}") from None
    return Fuse(*members).name, config, tensors


def _flags(options: dict[str, Any], keys: tuple[str, ...], default: bool) -> dict[str, bool]:
    """The boolean options ``keys`` (``default`` where absent): a string such as "false" would read as true."""
    return {key: check_bool(key, options.get(key, default)) for key in keys}


def _fusion_width(tensors: dict[str, torch.Tensor], source: Path) -> int:
    """The hidden size from a query, key or value tensor, for a fusion config that does not record it."""
    for key, tensor in tensors.items():
        if key.rpartition(".")[2] in FUSION_PARAMETERS and tensor.dim():
            return int(tensor.shape[0])
    raise AdapterFileError(f"{source} lacks 'hidden_size', and its weights hold no query, key or value tensor "
                           "to tell it")


def _read_weights(path: Path, names: tuple[str, str]) -> dict[str, torch.Tensor]:
    safe, pickled = (path / name for name in names)
    if safe.exists() or safe.is_symlink():
        return read_tensors(safe)
    if not (pickled.exists() or pickled.is_symlink()):
        raise AdapterFileError(f"{path} holds neither {names[0]} nor {names[1]}")
    import io as bytes_io

    try:  # weights_only: tensors and plain containers, never code
        tensors = torch.load(bytes_io.BytesIO(read_regular_file(pickled)), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds on a corrupt or hostile pickle
        raise AdapterFileError(f"{pickled} is corrupt or not a plain tensor file: "
                               f"{type(error).__name__}: {error}") from None
    if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in tensors.items()):
        raise AdapterFileError(f"{pickled} does not hold a mapping of names to tensors")
    bad = first_non_finite(None, tensors)
    if bad is not None:
        raise AdapterFileError(f"{pickled} holds NaN or infinite values in {bad!r}")
    return tensors


def _located(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Keys "@<layer>.<attention|ffn>.adapter.<our parameter>"."""
    located = {}
    for key, tensor in tensors.items():
        match = KEY.search(key)
        if match is None or match.group(3) not in PARAMETERS:
            raise AdapterFileError(f"{path} holds {key!r}, "
                                   "which is not a tensor of an AdapterHub bottleneck adapter or fusion")
        layer, location, parameter = match.groups()
        sublayer = "attention" if location.startswith("attention") else "ffn"
        located[f"@{layer}.{sublayer}.adapter.{PARAMETERS[parameter]}"] = tensor
    return located


def _locations(base: nn.Module) -> dict[str, str]:
    """"@<layer>.<sublayer>" -> the base module AdapterHub's adapter at that place follows."""
    return {f"@{site.layer}.{site.sublayer}": site.module_name for site in find_sites(base, "houlsby")}


def _placed(tensors: dict[str, torch.Tensor], base: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    locations = _locations(base)
    placed = {}
    for key, tensor in tensors.items():
        where, _, rest = key.partition(".adapter.")
        if where not in locations:
            raise AdapterFileError(f"{path} has an adapter at layer {where[1:]}, "
                                   f"which {type(base).__name__} does not have")
        placed[f"{locations[where]}.adapter.{rest}"] = tensor
    return placed
