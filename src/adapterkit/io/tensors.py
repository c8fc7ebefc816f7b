"""Tensor files: safetensors, read and written with the ``safetensors`` library, never pickle."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from ..errors import AdapterFileError
from .folders import read_regular_file


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors({key: t.detach().to("cpu").contiguous() for key, t in tensors.items()},
                            metadata={"format": "pt"})


def read_tensors(path: Path, expected_crc32: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, after its checksum (when one is recorded) and the
    library's own checks of the header (offsets, sizes, dtypes) pass, and only if every value is
    finite; else a clear error."""
    data = read_regular_file(path)
    if not data:
        raise AdapterFileError(f"{path} is corrupt: the file is empty")
    if expected_crc32 is not None and zlib.crc32(data) != expected_crc32:
        raise AdapterFileError(f"{path} is corrupt: its checksum does not match the one recorded with it")
    try:
        with safe_open(path, framework="pt") as handle:  # the library parses; tensors are its own copies
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, ValueError, TypeError, OverflowError, RuntimeError, OSError) as error:
        raise AdapterFileError(f"{path} is corrupt: not a readable safetensors file ({error})") from None
    bad = first_non_finite(data, tensors)
    if bad is not None:
        raise AdapterFileError(f"{path} holds NaN or infinite values in {bad!r}; "
                               "it cannot have come from a healthy training run")
    return tensors


def first_non_finite(data: bytes | None, tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of a tensor holding NaN or infinity, if any. Given the safetensors file ``data``
    and float32 tensors only (as saved adapters are), one pass over its data section decides."""
    if data is not None and tensors and all(t.dtype == torch.float32 for t in tensors.values()):
        start = 8 + int.from_bytes(data[:8], "little")  # the header was checked by the library
        if (len(data) - start) % 4 == 0 and np.isfinite(np.frombuffer(data, dtype=np.float32, offset=start)).all():
            return None
    return next((key for key, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)


def crc32(data: bytes) -> int:
    return zlib.crc32(data)
