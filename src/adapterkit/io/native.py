"""adapterkit's own adapter format.

- ``adapter_config.json``: {"format": "adapterkit", "format_version": 1, "name", "method",
  "config", "dtype", "base": fingerprint, "weights_crc32"}; "dtype" names the tensors' dtype
  (float32 unless the adapter was made in another), whatever the base's dtype was.
- ``adapter_model.safetensors``: the tensors, keyed "<base module name>.adapter.<parameter>".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterFileError, ConfigError
from ..methods import AdapterConfig, config_class
from .tensors import crc32, read_tensors, tensors_to_bytes

FORMAT = "adapterkit"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def native_files(name: str, config: AdapterConfig, tensors: dict[str, torch.Tensor], fingerprint: dict[str, Any]) -> dict[str, bytes]:
    """The bytes of a saved adapter folder, by file name (the config last: it marks the folder complete)."""
    weights = tensors_to_bytes(config.tensors_to_save(tensors))
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "method": config.method,
        "config": config.to_dict(),
        "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch.") if tensors else None,
        "base": fingerprint,
        "weights_crc32": crc32(weights),
    }
    return {WEIGHTS_FILE: weights, CONFIG_FILE: (json.dumps(document, indent=2) + "\n").encode()}


def native_config(document: dict[str, Any], path: Path) -> AdapterConfig:
    """The adapter config an adapter_config.json of ours holds, or a clear error naming the file."""
    source = path / CONFIG_FILE
    if document.get("format") != FORMAT:
        raise AdapterFileError(f"{source} is not an adapterkit adapter (format {document.get('format')!r})")
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise AdapterFileError(
            f"{path} has adapter format version {version!r}; this adapterkit reads version {FORMAT_VERSION}. "
            "Upgrade adapterkit to load it"
        )
    if "method" not in document or "config" not in document:
        raise AdapterFileError(f"{source} lacks the field {'method' if 'method' not in document else 'config'!r}")
    try:
        return config_class(document["method"]).from_dict(document["config"])
    except ConfigError as error:
        raise AdapterFileError(f"{source} holds an invalid adapter config: {error}") from None


def native_tensors(document: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    expected = document.get("weights_crc32")
    if expected is not None and (not isinstance(expected, int) or isinstance(expected, bool)):
        raise AdapterFileError(f"{path / CONFIG_FILE} is corrupt: weights_crc32 is {expected!r}, not a number")
    return read_tensors(path / WEIGHTS_FILE, expected)
