"""adapterkit's own adapter format.

- ``adapter_config.json``: {"format": "adapterkit", "format_version": 1, "name", "method",
  "config", "dtype", "base": fingerprint, "base_model_name_or_path", "prompt_template",
  "weights_crc32"}; "dtype" names the tensors' dtype (float32 unless the adapter was made in
  another), whatever the base's dtype was. "base_model_name_or_path" (as peft names it: what
  ``load_base`` was given) and "prompt_template" (see ``adapterkit.templates``) are optional:
  files written before them, or without them, read as None.
- ``adapter_model.safetensors``: the tensors, keyed "<base module name>.adapter.<parameter>", and
  the adapter's shared tensors, if its method has any (``AdapterConfig.shared_tensors``: VeRA's
  projections), keyed "adapter.<name>"; a method may leave those out, to be made again on loading.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterFileError, ConfigError
from ..methods import AdapterConfig, config_class
from ..templates import check_template
from .tensors import crc32, read_tensors, tensors_to_bytes

FORMAT = "adapterkit"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def native_files(
    name: str, config: AdapterConfig, tensors: dict[str, torch.Tensor], fingerprint: dict[str, Any],
    base_name: str | None = None,
) -> dict[str, bytes]:
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
        "base_model_name_or_path": base_name,
        "weights_crc32": crc32(weights),
    }
    return {WEIGHTS_FILE: weights, CONFIG_FILE: _config_bytes(document)}


def with_prompt_template(files: dict[str, bytes], template: str | None) -> dict[str, bytes]:
    """The files of a saved adapter (``native_files``) with ``template`` recorded in its config:
    the prompt format it was trained on, which generation and scoring then apply by default."""
    document = json.loads(files[CONFIG_FILE])
    document["prompt_template"] = check_template(template)
    return {**files, CONFIG_FILE: _config_bytes(document)}


def native_prompt_template(document: dict[str, Any], path: Path) -> str | None:
    try:
        return check_template(document.get("prompt_template"), f"{path / CONFIG_FILE}: prompt_template")
    except ConfigError as error:
        raise AdapterFileError(str(error)) from None


def _config_bytes(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode()


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
