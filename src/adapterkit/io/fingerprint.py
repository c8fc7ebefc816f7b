"""A fingerprint of a base model, so an adapter is never silently applied to a different model.

It names the architecture, hashes the names and shapes of the parameters, and hashes the weights.
The same base in another dtype or on another device is the same base: the shapes hash leaves the
dtype out, and the weights are hashed as held ("dtype", "weights_sha256") and, for a float32
base, also as they read when cast to each half dtype ("weights_sha256_as"), which is exactly what
``load_base(dtype=...)`` or ``.to(dtype)`` makes of them. So an adapter saved over a float32 base
is verified over its bfloat16 or float16 copy, and one saved over a copy is verified over the
float32 base (by casting it); only two different half copies cannot be compared.

Hashing reads every byte of the base (about 0.3 s for 135M parameters, twice that with the half
casts of a float32 base), so the result is kept for the life of the base object, and computed
again only when a parameter's dtype changes (the base was cast after loading). The base is frozen,
so its values cannot go stale through adapterkit.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BaseMismatchError

_fingerprints: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict[str, Any]]] = weakref.WeakKeyDictionary()
FINGERPRINT_FIELDS = ("architecture", "shapes_sha256", "weights_sha256")
_HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_LEGACY_DTYPE = "float32"  # fingerprints without a "dtype" were taken of float32 bases, dtypes in the shapes hash


def base_fingerprint(base: nn.Module) -> dict[str, Any]:
    """Architecture, model type, parameter count, dtype, and hashes of the shapes and of the weights."""
    signature = tuple(tensor.dtype for tensor in base.state_dict().values())
    cached = _fingerprints.get(base)
    if cached is None or cached[0] != signature:
        cached = _fingerprints[base] = (signature, _compute(base))
    return cached[1]


def forget_base_fingerprint(base: nn.Module) -> None:
    """Drop the kept fingerprint of a base whose weights were changed for good (merge_and_unload)."""
    _fingerprints.pop(base, None)


def check_base(saved: Any, base: nn.Module, source: Path) -> None:
    """Refuse an adapter whose recorded fingerprint ``saved`` is not this base's (in any dtype)."""
    if not isinstance(saved, dict):
        raise BaseMismatchError(f"{source} records no base fingerprint, so it cannot be checked against this base; "
                                "re-save it with adapterkit")
    here = base_fingerprint(base)
    if saved.get("architecture") != here["architecture"]:
        _refuse(saved, source, f"the architecture differs ({saved.get('architecture')} vs {here['architecture']})")
    shapes = here["shapes_sha256"] if "dtype" in saved else _shapes_hash(base, with_dtypes=True)
    if saved.get("shapes_sha256") != shapes:
        _refuse(saved, source, "the parameter names or shapes differ")
    theirs, ours = saved.get("dtype", _LEGACY_DTYPE), here["dtype"]
    if theirs == ours:
        same = saved.get("weights_sha256") == here["weights_sha256"]
    elif ours in _as_dict(saved.get("weights_sha256_as")):
        same = saved["weights_sha256_as"][ours] == here["weights_sha256"]
    elif theirs in here["weights_sha256_as"]:
        same = saved.get("weights_sha256") == here["weights_sha256_as"][theirs]
    else:
        copy = (f" or a {theirs} copy (load_base(..., dtype=torch.{theirs}))" if theirs != "float32"
                else " (load_base(..., dtype=torch.float32))")
        _refuse(saved, source, f"the dtype differs ({theirs} there, {ours} here) "
                f"and a {ours} copy cannot be checked against a {theirs} one", f"Load it over the float32 base{copy}")
    if not same:
        dtype = f" (and the dtype: {theirs} there, {ours} here)" if theirs != ours else ""
        _refuse(saved, source, f"the weights differ{dtype}")


def _refuse(saved: dict, source: Path, what: str, advice: str | None = None) -> None:
    count = saved.get("num_parameters")
    size = f", {count:,} parameters" if isinstance(count, int) else ""
    advice = advice or f"Load it over the base it was trained on ({saved.get('architecture')}{size})"
    raise BaseMismatchError(f"adapter at {source} was made for another base model: {what}. {advice}")


def _as_dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _compute(base: nn.Module) -> dict[str, Any]:
    tensors = [tensor.detach() for tensor in base.state_dict(keep_vars=False).values()]
    floating = [t.dtype for t in tensors if t.is_floating_point()]
    dtype = str(floating[0] if floating else torch.float32).removeprefix("torch.")
    config = getattr(base, "config", None)
    return {
        "architecture": type(base).__name__,
        "model_type": getattr(config, "model_type", None),
        "num_parameters": sum(p.numel() for p in base.parameters()),
        "shapes_sha256": _shapes_hash(base, with_dtypes=False),
        "dtype": dtype,
        "weights_sha256": _weights_hash(tensors, None),
        "weights_sha256_as": (
            {name: _weights_hash(tensors, half) for name, half in _HALF.items()} if dtype == "float32" else {}
        ),
    }


def _shapes_hash(base: nn.Module, with_dtypes: bool) -> str:
    """Names and shapes; ``with_dtypes``: as fingerprints before dtypes were told apart hashed a
    float32 base (floating tensors as float32, whatever this copy holds)."""
    shapes = hashlib.sha256()
    for name, tensor in base.state_dict(keep_vars=False).items():
        dtype = (torch.float32 if tensor.is_floating_point() else tensor.dtype) if with_dtypes else None
        shapes.update(f"{name}:{tuple(tensor.shape)}{f':{dtype}' if dtype else ''};".encode())
    return shapes.hexdigest()


def _weights_hash(tensors: list[torch.Tensor], cast: torch.dtype | None) -> str:
    """The hash of every tensor's bytes, floating ones cast to ``cast`` first (None: as held)."""
    def digest(tensor: torch.Tensor) -> bytes:
        if cast is not None and tensor.is_floating_point():
            tensor = tensor.to(cast)
        data = tensor.to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
        return hashlib.sha256(data).digest()

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        return hashlib.sha256(b"".join(pool.map(digest, tensors))).hexdigest()
