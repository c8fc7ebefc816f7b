"""Tensor files: safetensors, read and written with the ``safetensors`` library, never pickle."""

from __future__ import annotations

import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..errors import AdapterFileError
from .folders import read_regular_file


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors({key: t.detach().to("cpu").contiguous() for key, t in tensors.items()}, metadata={"format": "pt"})


def read_tensors(path: Path, expected_crc32: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, after its checksum (when one is recorded) and the
    library's own checks of the header (offsets, sizes, dtypes) pass; else a clear error."""
    data = read_regular_file(path)
    if not data:
        raise AdapterFileError(f"{path} is corrupt: the file is empty")
    if expected_crc32 is not None and zlib.crc32(data) != expected_crc32:
        raise AdapterFileError(f"{path} is corrupt: its checksum does not match the one recorded with it")
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, TypeError, OverflowError, RuntimeError) as error:
        raise AdapterFileError(f"{path} is corrupt: not a readable safetensors file ({error})") from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterFileError(f"{path} holds NaN or infinite values in {key!r}; it cannot have come from a healthy training run")
    return tensors


def crc32(data: bytes) -> int:
    return zlib.crc32(data)
