"""peft's adapter format, for every method whose registration names a ``PeftFormat``.

peft's ``save_pretrained`` writes adapter_config.json (its config fields plus "peft_type") and
adapter_model.safetensors keyed "base_model.model.<module>.<parameter><suffix>", and a method's
shared tensors (VeRA's projections) "base_model.<name>", ours "adapter.<name>". A peft folder has
no base fingerprint, so the base is checked through the tensor names and shapes alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..errors import AdapterFileError, ConfigError
from ..inject import Site
from ..methods import AdapterConfig, Method, get_method, registered_methods, shared_key, shared_name
from .native import CONFIG_FILE, WEIGHTS_FILE
from .tensors import read_tensors, tensors_to_bytes

PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."  # a method's shared tensors
# Fields that say nothing about the adapter's maths (bookkeeping, or how fresh weights were drawn).
HARMLESS = {
    "peft_type", "peft_version", "task_type", "base_model_name_or_path", "revision", "inference_mode",
    "auto_mapping", "fan_in_fan_out", "layers_pattern", "megatron_core", "qalora_group_size", "r",
}


def is_peft_config(document: dict[str, Any]) -> bool:
    return "peft_type" in document and "format" not in document


def peft_method(document: dict[str, Any], source: Path) -> Method:
    by_type = {method.peft.peft_type: method for method in registered_methods() if method.peft is not None}
    peft_type = document.get("peft_type")
    if not isinstance(peft_type, str):
        raise AdapterFileError(f"{source} is corrupt: peft_type must be a string such as 'LORA', got {peft_type!r}")
    if peft_type not in by_type:
        raise AdapterFileError(f"{source} is a peft {peft_type} adapter; "
                               f"adapterkit reads peft's {sorted(by_type)} adapters")
    return by_type[peft_type]


def peft_config(document: dict[str, Any], path: Path) -> AdapterConfig:
    """Our config for a peft adapter_config.json; any field that would change the maths and that
    we do not reproduce is named in the error."""
    source = path / CONFIG_FILE
    method = peft_method(document, source)
    fields, fresh_init = method.peft.fields, method.peft.fresh_init
    unsupported = sorted(
        key for key, value in document.items()
        if key not in fields and key not in HARMLESS and value not in (None, False, {}, [], "none")
        and value not in fresh_init.get(key, ())
    )
    if unsupported:
        details = ", ".join(f"{key}={document[key]!r}" for key in unsupported)
        raise AdapterFileError(f"{source} uses peft features adapterkit does not reproduce: {details}")
    values = {ours: document[theirs] for theirs, ours in fields.items() if document.get(theirs) not in (None, {})}
    if method.peft.from_peft is not None:
        values = method.peft.from_peft(values)
    try:
        return method.config_class(**values)
    except (ConfigError, TypeError, AttributeError) as error:
        raise AdapterFileError(f"{source} holds a peft config adapterkit cannot use: {error}") from None


def peft_tensors(config: AdapterConfig, path: Path) -> dict[str, torch.Tensor]:
    """The folder's tensors, keyed as ours: "<module>.adapter.<parameter>"."""
    if not (path / WEIGHTS_FILE).is_file() and (path / "adapter_model.bin").is_file():
        raise AdapterFileError(
            f"{path} holds its weights as a pickle (adapter_model.bin), which can run code when loaded; "
            "re-save it with peft's save_pretrained(safe_serialization=True)"
        )
    suffix = get_method(config.method).peft.tensor_suffix
    tensors = {}
    for key, tensor in read_tensors(path / WEIGHTS_FILE).items():
        if key.startswith(SHARED_PREFIX) and not key.startswith(PREFIX) and "." not in key.removeprefix(SHARED_PREFIX):
            tensors[shared_key(key.removeprefix(SHARED_PREFIX))] = tensor
            continue
        module, _, param = key.removeprefix(PREFIX).removesuffix(suffix).rpartition(".")
        if not key.startswith(PREFIX) or not module:
            raise AdapterFileError(f"{path / WEIGHTS_FILE} holds {key!r}, "
                                   f"which is not a tensor of peft's {config.method} format")
        tensors[f"{module}.adapter.{param}"] = tensor
    return tensors


def task_type_of(base: torch.nn.Module) -> str | None:
    """peft's ``task_type`` for ``base``: "CAUSAL_LM" for a causal language model, which peft's
    ``AutoPeftModelForCausalLM`` needs to load the folder; None (a plain model) for others."""
    return "CAUSAL_LM" if type(base).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) else None


def peft_files(
    config: AdapterConfig, tensors: dict[str, torch.Tensor], sites: list[Site], base_name: str | None,
    task_type: str | None,
) -> dict[str, bytes]:
    """The bytes of a peft folder (config last)."""
    peft = get_method(config.method).peft
    if peft is None:
        names = sorted(m.name for m in registered_methods() if m.peft is not None)
        raise ConfigError(f"a {config.method} adapter has no peft format; peft's format holds {names} adapters")
    ours = config.to_dict()
    document = {theirs: ours[mine] for theirs, mine in peft.fields.items()}
    if peft.to_peft is not None:
        peft.to_peft(config, sites, document)
    document.update(peft_type=peft.peft_type, inference_mode=True, task_type=task_type,
                    base_model_name_or_path=base_name)
    renamed = {}
    for key, tensor in config.tensors_to_save(tensors).items():
        if (name := shared_name(key)) is not None:
            renamed[SHARED_PREFIX + name] = tensor
            continue
        module, _, param = key.partition(".adapter.")
        renamed[f"{PREFIX}{module}.{param}{'' if param in peft.unsuffixed else peft.tensor_suffix}"] = tensor
    return {WEIGHTS_FILE: tensors_to_bytes(renamed),
            CONFIG_FILE: (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()}
