"""Adapter files: adapterkit's format, peft's and AdapterHub's, read into a config plus a state dict, and written
from one, atomically. Nothing here knows ``AdapterModel``: loading is "read the folder, then
``add_adapter(name, config, state_dict)``", saving is "these tensors and this config, as files".
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bases import pretrained_path
from ..errors import AdapterFileError, ConfigError
from ..inject import Site
from ..methods import AdapterConfig
from ..names import is_valid_name
from .adapterhub import FUSION_CONFIG_FILE, adapterhub_adapter, adapterhub_fusion, is_adapterhub_config
from .fingerprint import FINGERPRINT_FIELDS, base_fingerprint, check_base, forget_base_fingerprint
from .folders import read_json, remove_interrupted_writes, write_folder_atomically
from .native import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    native_config,
    native_files,
    native_prompt_template,
    native_tensors,
    with_prompt_template,
)
from .peft import is_peft_config, peft_config, peft_files, peft_tensors, task_type_of
from .tensors import read_tensors, tensors_to_bytes

FORMATS = (FORMAT, "peft")

__all__ = [
    "CONFIG_FILE", "FUSION_CONFIG_FILE", "WEIGHTS_FILE", "FORMATS", "FORMAT_VERSION", "SavedAdapter", "adapter_files",
    "base_fingerprint", "check_base", "describe_adapter", "forget_base_fingerprint", "read_adapter",
    "read_adapter_config", "read_tensors", "remove_interrupted_writes", "tensors_to_bytes", "with_prompt_template",
    "write_folder_atomically",
]


@dataclasses.dataclass
class SavedAdapter:
    """What a saved adapter folder holds: a name (None when the folder does not say), its config,
    its tensors keyed "<module>.adapter.<parameter>", the base fingerprint it records (None
    for formats without one), the base's name or path and the prompt template it was trained
    with (None when not recorded)."""

    name: str | None
    config: AdapterConfig
    tensors: dict[str, torch.Tensor]
    base: dict[str, Any] | None
    format: str
    base_name: str | None = None
    prompt_template: str | None = None


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """The parsed adapter_config.json of a saved adapter folder, or a clear error."""
    path = Path(path)
    if path.is_file():
        ours = path.name in (CONFIG_FILE, WEIGHTS_FILE)
        folder = f"its folder, {path.parent}" if ours else f"a folder with {CONFIG_FILE}"
        raise AdapterFileError(f"{path} is a file, and an adapter is a folder: give {folder}")
    if not path.is_dir():
        raise AdapterFileError(f"no adapter folder at {path}")
    return read_json(path / CONFIG_FILE)


def read_adapter(path: str | Path, base: nn.Module | None = None) -> SavedAdapter:
    """Read an adapter folder in any format we know (detected from its config file). Formats
    that key tensors by layer rather than module name (AdapterHub's) are placed on ``base``."""
    path = Path(path)
    if path.is_dir() and (path / FUSION_CONFIG_FILE).exists() and not (path / CONFIG_FILE).exists():
        name, config, tensors = adapterhub_fusion(path, base)
        return SavedAdapter(name, config, tensors, None, "adapterhub")
    document = read_adapter_config(path)
    if is_adapterhub_config(document):
        config, tensors = adapterhub_adapter(document, path, base)
        name = document.get("name")
        return SavedAdapter(name if is_valid_name(name) else None, config, tensors, None, "adapterhub")
    if is_peft_config(document):
        config = peft_config(document, path)
        folder_name = path.resolve().name
        base_name = document.get("base_model_name_or_path")
        return SavedAdapter(folder_name if is_valid_name(folder_name) else None, config, peft_tensors(config, path),
                            None, "peft", base_name if isinstance(base_name, str) else None)
    config = native_config(document, path)
    base = document.get("base")
    if not isinstance(base, dict) or not all(isinstance(base.get(key), str) for key in FINGERPRINT_FIELDS):
        raise AdapterFileError(f"{path / CONFIG_FILE} is corrupt: 'base' should be the base model's fingerprint, "
                               f"got {base!r}")
    name, base_name = document.get("name"), document.get("base_model_name_or_path")
    return SavedAdapter(name if isinstance(name, str) else None, config, native_tensors(document, path), base, FORMAT,
                        base_name if isinstance(base_name, str) else None, native_prompt_template(document, path))


def adapter_files(
    format: str, name: str, config: AdapterConfig, tensors: dict[str, torch.Tensor], base, sites: list[Site]
) -> dict[str, bytes]:
    """The files of a saved adapter in ``format`` ("adapterkit" or "peft"), by name, config last."""
    base_name = getattr(getattr(base, "config", None), "_name_or_path", None) or None
    if format == FORMAT:
        return native_files(name, config, tensors, base_fingerprint(base), base_name)
    if format == "peft":  # peft's loaders resolve a folder or a hub id, never our embedded bases' names
        return peft_files(config, tensors, sites, pretrained_path(base_name) if base_name else None,
                          task_type_of(base))
    raise ConfigError(f"format must be one of {list(FORMATS)}, got {format!r}")


def describe_adapter(path: str | Path) -> dict[str, Any]:
    """Format, name, method, config, parameter count, size and base of a saved adapter folder, read
    and checked without loading any model."""
    path = Path(path)
    saved = read_adapter(path)
    base = saved.base or {}
    return {
        "path": str(path),
        "format": saved.format,
        "name": saved.name,
        "method": saved.config.method,
        "config": saved.config.to_dict(),
        "parameters": sum(t.numel() for t in saved.tensors.values()),
        "dtype": str(next(iter(saved.tensors.values())).dtype).removeprefix("torch.") if saved.tensors else None,
        "size_bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file() and not f.is_symlink()),
        "base": {k: base.get(k) for k in ("architecture", "model_type", "num_parameters", "dtype", "weights_sha256",
                                            "quantized")}
        | {"name_or_path": saved.base_name},
        "prompt_template": saved.prompt_template,
    }
